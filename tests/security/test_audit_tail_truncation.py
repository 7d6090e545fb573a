"""Someone with write access to the audit log removes its newest records -- what a cashier's attack
just did -- in place, while the proxy runs or while it is stopped. The chain alone cannot tell (a
shorter chain is still a valid chain): the checkpoint in the witness file can, and says so."""

from __future__ import annotations

import json
import secrets
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psycopg
import pytest

from tests.integration.proxyproc import ProxyProcess, TerminalPKI

StartProxy = Callable[..., ProxyProcess]


def _audit_config(tmp_path: Path) -> tuple[dict[str, Any], Path, Path, Path]:
    logs, elsewhere = tmp_path / "logs", tmp_path / "witness"
    logs.mkdir()
    elsewhere.mkdir(mode=0o700)
    key = tmp_path / "audit.key"
    key.touch(mode=0o600)
    key.write_bytes(secrets.token_bytes(32))
    log, witness = logs / "audit.log", elsewhere / "audit.witness"
    config = {"file": str(log), "key_file": str(key), "witness_file": str(witness), "flush_interval": "50ms"}
    return config, log, witness, key


def _verify(key: Path, witness: Path, *logs: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "proxy",
            "audit",
            "verify",
            "--key",
            str(key),
            "--witness",
            str(witness),
            *map(str, logs),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def _last_seq(log: Path) -> int:
    return int(json.loads(log.read_bytes().splitlines()[-1])["seq"])


def _witnessed_seq(witness: Path) -> int | None:
    try:
        return int(json.loads(witness.read_text(encoding="utf-8"))["seq"])
    except (OSError, ValueError, KeyError):
        return None


def _settled(log: Path, witness: Path, event: str, timeout: float = 10.0) -> int:
    """Wait until ``event`` is written and checkpointed; the last seq."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = log.read_text(encoding="utf-8") if log.exists() else ""
        if f'"event":"{event}"' in text and _witnessed_seq(witness) == _last_seq(log):
            return _last_seq(log)
        time.sleep(0.05)
    raise AssertionError(f"no checkpointed {event} in {log}")


def _cut_newest(log: Path, lines: int) -> None:
    """Remove the newest records in place: same file, same inode, whole lines, a valid shorter chain."""
    kept = log.read_bytes().splitlines(keepends=True)[:-lines]
    with log.open("r+b") as file:
        file.truncate(sum(map(len, kept)))


def _sales(proxy: ProxyProcess, pki: TerminalPKI, count: int) -> None:
    with psycopg.connect(**proxy.conninfo(pki.cashier, pki.ca), autocommit=True) as connection:
        for n in range(count):
            connection.execute("SELECT %s::int AS sale", (n,))


def test_cutting_the_newest_records_of_a_live_log_fails_verify(
    start_proxy: StartProxy, terminal_pki: TerminalPKI, tmp_path: Path
) -> None:
    audit, log, witness, key = _audit_config(tmp_path)
    proxy = start_proxy(audit=audit)
    _sales(proxy, terminal_pki, 5)
    last = _settled(log, witness, "session_end")

    before = _verify(key, witness, log)
    assert before.returncode == 0, before.stdout + before.stderr
    assert f"reaches the witness's seq {last}" in before.stdout

    _cut_newest(log, 3)  # e.g. the records of a refused statement and the session's end
    after = _verify(key, witness, log)
    assert after.returncode == 1, after.stdout + after.stderr
    assert (
        f"cut tail: the log ends at seq {last - 3}, but the witness {witness} saw seq {last}" in after.stdout
    )
    assert "3 newest record(s) missing" in after.stdout

    # The proxy goes on writing; the cut stays visible.
    _sales(proxy, terminal_pki, 1)
    proxy.stop()
    assert _verify(key, witness, log).returncode == 1


def test_a_restart_after_the_tail_was_cut_records_a_chain_gap(
    start_proxy: StartProxy, terminal_pki: TerminalPKI, tmp_path: Path
) -> None:
    audit, log, witness, key = _audit_config(tmp_path)
    first = start_proxy(audit=audit)
    _sales(first, terminal_pki, 3)
    first.stop()
    last = _settled(log, witness, "audit_stopped")
    assert _verify(key, witness, log).returncode == 0

    _cut_newest(log, 4)  # the newest records, audit_stopped among them
    second = start_proxy(audit=audit)
    gap = second.wait_for_event("audit_chain_gap")
    assert (gap["expected_seq"], gap["found_seq"]) == (last, last - 4)
    _sales(second, terminal_pki, 1)
    second.stop()
    records = [json.loads(line) for line in log.read_text(encoding="utf-8").splitlines()]
    gaps = [record for record in records if record["event"] == "audit_chain_gap"]
    assert [(record["expected_seq"], record["found_seq"]) for record in gaps] == [(last, last - 4)]
    # The chain went on from what was left, and verify still reports the loss.
    result = _verify(key, witness, log)
    assert result.returncode == 1
    assert (
        f"records lost: on restart the log ended at seq {last - 4}, but its witness had seen seq {last}"
        in (result.stdout)
    )


@pytest.mark.parametrize(
    ("change", "problem"),
    [
        ({"witness_file": "LOG"}, "audit.witness_file: must be another path than audit.file"),
        ({"file": None, "stdout": True}, "audit.witness_file: needs audit.file"),
        ({"witness_file": "/nonexistent/audit.witness"}, "audit.witness_file: directory not found"),
    ],
)
def test_a_witness_that_anchors_nothing_is_a_config_error(
    change: dict[str, Any], problem: str, start_proxy: StartProxy, tmp_path: Path
) -> None:
    audit, log, _witness, _key = _audit_config(tmp_path)
    changed = {key: str(log) if value == "LOG" else value for key, value in change.items()}
    with pytest.raises(RuntimeError) as failed:
        start_proxy(audit={**audit, **changed})
    assert problem in str(failed.value)
