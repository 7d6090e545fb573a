"""A server connection's reply handling without sockets: when it is lent back and when not."""

from __future__ import annotations

import asyncio
from typing import cast

import pytest

from proxy.config.model import PoolConfig, RouteConfig, SSLMode
from proxy.protocols.postgres import messages as m
from proxy.protocols.postgres.prepared import ClientStatements, StatementStats, sync_quietly
from proxy.protocols.postgres.upstream import InternalQueryFailed, ServerConnection

MAX = 1 << 24


class Transport:
    """What a server connection writes, and no more of an asyncio transport than it uses."""

    def __init__(self) -> None:
        self.written: list[bytes] = []
        self.closed = False

    def write(self, data: bytes) -> None:
        self.written.append(data)

    def close(self) -> None:
        self.closed = True

    def resume_reading(self) -> None:
        pass


class Peer:
    """The client session a server connection is lent to, recording what it is told."""

    def __init__(self, *, lets_go_between_transactions: bool = False) -> None:
        self.lets_go_between_transactions = lets_go_between_transactions
        self.process_id = 4711  # the pid its client was given
        self.events: list[str] = []
        self.data = b""

    def server_data(self, data: bytes) -> None:
        self.data += data

    def server_parameter(self, name: str, value: str) -> None:
        self.events.append(f"parameter {name}")

    def server_ready(self) -> None:
        self.events.append("ready")

    def server_idle(self) -> None:
        self.events.append("idle")

    def server_lost(self, reason: str) -> None:
        self.events.append("lost")

    def pause_client_reading(self) -> None:
        pass

    def resume_client_reading(self) -> None:
        pass


def _lent_connection_after_a_query(
    *,
    transaction_pooling: bool = False,
    transport: Transport | None = None,
    closed: list[object] | None = None,
) -> tuple[ServerConnection, Peer]:
    """A server connection lent to a peer, its query sent; ``closed`` collects what the pool is told."""
    route = RouteConfig(
        database="pos", host="127.0.0.1", port=5432, dbname="pos", user="pos_proxy",
        sslmode=SSLMode.DISABLE, pool=PoolConfig(),
    )  # fmt: skip
    server = ServerConnection(
        route, on_closed=closed.append if closed is not None else lambda _connection: None
    )
    transport = transport or Transport()
    server.connection_made(cast(asyncio.Transport, transport))
    peer = Peer(lets_go_between_transactions=transaction_pooling)
    server.attach(peer)
    query = m.build_query("SELECT 1")
    frames, _ = m.scan_frames(query, MAX)
    server.send(ClientStatements(StatementStats()).rewrite(query, frames, server.state), frames)
    return server, peer


REPLY = m.build_message(b"C", b"SELECT 1\x00") + m.build_ready_for_query(b"I")


def test_an_idle_connection_is_lent_back_after_its_ready_for_query() -> None:
    server, peer = _lent_connection_after_a_query()
    server.data_received(REPLY)
    assert peer.events == ["ready", "idle"]
    assert server.is_clean


def test_a_sync_sent_apart_from_a_failed_cycle_still_lends_the_connection_back() -> None:
    server, peer = _lent_connection_after_a_query(transaction_pooling=True)
    server.data_received(REPLY)
    server.attach(peer)
    peer.events.clear()
    statements = ClientStatements(StatementStats())
    failing = m.build_message(b"P", b"\x00SELEC oops\x00\x00\x00")
    for part in (failing + m.build_message(b"B", b"\x00" * 8) + m.build_message(b"E", b"\x00" * 5)
                 + m.build_query("SELECT 1"), m.build_message(b"S", b"")):  # fmt: skip
        frames, _ = m.scan_frames(part, MAX)
        server.send(statements.rewrite(part, frames, server.state), frames)
    error = m.build_error_response("ERROR", "42601", "syntax error")
    server.data_received(error + m.build_ready_for_query(b"I"))
    assert peer.events == ["ready", "idle"]
    assert server.is_clean


def test_a_flush_after_the_sync_leaves_the_connection_free_for_the_next_client() -> None:
    """psycopg's pipeline ends with Sync, then Flush: the Flush opens no cycle of its own."""
    server, peer = _lent_connection_after_a_query(transaction_pooling=True)
    server.data_received(REPLY)
    server.attach(peer)
    peer.events.clear()
    statements = ClientStatements(StatementStats())
    pipeline = (
        m.build_message(b"P", b"\x00SELECT 1\x00\x00\x00")
        + m.build_message(b"B", b"\x00" * 8)
        + m.build_message(b"E", b"\x00" * 5)
        + m.build_message(b"S", b"")
        + m.build_message(b"H", b"")
    )
    frames, _ = m.scan_frames(pipeline, MAX)
    server.send(statements.rewrite(pipeline, frames, server.state), frames)
    assert not server.unsynced
    server.data_received(b"1\x00\x00\x00\x04" + b"2\x00\x00\x00\x04" + REPLY)
    assert peer.events == ["ready", "idle"]
    assert server.is_clean
    # A Flush inside a cycle leaves it open.
    flushed = m.build_message(b"P", b"\x00SELECT 1\x00\x00\x00") + m.build_message(b"H", b"")
    frames, _ = m.scan_frames(flushed, MAX)
    server.send(statements.rewrite(flushed, frames, server.state), frames)
    assert server.unsynced


def test_a_fatal_right_after_ready_for_query_keeps_the_connection_from_the_next_client() -> None:
    # A server shutting down sends FATAL 57P01 to idle backends, possibly in the same read as the
    # last reply: lending the connection on would send another client's messages to a closing socket.
    server, peer = _lent_connection_after_a_query()
    fatal = m.build_error_response("FATAL", "57P01", "terminating connection due to administrator command")
    server.data_received(REPLY + fatal)
    assert peer.events == ["ready"]
    assert not server.is_clean
    assert peer.data.endswith(fatal)  # the client sees why its connection ends


def test_a_fatal_right_after_the_last_ready_for_query_stays_with_a_transaction_pooled_connection() -> None:
    # The client's transaction is over and its next one takes another connection: the goodbye is the
    # server connection's. Passed on, libpq would read it while idle as a notice, then report the
    # closed connection without an SQLSTATE.
    server, peer = _lent_connection_after_a_query(transaction_pooling=True)
    fatal = m.build_error_response("FATAL", "57P01", "terminating connection due to administrator command")
    server.data_received(REPLY + fatal)
    assert peer.data == REPLY
    assert peer.events == ["ready", "idle"]  # let go: the pool closes it instead of lending it
    assert not server.usable and not server.is_clean and not server.fatal_passed_on


def test_a_fatal_with_the_client_s_work_in_flight_reaches_the_client_under_transaction_pooling() -> None:
    server, peer = _lent_connection_after_a_query(transaction_pooling=True)
    fatal = m.build_error_response("FATAL", "57P01", "terminating connection due to administrator command")
    server.data_received(fatal)  # before the reply to its query
    assert peer.data == fatal
    assert server.fatal_passed_on
    assert peer.events == []


@pytest.mark.parametrize("transaction_pooling", [False, True], ids=["session", "transaction"])
def test_a_fatal_passed_on_ends_the_server_connection_without_waiting_for_the_servers_close(
    transaction_pooling: bool,
) -> None:
    # The server's own close may never reach the proxy (a dead link; a reset the event loop did not
    # report): the terminal, told FATAL, must not wait for it, nor the pool lend the connection on.
    closed: list[object] = []
    transport = Transport()
    server, peer = _lent_connection_after_a_query(
        transaction_pooling=transaction_pooling, transport=transport, closed=closed
    )
    fatal = m.build_error_response("FATAL", "57P01", "terminating connection due to administrator command")
    server.data_received(m.build_message(b"T", b"\x00\x00") + fatal)
    assert peer.data.endswith(fatal)
    assert server.closed and transport.closed
    assert closed == [server]  # the pool forgets it
    assert transport.written[-1] == m.build_terminate()


def test_a_fatal_to_an_idle_connection_in_the_pool_keeps_it_from_the_next_client() -> None:
    server, _peer = _lent_connection_after_a_query(transaction_pooling=True)
    server.data_received(REPLY)
    server.detach()
    server.data_received(m.build_error_response("FATAL", "57P01", "terminating connection"))
    assert not server.usable


async def test_a_refused_internal_query_raises_the_servers_error() -> None:
    # The error arrives while run_internal awaits; a compiled build once read the attribute as
    # the None it had set before the await (tests/integration: an invalid startup setting hung).
    server, _peer = _lent_connection_after_a_query()
    server.data_received(REPLY)
    server.detach()
    running = asyncio.ensure_future(server.run_internal("SELECT set_config('x', 'y', false)", 1.0))
    await asyncio.sleep(0)
    server.data_received(
        m.build_error_response("ERROR", "22023", 'invalid value for parameter "client_encoding"')
        + m.build_ready_for_query(b"I")
    )
    with pytest.raises(InternalQueryFailed) as raised:
        await running
    assert (raised.value.sqlstate, raised.value.message) == (
        "22023",
        'invalid value for parameter "client_encoding"',
    )
    assert server.usable


def _send(server: ServerConnection, statements: ClientStatements, data: bytes) -> None:
    frames, _ = m.scan_frames(data, MAX)
    server.send(statements.rewrite(data, frames, server.state), frames)


_PARSE_UNNAMED = m.build_message(b"P", b"\x00SELECT 1\x00\x00\x00")
_DESCRIBE_UNNAMED = m.build_message(b"D", b"S\x00")
_BIND_UNNAMED = m.build_message(b"B", b"\x00" * 8)
_FLUSH = m.build_message(b"H", b"")
_SYNC = m.build_message(b"S", b"")


@pytest.mark.parametrize(
    ("sends", "runs_portal"),
    [
        # asyncpg's prepare: statements only.
        ([_PARSE_UNNAMED + _DESCRIBE_UNNAMED + _FLUSH], False),
        # Its Bind in a later send still belongs to the same open cycle.
        ([_PARSE_UNNAMED + _FLUSH, _BIND_UNNAMED + _FLUSH], True),
        # A Bind before the last Sync is of a cycle already ended.
        ([_PARSE_UNNAMED + _BIND_UNNAMED + _SYNC + _PARSE_UNNAMED + _FLUSH], False),
        ([_PARSE_UNNAMED + _BIND_UNNAMED + _FLUSH, _SYNC + _PARSE_UNNAMED + _FLUSH], False),
        ([_PARSE_UNNAMED + _FLUSH, m.build_message(b"E", b"\x00" * 5) + _FLUSH], True),
    ],
    ids=["prepare", "bind-later", "bind-before-sync", "bind-before-sync-apart", "execute-later"],
)
def test_an_open_cycle_is_known_to_run_a_portal_or_not(sends: list[bytes], runs_portal: bool) -> None:
    """Whether the cycle left open bound or executed a portal: then only the client's Sync may end it."""
    server, _peer = _lent_connection_after_a_query()
    server.data_received(REPLY)
    statements = ClientStatements(StatementStats())
    for data in sends:
        _send(server, statements, data)
    assert server.unsynced
    assert server.cycle_runs_portal is runs_portal


@pytest.mark.parametrize("transaction_pooling", [True, False])
def test_the_proxys_own_sync_ends_a_statements_only_cycle_unseen(transaction_pooling: bool) -> None:
    """The proxy's Sync after an answered Parse and Describe: its ReadyForQuery reaches the client
    as nothing at all, and the connection is idle (lent back under transaction pooling)."""
    server, peer = _lent_connection_after_a_query(transaction_pooling=transaction_pooling)
    server.data_received(REPLY)
    server.attach(peer)
    peer.events.clear()
    peer.data = b""
    statements = ClientStatements(StatementStats())
    _send(server, statements, _PARSE_UNNAMED + _DESCRIBE_UNNAMED + _FLUSH)
    answers = m.build_message(b"1", b"") + m.build_message(b"t", b"\x00\x00") + m.build_message(b"n", b"")
    server.data_received(answers)
    assert peer.data == answers
    assert server.unsynced and not server.state.pending
    sync = sync_quietly(server.state)
    server.send(sync, [(ord("S"), 0, len(sync))])
    assert not server.unsynced
    server.data_received(m.build_ready_for_query(b"I"))
    assert peer.data == answers  # nothing more
    assert peer.events == ["ready", "idle"]
    assert server.is_clean
    assert server.state.unnamed is statements.unnamed is not None  # outlives the Sync (55.2.3)
