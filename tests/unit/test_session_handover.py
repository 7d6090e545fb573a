"""The hand-over of a server connection to a waiting client whose settings differ, without sockets.

The proxy first brings the connection's settings in line (one internal query). Whatever the
client sends in the meantime must queue behind the messages already waiting, not reach the
server ahead of them or before the internal query's answer is in.
"""

from __future__ import annotations

import asyncio
import ssl
from pathlib import Path

import pytest

from proxy.oplog import configure_logging
from proxy.protocols.postgres import messages as m
from proxy.protocols.postgres.session import ClientSession
from tests import compiled
from tests.sockless import (
    READY,
    add_server,
    open_session,
    proxy_without_listener,
    record_closed_transports,
    terminal_certificate,
)

SERVER_PARAMETERS = {"server_version": "15.0", "client_encoding": "UTF8", "TimeZone": "UTC"}
PARSE_BIND_EXECUTE = (
    m.build_message(b"P", b"\x00SELECT now()\x00\x00\x00")
    + m.build_message(b"B", b"\x00\x00\x00\x00\x00\x00\x00\x00")
    + m.build_message(b"E", b"\x00\x00\x00\x00\x00")
)
SYNC = m.build_message(b"S", b"")
CYCLE_REPLY = (
    m.build_message(b"1", b"") + m.build_message(b"2", b"") + m.build_message(b"C", b"SELECT 1\x00") + READY
)


@pytest.fixture(autouse=True)
def _quiet_logs() -> None:
    configure_logging(json=False, level="error")


async def test_messages_sent_while_settings_are_applied_wait_their_turn(tmp_path: Path) -> None:
    proxy = proxy_without_listener(tmp_path)
    server, upstream = add_server(proxy.routes["pos"], SERVER_PARAMETERS)
    certificate = terminal_certificate(tmp_path)
    # As the server spells it (learned from an earlier terminal's startup): answered without a server.
    proxy.routes["pos"].spellings[("TimeZone", "Asia/Tokyo")] = "Asia/Tokyo"
    first, first_transport = open_session(proxy, certificate, 40001)
    tokyo, tokyo_transport = open_session(proxy, certificate, 40002, TimeZone="Asia/Tokyo")
    first.data_received(PARSE_BIND_EXECUTE + SYNC)  # takes the only server connection
    tokyo.data_received(PARSE_BIND_EXECUTE)  # waits in line, Sync still to come
    assert upstream.written == [PARSE_BIND_EXECUTE + SYNC]

    server.data_received(CYCLE_REPLY)  # the first is done: the connection goes to the waiting one
    await asyncio.sleep(0)  # the hand-over task sends its internal query and waits for it
    assert len(upstream.written) == 2 and b"set_config" in upstream.written[1], upstream.written

    tokyo.data_received(SYNC)  # while the server is still answering the internal query
    assert len(upstream.written) == 2, "the Sync overtook the messages waiting before it"

    server.data_received(
        m.build_message(b"T", b"\x00\x01set_config\x00" + b"\x00" * 18)
        + m.build_message(b"D", b"\x00\x01\x00\x00\x00\x0aAsia/Tokyo")
        + m.build_message(b"C", b"SELECT 1\x00")
        + READY
    )
    for _ in range(10):
        if len(upstream.written) > 2:
            break
        await asyncio.sleep(0)
    assert upstream.written[2:] == [PARSE_BIND_EXECUTE + SYNC]
    server.data_received(CYCLE_REPLY)
    assert tokyo_transport.written[-1] == CYCLE_REPLY
    assert first_transport.written[-1] == CYCLE_REPLY


async def test_a_tls_error_without_a_reason_still_ends_the_session(tmp_path: Path) -> None:
    # ssl.SSLError.reason is typed str but may be missing or None (mypyc raised TypeError on it).
    proxy = proxy_without_listener(tmp_path)
    server, upstream = add_server(proxy.routes["pos"], SERVER_PARAMETERS)
    session, _transport = open_session(proxy, terminal_certificate(tmp_path), 40001)
    session.data_received(PARSE_BIND_EXECUTE + SYNC)
    server.data_received(CYCLE_REPLY)
    assert upstream.written == [PARSE_BIND_EXECUTE + SYNC]
    assert session in proxy._environment.registry.live

    session.connection_lost(ssl.SSLError("decryption failed"))  # raised in Python: no reason

    assert session not in proxy._environment.registry.live


@pytest.mark.skipif(compiled.expected(), reason="a compiled class cannot be patched to fail")
async def test_a_fault_handing_a_server_to_a_waiting_client_ends_only_that_client(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    closed = record_closed_transports(monkeypatch)
    proxy = proxy_without_listener(tmp_path)
    server, upstream = add_server(proxy.routes["pos"], SERVER_PARAMETERS)
    certificate = terminal_certificate(tmp_path)
    first, first_transport = open_session(proxy, certificate, 40001)
    waiting, waiting_transport = open_session(proxy, certificate, 40002)
    first.data_received(PARSE_BIND_EXECUTE + SYNC)  # takes the only server connection
    waiting.data_received(PARSE_BIND_EXECUTE + SYNC)  # waits in line for it

    def fault(self: ClientSession, server: object) -> None:
        raise RuntimeError("a bug in the hand-over")

    monkeypatch.setattr(ClientSession, "_server_granted", fault)
    server.data_received(CYCLE_REPLY)  # the connection is handed to the waiting client

    assert first_transport.written[-1] == CYCLE_REPLY
    assert first in proxy._environment.registry.live
    refusal = waiting_transport.written[-1]
    assert refusal.startswith(b"E") and b"internal error" in refusal
    # The server connection is in an unknown state: closed, never back in the pool.
    assert server.closed and upstream in closed
    assert waiting_transport in closed and first_transport not in closed
    assert b"pos_proxy_internal_errors_total 1.0" in proxy.metrics.render()
