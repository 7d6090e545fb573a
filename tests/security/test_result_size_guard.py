"""A cashier limited to 10 rows per statement tries to read a 1000-row table anyway: through COPY TO
STDOUT, by reading one portal a few rows at a time (Execute with a row limit), and by FETCHing from a
SQL cursor again and again. Each way it gets at most 10 rows, and its session goes on."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import asyncpg
import psycopg
import pytest

from tests.integration.proxyproc import ProxyProcess, TerminalPKI

StartProxy = Callable[..., ProxyProcess]
TABLE = "guard_products"
ROWS = 1000
CAP = 10


@pytest.fixture(scope="module")
def products(pg_cluster: Any) -> Iterator[str]:
    with psycopg.connect(**pg_cluster.connect_kwargs(), autocommit=True) as connection:
        connection.execute(f"DROP TABLE IF EXISTS {TABLE}")
        connection.execute(f"CREATE TABLE {TABLE} (id int PRIMARY KEY, name text NOT NULL)")
        connection.execute(
            f"INSERT INTO {TABLE} SELECT g, 'product ' || g FROM generate_series(1, {ROWS}) AS g"
        )
    yield TABLE
    with psycopg.connect(**pg_cluster.connect_kwargs(), autocommit=True) as connection:
        connection.execute(f"DROP TABLE IF EXISTS {TABLE}")


@pytest.fixture
def guarded(start_proxy: StartProxy, products: str) -> ProxyProcess:
    return start_proxy(roles={"cashier": {"limits": {"max_rows_per_statement": CAP}}})


def _cashier(proxy: ProxyProcess, pki: TerminalPKI) -> psycopg.Connection[Any]:
    return psycopg.connect(**proxy.conninfo(pki.cashier, pki.ca), autocommit=True)


async def _async_cashier(proxy: ProxyProcess, pki: TerminalPKI) -> asyncpg.Connection:
    return await asyncpg.connect(
        host="127.0.0.1",
        port=proxy.port,
        user=pki.cashier.terminal,
        database="pos",
        ssl=proxy.ssl_context(pki.cashier, pki.ca),
        timeout=15,
    )


def _still_usable(connection: psycopg.Connection[Any]) -> None:
    assert connection.execute("SELECT 'still usable'").fetchone() == ("still usable",)


@pytest.mark.parametrize(
    "copy",
    [
        f"COPY {TABLE} TO STDOUT",
        f"COPY {TABLE} TO STDOUT (FORMAT csv, HEADER)",
        f"COPY (SELECT * FROM {TABLE}) TO STDOUT",
    ],
)
def test_copy_to_stdout_is_cut_at_the_row_limit(
    copy: str, guarded: ProxyProcess, terminal_pki: TerminalPKI
) -> None:
    with _cashier(guarded, terminal_pki) as connection:
        received = b""
        with (
            pytest.raises(psycopg.errors.ConfigurationLimitExceeded),
            connection.cursor() as cursor,
            cursor.copy(copy) as stream,
        ):
            for chunk in stream:
                received += bytes(chunk)
        assert 0 < received.count(b"\n") <= CAP, received
        _still_usable(connection)
        # Within the limit COPY works.
        within = f"COPY (SELECT * FROM {TABLE} LIMIT 5) TO STDOUT"
        with connection.cursor() as cursor, cursor.copy(within) as out:
            assert b"".join(bytes(chunk) for chunk in out).count(b"\n") == 5


def test_copy_is_cut_by_bytes_too(start_proxy: StartProxy, terminal_pki: TerminalPKI, products: str) -> None:
    proxy = start_proxy(roles={"cashier": {"limits": {"max_bytes_per_statement": 200}}})
    with _cashier(proxy, terminal_pki) as connection:
        received = b""
        with (
            pytest.raises(psycopg.errors.ConfigurationLimitExceeded),
            connection.cursor() as cursor,
            cursor.copy(f"COPY {TABLE} TO STDOUT") as stream,
        ):
            for chunk in stream:
                received += bytes(chunk)
        assert len(received) <= 200
        _still_usable(connection)


async def test_one_portal_read_a_few_rows_at_a_time_counts_as_one_result(
    guarded: ProxyProcess, terminal_pki: TerminalPKI
) -> None:
    connection = await _async_cashier(guarded, terminal_pki)
    try:
        received: list[asyncpg.Record] = []
        with pytest.raises(asyncpg.exceptions.ConfigurationLimitExceededError):
            async with connection.transaction():
                # asyncpg's cursor: one portal, each fetch an Execute with a row limit of 5.
                cursor = await connection.cursor(f"SELECT * FROM {TABLE} ORDER BY id")
                for _ in range(ROWS // 5):
                    received += await cursor.fetch(5)
        assert len(received) <= CAP
        # The prefetching iterator (Execute with a row limit, PortalSuspended, again) likewise.
        received = []
        with pytest.raises(asyncpg.exceptions.ConfigurationLimitExceededError):
            async with connection.transaction():
                async for record in connection.cursor(f"SELECT * FROM {TABLE}", prefetch=3):
                    received.append(record)
        assert len(received) <= CAP
        assert await connection.fetchval("SELECT 'still usable'") == "still usable"
        # A new portal is counted afresh: two cursors of 8 rows each are both within the limit.
        for _ in range(2):
            async with connection.transaction():
                cursor = await connection.cursor(f"SELECT * FROM {TABLE} ORDER BY id")
                assert len(await cursor.fetch(4)) + len(await cursor.fetch(4)) == 8
    finally:
        await connection.close()


def test_fetch_from_a_sql_cursor_again_and_again_counts_as_one_result(
    guarded: ProxyProcess, terminal_pki: TerminalPKI
) -> None:
    with _cashier(guarded, terminal_pki) as connection:
        # Simple protocol, a holdable cursor so every FETCH is its own transaction.
        connection.execute(f"DECLARE dump CURSOR WITH HOLD FOR SELECT * FROM {TABLE}", prepare=False)
        received = 0
        with pytest.raises(psycopg.errors.ConfigurationLimitExceeded):
            for _ in range(ROWS // 4):
                received += len(connection.execute("FETCH FORWARD 4 FROM dump", prepare=False).fetchall())
        assert received <= CAP
        # The cursor stays over its limit, also through the extended protocol and prepared statements.
        for prepare in (False, True):
            with pytest.raises(psycopg.errors.ConfigurationLimitExceeded):
                connection.execute("/* again */ FETCH 1 IN dump", prepare=prepare).fetchall()
        _still_usable(connection)
        # Declared anew, it is a new cursor.
        connection.execute("CLOSE dump")
        connection.execute(f"DECLARE dump CURSOR WITH HOLD FOR SELECT * FROM {TABLE}")
        assert len(connection.execute("FETCH 8 FROM dump").fetchall()) == 8
        connection.execute("CLOSE dump")


def test_psycopg_server_side_cursor_is_cut_at_the_row_limit(
    guarded: ProxyProcess, terminal_pki: TerminalPKI
) -> None:
    with psycopg.connect(**guarded.conninfo(terminal_pki.cashier, terminal_pki.ca)) as connection:
        received = 0
        # A named cursor: DECLARE bulk CURSOR ..., then FETCH FORWARD n FROM bulk.
        with (
            pytest.raises(psycopg.errors.ConfigurationLimitExceeded),
            connection.cursor(name="bulk") as cursor,
        ):
            cursor.execute(f"SELECT * FROM {TABLE}")
            while batch := cursor.fetchmany(3):
                received += len(batch)
        assert received <= CAP
        connection.rollback()
        assert connection.execute("SELECT 'still usable'").fetchone() == ("still usable",)


async def test_asyncpg_prepared_fetch_from_a_cursor_counts_per_cursor(
    guarded: ProxyProcess, terminal_pki: TerminalPKI
) -> None:
    connection = await _async_cashier(guarded, terminal_pki)
    try:
        received = 0
        with pytest.raises(asyncpg.exceptions.ConfigurationLimitExceededError):
            async with connection.transaction():
                await connection.execute(f"DECLARE c2 CURSOR FOR SELECT * FROM {TABLE}")
                for _ in range(ROWS // 3):
                    # A named prepared statement, bound to a new portal each time.
                    received += len(await connection.fetch("FETCH 3 FROM c2"))
        assert received <= CAP
        assert await connection.fetchval("SELECT 'still usable'") == "still usable"
    finally:
        await connection.close()
