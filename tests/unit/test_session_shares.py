"""A terminal's share of the pool and the idle-in-transaction timer, on a session without sockets."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from proxy.oplog import configure_logging
from proxy.protocols.postgres import messages as m
from tests.sockless import (
    add_server,
    open_session,
    proxy_without_listener,
    record_closed_transports,
    terminal_certificate,
)

PARAMETERS = {"server_version": "15.0", "client_encoding": "UTF8"}
BEGIN = m.build_query("BEGIN")
SELECT = m.build_query("SELECT 1")
IN_TRANSACTION = m.build_message(b"C", b"BEGIN\x00") + m.build_ready_for_query(b"T")
COMMITTED = m.build_message(b"C", b"COMMIT\x00") + m.build_ready_for_query(b"I")


@pytest.fixture(autouse=True)
def _quiet_logs() -> None:
    configure_logging(json=False, level="error")


async def test_a_terminal_at_its_share_waits_for_its_own_connection_while_another_terminal_goes_on(
    tmp_path: Path,
) -> None:
    proxy = proxy_without_listener(tmp_path, pool_size=3)  # a share of one per terminal
    route = proxy.routes["pos"]
    servers = [add_server(route, PARAMETERS) for _ in range(3)]
    till = terminal_certificate(tmp_path)
    first, _ = open_session(proxy, till, 40001)
    second, _ = open_session(proxy, till, 40002)
    other, _ = open_session(proxy, terminal_certificate(tmp_path, terminal="till-02"), 40003)

    first.data_received(BEGIN)
    holder = next(server for server, upstream in servers if upstream.written == [BEGIN])
    holder.data_received(IN_TRANSACTION)
    second.data_received(SELECT)  # idle server connections are there, but not for this terminal
    assert sum(upstream.written == [SELECT] for _server, upstream in servers) == 0
    other.data_received(SELECT)  # another terminal of the store is not held up
    assert sum(upstream.written == [SELECT] for _server, upstream in servers) == 1
    assert route.shares.held("store-001/till-01") == 1 and route.shares.waiting("store-001/till-01") == 1

    first.data_received(m.build_query("COMMIT"))
    holder.data_received(COMMITTED)  # the first's transaction ends: the share goes to the second
    assert sum(upstream.written[-1:] == [SELECT] for _server, upstream in servers) == 2
    assert route.shares.held("store-001/till-01") == 1 and route.shares.waiting("store-001/till-01") == 0


async def test_a_client_idle_in_a_transaction_is_cut_off_and_its_connection_closed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    closed = record_closed_transports(monkeypatch)
    proxy = proxy_without_listener(tmp_path)
    route = proxy.routes["pos"]
    server, upstream = add_server(route, PARAMETERS)
    session, transport = open_session(proxy, terminal_certificate(tmp_path), 40001)
    session._idle_transaction_timeout = 0.2  # pool.idle_transaction_timeout, shortened
    session.data_received(BEGIN)
    server.data_received(IN_TRANSACTION)
    await asyncio.sleep(0.1)
    session.data_received(SELECT)  # busy again: the clock starts over at the next ReadyForQuery
    await asyncio.sleep(0.15)
    assert not server.closed
    server.data_received(m.build_message(b"C", b"SELECT 1\x00") + m.build_ready_for_query(b"T"))
    await asyncio.sleep(0.35)
    assert server.closed and upstream in closed, "closed, not given back to the pool in a transaction"
    assert b"25P03" in transport.written[-1] and b"idle-in-transaction timeout" in transport.written[-1]
    assert transport in closed
    assert route.shares.held("store-001/till-01") == 0
