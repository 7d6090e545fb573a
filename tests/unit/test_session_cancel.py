"""Cancel on a session without sockets: what waits for a cancel on its way, what is never sent, which
server connection a cancel may reach, and a statement cancelled before it reached any.

The delivery to the server (upstream.send_cancel) is a stand-in the test opens when it wants: it
says whether the cancel would still be sent at that moment, and answers as the server would.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from proxy.oplog import configure_logging
from proxy.protocols.postgres import messages as m
from proxy.protocols.postgres import session as session_module
from proxy.protocols.postgres.session import ClientSession
from proxy.protocols.postgres.upstream import CancelOutcome
from proxy.server import ProxyServer
from tests import compiled
from tests.sockless import (
    add_server,
    open_session,
    proxy_without_listener,
    record_closed_transports,
    terminal_certificate,
)

pytestmark = pytest.mark.skipif(compiled.expected(), reason="a compiled module cannot be patched")

PARAMETERS = {"server_version": "15.0", "client_encoding": "UTF8"}
SLOW = m.build_query("SELECT pg_sleep(10)")
NEXT = m.build_query("SELECT 'next'")
BEGIN = m.build_query("BEGIN")
COMMIT = m.build_query("COMMIT")
IN_TRANSACTION = m.build_message(b"C", b"BEGIN\x00") + m.build_ready_for_query(b"T")
COMMITTED = m.build_message(b"C", b"COMMIT\x00") + m.build_ready_for_query(b"I")
SLEPT = m.build_message(b"C", b"SELECT 1\x00") + m.build_ready_for_query(b"I")
CANCELLED = m.build_error_response("ERROR", "57014", "canceling statement due to user request")
PARSE_BIND_EXECUTE = (
    m.build_message(b"P", b"\x00INSERT INTO t VALUES (1)\x00\x00\x00")
    + m.build_message(b"B", b"\x00\x00\x00\x00\x00\x00\x00\x00")
    + m.build_message(b"E", b"\x00\x00\x00\x00\x00")
)
SYNC = m.build_message(b"S", b"")


@dataclass
class Delivery:
    backend_key: tuple[int, int]
    still_wanted: Callable[[], bool]
    opened: asyncio.Future[CancelOutcome]
    sent: bool | None = None


@dataclass
class StandInCancels:
    """upstream.send_cancel: waits until the test opens the connection with the server's answer."""

    deliveries: list[Delivery] = field(default_factory=list)

    async def __call__(
        self, route: Any, context: Any, backend_key: tuple[int, int], still_wanted: Callable[[], bool]
    ) -> CancelOutcome:
        delivery = Delivery(backend_key, still_wanted, asyncio.get_running_loop().create_future())
        self.deliveries.append(delivery)
        answer = await delivery.opened
        delivery.sent = still_wanted()
        return answer if delivery.sent else CancelOutcome.NOT_SENT

    async def open(self, answer: CancelOutcome = CancelOutcome.ANSWERED) -> Delivery:
        """The connection to the server is open (and answered so, if the cancel is sent)."""
        delivery = self.deliveries[-1]
        delivery.opened.set_result(answer)
        for _ in range(5):
            await asyncio.sleep(0)
        return delivery


@pytest.fixture(autouse=True)
def _quiet_logs() -> None:
    configure_logging(json=False, level="error")


@pytest.fixture
def cancels(monkeypatch: pytest.MonkeyPatch) -> StandInCancels:
    stand_in = StandInCancels()
    monkeypatch.setattr(session_module, "send_cancel", stand_in)
    return stand_in


async def _cancel(proxy: ProxyServer, session: ClientSession) -> asyncio.Task[None] | None:
    """A CancelRequest with the session's keys; its delivery (if any) gets under way."""
    delivery = proxy._environment.registry.cancel(
        m.CancelRequest(session.process_id, session.secret_key), "test"
    )
    await asyncio.sleep(0)
    return delivery


async def test_what_the_client_sends_after_a_cancel_waits_until_it_is_settled(
    tmp_path: Path, cancels: StandInCancels
) -> None:
    proxy = proxy_without_listener(tmp_path)
    route = proxy.routes["pos"]
    server, upstream = add_server(route, PARAMETERS)
    server.backend_key = (4242, 99)
    session, transport = open_session(proxy, terminal_certificate(tmp_path), 40001)
    session.data_received(SLOW)
    delivery = await _cancel(proxy, session)
    assert delivery is not None and cancels.deliveries[0].backend_key == (4242, 99)

    server.data_received(SLEPT)  # the statement ended by itself before the cancel reached the server
    assert transport.written[-1] == SLEPT
    session.data_received(NEXT)
    assert upstream.written == [SLOW], "sent while the cancel could still land on it"

    opened = await cancels.open()
    assert opened.sent is False, "a cancel for a statement that is over was sent"
    assert delivery.done()
    assert upstream.written == [SLOW, NEXT]
    server.data_received(SLEPT)
    assert list(route.pool._idle) == [server], "the connection went back to the pool"


async def test_a_cancel_answered_by_the_server_gives_the_connection_back(
    tmp_path: Path, cancels: StandInCancels
) -> None:
    proxy = proxy_without_listener(tmp_path)
    route = proxy.routes["pos"]
    server, upstream = add_server(route, PARAMETERS)
    certificate = terminal_certificate(tmp_path)
    session, transport = open_session(proxy, certificate, 40001)
    other, other_transport = open_session(proxy, certificate, 40002)
    session.data_received(SLOW)
    await _cancel(proxy, session)
    other.data_received(NEXT)  # in the pool's line for the only server connection

    server.data_received(CANCELLED + m.build_ready_for_query(b"I"))
    assert transport.written[-1] == CANCELLED + m.build_ready_for_query(b"I")
    assert upstream.written == [SLOW], "lent to another client while a cancel for it may still land"

    opened = await cancels.open(CancelOutcome.ANSWERED)
    assert opened.sent is False  # the statement is over: not sent after all
    assert upstream.written == [SLOW, NEXT], "the connection did not go to the client waiting for it"
    server.data_received(SLEPT)
    assert other_transport.written[-1] == SLEPT


async def test_a_cancel_sent_while_the_statement_runs_frees_the_client_afterwards(
    tmp_path: Path, cancels: StandInCancels
) -> None:
    proxy = proxy_without_listener(tmp_path)
    route = proxy.routes["pos"]
    server, upstream = add_server(route, PARAMETERS)
    session, _transport = open_session(proxy, terminal_certificate(tmp_path), 40001)
    session.data_received(SLOW)
    await _cancel(proxy, session)
    opened = await cancels.open(CancelOutcome.ANSWERED)
    assert opened.sent is True
    server.data_received(CANCELLED + m.build_ready_for_query(b"I"))
    assert list(route.pool._idle) == [server] and not server.closed
    session.data_received(NEXT)
    assert upstream.written == [SLOW, NEXT]


async def test_a_cancel_the_server_never_answered_closes_its_connection_once_idle(
    tmp_path: Path, cancels: StandInCancels, monkeypatch: pytest.MonkeyPatch
) -> None:
    closed = record_closed_transports(monkeypatch)
    proxy = proxy_without_listener(tmp_path, pool_size=2)
    route = proxy.routes["pos"]
    first, first_upstream = add_server(route, PARAMETERS)
    second, second_upstream = add_server(route, PARAMETERS)
    session, transport = open_session(proxy, terminal_certificate(tmp_path), 40001)
    session.data_received(BEGIN)
    server, upstream = (first, first_upstream) if first_upstream.written else (second, second_upstream)
    server.data_received(IN_TRANSACTION)
    session.data_received(SLOW)
    await _cancel(proxy, session)
    await cancels.open(CancelOutcome.UNCONFIRMED)  # sent; it may land at any moment from now on

    server.data_received(CANCELLED + m.build_ready_for_query(b"E"))
    assert not server.closed, "the client's transaction is still open on it"
    session.data_received(m.build_query("ROLLBACK"))
    assert upstream.written[-1] == m.build_query("ROLLBACK")
    server.data_received(m.build_message(b"C", b"ROLLBACK\x00") + m.build_ready_for_query(b"I"))
    assert server.closed and upstream in closed, "lent again with a cancel that may still land"
    session.data_received(NEXT)  # the client goes on, on the other connection
    other_upstream = second_upstream if server is first else first_upstream
    assert other_upstream.written == [NEXT]
    assert transport not in closed


async def test_a_cancel_for_a_statement_waiting_in_the_pool_line_answers_it_there(
    tmp_path: Path, cancels: StandInCancels
) -> None:
    proxy = proxy_without_listener(tmp_path)
    route = proxy.routes["pos"]
    server, upstream = add_server(route, PARAMETERS)
    certificate = terminal_certificate(tmp_path)
    holder, _ = open_session(proxy, certificate, 40001)
    waiter, transport = open_session(proxy, terminal_certificate(tmp_path, terminal="till-02"), 40002)
    holder.data_received(BEGIN)
    server.data_received(IN_TRANSACTION)
    waiter.data_received(SLOW + NEXT)  # pipelined: both wait for the only connection

    assert await _cancel(proxy, waiter) is None  # nothing to deliver to a server
    assert cancels.deliveries == []
    assert transport.written[-1] == CANCELLED + m.build_ready_for_query(b"I")

    holder.data_received(COMMIT)
    server.data_received(COMMITTED)
    assert upstream.written == [BEGIN, COMMIT, NEXT], "the cancelled statement ran after all"


async def test_a_cancelled_extended_cycle_is_skipped_up_to_its_sync(
    tmp_path: Path, cancels: StandInCancels
) -> None:
    proxy = proxy_without_listener(tmp_path)
    route = proxy.routes["pos"]
    server, upstream = add_server(route, PARAMETERS)
    holder, _ = open_session(proxy, terminal_certificate(tmp_path), 40001)
    waiter, transport = open_session(proxy, terminal_certificate(tmp_path, terminal="till-02"), 40002)
    holder.data_received(BEGIN)
    server.data_received(IN_TRANSACTION)
    waiter.data_received(PARSE_BIND_EXECUTE)  # its Sync is still to come

    await _cancel(proxy, waiter)
    assert transport.written[-1] == CANCELLED  # ReadyForQuery answers the Sync, when it comes
    holder.data_received(COMMIT)
    server.data_received(COMMITTED)
    assert list(route.pool._idle) == [server], "the cancelled client kept its place in the line"

    waiter.data_received(m.build_message(b"H", b"") + SYNC + NEXT)
    assert transport.written[-1] == m.build_ready_for_query(b"I")
    assert upstream.written == [BEGIN, COMMIT, NEXT], "a message of the cancelled cycle ran"


async def test_a_cancel_with_nothing_running_is_not_sent(tmp_path: Path, cancels: StandInCancels) -> None:
    proxy = proxy_without_listener(tmp_path)
    route = proxy.routes["pos"]
    server, upstream = add_server(route, PARAMETERS)
    session, _ = open_session(proxy, terminal_certificate(tmp_path), 40001)
    session.data_received(BEGIN)
    server.data_received(IN_TRANSACTION)  # idle in a transaction: the server waits for the client
    assert await _cancel(proxy, session) is None
    assert cancels.deliveries == []
    session.data_received(NEXT)
    assert upstream.written == [BEGIN, NEXT]


async def test_sessions_given_the_same_pid_are_told_apart_by_their_keys(
    tmp_path: Path, cancels: StandInCancels, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Session mode gives clients their backend's pid, which two live sessions may share for a
    while (a backend of another route's server, or one whose earlier session is still ending)."""
    proxy = proxy_without_listener(tmp_path, pool_size=2)
    registry = proxy._environment.registry
    route = proxy.routes["pos"]
    first_server, _ = add_server(route, PARAMETERS)
    second_server, _ = add_server(route, PARAMETERS)
    first_server.backend_key, second_server.backend_key = (4242, 1), (4243, 2)
    first, _ = open_session(proxy, terminal_certificate(tmp_path), 40001)
    second, _ = open_session(proxy, terminal_certificate(tmp_path, terminal="till-02"), 40002)
    registry.unregister(second)
    second.process_id, second.secret_key = registry.register(second, first.process_id)
    assert second.secret_key != first.secret_key
    first.data_received(BEGIN)
    first_server.data_received(IN_TRANSACTION)
    second.data_received(BEGIN)
    second_server.data_received(IN_TRANSACTION)
    first.data_received(SLOW)
    second.data_received(SLOW)

    wrong_key = (first.secret_key ^ second.secret_key ^ 0x5A5A) & 0x7FFFFFFF
    assert registry.cancel(m.CancelRequest(first.process_id, wrong_key), "test") is None
    assert await _cancel(proxy, second) is not None
    assert second._server is not None and first._server is not second._server
    assert [delivery.backend_key for delivery in cancels.deliveries] == [second._server.backend_key]

    record_closed_transports(monkeypatch)  # ending mid-statement closes the server connection
    first.connection_lost(None)  # the session that ended takes only its own entry along
    assert registry.sessions[second.process_id] == [second]
    assert registry.cancel(m.CancelRequest(first.process_id, first.secret_key), "test") is None
    second.connection_lost(None)
    assert second.process_id not in registry.sessions
