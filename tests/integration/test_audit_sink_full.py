"""The audit log's disk fills up (a 64 KiB tmpfs of the test's own) or turns read-only under a
running proxy: with audit.on_write_failure refuse, statements get 53100 (58030 when read-only) and
readiness fails; with continue they run on. Either way the gauge and one log line per change say
so, the proxy recovers by itself once space returns, and `pos-proxy audit verify` passes (refuse:
every record was held and written) or reports the dropped records (continue, over max_held_records).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
import yaml

from proxy.localpg import free_port
from tests.conftest import running_in_ci
from tests.integration.proxyproc import ProxyProcess, TerminalPKI
from tests.integration.test_admin import TOKEN, _call
from tests.security.test_audit_tail_truncation import _verify

StartProxy = Callable[..., ProxyProcess]
# Statements a test runs at most while waiting for the proxy to notice the full disk.
_MAX_STATEMENTS = 400


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 64 KiB tmpfs mounted for this test, unmounted after it."""
    with mounted_tmpfs(tmp_path / "small-disk", "64k") as mountpoint:
        yield mountpoint


@contextlib.contextmanager
def mounted_tmpfs(mountpoint: Path, size: str) -> Iterator[Path]:
    """A tmpfs of ``size`` mounted at ``mountpoint`` (made here) while the block runs."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mountpoint.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(mountpoint)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    if mounted.returncode != 0:
        message = f"cannot mount a tmpfs: {mounted.stderr.strip()}"
        if running_in_ci():
            pytest.fail(f"{message}; CI is set: this is an error here, not a skip")
        pytest.skip(message)
    try:
        yield mountpoint
    finally:
        # Lazily, should a process the test started still hold a file there.
        subprocess.run(["umount", "-l", str(mountpoint)], capture_output=True, timeout=30, check=True)


def _fill(directory: Path) -> Path:
    """Take every free byte of the filesystem with one file; the file, to free the space again."""
    filler = directory / "filler"
    size = os.statvfs(directory)
    with filler.open("wb", buffering=0) as file:
        for _ in range(size.f_blocks * size.f_frsize // 4096 + 1):  # the whole size in 4 KiB pages
            try:
                file.write(b"\0" * 4096)
            except OSError as exc:
                assert exc.errno == errno.ENOSPC, exc
                break
        else:
            raise AssertionError(f"{directory} never filled up")
    return filler


def _start(
    start_proxy: StartProxy,
    tmp_path: Path,
    disk: Path,
    *,
    settings: dict[str, Any] | None = None,
    **audit: Any,
) -> tuple[ProxyProcess, int, Path, Path, Path]:
    """A proxy whose audit log is on ``disk`` (its witness elsewhere) with an admin listener, and
    ``settings`` (further config sections)."""
    key, witness = tmp_path / "audit.key", tmp_path / "audit.witness"
    key.touch(mode=0o600)
    key.write_bytes(os.urandom(32))
    token_file = tmp_path / "admin-token"
    token_file.write_text(TOKEN + "\n", encoding="utf-8")
    port = free_port()
    log = disk / "audit.log"
    proxy = start_proxy(
        admin={"host": "127.0.0.1", "port": port, "token": {"file": str(token_file)}},
        audit={
            "file": str(log),
            "key_file": str(key),
            "witness_file": str(witness),
            "flush_interval": "50ms",
            **audit,
        },
        **(settings or {}),
    )
    proxy.wait_for_event("admin_listening")
    return proxy, port, log, key, witness


def _audit_gauges(port: int) -> tuple[float, float]:
    """(pos_proxy_audit_log_writable, pos_proxy_audit_refusing_statements) as /metrics shows them now."""
    return _metric(port, "pos_proxy_audit_log_writable"), _metric(port, "pos_proxy_audit_refusing_statements")


def _metric(port: int, name: str) -> float:
    for line in _call(port, "/metrics")[1].decode().splitlines():
        if line.startswith(f"{name} "):
            return float(line.split()[1])
    raise AssertionError(f"no {name} in /metrics")


def _refused_within_bound(connection: psycopg.Connection[Any]) -> psycopg.Error:
    """Run statements until the proxy refuses one (it notices a full disk at its next batch)."""
    for n in range(_MAX_STATEMENTS):
        try:
            connection.execute("SELECT %s::int AS sale", (n,))
        except psycopg.Error as exc:
            return exc
        time.sleep(0.01)
    raise AssertionError(f"{_MAX_STATEMENTS} statements ran on a full audit disk")


def _wait_for(predicate: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"not within {timeout} s: {what}"
        time.sleep(0.05)


def _events(log: Path, name: str) -> list[dict[str, Any]]:
    lines = log.read_text(encoding="utf-8").splitlines()
    return [record for record in map(json.loads, lines) if record["event"] == name]


def test_refuse_mode_refuses_statements_while_the_disk_is_full_and_recovers_when_space_returns(
    start_proxy: StartProxy, terminal_pki: TerminalPKI, tmp_path: Path, small_disk: Path
) -> None:
    proxy, port, log, key, witness = _start(start_proxy, tmp_path, small_disk)
    assert _audit_gauges(port) == (1, 0)
    conninfo = proxy.conninfo(terminal_pki.cashier, terminal_pki.ca)
    with (
        psycopg.connect(**conninfo, autocommit=True) as till,
        psycopg.connect(**conninfo) as in_transaction,
    ):
        till.execute("SELECT 1")
        in_transaction.execute("SELECT 1")  # opens a transaction, left open over the outage
        filler = _fill(small_disk)

        refused = _refused_within_bound(till)
        assert refused.sqlstate == "53100", refused
        assert "the audit log cannot be written (its disk is full)" in str(refused)
        failing = proxy.wait_for_event("audit_sink_failing", on_write_failure="refuse")
        assert "No space left on device" in failing["error"]
        assert _audit_gauges(port) == (0, 1)
        status, body = _call(port, "/readyz")
        assert status == 503
        assert json.loads(body)["audit"].startswith("failing (refuse): No space left")

        # The open transaction: a statement is refused (and fails it), ROLLBACK still ends it.
        with pytest.raises(psycopg.errors.DiskFull):
            in_transaction.execute("SELECT 2")
        in_transaction.rollback()

        filler.unlink()
        recovered = proxy.wait_for_event("audit_sink_recovered")
        assert recovered["dropped"] == 0
        # The same sessions go on.
        assert till.execute("SELECT 3").fetchone() == (3,)
        assert in_transaction.execute("SELECT 4").fetchone() == (4,)
    assert _audit_gauges(port) == (1, 0)
    assert _call(port, "/readyz")[0] == 200
    assert _metric(port, "pos_proxy_audit_records_dropped_total") == 0
    assert _metric(port, 'pos_proxy_client_errors_total{source="proxy",sqlstate="53100"}') >= 2
    assert len([event for event in proxy.log_events() if event["event"] == "audit_sink_failing"]) == 1
    proxy.stop()

    # Nothing was lost: the records held during the outage were written, the chain verifies.
    result = _verify(key, witness, log)
    assert result.returncode == 0, result.stdout + result.stderr
    assert len(_events(log, "audit_sink_failed")) == 1
    [end] = _events(log, "audit_sink_recovered")
    assert (end["dropped"], end["on_write_failure"]) == (0, "refuse")


def test_continue_mode_runs_on_drops_over_the_bound_and_verify_reports_the_loss(
    start_proxy: StartProxy, terminal_pki: TerminalPKI, tmp_path: Path, small_disk: Path
) -> None:
    proxy, port, log, key, witness = _start(
        start_proxy, tmp_path, small_disk, on_write_failure="continue", max_held_records=20
    )
    with psycopg.connect(**proxy.conninfo(terminal_pki.cashier, terminal_pki.ca), autocommit=True) as till:
        till.execute("SELECT 1")
        filler = _fill(small_disk)
        # Every statement runs; the proxy notices the full disk and says so, once.
        for n in range(_MAX_STATEMENTS):
            assert till.execute("SELECT %s::int", (n,)).fetchone() == (n,)
            if n >= 100 and any(event["event"] == "audit_records_dropping" for event in proxy.log_events()):
                break
            time.sleep(0.005)
        proxy.wait_for_event("audit_sink_failing", on_write_failure="continue")
        proxy.wait_for_event("audit_records_dropping", max_held_records=20)
        assert _audit_gauges(port) == (0, 0)
        status, body = _call(port, "/readyz")
        assert status == 200
        assert json.loads(body)["audit"].startswith("failing (continue): No space left")

        # A reload to refuse applies at once, during the outage.
        config = yaml.safe_load(proxy.config_path.read_text(encoding="utf-8"))
        config["audit"]["on_write_failure"] = "refuse"
        proxy.config_path.write_text(yaml.safe_dump(config), encoding="utf-8")
        assert _call(port, "/v1/reload", method="POST")[0] == 200
        applied = proxy.wait_for_event("reload_applied")
        assert "audit.on_write_failure" in applied["changed"]
        assert applied["not_applied"] == []
        with pytest.raises(psycopg.errors.DiskFull):
            till.execute("SELECT 1")
        assert _audit_gauges(port) == (0, 1)

        filler.unlink()
        recovered = proxy.wait_for_event("audit_sink_recovered")
        assert recovered["dropped"] > 0
        assert till.execute("SELECT 5").fetchone() == (5,)
    _wait_for(lambda: _audit_gauges(port) == (1, 0), "the gauges back at writable, not refusing")
    assert _metric(port, "pos_proxy_audit_records_dropped_total") == recovered["dropped"]
    proxy.stop()

    [end] = _events(log, "audit_sink_recovered")
    assert end["dropped"] == recovered["dropped"]
    assert end["dropped_from"] <= end["dropped_to"]
    result = _verify(key, witness, log)
    assert result.returncode == 1
    assert f"INCOMPLETE: {log}:" in result.stdout
    assert f"records lost: {end['dropped']} record(s) from {end['dropped_from']}" in result.stdout
    assert "chain and HMACs intact" in result.stdout


def test_a_read_only_log_directory_refuses_with_io_error_until_it_is_writable_again(
    start_proxy: StartProxy, terminal_pki: TerminalPKI, tmp_path: Path, small_disk: Path
) -> None:
    proxy, _port, log, key, witness = _start(start_proxy, tmp_path, small_disk)
    rotated = log.with_name("audit.log.1")
    with psycopg.connect(**proxy.conninfo(terminal_pki.cashier, terminal_pki.ca), autocommit=True) as till:
        till.execute("SELECT 1")
        # logrotate moves the file away and signals; the new one cannot be made: the directory is
        # read-only now (a read-only filesystem mounted over it).
        log.rename(rotated)
        subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "ro,size=4k", "tmpfs", str(small_disk)], check=True, timeout=30
        )
        try:
            proxy.signal(signal.SIGHUP)
            refused = _refused_within_bound(till)
            failing = proxy.wait_for_event("audit_sink_failing")
        finally:
            subprocess.run(["umount", str(small_disk)], check=True, timeout=30)
        assert refused.sqlstate == "58030", refused
        assert "the audit log cannot be written (its file cannot be written)" in str(refused)
        assert "Read-only file system" in failing["error"]
        proxy.wait_for_event("audit_sink_recovered")
        assert till.execute("SELECT 2").fetchone() == (2,)
    proxy.stop()
    result = _verify(key, witness, rotated, log)
    assert result.returncode == 0, result.stdout + result.stderr


def test_a_proxy_stopped_while_the_disk_is_full_says_what_it_could_not_write_and_exits(
    start_proxy: StartProxy, terminal_pki: TerminalPKI, tmp_path: Path, small_disk: Path
) -> None:
    proxy, _port, _log, _key, _witness = _start(
        start_proxy, tmp_path, small_disk, on_write_failure="continue"
    )
    with psycopg.connect(**proxy.conninfo(terminal_pki.cashier, terminal_pki.ca), autocommit=True) as till:
        _fill(small_disk)
        for n in range(_MAX_STATEMENTS):
            till.execute("SELECT %s::int", (n,))
            if any(event["event"] == "audit_sink_failing" for event in proxy.log_events()):
                break
            time.sleep(0.01)
    started = time.monotonic()
    assert proxy.stop() == 1
    assert time.monotonic() - started < 12  # the close's 5 s of retries, not a hang
    failed = proxy.wait_for_event("audit_close_failed")
    assert "audit records could not be written" in failed["error"]
