"""Pooled server connections carry no prepared statement from one terminal to the next (issue 15, 2).

A cashier holding a valid certificate tries to reach what another terminal (a manager, allowed
to read the payroll) left on a shared server connection: the unnamed statement and portal,
the proxy's server-side name of a named statement, SQL EXECUTE and DEALLOCATE of that name.
A pool of one server connection puts both terminals on the same one (pg_backend_pid() shows it).
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest

from proxy.protocols.postgres import messages as m
from proxy.protocols.postgres.prepared import Statement
from tests.integration.proxyproc import ProxyProcess, TerminalPKI, deep_merge
from tests.integration.test_policies import (
    CASHIER_POLICY,
    EXECUTE,
    MANAGER_POLICY,
    SCHEMA,
    SYNC,
    _assert_serves,
    _bind,
    _error,
    _parse,
    _policy_overrides,
)
from tests.integration.test_postgres_robustness import RawClient, data_row_values, raw_session, run_query

PAYROLL = "SELECT employee, salary_cents FROM payroll"
PAYROLL_SCHEMA = """
CREATE TABLE IF NOT EXISTS public.payroll (employee text PRIMARY KEY, salary_cents integer NOT NULL);
ALTER TABLE public.payroll OWNER TO pos_proxy;
INSERT INTO public.payroll VALUES ('alice', 990000) ON CONFLICT DO NOTHING;
"""
# Drivers prepare and deallocate in SQL too: a policy may well allow it.
CASHIER = {
    **CASHIER_POLICY,
    "allow": {
        **CASHIER_POLICY["allow"],
        "kinds": ["SELECT", "INSERT", "UPDATE", "PREPARE", "EXECUTE", "DEALLOCATE"],
    },
}
MANAGER = {
    **MANAGER_POLICY,
    "allow": {**MANAGER_POLICY["allow"], "read": [*MANAGER_POLICY["allow"]["read"], "payroll"]},
}
ONE_CONNECTION = {"pool": {"mode": "transaction", "size": 1}}


def describe_statement(name: str) -> bytes:
    return m.build_message(b"D", b"S" + name.encode() + b"\x00")


def execute_portal(name: str = "") -> bytes:
    return m.build_message(b"E", name.encode() + b"\x00" + struct.pack("!i", 0))


@pytest.fixture(scope="module")
def payroll_schema(pg_cluster: Any) -> None:
    with psycopg.connect(**pg_cluster.connect_kwargs(user="postgres"), autocommit=True) as admin:
        admin.execute(SCHEMA)
        admin.execute(PAYROLL_SCHEMA)


@pytest.fixture(scope="module")
def pooled_proxy(
    base_config: dict[str, Any], tmp_path_factory: pytest.TempPathFactory, payroll_schema: None
) -> Iterator[ProxyProcess]:
    """Transaction pooling over one server connection; the cashier and manager policies above."""
    directory = tmp_path_factory.mktemp("pooled")
    overrides = _policy_overrides(directory, CASHIER, MANAGER)
    process = ProxyProcess(
        directory / "proxy", deep_merge(base_config, {**overrides, "routes": {"pos": ONE_CONNECTION}})
    )
    process.start()
    yield process
    process.stop()


def backend_pid(client: RawClient) -> bytes:
    rows = [
        data_row_values(payload)
        for kind, payload in run_query(client, "SELECT pg_backend_pid()")
        if kind == b"D"
    ]
    assert len(rows) == 1, rows
    value = rows[0][0]
    assert value is not None
    return value


def assert_nothing_of_the_payroll(received: list[tuple[bytes, bytes]]) -> None:
    """No row, no row description, no parameter description: nothing of the statement reached the cashier."""
    assert not {kind for kind, _ in received} & {b"D", b"T", b"t", b"2", b"C"}, received
    assert b"alice" not in b"".join(payload for _, payload in received)


@pytest.mark.parametrize(
    "reuse",
    [_bind("") + EXECUTE, describe_statement(""), _bind("") + describe_statement("") + EXECUTE],
    ids=["bind-execute", "describe", "bind-describe-execute"],
)
def test_cashier_cannot_reach_the_unnamed_statement_a_manager_left(
    pooled_proxy: ProxyProcess, terminal_pki: TerminalPKI, reuse: bytes
) -> None:
    with (
        raw_session(pooled_proxy, terminal_pki, terminal_pki.manager) as manager,
        raw_session(pooled_proxy, terminal_pki, terminal_pki.cashier) as cashier,
    ):
        manager_pid = backend_pid(manager)
        # The manager runs the payroll through the unnamed statement; it stays on the server connection.
        manager.send(_parse("", PAYROLL) + _bind("") + EXECUTE + SYNC)
        received = manager.read_until_ready()
        assert [data_row_values(payload) for kind, payload in received if kind == b"D"] == [
            [b"alice", b"990000"]
        ]
        assert backend_pid(cashier) == manager_pid  # but that query dropped it: leave it again
        manager.send(_parse("", PAYROLL) + SYNC)
        assert [kind for kind, _ in manager.read_until_ready()] == [b"1", b"Z"]

        # The cashier never parsed anything: it gets what its own server session would say.
        cashier.send(reuse + SYNC)
        received = cashier.read_until_ready()
        error = _error(received)
        assert (error["C"], error["M"]) == ("26000", "unnamed prepared statement does not exist")
        assert_nothing_of_the_payroll(received)
        assert received[-1] == (b"Z", b"I")
        _assert_serves(cashier)


def test_cashier_cannot_execute_the_unnamed_portal_a_manager_bound(
    pooled_proxy: ProxyProcess, terminal_pki: TerminalPKI
) -> None:
    with (
        raw_session(pooled_proxy, terminal_pki, terminal_pki.manager) as manager,
        raw_session(pooled_proxy, terminal_pki, terminal_pki.cashier) as cashier,
    ):
        manager.send(_parse("", PAYROLL) + _bind("") + SYNC)
        assert [kind for kind, _ in manager.read_until_ready()] == [b"1", b"2", b"Z"]
        # Portals end with their transaction, and a server connection changes hands only between
        # transactions: the server itself has no portal to run.
        cashier.send(execute_portal() + SYNC)
        received = cashier.read_until_ready()
        assert _error(received)["C"] == "34000"
        assert_nothing_of_the_payroll(received)
        _assert_serves(cashier)


def test_cashier_cannot_reach_a_managers_named_statement_by_any_name(
    pooled_proxy: ProxyProcess, terminal_pki: TerminalPKI
) -> None:
    body = PAYROLL.encode() + b"\x00" + struct.pack("!h", 0)
    server_name = Statement.from_parse_body(body).server_name.decode()
    with (
        raw_session(pooled_proxy, terminal_pki, terminal_pki.manager) as manager,
        raw_session(pooled_proxy, terminal_pki, terminal_pki.cashier) as cashier,
    ):
        manager.send(_parse("salaries", PAYROLL) + SYNC)
        assert [kind for kind, _ in manager.read_until_ready()] == [b"1", b"Z"]
        assert backend_pid(manager) == backend_pid(cashier)

        for name in ("salaries", server_name, server_name.upper()):
            for attempt in (_bind(name) + EXECUTE, describe_statement(name)):
                cashier.send(attempt + SYNC)
                received = cashier.read_until_ready()
                assert _error(received)["C"] == "26000", (name, received)
                assert_nothing_of_the_payroll(received)
        # The proxy's names are its own in SQL too, whatever the policy allows: EXECUTE runs only
        # what this session prepared in SQL, and PREPARE or DEALLOCATE of them is refused.
        for sql, sqlstate in (
            (f"EXECUTE {server_name}", "26000"),
            (f'EXECUTE "{server_name}"', "26000"),
            (f"EXPLAIN ANALYZE EXECUTE {server_name}", "42501"),  # EXPLAIN is no cashier kind
            (f"DEALLOCATE {server_name}", "42939"),
            (f"PREPARE {server_name} AS SELECT name FROM products", "42939"),
        ):
            received = run_query(cashier, sql)
            assert _error(received)["C"] == sqlstate, (sql, received)
            assert_nothing_of_the_payroll(received)
            cashier.send(_parse("", sql) + _bind("") + EXECUTE + SYNC)
            received = cashier.read_until_ready()
            assert _error(received)["C"] == sqlstate, (sql, received)
            assert_nothing_of_the_payroll(received)
        _assert_serves(cashier)

        # Nothing of the manager's was dropped either.
        manager.send(_bind("salaries") + EXECUTE + SYNC)
        received = manager.read_until_ready()
        assert [data_row_values(payload) for kind, payload in received if kind == b"D"] == [
            [b"alice", b"990000"]
        ]


def test_session_pooling_reset_leaves_nothing_for_the_next_terminal(
    start_proxy: Any, terminal_pki: TerminalPKI, payroll_schema: None
) -> None:
    """Without policies (nothing refused on the way), on one server connection in session pooling."""
    proxy = start_proxy(routes={"pos": {"pool": {"mode": "session", "size": 1}}})
    with raw_session(proxy, terminal_pki, terminal_pki.manager) as manager:
        pid = backend_pid(manager)
        manager.send(_parse("", PAYROLL) + _parse("salaries", PAYROLL) + SYNC)
        assert [kind for kind, _ in manager.read_until_ready()] == [b"1", b"1", b"Z"]
        received = run_query(manager, "PREPARE sql_salaries AS " + PAYROLL)
        assert [kind for kind, _ in received] == [b"C", b"Z"], received
    with raw_session(proxy, terminal_pki, terminal_pki.cashier) as cashier:
        assert backend_pid(cashier) == pid
        # The server's own view: no prepared statement left on this backend.
        rows = [
            data_row_values(p)
            for kind, p in run_query(cashier, "SELECT count(*) FROM pg_prepared_statements")
            if kind == b"D"
        ]
        assert rows == [[b"0"]]
        received = run_query(cashier, "EXECUTE sql_salaries")
        assert _error(received)["C"] == "26000"
        for attempt in (
            _bind("") + EXECUTE,
            describe_statement(""),
            _bind("salaries") + EXECUTE,
            execute_portal(),
        ):
            cashier.send(attempt + SYNC)
            received = cashier.read_until_ready()
            assert _error(received)["C"] in ("26000", "34000"), received
            assert_nothing_of_the_payroll(received)


def test_a_terminal_reusing_its_unnamed_statement_in_a_later_transaction_runs_its_own(
    pooled_proxy: ProxyProcess, terminal_pki: TerminalPKI
) -> None:
    """Parse in one transaction, Bind in the next (as PostgreSQL allows): in between the one server
    connection served another terminal, which parsed its own unnamed statement there."""
    price = "SELECT price_cents FROM products WHERE sku = '4006381333931'"
    with (
        raw_session(pooled_proxy, terminal_pki, terminal_pki.manager) as manager,
        raw_session(pooled_proxy, terminal_pki, terminal_pki.cashier) as cashier,
    ):
        cashier.send(_parse("", price) + describe_statement("") + SYNC)
        assert [kind for kind, _ in cashier.read_until_ready()] == [b"1", b"t", b"T", b"Z"]
        manager.send(_parse("", PAYROLL) + SYNC)
        assert [kind for kind, _ in manager.read_until_ready()] == [b"1", b"Z"]
        for _ in range(2):  # parsed again on the server once, then found there
            cashier.send(_bind("") + EXECUTE + SYNC)
            received = cashier.read_until_ready()
            assert [kind for kind, _ in received] == [b"2", b"D", b"C", b"Z"], received
            assert data_row_values(received[1][1]) == [b"129"]


def test_sql_cannot_name_the_proxys_statements_without_a_policy_either(
    start_proxy: Any, terminal_pki: TerminalPKI, payroll_schema: None
) -> None:
    """A role without a policy may run any SQL, but not another terminal's statement, nor drop it."""
    proxy = start_proxy(routes={"pos": ONE_CONNECTION})
    body = PAYROLL.encode() + b"\x00" + struct.pack("!h", 0)
    server_name = Statement.from_parse_body(body).server_name.decode()
    with (
        raw_session(proxy, terminal_pki, terminal_pki.manager) as manager,
        raw_session(proxy, terminal_pki, terminal_pki.cashier) as cashier,
    ):
        manager.send(_parse("salaries", PAYROLL) + SYNC)
        assert [kind for kind, _ in manager.read_until_ready()] == [b"1", b"Z"]
        for sql in (
            f"EXECUTE {server_name}",
            f"DEALLOCATE {server_name}",
            "DEALLOCATE PREPARE " + server_name,
        ):
            received = run_query(cashier, sql)
            assert _error(received)["C"] == "42939", (sql, received)
            assert_nothing_of_the_payroll(received)
        _assert_serves(cashier)
        manager.send(_bind("salaries") + EXECUTE + SYNC)
        received = manager.read_until_ready()
        assert [data_row_values(p) for kind, p in received if kind == b"D"] == [[b"alice", b"990000"]]


@pytest.mark.parametrize("policies", ["with policies", "without policies"])
def test_sql_execute_and_deallocate_reach_only_the_terminals_own_statements(
    request: pytest.FixtureRequest,
    start_proxy: Any,
    terminal_pki: TerminalPKI,
    payroll_schema: None,
    policies: str,
) -> None:
    """SQL EXECUTE and DEALLOCATE of protocol-prepared names work (issue 16), but only on the
    terminal's own statements: the manager's statement of the same name on the one shared server
    connection is neither run nor dropped, and a name whose Parse the policy refused holds nothing."""
    proxy = (
        request.getfixturevalue("pooled_proxy")
        if policies == "with policies"
        else start_proxy(routes={"pos": ONE_CONNECTION})
    )
    products = "SELECT name FROM products WHERE sku = '4006381333931'"
    with (
        raw_session(proxy, terminal_pki, terminal_pki.manager) as manager,
        raw_session(proxy, terminal_pki, terminal_pki.cashier) as cashier,
    ):
        manager.send(_parse("salaries", PAYROLL) + _parse("shared", PAYROLL) + SYNC)
        assert [kind for kind, _ in manager.read_until_ready()] == [b"1", b"1", b"Z"]
        assert backend_pid(manager) == backend_pid(cashier)
        for sql in ("EXECUTE salaries", "DEALLOCATE salaries", "EXECUTE shared", "DEALLOCATE PREPARE shared"):
            received = run_query(cashier, sql)
            assert _error(received)["C"] == "26000", (sql, received)
            assert_nothing_of_the_payroll(received)
        # The cashier's own statement of a name the manager uses too: its own text runs.
        cashier.send(_parse("shared", products) + SYNC)
        assert [kind for kind, _ in cashier.read_until_ready()] == [b"1", b"Z"]
        received = run_query(cashier, "EXECUTE shared")
        assert [data_row_values(p) for kind, p in received if kind == b"D"] == [[b"Ballpoint pen, blue"]], (
            received
        )
        assert [kind for kind, _ in run_query(cashier, "DEALLOCATE shared")] == [b"C", b"Z"]
        assert _error(run_query(cashier, "EXECUTE shared"))["C"] == "26000"
        if policies == "with policies":
            # A Parse the policy refuses leaves no name behind for SQL to reach.
            cashier.send(_parse("peek", PAYROLL) + SYNC)
            assert _error(cashier.read_until_ready())["C"] == "42501"
            for sql in ("EXECUTE peek", "DEALLOCATE peek"):
                received = run_query(cashier, sql)
                assert _error(received)["C"] == "26000", (sql, received)
                assert_nothing_of_the_payroll(received)
        _assert_serves(cashier)
        # The manager's statements are all still there, with the manager's text.
        for name in ("salaries", "shared"):
            manager.send(_bind(name) + EXECUTE + SYNC)
            received = manager.read_until_ready()
            assert [data_row_values(p) for kind, p in received if kind == b"D"] == [[b"alice", b"990000"]]
        if policies == "without policies":  # (EXECUTE is no kind the manager's policy allows)
            received = run_query(manager, "EXECUTE salaries")
            assert [data_row_values(p) for kind, p in received if kind == b"D"] == [[b"alice", b"990000"]]
