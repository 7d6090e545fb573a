"""Connection, statement-rate and source-address limits with real concurrent clients."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Callable
from typing import Any

import asyncpg
import psycopg
import pytest

from tests.integration.proxyproc import ProxyProcess, TerminalPKI

StartProxy = Callable[..., ProxyProcess]


async def _connect(proxy: ProxyProcess, pki: TerminalPKI) -> asyncpg.Connection:
    return await asyncpg.connect(
        host="127.0.0.1",
        port=proxy.port,
        user="till-01",
        database="pos",
        ssl=proxy.ssl_context(pki.cashier, pki.ca),
        timeout=15,
    )


async def test_connections_per_terminal_hold_under_concurrency(
    start_proxy: StartProxy, terminal_pki: TerminalPKI
) -> None:
    proxy = start_proxy(roles={"cashier": {"limits": {"connections_per_terminal": 3}}})
    results = await asyncio.gather(
        *(_connect(proxy, terminal_pki) for _ in range(12)), return_exceptions=True
    )
    connected = [result for result in results if isinstance(result, asyncpg.Connection)]
    refused = [result for result in results if isinstance(result, BaseException)]
    try:
        assert len(connected) == 3
        assert len(refused) == 9
        for error in refused:
            assert isinstance(error, asyncpg.TooManyConnectionsError), error
            assert "connections per terminal" in str(error) or "connection limit" in str(error)
    finally:
        await asyncio.gather(*(connection.close() for connection in connected))
    # Closing frees the slots again.
    again = await _connect(proxy, terminal_pki)
    await again.close()
    proxy.wait_for_event("limit_hit", limit="connections per terminal")


def test_statement_rate_refuses_with_53400_and_the_session_goes_on(
    start_proxy: StartProxy, terminal_pki: TerminalPKI
) -> None:
    proxy = start_proxy(roles={"cashier": {"limits": {"statements": {"per_second": 2, "burst": 3}}}})
    with psycopg.connect(
        **proxy.conninfo(terminal_pki.cashier, terminal_pki.ca), autocommit=True
    ) as connection:
        for _ in range(3):
            assert connection.execute("SELECT 1").fetchone() == (1,)
        with pytest.raises(psycopg.errors.ConfigurationLimitExceeded) as raised:
            connection.execute("SELECT 1")
        assert "statement rate limit" in str(raised.value)
        assert "retry in" in str(raised.value)
        time.sleep(0.6)
        assert connection.execute("SELECT 'after waiting'").fetchone() == ("after waiting",)


async def test_statement_rate_counts_executions_of_a_prepared_statement(
    start_proxy: StartProxy, terminal_pki: TerminalPKI
) -> None:
    # asyncpg prepares once and then only binds and executes: each execution is a statement.
    proxy = start_proxy(roles={"cashier": {"limits": {"statements": {"per_second": 2, "burst": 3}}}})
    connection = await _connect(proxy, terminal_pki)
    try:
        statement = await connection.prepare("SELECT 1")
        for _ in range(3):
            await statement.fetchval()
        with pytest.raises(asyncpg.ConfigurationLimitExceededError, match="statement rate limit"):
            await statement.fetchval()
        await asyncio.sleep(0.6)
        assert await statement.fetchval() == 1  # the prepared statement survived the refusal
    finally:
        await connection.close()


def test_new_connections_per_source_address_are_slowed_before_tls(
    start_proxy: StartProxy, terminal_pki: TerminalPKI
) -> None:
    proxy = start_proxy(limits={"source_connections": {"per_second": 0.5, "burst": 2}})
    time.sleep(0.1)
    accepted = refused = 0
    for _ in range(5):
        with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as raw:
            raw.sendall(b"\x00\x00\x00\x08\x04\xd2\x16\x2f")  # SSLRequest
            raw.settimeout(5)
            try:
                answer = raw.recv(1)
            except ConnectionResetError:
                answer = b""
            if answer == b"S":
                accepted += 1
            else:
                refused += 1
    # The readiness probe of start_proxy used one token already.
    assert accepted <= 2
    assert refused >= 3


def test_result_size_guard_cuts_a_bulk_read_and_cancels_it_on_the_server(
    start_proxy: StartProxy, terminal_pki: TerminalPKI, pg_cluster: Any
) -> None:
    proxy = start_proxy(roles={"cashier": {"limits": {"max_rows_per_statement": 100}}})
    with psycopg.connect(
        **proxy.conninfo(terminal_pki.cashier, terminal_pki.ca), autocommit=True
    ) as connection:
        assert len(connection.execute("SELECT g FROM generate_series(1, 100) AS g").fetchall()) == 100
        with pytest.raises(psycopg.errors.ConfigurationLimitExceeded) as raised:
            # A slow, endless producer: only the cancel on the server ends it in time.
            connection.execute("SELECT g, pg_sleep(0.001) FROM generate_series(1, 1000000) AS g").fetchall()
        assert "rows per statement" in str(raised.value) or "row" in str(raised.value)
        assert connection.execute("SELECT 'still usable'").fetchone() == ("still usable",)
    record = proxy.wait_for_event("cancel_forwarded", from_source="result-size guard")
    assert record["terminal"] == "till-01"
    with psycopg.connect(
        **pg_cluster.connect_kwargs(user="postgres", dbname="pos"), autocommit=True
    ) as admin:
        running = admin.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE query LIKE '%generate_series(1, 1000000)%' "
            "AND state = 'active' AND pid <> pg_backend_pid()"
        ).fetchone()
    assert running == (0,)
