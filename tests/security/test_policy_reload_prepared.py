"""A policy reload applies to statements prepared before it (issue 15, item 2).

A cashier prepares a statement its policy allows, the operator takes that right away and
reloads (SIGHUP), and the cashier runs the prepared statement again: through a protocol-level
named statement (raw, psycopg prepare=True, asyncpg), the unnamed statement parsed in an
earlier cycle, SQL PREPARE/EXECUTE, and a portal bound before the reload. Each must be refused
(42501) without running, the session must stay usable, and the audit log must say it was
refused when it was about to run. Both pool modes, one server connection.
"""

from __future__ import annotations

import json
import secrets
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import psycopg
import pytest

from proxy.protocols.postgres import messages as m
from tests.integration.proxyproc import ProxyProcess, TerminalPKI
from tests.integration.test_policies import (
    CASHIER_POLICY,
    EXECUTE,
    SCHEMA,
    SYNC,
    _assert_serves,
    _bind,
    _error,
    _parse,
    _policy_overrides,
    _policy_path,
    _sighup,
    _write_policy,
)
from tests.integration.test_postgres_robustness import data_row_values, raw_session, run_query

StartProxy = Callable[..., ProxyProcess]
STOCK = "SELECT quantity FROM stock WHERE store_id = $1 AND sku = $2"
STOCK_SQL = "SELECT quantity FROM stock WHERE store_id = 'store-001' AND sku = '4006381333931'"
PRICE = "SELECT price_cents FROM products WHERE sku = $1"
PEN = "4006381333931"
# Before: the cashier reads stock (and may prepare in SQL). After: not stock any more.
BEFORE = {
    **CASHIER_POLICY,
    "allow": {
        **CASHIER_POLICY["allow"],
        "kinds": ["SELECT", "INSERT", "UPDATE", "PREPARE", "EXECUTE", "DEALLOCATE"],
    },
}
AFTER = {**BEFORE, "allow": {**BEFORE["allow"], "read": ["products"], "write": ["sales", "sale_items"]}}
REFUSED = ("42501", "reading table public.stock is not allowed for role cashier")


@dataclass
class ReloadingProxy:
    proxy: ProxyProcess
    policy_file: Path
    audit_file: Path

    def forbid_stock(self) -> None:
        _write_policy(self.policy_file, AFTER)
        assert _sighup(self.proxy)["event"] == "reload_applied"

    def audit_records(self) -> list[dict[str, Any]]:
        self.proxy.stop()  # the audit writer flushes on the way out
        return [json.loads(line) for line in self.audit_file.read_text().splitlines()]


@pytest.fixture(scope="module")
def pos_schema(pg_cluster: Any) -> None:
    with psycopg.connect(**pg_cluster.connect_kwargs(user="postgres"), autocommit=True) as admin:
        admin.execute(SCHEMA)


@pytest.fixture(params=["transaction", "session"])
def reloading(
    request: pytest.FixtureRequest, start_proxy: StartProxy, tmp_path: Path, pos_schema: None
) -> ReloadingProxy:
    key = tmp_path / "audit.key"
    key.touch(mode=0o600)
    key.write_bytes(secrets.token_bytes(32))
    audit_file = tmp_path / "audit.log"
    proxy = start_proxy(
        **_policy_overrides(tmp_path, BEFORE),
        audit={"file": str(audit_file), "key_file": str(key)},
        routes={"pos": {"pool": {"mode": request.param, "size": 1}}},
    )
    return ReloadingProxy(proxy, _policy_path(tmp_path, "cashier"), audit_file)


def rows(received: list[tuple[bytes, bytes]]) -> list[list[bytes | None]]:
    return [data_row_values(payload) for kind, payload in received if kind == b"D"]


def assert_refused_without_running(received: list[tuple[bytes, bytes]]) -> None:
    error = _error(received)
    assert (error["C"], error["M"]) == REFUSED, received
    assert rows(received) == [], received
    assert received[-1] == (b"Z", b"I"), received


def assert_audited_on_run(reloading: ReloadingProxy, on: str) -> None:
    """The violation and the refused statement are recorded as refused when about to run."""
    records = reloading.audit_records()
    violations = [record for record in records if record.get("event") == "policy_violation"]
    assert violations, "the refusal was not audited"
    assert violations[-1]["rule"] == "table read" and violations[-1]["on"] == on, violations[-1]
    refused = [record for record in records if record.get("decision") == "refused"]
    assert any(record.get("on") == on for record in refused), refused
    assert all(record["statement"].startswith("SELECT quantity FROM stock") for record in refused), refused


def test_named_statement_prepared_before_a_reload_is_refused_at_bind(
    reloading: ReloadingProxy, terminal_pki: TerminalPKI
) -> None:
    with raw_session(reloading.proxy, terminal_pki, terminal_pki.cashier) as cashier:
        cashier.send(_parse("stock", STOCK) + _parse("price", PRICE) + SYNC)
        assert [kind for kind, _ in cashier.read_until_ready()] == [b"1", b"1", b"Z"]
        cashier.send(_bind("stock", "store-001", PEN) + EXECUTE + SYNC)
        assert rows(cashier.read_until_ready()) == [[b"100"]]

        reloading.forbid_stock()
        for _ in range(2):  # refused each time, not only the first
            cashier.send(_bind("stock", "store-001", PEN) + EXECUTE + SYNC)
            assert_refused_without_running(cashier.read_until_ready())
        # What the new policy still allows keeps running.
        cashier.send(_bind("price", PEN) + EXECUTE + SYNC)
        assert rows(cashier.read_until_ready()) == [[b"129"]]
        _assert_serves(cashier)
    assert_audited_on_run(reloading, "bind after policy reload")


def test_unnamed_statement_parsed_before_a_reload_is_refused_at_bind(
    reloading: ReloadingProxy, terminal_pki: TerminalPKI
) -> None:
    with raw_session(reloading.proxy, terminal_pki, terminal_pki.cashier) as cashier:
        cashier.send(_parse("", STOCK) + SYNC)
        assert [kind for kind, _ in cashier.read_until_ready()] == [b"1", b"Z"]
        reloading.forbid_stock()
        cashier.send(_bind("", "store-001", PEN) + EXECUTE + SYNC)
        assert_refused_without_running(cashier.read_until_ready())
        _assert_serves(cashier)
    assert_audited_on_run(reloading, "bind after policy reload")


def test_psycopg_prepared_statement_is_refused_after_a_reload(
    reloading: ReloadingProxy, terminal_pki: TerminalPKI
) -> None:
    with psycopg.connect(
        **reloading.proxy.conninfo(terminal_pki.cashier, terminal_pki.ca), autocommit=True
    ) as conn:
        query = "SELECT quantity FROM stock WHERE store_id = %s AND sku = %s"
        for _ in range(2):
            assert conn.execute(query, ("store-001", PEN), prepare=True).fetchone() == (100,)
        reloading.forbid_stock()
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match=r"reading table public\.stock"):
            conn.execute(query, ("store-001", PEN), prepare=True)
        assert conn.execute(
            "SELECT price_cents FROM products WHERE sku = %s", (PEN,), prepare=True
        ).fetchone() == (129,)


async def test_asyncpg_prepared_statement_is_refused_after_a_reload(
    reloading: ReloadingProxy, terminal_pki: TerminalPKI
) -> None:
    proxy = reloading.proxy
    conn = await asyncpg.connect(
        host="127.0.0.1",
        port=proxy.port,
        user=terminal_pki.cashier.terminal,
        database="pos",
        ssl=proxy.ssl_context(terminal_pki.cashier, terminal_pki.ca),
        timeout=15,
    )
    try:
        statement = await conn.prepare(STOCK)
        assert await statement.fetchval("store-001", PEN) == 100
        reloading.forbid_stock()
        with pytest.raises(asyncpg.InsufficientPrivilegeError, match=r"reading table public\.stock"):
            await statement.fetchval("store-001", PEN)
        assert await conn.fetchval(PRICE, PEN) == 129
    finally:
        await conn.close()


def test_sql_prepare_then_execute_after_a_reload_is_refused(
    reloading: ReloadingProxy, terminal_pki: TerminalPKI
) -> None:
    with raw_session(reloading.proxy, terminal_pki, terminal_pki.cashier) as cashier:
        assert [kind for kind, _ in run_query(cashier, f"PREPARE stock_q AS {STOCK_SQL}")] == [b"C", b"Z"]
        assert rows(run_query(cashier, "EXECUTE stock_q")) == [[b"100"]]
        reloading.forbid_stock()
        assert_refused_without_running(run_query(cashier, "EXECUTE stock_q"))
        # Through the extended protocol too, and a statement that only names it.
        cashier.send(_parse("", "EXECUTE stock_q") + _bind("") + EXECUTE + SYNC)
        assert_refused_without_running(cashier.read_until_ready())
        _assert_serves(cashier)
    violations = [record for record in reloading.audit_records() if record.get("event") == "policy_violation"]
    assert violations[-1]["rule"] == "table read on execute", violations[-1]


def test_protocol_statement_that_executes_a_sql_prepared_one_is_decided_again(
    reloading: ReloadingProxy, terminal_pki: TerminalPKI
) -> None:
    with raw_session(reloading.proxy, terminal_pki, terminal_pki.cashier) as cashier:
        assert [kind for kind, _ in run_query(cashier, f"PREPARE stock_q AS {STOCK_SQL}")] == [b"C", b"Z"]
        cashier.send(_parse("run_it", "EXECUTE stock_q") + _bind("run_it") + EXECUTE + SYNC)
        assert rows(cashier.read_until_ready()) == [[b"100"]]
        reloading.forbid_stock()
        cashier.send(_bind("run_it") + EXECUTE + SYNC)
        assert_refused_without_running(cashier.read_until_ready())
        _assert_serves(cashier)


def test_execute_of_a_name_the_session_never_prepared_is_refused(
    reloading: ReloadingProxy, terminal_pki: TerminalPKI
) -> None:
    with raw_session(reloading.proxy, terminal_pki, terminal_pki.cashier) as cashier:
        error = _error(run_query(cashier, "EXECUTE someone_elses"))
        assert (error["C"], error["M"]) == ("26000", 'prepared statement "someone_elses" does not exist')
        # After DEALLOCATE the name is gone for the proxy too.
        run_query(cashier, "PREPARE mine AS SELECT price_cents FROM products")
        assert [kind for kind, _ in run_query(cashier, "DEALLOCATE mine")] == [b"C", b"Z"]
        assert _error(run_query(cashier, "EXECUTE mine"))["C"] == "26000"
        _assert_serves(cashier)


def _bind_portal(portal: str, statement: str, *params: str) -> bytes:
    return m.build_message(b"B", portal.encode() + _bind(statement, *params)[5:])


def _execute_portal(name: str, max_rows: int) -> bytes:
    return m.build_message(b"E", name.encode() + b"\x00" + struct.pack("!i", max_rows))


def test_portal_bound_before_a_reload_does_not_run_after_it(
    reloading: ReloadingProxy, terminal_pki: TerminalPKI
) -> None:
    with raw_session(reloading.proxy, terminal_pki, terminal_pki.cashier) as cashier:
        assert [kind for kind, _ in run_query(cashier, "BEGIN")] == [b"C", b"Z"]
        cashier.send(
            _parse("", STOCK) + _bind_portal("cur", "", "store-001", PEN) + _execute_portal("cur", 0) + SYNC
        )
        received = cashier.read_until_ready()
        assert rows(received) == [[b"100"]] and received[-1] == (b"Z", b"T"), received
        cashier.send(_bind_portal("cur2", "", "store-001", PEN) + SYNC)
        assert [kind for kind, _ in cashier.read_until_ready()] == [b"2", b"Z"]
        reloading.forbid_stock()
        cashier.send(_execute_portal("cur2", 0) + SYNC)
        received = cashier.read_until_ready()
        assert _error(received)["C"] == "42501" and rows(received) == [], received
        assert [kind for kind, _ in run_query(cashier, "ROLLBACK")] == [b"C", b"Z"]
        _assert_serves(cashier)


def test_sql_execute_of_a_protocol_prepared_statement_is_decided_by_its_text(
    reloading: ReloadingProxy, terminal_pki: TerminalPKI
) -> None:
    """EXECUTE of a name the cashier prepared with Parse runs only what the current policy allows
    of the text behind the name; so does a Bind of a name it prepared in SQL (session pooling
    passes both names to the server as they are)."""
    with raw_session(reloading.proxy, terminal_pki, terminal_pki.cashier) as cashier:
        cashier.send(_parse("stock", STOCK) + SYNC)
        assert [kind for kind, _ in cashier.read_until_ready()] == [b"1", b"Z"]
        assert rows(run_query(cashier, f"EXECUTE stock('store-001', '{PEN}')")) == [[b"100"]]
        assert [kind for kind, _ in run_query(cashier, f"PREPARE stock_q AS {STOCK_SQL}")] == [b"C", b"Z"]
        reloading.forbid_stock()
        assert_refused_without_running(run_query(cashier, f"EXECUTE stock('store-001', '{PEN}')"))
        cashier.send(_bind("stock_q") + EXECUTE + SYNC)
        received = cashier.read_until_ready()
        assert rows(received) == [] and _error(received)["C"] in ("42501", "26000"), received
        _assert_serves(cashier)
