"""proxy.protocols.postgres.messages: sans-IO framing, startup packet parsing and message builders.

Byte layouts follow the PostgreSQL documentation, chapter "Frontend/Backend Protocol",
section "Message Formats".
"""

from __future__ import annotations

import contextlib
import itertools
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from proxy.errors import ProtocolViolation
from proxy.protocols.postgres import messages as m

MAX = 1 << 20


def message(kind: bytes, body: bytes) -> bytes:
    """A backend/frontend message built by hand: type byte, int32 length (self included), body."""
    return kind + struct.pack("!I", len(body) + 4) + body


def startup_packet(body: bytes) -> bytes:
    """A startup-phase packet built by hand: int32 length (self included), then body."""
    return struct.pack("!I", len(body) + 4) + body


def startup_body(*fields: bytes, protocol: int = m.PROTOCOL_3_0) -> bytes:
    return struct.pack("!i", protocol) + b"".join(field + b"\x00" for field in fields) + b"\x00"


# --- scan_frames -------------------------------------------------------------------------------------------


def test_scan_frames_finds_every_whole_message_and_their_span() -> None:
    query = message(b"Q", b"SELECT 1\x00")
    sync = message(b"S", b"")
    buffer = query + sync

    frames, consumed = m.scan_frames(buffer, MAX)

    assert frames == [(ord("Q"), 0, len(query)), (ord("S"), len(query), len(buffer))]
    assert consumed == len(buffer)
    assert m.frame_payload(buffer, frames[0]) == b"SELECT 1\x00"
    assert m.frame_payload(buffer, frames[1]) == b""


def test_scan_frames_leaves_a_partial_tail_unconsumed() -> None:
    whole = message(b"Q", b"SELECT 1\x00")
    partial = message(b"Q", b"SELECT 2\x00")[:-3]

    frames, consumed = m.scan_frames(whole + partial, MAX)

    assert frames == [(ord("Q"), 0, len(whole))]
    assert consumed == len(whole)


@pytest.mark.parametrize("size", [0, 1, 4])
def test_scan_frames_needs_a_whole_header_before_reporting_anything(size: int) -> None:
    assert m.scan_frames(b"Q\x00\x00\x00\x10"[:size], MAX) == ([], 0)


def test_a_kept_partial_message_comes_back_as_bytes_once_it_is_whole() -> None:
    whole = message(b"D", b"x" * 100) + message(b"Z", b"I")
    partial = bytearray(whole[:3])  # not even the header yet

    assert m.take_whole_messages(partial, whole[3:50], MAX) == b""
    assert partial == whole[:50]  # all kept
    ready = m.take_whole_messages(partial, whole[50:106], MAX)

    assert type(ready) is bytes and ready == whole[:106]
    assert partial == b""
    assert m.scan_frames(ready, MAX) == ([(ord("D"), 0, 105)], 105)


def test_a_kept_partial_message_with_an_invalid_length_is_refused_as_soon_as_its_header_is_in() -> None:
    partial = bytearray(b"D")

    with pytest.raises(ProtocolViolation, match="invalid message length 2147483647"):
        m.take_whole_messages(partial, b"\x7f\xff\xff\xff", MAX)


@pytest.mark.parametrize("length", [0, 1, 2, 3])
def test_length_below_four_is_a_protocol_violation(length: int) -> None:
    with pytest.raises(ProtocolViolation) as caught:
        m.scan_frames(b"Q" + struct.pack("!I", length), MAX)
    assert caught.value.sqlstate == "08P01"


def test_length_of_exactly_four_is_an_empty_message() -> None:
    assert m.scan_frames(b"S\x00\x00\x00\x04", MAX) == ([(ord("S"), 0, 5)], 5)


def test_length_above_max_is_refused_from_the_header_alone() -> None:
    # Only five bytes are fed: a header claiming 2 GiB must be refused before waiting for the body.
    header = b"Q" + struct.pack("!I", 2**31)

    with pytest.raises(ProtocolViolation, match="invalid message length"):
        m.scan_frames(header, MAX)


def test_length_at_max_is_accepted_and_waits_for_the_body() -> None:
    assert m.scan_frames(b"Q" + struct.pack("!I", MAX), MAX) == ([], 0)
    with pytest.raises(ProtocolViolation):
        m.scan_frames(b"Q" + struct.pack("!I", MAX + 1), MAX)


def test_a_bad_length_after_good_messages_is_still_refused() -> None:
    good = message(b"Q", b"SELECT 1\x00")

    with pytest.raises(ProtocolViolation):
        m.scan_frames(good + b"Q" + struct.pack("!I", 0xFFFFFFFF), MAX)


STREAM = (
    message(b"R", struct.pack("!i", 0))
    + message(b"S", b"client_encoding\x00UTF8\x00")
    + message(b"K", struct.pack("!ii", 1234, 5678))
    + message(b"S", b"")
    + message(b"T", b"\x00\x01a\x00" + b"\x00" * 18)
    + message(b"D", b"\x00\x01\x00\x00\x00\x011")
    + message(b"C", b"SELECT 1\x00")
    + message(b"Z", b"I")
)


def _feed_incrementally(chunks: list[bytes]) -> list[tuple[int, bytes]]:
    """Feed chunks the way the protocol code does: keep the unconsumed tail, append, rescan."""
    kept = bytearray()
    seen: list[tuple[int, bytes]] = []
    for chunk in chunks:
        buffer = m.take_whole_messages(kept, chunk, MAX) if kept else chunk
        frames, consumed = m.scan_frames(buffer, MAX)
        seen.extend((frame[0], m.frame_payload(buffer, frame)) for frame in frames)
        kept += buffer[consumed:]
    assert not kept
    return seen


def test_splitting_a_stream_at_every_point_yields_the_same_frames() -> None:
    expected = _feed_incrementally([STREAM])
    assert [chr(kind) for kind, _ in expected] == list("RSKSTDCZ")
    for cut in range(len(STREAM) + 1):
        assert _feed_incrementally([STREAM[:cut], STREAM[cut:]]) == expected, cut


@given(st.lists(st.integers(min_value=0, max_value=len(STREAM)), max_size=12))
def test_splitting_a_stream_at_many_points_yields_the_same_frames(cuts: list[int]) -> None:
    points = [0, *sorted(cuts), len(STREAM)]
    chunks = [STREAM[a:b] for a, b in itertools.pairwise(points)]

    assert _feed_incrementally(chunks) == _feed_incrementally([STREAM])


@settings(suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(st.binary(max_size=256), st.integers(min_value=4, max_value=512))
def test_random_bytes_fed_to_scan_frames_either_frame_or_violate(data: bytes, max_size: int) -> None:
    try:
        frames, consumed = m.scan_frames(data, max_size)
    except ProtocolViolation:
        return
    assert 0 <= consumed <= len(data)
    position = 0
    for kind, start, end in frames:
        assert start == position
        assert kind == data[start]
        assert 5 <= end - start <= max_size + 1
        position = end
    assert position == consumed


# --- startup packets ---------------------------------------------------------------------------------------


def test_ssl_request_is_recognised() -> None:
    assert m.parse_startup_packet(m.build_ssl_request()) == m.SSLRequest()
    assert m.build_ssl_request() == bytes.fromhex("0000000804d2162f")


def test_gssenc_request_is_recognised() -> None:
    packet = struct.pack("!ii", 8, 80877104)

    assert m.parse_startup_packet(packet) == m.GSSENCRequest()


def test_cancel_request_carries_process_id_and_secret_key() -> None:
    packet = struct.pack("!iiii", 16, 80877102, 4242, -7)

    assert m.parse_startup_packet(packet) == m.CancelRequest(4242, -7)
    assert m.build_cancel_request(4242, -7) == packet


def test_startup_message_carries_its_parameters() -> None:
    packet = startup_packet(
        startup_body(b"user", b"cashier", b"database", b"pos", b"application_name", b"till")
    )

    parsed = m.parse_startup_packet(packet)

    assert isinstance(parsed, m.StartupMessage)
    assert parsed.protocol == m.PROTOCOL_3_0
    assert dict(parsed.parameters) == {"user": "cashier", "database": "pos", "application_name": "till"}
    assert parsed.user == "cashier"
    assert parsed.database == "pos"


def test_startup_database_defaults_to_the_user_name() -> None:
    parsed = m.parse_startup_packet(startup_packet(startup_body(b"user", b"cashier")))

    assert isinstance(parsed, m.StartupMessage)
    assert parsed.database == "cashier"


def test_startup_empty_database_also_defaults_to_the_user_name() -> None:
    parsed = m.parse_startup_packet(startup_packet(startup_body(b"user", b"cashier", b"database", b"")))

    assert isinstance(parsed, m.StartupMessage)
    assert parsed.database == "cashier"


def test_startup_without_user_has_empty_user_and_database() -> None:
    parsed = m.parse_startup_packet(startup_packet(startup_body()))

    assert isinstance(parsed, m.StartupMessage)
    assert dict(parsed.parameters) == {}
    assert parsed.user == ""
    assert parsed.database == ""


def test_startup_parameter_values_may_be_empty() -> None:
    parsed = m.parse_startup_packet(startup_packet(startup_body(b"user", b"u", b"options", b"")))

    assert isinstance(parsed, m.StartupMessage)
    assert dict(parsed.parameters) == {"user": "u", "options": ""}


def test_startup_minor_protocol_versions_of_3_are_accepted() -> None:
    parsed = m.parse_startup_packet(startup_packet(startup_body(b"user", b"u", protocol=(3 << 16) | 2)))

    assert isinstance(parsed, m.StartupMessage)
    assert parsed.protocol == (3 << 16) | 2


@pytest.mark.parametrize("protocol", [2 << 16, 4 << 16, 0, 1234 << 16 | 1])
def test_unsupported_protocol_version_is_a_protocol_violation(protocol: int) -> None:
    with pytest.raises(ProtocolViolation, match="unsupported frontend protocol"):
        m.parse_startup_packet(startup_packet(startup_body(b"user", b"u", protocol=protocol)))


@pytest.mark.parametrize(
    "length",
    [12, 20],
    ids=["cancel-code-too-short", "cancel-code-too-long"],
)
def test_cancel_request_code_with_the_wrong_length_is_a_protocol_violation(length: int) -> None:
    packet = struct.pack("!ii", length, 80877102) + b"\x00" * (length - 8)

    with pytest.raises(ProtocolViolation):
        m.parse_startup_packet(packet)


def test_ssl_request_code_with_a_body_is_a_protocol_violation() -> None:
    with pytest.raises(ProtocolViolation):
        m.parse_startup_packet(struct.pack("!iii", 12, 80877103, 0))


@pytest.mark.parametrize(
    "body",
    [
        struct.pack("!i", m.PROTOCOL_3_0),
        struct.pack("!i", m.PROTOCOL_3_0) + b"user\x00u",
        struct.pack("!i", m.PROTOCOL_3_0) + b"user\x00u\x00",
    ],
    ids=["no-terminator", "value-not-terminated", "list-not-terminated"],
)
def test_unterminated_startup_packet_is_a_protocol_violation(body: bytes) -> None:
    with pytest.raises(ProtocolViolation, match="not terminated"):
        m.parse_startup_packet(startup_packet(body))


def test_startup_name_without_value_is_a_protocol_violation() -> None:
    with pytest.raises(ProtocolViolation, match="without a value"):
        m.parse_startup_packet(startup_packet(startup_body(b"user", b"u", b"database")))


def test_startup_empty_parameter_name_is_a_protocol_violation() -> None:
    body = struct.pack("!i", m.PROTOCOL_3_0) + b"user\x00u\x00\x00x\x00\x00"

    with pytest.raises(ProtocolViolation):
        m.parse_startup_packet(startup_packet(body))


@pytest.mark.parametrize("fields", [(b"user", b"\xff\xfe"), (b"us\xc3er", b"u")], ids=["value", "name"])
def test_startup_bad_utf8_is_a_protocol_violation(fields: tuple[bytes, bytes]) -> None:
    with pytest.raises(ProtocolViolation, match="UTF-8"):
        m.parse_startup_packet(startup_packet(startup_body(*fields)))


def test_startup_packet_length_needs_four_bytes() -> None:
    assert m.startup_packet_length(b"") is None
    assert m.startup_packet_length(b"\x00\x00\x00") is None
    assert m.startup_packet_length(b"\x00\x00\x00\x08") == 8


@pytest.mark.parametrize("length", [0, 4, 7, m.MAX_STARTUP_PACKET + 1, 2**31, 2**32 - 1])
def test_startup_packet_length_out_of_range_is_refused_from_the_length_word(length: int) -> None:
    with pytest.raises(ProtocolViolation, match="invalid startup packet length"):
        m.startup_packet_length(struct.pack("!I", length))


def test_startup_packet_of_maximum_length_is_accepted() -> None:
    assert m.startup_packet_length(struct.pack("!I", m.MAX_STARTUP_PACKET)) == m.MAX_STARTUP_PACKET
    filler = b"x" * (m.MAX_STARTUP_PACKET - 4 - 4 - len(b"user\x00u\x00options\x00") - 2)
    packet = startup_packet(startup_body(b"user", b"u", b"options", filler))
    assert len(packet) == m.MAX_STARTUP_PACKET

    parsed = m.parse_startup_packet(packet)

    assert isinstance(parsed, m.StartupMessage)
    assert parsed.parameters["options"] == filler.decode()


@pytest.mark.parametrize("extra", [-1, 1], ids=["short", "long"])
def test_startup_packet_whose_size_differs_from_its_length_word_is_refused(extra: int) -> None:
    packet = startup_packet(startup_body(b"user", b"u"))
    packet = packet[:extra] if extra < 0 else packet + b"\x00"

    with pytest.raises(ProtocolViolation, match="incomplete"):
        m.parse_startup_packet(packet)


_PROTOCOL_TEXT = st.text(st.characters(codec="utf-8", exclude_characters="\x00"), min_size=1, max_size=20)


@given(st.dictionaries(_PROTOCOL_TEXT, _PROTOCOL_TEXT, max_size=8))
def test_build_startup_message_round_trips_through_parse(parameters: dict[str, str]) -> None:
    packet = m.build_startup_message(parameters)
    if len(packet) > m.MAX_STARTUP_PACKET:  # pragma: no cover - max sizes keep packets small
        return

    parsed = m.parse_startup_packet(packet)

    assert isinstance(parsed, m.StartupMessage)
    assert parsed.protocol == m.PROTOCOL_3_0
    assert dict(parsed.parameters) == parameters


def test_build_startup_message_bytes_match_the_documented_layout() -> None:
    packet = m.build_startup_message({"user": "u", "database": "d"})

    assert packet == struct.pack("!ii", 27, 196608) + b"user\x00u\x00database\x00d\x00\x00"


def test_build_startup_message_refuses_nul_in_a_parameter() -> None:
    with pytest.raises(ValueError, match="NUL"):
        m.build_startup_message({"user": "a\x00b"})


@settings(suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(st.binary(max_size=64))
def test_random_bytes_fed_to_parse_startup_packet_either_parse_or_violate(data: bytes) -> None:
    with contextlib.suppress(ProtocolViolation):
        m.parse_startup_packet(data)


@settings(suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(st.sampled_from([m.PROTOCOL_3_0, 80877103, 80877102, 80877104, 0]), st.binary(max_size=64))
def test_random_bodies_behind_a_valid_length_either_parse_or_violate(code: int, tail: bytes) -> None:
    body = struct.pack("!i", code) + tail
    try:
        parsed = m.parse_startup_packet(startup_packet(body))
    except ProtocolViolation:
        return
    assert isinstance(parsed, m.SSLRequest | m.GSSENCRequest | m.CancelRequest | m.StartupMessage)


# --- builders ----------------------------------------------------------------------------------------------


def test_error_response_has_documented_fields_and_parses_back() -> None:
    built = m.build_error_response(
        "FATAL", "28000", "no pg_hba.conf entry", detail="terminal t1", hint="ask the operator"
    )

    assert built[:1] == b"E"
    (length,) = struct.unpack_from("!I", built, 1)
    assert length == len(built) - 1
    assert built.endswith(b"\x00\x00")
    payload = built[5:]
    assert payload == (
        b"SFATAL\x00VFATAL\x00C28000\x00Mno pg_hba.conf entry\x00Dterminal t1\x00Hask the operator\x00\x00"
    )
    assert m.parse_error_fields(payload) == {
        "S": "FATAL",
        "V": "FATAL",
        "C": "28000",
        "M": "no pg_hba.conf entry",
        "D": "terminal t1",
        "H": "ask the operator",
    }


def test_error_response_omits_detail_and_hint_when_absent() -> None:
    built = m.build_error_response("ERROR", "53300", "too many")

    assert m.parse_error_fields(built[5:]) == {"S": "ERROR", "V": "ERROR", "C": "53300", "M": "too many"}


def test_notice_response_uses_type_n() -> None:
    built = m.build_error_response("NOTICE", "00000", "hello", kind=b"N")

    assert built[:1] == b"N"
    assert m.parse_error_fields(built[5:])["M"] == "hello"


def test_error_response_refuses_nul_in_the_message() -> None:
    with pytest.raises(ValueError, match="NUL"):
        m.build_error_response("ERROR", "XX000", "a\x00b")


@given(
    st.sampled_from(["ERROR", "FATAL", "PANIC"]),
    st.from_regex(r"[0-9A-Z]{5}", fullmatch=True),
    _PROTOCOL_TEXT,
)
def test_error_response_round_trips_through_scan_and_parse(severity: str, sqlstate: str, text: str) -> None:
    built = m.build_error_response(severity, sqlstate, text)

    frames, consumed = m.scan_frames(built, MAX)

    assert consumed == len(built)
    assert len(frames) == 1
    fields = m.parse_error_fields(m.frame_payload(built, frames[0]))
    assert (fields["S"], fields["C"], fields["M"]) == (severity, sqlstate, text)


def test_parameter_status_bytes_and_parse_back() -> None:
    built = m.build_parameter_status("TimeZone", "Europe/Berlin")

    assert built == b"S" + struct.pack("!I", 4 + 23) + b"TimeZone\x00Europe/Berlin\x00"
    assert m.parse_parameter_status(built[5:]) == ("TimeZone", "Europe/Berlin")


def test_malformed_parameter_status_is_a_protocol_violation() -> None:
    with pytest.raises(ProtocolViolation):
        m.parse_parameter_status(b"TimeZone")


def test_backend_key_data_bytes_and_parse_back() -> None:
    built = m.build_backend_key_data(31337, -123456789)

    assert built == b"K\x00\x00\x00\x0c" + struct.pack("!ii", 31337, -123456789)
    assert m.parse_backend_key_data(built[5:]) == (31337, -123456789)


@pytest.mark.parametrize("payload", [b"", b"\x00" * 7, b"\x00" * 9])
def test_malformed_backend_key_data_is_a_protocol_violation(payload: bytes) -> None:
    with pytest.raises(ProtocolViolation):
        m.parse_backend_key_data(payload)


@pytest.mark.parametrize("status", [b"I", b"T", b"E"])
def test_ready_for_query_bytes(status: bytes) -> None:
    assert m.build_ready_for_query(status) == b"Z\x00\x00\x00\x05" + status


def test_small_builders_match_the_documented_bytes() -> None:
    assert m.build_authentication_ok() == b"R\x00\x00\x00\x08\x00\x00\x00\x00"
    assert m.build_query("SELECT 1") == b"Q\x00\x00\x00\x0dSELECT 1\x00"
    assert m.build_terminate() == b"X\x00\x00\x00\x04"
    assert m.build_password_message(b"secret\x00") == b"p\x00\x00\x00\x0bsecret\x00"


def test_sasl_initial_response_layout() -> None:
    built = m.build_sasl_initial_response("SCRAM-SHA-256", b"n,,n=,r=abc")

    assert built == (
        b"p"
        + struct.pack("!I", 4 + 14 + 4 + 11)
        + b"SCRAM-SHA-256\x00"
        + struct.pack("!i", 11)
        + b"n,,n=,r=abc"
    )


def test_authentication_parse_splits_code_and_data() -> None:
    assert m.parse_authentication(struct.pack("!i", 5) + b"salt") == (5, b"salt")
    with pytest.raises(ProtocolViolation):
        m.parse_authentication(b"\x00\x00\x00")


def test_sasl_mechanism_list_parses() -> None:
    assert m.parse_sasl_mechanisms(b"SCRAM-SHA-256-PLUS\x00SCRAM-SHA-256\x00\x00") == [
        "SCRAM-SHA-256-PLUS",
        "SCRAM-SHA-256",
    ]
