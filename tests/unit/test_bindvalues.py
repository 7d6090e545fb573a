"""proxy.protocols.postgres.bindvalues: the values a Bind binds, read as the server reads them."""

from __future__ import annotations

import struct

import pytest

from proxy.protocols.postgres.bindvalues import bound_texts, declared_types

TEXT, VARCHAR, NAME, BPCHAR, INT4 = 25, 1043, 19, 1042, 23


def parse_body(text: bytes, *types: int) -> bytes:
    """A Parse message's body after the statement name."""
    return text + b"\x00" + struct.pack(f"!h{len(types)}I", len(types), *types)


def bind_body(values: list[bytes | None], formats: tuple[int, ...] = ()) -> bytes:
    """A Bind message's body after the statement name, no result formats."""
    body = struct.pack(f"!h{len(formats)}h", len(formats), *formats) + struct.pack("!h", len(values))
    for value in values:
        body += struct.pack("!i", -1) if value is None else struct.pack("!i", len(value)) + value
    return body + struct.pack("!h", 0)


def test_declared_types() -> None:
    assert declared_types(parse_body(b"SELECT $1", TEXT, 0)) == (TEXT, 0)
    assert declared_types(parse_body(b"SELECT 1")) == ()
    assert declared_types(b"SELECT $1\x00\x00\x02\x00\x00") is None  # cut short
    assert declared_types(b"no terminator") is None


@pytest.mark.parametrize("formats", [(), (0,), (1,), (0, 1)])
def test_text_of_either_format_is_read(formats: tuple[int, ...]) -> None:
    body = bind_body([b"client_encoding", b"SJIS"], formats)
    assert bound_texts(body, (), "UTF8") == {1: "client_encoding", 2: "SJIS"}
    assert bound_texts(body, (TEXT, VARCHAR), "UTF8") == {1: "client_encoding", 2: "SJIS"}


def test_what_the_server_might_read_otherwise_is_left_out() -> None:
    values: list[bytes | None] = [b"a", None, b"c", b"d", b"e\x00f", b"\xff", b"\x00\x00\x00\x07"]
    types = (NAME, TEXT, BPCHAR, TEXT, TEXT, TEXT, INT4)
    assert bound_texts(bind_body(values, (0, 0, 0, 0, 0, 0, 1)), types, "UTF8") == {4: "d"}


def test_read_in_the_client_encoding() -> None:
    assert bound_texts(bind_body(["é".encode("latin-1")]), (), "LATIN1") == {1: "é"}
    assert bound_texts(bind_body(["é".encode("latin-1")]), (), "UTF8") == {}


def test_malformed_binds_give_nothing() -> None:
    whole = bind_body([b"client_encoding", b"SJIS"])
    assert bound_texts(whole[:-6], (), "UTF8") == {}  # the last value cut short
    assert bound_texts(bind_body([b"a", b"b", b"c"], (0, 0)), (), "UTF8") == {}  # formats missing
