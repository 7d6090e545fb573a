"""PROXY protocol v1 and v2 headers (HAProxy's proxy-protocol.txt): bytes in, the client's address out.

sans-IO: ``parse_proxy_header`` looks at the bytes received so far and says "need more" (None), "here is
the header" (``ProxyHeader``) or raises ``ProxyHeaderError``. It never asks for a byte past the header,
so the caller can consume exactly ``ProxyHeader.length`` bytes and leave the rest (an SSLRequest or a
TLS ClientHello) on the stream.
"""

from __future__ import annotations

import enum
import ipaddress
from dataclasses import dataclass
from typing import Final

__all__ = [
    "FIRST_BYTES",
    "MAX_HEADER_LENGTH",
    "V1_MAX_LENGTH",
    "V2_SIGNATURE",
    "HeaderProblem",
    "ProxyHeader",
    "ProxyHeaderError",
    "parse_proxy_header",
]

# 2.1: "PROXY UNKNOWN <39-char IPv6> <39-char IPv6> 65535 65535\r\n" is the longest valid line.
V1_MAX_LENGTH: Final = 107
V1_PREFIX: Final = b"PROXY "
# 2.2: chosen so that no common protocol (nor a PostgreSQL startup packet) starts with it.
V2_SIGNATURE: Final = b"\r\n\r\n\x00\r\nQUIT\n"
V2_FIXED_LENGTH: Final = 16
MAX_HEADER_LENGTH: Final = V2_FIXED_LENGTH + 0xFFFF
# A stream that starts with anything else cannot carry a header: neither does a PostgreSQL startup
# packet (its length's first byte is 0) nor a TLS record (0x16) start with these.
FIRST_BYTES: Final = frozenset({V1_PREFIX[0], V2_SIGNATURE[0]})

_V1_CHARACTERS: Final = frozenset(b"0123456789abcdefABCDEFKNOPRTUWXY.: ")
_V2_VERSION: Final = 0x2
_V2_LOCAL, _V2_PROXY = 0x0, 0x1
_AF_UNSPEC, _AF_INET, _AF_INET6, _AF_UNIX = 0x0, 0x1, 0x2, 0x3
_STREAM, _DGRAM = 0x1, 0x2
# 2.2: addresses (source, destination) then ports (source, destination) for each family.
_V2_ADDRESS_BLOCK: Final = {_AF_UNSPEC: 0, _AF_INET: 12, _AF_INET6: 36, _AF_UNIX: 216}


class HeaderProblem(enum.Enum):
    """Why a header was refused; the values are low-cardinality metric labels."""

    MISSING = "missing"
    MALFORMED = "malformed"
    UNSUPPORTED = "unsupported"
    OVERSIZED = "oversized"


class ProxyHeaderError(ValueError):
    """The stream does not start with a valid PROXY protocol header; ``problem`` says which way."""

    def __init__(self, problem: HeaderProblem, message: str) -> None:
        super().__init__(message)
        self.problem = problem


@dataclass(frozen=True, slots=True)
class ProxyHeader:
    length: int
    """Bytes the header takes on the stream; whatever follows belongs to the proxied protocol."""
    version: int
    source: tuple[str, int] | None
    """The original client's address and port, or None when the header carries none the proxy can
    use (v2 LOCAL health checks, v1 UNKNOWN, UNSPEC, UNIX or datagram): use the connection's own."""


def parse_proxy_header(data: bytes | bytearray | memoryview) -> ProxyHeader | None:
    """The header at the start of ``data``; None if the bytes so far are a valid but incomplete prefix."""
    data = bytes(data[:MAX_HEADER_LENGTH])
    if not data:
        return None
    if data[0] == V1_PREFIX[0]:
        return _parse_v1(data)
    if data[0] == V2_SIGNATURE[0]:
        return _parse_v2(data)
    raise ProxyHeaderError(HeaderProblem.MISSING, f"expected a PROXY protocol header, got {data[:8]!r}")


def _parse_v1(data: bytes) -> ProxyHeader | None:
    prefix = data[: len(V1_PREFIX)]
    if not V1_PREFIX.startswith(prefix):
        raise ProxyHeaderError(HeaderProblem.MISSING, f"expected a PROXY protocol header, got {prefix!r}")
    # The CR must leave room for its LF within the 107 bytes.
    end = data.find(b"\r", 0, V1_MAX_LENGTH - 1)
    line = data[: end if end >= 0 else V1_MAX_LENGTH - 1]
    # Reject foreign bytes as they arrive rather than wait for a CRLF that may never come.
    stray = next((byte for byte in line if byte not in _V1_CHARACTERS), None)
    if stray is not None:
        raise ProxyHeaderError(HeaderProblem.MALFORMED, f"v1 header has the byte {bytes([stray])!r}")
    if end < 0:
        if len(data) >= V1_MAX_LENGTH - 1:
            raise ProxyHeaderError(HeaderProblem.OVERSIZED, f"v1 header has no CRLF in {V1_MAX_LENGTH} bytes")
        return None
    if len(data) == end + 1:
        return None
    if data[end + 1] != ord("\n"):
        raise ProxyHeaderError(HeaderProblem.MALFORMED, "v1 header has a CR without LF")
    return ProxyHeader(end + 2, 1, _v1_source(line.decode("ascii").split(" ")))


def _v1_source(fields: list[str]) -> tuple[str, int] | None:
    if len(fields) >= 2 and fields[1] == "UNKNOWN":
        # 2.1: the receiver must ignore anything after UNKNOWN and use the connection's addresses.
        return None
    if len(fields) != 6:
        raise ProxyHeaderError(
            HeaderProblem.MALFORMED,
            "v1 header must be 'PROXY TCP4|TCP6 <source> <destination> <source port> <destination port>'",
        )
    _, family, source, destination, source_port, destination_port = fields
    if family not in ("TCP4", "TCP6"):
        raise ProxyHeaderError(HeaderProblem.UNSUPPORTED, f"v1 header has the unknown protocol {family!r}")
    version = 4 if family == "TCP4" else 6
    address = _v1_address(source, version)
    _v1_address(destination, version)
    port = _v1_port(source_port)
    _v1_port(destination_port)
    return address, port


def _v1_address(text: str, version: int) -> str:
    try:
        address = ipaddress.IPv4Address(text) if version == 4 else ipaddress.IPv6Address(text)
    except ValueError:
        raise ProxyHeaderError(HeaderProblem.MALFORMED, f"v1 header has a bad IPv{version} address") from None
    return _canonical(address)


def _v1_port(text: str) -> int:
    # 2.1: decimal 0-65535 without leading zeroes (no octal confusion).
    if not text.isdigit() or (len(text) > 1 and text[0] == "0") or int(text) > 0xFFFF:
        raise ProxyHeaderError(HeaderProblem.MALFORMED, f"v1 header has a bad port {text[:8]!r}")
    return int(text)


def _parse_v2(data: bytes) -> ProxyHeader | None:
    signature = data[: len(V2_SIGNATURE)]
    if not V2_SIGNATURE.startswith(signature):
        raise ProxyHeaderError(HeaderProblem.MISSING, f"expected a PROXY protocol header, got {signature!r}")
    if len(data) < V2_FIXED_LENGTH:
        return None
    version, command = data[12] >> 4, data[12] & 0x0F
    family, transport = data[13] >> 4, data[13] & 0x0F
    length = int.from_bytes(data[14:16], "big")
    if version != _V2_VERSION:
        raise ProxyHeaderError(HeaderProblem.UNSUPPORTED, f"v2 header has version {version}, expected 2")
    if command not in (_V2_LOCAL, _V2_PROXY):
        raise ProxyHeaderError(HeaderProblem.UNSUPPORTED, f"v2 header has the unknown command {command}")
    if family not in _V2_ADDRESS_BLOCK or transport > _DGRAM:
        raise ProxyHeaderError(
            HeaderProblem.UNSUPPORTED, f"v2 header has the unknown family/protocol byte 0x{data[13]:02x}"
        )
    if command == _V2_PROXY and length < _V2_ADDRESS_BLOCK[family]:
        raise ProxyHeaderError(
            HeaderProblem.MALFORMED,
            f"v2 header length {length} is too short for its {_V2_ADDRESS_BLOCK[family]}-byte address block",
        )
    total = V2_FIXED_LENGTH + length
    if len(data) < total:
        return None
    # 2.2: LOCAL (a balancer's own health check) uses the real endpoints; UNIX and datagram addresses
    # fall back to UNSPEC, which does too. Bytes after the address block are TLVs: skipped, not needed.
    if command == _V2_LOCAL or transport != _STREAM or family not in (_AF_INET, _AF_INET6):
        return ProxyHeader(total, 2, None)
    block = data[V2_FIXED_LENGTH:total]
    size = 4 if family == _AF_INET else 16
    address = ipaddress.ip_address(block[:size])
    port = int.from_bytes(block[2 * size : 2 * size + 2], "big")
    return ProxyHeader(total, 2, (_canonical(address), port))


def _canonical(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str:
    """One spelling per client, so the per-source limiter counts an IPv4 client once, however sent."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return str(address.ipv4_mapped)
    return str(address)
