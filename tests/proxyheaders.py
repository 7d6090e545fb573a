"""PROXY protocol headers as a load balancer writes them (HAProxy's proxy-protocol.txt, 2.1 and 2.2).

Built independently of proxy.protocols.proxyheader so the tests check the codec against the spec,
not against itself.
"""

from __future__ import annotations

import ipaddress
import struct

V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"


def v1(source: str, source_port: int, destination: str = "127.0.0.1", destination_port: int = 6432) -> bytes:
    family = "TCP4" if ipaddress.ip_address(source).version == 4 else "TCP6"
    return f"PROXY {family} {source} {destination} {source_port} {destination_port}\r\n".encode("ascii")


def v2(
    source: str,
    source_port: int,
    destination: str | None = None,
    destination_port: int = 6432,
    *,
    tlvs: bytes = b"",
    local: bool = False,
) -> bytes:
    """A v2 PROXY (or LOCAL) header for TCP over IPv4/IPv6, with ``tlvs`` appended to the address block."""
    address = ipaddress.ip_address(source)
    if destination is None:
        destination = "127.0.0.1" if address.version == 4 else "::1"
    family = 0x1 if address.version == 4 else 0x2
    block = (
        address.packed
        + ipaddress.ip_address(destination).packed
        + struct.pack("!HH", source_port, destination_port)
        + tlvs
    )
    command = 0x20 if local else 0x21
    return V2_SIGNATURE + bytes([command, family << 4 | 0x1]) + struct.pack("!H", len(block)) + block


def tlv(kind: int, value: bytes) -> bytes:
    return bytes([kind]) + struct.pack("!H", len(value)) + value
