"""Per-role SQL policies through the real proxy: enforce, monitor, learn, reload, housekeeping.

Every refusal is checked from the client's side (SQLSTATE, message, the session stays usable)
and from the database's side (a superuser connection shows that nothing refused ran).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import struct
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import asyncpg
import psycopg
import pytest
import yaml

from proxy.cli import main as cli_main
from proxy.policy.learn import read_review
from proxy.protocols.postgres import messages as m
from proxy.protocols.postgres.prepared import Statement
from tests.integration.proxyproc import ProxyProcess, Terminal, TerminalPKI, deep_merge
from tests.integration.test_postgres_robustness import (
    Message,
    RawClient,
    data_row_values,
    raw_session,
    run_query,
)

StartProxy = Callable[..., ProxyProcess]

pytestmark = pytest.mark.skipif(shutil.which("psql") is None, reason="psql is not installed")

CARD = "4111111111111111"  # a card number literal: must never reach the review file or the log
PEN = "4006381333931"
CHOCOLATE = "5000159484695"

SCHEMA = """
CREATE TABLE IF NOT EXISTS public.products (
    sku         text PRIMARY KEY,
    name        text NOT NULL,
    price_cents integer NOT NULL CHECK (price_cents >= 0)
);
CREATE TABLE IF NOT EXISTS public.stock (
    store_id text NOT NULL,
    sku      text NOT NULL REFERENCES public.products (sku),
    quantity integer NOT NULL,
    PRIMARY KEY (store_id, sku)
);
CREATE TABLE IF NOT EXISTS public.sales (
    id          bigserial PRIMARY KEY,
    store_id    text NOT NULL,
    terminal_id text NOT NULL,
    total_cents integer NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE IF NOT EXISTS public.sale_items (
    sale_id     bigint NOT NULL REFERENCES public.sales (id),
    sku         text NOT NULL REFERENCES public.products (sku),
    quantity    integer NOT NULL CHECK (quantity > 0),
    price_cents integer NOT NULL,
    PRIMARY KEY (sale_id, sku)
);
ALTER TABLE public.products OWNER TO pos_proxy;
ALTER TABLE public.stock OWNER TO pos_proxy;
ALTER TABLE public.sales OWNER TO pos_proxy;
ALTER TABLE public.sale_items OWNER TO pos_proxy;
INSERT INTO public.products (sku, name, price_cents) VALUES
    ('4006381333931', 'Ballpoint pen, blue', 129),
    ('5000159484695', 'Chocolate bar 50 g', 99),
    ('8710398500120', 'Coffee beans 500 g', 899)
ON CONFLICT DO NOTHING;
INSERT INTO public.stock (store_id, sku, quantity)
SELECT 'store-001', sku, 100 FROM public.products
ON CONFLICT DO NOTHING;
"""

CASHIER_POLICY: dict[str, Any] = {
    "mode": "enforce",
    "search_path": ["public"],
    "stacked_queries": False,
    "allow": {
        "kinds": ["SELECT", "INSERT", "UPDATE"],
        "read": ["products", "stock"],
        "write": ["sales", "sale_items", "stock"],
        "update_without_where": False,
    },
    "fingerprints": [],
}
MANAGER_POLICY: dict[str, Any] = {
    "mode": "enforce",
    "search_path": ["public"],
    "stacked_queries": False,
    "allow": {
        "kinds": ["SELECT", "INSERT", "UPDATE", "DELETE"],
        "read": ["products", "stock", "sales", "sale_items"],
        "write": ["sales", "sale_items", "stock", "products"],
    },
    "fingerprints": [],
}
# Nothing allowed but housekeeping (and whatever learn mode approves later).
EMPTY_POLICY: dict[str, Any] = {"mode": "enforce", "allow": {}, "fingerprints": []}


# --- database side ---


def _superuser(cluster: Any) -> psycopg.Connection:
    return psycopg.connect(**cluster.connect_kwargs(user="postgres", dbname="pos"), autocommit=True)


def _scalar(cluster: Any, sql: str, *params: object) -> Any:
    with _superuser(cluster) as admin:
        row = admin.execute(sql, params or None).fetchone()
    assert row is not None
    return row[0]


def _sales(cluster: Any, store: str) -> int:
    return int(_scalar(cluster, "SELECT count(*) FROM public.sales WHERE store_id = %s", store))


def _add_sale(cluster: Any, store: str, total: int = 100) -> int:
    return int(
        _scalar(
            cluster,
            "INSERT INTO public.sales (store_id, terminal_id, total_cents) VALUES (%s, 'till-01', %s) "
            "RETURNING id",
            store,
            total,
        )
    )


@pytest.fixture(scope="module")
def pos_schema(pg_cluster: Any) -> None:
    with _superuser(pg_cluster) as admin:
        admin.execute(SCHEMA)


# --- proxy side ---


def _write_policy(path: Path, policy: dict[str, Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(policy, sort_keys=False), encoding="utf-8")
    return path


def _policy_path(tmp_path: Path, role: str) -> Path:
    return tmp_path / "policies" / f"{role}.yaml"


def _review_path(tmp_path: Path) -> Path:
    return tmp_path / "review.json"


def _policy_overrides(
    directory: Path, cashier: dict[str, Any] | None = None, manager: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Config overrides giving the cashier and manager roles policy files (defaults above)."""
    cashier_file = _write_policy(_policy_path(directory, "cashier"), cashier or CASHIER_POLICY)
    manager_file = _write_policy(_policy_path(directory, "manager"), manager or MANAGER_POLICY)
    return {
        "roles": {"cashier": {"policy": str(cashier_file)}, "manager": {"policy": str(manager_file)}},
        "policy": {"review_file": str(_review_path(directory))},
    }


def _policy_proxy(
    start_proxy: StartProxy,
    tmp_path: Path,
    cashier: dict[str, Any] | None = None,
    manager: dict[str, Any] | None = None,
    **overrides: Any,
) -> ProxyProcess:
    return start_proxy(**_policy_overrides(tmp_path, cashier, manager), **overrides)


@contextmanager
def _module_proxy(
    base_config: dict[str, Any], directory: Path, cashier: dict[str, Any], manager: dict[str, Any]
) -> Iterator[ProxyProcess]:
    overrides = _policy_overrides(directory, cashier, manager)
    process = ProxyProcess(directory / "proxy", deep_merge(base_config, overrides)).start()
    try:
        yield process
    finally:
        process.stop()


@pytest.fixture(scope="module")
def enforce_proxy(
    base_config: dict[str, Any], tmp_path_factory: pytest.TempPathFactory, pos_schema: None
) -> Iterator[ProxyProcess]:
    """The default cashier and manager policies in enforce mode (the manager may send FunctionCall)."""
    manager = {**MANAGER_POLICY, "function_call_message": True}
    with _module_proxy(base_config, tmp_path_factory.mktemp("enforce"), CASHIER_POLICY, manager) as proxy:
        yield proxy


@pytest.fixture(scope="module")
def empty_policy_proxy(
    base_config: dict[str, Any], tmp_path_factory: pytest.TempPathFactory, pos_schema: None
) -> Iterator[ProxyProcess]:
    """A cashier allowed nothing but the built-in housekeeping."""
    directory = tmp_path_factory.mktemp("empty-policy")
    with _module_proxy(base_config, directory, EMPTY_POLICY, MANAGER_POLICY) as proxy:
        yield proxy


def _events(proxy: ProxyProcess, event: str) -> list[dict[str, Any]]:
    return [record for record in proxy.log_events() if record.get("event") == event]


def _sighup(proxy: ProxyProcess, timeout: float = 10.0) -> dict[str, Any]:
    """SIGHUP the proxy; the reload_applied or reload_failed record it answered with."""
    outcomes = ("reload_applied", "reload_failed")
    before = sum(len(_events(proxy, event)) for event in outcomes)
    assert proxy._process is not None
    os.kill(proxy._process.pid, signal.SIGHUP)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        records = [record for record in proxy.log_events() if record.get("event") in outcomes]
        if len(records) > before:
            return records[-1]
        time.sleep(0.05)
    raise AssertionError(f"no reload outcome after SIGHUP:\n{proxy.log_text()[-4000:]}")


def _connect(
    proxy: ProxyProcess, pki: TerminalPKI, terminal: Terminal | None = None, **options: Any
) -> psycopg.Connection:
    options.setdefault("autocommit", True)
    return psycopg.connect(**proxy.conninfo(terminal or pki.cashier, pki.ca), **options)


async def _asyncpg(proxy: ProxyProcess, pki: TerminalPKI, terminal: Terminal | None = None) -> Any:
    return await proxy.asyncpg_connect(terminal or pki.cashier, pki.ca)


# --- psql (simple query protocol) ---

_PSQL_ERROR = re.compile(r"^psql:<stdin>:(\d+): ERROR:  ([0-9A-Z]{5}): (.*)$")


def _psql(
    proxy: ProxyProcess, pki: TerminalPKI, script: str | None = None, *, command: str | None = None
) -> subprocess.CompletedProcess[str]:
    """psql as the cashier, running ``script`` from stdin (one statement at a time) or ``command``."""
    conninfo = " ".join(f"{k}={v}" for k, v in proxy.conninfo(pki.cashier, pki.ca).items())
    args = ["psql", conninfo, "-X", "-q", "-A", "-t", "-v", "VERBOSITY=verbose"]
    args += ["-c", command] if command is not None else ["-f", "-"]
    return subprocess.run(args, input=script, capture_output=True, text=True, timeout=30, check=False)


def _psql_errors(result: subprocess.CompletedProcess[str]) -> list[tuple[int, str, str]]:
    """(script line, SQLSTATE, message) of every ERROR psql reported, in order."""
    return [
        (int(match[1]), match[2], match[3])
        for line in result.stderr.splitlines()
        if (match := _PSQL_ERROR.match(line))
    ]


# --- raw protocol ---


def _parse(name: str, sql: str) -> bytes:
    return m.build_message(b"P", name.encode() + b"\x00" + sql.encode() + b"\x00" + struct.pack("!h", 0))


def _bind(statement: str, *params: str) -> bytes:
    body = b"\x00" + statement.encode() + b"\x00" + struct.pack("!hh", 0, len(params))
    for param in params:
        body += struct.pack("!i", len(param.encode())) + param.encode()
    return m.build_message(b"B", body + struct.pack("!h", 0))


EXECUTE = m.build_message(b"E", b"\x00" + struct.pack("!i", 0))
SYNC = m.build_message(b"S", b"")


def _error(received: list[Message]) -> dict[str, str]:
    errors = [m.parse_error_fields(payload) for kind, payload in received if kind == b"E"]
    assert len(errors) == 1, received
    return errors[0]


def _assert_serves(client: RawClient) -> None:
    received = run_query(client, "SELECT 'still serving'")
    rows = [data_row_values(payload) for kind, payload in received if kind == b"D"]
    assert rows == [[b"still serving"]], received
    assert received[-1] == (b"Z", b"I"), received


# --- enforce: simple protocol ---


def test_enforce_allows_pos_statements_and_refuses_the_rest_over_psql(
    enforce_proxy: ProxyProcess, terminal_pki: TerminalPKI, pg_cluster: Any
) -> None:
    proxy = enforce_proxy
    store = "psql-enforce"
    existing = _add_sale(pg_cluster, store)
    script = "\n".join(
        [
            f"SELECT name FROM products WHERE sku = '{PEN}';",
            "INSERT INTO sales (store_id, terminal_id, total_cents) "
            f"VALUES ('{store}', 'till-01', 129) RETURNING total_cents;",
            f"UPDATE stock SET quantity = quantity WHERE store_id = 'store-001' AND sku = '{PEN}';",
            "DROP TABLE sales;",  # line 4
            "SELECT pg_sleep(1);",  # line 5
            "SELECT 'after the refusals';",
            "SELEC 1;",  # line 7
            f"DELETE FROM sales WHERE store_id = '{store}';",  # line 8
            "SELECT * FROM sales;",  # line 9: sales is writable, so readable
            "SELECT 'still usable';",
        ]
    )
    result = _psql(proxy, terminal_pki, script + "\n")
    assert result.returncode == 0, result.stderr
    assert _psql_errors(result) == [
        (4, "42501", "statement kind DROP is not allowed for role cashier"),
        (5, "42501", "function pg_sleep is not allowed for role cashier"),
        (7, "42601", "the statement could not be parsed"),
        (8, "42501", "statement kind DELETE is not allowed for role cashier"),
    ], result.stderr
    lines = result.stdout.splitlines()
    assert lines[:3] == ["Ballpoint pen, blue", "129", "after the refusals"], result.stdout
    assert lines[-1] == "still usable", result.stdout
    assert _scalar(pg_cluster, "SELECT to_regclass('public.sales') IS NOT NULL") is True
    assert _sales(pg_cluster, store) == 2  # the existing sale and the cashier's; nothing deleted
    assert _scalar(pg_cluster, "SELECT count(*) FROM public.sales WHERE id = %s", existing) == 1
    violation = proxy.wait_for_event("policy_violation", rule="denylist", statements=["DROP TABLE sales"])
    assert violation["role"] == "cashier"
    assert violation["reason"] == "statement kind DROP is not allowed for role cashier"
    proxy.wait_for_event(
        "policy_violation", rule="statement kind", statements=["DELETE FROM sales WHERE store_id = $1"]
    )
    assert store not in json.dumps(_events(proxy, "policy_violation"))  # literals are normalized away


def test_stacked_queries_are_refused_as_a_whole(
    enforce_proxy: ProxyProcess, terminal_pki: TerminalPKI, pg_cluster: Any
) -> None:
    proxy = enforce_proxy
    store = "stacked"
    _add_sale(pg_cluster, store)
    total = _scalar(pg_cluster, "SELECT count(*) FROM public.sales")

    result = _psql(proxy, terminal_pki, command="SELECT 1; DELETE FROM sales")
    assert result.returncode == 1
    assert "ERROR:  42501: stacked queries are not allowed for role cashier" in result.stderr
    assert result.stdout == ""  # not even the SELECT ran

    insert = f"INSERT INTO sales (store_id, terminal_id, total_cents) VALUES ('{store}', 'till-01', 1)"
    result = _psql(proxy, terminal_pki, command=f"{insert}; SELECT 1")
    assert "ERROR:  42501: stacked queries are not allowed for role cashier" in result.stderr

    assert _scalar(pg_cluster, "SELECT count(*) FROM public.sales") == total
    assert _sales(pg_cluster, store) == 1
    # The same session goes on after the refusal.
    with _connect(proxy, terminal_pki) as connection:
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match="stacked queries"):
            connection.execute("SELECT 1; DELETE FROM sales")
        assert connection.execute("SELECT 'next'").fetchone() == ("next",)
    proxy.wait_for_event("policy_violation", rule="stacked queries")


def test_refusal_inside_a_transaction_fails_the_transaction(
    enforce_proxy: ProxyProcess, terminal_pki: TerminalPKI, pg_cluster: Any
) -> None:
    proxy = enforce_proxy
    store = "psql-transaction"
    script = "\n".join(
        [
            "BEGIN;",
            f"INSERT INTO sales (store_id, terminal_id, total_cents) VALUES ('{store}', 'till-01', 5);",
            f"DELETE FROM sales WHERE store_id = '{store}';",  # line 3: refused
            "SELECT 1;",  # line 4: the server says the transaction is aborted
            "ROLLBACK;",
            "SELECT 'after rollback';",
            "BEGIN;",
            f"INSERT INTO sales (store_id, terminal_id, total_cents) VALUES ('{store}', 'till-01', 6);",
            "DROP TABLE sales;",  # line 9: refused
            "COMMIT;",  # the server turns it into a rollback
            f"SELECT count(*) FROM sales WHERE store_id = '{store}';",
        ]
    )
    result = _psql(proxy, terminal_pki, script + "\n")
    assert result.returncode == 0, result.stderr
    errors = _psql_errors(result)
    assert [(line, code) for line, code, _ in errors] == [(3, "42501"), (4, "25P02"), (9, "42501")], errors
    assert errors[1][2].startswith("current transaction is aborted"), errors
    assert result.stdout.splitlines() == ["after rollback", "0"], result.stdout
    assert _sales(pg_cluster, store) == 0


# --- enforce: extended protocol ---


async def test_asyncpg_prepared_statements_under_enforce(
    enforce_proxy: ProxyProcess, terminal_pki: TerminalPKI, pg_cluster: Any
) -> None:
    proxy = enforce_proxy
    store = "asyncpg-enforce"
    connection = await _asyncpg(proxy, terminal_pki)
    try:
        lookup = await connection.prepare("SELECT name, price_cents FROM products WHERE sku = $1")
        assert tuple(await lookup.fetchrow(PEN)) == ("Ballpoint pen, blue", 129)
        sale = await connection.fetchval(
            "INSERT INTO sales (store_id, terminal_id, total_cents) VALUES ($1, $2, $3) RETURNING id",
            store,
            "till-01",
            129,
        )
        with pytest.raises(asyncpg.InsufficientPrivilegeError, match="statement kind DELETE is not allowed"):
            await connection.fetch("DELETE FROM sales WHERE id = $1 RETURNING id", sale)
        with pytest.raises(asyncpg.InsufficientPrivilegeError, match="function pg_sleep is not allowed"):
            await connection.fetchval("SELECT pg_sleep($1)", 0.5)
        with pytest.raises(asyncpg.InsufficientPrivilegeError, match="statement kind DELETE"):
            await connection.prepare("DELETE FROM sales WHERE id = $1")
        with pytest.raises(asyncpg.InsufficientPrivilegeError, match="statement kind DROP"):
            await connection.execute("DROP TABLE sales")  # no arguments: the simple protocol
        # Again, now that the driver may think it knows the statement: still refused.
        with pytest.raises(asyncpg.InsufficientPrivilegeError, match="statement kind DELETE"):
            await connection.fetch("DELETE FROM sales WHERE id = $1 RETURNING id", sale)
        assert tuple(await lookup.fetchrow(CHOCOLATE)) == ("Chocolate bar 50 g", 99)
        assert await connection.fetchval("SELECT count(*) FROM sales WHERE store_id = $1", store) == 1

        # A refusal inside a transaction fails it; the driver's ROLLBACK works.
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            async with connection.transaction():
                await connection.execute(
                    "INSERT INTO sales (store_id, terminal_id, total_cents) VALUES ($1, 'till-01', 7)", store
                )
                await connection.fetch("DELETE FROM sales WHERE store_id = $1", store)
        assert await connection.fetchval("SELECT count(*) FROM sales WHERE store_id = $1", store) == 1
    finally:
        await connection.close()
    assert _sales(pg_cluster, store) == 1


def test_psycopg_server_side_prepares_under_enforce(
    enforce_proxy: ProxyProcess, terminal_pki: TerminalPKI, pg_cluster: Any
) -> None:
    proxy = enforce_proxy
    store = "psycopg-prepared"
    _add_sale(pg_cluster, store)
    with _connect(proxy, terminal_pki, prepare_threshold=0) as connection:
        insert = "INSERT INTO sales (store_id, terminal_id, total_cents) VALUES (%s, %s, %s)"
        connection.execute(insert, (store, "till-01", 1))
        connection.execute(insert, (store, "till-01", 2))
        for _ in range(2):  # a never-allowed statement stays refused, however often it is tried
            with pytest.raises(psycopg.errors.InsufficientPrivilege, match="statement kind DELETE"):
                connection.execute("DELETE FROM sales WHERE store_id = %s", (store,))
        with pytest.raises(psycopg.errors.SyntaxError, match="the statement could not be parsed"):
            connection.execute("SELEC %s", (1,))
        count = "SELECT count(*) FROM sales WHERE store_id = %s"
        assert connection.execute(count, (store,)).fetchone() == (3,)

        # Pipeline: the server skips what follows the refused statement up to the sync point.
        with pytest.raises(psycopg.errors.InsufficientPrivilege), connection.pipeline():
            connection.execute("SELECT name FROM products WHERE sku = %s", (PEN,))
            connection.execute("DELETE FROM sales WHERE store_id = %s", (store,))
            connection.execute(insert, (store, "till-01", 3))
        assert connection.execute(count, (store,)).fetchone() == (3,)
    assert _sales(pg_cluster, store) == 3


def test_bind_of_a_refused_named_statement_cannot_run(
    enforce_proxy: ProxyProcess, terminal_pki: TerminalPKI, pg_cluster: Any
) -> None:
    proxy = enforce_proxy
    store = "raw-bind"
    _add_sale(pg_cluster, store)
    delete = "DELETE FROM sales WHERE store_id = $1"
    with raw_session(proxy, terminal_pki, terminal_pki.cashier) as client:
        client.send(_parse("evil", delete) + _bind("evil", store) + EXECUTE + SYNC)
        received = client.read_until_ready()
        error = _error(received)
        assert (error["C"], error["M"]) == ("42501", "statement kind DELETE is not allowed for role cashier")
        assert received[-1] == (b"Z", b"I"), received
        assert b"1" not in [kind for kind, _ in received], received  # no ParseComplete

        # In a later cycle the name does not exist on the server: Bind fails there.
        client.send(_bind("evil", store) + EXECUTE + SYNC)
        received = client.read_until_ready()
        assert _error(received)["C"] in ("26000", "42501"), received
        assert b"C" not in [kind for kind, _ in received], received
        _assert_serves(client)
    assert _sales(pg_cluster, store) == 1


def test_cashier_cannot_bind_a_statement_another_role_prepared_under_transaction_pooling(
    start_proxy: StartProxy, terminal_pki: TerminalPKI, pg_cluster: Any, pos_schema: None, tmp_path: Path
) -> None:
    proxy = _policy_proxy(start_proxy, tmp_path, routes={"pos": {"pool": {"mode": "transaction", "size": 1}}})
    store = "cross-role-bind"
    _add_sale(pg_cluster, store)
    delete = "DELETE FROM sales WHERE store_id = $1"
    # The manager may delete: its Parse creates a server-side statement on the one server connection.
    with raw_session(proxy, terminal_pki, terminal_pki.manager) as manager:
        manager.send(_parse("void_sales", delete) + SYNC)
        assert [kind for kind, _ in manager.read_until_ready()] == [b"1", b"Z"]
    server_name = Statement.from_parse_body(delete.encode() + b"\x00" + struct.pack("!h", 0)).server_name
    with raw_session(proxy, terminal_pki, terminal_pki.cashier) as cashier:
        cashier.send(_bind(server_name.decode(), store) + EXECUTE + SYNC)
        received = cashier.read_until_ready()
        assert b"C" not in [kind for kind, _ in received], f"the cashier's DELETE ran: {received}"
        assert _sales(pg_cluster, store) == 1


# --- FunctionCall, parse errors, violation limit ---


def _function_call(oid: int) -> bytes:
    # Function OID, no argument format codes, no arguments, text result.
    return m.build_message(b"F", struct.pack("!ihhh", oid, 0, 0, 0))


NOW_OID = 1299  # pg_catalog.now()


def test_function_call_message_is_refused_unless_allowed(
    enforce_proxy: ProxyProcess, terminal_pki: TerminalPKI
) -> None:
    proxy = enforce_proxy  # the manager's policy has function_call_message: true
    with raw_session(proxy, terminal_pki, terminal_pki.cashier) as client:
        client.send(_function_call(NOW_OID))
        received = client.read_until_ready()
        error = _error(received)
        assert error["S"] == "ERROR"
        assert error["C"] == "42501"
        assert error["M"] == "the function call protocol message is not allowed for role cashier"
        assert [kind for kind, _ in received] == [b"E", b"Z"], received
        assert received[-1] == (b"Z", b"I")
        _assert_serves(client)
    proxy.wait_for_event("policy_violation", role="cashier", rule="function call message")

    with raw_session(proxy, terminal_pki, terminal_pki.manager) as client:
        client.send(_function_call(NOW_OID))
        received = client.read_until_ready()
        assert [kind for kind, _ in received] == [b"V", b"Z"], received
        _assert_serves(client)


def test_unparsable_sql_is_refused_with_a_syntax_error(
    enforce_proxy: ProxyProcess, terminal_pki: TerminalPKI
) -> None:
    proxy = enforce_proxy
    with _connect(proxy, terminal_pki) as connection:
        with pytest.raises(psycopg.errors.SyntaxError) as raised:
            connection.execute("SELEC name FROM products")
        assert raised.value.diag.message_primary == "the statement could not be parsed"
        assert raised.value.sqlstate == "42601"
        assert connection.execute("SELECT 2").fetchone() == (2,)
    proxy.wait_for_event("policy_violation", rule="parse error")


def test_max_violations_ends_the_session(
    start_proxy: StartProxy, terminal_pki: TerminalPKI, pg_cluster: Any, pos_schema: None, tmp_path: Path
) -> None:
    proxy = _policy_proxy(start_proxy, tmp_path, cashier={**CASHIER_POLICY, "max_violations": 2})
    store = "max-violations"
    _add_sale(pg_cluster, store)
    with raw_session(proxy, terminal_pki, terminal_pki.cashier) as client:
        first = run_query(client, "DROP TABLE sales")
        assert _error(first)["S"] == "ERROR" and _error(first)["C"] == "42501"
        assert first[-1] == (b"Z", b"I")
        _assert_serves(client)  # allowed statements do not count
        second = run_query(client, f"DELETE FROM sales WHERE store_id = '{store}'")
        fatal = _error(second)
        assert fatal["S"] == "FATAL", second
        assert fatal["C"] == "42501"
        assert "too many refused statements" in fatal["M"]
        client.expect_closed()
    assert _sales(pg_cluster, store) == 1
    proxy.wait_for_event("session_error", role="cashier", sqlstate="42501")
    assert len(_events(proxy, "policy_violation")) == 2
    # Other sessions are not affected, and the count is per session.
    with _connect(proxy, terminal_pki) as connection:
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            connection.execute("DROP TABLE sales")
        assert connection.execute("SELECT 3").fetchone() == (3,)


def test_max_violations_for_a_statement_waiting_for_a_server_connection(
    start_proxy: StartProxy, terminal_pki: TerminalPKI, pg_cluster: Any, pos_schema: None, tmp_path: Path
) -> None:
    proxy = _policy_proxy(
        start_proxy,
        tmp_path,
        cashier={**CASHIER_POLICY, "max_violations": 1},
        routes={"pos": {"pool": {"mode": "transaction", "size": 1}}},
    )
    holder = _connect(proxy, terminal_pki, terminal_pki.manager)
    try:
        holder.execute("BEGIN")
        holder.execute("SELECT 1")  # holds the only server connection
        with raw_session(proxy, terminal_pki, terminal_pki.cashier) as client:
            client.sock.settimeout(2)
            client.send(m.build_query("DROP TABLE sales"))  # waits for the server connection
            time.sleep(0.3)
            holder.execute("COMMIT")
            received = client.read_until_ready()
            fatal = _error(received)
            assert (fatal["S"], fatal["C"]) == ("FATAL", "42501"), received
    finally:
        holder.close()
    assert _scalar(pg_cluster, "SELECT to_regclass('public.sales') IS NOT NULL") is True


# --- monitor and learn ---


def test_monitor_mode_runs_statements_and_logs_what_enforce_would_refuse(
    start_proxy: StartProxy, terminal_pki: TerminalPKI, pg_cluster: Any, pos_schema: None, tmp_path: Path
) -> None:
    proxy = _policy_proxy(start_proxy, tmp_path, cashier={**CASHIER_POLICY, "mode": "monitor"})
    store = "monitor"
    _add_sale(pg_cluster, store)
    with _superuser(pg_cluster) as admin:
        admin.execute("CREATE TABLE IF NOT EXISTS public.monitor_scratch (id int)")
        admin.execute("ALTER TABLE public.monitor_scratch OWNER TO pos_proxy")
    with _connect(proxy, terminal_pki) as connection:
        connection.execute(f"DELETE FROM sales WHERE store_id = '{store}'")
        connection.execute("DROP TABLE monitor_scratch")
        assert connection.execute(f"SELECT name FROM products WHERE sku = '{PEN}'").fetchone() == (
            "Ballpoint pen, blue",
        )
    assert _sales(pg_cluster, store) == 0
    assert _scalar(pg_cluster, "SELECT to_regclass('public.monitor_scratch') IS NULL") is True
    record = proxy.wait_for_event(
        "policy_would_refuse", rule="statement kind", statements=["DELETE FROM sales WHERE store_id = $1"]
    )
    assert record["role"] == "cashier"
    assert record["reason"] == "statement kind DELETE is not allowed for role cashier"
    proxy.wait_for_event("policy_would_refuse", rule="denylist", statements=["DROP TABLE monitor_scratch"])
    assert len(_events(proxy, "policy_would_refuse")) == 2  # the allowed SELECT is not logged
    assert _events(proxy, "policy_violation") == []


def _wait_for_review(path: Path, ready: Callable[[list[Any]], bool], timeout: float = 10.0) -> list[Any]:
    deadline = time.monotonic() + timeout
    entries: list[Any] = []
    while time.monotonic() < deadline:
        try:
            entries = read_review(path)
        except (OSError, ValueError):
            entries = []
        if ready(entries):
            return entries
        time.sleep(0.1)
    raise AssertionError(f"review file {path} never got there: {entries}")


def _cli(capsys: pytest.CaptureFixture[str], *args: str | Path) -> tuple[int, str, str]:
    """``pos-proxy ARGS`` in this process (the e2e tests run the same commands as subprocesses)."""
    capsys.readouterr()
    code = cli_main([str(arg) for arg in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


LEARNED_INSERT = (
    "INSERT INTO sales (store_id, terminal_id, total_cents) VALUES ('{store}', '{card}', {total})"
)
LEARNED_SELECT = "SELECT name FROM products WHERE sku = '{sku}'"


@pytest.mark.usefixtures("pos_schema")
def test_learn_review_approve_enforce(
    start_proxy: StartProxy,
    terminal_pki: TerminalPKI,
    pg_cluster: Any,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    policy_file = _policy_path(tmp_path, "cashier")
    review_file = _review_path(tmp_path)
    proxy = _policy_proxy(start_proxy, tmp_path, cashier={**EMPTY_POLICY, "mode": "learn"})
    store = "learn"
    with _connect(proxy, terminal_pki) as connection:
        connection.execute(LEARNED_INSERT.format(store=store, card=CARD, total=100))
        connection.execute(LEARNED_INSERT.format(store=store, card=CARD, total=250))
        assert connection.execute(LEARNED_SELECT.format(sku=PEN)).fetchone() == ("Ballpoint pen, blue",)
        assert connection.execute("SELECT 1").fetchone() == (1,)  # housekeeping: not learned
    assert _sales(pg_cluster, store) == 2  # learn mode runs everything

    entries = _wait_for_review(review_file, lambda found: sum(entry.count for entry in found) >= 3)
    assert {(entry.role, entry.count, entry.text) for entry in entries} == {
        ("cashier", 2, "INSERT INTO sales (store_id, terminal_id, total_cents) VALUES ($1, $2, $3)"),
        ("cashier", 1, "SELECT name FROM products WHERE sku = $1"),
    }
    assert {entry.policy_file for entry in entries} == {str(policy_file)}
    assert all(re.fullmatch(r"[0-9a-f]{16}", entry.fingerprint) for entry in entries)
    assert CARD not in review_file.read_text(encoding="utf-8")

    code, out, err = _cli(capsys, "policy", "review", review_file)
    assert code == 0, err
    assert f"role cashier (policy {policy_file}): 2 statement(s) to review" in out
    for entry in entries:
        assert entry.fingerprint in out
        assert entry.text in out
    assert CARD not in out

    code, out, err = _cli(capsys, "policy", "approve", review_file, "--role", "cashier", "--all")
    assert code == 0, err
    assert f"approved 2 statement(s) for role cashier into {policy_file}" in out
    policy = yaml.safe_load(policy_file.read_text(encoding="utf-8"))
    assert {item["fingerprint"] for item in policy["fingerprints"]} == {e.fingerprint for e in entries}
    assert read_review(review_file) == []

    policy["mode"] = "enforce"
    _write_policy(policy_file, policy)
    assert _sighup(proxy)["event"] == "reload_applied"

    with _connect(proxy, terminal_pki) as connection:
        # Other literals, same fingerprint: allowed. The extended protocol's $n too.
        connection.execute(LEARNED_INSERT.format(store=store, card="5500000000000004", total=7))
        assert connection.execute(LEARNED_SELECT.format(sku=CHOCOLATE)).fetchone() == ("Chocolate bar 50 g",)
        assert connection.execute("SELECT name FROM products WHERE sku = %s", (PEN,)).fetchone() == (
            "Ballpoint pen, blue",
        )
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match="statement kind DELETE"):
            connection.execute(f"DELETE FROM sales WHERE store_id = '{store}'")
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match="statement kind SELECT"):
            connection.execute("SELECT price_cents FROM products WHERE sku = %s", (PEN,))
    assert _sales(pg_cluster, store) == 3
    assert proxy.wait_for_event("policy_violation", rule="statement kind")["role"] == "cashier"


def test_approved_statements_do_not_come_back_to_the_review_file(
    start_proxy: StartProxy,
    terminal_pki: TerminalPKI,
    pos_schema: None,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    policy_file = _policy_path(tmp_path, "cashier")
    review_file = _review_path(tmp_path)
    proxy = _policy_proxy(start_proxy, tmp_path, cashier={**EMPTY_POLICY, "mode": "learn"})
    with _connect(proxy, terminal_pki) as connection:
        connection.execute(LEARNED_SELECT.format(sku=PEN))
    [approved] = _wait_for_review(review_file, lambda found: len(found) == 1)
    code, _, err = _cli(
        capsys, "policy", "approve", review_file, "--role", "cashier", "--fingerprint", approved.fingerprint
    )
    assert code == 0, err
    assert read_review(review_file) == []
    assert _sighup(proxy)["event"] == "reload_applied"  # still learning, now with the approval
    assert approved.fingerprint in policy_file.read_text(encoding="utf-8")

    with _connect(proxy, terminal_pki) as connection:
        connection.execute("SELECT price_cents FROM products WHERE sku = 'x'")
    entries = _wait_for_review(review_file, lambda found: any("price_cents" in e.text for e in found))
    assert approved.fingerprint not in {entry.fingerprint for entry in entries}


# --- reload ---


def test_sighup_with_a_broken_policy_keeps_the_old_one(
    start_proxy: StartProxy, terminal_pki: TerminalPKI, pos_schema: None, tmp_path: Path
) -> None:
    proxy = _policy_proxy(start_proxy, tmp_path)
    policy_file = _policy_path(tmp_path, "cashier")
    with _connect(proxy, terminal_pki) as before:
        assert before.execute(LEARNED_SELECT.format(sku=PEN)).fetchone() == ("Ballpoint pen, blue",)
        for broken in ("mode: [enforce\nallow: {", yaml.safe_dump({**CASHIER_POLICY, "mode": "block"})):
            policy_file.write_text(broken, encoding="utf-8")
            record = _sighup(proxy)
            assert record["event"] == "reload_failed", record
            assert "roles.cashier.policy" in record["error"], record
            # The session that was open keeps working under the old policy...
            assert before.execute(LEARNED_SELECT.format(sku=CHOCOLATE)).fetchone() == ("Chocolate bar 50 g",)
            with pytest.raises(psycopg.errors.InsufficientPrivilege, match="statement kind DROP"):
                before.execute("DROP TABLE sales")
            # ...and so do new sessions.
            with _connect(proxy, terminal_pki) as after:
                assert after.execute(LEARNED_SELECT.format(sku=PEN)).fetchone() == ("Ballpoint pen, blue",)
                with pytest.raises(psycopg.errors.InsufficientPrivilege, match="statement kind DELETE"):
                    after.execute("DELETE FROM sales WHERE id = 0")
    assert _events(proxy, "reload_applied") == []


def test_a_reload_that_changes_the_mode_applies_to_open_sessions(
    start_proxy: StartProxy, terminal_pki: TerminalPKI, pos_schema: None, tmp_path: Path
) -> None:
    proxy = _policy_proxy(start_proxy, tmp_path, cashier={**CASHIER_POLICY, "mode": "monitor"})
    policy_file = _policy_path(tmp_path, "cashier")
    with _connect(proxy, terminal_pki) as connection:
        connection.execute("DELETE FROM sales WHERE id = 0")  # monitor: logged, not refused
        assert proxy.wait_for_event("policy_would_refuse")["rule"] == "statement kind"
        _write_policy(policy_file, {**CASHIER_POLICY, "mode": "enforce"})
        assert _sighup(proxy)["event"] == "reload_applied"
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match="statement kind DELETE"):
            connection.execute("DELETE FROM sales WHERE id = 0")
        _write_policy(policy_file, {**CASHIER_POLICY, "mode": "monitor"})
        assert _sighup(proxy)["event"] == "reload_applied"
        connection.execute("DELETE FROM sales WHERE id = 0")


# --- housekeeping ---


def test_housekeeping_lets_clients_connect_under_an_empty_policy(
    empty_policy_proxy: ProxyProcess, terminal_pki: TerminalPKI
) -> None:
    proxy = empty_policy_proxy
    script = "\n".join(
        [
            "SELECT 1;",
            "SHOW TimeZone;",
            "BEGIN;",
            "SELECT current_database();",
            "COMMIT;",
            "SET application_name = 'till';",
            "SELECT name FROM products;",  # line 7: not housekeeping
        ]
    )
    result = _psql(proxy, terminal_pki, script + "\n")
    assert result.returncode == 0, result.stderr
    assert _psql_errors(result) == [(7, "42501", "statement kind SELECT is not allowed for role cashier")]
    lines = result.stdout.splitlines()
    assert lines[0] == "1"
    assert len(lines) == 3 and lines[2] == "pos", result.stdout

    with _connect(proxy, terminal_pki) as connection:  # psycopg: extended protocol too
        assert connection.execute("SELECT 5", prepare=True).fetchone() == (5,)
        with connection.transaction():
            connection.execute("SELECT 1")


async def test_housekeeping_lets_asyncpg_connect_under_an_empty_policy(
    empty_policy_proxy: ProxyProcess, terminal_pki: TerminalPKI
) -> None:
    proxy = empty_policy_proxy
    connection = await _asyncpg(proxy, terminal_pki)
    try:
        assert await connection.fetchval("SELECT 1") == 1
        async with connection.transaction():
            assert await connection.fetchval("SELECT current_database()") == "pos"
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await connection.fetch("SELECT name FROM products")
    finally:
        await connection.close()


def test_without_housekeeping_even_select_1_is_refused(
    start_proxy: StartProxy, terminal_pki: TerminalPKI, pos_schema: None, tmp_path: Path
) -> None:
    proxy = _policy_proxy(start_proxy, tmp_path, cashier={**EMPTY_POLICY, "housekeeping": False})
    result = _psql(proxy, terminal_pki, "SELECT 1;\nBEGIN;\n")
    assert _psql_errors(result) == [
        (1, "42501", "statement kind SELECT is not allowed for role cashier"),
        (2, "42501", "statement kind BEGIN is not allowed for role cashier"),
    ], result.stderr
    assert result.stdout == ""
    proxy.wait_for_event("policy_violation", rule="statement kind", statements=["SELECT $1"])


async def test_startup_settings_cannot_change_how_names_or_strings_are_read(
    start_proxy: Callable[..., ProxyProcess], terminal_pki: TerminalPKI, tmp_path: Path
) -> None:
    policy = tmp_path / "cashier-startup.yaml"
    policy.write_text("mode: enforce\nallow:\n  kinds: [SELECT]\n  read: [products]\n", encoding="utf-8")
    proxy = start_proxy(roles={"cashier": {"policy": str(policy)}})
    context = proxy.ssl_context(terminal_pki.cashier, terminal_pki.ca)

    async def connect(**settings: str) -> asyncpg.Connection:
        return await asyncpg.connect(
            host="127.0.0.1",
            port=proxy.port,
            user="till-01",
            database="pos",
            ssl=context,
            timeout=10,
            server_settings=settings,
        )

    with pytest.raises(asyncpg.InsufficientPrivilegeError, match="search_path must match"):
        await connect(search_path="evil, public")
    with pytest.raises(asyncpg.PostgresError, match="standard_conforming_strings must be on"):
        await connect(standard_conforming_strings="off")
    connection = await connect(search_path="public")
    try:
        assert await connection.fetchval("SELECT 1") == 1
    finally:
        await connection.close()
