"""Cancel through the proxy, with real drivers, in both pool modes: a cancel stops the statement it
was sent for and nothing else, also one still waiting for a server connection, and it never leaves
a server connection tied to its client. And the BackendKeyData that names it: in session mode the
server backend's own pid with a secret key of the proxy's, in transaction mode a pid of the proxy's."""

from __future__ import annotations

import asyncio
import contextlib
import random
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import asyncpg
import psycopg
import pytest

from proxy.protocols.postgres import messages as m
from tests.integration.proxyproc import ProxyProcess, Terminal, TerminalPKI
from tests.integration.test_postgres_robustness import (
    RawClient,
    assert_startup_succeeded,
    data_row_values,
    expect_dropped,
    run_query,
    tcp_connect,
    tls_client,
)

StartProxy = Callable[..., ProxyProcess]

# Each round races a cancel against the end of a short statement: rounds bounded in count and time.
_RACE_ROUNDS = 200
_RACE_BUDGET_S = 40.0


def _proxy(start_proxy: StartProxy, mode: str, size: int, **overrides: Any) -> ProxyProcess:
    return start_proxy(routes={"pos": {"pool": {"mode": mode, "size": size}}}, **overrides)


def _psycopg(proxy: ProxyProcess, pki: TerminalPKI, terminal: Terminal | None = None) -> psycopg.Connection:
    return psycopg.connect(**proxy.conninfo(terminal or pki.cashier, pki.ca), autocommit=True)


async def _asyncpg(
    proxy: ProxyProcess, pki: TerminalPKI, terminal: Terminal | None = None
) -> asyncpg.Connection:
    return await proxy.asyncpg_connect(terminal or pki.cashier, pki.ca)


def _next_statements_cancelled(
    connection: psycopg.Connection, cancel: Callable[[], None]
) -> tuple[int, int, int]:
    """Rounds of: start a short statement, cancel it from another thread at a random moment before or
    after its end, and once the cancel call has returned (libpq's cancel waits until the server has acted on
    it) run the next statement at once. Returns (rounds, statements cancelled, next statements
    cancelled): as against PostgreSQL itself, the last must be 0."""
    rounds = cancelled = next_cancelled = 0
    deadline = time.monotonic() + _RACE_BUDGET_S
    randomness = random.Random(16)
    while rounds < _RACE_ROUNDS and time.monotonic() < deadline:
        rounds += 1
        # Statements of many lengths: a cancel takes longer to arrive on a loaded machine (a whole
        # TLS handshake for libpq 17's), and must still land on some and come too late for others.
        canceller = threading.Timer(randomness.uniform(0.0, 0.02), cancel)
        canceller.start()
        try:
            connection.execute("SELECT pg_sleep(%s)", (round(randomness.uniform(0.002, 0.06), 3),))
        except psycopg.errors.QueryCanceled:
            cancelled += 1
        canceller.join()
        try:
            # Long enough for a late cancel to find it running.
            connection.execute("SELECT 'next' FROM pg_sleep(0.02)")
        except psycopg.errors.QueryCanceled:
            next_cancelled += 1
    return rounds, cancelled, next_cancelled


@pytest.mark.parametrize("mode", ["direct", "session", "transaction"])
@pytest.mark.parametrize("cancel_over", ["plaintext", "tls"])
def test_a_cancel_never_reaches_the_next_statement(
    start_proxy: StartProxy, terminal_pki: TerminalPKI, pg_cluster: Any, mode: str, cancel_over: str
) -> None:
    if mode == "direct":
        # The yardstick: the same rounds against PostgreSQL itself.
        connect = lambda: psycopg.connect(**pg_cluster.connect_kwargs(), autocommit=True)  # noqa: E731
    else:
        proxy = _proxy(start_proxy, mode, size=2)
        connect = lambda: _psycopg(proxy, terminal_pki)  # noqa: E731
    with connect() as connection:
        # libpq's PQcancel sends its CancelRequest in plaintext; the cancel API of libpq 17
        # (psycopg's cancel_safe) encrypts it as the connection is.
        cancel = connection.cancel if cancel_over == "plaintext" else connection.cancel_safe
        rounds, cancelled, next_cancelled = _next_statements_cancelled(connection, cancel)
    print(f"{mode}/{cancel_over}: {rounds} rounds, {cancelled} cancelled, {next_cancelled} next cancelled")
    assert cancelled > 0, "no round cancelled its statement: the race was not run"
    assert next_cancelled == 0, f"{next_cancelled} of {rounds} next statements were cancelled"


@pytest.fixture
def cancel_probe(pg_cluster: Any) -> str:
    """A table that a statement cancelled before it ran must leave empty."""
    with psycopg.connect(
        **pg_cluster.connect_kwargs(user="postgres", dbname="pos"), autocommit=True
    ) as admin:
        admin.execute("DROP TABLE IF EXISTS public.cancel_probe")
        admin.execute("CREATE TABLE public.cancel_probe (note text)")
        admin.execute("ALTER TABLE public.cancel_probe OWNER TO pos_proxy")
    return "public.cancel_probe"


@pytest.mark.parametrize("cancel_over", ["plaintext", "tls"])
def test_a_cancel_stops_a_statement_still_waiting_for_a_server_connection(
    start_proxy: StartProxy, terminal_pki: TerminalPKI, cancel_probe: str, cancel_over: str
) -> None:
    proxy = _proxy(start_proxy, "transaction", size=1)
    with (
        _psycopg(proxy, terminal_pki, terminal_pki.manager) as holder,
        _psycopg(proxy, terminal_pki) as waiter,
    ):
        holder.execute("BEGIN")
        holder.execute("SELECT 1")  # holds the only server connection
        failures: list[BaseException] = []

        def insert() -> None:
            try:
                waiter.execute(f"INSERT INTO {cancel_probe} VALUES (%s)", ("cancelled while queued",))
            except psycopg.Error as exc:
                failures.append(exc)

        queued = threading.Thread(target=insert)
        queued.start()
        time.sleep(0.5)  # the INSERT is in the pool's line behind the holder's transaction
        (waiter.cancel if cancel_over == "plaintext" else waiter.cancel_safe)()
        queued.join(5)
        assert not queued.is_alive(), "the cancel did not end the waiting statement"
        assert len(failures) == 1 and isinstance(failures[0], psycopg.errors.QueryCanceled), failures
        assert failures[0].diag.message_primary == "canceling statement due to user request"
        holder.execute("COMMIT")  # the server connection is free: the INSERT must not run now
        time.sleep(0.3)
        assert waiter.execute(f"SELECT count(*) FROM {cancel_probe}").fetchone() == (0,)
        assert holder.execute("SELECT 'holder goes on'").fetchone() == ("holder goes on",)
    proxy.wait_for_event("cancel_answered", terminal="till-01", reason="waiting statement")


async def test_an_asyncpg_timeout_in_the_pool_line_cancels_the_statement(
    start_proxy: StartProxy, terminal_pki: TerminalPKI, cancel_probe: str
) -> None:
    proxy = _proxy(start_proxy, "transaction", size=1)
    holder = await _asyncpg(proxy, terminal_pki, terminal_pki.manager)
    waiter = await _asyncpg(proxy, terminal_pki)
    try:
        transaction = holder.transaction()
        await transaction.start()  # holds the only server connection
        with pytest.raises(asyncio.TimeoutError):
            # A simple Query; asyncpg cancels it when the timeout expires.
            await waiter.execute(f"INSERT INTO {cancel_probe} VALUES ('timed out while queued')", timeout=0.5)
        # asyncpg raises at once and sends its cancel after: the holder lets go once it is in.
        await asyncio.to_thread(proxy.wait_for_event, "cancel_answered", terminal="till-01")
        await transaction.commit()
        await asyncio.sleep(0.3)
        assert await waiter.fetchval(f"SELECT count(*) FROM {cancel_probe}") == 0
    finally:
        await holder.close()
        await waiter.close()


async def test_clients_that_timed_out_a_query_leave_the_pool_to_others(
    start_proxy: StartProxy, terminal_pki: TerminalPKI
) -> None:
    # Before: 20 clients that each timed out one query held all 20 server connections for good, and a
    # 21st client got FATAL 53300 after max_client_wait. The same with a pool of 3.
    size = 3
    proxy = _proxy(
        start_proxy,
        "transaction",
        size=size,
        roles={"cashier": {"limits": {"max_server_connections_per_terminal": size}}},
    )
    clients = [await _asyncpg(proxy, terminal_pki) for _ in range(size)]
    newcomer = await _asyncpg(proxy, terminal_pki, terminal_pki.manager)
    try:

        async def time_out(client: asyncpg.Connection) -> None:
            with pytest.raises(asyncio.TimeoutError):
                await client.execute("SELECT pg_sleep(30)", timeout=0.5)

        await asyncio.gather(*(time_out(client) for client in clients))
        # Within the pool's max_client_wait (5 s here), which fails it with 53300 otherwise.
        assert await newcomer.fetchval("SELECT 'served'", timeout=10) == "served"
        for client in clients:
            assert await client.fetchval("SELECT 'still usable'", timeout=10) == "still usable"
    finally:
        for client in [*clients, newcomer]:
            await client.close()


def test_a_result_cut_by_the_guard_leaves_the_server_connection_to_others(
    start_proxy: StartProxy, terminal_pki: TerminalPKI
) -> None:
    proxy = start_proxy(
        routes={"pos": {"pool": {"mode": "transaction", "size": 1}}},
        roles={"cashier": {"limits": {"max_rows_per_statement": 100}}},
    )
    with _psycopg(proxy, terminal_pki) as cut, _psycopg(proxy, terminal_pki, terminal_pki.manager) as other:
        with pytest.raises(psycopg.errors.ConfigurationLimitExceeded):
            # A slow, endless producer: the proxy's cancel ends it on the server.
            cut.execute("SELECT g, pg_sleep(0.001) FROM generate_series(1, 1000000) AS g").fetchall()
        proxy.wait_for_event("cancel_forwarded", from_source="result-size guard")
        # The only server connection went back to the pool once the cancelled statement ended.
        assert other.execute("SELECT 'served'").fetchone() == ("served",)
        assert cut.execute("SELECT 'still usable'").fetchone() == ("still usable",)


# --- BackendKeyData ---


@pytest.mark.parametrize("mode", ["session", "transaction"])
async def test_the_driver_pid_is_the_backends_own_in_session_mode_only(
    start_proxy: StartProxy, terminal_pki: TerminalPKI, mode: str
) -> None:
    proxy = _proxy(start_proxy, mode, size=2)
    connection = await _asyncpg(proxy, terminal_pki)
    try:
        pid = connection.get_server_pid()
        backend = await connection.fetchval("SELECT pg_backend_pid()")
        backends_with_that_pid = await connection.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE pid = $1", pid
        )
    finally:
        await connection.close()
    if mode == "session":
        assert (pid, backends_with_that_pid) == (backend, 1)
    else:
        # The backend changes between transactions: the driver's pid names no server backend.
        assert pid != backend and backends_with_that_pid == 0


def test_terminating_the_driver_pid_ends_the_session_in_session_mode(
    start_proxy: StartProxy, terminal_pki: TerminalPKI
) -> None:
    """psycopg's own test_right_exception_on_server_disconnect, through the proxy."""
    proxy = _proxy(start_proxy, "session", size=2)
    with _psycopg(proxy, terminal_pki) as connection:
        with pytest.raises(psycopg.errors.AdminShutdown):
            connection.execute("SELECT pg_terminate_backend(%s)", [connection.pgconn.backend_pid])
        assert connection.broken
    with _psycopg(proxy, terminal_pki) as after:
        assert after.execute("SELECT 'served'").fetchone() == ("served",)


def test_terminating_the_driver_pid_ends_nothing_in_transaction_mode(
    start_proxy: StartProxy, terminal_pki: TerminalPKI
) -> None:
    proxy = _proxy(start_proxy, "transaction", size=2)
    with _psycopg(proxy, terminal_pki) as connection:
        ended = connection.execute(
            "SELECT pg_terminate_backend(%s)", [connection.pgconn.backend_pid]
        ).fetchone()
        assert ended == (False,)  # WARNING: not a PostgreSQL backend process
        assert connection.execute("SELECT 'still served'").fetchone() == ("still served",)


@pytest.mark.parametrize("mode", ["session", "transaction"])
async def test_a_driver_cancel_stops_the_statement_with_the_pid_it_was_given(
    start_proxy: StartProxy, terminal_pki: TerminalPKI, mode: str
) -> None:
    proxy = _proxy(start_proxy, mode, size=2)
    connection = await _asyncpg(proxy, terminal_pki)
    try:
        started = time.monotonic()
        with pytest.raises(asyncio.TimeoutError):
            await connection.execute("SELECT pg_sleep(30)", timeout=0.5)
        # asyncpg's timeout cancels the statement; the next one runs once the server stopped it.
        assert await connection.fetchval("SELECT 'next'", timeout=10) == "next"
        assert time.monotonic() - started < 10
    finally:
        await connection.close()
    proxy.wait_for_event("cancel_forwarded", terminal="till-01")


@contextlib.contextmanager
def raw_client(proxy: ProxyProcess, pki: TerminalPKI) -> Iterator[tuple[RawClient, tuple[int, int]]]:
    """A hand-driven client after its startup, with the BackendKeyData it was given."""
    client = tls_client(proxy, pki, pki.cashier)
    try:
        startup = client.startup(pki.cashier.terminal)
        assert_startup_succeeded(startup)
        (key,) = [m.parse_backend_key_data(payload) for kind, payload in startup if kind == b"K"]
        yield client, key
    finally:
        client.close()


def send_cancel(proxy: ProxyProcess, process_id: int, secret_key: int, source: str | None = None) -> None:
    """A plaintext CancelRequest, as libpq's PQcancel sends it; the proxy closes once it acted on it."""
    with tcp_connect(proxy, source) as sock:
        sock.sendall(m.build_cancel_request(process_id, secret_key))
        expect_dropped(sock, 10)


def sleep_outcome(
    client: RawClient, proxy: ProxyProcess, key: tuple[int, int], source: str | None = None
) -> str | None:
    """Run pg_sleep(1.5), send a cancel with ``key`` while it runs: the SQLSTATE it ended with."""
    client.send(m.build_query("SELECT pg_sleep(1.5)"))
    time.sleep(0.3)
    send_cancel(proxy, *key, source)
    received = client.read_until_ready()
    assert received[-1] == (b"Z", b"I"), received
    errors = [m.parse_error_fields(payload).get("C") for kind, payload in received if kind == b"E"]
    return errors[0] if errors else None


def _backend_pid(client: RawClient) -> int:
    rows = [payload for kind, payload in run_query(client, "SELECT pg_backend_pid()") if kind == b"D"]
    return int(data_row_values(rows[0])[0] or b"0")


@pytest.mark.parametrize("mode", ["session", "transaction"])
def test_a_cancel_with_the_right_pid_and_a_wrong_key_does_nothing(
    start_proxy: StartProxy, terminal_pki: TerminalPKI, mode: str
) -> None:
    proxy = _proxy(start_proxy, mode, size=2)
    with raw_client(proxy, terminal_pki) as (client, (pid, key)):
        assert (_backend_pid(client) == pid) is (mode == "session")
        assert sleep_outcome(client, proxy, (pid, key ^ 0x5A5A)) is None
        assert sleep_outcome(client, proxy, (pid, key)) == "57014"
    proxy.wait_for_event("cancel_ignored", reason="unknown backend key")


def test_a_reused_backend_pid_takes_a_new_key_and_the_old_one_cancels_nothing(
    start_proxy: StartProxy, terminal_pki: TerminalPKI
) -> None:
    """Session mode: the next session on the same server connection is given the same pid; the
    key of the session that ended there must not reach the new one's statement."""
    proxy = _proxy(start_proxy, "session", size=1)
    with raw_client(proxy, terminal_pki) as (_first, earlier):
        pass
    with raw_client(proxy, terminal_pki) as (client, (pid, key)):
        assert pid == earlier[0] and key != earlier[1]
        assert sleep_outcome(client, proxy, earlier) is None
        assert sleep_outcome(client, proxy, (pid, key)) == "57014"
