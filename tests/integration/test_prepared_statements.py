"""Prepared statements through the proxy behave as against the database (issue 16): after a schema
change, under SQL EXECUTE and DEALLOCATE of protocol-prepared names, in both pool modes."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import psycopg
import pytest

from proxy.protocols.postgres import messages as m
from tests.integration.proxyproc import ProxyProcess, TerminalPKI
from tests.integration.test_policies import EXECUTE, SYNC, _bind, _parse
from tests.integration.test_postgres_robustness import (
    Message,
    RawClient,
    data_row_values,
    raw_session,
    run_query,
)
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


def _outcome(received: list[Message]) -> object:
    """A reply in short: the SQLSTATE of its error, else its rows (or command tag)."""
    errors = [m.parse_error_fields(payload)["C"] for kind, payload in received if kind == b"E"]
    if errors:
        return errors
    rows = [data_row_values(payload) for kind, payload in received if kind == b"D"]
    tags = [payload.rstrip(b"\x00").decode() for kind, payload in received if kind == b"C"]
    return rows or tags


def _parse_and_run(client: RawClient, name: str, sql: str, *params: str) -> object:
    client.send(_parse(name, sql) + _bind(name, *params) + EXECUTE + SYNC)
    return _outcome(client.read_until_ready())


def _run_prepared(client: RawClient, name: str, *params: str) -> object:
    client.send(_bind(name, *params) + EXECUTE + SYNC)
    return _outcome(client.read_until_ready())


@pytest.mark.parametrize("mode", MODES)
def test_sql_execute_and_deallocate_of_protocol_prepared_statements(
    start_proxy: StartProxy, terminal_pki: TerminalPKI, mode: str
) -> None:
    """What psql, psycopg (SQL DEALLOCATE before libpq 17) and applications mixing both do."""
    proxy = _proxy(start_proxy, mode)
    with raw_session(proxy, terminal_pki, terminal_pki.cashier) as client:
        assert _parse_and_run(client, "double", "SELECT $1::int * 2", "21") == [[b"42"]]
        assert _parse_and_run(client, "triple", "SELECT $1::int * 3", "3") == [[b"9"]]
        assert _outcome(run_query(client, "EXECUTE double(50)")) == [[b"100"]]
        assert _outcome(run_query(client, "BEGIN; EXECUTE triple(5); COMMIT")) == [[b"15"]]
        listed = _outcome(run_query(client, "SELECT name FROM pg_prepared_statements ORDER BY name"))
        if mode == "session":  # the client's own names, as against the database
            assert listed == [[b"double"], [b"triple"]]
        assert _outcome(run_query(client, "DEALLOCATE double")) == ["DEALLOCATE"]
        assert _run_prepared(client, "double", "1") == ["26000"]
        assert _outcome(run_query(client, "EXECUTE double(1)")) == ["26000"]
        assert _run_prepared(client, "triple", "2") == [[b"6"]]
        # The same name prepared again, now for another text.
        assert _parse_and_run(client, "double", "SELECT $1::int + $1::int", "8") == [[b"16"]]
        assert _outcome(run_query(client, "DEALLOCATE ALL")) == ["DEALLOCATE ALL"]
        for name in ("double", "triple"):
            assert _run_prepared(client, name, "1") == ["26000"]
            assert _outcome(run_query(client, f"EXECUTE {name}(1)")) == ["26000"]
        assert _parse_and_run(client, "triple", "SELECT $1::int * 3", "7") == [[b"21"]]
        if mode == "transaction":  # nothing of the client's is left under its own name
            assert _outcome(
                run_query(client, "SELECT name FROM pg_prepared_statements WHERE name !~ '^pdp_'")
            ) == ["SELECT 0"]
        # DISCARD ALL as a prepared statement drops every statement, the proxy's too: the proxy
        # follows (before, other terminals on that server connection got 26000 once).
        assert _parse_and_run(client, "", "DISCARD ALL") == ["DISCARD ALL"]
        assert _parse_and_run(client, "quad", "SELECT $1::int * 4", "2") == [[b"8"]]
        assert _run_prepared(client, "quad", "3") == [[b"12"]]


@pytest.mark.parametrize("mode", MODES)
def test_psycopg_deallocating_by_sql_keeps_working(
    start_proxy: StartProxy, terminal_pki: TerminalPKI, monkeypatch: pytest.MonkeyPatch, mode: str
) -> None:
    """psycopg with libpq < 17 rotates its statement cache with SQL DEALLOCATE, and clears it with
    DEALLOCATE ALL after a ROLLBACK or DROP."""
    monkeypatch.setattr("psycopg._connection_base._HAS_SEND_CLOSE", False)
    proxy = _proxy(start_proxy, mode)
    with psycopg.connect(
        **proxy.conninfo(terminal_pki.cashier, terminal_pki.ca), prepare_threshold=0, autocommit=True
    ) as connection:
        connection.prepared_max = 2
        for round_ in range(3):
            for factor in range(1, 6):
                query = f"SELECT %s::int * {factor}"
                assert connection.execute(query, (round_,)).fetchone() == (round_ * factor,)
            with pytest.raises(psycopg.errors.DivisionByZero), connection.transaction():
                connection.execute("SELECT 1 / %s", (0,))
        assert connection.execute("SELECT %s::int * 9", (2,)).fetchone() == (18,)
