"""One terminal cannot take the pool from the rest of its store.

A cashier certificate is enough to open many connections; each attack here tries to use them to
hold every server connection of a small pool (the demo's: transaction pooling, 5 connections), and
asserts that the manager's ``SELECT 1`` still answers at once. The roles have no policy, so the
attacker may run anything the server allows.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import asyncpg
import psycopg
import pytest
import yaml

from proxy import certs
from tests.integration.proxyproc import ProxyProcess, Terminal, TerminalPKI

StartProxy = Callable[..., ProxyProcess]

# As proxy/data/demo-config.yaml.
_DEMO_POOL = {"mode": "transaction", "size": 5, "max_client_wait": "10s"}
# What "at once" means on a shared, loaded test machine; a starved pool answers after max_client_wait.
_AT_ONCE = 2.0


def _demo_like_proxy(start_proxy: StartProxy, **pool: Any) -> ProxyProcess:
    return start_proxy(routes={"pos": {"pool": {**_DEMO_POOL, **pool}}})


async def _connect(proxy: ProxyProcess, pki: TerminalPKI, terminal: Terminal) -> psycopg.AsyncConnection[Any]:
    return await psycopg.AsyncConnection.connect(**proxy.conninfo(terminal, pki.ca), autocommit=True)


@asynccontextmanager
async def _connections(
    proxy: ProxyProcess, pki: TerminalPKI, terminal: Terminal, count: int
) -> AsyncIterator[list[psycopg.AsyncConnection[Any]]]:
    connections = [await _connect(proxy, pki, terminal) for _ in range(count)]
    try:
        yield connections
    finally:
        for connection in connections:
            await connection.close()


async def _manager_select_1_seconds(proxy: ProxyProcess, pki: TerminalPKI) -> float:
    started = time.monotonic()
    async with await _connect(proxy, pki, pki.manager) as manager:
        async with asyncio.timeout(_AT_ONCE * 3):
            cursor = await manager.execute("SELECT 1")
            assert await cursor.fetchone() == (1,)
    return time.monotonic() - started


async def _started(statements: list[asyncio.Task[Any]], done: int) -> list[asyncio.Task[Any]]:
    """Wait until ``done`` of the tasks have finished; return the ones still waiting."""
    deadline = time.monotonic() + 15
    waiting = {task for task in statements if not task.done()}
    while len(statements) - len(waiting) < done and waiting and time.monotonic() < deadline:
        _finished, waiting = await asyncio.wait(
            waiting, timeout=deadline - time.monotonic(), return_when=asyncio.FIRST_COMPLETED
        )
    await asyncio.sleep(0.3)  # and no more than that finish
    for task in statements:
        if task.done():
            task.result()  # raises what the statement raised
    return [task for task in statements if not task.done()]


async def _cancel(tasks: list[asyncio.Task[Any]]) -> None:
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


async def test_a_till_holding_five_session_advisory_locks_leaves_the_manager_a_connection(
    start_proxy: StartProxy, terminal_pki: TerminalPKI
) -> None:
    proxy = _demo_like_proxy(start_proxy)
    async with _connections(proxy, terminal_pki, terminal_pki.cashier, 5) as tills:
        # Each session advisory lock pins its client to its server connection until it disconnects.
        locks = [
            asyncio.ensure_future(till.execute("SELECT pg_advisory_lock(%s)", (4711 + number,)))
            for number, till in enumerate(tills)
        ]
        waiting = await _started(locks, done=2)
        assert len(waiting) == 3, "the default share is half the pool: two pinned connections"
        seconds = await _manager_select_1_seconds(proxy, terminal_pki)
        assert seconds < _AT_ONCE, f"the manager waited {seconds:.2f} s for a server connection"
        # The terminal's pinned sessions carry on.
        pinned = [till for till, lock in zip(tills, locks, strict=True) if lock.done()]
        for till in pinned:
            assert await (await till.execute("SELECT 2")).fetchone() == (2,)
        await _cancel(waiting)
    proxy.wait_for_event("session_pinned")
    proxy.wait_for_event("server_share_wait", terminal="till-01", cap=2)


async def test_a_till_with_five_idle_transactions_leaves_the_manager_a_connection(
    start_proxy: StartProxy, terminal_pki: TerminalPKI
) -> None:
    proxy = _demo_like_proxy(start_proxy)
    async with _connections(proxy, terminal_pki, terminal_pki.cashier, 5) as tills:
        began = [asyncio.ensure_future(till.execute("BEGIN")) for till in tills]
        waiting = await _started(began, done=2)
        assert len(waiting) == 3
        seconds = await _manager_select_1_seconds(proxy, terminal_pki)
        assert seconds < _AT_ONCE, f"the manager waited {seconds:.2f} s for a server connection"
        # A waiting BEGIN goes on as soon as one of the terminal's transactions ends.
        holder = next(till for till, begin in zip(tills, began, strict=True) if begin.done())
        await holder.execute("COMMIT")
        await _started(began, done=3)
        await _cancel([task for task in began if not task.done()])


@pytest.fixture(scope="module")
def second_till(terminal_pki: TerminalPKI) -> Terminal:
    """Another cashier terminal of the same store."""
    issued = certs.issue_terminal(
        terminal_pki.directory, store="store-001", terminal="till-02", role="cashier"
    )
    return Terminal("store-001", "till-02", "cashier", issued.cert_path, issued.key_path, issued.serial_hex)


async def test_another_till_of_the_store_is_not_held_up_by_a_till_at_its_cap(
    start_proxy: StartProxy, terminal_pki: TerminalPKI, second_till: Terminal
) -> None:
    proxy = _demo_like_proxy(start_proxy, size=4)
    async with _connections(proxy, terminal_pki, terminal_pki.cashier, 4) as tills:
        began = [asyncio.ensure_future(till.execute("BEGIN")) for till in tills]
        waiting = await _started(began, done=2)
        assert len(waiting) == 2
        async with _connections(proxy, terminal_pki, second_till, 2) as others:
            started = time.monotonic()
            for other in others:
                await other.execute("BEGIN")  # both of its share, while till-01 waits for more
            assert time.monotonic() - started < _AT_ONCE
        await _cancel(waiting)


async def test_over_its_share_a_terminal_waits_then_gets_53300_and_its_other_sessions_go_on(
    start_proxy: StartProxy, terminal_pki: TerminalPKI
) -> None:
    proxy = start_proxy(
        routes={"pos": {"pool": {**_DEMO_POOL, "max_client_wait": "1500ms"}}},
        roles={"cashier": {"limits": {"max_server_connections_per_terminal": 1}}},
    )
    async with _connections(proxy, terminal_pki, terminal_pki.cashier, 2) as (first, second):
        await first.execute("BEGIN")
        started = time.monotonic()
        with pytest.raises(psycopg.OperationalError) as refused:
            await second.execute("SELECT 1")
        assert 1.0 < time.monotonic() - started < 5.0
        assert refused.value.sqlstate == "53300"
        assert "already holds 1 server connection" in str(refused.value)
        assert await (await first.execute("SELECT 3")).fetchone() == (3,)
        await first.execute("COMMIT")
    hit = proxy.wait_for_event("limit_hit", limit="server connections per terminal")
    assert hit["terminal"] == "till-01"


async def test_an_idle_transaction_is_ended_with_25P03_and_its_locks_and_connection_freed(
    start_proxy: StartProxy, terminal_pki: TerminalPKI, pg_cluster: Any
) -> None:
    proxy = _demo_like_proxy(start_proxy, idle_transaction_timeout="1s")
    table = "starve_idle_transaction"
    async with await _connect(proxy, terminal_pki, terminal_pki.manager) as manager:
        await manager.execute(f"CREATE TABLE IF NOT EXISTS {table} (id int PRIMARY KEY)")
        await manager.execute(f"TRUNCATE {table}")
    async with _connections(proxy, terminal_pki, terminal_pki.cashier, 1) as (till,):
        await till.execute("BEGIN")
        await till.execute(f"INSERT INTO {table} VALUES (1)")
        await till.execute(f"LOCK TABLE {table} IN ACCESS EXCLUSIVE MODE")
        # Keeps the transaction busy, not idle: a statement running longer than the timeout.
        await till.execute("SELECT pg_sleep(1.5)")
        await asyncio.sleep(2.5)
        with pytest.raises(psycopg.Error) as ended:
            await till.execute("SELECT 1")
        assert ended.value.sqlstate == "25P03", ended.value
        assert "idle-in-transaction timeout" in str(ended.value)
    async with await _connect(proxy, terminal_pki, terminal_pki.manager) as manager:
        async with asyncio.timeout(_AT_ONCE * 3):
            # The lock is gone and the insert rolled back: the server connection was closed, not lent.
            await manager.execute(f"BEGIN; LOCK TABLE {table} IN ACCESS EXCLUSIVE MODE NOWAIT; COMMIT")
            assert await (await manager.execute(f"SELECT count(*) FROM {table}")).fetchone() == (0,)
            await manager.execute(f"DROP TABLE {table}")
    proxy.wait_for_event("session_error", sqlstate="25P03")


async def test_a_pinned_idle_in_transaction_session_is_ended_as_well(
    start_proxy: StartProxy, terminal_pki: TerminalPKI
) -> None:
    proxy = _demo_like_proxy(start_proxy, idle_transaction_timeout="1s")
    async with _connections(proxy, terminal_pki, terminal_pki.cashier, 1) as (till,):
        await till.execute("SELECT pg_advisory_lock(99)")  # pins
        await till.execute("BEGIN")
        await asyncio.sleep(2.0)
        with pytest.raises(psycopg.Error) as ended:
            await till.execute("SELECT 1")
        assert ended.value.sqlstate == "25P03"
    async with await _connect(proxy, terminal_pki, terminal_pki.manager) as manager:
        # Closing the pinned server connection released its session lock too.
        cursor = await manager.execute("SELECT pg_try_advisory_lock(99)")
        assert await cursor.fetchone() == (True,)


async def _asyncpg_connect(proxy: ProxyProcess, pki: TerminalPKI, **settings: str) -> asyncpg.Connection:
    return await asyncpg.connect(
        host="127.0.0.1",
        port=proxy.port,
        user="till-01",
        database="pos",
        ssl=proxy.ssl_context(pki.cashier, pki.ca),
        server_settings=settings,
        timeout=15,
    )


async def test_the_role_statement_timeout_applies_and_a_terminal_cannot_raise_it_at_startup(
    start_proxy: StartProxy, terminal_pki: TerminalPKI
) -> None:
    proxy = start_proxy(
        routes={"pos": {"pool": _DEMO_POOL}}, roles={"cashier": {"statement_timeout": "700ms"}}
    )
    for asked, expected in ((None, "700ms"), ("0", "700ms"), ("1h", "700ms"), ("200ms", "200ms")):
        connection = await _asyncpg_connect(
            proxy, terminal_pki, **({"statement_timeout": asked} if asked is not None else {})
        )
        try:
            assert await connection.fetchval("SHOW statement_timeout") == expected, asked
            started = time.monotonic()
            with pytest.raises(asyncpg.QueryCanceledError):
                await connection.fetchval("SELECT pg_sleep(5)")
            assert time.monotonic() - started < 3.0
            assert await connection.fetchval("SELECT 1") == 1  # the session goes on
        finally:
            await connection.close()


@pytest.mark.parametrize(
    "statement",
    [
        "SET LOCAL statement_timeout = '1h'",
        "SET LOCAL statement_timeout = 0",
        "SET LOCAL statement_timeout TO DEFAULT",
        'SET LOCAL "STATEMENT_TIMEOUT" = 5000',
        'SET LOCAL U&"statement\\005ftimeout" = 0',
        "SET statement_timeout = 0",
        "SELECT set_config('statement_timeout', '0', true)",
        "RESET statement_timeout",
        "RESET ALL",
        "DISCARD ALL",
    ],
)
async def test_a_policy_role_cannot_raise_or_reset_its_statement_timeout(
    start_proxy: StartProxy, terminal_pki: TerminalPKI, tmp_path: Path, statement: str
) -> None:
    # Housekeeping allows SET LOCAL statement_timeout and DISCARD ALL to every policy role; this
    # one may also SET and RESET settings in general, so only the ceiling stands in the way.
    policy = tmp_path / "cashier.yaml"
    kinds = ["SELECT", "SET", "RESET", "SHOW", "DISCARD"]
    policy.write_text(yaml.safe_dump({"mode": "enforce", "allow": {"kinds": kinds, "read": []}}))
    proxy = start_proxy(
        routes={"pos": {"pool": _DEMO_POOL}},
        roles={"cashier": {"policy": str(policy), "statement_timeout": "700ms"}},
    )
    async with _connections(proxy, terminal_pki, terminal_pki.cashier, 1) as (till,):
        await till.execute("BEGIN")
        with pytest.raises(psycopg.errors.InsufficientPrivilege) as refused:
            await till.execute(statement)
        # (set_config may meet a refusal of the function itself first, which is as good.)
        assert "statement_timeout may only be lowered for role cashier" in str(refused.value) or (
            "set_config" in statement and "set_config" in str(refused.value)
        )
        await till.execute("ROLLBACK")
        await till.execute("BEGIN")
        await till.execute("SET LOCAL statement_timeout = '300ms'")  # lowering it is fine
        assert await (await till.execute("SHOW statement_timeout")).fetchone() == ("300ms",)
        await till.execute("COMMIT")
        assert await (await till.execute("SHOW statement_timeout")).fetchone() == ("700ms",)
