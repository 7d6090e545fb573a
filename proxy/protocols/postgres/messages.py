"""Sans-IO PostgreSQL v3 message framing, parsing and building (no sockets, no awaits).

References are to the PostgreSQL 15 documentation, chapter 55 "Frontend/Backend Protocol",
section 55.7 "Message Formats" unless stated otherwise.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Final

from librt.strings import read_i32_be

from proxy.errors import ProtocolViolation, caused_by

PROTOCOL_3_0: Final = 196608
SSL_REQUEST_CODE: Final = 80877103
GSSENC_REQUEST_CODE: Final = 80877104
CANCEL_REQUEST_CODE: Final = 80877102
# PostgreSQL's own MAX_STARTUP_PACKET_LENGTH (src/include/libpq/pqcomm.h).
MAX_STARTUP_PACKET: Final = 10000
# A TLS record starts with content type 22 (handshake): PostgreSQL 17's sslnegotiation=direct.
TLS_HANDSHAKE_RECORD: Final = 0x16

_INT16: Final = struct.Struct("!h")
_INT32: Final = struct.Struct("!i")
_UINT32: Final = struct.Struct("!I")
_HEADER: Final = struct.Struct("!cI")
_TWO_INT32: Final = struct.Struct("!ii")

# Frontend message types (55.7): anything else from a client is a protocol violation.
FRONTEND_TYPES: Final = frozenset(b"BCdcfDEHFPpQSX")

# Type bytes used by the session code, named for readability.
MSG_AUTHENTICATION: Final = ord("R")
MSG_BACKEND_KEY_DATA: Final = ord("K")
MSG_PARAMETER_STATUS: Final = ord("S")
MSG_READY_FOR_QUERY: Final = ord("Z")
MSG_ERROR_RESPONSE: Final = ord("E")
MSG_NOTICE_RESPONSE: Final = ord("N")
MSG_TERMINATE: Final = ord("X")
MSG_QUERY: Final = ord("Q")
MSG_PARSE: Final = ord("P")
MSG_FUNCTION_CALL: Final = ord("F")
MSG_BIND: Final = ord("B")
MSG_EXECUTE: Final = ord("E")

AUTH_OK: Final = 0
AUTH_CLEARTEXT: Final = 3
AUTH_MD5: Final = 5
AUTH_SASL: Final = 10
AUTH_SASL_CONTINUE: Final = 11
AUTH_SASL_FINAL: Final = 12


# One whole message inside a buffer: (type byte, start offset, end offset). A plain tuple
# because the data path makes one per message and tuples are the cheapest thing to build.
Frame = tuple[int, int, int]


def frame_payload(buffer: bytes | bytearray, frame: Frame) -> bytes:
    return bytes(buffer[frame[1] + 5 : frame[2]])


def scan_frames(buffer: bytes, max_size: int) -> tuple[list[Frame], int]:
    """Find the whole messages at the start of ``buffer``; return them and the bytes they span.

    Only headers are read. A length field below 4 or above ``max_size`` is refused
    before anything of that size is buffered, so a lying client cannot make us allocate it.
    ``buffer`` is bytes, never a bytearray (take_whole_messages turns a connection's kept partial
    message into bytes): the compiled build indexes bytes directly, a union of the two only through
    generic operations.
    """
    frames: list[Frame] = []
    position = 0
    available = len(buffer)
    while available - position >= 5:
        # Int32, as PostgreSQL reads it: one C call, inlined by the compiled build.
        length = read_i32_be(buffer, position + 1)
        if length < 4 or length > max_size:
            raise invalid_length(buffer, position, length)
        end = position + 1 + length
        if end > available:
            break
        frames.append((buffer[position], position, end))
        position = end
    return frames, position


def take_whole_messages(partial: bytearray, data: bytes, max_size: int) -> bytes:
    """Add ``data`` to the start of a message kept from earlier reads; return everything as bytes
    once the first message is whole (``partial`` is then emptied), else b"" and keep it all.

    A large message is thus copied once, when its last part arrives, not on every read. Its length
    is checked as scan_frames checks it, as soon as its header is in.
    """
    partial += data
    if len(partial) < 5:
        return b""
    length: int
    (length,) = _INT32.unpack_from(partial, 1)  # a bytearray: read_i32_be takes bytes only
    if length < 4 or length > max_size:
        raise invalid_length(partial, 0, length)
    if len(partial) < 1 + length:
        return b""
    whole = bytes(partial)
    partial.clear()
    return whole


def invalid_length(buffer: bytes | bytearray, position: int, length: int) -> ProtocolViolation:
    return ProtocolViolation(f"invalid message length {length} for message type {chr(buffer[position])!r}")


# --- Startup phase (55.2.1, 55.7 "StartupMessage", "SSLRequest", "CancelRequest") ---


@dataclass(frozen=True, slots=True)
class SSLRequest:
    pass


@dataclass(frozen=True, slots=True)
class GSSENCRequest:
    pass


@dataclass(frozen=True, slots=True)
class CancelRequest:
    process_id: int
    secret_key: int


@dataclass(frozen=True, slots=True)
class StartupMessage:
    protocol: int
    parameters: Mapping[str, str]

    @property
    def user(self) -> str:
        return self.parameters.get("user", "")

    @property
    def database(self) -> str:
        # Per the protocol the database defaults to the user name.
        return self.parameters.get("database") or self.user


StartupPacket = SSLRequest | GSSENCRequest | CancelRequest | StartupMessage


def startup_packet_length(buffer: bytes | bytearray) -> int | None:
    """Total length of the startup packet at the start of ``buffer``, or None if more bytes are needed."""
    if len(buffer) < 4:
        return None
    (length,) = _UINT32.unpack_from(buffer, 0)
    if length < 8 or length > MAX_STARTUP_PACKET:
        raise ProtocolViolation(f"invalid startup packet length {length}")
    return int(length)


def parse_startup_packet(packet: bytes | bytearray) -> StartupPacket:
    """Parse one whole startup-phase packet (length word included)."""
    length = startup_packet_length(packet)
    if length is None or len(packet) != length:
        raise ProtocolViolation("incomplete startup packet")
    (code,) = _INT32.unpack_from(packet, 4)
    if code == SSL_REQUEST_CODE and length == 8:
        return SSLRequest()
    if code == GSSENC_REQUEST_CODE and length == 8:
        return GSSENCRequest()
    if code == CANCEL_REQUEST_CODE and length == 16:
        process_id, secret_key = _TWO_INT32.unpack_from(packet, 8)
        return CancelRequest(process_id, secret_key)
    if code >> 16 != 3:
        raise ProtocolViolation(f"unsupported frontend protocol {code >> 16}.{code & 0xFFFF}")
    return StartupMessage(code, _parse_startup_parameters(bytes(packet[8:])))


def _parse_startup_parameters(body: bytes) -> dict[str, str]:
    if not body.endswith(b"\x00"):
        raise ProtocolViolation("startup packet is not terminated")
    # Each name and value ends in NUL and the list ends in one more NUL.
    fields = body[:-1].split(b"\x00")
    if fields[-1] != b"":
        raise ProtocolViolation("startup packet is not terminated")
    fields.pop()
    if len(fields) % 2:
        raise ProtocolViolation("startup packet has a parameter name without a value")
    parameters: dict[str, str] = {}
    try:
        for index in range(0, len(fields), 2):
            name = fields[index].decode()
            if not name:
                raise ProtocolViolation("startup packet has an empty parameter name")
            parameters[name] = fields[index + 1].decode()
    except UnicodeDecodeError as exc:
        raise caused_by(ProtocolViolation("startup packet is not valid UTF-8"), exc) from exc
    return parameters


# --- Builders ---


def build_message(kind: bytes, body: bytes) -> bytes:
    return _HEADER.pack(kind, len(body) + 4) + body


def _cstring(text: str) -> bytes:
    encoded = text.encode()
    if b"\x00" in encoded:
        raise ValueError("a protocol string cannot contain NUL")
    return encoded + b"\x00"


def build_startup_message(parameters: Mapping[str, str]) -> bytes:
    body = _INT32.pack(PROTOCOL_3_0) + b"".join(
        _cstring(name) + _cstring(value) for name, value in parameters.items()
    )
    body += b"\x00"
    return _INT32.pack(len(body) + 4) + body


def build_ssl_request() -> bytes:
    return _TWO_INT32.pack(8, SSL_REQUEST_CODE)


def build_cancel_request(process_id: int, secret_key: int) -> bytes:
    return _TWO_INT32.pack(16, CANCEL_REQUEST_CODE) + _TWO_INT32.pack(process_id, secret_key)


def build_error_response(
    severity: str,
    sqlstate: str,
    message: str,
    *,
    detail: str | None = None,
    hint: str | None = None,
    kind: bytes = b"E",
) -> bytes:
    """ErrorResponse (or NoticeResponse with ``kind=b"N"``); fields per 55.8."""
    fields = [b"S" + _cstring(severity), b"V" + _cstring(severity), b"C" + _cstring(sqlstate)]
    fields.append(b"M" + _cstring(message))
    if detail:
        fields.append(b"D" + _cstring(detail))
    if hint:
        fields.append(b"H" + _cstring(hint))
    return build_message(kind, b"".join(fields) + b"\x00")


def build_authentication_ok() -> bytes:
    return build_message(b"R", _INT32.pack(AUTH_OK))


def build_parameter_status(name: str, value: str) -> bytes:
    return build_message(b"S", _cstring(name) + _cstring(value))


def build_backend_key_data(process_id: int, secret_key: int) -> bytes:
    return build_message(b"K", _TWO_INT32.pack(process_id, secret_key))


def build_ready_for_query(status: bytes) -> bytes:
    return build_message(b"Z", status)


def build_query(sql: str) -> bytes:
    return build_message(b"Q", _cstring(sql))


def build_terminate() -> bytes:
    return build_message(b"X", b"")


def build_password_message(payload: bytes) -> bytes:
    return build_message(b"p", payload)


def build_sasl_initial_response(mechanism: str, data: bytes) -> bytes:
    return build_message(b"p", _cstring(mechanism) + _INT32.pack(len(data)) + data)


# --- Parsers for backend messages the proxy must understand ---


def parse_authentication(payload: bytes) -> tuple[int, bytes]:
    if len(payload) < 4:
        raise ProtocolViolation("short authentication message")
    (code,) = _INT32.unpack_from(payload, 0)
    return code, payload[4:]


def parse_sasl_mechanisms(data: bytes) -> list[str]:
    try:
        return [name.decode() for name in data.split(b"\x00") if name]
    except UnicodeDecodeError as exc:
        raise caused_by(ProtocolViolation("malformed SASL mechanism list"), exc) from exc


def parse_parameter_status(payload: bytes) -> tuple[str, str]:
    parts = payload.split(b"\x00")
    if len(parts) < 3:
        raise ProtocolViolation("malformed ParameterStatus")
    return parts[0].decode(errors="replace"), parts[1].decode(errors="replace")


def parse_backend_key_data(payload: bytes) -> tuple[int, int]:
    if len(payload) != 8:
        raise ProtocolViolation("malformed BackendKeyData")
    process_id, secret_key = _TWO_INT32.unpack(payload)
    return process_id, secret_key


def parse_text_row(payload: bytes, decode: Callable[[bytes], str]) -> list[str | None]:
    """The columns of a DataRow in text format (55.7 "DataRow"), read with ``decode``, None for NULL."""
    if len(payload) < 2:
        raise ProtocolViolation("malformed DataRow")
    (count,) = _INT16.unpack_from(payload, 0)
    position = 2
    columns: list[str | None] = []
    for _ in range(count):
        if position + 4 > len(payload):
            raise ProtocolViolation("malformed DataRow")
        (length,) = _INT32.unpack_from(payload, position)
        position += 4
        if length < 0:
            columns.append(None)
            continue
        if position + length > len(payload):
            raise ProtocolViolation("malformed DataRow")
        columns.append(decode(payload[position : position + length]))
        position += length
    return columns


def parse_error_fields(payload: bytes) -> dict[str, str]:
    """Fields of an ErrorResponse or NoticeResponse, keyed by their one-letter code (55.8)."""
    fields: dict[str, str] = {}
    for item in payload.split(b"\x00"):
        if item:
            fields[chr(item[0])] = item[1:].decode(errors="replace")
    return fields
