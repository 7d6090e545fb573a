"""`pos-proxy run --workers 2`: both workers serve one port, a killed worker comes back, SIGHUP and
SIGTERM reach every worker, the admin API and /metrics add the workers up, only the supervisor
talks to systemd, and each worker keeps its own audit chain."""

from __future__ import annotations

import itertools
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any

import psycopg
import pytest
from prometheus_client.parser import text_string_to_metric_families

from proxy.localpg import free_port
from tests.integration.proxyproc import (
    ProxyProcess,
    TerminalPKI,
    deep_merge,
    receive_notifications,
    stop_all,
)

WORKERS = 2
# Enough connections that the kernel's hash puts some on each worker (all on one: 2**-15).
CLIENTS = 16

StartWorkers = Callable[..., ProxyProcess]


@pytest.fixture
def start_workers(base_config: dict[str, Any], tmp_path: Path) -> Iterator[StartWorkers]:
    """Start `pos-proxy run --workers 2` with config overrides; waits until every worker is up."""
    started: list[ProxyProcess] = []

    def start(**overrides: Any) -> ProxyProcess:
        config = deep_merge(
            base_config,
            {
                "admin": {"port": free_port()},
                "routes": {"pos": {"pool": {"mode": "transaction", "size": 4}}},
                **overrides,
            },
        )
        process = ProxyProcess(tmp_path / f"proxy-{len(started)}", config, ["--workers", str(WORKERS)])
        started.append(process)
        process.start()
        process.wait_for_event("workers_ready", timeout=30)
        return process

    yield start
    stop_all(started)


def _admin(proxy: ProxyProcess, path: str, method: str = "GET") -> Any:
    url = f"http://127.0.0.1:{proxy.config['admin']['port']}{path}"
    request = urllib.request.Request(url, method=method, data=b"" if method == "POST" else None)
    with urllib.request.urlopen(request, timeout=15) as response:
        body = response.read().decode()
    return body if path == "/metrics" else json.loads(body)


def _metric(proxy: ProxyProcess, name: str, **labels: str) -> float:
    """The value of one series on the supervisor's /metrics (0 when absent)."""
    for family in text_string_to_metric_families(_admin(proxy, "/metrics")):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return float(sample.value)
    return 0.0


@contextmanager
def _clients(
    proxy: ProxyProcess, pki: TerminalPKI, count: int = CLIENTS
) -> Iterator[list[psycopg.Connection]]:
    with ExitStack() as stack:
        connections = [
            stack.enter_context(psycopg.connect(**proxy.conninfo(pki.cashier, pki.ca), autocommit=True))
            for _ in range(count)
        ]
        for connection in connections:
            assert connection.execute("SELECT 1").fetchone() == (1,)
        yield connections


def _serving_workers(proxy: ProxyProcess) -> set[int]:
    return {client["worker"] for client in _admin(proxy, "/v1/clients")["clients"]}


def _worker_pids(proxy: ProxyProcess) -> dict[int, int]:
    """Worker number -> pid of its latest start, from the supervisor's log."""
    return {
        record["worker"]: record["pid"]
        for record in proxy.log_events()
        if record.get("event") == "worker_started"
    }


def _alive(pid: int) -> bool:
    """Running (an exited process may stay a zombie until whoever adopted it reaps it)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


def test_both_workers_serve_and_the_admin_api_and_metrics_add_them_up(
    start_workers: StartWorkers, terminal_pki: TerminalPKI
) -> None:
    proxy = start_workers()
    pools = _admin(proxy, "/v1/pools")["pools"]
    # The route's pool of 4 is divided: 2 server connections per worker.
    assert sorted((pool["worker"], pool["size"]) for pool in pools) == [(1, 2), (2, 2)]
    with _clients(proxy, terminal_pki):
        clients = _admin(proxy, "/v1/clients")["clients"]
        assert len(clients) == CLIENTS
        assert {client["worker"] for client in clients} == {1, 2}
        assert _metric(proxy, "pos_proxy_client_connections_active", role="cashier") == CLIENTS
        ready = _admin(proxy, "/readyz")
        assert ready["ready"] is True and set(ready["workers"]) == {"1", "2"}
        assert _admin(proxy, "/v1/reload", "POST") == {"reloaded": True}
        # The terminal's sessions are cut in both workers, and the count is their sum.
        cut = _admin(proxy, "/v1/terminals/store-001/till-01/disconnect", "POST")
        assert cut["disconnected"] == CLIENTS
        assert {
            record["worker"] for record in proxy.log_events() if record.get("event") == "admin_disconnect"
        } == {
            1,
            2,
        }
    # Each worker closes the idle server connections of its own share of the pool; the answer adds them up.
    closed = _admin(proxy, "/v1/pools/pos/close-idle", "POST")
    by_worker = {
        record["worker"]: record["closed"]
        for record in proxy.log_events()
        if record.get("event") == "admin_close_idle"
    }
    assert set(by_worker) == {1, 2}
    assert closed == {"route": "pos", "closed": sum(by_worker.values())}
    assert _metric(proxy, "pos_proxy_client_connections_total", role="cashier") == CLIENTS
    assert _metric(proxy, "pos_proxy_workers_alive") == WORKERS
    assert _metric(proxy, "pos_proxy_config_reloads_total", result="ok") == WORKERS
    # Memory and descriptors of each worker, labelled by its number, as its /proc says; and the
    # supervisor's own process_* series.
    for worker, pid in _worker_pids(proxy).items():
        resident = _metric(proxy, "pos_proxy_worker_resident_memory_bytes", worker=str(worker))
        status = Path(f"/proc/{pid}/status").read_text(encoding="ascii")
        vm_rss = (
            int(next(line for line in status.splitlines() if line.startswith("VmRSS:")).split()[1]) * 1024
        )
        assert 0.5 * vm_rss < resident < 2 * vm_rss, (worker, resident, vm_rss)
        open_fds = _metric(proxy, "pos_proxy_worker_open_fds", worker=str(worker))
        assert 5 <= open_fds < 1000, (worker, open_fds)
    assert 10 * 2**20 < _metric(proxy, "process_resident_memory_bytes") < 2**30
    assert _metric(proxy, "process_open_fds") >= 3


def test_a_killed_worker_is_restarted_and_service_carries_on(
    start_workers: StartWorkers, terminal_pki: TerminalPKI
) -> None:
    proxy = start_workers()
    killed = _worker_pids(proxy)[1]
    os.kill(killed, signal.SIGKILL)
    proxy.wait_for_event("worker_died", worker=1, pid=killed)
    # Worker 2 alone takes every new connection while worker 1 is down.
    with _clients(proxy, terminal_pki, count=4):
        pass
    proxy.wait_for_event("worker_ready", worker=1, timeout=20)
    assert _worker_pids(proxy)[1] != killed
    with _clients(proxy, terminal_pki):
        assert _serving_workers(proxy) == {1, 2}
    assert _metric(proxy, "pos_proxy_worker_restarts_total") == 1
    # The dead worker's counters still count.
    assert _metric(proxy, "pos_proxy_client_connections_total", role="cashier") == 4 + CLIENTS


def test_sighup_reloads_the_policy_in_every_worker(
    start_workers: StartWorkers, terminal_pki: TerminalPKI, tmp_path: Path
) -> None:
    policy = tmp_path / "cashier.yaml"
    policy.write_text("mode: enforce\nallow:\n  kinds: [SELECT]\n", encoding="utf-8")
    proxy = start_workers(roles={"cashier": {"policy": str(policy)}})
    # Not the housekeeping `SELECT 1` that every policy allows.
    statement = "SELECT 1 WHERE true"
    with _clients(proxy, terminal_pki) as connections:
        assert _serving_workers(proxy) == {1, 2}
        for connection in connections:
            connection.execute(statement)
        policy.write_text("mode: enforce\nallow:\n  kinds: [INSERT]\n", encoding="utf-8")
        proxy.signal(signal.SIGHUP)
        proxy.wait_for_event("workers_reloaded", trigger="SIGHUP")
        assert {
            record["worker"] for record in proxy.log_events() if record.get("event") == "reload_applied"
        } == {1, 2}
        for connection in connections:
            with pytest.raises(psycopg.errors.InsufficientPrivilege, match="statement kind"):
                connection.execute(statement)


def test_sigterm_drains_every_worker_and_each_keeps_its_own_audit_chain(
    start_workers: StartWorkers, terminal_pki: TerminalPKI, tmp_path: Path
) -> None:
    key = tmp_path / "audit.key"
    key.touch(mode=0o600)
    key.write_bytes(secrets.token_bytes(32))
    audit = tmp_path / "audit" / "audit.log"
    audit.parent.mkdir()
    proxy = start_workers(audit={"file": str(audit), "key_file": str(key)})
    pids = _worker_pids(proxy)
    with _clients(proxy, terminal_pki) as connections:
        assert _serving_workers(proxy) == {1, 2}
        proxy.signal(signal.SIGTERM)
        for worker in (1, 2):
            proxy.wait_for_event("shutdown_requested", worker=worker)
        time.sleep(0.5)
        for connection in connections:
            with pytest.raises(psycopg.OperationalError, match="shutting down"):
                connection.execute("SELECT 1")
        assert proxy.wait_exit(timeout=30) == 0
    assert not any(_alive(pid) for pid in pids.values())
    exits = {
        record["worker"]: record["exit"]
        for record in proxy.log_events()
        if record.get("event") == "worker_exited"
    }
    assert exits == {1: 0, 2: 0}
    files = sorted(path for path in audit.parent.iterdir() if not path.name.startswith("."))
    assert [path.name for path in files] == ["audit-w1.log", "audit-w2.log"]
    # Each chain's writer lock (kept, not removed: see proxy.audit.ChainWriter.open).
    locks = {path.name for path in audit.parent.glob(".*.lock")}
    assert locks == {".audit-w1.log.lock", ".audit-w2.log.lock"}
    for path in files:
        verified = subprocess.run(
            [sys.executable, "-m", "proxy", "audit", "verify", "--key", str(key), str(path)],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert verified.returncode == 0, verified.stdout + verified.stderr
        assert "chain and HMACs intact" in verified.stdout


def test_only_the_supervisor_talks_to_systemd(
    start_workers: StartWorkers, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "notify.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        sock.bind(str(path))
        monkeypatch.setenv("NOTIFY_SOCKET", str(path))
        monkeypatch.setenv("WATCHDOG_USEC", "600000")
        proxy = start_workers()
        seen = receive_notifications(sock, "READY=1")
        assert any(f"with {WORKERS} workers" in message for _, message in seen)
        seen += receive_notifications(sock, "WATCHDOG=1")
        proxy.signal(signal.SIGHUP)
        seen += receive_notifications(sock, "READY=1")
        assert any("RELOADING=1" in message for _, message in seen)
        proxy.signal(signal.SIGTERM)
        seen += receive_notifications(sock, "STOPPING=1")
        assert proxy.wait_exit(timeout=30) == 0
        assert {pid for pid, _ in seen} == {proxy.pid}


def _started_at(proxy: ProxyProcess, worker: int) -> list[float]:
    return [
        datetime.fromisoformat(record["timestamp"]).timestamp()
        for record in proxy.log_events()
        if record.get("event") == "worker_started" and record.get("worker") == worker
    ]


def test_a_crash_looping_worker_is_reported_restarted_ever_more_slowly_and_recovers(
    start_workers: StartWorkers, terminal_pki: TerminalPKI
) -> None:
    proxy = start_workers()
    good_config = proxy.config_path.read_text(encoding="utf-8")
    # A worker started now cannot load its configuration and exits at once.
    proxy.config_path.write_text("listen: [not, a, mapping\n", encoding="utf-8")
    os.kill(_worker_pids(proxy)[1], signal.SIGKILL)
    looping = proxy.wait_for_event("worker_crash_loop", worker=1, timeout=30)
    assert looping["quick_deaths"] == 3
    with _clients(proxy, terminal_pki, count=4):
        pass  # worker 2 carries on
    proxy.config_path.write_text(good_config, encoding="utf-8")
    proxy.wait_for_event("worker_ready", worker=1, timeout=30)
    starts = _started_at(proxy, 1)
    gaps = [later - earlier for earlier, later in itertools.pairwise(starts[1:])]
    # Each restart waited longer than the one before: 0.5 s, 1 s, 2 s (plus the failed start).
    assert len(gaps) >= 2 and gaps[0] >= 1.0 and gaps[1] >= 2.0, gaps
    with _clients(proxy, terminal_pki):
        assert _serving_workers(proxy) == {1, 2}


def test_workers_that_cannot_start_end_the_supervisor_with_an_error(
    base_config: dict[str, Any], tmp_path: Path
) -> None:
    proxy = ProxyProcess(tmp_path / "proxy", base_config, ["--workers", str(WORKERS)])
    with socket.create_server(("127.0.0.1", proxy.port)):  # taken, and without SO_REUSEPORT
        proxy.start()
        assert proxy.wait_exit(timeout=40) == 1
    proxy.wait_for_event("start_failed", reason="a worker failed to start")
    assert "Address already in use" in proxy.log_text()


def test_orphaned_workers_drain_and_exit(
    start_workers: StartWorkers, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # systemd's RuntimeDirectory=: the sockets and metrics go there (and stay, as the supervisor is killed).
    monkeypatch.setenv("RUNTIME_DIRECTORY", str(tmp_path))
    proxy = start_workers()
    pids = _worker_pids(proxy)
    sockets = sorted(path.name for path in tmp_path.glob("pos-proxy-*/worker-*.sock"))
    assert sockets == ["worker-1.sock", "worker-2.sock"]
    os.kill(proxy.pid, signal.SIGKILL)
    deadline = time.monotonic() + 15
    while any(_alive(pid) for pid in pids.values()) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(_alive(pid) for pid in pids.values())
    gone = [record["worker"] for record in proxy.log_events() if record.get("event") == "supervisor_gone"]
    assert sorted(gone) == [1, 2]
