"""proxy.protocols.postgres.startup: the proxy's own startup and authentication towards a server.

The server side is played here the way PostgreSQL plays it (chapter "Frontend/Backend Protocol",
"Message Flow" and "Message Formats"): Authentication messages are type 'R' with an int32 code
(0 ok, 3 cleartext, 5 md5 + 4-byte salt, 10 SASL + mechanism list, 11 SASLContinue, 12 SASLFinal).
SCRAM-SHA-256 is verified by scramp's own server implementation.
"""

from __future__ import annotations

import base64
import hashlib
import struct

import pytest
from scramp import ScramException, ScramMechanism

from proxy.errors import ProtocolViolation
from proxy.protocols.postgres import messages as m
from proxy.protocols.postgres.startup import UpstreamHandshake, UpstreamRefused, md5_password

USER = "pos_proxy"
DATABASE = "pos"
PASSWORD = "correct horse battery staple"

R = ord("R")


def auth(code: int, data: bytes = b"") -> bytes:
    """Payload of an Authentication message (the part after type byte and length)."""
    return struct.pack("!i", code) + data


def handshake(password: str | None = PASSWORD, **parameters: str) -> UpstreamHandshake:
    return UpstreamHandshake(user=USER, database=DATABASE, password=password, parameters=parameters)


def one_frame(data: bytes | None) -> tuple[int, bytes]:
    """The single whole message in ``data``, as (type, payload)."""
    assert data is not None
    frames, consumed = m.scan_frames(data, 1 << 20)
    assert consumed == len(data)
    assert len(frames) == 1
    return frames[0][0], m.frame_payload(data, frames[0])


def sasl_initial_response(payload: bytes) -> tuple[str, bytes]:
    """Split a SASLInitialResponse body: mechanism (String), Int32 length, data."""
    mechanism, rest = payload.split(b"\x00", 1)
    (length,) = struct.unpack_from("!i", rest, 0)
    data = rest[4:]
    assert length == len(data)
    return mechanism.decode(), data


def finish_startup(hs: UpstreamHandshake) -> None:
    """What PostgreSQL sends after AuthenticationOk: ParameterStatus..., BackendKeyData, ReadyForQuery."""
    for message in (
        m.build_parameter_status("server_version", "15.6"),
        m.build_parameter_status("client_encoding", "UTF8"),
        m.build_backend_key_data(4711, 0x5EC12E7),
        m.build_ready_for_query(b"I"),
    ):
        kind, payload = one_frame(message)
        assert hs.receive(kind, payload) is None


class ScramPostgres:
    """The server half of SCRAM-SHA-256 as PostgreSQL runs it, on top of scramp's ScramServer."""

    def __init__(self, stored_password: str, mechanisms: tuple[str, ...] = ("SCRAM-SHA-256",)) -> None:
        mechanism = ScramMechanism("SCRAM-SHA-256")
        auth_info = mechanism.make_auth_info(stored_password, iteration_count=4096)
        # PostgreSQL ignores the SCRAM user name and uses the startup packet's: so does this lookup.
        self.server = mechanism.make_server(lambda _username: auth_info)
        self.mechanisms = mechanisms
        self.client_first: str | None = None

    def sasl(self) -> bytes:
        return auth(m.AUTH_SASL, b"".join(name.encode() + b"\x00" for name in self.mechanisms) + b"\x00")

    def on_initial_response(self, reply: bytes | None) -> bytes:
        kind, payload = one_frame(reply)
        assert kind == ord("p")
        mechanism, data = sasl_initial_response(payload)
        assert mechanism == "SCRAM-SHA-256"
        self.client_first = data.decode()
        self.server.set_client_first(self.client_first)
        return auth(m.AUTH_SASL_CONTINUE, self.server.get_server_first().encode())

    def on_client_final(self, reply: bytes | None) -> bytes:
        """SASLFinal, or the ErrorResponse PostgreSQL sends when the proof is wrong (raised as such)."""
        kind, payload = one_frame(reply)
        assert kind == ord("p")
        self.server.set_client_final(payload.decode())
        return auth(m.AUTH_SASL_FINAL, self.server.get_server_final().encode())


def password_failed() -> tuple[int, bytes]:
    return one_frame(
        m.build_error_response("FATAL", "28P01", f'password authentication failed for user "{USER}"')
    )


# --- startup message ---------------------------------------------------------------------------------------


def test_startup_message_names_user_database_and_extra_parameters() -> None:
    parsed = m.parse_startup_packet(handshake(application_name="pos-db-proxy").startup_message())

    assert isinstance(parsed, m.StartupMessage)
    assert parsed.protocol == m.PROTOCOL_3_0
    assert dict(parsed.parameters) == {"user": USER, "database": DATABASE, "application_name": "pos-db-proxy"}


# --- SCRAM-SHA-256 -----------------------------------------------------------------------------------------


def test_scram_sha_256_against_a_scramp_server_succeeds() -> None:
    hs = handshake()
    server = ScramPostgres(PASSWORD)

    first = hs.receive(R, server.sasl())
    continue_ = server.on_initial_response(first)
    client_final = hs.receive(R, continue_)
    final = server.on_client_final(client_final)
    assert hs.receive(R, final) is None
    assert hs.receive(R, auth(m.AUTH_OK)) is None
    assert not hs.done
    finish_startup(hs)

    assert hs.done
    assert server.client_first is not None
    assert server.client_first.startswith("n,,")  # no channel binding requested


def test_scram_picks_sha_256_when_the_server_also_offers_plus() -> None:
    hs = handshake()
    server = ScramPostgres(PASSWORD, mechanisms=("SCRAM-SHA-256-PLUS", "SCRAM-SHA-256"))

    reply = hs.receive(R, server.sasl())

    _, payload = one_frame(reply)
    assert sasl_initial_response(payload)[0] == "SCRAM-SHA-256"


def test_scram_with_the_wrong_password_is_refused() -> None:
    hs = handshake(password="not the password")
    server = ScramPostgres(PASSWORD)

    client_final = hs.receive(R, server.on_initial_response(hs.receive(R, server.sasl())))
    # scramp's server rejects the proof; PostgreSQL then answers with FATAL 28P01.
    with pytest.raises(ScramException):
        server.on_client_final(client_final)
    with pytest.raises(UpstreamRefused, match="28P01"):
        hs.receive(*password_failed())
    assert not hs.done


def test_scram_server_signature_that_does_not_verify_is_refused() -> None:
    # An impostor who does not know the password cannot produce the server signature.
    hs = handshake()
    server = ScramPostgres(PASSWORD)
    hs.receive(R, server.on_initial_response(hs.receive(R, server.sasl())))
    forged = "v=" + base64.b64encode(b"\x00" * 32).decode()

    with pytest.raises(UpstreamRefused, match="SCRAM verification"):
        hs.receive(R, auth(m.AUTH_SASL_FINAL, forged.encode()))


@pytest.mark.parametrize("stage", ["after-sasl", "after-continue"])
def test_authentication_ok_before_scram_final_is_refused(stage: str) -> None:
    # An impostor that cannot produce the server signature must not end SCRAM early with AuthenticationOk.
    hs = handshake()
    server = ScramPostgres(PASSWORD)
    first = hs.receive(R, server.sasl())
    if stage == "after-continue":
        hs.receive(R, server.on_initial_response(first))

    with pytest.raises(UpstreamRefused, match="skipped SCRAM final verification"):
        hs.receive(R, auth(m.AUTH_OK))
    assert not hs.done


def test_scram_server_final_carrying_an_error_is_refused() -> None:
    hs = handshake()
    server = ScramPostgres(PASSWORD)
    hs.receive(R, server.on_initial_response(hs.receive(R, server.sasl())))

    with pytest.raises(UpstreamRefused):
        hs.receive(R, auth(m.AUTH_SASL_FINAL, b"e=invalid-proof"))


def test_scram_server_first_with_a_foreign_nonce_is_refused() -> None:
    hs = handshake()
    hs.receive(R, ScramPostgres(PASSWORD).sasl())
    server_first = "r=notthe-client-nonce,s=" + base64.b64encode(b"salt" * 4).decode() + ",i=4096"

    with pytest.raises(UpstreamRefused, match="server-first"):
        hs.receive(R, auth(m.AUTH_SASL_CONTINUE, server_first.encode()))


def test_malformed_scram_server_first_is_refused() -> None:
    hs = handshake()
    hs.receive(R, ScramPostgres(PASSWORD).sasl())

    with pytest.raises(UpstreamRefused):
        hs.receive(R, auth(m.AUTH_SASL_CONTINUE, b"garbage"))


def test_sasl_without_scram_sha_256_is_refused() -> None:
    with pytest.raises(UpstreamRefused, match="no supported SASL mechanism"):
        handshake().receive(R, auth(m.AUTH_SASL, b"SCRAM-SHA-256-PLUS\x00\x00"))


@pytest.mark.parametrize("code", [m.AUTH_SASL_CONTINUE, m.AUTH_SASL_FINAL])
def test_sasl_continuation_without_a_sasl_start_is_refused(code: int) -> None:
    with pytest.raises(UpstreamRefused, match="without a SASL start"):
        handshake().receive(R, auth(code, b"r=abc,s=c2FsdA==,i=4096"))


@pytest.mark.parametrize("code", [m.AUTH_SASL_CONTINUE, m.AUTH_SASL_FINAL])
def test_non_utf8_sasl_data_is_refused(code: int) -> None:
    hs = handshake()
    server = ScramPostgres(PASSWORD)
    continue_ = server.on_initial_response(hs.receive(R, server.sasl()))
    if code == m.AUTH_SASL_FINAL:
        hs.receive(R, continue_)

    with pytest.raises((UpstreamRefused, ProtocolViolation)):
        hs.receive(R, auth(code, b"v=\xff\xfe"))


def test_non_utf8_sasl_mechanism_list_is_refused() -> None:
    with pytest.raises((UpstreamRefused, ProtocolViolation)):
        handshake().receive(R, auth(m.AUTH_SASL, b"\xffSCRAM\x00\x00"))


# --- md5 and cleartext -------------------------------------------------------------------------------------


def test_md5_answer_is_md5_of_md5_password_user_and_salt() -> None:
    salt = b"\x01\x02\xfe\xff"
    inner = hashlib.md5((PASSWORD + USER).encode()).hexdigest()
    expected = b"md5" + hashlib.md5(inner.encode() + salt).hexdigest().encode()

    kind, payload = one_frame(handshake().receive(R, auth(m.AUTH_MD5, salt)))

    assert kind == ord("p")
    assert payload == expected + b"\x00"
    assert len(expected) == 35
    assert md5_password(USER, PASSWORD, salt) == expected


def test_md5_then_ok_then_ready_completes() -> None:
    hs = handshake()
    hs.receive(R, auth(m.AUTH_MD5, b"abcd"))
    assert hs.receive(R, auth(m.AUTH_OK)) is None

    finish_startup(hs)

    assert hs.done


@pytest.mark.parametrize("salt", [b"", b"ab"], ids=["empty", "two-bytes"])
def test_md5_request_without_a_four_byte_salt_is_refused(salt: bytes) -> None:
    with pytest.raises((UpstreamRefused, ProtocolViolation)):
        handshake().receive(R, auth(m.AUTH_MD5, salt))


def test_cleartext_answer_is_the_password_as_a_string() -> None:
    kind, payload = one_frame(handshake().receive(R, auth(m.AUTH_CLEARTEXT)))

    assert kind == ord("p")
    assert payload == PASSWORD.encode() + b"\x00"


def test_trust_needs_no_password() -> None:
    hs = handshake(password=None)

    assert hs.receive(R, auth(m.AUTH_OK)) is None
    finish_startup(hs)

    assert hs.done


@pytest.mark.parametrize("code", [m.AUTH_CLEARTEXT, m.AUTH_MD5, m.AUTH_SASL])
def test_password_required_but_missing_is_refused(code: int) -> None:
    data = {m.AUTH_MD5: b"salt", m.AUTH_SASL: b"SCRAM-SHA-256\x00\x00"}.get(code, b"")

    with pytest.raises(UpstreamRefused, match="password"):
        handshake(password=None).receive(R, auth(code, data))


@pytest.mark.parametrize("code", [2, 6, 7, 8, 9, 13, -1])
def test_unsupported_authentication_method_is_refused(code: int) -> None:
    with pytest.raises(UpstreamRefused, match=f"unsupported authentication method {code}"):
        handshake().receive(R, auth(code, b"\x00" * 8))


def test_short_authentication_message_is_a_protocol_violation() -> None:
    with pytest.raises(ProtocolViolation):
        handshake().receive(R, b"\x00\x00")


# --- the rest of startup -----------------------------------------------------------------------------------


def test_error_response_during_startup_is_refused_with_its_sqlstate() -> None:
    kind, payload = one_frame(m.build_error_response("FATAL", "3D000", 'database "pos" does not exist'))

    with pytest.raises(UpstreamRefused) as caught:
        handshake().receive(kind, payload)

    assert "3D000" in str(caught.value)
    assert 'database "pos" does not exist' in str(caught.value)


def test_parameter_status_and_backend_key_data_are_collected() -> None:
    hs = handshake()
    hs.receive(R, auth(m.AUTH_OK))

    finish_startup(hs)

    assert hs.parameters == {"server_version": "15.6", "client_encoding": "UTF8"}
    assert hs.backend_key == (4711, 0x5EC12E7)


def test_later_parameter_status_overrides_earlier() -> None:
    hs = handshake()
    for value in ("UTC", "Europe/Berlin"):
        hs.receive(*one_frame(m.build_parameter_status("TimeZone", value)))

    assert hs.parameters == {"TimeZone": "Europe/Berlin"}


def test_done_only_after_ready_for_query() -> None:
    hs = handshake()
    hs.receive(R, auth(m.AUTH_OK))
    hs.receive(*one_frame(m.build_parameter_status("server_version", "15.6")))
    hs.receive(*one_frame(m.build_backend_key_data(1, 2)))
    assert not hs.done

    hs.receive(*one_frame(m.build_ready_for_query(b"I")))

    assert hs.done


def test_notice_during_startup_is_ignored() -> None:
    hs = handshake()
    notice = m.build_error_response("WARNING", "01000", "heads up", kind=b"N")

    assert hs.receive(*one_frame(notice)) is None
    assert not hs.done


def test_unexpected_message_during_startup_is_refused() -> None:
    with pytest.raises(UpstreamRefused, match="unexpected message 'D'"):
        handshake().receive(ord("D"), b"\x00\x00")


def test_malformed_backend_key_data_is_a_protocol_violation() -> None:
    with pytest.raises(ProtocolViolation):
        handshake().receive(ord("K"), b"\x00\x00\x00\x01")


@pytest.mark.parametrize("encoding", ["LATIN1", "SQL_ASCII", "EUC_JP"])
def test_a_database_in_another_encoding_than_utf8_is_refused(encoding: str) -> None:
    """The proxy reads statements as a UTF8 database does (client bytes, identifier case folding)."""
    hs = handshake()
    hs.receive(R, auth(m.AUTH_OK))
    hs.receive(*one_frame(m.build_parameter_status("server_encoding", encoding)))
    with pytest.raises(UpstreamRefused, match=f"server_encoding is {encoding}"):
        hs.receive(*one_frame(m.build_ready_for_query(b"I")))
    assert not hs.done


def test_a_utf8_database_is_served() -> None:
    hs = handshake()
    hs.receive(R, auth(m.AUTH_OK))
    hs.receive(*one_frame(m.build_parameter_status("server_encoding", "UTF8")))
    hs.receive(*one_frame(m.build_ready_for_query(b"I")))
    assert hs.done


def test_a_server_session_with_standard_conforming_strings_off_is_refused() -> None:
    hs = handshake()
    hs.receive(R, auth(m.AUTH_OK))
    hs.receive(*one_frame(m.build_parameter_status("standard_conforming_strings", "off")))
    with pytest.raises(UpstreamRefused, match="standard_conforming_strings is off"):
        hs.receive(*one_frame(m.build_ready_for_query(b"I")))
