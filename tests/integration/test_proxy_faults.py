"""Proxy faults under a write ledger (issue 17): the proxy SIGKILLed while tills sell through it and
started again on the same config; reload storms with policy, CRL and certificate changes. After
each: no committed sale lost, none doubled, every unknown one settled by reading it back, every
error one the fault explains, and an audit chain that verifies, with its witness, over the whole
file. docs/reliability.md has the matrix."""

from __future__ import annotations

import json
import math
import os
import signal
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from cryptography import x509
from pglast.parser import fingerprint

from proxy import certs
from proxy.auditwriter import PROXY_LOST
from proxy.localpg import LocalPostgres, free_port
from proxy.workers import worker_audit_file
from tests.integration.conftest import OwnCluster
from tests.integration.ledger import (
    CREATE_SCRATCH_TABLE,
    SALES_TABLE,
    Failure,
    Fleet,
    Ledger,
    Target,
    stored_sales,
)
from tests.integration.proxyproc import ProxyProcess, TerminalPKI
from tests.integration.test_database_faults import (
    OPERATION_BOUND,
    POOL_SIZE,
    TILL_CONNECT_TIMEOUT,
    StartProxy,
    _wait_for_tills_mid_transaction_and_mid_copy,
)
from tests.integration.test_upstream_resilience import _wait_for
from tests.integration.test_workers import _metric, _worker_pids
from tests.security.test_audit_tail_truncation import _audit_config, _last_seq, _verify
from tests.unit.test_audit import running

# How long the killed proxy stays down before it is started again: tills meet a closed port.
DOWN_AFTER_KILL = 1.0
# The orphaned audit writer sees its channel end at once; it writes what it was sent, its last
# record, fsyncs, checkpoints and exits. Far less than this on an idle machine.
WRITER_EXIT_BOUND = 5.0
# Workers whose supervisor was killed drain this long at most: the tills' transactions are short.
ORPHAN_DRAIN_TIMEOUT = 3.0
# What a till sees of the proxy's port while no proxy listens (libpq, asyncpg). A connection
# lost mid-session is already a clean failure to the ledger.
REFUSED_MESSAGES = ("Connection refused", "Connect call failed")


def _children(pid: int) -> list[int]:
    return [
        int(child)
        for task in Path(f"/proc/{pid}/task").iterdir()
        for child in (task / "children").read_text(encoding="ascii").split()
    ]


def _audit_writers(pid: int) -> list[int]:
    """The audit writer processes a proxy started (``python -m proxy.auditwriter``)."""
    return [
        child
        for child in _children(pid)
        if b"proxy.auditwriter" in Path(f"/proc/{child}/cmdline").read_bytes()
    ]


def _records(log: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in log.read_text(encoding="utf-8").splitlines()]


def _refused(failure: Failure) -> bool:
    return any(phrase in failure.error for phrase in REFUSED_MESSAGES)


def _assert_verifies_to_its_end(key: Path, witness: Path, log: Path) -> int:
    """`pos-proxy audit verify` with the witness passes and reaches the last record; its seq."""
    last = _last_seq(log)
    result = _verify(key, witness, log)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"reaches the witness's seq {last}" in result.stdout, result.stdout
    return last


def _assert_the_ledger_explains_the_kill(
    ledger: Ledger, fleet: Fleet, server: LocalPostgres, heading: str
) -> None:
    """0 lost, 0 doubled, unknowns settled; beyond the clean ends of a lost connection, the only
    errors are refused connects while no proxy listened; no till waited past the bound."""
    report = ledger.check(stored_sales(server))
    refused = [failure for failure in ledger.failures if _refused(failure)]
    print(f"\n{heading}: {report.summary()}; {len(ledger.failures)} errors,", end=" ")
    print(f"{len(refused)} of them refused connects")
    for failure in ledger.failures:
        if failure not in refused:
            print(f"  {failure}")
    report.assert_sound()
    assert ledger.failures, "the kill never reached a till"
    unexplained = [
        f for f in ledger.failures if not f.clean and not (_refused(f) and f.doing == "connecting")
    ]
    assert not unexplained, unexplained
    for till in fleet.tills:
        assert till.slowest < OPERATION_BOUND, f"{till.name} waited {till.slowest:.1f}s"


@pytest.mark.parametrize(
    "case",
    [
        pytest.param(("proxy", "session"), id="proxy-session"),
        pytest.param(("proxy", "transaction"), id="proxy-transaction"),
        # With --workers the supervisor starts the killed worker again by itself.
        pytest.param(("worker", "transaction"), id="worker-transaction"),
    ],
)
def test_a_proxy_killed_under_load_loses_no_sale_and_its_audit_chain_says_where(
    case: tuple[str, str],
    start_proxy: StartProxy,
    terminal_pki: TerminalPKI,
    durable_cluster: OwnCluster,
    tmp_path: Path,
) -> None:
    killed, mode = case  # which process is killed, in which pool mode
    server = durable_cluster.server
    audit, log, witness, key = _audit_config(tmp_path)
    workers = killed == "worker"
    proxy = start_proxy(
        routes={"pos": durable_cluster.route(mode=mode, size=POOL_SIZE, connect_timeout="1s")},
        roles={"cashier": {"limits": {"max_server_connections_per_terminal": POOL_SIZE}}},
        audit=audit,
        admin={"port": free_port()},
        arguments=["--workers", "2"] if workers else [],
    )
    if workers:
        proxy.wait_for_event("workers_ready", timeout=30)
        killed_pid = _worker_pids(proxy)[1]
        # Each worker keeps a chain (and a witness) of its own; worker 2's is not touched.
        untouched = (worker_audit_file(log, 2), worker_audit_file(witness, 2))
        log, witness = worker_audit_file(log, 1), worker_audit_file(witness, 1)
    else:
        killed_pid = proxy.pid
    (writer,) = _audit_writers(killed_pid)
    ledger = Ledger()
    fleet = Fleet(ledger, Target(proxy, terminal_pki, TILL_CONNECT_TIMEOUT), OPERATION_BOUND)
    fleet.start()
    try:
        fleet.wait_all_selling_since(time.monotonic(), 15, "every till selling")
        _wait_for_tills_mid_transaction_and_mid_copy(server)
        os.kill(killed_pid, signal.SIGKILL)
        killed_at = time.monotonic()
        _wait_for(lambda: not running(killed_pid), 5, "the killed process gone")
        # The writer, orphaned, neither lingers nor goes on writing.
        _wait_for(lambda: not running(writer), WRITER_EXIT_BOUND, "the orphaned audit writer gone")
        writer_lingered = time.monotonic() - killed_at
        left = log.read_bytes()
        # What the killed process left verifies up to its last record, which the witness holds:
        # the writer wrote every batch it was sent, then said that its proxy went away.
        killed_at_seq = _assert_verifies_to_its_end(key, witness, log)
        lost = json.loads(left.splitlines()[-1])
        assert (lost["event"], lost["pid"]) == (PROXY_LOST, killed_pid), lost
        if workers:
            _wait_for(lambda: _worker_pids(proxy)[1] != killed_pid, 20, "worker 1 started again")
        else:
            time.sleep(DOWN_AFTER_KILL)
            assert log.read_bytes() == left, "the log changed while no proxy ran"
            proxy.start()
        back = time.monotonic()
        fleet.wait_all_selling_since(back, OPERATION_BOUND + 5, "every till selling after the restart")
    finally:
        hung = fleet.stop()
    assert not hung, f"tills hung: {hung}"

    _assert_the_ledger_explains_the_kill(ledger, fleet, server, f"{killed} SIGKILL / {mode}")
    print(f"the orphaned audit writer was gone {writer_lingered:.2f}s after the kill")

    restarted_pid = _worker_pids(proxy)[1] if workers else proxy.pid
    assert proxy.stop() == 0
    last = _assert_verifies_to_its_end(key, witness, log)
    records = _records(log)
    events = [record["event"] for record in records]
    # One chain, one file: the first run's start, its end where the kill cut it, the second run
    # continuing the same chain right behind, and a clean stop. Nothing cut, nothing broken.
    assert events[:2] == ["audit_file_start", "audit_started"]
    assert records[1]["pid"] == killed_pid and records[1]["resumed"] is False
    assert events.count("audit_started") == 2 and events.count(PROXY_LOST) == 1
    resumed = records[killed_at_seq]  # the record right after the killed run's last one
    assert (resumed["event"], resumed["pid"], resumed["resumed"]) == ("audit_started", restarted_pid, True)
    assert events[-1] == "audit_stopped" and events.count("audit_stopped") == 1
    assert [record["seq"] for record in records] == list(range(1, last + 1))
    assert not {"audit_chain_gap", "audit_chain_break", "audit_witness_invalid"} & set(events)
    if not workers:
        # The restarted proxy audits the tills' work again. (The tills that reconnected while
        # worker 1 was down stay with worker 2, so its successor may have had none to audit.)
        assert any(record["event"] == "statement" for record in records[killed_at_seq:])
    else:
        _assert_verifies_to_its_end(key, untouched[1], untouched[0])
        others = [record["event"] for record in _records(untouched[0])]
        assert PROXY_LOST not in others and others.count("audit_started") == 1, others


def test_a_killed_supervisors_workers_close_their_chains_and_the_restart_continues_them(
    start_proxy: StartProxy, terminal_pki: TerminalPKI, durable_cluster: OwnCluster, tmp_path: Path
) -> None:
    """SIGKILL of the supervisor of two workers: each worker notices, drains and closes its own
    chain (audit_stopped: nothing lost); the supervisor started again continues both."""
    server = durable_cluster.server
    audit, log, witness, key = _audit_config(tmp_path)
    proxy = start_proxy(
        routes={"pos": durable_cluster.route(mode="transaction", size=POOL_SIZE, connect_timeout="1s")},
        roles={"cashier": {"limits": {"max_server_connections_per_terminal": POOL_SIZE}}},
        audit=audit,
        admin={"port": free_port()},
        listen={"drain_timeout": f"{ORPHAN_DRAIN_TIMEOUT:g}s"},
        arguments=["--workers", "2"],
    )
    proxy.wait_for_event("workers_ready", timeout=30)
    chains = {index: (worker_audit_file(log, index), worker_audit_file(witness, index)) for index in (1, 2)}
    orphans = _worker_pids(proxy)
    writers = [writer for pid in orphans.values() for writer in _audit_writers(pid)]
    assert len(writers) == 2, writers
    ledger = Ledger()
    fleet = Fleet(ledger, Target(proxy, terminal_pki, TILL_CONNECT_TIMEOUT), OPERATION_BOUND)
    fleet.start()
    try:
        fleet.wait_all_selling_since(time.monotonic(), 15, "every till selling")
        _wait_for_tills_mid_transaction_and_mid_copy(server)
        proxy.signal(signal.SIGKILL)
        assert proxy.wait_exit(5) == -signal.SIGKILL
        # A worker checks its parent every second, then drains; its writer closes the log.
        _wait_for(
            lambda: not any(running(pid) for pid in [*orphans.values(), *writers]),
            1 + ORPHAN_DRAIN_TIMEOUT + WRITER_EXIT_BOUND,
            "the orphaned workers and their audit writers gone",
        )
        for chain, chain_witness in chains.values():
            _assert_verifies_to_its_end(key, chain_witness, chain)
            assert _records(chain)[-1]["event"] == "audit_stopped"
        proxy.start()
        _wait_for(
            lambda: sum(1 for r in proxy.log_events() if r.get("event") == "workers_ready") == 2,
            30,
            "the workers of the new supervisor ready",
        )
        fleet.wait_all_selling_since(time.monotonic(), OPERATION_BOUND + 5, "every till selling again")
    finally:
        hung = fleet.stop()
    assert not hung, f"tills hung: {hung}"
    _assert_the_ledger_explains_the_kill(ledger, fleet, server, "supervisor SIGKILL / transaction")

    successors = _worker_pids(proxy)
    assert proxy.stop() == 0
    for index, (chain, chain_witness) in chains.items():
        last = _assert_verifies_to_its_end(key, chain_witness, chain)
        records = _records(chain)
        started = [(r["pid"], r["resumed"]) for r in records if r["event"] == "audit_started"]
        assert started == [(orphans[index], False), (successors[index], True)], started
        events = [record["event"] for record in records]
        assert events.count("audit_stopped") == 2 and PROXY_LOST not in events, events
        assert [record["seq"] for record in records] == list(range(1, last + 1))


# Reload storms: SIGHUP every RELOAD_EVERY seconds for POS_PROXY_RELOAD_STORM_SECONDS (the issue's
# 30 s by default; shorter for a quick local run), each one after a change
# of the policy, the CRL or the server certificate, while two fleets of tills sell.
RELOAD_EVERY = 0.2
STORM_SECONDS = float(os.environ.get("POS_PROXY_RELOAD_STORM_SECONDS", "30"))
STORM_POOL_SIZE = 10  # both fleets' tills, each holding one in session mode, and room to spare
# A reload cuts the sessions of a terminal it finds revoked; a commit already on its way may
# still be answered just after.
CUT_WITHIN = 1.0
UNRELATED_TABLE = "ledger_unrelated"


def _ledger_policy(*, unrelated: bool) -> dict[str, Any]:
    """What the ledger's tills need and nothing else (the transaction till's temporary table is
    DDL: approved by fingerprint); ``unrelated`` adds a statement none of them runs."""
    return {
        "mode": "enforce",
        "search_path": ["public"],
        "allow": {
            "kinds": ["INSERT", "COPY FROM STDIN", "SET", "TRANSACTION", *(["SELECT"] if unrelated else [])],
            "write": [SALES_TABLE],
            "read": [UNRELATED_TABLE] if unrelated else [],
            "denylist_exceptions": ["DDL"],
        },
        "fingerprints": [
            {"fingerprint": str(fingerprint(CREATE_SCRATCH_TABLE)), "text": CREATE_SCRATCH_TABLE}
        ],
    }


def _write_atomic(path: Path, text: str) -> None:
    staged = path.with_name(f".{path.name}.tmp")
    staged.write_text(text, encoding="utf-8")
    os.replace(staged, path)


def _reloads(proxy: ProxyProcess, result: str) -> int:
    return round(_metric(proxy, "pos_proxy_config_reloads_total", result=result))


def _sighup_and_wait(proxy: ProxyProcess, sent: int) -> None:
    """SIGHUP, and wait until the proxy has answered it: the next change must not race the reload
    reading its files, so that every reload sees one whole config."""
    proxy.signal(signal.SIGHUP)
    _wait_for(lambda: _reloads(proxy, "ok") + _reloads(proxy, "failed") > sent, 5, f"reload {sent + 1} done")


@pytest.mark.parametrize("mode", ["session", "transaction"])
def test_a_reload_storm_fails_no_transaction_but_the_revoked_tills(
    mode: str, start_proxy: StartProxy, durable_cluster: OwnCluster, tmp_path: Path
) -> None:
    pki = TerminalPKI.create(tmp_path / "pki")
    doomed = pki.issue("till-doomed", "cashier")  # its tills sell until the CRL revokes it
    bystander = pki.issue("till-bystander", "cashier")  # revoked too, never one of the tills
    policy = tmp_path / "cashier-policy.yaml"
    unrelated = False
    _write_atomic(policy, yaml.safe_dump(_ledger_policy(unrelated=unrelated)))
    audit, log, witness, key = _audit_config(tmp_path)
    proxy = start_proxy(
        tls={
            "cert": str(pki.directory / "server.pem"),
            "key": str(pki.directory / "server.key"),
            "client_ca": str(pki.ca),
            "crl": str(pki.directory / "crl.pem"),
        },
        routes={"pos": durable_cluster.route(mode=mode, size=STORM_POOL_SIZE, connect_timeout="1s")},
        roles={
            "cashier": {
                "policy": str(policy),
                "limits": {"max_server_connections_per_terminal": STORM_POOL_SIZE},
            }
        },
        admin={"port": free_port()},
        audit=audit,
    )
    proxy.wait_for_event("admin_listening")
    ledger = Ledger()
    fleet = Fleet(ledger, Target(proxy, pki, TILL_CONNECT_TIMEOUT), OPERATION_BOUND)
    doomed_fleet = Fleet(ledger, Target(proxy, pki, TILL_CONNECT_TIMEOUT, doomed), OPERATION_BOUND)
    last_issued = b""
    ticks = max(12, round(STORM_SECONDS / RELOAD_EVERY))
    revoke_doomed_at = ticks // 2 - (ticks // 2 - 1) % 3  # a CRL tick half-way
    revoked_from = revoked_applied = math.inf
    failures_before_revocation: list[Failure] = []
    fleet.start()
    doomed_fleet.start(asyncpg_tills=1, name="doomed")
    try:
        started = time.monotonic()
        fleet.wait_all_selling_since(started, 15, "every till selling")
        doomed_fleet.wait_all_selling_since(started, 15, "every doomed till selling")
        begin = time.monotonic()
        for tick in range(ticks):
            time.sleep(max(0.0, begin + tick * RELOAD_EVERY - time.monotonic()))
            if tick % 3 == 0:
                unrelated = not unrelated
                _write_atomic(policy, yaml.safe_dump(_ledger_policy(unrelated=unrelated)))
            elif tick == revoke_doomed_at:
                revoked_from = time.monotonic()
                failures_before_revocation = list(ledger.failures)
                certs.revoke(pki.directory, int(doomed.serial_hex, 16))
            elif tick % 3 == 1:
                # The bystander's revocation first, then a CRL signed anew (thisUpdate moves on).
                if tick == 1:
                    certs.revoke(pki.directory, int(bystander.serial_hex, 16))
                else:
                    certs.write_crl(pki.directory)
            else:
                issued = certs.issue_server(
                    pki.directory, dns_names=["localhost"], ip_addresses=["127.0.0.1"]
                )
                last_issued = issued.cert_path.read_bytes()
            _sighup_and_wait(proxy, tick)
            if tick == revoke_doomed_at:
                revoked_applied = time.monotonic()
        storm = time.monotonic() - begin
        # The storm is over: every till but the doomed ones still sells.
        fleet.wait_all_selling_since(time.monotonic(), OPERATION_BOUND, "every till selling after the storm")
    finally:
        hung = fleet.stop() + doomed_fleet.stop()
    assert not hung, f"tills hung: {hung}"

    report = ledger.check(stored_sales(durable_cluster.server))
    doomed_failures = [f for f in ledger.failures if f.till.startswith("doomed")]
    print(
        f"\nreload storm / {mode}: {ticks} reloads in {storm:.1f}s; {report.summary()};"
        f" {len(ledger.failures)} errors, all of the doomed tills: {len(doomed_failures)}"
    )
    for failure in {(f.till, f.doing, f.sqlstate, f.error) for f in ledger.failures}:
        print(f"  {failure}")
    report.assert_sound()
    # Nothing failed before the doomed terminal was revoked, and afterwards only its tills did,
    # each with the revocation or a cut connection; none of them sold after the reload.
    assert failures_before_revocation == []
    assert [f for f in ledger.failures if not f.till.startswith("doomed")] == []
    assert any("revoked" in f.error for f in doomed_failures), doomed_failures
    assert all("revoked" in f.error or f.clean for f in doomed_failures), doomed_failures
    late = [
        at - revoked_applied for till in doomed_fleet.tills for at in till.committed_at if at > revoked_from
    ]
    assert all(delay < CUT_WITHIN for delay in late), late
    assert all(till.committed_at for till in fleet.tills)

    # Every SIGHUP was one applied reload: in the metrics, the log and the audit log.
    assert (_reloads(proxy, "ok"), _reloads(proxy, "failed")) == (ticks, 0)
    assert _metric(proxy, "pos_proxy_internal_errors_total") == 0
    # The certificate last issued is the one presented, to a terminal that still may connect.
    presented = proxy.served_certificate(proxy.ssl_context(pki.cashier, pki.ca))
    assert x509.load_der_x509_certificate(presented) == x509.load_pem_x509_certificate(last_issued)
    assert proxy.stop() == 0
    applied = [r for r in proxy.log_events() if r.get("event") == "reload_applied"]
    assert len(applied) == ticks and all(r["trigger"] == "SIGHUP" for r in applied)
    # (stop() has checked the log for internal errors.)
    assert not [r for r in proxy.log_events() if r.get("event") == "reload_failed"]
    _assert_verifies_to_its_end(key, witness, log)
    audited = [r for r in _records(log) if r["event"] == "config_reload" and r["trigger"] == "SIGHUP"]
    assert len(audited) == ticks and all(r["outcome"] == "success" for r in audited)
