"""Transaction pooling with real drivers: prepared statements, settings, pinning, cancel, hygiene."""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import asyncpg
import psycopg
import pytest

from proxy.localpg import find_pg_bindir
from proxy.protocols.postgres import messages as m
from tests.integration.proxyproc import ProxyProcess, Terminal, TerminalPKI
from tests.integration.test_postgres_robustness import data_row_values, raw_session

StartProxy = Callable[..., ProxyProcess]


def _transaction_proxy(start_proxy: StartProxy, size: int = 3, **pool: Any) -> ProxyProcess:
    return start_proxy(routes={"pos": {"pool": {"mode": "transaction", "size": size, **pool}}})


def _superuser(cluster: Any) -> psycopg.Connection:
    return psycopg.connect(**cluster.connect_kwargs(user="postgres", dbname="pos"), autocommit=True)


def _server_now(cluster: Any) -> Any:
    with _superuser(cluster) as admin:
        row = admin.execute("SELECT clock_timestamp()").fetchone()
    assert row is not None
    return row[0]


def _server_connections(cluster: Any, since: Any) -> int:
    """Server connections opened since ``since``: other tests' proxies may still hold theirs."""
    with _superuser(cluster) as admin:
        row = admin.execute(
            "SELECT count(*) FROM pg_stat_activity "
            "WHERE usename = 'pos_proxy' AND backend_type = 'client backend' AND backend_start >= %s",
            (since,),
        ).fetchone()
    assert row is not None
    return int(row[0])


async def _asyncpg(
    proxy: ProxyProcess, pki: TerminalPKI, terminal: Terminal | None = None
) -> asyncpg.Connection:
    return await proxy.asyncpg_connect(terminal or pki.cashier, pki.ca)


@pytest.fixture(scope="module")
def ledger(pg_cluster: Any) -> str:
    with _superuser(pg_cluster) as admin:
        admin.execute("DROP TABLE IF EXISTS public.ledger")
        admin.execute(
            "CREATE TABLE public.ledger (client int, seq int, amount int, PRIMARY KEY (client, seq))"
        )
        admin.execute("ALTER TABLE public.ledger OWNER TO pos_proxy")
    return "public.ledger"


async def test_fifty_asyncpg_clients_share_three_server_connections(
    start_proxy: StartProxy, terminal_pki: TerminalPKI, pg_cluster: Any, ledger: str
) -> None:
    since = _server_now(pg_cluster)
    proxy = _transaction_proxy(start_proxy, size=3, max_client_wait="30s")

    async def till(client: int) -> None:
        connection = await _asyncpg(proxy, terminal_pki)
        try:
            for seq in range(5):
                async with connection.transaction():
                    await connection.execute(
                        f"INSERT INTO {ledger} (client, seq, amount) VALUES ($1, $2, $3)",
                        client,
                        seq,
                        client * 100 + seq,
                    )
                total = await connection.fetchval(
                    f"SELECT sum(amount) FROM {ledger} WHERE client = $1", client
                )
                assert total == sum(client * 100 + s for s in range(seq + 1))
            rows = await connection.fetch(
                f"SELECT seq, amount FROM {ledger} WHERE client = $1 ORDER BY seq", client
            )
            assert [(row["seq"], row["amount"]) for row in rows] == [(s, client * 100 + s) for s in range(5)]
        finally:
            await connection.close()

    await asyncio.wait_for(asyncio.gather(*(till(client) for client in range(1000, 1050))), 120)
    assert _server_connections(pg_cluster, since) <= 3


async def test_fifty_psycopg_clients_with_server_side_prepares(
    start_proxy: StartProxy, terminal_pki: TerminalPKI, ledger: str
) -> None:
    proxy = _transaction_proxy(start_proxy, size=3, max_client_wait="30s")

    async def till(client: int) -> None:
        async with await psycopg.AsyncConnection.connect(
            **proxy.conninfo(terminal_pki.cashier, terminal_pki.ca), prepare_threshold=0, autocommit=True
        ) as connection:
            for seq in range(4):
                async with connection.transaction():
                    await connection.execute(
                        f"INSERT INTO {ledger} (client, seq, amount) VALUES (%s, %s, %s)",
                        (client, seq, seq + 1),
                    )
                cursor = await connection.execute(
                    f"SELECT count(*), sum(amount) FROM {ledger} WHERE client = %s", (client,)
                )
                assert await cursor.fetchone() == (seq + 1, sum(range(1, seq + 2)))

    await asyncio.wait_for(asyncio.gather(*(till(client) for client in range(2000, 2050))), 120)
    stats = [record for record in proxy.log_events() if record.get("event") == "session_pinned"]
    assert stats == []


def test_startup_needs_no_server_connection(
    start_proxy: StartProxy, terminal_pki: TerminalPKI, pg_cluster: Any
) -> None:
    since = _server_now(pg_cluster)
    proxy = _transaction_proxy(start_proxy, size=2)
    with psycopg.connect(**proxy.conninfo(terminal_pki.cashier, terminal_pki.ca), autocommit=True) as first:
        first.execute("SELECT 1")
    connections = [
        psycopg.connect(**proxy.conninfo(terminal_pki.cashier, terminal_pki.ca), autocommit=True)
        for _ in range(20)
    ]
    try:
        assert _server_connections(pg_cluster, since) <= 2
        for connection in connections:
            assert connection.info.parameter_status(
                "server_version",
            ).startswith("15")
            assert connection.info.parameter_status("client_encoding") == "UTF8"
        assert [c.execute("SELECT 7").fetchone() for c in connections] == [(7,)] * 20
    finally:
        for connection in connections:
            connection.close()


def test_each_client_keeps_its_time_zone_across_server_switches(
    start_proxy: StartProxy, terminal_pki: TerminalPKI
) -> None:
    proxy = _transaction_proxy(start_proxy, size=2)
    zones = ["America/New_York", "Asia/Tokyo", "Europe/Berlin", "UTC", "Australia/Sydney"]
    connections = [
        psycopg.connect(**proxy.conninfo(terminal_pki.cashier, terminal_pki.ca), autocommit=True)
        for _ in zones
    ]
    try:
        for connection, zone in zip(connections, zones, strict=True):
            connection.execute(f"SET TIME ZONE '{zone}'")
        pids: set[int] = set()
        for _round in range(5):
            for connection, zone in zip(connections, zones, strict=True):
                row = connection.execute("SELECT current_setting('TimeZone'), pg_backend_pid()").fetchone()
                assert row is not None
                assert row[0] == zone
                pids.add(row[1])
        assert len(pids) <= 2  # five clients really did share two server connections
    finally:
        for connection in connections:
            connection.close()


def test_session_state_pins_the_client_by_default(start_proxy: StartProxy, terminal_pki: TerminalPKI) -> None:
    proxy = _transaction_proxy(start_proxy, size=2)
    with psycopg.connect(**proxy.conninfo(terminal_pki.cashier, terminal_pki.ca), autocommit=True) as pinned:
        # A setting the proxy does not carry (search_path, work_mem and the other startup settings it
        # carries: tests/integration/test_driver_settings.py).
        pinned.execute("SET enable_seqscan = off")
        first = pinned.execute("SELECT pg_backend_pid()").fetchone()
        with psycopg.connect(
            **proxy.conninfo(terminal_pki.manager, terminal_pki.ca), autocommit=True
        ) as other:
            for _ in range(5):
                assert other.execute("SELECT pg_backend_pid()").fetchone() != first
        assert pinned.execute("SELECT pg_backend_pid()").fetchone() == first
        assert pinned.execute("SHOW enable_seqscan").fetchone() == ("off",)
    pinned_event = proxy.wait_for_event("session_pinned")
    assert pinned_event["reason"] == "SET enable_seqscan"


def test_session_state_can_be_refused_and_the_session_goes_on(
    start_proxy: StartProxy, terminal_pki: TerminalPKI
) -> None:
    proxy = _transaction_proxy(start_proxy, size=2, session_state="refuse")
    with psycopg.connect(
        **proxy.conninfo(terminal_pki.cashier, terminal_pki.ca), autocommit=True
    ) as connection:
        with pytest.raises(psycopg.errors.FeatureNotSupported) as raised:
            connection.execute("SET enable_seqscan = off")
        assert "SET enable_seqscan is not supported under transaction pooling" in str(raised.value)
        assert connection.execute("SELECT 'usable'").fetchone() == ("usable",)
        connection.execute("BEGIN")
        with pytest.raises(psycopg.errors.FeatureNotSupported):
            connection.execute("SELECT pg_advisory_lock(42)")
        with pytest.raises(psycopg.errors.InFailedSqlTransaction):
            connection.execute("SELECT 1")
        connection.execute("ROLLBACK")
        assert connection.execute(
            "SELECT pg_advisory_xact_lock(42), 'transaction locks are fine'"
        ).fetchone() == (
            "",
            "transaction locks are fine",
        )
    with psycopg.connect(
        **proxy.conninfo(terminal_pki.cashier, terminal_pki.ca), prepare_threshold=0
    ) as extended:
        with pytest.raises(psycopg.errors.FeatureNotSupported):
            extended.execute("SELECT set_config('enable_seqscan', %s, false)", ("off",))
        extended.rollback()
        assert extended.execute("SELECT %s::int + 1", (41,)).fetchone() == (42,)


async def test_cancel_reaches_only_the_client_that_asked(
    start_proxy: StartProxy, terminal_pki: TerminalPKI
) -> None:
    proxy = _transaction_proxy(start_proxy, size=2)
    sleeper = await _asyncpg(proxy, terminal_pki)
    bystander = await _asyncpg(proxy, terminal_pki, terminal_pki.manager)
    try:
        slow = asyncio.ensure_future(bystander.fetchval("SELECT 'slept' FROM pg_sleep(1.5)"))
        await asyncio.sleep(0.2)
        with pytest.raises(asyncio.TimeoutError):
            await sleeper.execute("SELECT pg_sleep(30)", timeout=0.5)
        assert await slow == "slept"  # the other client's query was not cancelled
        assert await sleeper.fetchval("SELECT 'after cancel'") == "after cancel"
    finally:
        await sleeper.close()
        await bystander.close()


def test_cancel_for_a_client_between_transactions_does_nothing(
    start_proxy: StartProxy, terminal_pki: TerminalPKI
) -> None:
    proxy = _transaction_proxy(start_proxy, size=1)
    idle = psycopg.connect(**proxy.conninfo(terminal_pki.cashier, terminal_pki.ca), autocommit=True)
    busy = psycopg.connect(**proxy.conninfo(terminal_pki.manager, terminal_pki.ca), autocommit=True)
    try:
        idle.execute("SELECT 1")
        busy.execute("BEGIN")
        busy.execute("SELECT 1")  # holds the only server connection
        idle.cancel()
        proxy.wait_for_event("cancel_ignored", reason="no server connection")
        assert busy.execute("SELECT 'slept' FROM pg_sleep(0.3)").fetchone() == ("slept",)
        busy.execute("COMMIT")
        assert idle.execute("SELECT 'idle is fine'").fetchone() == ("idle is fine",)
    finally:
        idle.close()
        busy.close()


def test_messages_sent_in_pieces_while_waiting_reach_the_server_whole(
    start_proxy: StartProxy, terminal_pki: TerminalPKI
) -> None:
    """A client in line for the only server connection keeps writing: a Parse and half a Bind,
    then the rest of the Bind with Execute and Sync. When the connection is handed over, the
    waiting messages go out as one cycle and the answers come back in order."""
    proxy = _transaction_proxy(start_proxy, size=1)
    parse = m.build_message(b"P", b"\x00SELECT 41 + 1\x00\x00\x00")
    bind = m.build_message(b"B", b"\x00\x00\x00\x00\x00\x00\x00\x00")
    execute_sync = m.build_message(b"E", b"\x00\x00\x00\x00\x00") + m.build_message(b"S", b"")
    with psycopg.connect(**proxy.conninfo(terminal_pki.cashier, terminal_pki.ca)) as holder:
        holder.execute("SELECT 1")  # inside a transaction: the only server connection stays taken
        with raw_session(proxy, terminal_pki, terminal_pki.cashier) as waiting:
            waiting.send(parse + bind[:7])
            time.sleep(0.2)
            waiting.send(bind[7:] + execute_sync)
            time.sleep(0.2)
            holder.commit()
            received = waiting.read_until_ready()
    assert [kind for kind, _ in received] == [b"1", b"2", b"D", b"C", b"Z"], received
    assert data_row_values(received[2][1]) == [b"42"]
    assert received[-1] == (b"Z", b"I")


async def test_vanishing_mid_transaction_leaves_no_lock_behind(
    start_proxy: StartProxy, terminal_pki: TerminalPKI, pg_cluster: Any
) -> None:
    proxy = _transaction_proxy(start_proxy, size=2)
    with _superuser(pg_cluster) as admin:
        admin.execute("CREATE TABLE IF NOT EXISTS public.vanish_tx (id int PRIMARY KEY)")
        admin.execute("ALTER TABLE public.vanish_tx OWNER TO pos_proxy")
        admin.execute("INSERT INTO public.vanish_tx VALUES (1) ON CONFLICT DO NOTHING")
    connection = await _asyncpg(proxy, terminal_pki)
    transaction = connection.transaction()
    await transaction.start()
    await connection.execute("SELECT id FROM public.vanish_tx WHERE id = 1 FOR UPDATE")
    connection.terminate()
    await asyncio.sleep(0.1)
    deadline = time.monotonic() + 10
    open_transactions: tuple[int, ...] | None = None
    while time.monotonic() < deadline:
        with _superuser(pg_cluster) as admin:
            open_transactions = admin.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE usename = 'pos_proxy' AND xact_start IS NOT NULL"
            ).fetchone()
        if open_transactions == (0,):
            break
        await asyncio.sleep(0.1)
    assert open_transactions == (0,)
    other = await _asyncpg(proxy, terminal_pki)
    try:
        await other.execute("SET LOCAL lock_timeout = '2s'")
        async with other.transaction():
            assert await other.fetchval("SELECT id FROM public.vanish_tx WHERE id = 1 FOR UPDATE") == 1
    finally:
        await other.close()


def test_reprepared_statement_errors_reach_the_client_as_the_original(
    start_proxy: StartProxy, terminal_pki: TerminalPKI, pg_cluster: Any
) -> None:
    proxy = _transaction_proxy(start_proxy, size=2)
    with _superuser(pg_cluster) as admin:
        admin.execute("DROP TABLE IF EXISTS public.drift")
        admin.execute("CREATE TABLE public.drift (id int, note text)")
        admin.execute("ALTER TABLE public.drift OWNER TO pos_proxy")
    with psycopg.connect(
        **proxy.conninfo(terminal_pki.cashier, terminal_pki.ca), prepare_threshold=0, autocommit=True
    ) as connection:
        assert connection.execute("SELECT note FROM public.drift WHERE id = %s", (1,)).fetchall() == []
        with _superuser(pg_cluster) as admin:
            admin.execute("ALTER TABLE public.drift DROP COLUMN note")
        with pytest.raises(psycopg.errors.UndefinedColumn):
            # Whether re-prepared on another server connection or re-planned on the same one,
            # the client sees the server's own error for its statement.
            for _ in range(4):
                connection.execute("SELECT note FROM public.drift WHERE id = %s", (1,)).fetchall()
        assert connection.execute("SELECT 'still usable'").fetchone() == ("still usable",)


def test_sql_level_discard_all_does_not_break_prepared_statements(
    start_proxy: StartProxy, terminal_pki: TerminalPKI
) -> None:
    proxy = _transaction_proxy(start_proxy, size=1)
    with psycopg.connect(
        **proxy.conninfo(terminal_pki.cashier, terminal_pki.ca), prepare_threshold=0, autocommit=True
    ) as connection:
        assert connection.execute("SELECT %s::int * 3", (3,)).fetchone() == (9,)
        connection.execute("DISCARD ALL")
        assert connection.execute("SELECT %s::int * 3", (4,)).fetchone() == (12,)


def _pgbench(
    bindir: Path, proxy: ProxyProcess, pki: TerminalPKI, *args: str
) -> subprocess.CompletedProcess[str]:
    environment = {
        **os.environ,
        "PGHOST": "127.0.0.1",
        "PGPORT": str(proxy.port),
        "PGDATABASE": "pos",
        "PGUSER": pki.cashier.terminal,
        "PGSSLMODE": "verify-full",
        "PGSSLROOTCERT": str(pki.ca),
        "PGSSLCERT": str(pki.cashier.cert),
        "PGSSLKEY": str(pki.cashier.key),
    }
    return subprocess.run(
        [str(bindir / "pgbench"), *args],
        capture_output=True,
        text=True,
        env=environment,
        timeout=120,
        check=False,
    )


@pytest.mark.parametrize("mode", ["simple", "extended", "prepared"])
def test_pgbench_runs_without_errors(
    start_proxy: StartProxy, terminal_pki: TerminalPKI, pg_cluster: Any, mode: str
) -> None:
    bindir = find_pg_bindir()
    with _superuser(pg_cluster) as admin:
        exists = admin.execute("SELECT to_regclass('public.pgbench_accounts') IS NOT NULL").fetchone()
    proxy = _transaction_proxy(start_proxy, size=3)
    if exists != (True,):
        initialised = _pgbench(bindir, proxy, terminal_pki, "-i", "-s", "1", "-q")
        assert initialised.returncode == 0, initialised.stderr
    # One thread per client: pgbench prepares statements synchronously, and a thread blocked on
    # one client's prepare while another of its clients holds a server inside BEGIN would wait
    # on itself with any transaction pooler whose pool is smaller than the client count.
    result = _pgbench(bindir, proxy, terminal_pki, "-n", "-c", "8", "-j", "8", "-t", "60", "-M", mode)
    assert result.returncode == 0, result.stderr
    processed = re.search(r"number of transactions actually processed: (\d+)", result.stdout)
    assert processed is not None and int(processed.group(1)) == 8 * 60, result.stdout
    failed = re.search(r"number of failed transactions: (\d+)", result.stdout)
    assert failed is None or failed.group(1) == "0", result.stdout
