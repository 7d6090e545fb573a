"""The PostgreSQL front end's plaintext preamble, fed bytes over a socket pair (no TLS, no database)."""

from __future__ import annotations

import socket
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest

from proxy.config.model import ListenConfig
from proxy.errors import ProtocolViolation
from proxy.frontend import Encryption
from proxy.oplog import configure_logging
from proxy.protocols.postgres import messages as m
from proxy.protocols.postgres.frontend import PLAINTEXT_REFUSAL, PostgresFrontend
from proxy.protocols.postgres.session import SessionRegistry
from proxy.server import ProxyServer
from tests.sockless import proxy_without_listener

SOURCE = "127.0.0.1:40001"


@pytest.fixture(autouse=True)
def _quiet_logs() -> None:
    configure_logging(json=False, level="error")


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    """(terminal end, proxy end), the proxy's non-blocking as the server leaves accepted sockets."""
    terminal, accepted = socket.socketpair()
    accepted.setblocking(False)
    terminal.settimeout(5.0)
    yield terminal, accepted
    terminal.close()
    accepted.close()


@pytest.fixture
def proxy(tmp_path: Path) -> ProxyServer:
    return proxy_without_listener(tmp_path)


async def _preamble(accepted: socket.socket, proxy: ProxyServer) -> Encryption:
    """The preamble with the proxy lending its logs and metrics, as the server does."""
    return await PostgresFrontend(SessionRegistry()).preamble(accepted, SOURCE, proxy)


def _gssenc_request() -> bytes:
    return struct.pack("!ii", 8, m.GSSENC_REQUEST_CODE)


def test_the_default_port_is_the_one_listen_defaults_to() -> None:
    assert PostgresFrontend(SessionRegistry()).default_port == ListenConfig().port == 6432


async def test_an_sslrequest_is_answered_s_and_tls_follows(
    pair: tuple[socket.socket, socket.socket], proxy: ProxyServer
) -> None:
    terminal, accepted = pair
    terminal.sendall(m.build_ssl_request())
    assert await _preamble(accepted, proxy) is Encryption.NEGOTIATED
    assert terminal.recv(16) == b"S"


async def test_direct_tls_leaves_the_first_record_for_the_tls_layer(
    pair: tuple[socket.socket, socket.socket], proxy: ProxyServer
) -> None:
    terminal, accepted = pair
    terminal.sendall(bytes([m.TLS_HANDSHAKE_RECORD, 3, 1]))
    assert await _preamble(accepted, proxy) is Encryption.DIRECT
    assert accepted.recv(16) == bytes([m.TLS_HANDSHAKE_RECORD, 3, 1])


async def test_gssenc_is_refused_once_then_ssl_goes_on(
    pair: tuple[socket.socket, socket.socket], proxy: ProxyServer
) -> None:
    terminal, accepted = pair
    terminal.sendall(_gssenc_request() + m.build_ssl_request())
    assert await _preamble(accepted, proxy) is Encryption.NEGOTIATED
    assert terminal.recv(16) == b"NS"


async def test_a_repeated_gssenc_request_is_a_protocol_violation(
    pair: tuple[socket.socket, socket.socket], proxy: ProxyServer
) -> None:
    terminal, accepted = pair
    terminal.sendall(_gssenc_request() * 2)
    with pytest.raises(ProtocolViolation, match="GSSENCRequest repeated"):
        await _preamble(accepted, proxy)


async def test_a_plaintext_startup_gets_the_refusal_as_an_error_response(
    pair: tuple[socket.socket, socket.socket], proxy: ProxyServer
) -> None:
    terminal, accepted = pair
    terminal.sendall(m.build_startup_message({"user": "cashier", "database": "pos"}))
    assert await _preamble(accepted, proxy) is Encryption.NONE
    reply = terminal.recv(4096)
    assert reply[:1] == b"E"
    fields = m.parse_error_fields(reply[5:])
    assert (fields["S"], fields["C"], fields["M"]) == ("FATAL", "28000", PLAINTEXT_REFUSAL.message)
    assert fields["H"] == PLAINTEXT_REFUSAL.hint
    assert proxy.metrics.client_errors_total.labels("proxy", "28000")._value.get() == 1
