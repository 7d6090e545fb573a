"""Database faults under a write ledger (issue 17): PostgreSQL killed, stopped, or its backends
terminated while tills sell through the proxy, in both pool modes. After each: no committed sale
lost, none doubled, every unknown one settled by reading it back, every error a clean one, and
the pool refilled by itself with nothing dirty in it. docs/reliability.md has the matrix."""

from __future__ import annotations

import contextlib
import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import psycopg
import pytest

from proxy.localpg import LocalPostgres, free_port
from tests.integration.conftest import OwnCluster
from tests.integration.ledger import Fleet, Ledger, Target, stored_sales
from tests.integration.proxyproc import ProxyProcess, TerminalPKI
from tests.integration.test_admin import TOKEN, _call
from tests.integration.test_upstream_resilience import _wait_for

StartProxy = Callable[..., ProxyProcess]

MAX_CLIENT_WAIT = 4.0
CONNECT_TIMEOUT = 1.0
# Nothing a till does may take longer than waiting its turn plus one connect, plus slack for a
# loaded two-core test machine.
OPERATION_BOUND = MAX_CLIENT_WAIT + 2 * CONNECT_TIMEOUT + 4.0
# A till gives the proxy longer than its max_client_wait to answer a connect: the proxy, not the
# till's own timeout, must be the one that says the database is not there.
TILL_CONNECT_TIMEOUT = MAX_CLIENT_WAIT + 2 * CONNECT_TIMEOUT + 1.0
POOL_SIZE = 6  # five tills and room to spare: in session mode each holds one
DOWN_AFTER_KILL = 3.0
STOPPED_FOR = 10.0


@dataclass(frozen=True, slots=True)
class Fault:
    name: str
    inject: Callable[[LocalPostgres], None]  # returns once the database is back


def _proxy_backends(server: LocalPostgres, columns: str) -> list[list[str]]:
    rows = server.psql(
        f"SELECT {columns} FROM pg_stat_activity WHERE usename = 'pos_proxy' AND pid <> pg_backend_pid()",
        dbname="pos",
    )
    return [line.split("|") for line in rows.splitlines() if line]


def _wait_for_tills_mid_transaction_and_mid_copy(server: LocalPostgres) -> None:
    """Until a till is inside a transaction and another inside a COPY (a third thinks between
    sales): the moment to strike."""

    def both() -> bool:
        states = _proxy_backends(server, "state, upper(left(query, 4))")
        in_copy = any(state == "active" and query == "COPY" for state, query in states)
        return in_copy and any(state == "idle in transaction" for state, _query in states)

    _wait_for(both, 10, "tills mid-transaction and mid-COPY")


def _kill(server: LocalPostgres) -> None:
    _wait_for_tills_mid_transaction_and_mid_copy(server)
    server.kill_server_only()
    time.sleep(DOWN_AFTER_KILL)
    server.start_server_only()


def _stop(server: LocalPostgres) -> None:
    _wait_for_tills_mid_transaction_and_mid_copy(server)
    server.stop_server_only(mode="fast")
    time.sleep(STOPPED_FOR)
    server.start_server_only()


def _terminate(server: LocalPostgres) -> None:
    _wait_for_tills_mid_transaction_and_mid_copy(server)
    ended = _proxy_backends(server, "pg_terminate_backend(pid)")
    assert ended and all(row == ["t"] for row in ended), ended


FAULTS = [
    Fault("sigkill-restart-after-3s", _kill),
    Fault("stopped-for-10s", _stop),
    Fault("pg_terminate_backend", _terminate),
]


def _pool(admin_port: int, admin_host: str = "127.0.0.1") -> dict[str, Any]:
    (pool,) = json.loads(_call(admin_port, "/v1/pools", host=admin_host)[1])["pools"]
    return pool  # type: ignore[no-any-return]


def _assert_pool_holds_only_clean_connections(
    admin_port: int, server: LocalPostgres, target: Target, *, admin_host: str = "127.0.0.1"
) -> None:
    """Every server connection the pool keeps is idle, outside any transaction, and as new: a
    fresh terminal on each of them finds no setting or temporary table of the tills before."""
    _wait_for(
        lambda: (
            (pool := _pool(admin_port, admin_host))["active"] == 0
            and pool["opening"] == 0
            and pool["waiting"] == 0
        ),
        10,
        "the pool at rest",
    )
    pool = _pool(admin_port, admin_host)
    backends = _proxy_backends(server, "pid, state, backend_xid IS NULL")
    assert pool["upstream_up"] is True
    # What the pool keeps is all there is on the server: nothing leaked, nothing half-closed.
    assert 1 <= pool["idle"] == len(backends), (pool, backends)
    assert all(state == "idle" and no_xid == "t" for _pid, state, no_xid in backends), backends
    with contextlib.ExitStack() as stack:
        terminals = [
            stack.enter_context(psycopg.connect(**target.psycopg_conninfo(), autocommit=True))
            for _ in range(POOL_SIZE)
        ]
        seen: dict[int, tuple[object, ...]] = {}
        for terminal in terminals:
            terminal.execute("BEGIN")  # holds its server connection in transaction mode too
            row = terminal.execute(
                "SELECT pg_backend_pid(), current_setting('ledger.till', true),"
                " (SELECT count(*) FROM pg_class WHERE relnamespace = pg_my_temp_schema())"
            ).fetchone()
            assert row is not None
            seen[row[0]] = row[1:]
        for terminal in terminals:
            terminal.execute("ROLLBACK")
    assert {int(pid) for pid, _state, _no_xid in backends} <= seen.keys(), (
        "a pooled connection went unchecked"
    )
    dirty = {pid: state for pid, state in seen.items() if state not in ((None, 0), ("", 0))}
    assert not dirty, f"server connections carrying a till's session state: {dirty}"


@pytest.mark.parametrize(
    ("fault", "mode"),
    [
        pytest.param(
            fault,
            mode,
            id=f"{fault.name}-{mode}",
        )
        for fault in FAULTS
        for mode in ("session", "transaction")
    ],
)
def test_a_database_fault_loses_no_sale_and_doubles_none(
    fault: Fault, mode: str, start_proxy: StartProxy, terminal_pki: TerminalPKI, durable_cluster: OwnCluster
) -> None:
    server = durable_cluster.server
    token_file = durable_cluster.password_file.with_name("admin-token")
    token_file.write_text(TOKEN + "\n", encoding="utf-8")
    admin_port = free_port()
    proxy = start_proxy(
        routes={
            "pos": durable_cluster.route(
                mode=mode,
                size=POOL_SIZE,
                max_client_wait=f"{MAX_CLIENT_WAIT:g}s",
                connect_timeout=f"{CONNECT_TIMEOUT:g}s",
                connect_retry_delay="100ms",
                connect_retry_max_delay="1s",
            )
        },
        admin={"host": "127.0.0.1", "port": admin_port, "token": {"file": str(token_file)}},
        # The tills share one certificate: the one terminal may have the whole pool.
        roles={"cashier": {"limits": {"max_server_connections_per_terminal": POOL_SIZE}}},
    )
    proxy.wait_for_event("admin_listening")
    target = Target(proxy, terminal_pki, TILL_CONNECT_TIMEOUT)
    ledger = Ledger()
    fleet = Fleet(ledger, target, OPERATION_BOUND)
    fleet.start()
    try:
        started = time.monotonic()
        fleet.wait_all_selling_since(started, 15, "every till selling")
        fault.inject(server)
        back = time.monotonic()
        # The pool refills by itself: every till sells again, without a proxy restart.
        fleet.wait_all_selling_since(back, OPERATION_BOUND + 5, "every till selling again")
    finally:
        hung = fleet.stop()
    assert not hung, f"tills hung: {hung}"

    report = ledger.check(stored_sales(server))
    print(f"\n{fault.name} / {mode}: {report.summary()}; {len(ledger.failures)} errors")
    for failure in ledger.failures:
        print(f"  {failure}")
    report.assert_sound()
    unclean = [failure for failure in ledger.failures if not failure.clean]
    assert not unclean, unclean
    assert ledger.failures, "the fault never reached a till"
    for till in fleet.tills:
        assert till.slowest < OPERATION_BOUND, f"{till.name} waited {till.slowest:.1f}s"
    if fault.inject is _stop:
        # The tills that came while it was down waited their turn, then were told why.
        gave_up = [f for f in ledger.failures if f.sqlstate == "08001" or "could not connect" in f.error]
        assert gave_up, ledger.failures
        assert all(MAX_CLIENT_WAIT - 0.5 <= f.took < OPERATION_BOUND for f in gave_up), gave_up
    _assert_pool_holds_only_clean_connections(admin_port, server, target)


def test_a_statement_waits_no_longer_than_max_client_wait_while_the_database_is_down(
    start_proxy: StartProxy, terminal_pki: TerminalPKI, own_cluster: OwnCluster
) -> None:
    max_client_wait = 3.0
    proxy = start_proxy(
        routes={
            "pos": own_cluster.route(mode="transaction", size=4, max_client_wait=f"{max_client_wait:g}s")
        },
        roles={"cashier": {"limits": {"max_server_connections_per_terminal": 1}}},
    )
    conninfo = proxy.conninfo(terminal_pki.cashier, terminal_pki.ca)
    with (
        psycopg.connect(**conninfo, autocommit=True) as first,
        psycopg.connect(**conninfo, autocommit=True) as second,
    ):
        own_cluster.server.stop_server_only(mode="fast")
        waits: dict[str, float] = {}

        def run(name: str, till: psycopg.Connection[Any]) -> None:
            started = time.monotonic()
            with contextlib.suppress(psycopg.Error):
                till.execute("SELECT 1")
            waits[name] = time.monotonic() - started

        # The first holds the terminal's one share while it waits for the pool; the second waits
        # for that share, and gets it when the first gives up.
        holder = threading.Thread(target=run, args=("first", first), daemon=True)
        holder.start()
        time.sleep(0.5)
        run("second", second)
        holder.join(2 * max_client_wait + 5)
    assert waits["first"] < max_client_wait + 1, waits
    assert waits["second"] < max_client_wait + 1, waits  # measured: 5.5 s
