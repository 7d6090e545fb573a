"""proxy.protocols.proxyheader: PROXY protocol v1/v2 headers (HAProxy's proxy-protocol.txt)."""

from __future__ import annotations

import ipaddress
import re

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from proxy.protocols.proxyheader import (
    FIRST_BYTES,
    MAX_HEADER_LENGTH,
    V1_MAX_LENGTH,
    HeaderProblem,
    ProxyHeader,
    ProxyHeaderError,
    parse_proxy_header,
)
from tests import proxyheaders as build

# What follows the header on the stream: an SSLRequest, which must be left alone.
SSL_REQUEST = b"\x00\x00\x00\x08\x04\xd2\x16\x2f"
V2 = build.V2_SIGNATURE


def test_v1_tcp4_header_gives_the_client_address_and_its_exact_length() -> None:
    header = b"PROXY TCP4 203.0.113.7 10.0.0.5 51234 6432\r\n"
    assert parse_proxy_header(header + SSL_REQUEST) == ProxyHeader(len(header), 1, ("203.0.113.7", 51234))


def test_v1_tcp6_header_gives_the_client_address_in_canonical_form() -> None:
    header = b"PROXY TCP6 2001:DB8:0:0:0:0:0:7 2001:db8::1 65535 6432\r\n"
    assert parse_proxy_header(header) == ProxyHeader(len(header), 1, ("2001:db8::7", 65535))


def test_v1_ipv4_mapped_ipv6_client_is_reported_as_ipv4() -> None:
    header = b"PROXY TCP6 ::ffff:203.0.113.7 ::1 1 2\r\n"
    assert parse_proxy_header(header) == ProxyHeader(len(header), 1, ("203.0.113.7", 1))


@pytest.mark.parametrize("header", [b"PROXY UNKNOWN\r\n", b"PROXY UNKNOWN ffff::1 ffff::2 65535 65535\r\n"])
def test_v1_unknown_means_use_the_connection_address(header: bytes) -> None:
    assert parse_proxy_header(header) == ProxyHeader(len(header), 1, None)


def test_v1_longest_valid_line_is_accepted() -> None:
    six = ":".join(["ffff"] * 8)
    header = f"PROXY UNKNOWN {six} {six} 65535 65535\r\n".encode()
    assert len(header) == V1_MAX_LENGTH
    assert parse_proxy_header(header) == ProxyHeader(V1_MAX_LENGTH, 1, None)


@pytest.mark.parametrize(
    ("data", "problem", "message"),
    [
        (b"PROXY TCP4 203.0.113.7 10.0.0.5 51234\r\n", HeaderProblem.MALFORMED, "must be 'PROXY TCP4|TCP6"),
        (b"PROXY TCP4 203.0.113.07 10.0.0.5 1 2\r\n", HeaderProblem.MALFORMED, "bad IPv4 address"),
        (b"PROXY TCP4 2001:db8::7 10.0.0.5 1 2\r\n", HeaderProblem.MALFORMED, "bad IPv4 address"),
        (b"PROXY TCP6 203.0.113.7 ::1 1 2\r\n", HeaderProblem.MALFORMED, "bad IPv6 address"),
        (b"PROXY TCP4 203.0.113.7 10.0.0.5 01 2\r\n", HeaderProblem.MALFORMED, "bad port '01'"),
        (b"PROXY TCP4 203.0.113.7 10.0.0.5 1 65536\r\n", HeaderProblem.MALFORMED, "bad port '65536'"),
        (b"PROXY TCP4  203.0.113.7 10.0.0.5 1 2\r\n", HeaderProblem.MALFORMED, "must be 'PROXY"),
        (b"PROXY UDP4 203.0.113.7 10.0.0.5 1 2\r\n", HeaderProblem.UNSUPPORTED, "unknown protocol 'UDP4'"),
        (b"PROXY TCP4 203.0.113.7\n", HeaderProblem.MALFORMED, "the byte b'\\n'"),
        (b"PROXY TCP4 1.2.3.4\rX", HeaderProblem.MALFORMED, "CR without LF"),
        (b"PROXY TCP4 1.2.3.4 \x00", HeaderProblem.MALFORMED, "the byte b'\\x00'"),
        (b"PROXY " + b"1" * 200, HeaderProblem.OVERSIZED, "no CRLF in 107 bytes"),
        (b"PROXZ", HeaderProblem.MISSING, "expected a PROXY protocol header"),
        (SSL_REQUEST, HeaderProblem.MISSING, "expected a PROXY protocol header"),
        (b"\x16\x03\x01\x02\x00", HeaderProblem.MISSING, "expected a PROXY protocol header"),
        # v2: refused on its fixed 16 bytes, before the body arrives.
        (V2 + b"\x11\x11\x00\x0c", HeaderProblem.UNSUPPORTED, "version 1, expected 2"),
        (V2 + b"\x22\x11\x00\x0c", HeaderProblem.UNSUPPORTED, "unknown command 2"),
        (V2 + b"\x21\x41\x00\x0c", HeaderProblem.UNSUPPORTED, "family/protocol byte 0x41"),
        (V2 + b"\x21\x13\x00\x0c", HeaderProblem.UNSUPPORTED, "family/protocol byte 0x13"),
        (
            V2 + b"\x21\x11\x00\x0b",
            HeaderProblem.MALFORMED,
            "length 11 is too short for its 12-byte address block",
        ),
        (V2 + b"\x21\x21\x00\x0c", HeaderProblem.MALFORMED, "too short for its 36-byte address block"),
    ],
)
def test_bad_headers_and_foreign_bytes_are_refused_with_a_reason(
    data: bytes, problem: HeaderProblem, message: str
) -> None:
    with pytest.raises(ProxyHeaderError, match=re.escape(message)) as raised:
        parse_proxy_header(data)
    assert raised.value.problem is problem


def test_v1_line_one_byte_over_the_limit_is_oversized() -> None:
    six = ":".join(["ffff"] * 8)
    line = f"PROXY UNKNOWN {six} {six} 65535 655355\r\n".encode()
    with pytest.raises(ProxyHeaderError) as raised:
        parse_proxy_header(line)
    assert raised.value.problem is HeaderProblem.OVERSIZED


def test_v2_tcp4_header_with_tlvs_gives_the_client_address_and_leaves_what_follows() -> None:
    header = build.v2("203.0.113.7", 40000, tlvs=build.tlv(0xEA, b"vpce-0123") + build.tlv(0x04, b""))
    assert parse_proxy_header(header + SSL_REQUEST) == ProxyHeader(len(header), 2, ("203.0.113.7", 40000))


def test_v2_tcp6_header_gives_the_client_address() -> None:
    header = build.v2("2001:db8::7", 443, "2001:db8::1")
    assert parse_proxy_header(header) == ProxyHeader(len(header), 2, ("2001:db8::7", 443))


def test_v2_local_command_means_use_the_connection_address() -> None:
    header = build.V2_SIGNATURE + b"\x20\x00\x00\x00"
    assert parse_proxy_header(header + SSL_REQUEST) == ProxyHeader(16, 2, None)
    with_addresses = build.v2("203.0.113.7", 1, local=True)
    assert parse_proxy_header(with_addresses) == ProxyHeader(len(with_addresses), 2, None)


@pytest.mark.parametrize(
    ("family_protocol", "block"),
    [(0x00, b""), (0x12, bytes(12)), (0x31, bytes(216)), (0x10, bytes(12))],
    ids=["unspec", "udp4", "unix-stream", "inet-unspec-transport"],
)
def test_v2_addresses_the_proxy_cannot_use_fall_back_to_the_connection(
    family_protocol: int, block: bytes
) -> None:
    header = build.V2_SIGNATURE + bytes([0x21, family_protocol]) + len(block).to_bytes(2, "big") + block
    assert parse_proxy_header(header) == ProxyHeader(len(header), 2, None)


def test_v2_signature_mismatch_is_not_a_header() -> None:
    with pytest.raises(ProxyHeaderError) as raised:
        parse_proxy_header(b"\r\n\r\n\x00\r\nQUIZ\n")
    assert raised.value.problem is HeaderProblem.MISSING


def test_every_proper_prefix_of_a_header_needs_more() -> None:
    for header in (build.v1("203.0.113.7", 1), build.v2("203.0.113.7", 1, tlvs=build.tlv(1, b"h2"))):
        assert all(parse_proxy_header(header[:size]) is None for size in range(len(header)))


def test_first_bytes_are_those_a_header_can_start_with() -> None:
    assert {build.v1("203.0.113.7", 1)[0], build.V2_SIGNATURE[0]} == FIRST_BYTES


_ipv4 = st.ip_addresses(v=4).map(str)
_ipv6 = st.ip_addresses(v=6).filter(lambda address: address.ipv4_mapped is None).map(str)
_port = st.integers(min_value=0, max_value=65535)
_tlvs = st.lists(st.tuples(st.integers(min_value=0, max_value=255), st.binary(max_size=40)), max_size=4).map(
    lambda items: b"".join(build.tlv(kind, value) for kind, value in items)
)


@given(st.one_of(_ipv4, _ipv6), _port, st.one_of(_ipv4, _ipv6), _port, st.binary(max_size=32))
def test_v1_round_trip(
    source: str, source_port: int, destination: str, destination_port: int, rest: bytes
) -> None:
    if ipaddress.ip_address(source).version != ipaddress.ip_address(destination).version:
        destination = "127.0.0.1" if ipaddress.ip_address(source).version == 4 else "::1"
    header = build.v1(source, source_port, destination, destination_port)
    assert parse_proxy_header(header + rest) == ProxyHeader(len(header), 1, (source, source_port))


@given(st.one_of(_ipv4, _ipv6), _port, _port, _tlvs, st.binary(max_size=32))
def test_v2_round_trip(
    source: str, source_port: int, destination_port: int, tlvs: bytes, rest: bytes
) -> None:
    header = build.v2(source, source_port, destination_port=destination_port, tlvs=tlvs)
    assert parse_proxy_header(header + rest) == ProxyHeader(len(header), 2, (source, source_port))


@settings(suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(st.sampled_from([b"", b"PROXY ", build.V2_SIGNATURE, build.V2_SIGNATURE + b"\x21\x11"]), st.binary())
def test_random_bytes_never_crash_and_a_parsed_header_fits_in_them(prefix: bytes, tail: bytes) -> None:
    data = prefix + tail
    try:
        header = parse_proxy_header(data)
    except ProxyHeaderError as exc:
        assert isinstance(exc.problem, HeaderProblem) and str(exc)
        return
    if header is not None:
        assert 0 < header.length <= min(len(data), MAX_HEADER_LENGTH)
    else:
        # "Need more" only while the bytes can still become a header of bounded size.
        assert len(data) < MAX_HEADER_LENGTH


@given(st.binary(min_size=1, max_size=128))
def test_a_stream_fed_byte_by_byte_ends_in_a_header_or_an_error(data: bytes) -> None:
    """What the server's read loop relies on: a decision within the header's bytes, never a wait forever."""
    data = b"PROXY " + data + b"\r\n" * V1_MAX_LENGTH
    for size in range(1, len(data) + 1):
        try:
            header = parse_proxy_header(data[:size])
        except ProxyHeaderError:
            return
        if header is not None:
            assert header.length == size
            return
    raise AssertionError("no decision")
