"""The values a Bind message binds, read as the server reads them.

Only the few decisions that depend on a bound value need these: set_config with a bound setting
name, client_encoding or standard_conforming_strings value (sessionstate.Effect.DECIDED_AT_BIND).
Whatever cannot be read with certainty is left out, and the decision then refuses (fail closed).
"""

from __future__ import annotations

from typing import Final

from proxy.policy.encodings import read_statement

# Parameter types whose bound bytes are the text itself, in either format: unspecified (the server
# infers text for a set_config argument), text and varchar. The server reads both formats in the
# client encoding (textin, and textrecv's pq_getmsgtext). bpchar and name are left out: their
# input trims or truncates the text.
_TEXT_TYPES: Final = frozenset({0, 25, 1043})
_NULL: Final = -1


def declared_types(body: bytes) -> tuple[int, ...] | None:
    """The parameter type OIDs a Parse body (after the statement name) declares; None if malformed."""
    text_end = body.find(b"\x00")
    start = text_end + 3
    if text_end < 0 or len(body) < start:
        return None
    count = int.from_bytes(body[text_end + 1 : start], "big")
    if len(body) < start + 4 * count:
        return None
    return tuple(int.from_bytes(body[at : at + 4], "big") for at in range(start, start + 4 * count, 4))


def bound_texts(body: bytes, types: tuple[int, ...], encoding: str) -> dict[int, str]:
    """The values of a Bind body (after the statement name's NUL) that are text as the server reads
    it in the client ``encoding``, by parameter number ($1 is 1); NULLs, values of other types,
    bytes not valid in the encoding and NULs (which the server refuses) are left out."""
    try:
        formats_count = int.from_bytes(body[0:2], "big")
        formats = [int.from_bytes(body[2 + 2 * i : 4 + 2 * i], "big") for i in range(formats_count)]
        at = 2 + 2 * formats_count
        count = int.from_bytes(body[at : at + 2], "big")
        at += 2
        values: dict[int, str] = {}
        for index in range(count):  # at most 65535, each at least 4 bytes of the message
            size = int.from_bytes(body[at : at + 4], "big", signed=True)
            if len(body) < at + 4 + max(size, 0):
                return {}
            value = body[at + 4 : at + 4 + size] if size != _NULL else None
            at += 4 + max(size, 0)
            declared = types[index] if index < len(types) else 0
            if value is None or declared not in _TEXT_TYPES or b"\x00" in value:
                continue
            code = formats[0] if formats_count == 1 else formats[index] if formats_count else 0
            if code in (0, 1):
                try:
                    values[index + 1] = read_statement(value, encoding)
                except UnicodeDecodeError:
                    continue
    except IndexError:  # fewer format codes than parameters: the server refuses the Bind
        return {}
    return values
