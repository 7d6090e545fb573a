"""Prepared statements through the proxy behave as against the database (issue 16): after a schema
change, under SQL EXECUTE and DEALLOCATE of protocol-prepared names, in both pool modes."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import psycopg
import pytest

from tests.integration.proxyproc import ProxyProcess, TerminalPKI
from tests.integration.test_transaction_pooling import _asyncpg, _superuser

StartProxy = Callable[..., ProxyProcess]
MODES = ["session", "transaction"]


def _proxy(start_proxy: StartProxy, mode: str, size: int = 1) -> ProxyProcess:
    # One server connection: every client shares it (and, in transaction mode, its statements).
    return start_proxy(routes={"pos": {"pool": {"mode": mode, "size": size, "max_client_wait": "20s"}}})


@pytest.fixture
def menu(pg_cluster: Any) -> Iterator[Callable[[str], None]]:
    """A table whose shape the test changes as a migration would, and a way to change it."""
    with _superuser(pg_cluster) as admin:
        admin.execute("DROP TABLE IF EXISTS public.menu")
        admin.execute("CREATE TABLE public.menu (id int PRIMARY KEY, name text)")
        admin.execute("INSERT INTO public.menu VALUES (1, 'tea')")
        admin.execute("ALTER TABLE public.menu OWNER TO pos_proxy")

    def migrate(ddl: str) -> None:
        with _superuser(pg_cluster) as admin:
            admin.execute(ddl)

    yield migrate
    with _superuser(pg_cluster) as admin:
        admin.execute("DROP TABLE IF EXISTS public.menu")


@pytest.mark.parametrize("mode", MODES)
async def test_asyncpg_reprepares_after_a_schema_change(
    start_proxy: StartProxy, terminal_pki: TerminalPKI, menu: Callable[[str], None], mode: str
) -> None:
    proxy = _proxy(start_proxy, mode, size=1 if mode == "transaction" else 3)
    first, second = await _asyncpg(proxy, terminal_pki), await _asyncpg(proxy, terminal_pki)
    try:
        for connection in (first, second):
            assert [tuple(row) for row in await connection.fetch("SELECT * FROM menu")] == [(1, "tea")]
        menu("ALTER TABLE public.menu ADD COLUMN price_cents int DEFAULT 250")
        # A client that prepared nothing yet, then both that prepared before the change: asyncpg
        # re-prepares once on the server's 0A000 (InvalidCachedStatementError), as against the database.
        late = await _asyncpg(proxy, terminal_pki)
        try:
            assert [tuple(row) for row in await late.fetch("SELECT * FROM menu")] == [(1, "tea", 250)]
        finally:
            await late.close()
        for connection in (second, first):
            assert [tuple(row) for row in await connection.fetch("SELECT * FROM menu")] == [(1, "tea", 250)]
        menu("ALTER TABLE public.menu ALTER COLUMN id TYPE bigint")
        for connection in (first, second):
            rows = await connection.fetch("SELECT * FROM menu WHERE id = $1", 1)
            assert [tuple(row) for row in rows] == [(1, "tea", 250)]
            assert [tuple(row) for row in await connection.fetch("SELECT * FROM menu")] == [(1, "tea", 250)]
    finally:
        await first.close()
        await second.close()


@pytest.mark.parametrize("mode", MODES)
def test_psycopg_sees_the_new_columns_as_against_the_database(
    start_proxy: StartProxy,
    terminal_pki: TerminalPKI,
    pg_cluster: Any,
    menu: Callable[[str], None],
    mode: str,
) -> None:
    """psycopg does not re-prepare by itself: a connection that prepared before the change fails
    as against the database; one that prepares after it never sees the error."""
    proxy = _proxy(start_proxy, mode, size=1 if mode == "transaction" else 3)
    query = "SELECT * FROM menu WHERE id = %s"

    def connect(**kwargs: Any) -> psycopg.Connection:
        return psycopg.connect(**kwargs, prepare_threshold=0, autocommit=True)

    def outcomes(connection: psycopg.Connection) -> list[object]:
        seen: list[object] = []
        for _ in range(3):
            try:
                seen.append(connection.execute(query, (1,)).fetchall())
            except psycopg.errors.FeatureNotSupported as error:
                seen.append(error.sqlstate)
        return seen

    direct = connect(**pg_cluster.connect_kwargs())
    proxied = connect(**proxy.conninfo(terminal_pki.cashier, terminal_pki.ca))
    with direct, proxied:
        for connection in (direct, proxied):
            assert connection.execute(query, (1,)).fetchall() == [(1, "tea")]
        menu("ALTER TABLE public.menu ADD COLUMN price_cents int DEFAULT 250")
        with connect(**proxy.conninfo(terminal_pki.cashier, terminal_pki.ca)) as late:
            assert late.execute(query, (1,)).fetchall() == [(1, "tea", 250)]
        expected = outcomes(direct)
        seen = outcomes(proxied)
        if mode == "session":
            assert seen == expected
        else:
            # Its statement runs on the copy the late client prepared: psycopg reads each result's
            # columns from the portal's description, so it gets the rows the database would
            # refuse until it prepared again (a driver that described the statement gets 0A000).
            assert seen in (expected, [[(1, "tea", 250)]] * 3)
