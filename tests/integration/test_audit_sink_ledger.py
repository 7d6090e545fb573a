"""The audit disk fills under a write ledger (issue 17): a fleet of tills sells through the proxy,
in both pool modes, while a filler file takes the audit log's tmpfs for a few seconds. After it:
no committed sale lost or doubled, every unknown one settled by reading it back; with `refuse` the
only errors the tills saw are the audit refusals and every stored sale has its statement in the
audit log; with `continue` no till saw an error and verify reports exactly the records dropped.
docs/reliability.md has the audit section."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from tests.integration.conftest import OwnCluster
from tests.integration.ledger import COPY_SALES, INSERT_SALE, Fleet, Ledger, Outcome, Target, stored_sales
from tests.integration.proxyproc import TerminalPKI
from tests.integration.test_audit_sink_full import (
    StartProxy,
    _events,
    _fill,
    _metric,
    _start,
    mounted_tmpfs,
)
from tests.integration.test_database_faults import OPERATION_BOUND, POOL_SIZE, TILL_CONNECT_TIMEOUT
from tests.security.test_audit_tail_truncation import _verify

# Room for the fleet's first seconds of records; the filler takes the rest when the test says so.
DISK_SIZE = "1m"
FULL_FOR = 3.0
# In continue mode: few enough that the outage drops records, so verify has a loss to report.
MAX_HELD_RECORDS = 30
REFUSED_MESSAGE = "the audit log cannot be written (its disk is full)"
# Fleet.start's order: the psycopg COPY till is the second; its sales arrive five to a COPY.
COPY_TILL, COPY_BATCH = "till1", 5


@pytest.mark.parametrize(
    "case",
    [
        pytest.param((mode, on_write_failure), id=f"{mode}-{on_write_failure}")
        for mode in ("session", "transaction")
        for on_write_failure in ("refuse", "continue")
    ],
)
def test_an_audit_disk_full_under_load_loses_no_sale_and_commits_none_unaudited_when_refusing(
    case: tuple[str, str],
    start_proxy: StartProxy,
    terminal_pki: TerminalPKI,
    durable_cluster: OwnCluster,
    tmp_path: Path,
) -> None:
    mode, on_write_failure = case  # the pool mode, what statements do while the disk is full
    refusing = on_write_failure == "refuse"
    server = durable_cluster.server
    with mounted_tmpfs(tmp_path / "audit-disk", DISK_SIZE) as disk:
        proxy, port, log, key, witness = _start(
            start_proxy,
            tmp_path,
            disk,
            settings={
                "routes": {"pos": durable_cluster.route(mode=mode, size=POOL_SIZE, connect_timeout="1s")},
                "roles": {"cashier": {"limits": {"max_server_connections_per_terminal": POOL_SIZE}}},
            },
            on_write_failure=on_write_failure,
            **({} if refusing else {"max_held_records": MAX_HELD_RECORDS}),
        )
        ledger = Ledger()
        fleet = Fleet(ledger, Target(proxy, terminal_pki, TILL_CONNECT_TIMEOUT), OPERATION_BOUND)
        fleet.start()
        try:
            fleet.wait_all_selling_since(time.monotonic(), 15, "every till selling")
            filler = _fill(disk)
            proxy.wait_for_event("audit_sink_failing", on_write_failure=on_write_failure)
            time.sleep(FULL_FOR)
            filler.unlink()
            recovered = proxy.wait_for_event("audit_sink_recovered")
            # Refusals already on their way when the writer recovered may still land; after this
            # margin a till's error would be one after recovery.
            time.sleep(0.5)
            failures_at_recovery = len(ledger.failures)
            fleet.wait_all_selling_since(time.monotonic(), OPERATION_BOUND + 5, "every till selling again")
        finally:
            hung = fleet.stop()
        assert not hung, f"tills hung: {hung}"

        stored = stored_sales(server)
        report = ledger.check(stored)
        print(f"\naudit disk full / {mode} / {on_write_failure}: {report.summary()};", end=" ")
        print(f"{len(ledger.failures)} errors; {recovered['dropped']} records dropped")
        report.assert_sound()
        for till in fleet.tills:
            assert till.slowest < OPERATION_BOUND, f"{till.name} waited {till.slowest:.1f}s"
        if refusing:
            assert ledger.failures, "the full disk never refused a till's statement"
            strangers = [
                f for f in ledger.failures if f.sqlstate != "53100" or REFUSED_MESSAGE not in f.error
            ]
            assert not strangers, strangers
            assert len(ledger.failures) == failures_at_recovery, ledger.failures[failures_at_recovery:]
            assert recovered["dropped"] == 0
        else:
            assert ledger.failures == []
            assert recovered["dropped"] > 0
        assert _metric(port, "pos_proxy_audit_records_dropped_total") == recovered["dropped"]
        assert proxy.stop() == 0

        result = _verify(key, witness, log)
        [end] = _events(log, "audit_sink_recovered")
        assert end["dropped"] == recovered["dropped"]
        inserts, stored_inserted, copies, stored_copied = _audited_against_stored(log, stored)
        # Audited but not stored: the sales that failed or stayed unknown after their INSERT ran.
        not_stored = ledger.count(Outcome.FAILED) + ledger.count(Outcome.UNKNOWN)
        if refusing:
            assert result.returncode == 0, result.stdout + result.stderr
            # Nothing committed unaudited.
            assert stored_inserted <= inserts <= stored_inserted + not_stored
            assert stored_copied <= copies * COPY_BATCH <= stored_copied + not_stored + COPY_BATCH
        else:
            # The same count shows what continuing cost: sales stored whose records were dropped.
            assert inserts < stored_inserted or copies * COPY_BATCH < stored_copied
            assert result.returncode == 1, result.stdout + result.stderr
            assert f"records lost: {end['dropped']} record(s) from {end['dropped_from']}" in result.stdout


def _audited_against_stored(log: Path, stored: dict[str, list[tuple[str, int]]]) -> tuple[int, int, int, int]:
    """(audited INSERTs, sales stored by INSERT, audited COPYs, sales stored by COPY). The records
    carry the normalized statement, not the sale ids, so this counts: every stored sale took one
    audited INSERT, or a fifth of an audited COPY, if no record of it was lost."""
    statements = [
        record["statement"]
        for record in map(json.loads, log.read_text(encoding="utf-8").splitlines())
        if record["event"] == "statement"
    ]
    inserts = sum(1 for text in statements if text.startswith(INSERT_SALE.split(" (")[0]))
    copies = sum(1 for text in statements if text.startswith(COPY_SALES.split(" (")[0]))
    stored_copied = sum(1 for rows in stored.values() for till, _amount in rows if till == COPY_TILL)
    stored_inserted = sum(len(rows) for rows in stored.values()) - stored_copied
    print(f"audited: {inserts} INSERTs for {stored_inserted} stored, {copies} COPYs for {stored_copied}")
    return inserts, stored_inserted, copies, stored_copied
