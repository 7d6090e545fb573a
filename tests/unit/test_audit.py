"""proxy.audit and proxy.auditwriter: the chained, HMAC'd audit log, real files, a real writer process."""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import itertools
import json
import os
import re
import secrets
import signal
import socket
import stat
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st

from proxy.audit import (
    FILE_START,
    GENESIS,
    SINK_RECOVERED,
    AuditError,
    AuditSettings,
    ChainWriter,
    OnWriteFailure,
    VerifyReport,
    load_key,
    verify,
)
from proxy.auditwriter import PROXY_LOST, AuditLog, _pickled, _receive, _send, _WriterProcess
from proxy.config.model import AuditConfig
from proxy.server import audit_after_reload

pytestmark = pytest.mark.timeout(30)

TIMESTAMP = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z$")


@pytest.fixture
def key_file(tmp_path: Path) -> Path:
    path = tmp_path / "audit.key"
    path.write_bytes(secrets.token_bytes(32))
    path.chmod(0o600)
    return path


@pytest.fixture
def log_path(tmp_path: Path) -> Path:
    directory = tmp_path / "logs"
    directory.mkdir()
    return directory / "audit.log"


def settings(log_path: Path, key_file: Path, **overrides: Any) -> AuditSettings:
    return AuditSettings(**{"file": log_path, "key_file": key_file, "flush_interval": 0.01, **overrides})


def write_log(config: AuditSettings, count: int) -> None:
    audit = AuditLog(config, host="test-host")
    audit.start()
    for n in range(count):
        audit.record("sale", terminal="till-01", n=n)
    audit.close()


def files_of(path: Path) -> list[Path]:
    """A log's files oldest first: rotated names sort by their timestamp; the current file is last."""
    return [*sorted(path.parent.glob(f"{path.name}.*")), path]


def records(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def canonical(record: dict[str, Any]) -> str:
    return json.dumps(record, sort_keys=True, separators=(",", ":"))


def line_hash(line: str) -> str:
    return hashlib.sha256(f"{line}\n".encode()).hexdigest()


def remove_log_directory(log_path: Path) -> None:
    """An outage of the log's directory; the writer keeps its lock by the open descriptor."""
    log_path.with_name(f".{log_path.name}.lock").unlink()
    log_path.parent.rmdir()


def wait_until(condition: Callable[[], bool]) -> None:
    deadline = time.monotonic() + 5
    while not condition():
        assert time.monotonic() < deadline, "condition not met within 5 s"
        time.sleep(0.01)


def test_records_round_trip(log_path: Path, key_file: Path) -> None:
    audit = AuditLog(settings(log_path, key_file), component="proxy-test", host="store-001")
    audit.start()
    audit.record("session_opened", terminal="till-01", amount=12.5, ok=True, note=None, tags={"a": [1, 2]})
    audit.close()

    lines = log_path.read_text().splitlines()
    parsed = [json.loads(line) for line in lines]
    assert [r["event"] for r in parsed] == [FILE_START, "audit_started", "session_opened", "audit_stopped"]
    assert [r["seq"] for r in parsed] == [1, 2, 3, 4]
    assert parsed[0]["prev"] == GENESIS
    assert parsed[0]["previous_file"] is None
    for line, record in zip(lines, parsed, strict=True):
        assert line == canonical(record)  # keys sorted, one object per line
        assert TIMESTAMP.match(record["timestamp"])
        assert record["component"] == "proxy-test"
        assert record["host"] == "store-001"
        body = canonical({k: v for k, v in record.items() if k != "hmac"}).encode()
        assert record["hmac"] == hmac.new(load_key(key_file), body, hashlib.sha256).hexdigest()
    for before, after in zip(lines, parsed[1:], strict=False):
        assert after["prev"] == line_hash(before)
    fields = {name: parsed[2][name] for name in ("terminal", "amount", "ok", "note", "tags")}
    assert fields == {"terminal": "till-01", "amount": 12.5, "ok": True, "note": None, "tags": {"a": [1, 2]}}
    assert audit.written == 4
    assert audit.write_errors == 0
    assert stat.S_IMODE(log_path.stat().st_mode) == 0o600
    assert verify([log_path], load_key(key_file)) == VerifyReport(ok=True, records=4)


def test_rotation_by_size_chains_files(log_path: Path, key_file: Path) -> None:
    write_log(settings(log_path, key_file, rotate_bytes=1500), 40)

    files = files_of(log_path)
    assert len(files) >= 4
    report = verify(files, load_key(key_file))
    assert report.ok, report
    every = [record for path in files for record in records(path)]
    assert report.records == len(every)
    assert [r["seq"] for r in every] == list(range(1, len(every) + 1))
    assert [r["n"] for r in every if r["event"] == "sale"] == list(range(40))
    for previous, current in itertools.pairwise(files):
        start = records(current)[0]
        assert start["event"] == FILE_START
        assert start["previous_file"] == previous.name
        assert start["prev"] == line_hash(previous.read_text().splitlines()[-1])
        assert stat.S_IMODE(previous.stat().st_mode) == 0o600
        assert previous.stat().st_size < 1500 + 400  # rotated at the first record past the limit


def test_rotation_by_age(log_path: Path, key_file: Path) -> None:
    audit = AuditLog(settings(log_path, key_file, rotate_interval=0.05))
    audit.start()
    audit.record("early")
    time.sleep(0.2)
    audit.record("late")
    audit.close()

    files = files_of(log_path)
    assert len(files) >= 2
    assert verify(files, load_key(key_file)).ok
    assert "late" not in files[0].read_text()


def _alter(lines: list[str]) -> str:
    record = json.loads(lines[4])
    record["n"] = 999
    lines[4] = canonical(record)
    return "\n".join(lines) + "\n"


def _remove(lines: list[str]) -> str:
    del lines[4]
    return "\n".join(lines) + "\n"


def _swap(lines: list[str]) -> str:
    lines[4], lines[5] = lines[5], lines[4]
    return "\n".join(lines) + "\n"


def _forged_after_line_5(lines: list[str]) -> dict[str, Any]:
    original = json.loads(lines[4])
    return original | {"n": 12345, "seq": original["seq"] + 1, "prev": line_hash(lines[4])}


def _insert_with_copied_hmac(lines: list[str]) -> str:
    forged = _forged_after_line_5(lines) | {"hmac": json.loads(lines[5])["hmac"]}
    lines.insert(5, canonical(forged))
    return "\n".join(lines) + "\n"


def _insert_with_own_key(lines: list[str]) -> str:
    forged = _forged_after_line_5(lines)
    del forged["hmac"]
    mac = hmac.new(secrets.token_bytes(32), canonical(forged).encode(), hashlib.sha256).hexdigest()
    lines.insert(5, canonical(forged | {"hmac": mac}))
    return "\n".join(lines) + "\n"


def _truncate_tail(lines: list[str]) -> str:
    return "\n".join(lines[:-1]) + "\n" + lines[-1][: len(lines[-1]) // 2]


@pytest.mark.parametrize(
    ("tamper", "named", "line"),
    [
        (_alter, "altered record", 5),
        (_remove, "removed record", 5),
        (_swap, "reordered records", 5),
        (_insert_with_copied_hmac, "inserted record", 6),
        (_insert_with_own_key, "inserted record", 6),
        (_truncate_tail, "truncated tail", 23),
    ],
)
def test_verify_names_the_tampering(
    log_path: Path, key_file: Path, tamper: Callable[[list[str]], str], named: str, line: int
) -> None:
    write_log(settings(log_path, key_file), 20)  # file_start, audit_started, 20 sales, audit_stopped
    key = load_key(key_file)
    assert verify([log_path], key).ok

    log_path.write_text(tamper(log_path.read_text().splitlines()))

    report = verify([log_path], key)
    assert not report.ok
    assert report.problem is not None and report.problem.startswith(named), report.problem
    assert (report.file, report.line, report.records) == (log_path, line, line - 1)


def test_verify_detects_a_removed_middle_file(log_path: Path, key_file: Path) -> None:
    write_log(settings(log_path, key_file, rotate_bytes=1500), 40)
    files = files_of(log_path)
    assert len(files) >= 3

    report = verify([files[0], *files[2:]], load_key(key_file))

    assert not report.ok
    assert report.problem is not None and report.problem.startswith("removed records"), report.problem
    assert (report.file, report.line) == (files[2], 1)


def test_verify_with_the_wrong_key_fails(log_path: Path, key_file: Path) -> None:
    write_log(settings(log_path, key_file), 3)

    report = verify([log_path], secrets.token_bytes(32))

    assert not report.ok
    assert report.problem is not None and "wrong key" in report.problem
    assert (report.line, report.records) == (1, 0)


def test_verify_of_nothing_is_not_ok() -> None:
    assert not verify([], secrets.token_bytes(32)).ok


def test_restart_continues_the_chain_in_the_same_file(log_path: Path, key_file: Path) -> None:
    write_log(settings(log_path, key_file), 2)
    write_log(settings(log_path, key_file), 2)

    assert files_of(log_path) == [log_path]
    assert verify([log_path], load_key(key_file)).ok
    parsed = records(log_path)
    assert [r["event"] for r in parsed].count(FILE_START) == 1
    assert [r["resumed"] for r in parsed if r["event"] == "audit_started"] == [False, True]
    assert [r["seq"] for r in parsed] == list(range(1, len(parsed) + 1))


def _cut_last_line(log_path: Path, key_file: Path) -> None:
    text = log_path.read_text()
    log_path.write_text(text[: len(text) - 20])


def _change_key(log_path: Path, key_file: Path) -> None:
    key_file.write_bytes(secrets.token_bytes(32))


@pytest.mark.parametrize(
    ("damage", "reason"),
    [(_cut_last_line, "not newline-terminated"), (_change_key, "fails the HMAC check")],
)
def test_restart_after_a_damaged_tail_starts_a_new_chain(
    log_path: Path, key_file: Path, damage: Callable[[Path, Path], None], reason: str
) -> None:
    write_log(settings(log_path, key_file), 2)
    damage(log_path, key_file)

    write_log(settings(log_path, key_file), 2)

    damaged, current = files_of(log_path)
    start, chain_break = records(current)[:2]
    assert (start["event"], start["previous_file"], start["prev"], start["seq"]) == (
        FILE_START,
        damaged.name,
        GENESIS,
        1,
    )
    assert chain_break["event"] == "audit_chain_break"
    assert chain_break["previous_file"] == damaged.name
    assert reason in chain_break["reason"]
    key = load_key(key_file)
    assert verify([current], key).ok
    assert not verify([damaged, current], key).ok


def test_reopen_after_logrotate_moved_the_file(log_path: Path, key_file: Path) -> None:
    audit = AuditLog(settings(log_path, key_file))
    audit.start()
    audit.record("before_rotation")
    wait_until(lambda: audit.written == 3)
    moved = log_path.with_name("audit.log.1")
    log_path.rename(moved)
    audit.reopen()
    audit.record("after_rotation")
    audit.close()

    assert verify([moved, log_path], load_key(key_file)).ok
    start = records(log_path)[0]
    assert start["event"] == FILE_START
    assert start["prev"] == line_hash(moved.read_text().splitlines()[-1])
    assert "after_rotation" in log_path.read_text()
    assert stat.S_IMODE(log_path.stat().st_mode) == 0o600


def test_reopen_without_a_move_keeps_the_file(log_path: Path, key_file: Path) -> None:
    audit = AuditLog(settings(log_path, key_file))
    audit.start()
    audit.reopen()
    audit.record("after_reopen")
    audit.close()

    assert files_of(log_path) == [log_path]
    assert [r["event"] for r in records(log_path)].count(FILE_START) == 1


def test_write_errors_are_counted_and_retried(tmp_path: Path, log_path: Path, key_file: Path) -> None:
    audit = AuditLog(settings(log_path, key_file))
    audit.start()
    moved = tmp_path / "audit.log.1"
    log_path.rename(moved)
    remove_log_directory(log_path)  # the new file cannot be created until the directory is back
    audit.reopen()
    audit.record("during_outage")
    wait_until(lambda: audit.write_errors > 0)
    assert audit.written == 2

    wait_until(lambda: audit.failing is not None)
    log_path.parent.mkdir()
    # The new file's start, the retried record, and the outage's start and end.
    wait_until(lambda: audit.written == 6)
    assert audit.failing is None
    audit.close()

    events = [record["event"] for record in records(log_path)]
    assert events[:5] == [FILE_START, "during_outage", "audit_sink_failed", SINK_RECOVERED, "audit_stopped"]
    assert verify([moved, log_path], load_key(key_file)).ok


def test_refusing_follows_the_outage_and_its_mode(tmp_path: Path, log_path: Path, key_file: Path) -> None:
    # The data path tests only this flag before working out an audit refusal: it must never lag.
    audit = AuditLog(settings(log_path, key_file))
    audit.start()
    assert not audit.refusing
    log_path.rename(tmp_path / "audit.log.1")
    remove_log_directory(log_path)
    audit.reopen()
    audit.record("during_outage")
    wait_until(lambda: audit.failing is not None)
    assert audit.refusing
    audit.on_write_failure = OnWriteFailure.CONTINUE
    assert not audit.refusing
    audit.on_write_failure = OnWriteFailure.REFUSE
    assert audit.refusing
    log_path.parent.mkdir()
    wait_until(lambda: audit.failing is None)
    assert not audit.refusing
    audit.close()


def test_close_raises_when_records_cannot_be_written(tmp_path: Path, log_path: Path, key_file: Path) -> None:
    audit = AuditLog(settings(log_path, key_file))
    audit.start()
    log_path.rename(tmp_path / "audit.log.1")
    remove_log_directory(log_path)
    audit.reopen()
    audit.record("lost")

    with pytest.raises(AuditError, match="4 audit records could not be written"):
        audit.close(timeout=0.1)  # the new file's start, "lost", audit_sink_failed and audit_stopped
    audit.close()  # once is enough: a second close does nothing


def test_close_writes_everything_recorded_by_concurrent_threads(log_path: Path, key_file: Path) -> None:
    # A flush interval longer than the test: only close() can have written the records.
    audit = AuditLog(settings(log_path, key_file, flush_interval=60.0))
    audit.start()

    def worker(thread: int) -> None:
        for n in range(2500):
            audit.record("sale", thread=thread, n=n)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    audit.close()

    parsed = records(log_path)
    assert len(parsed) == 10_000 + 3  # audit_file_start, audit_started, audit_stopped
    assert audit.written == len(parsed)
    assert audit.pending == 0
    for thread in range(4):
        assert [r["n"] for r in parsed if r.get("thread") == thread] == list(range(2500))
    assert verify([log_path], load_key(key_file)).ok


class Unprintable:
    def __str__(self) -> str:
        raise RuntimeError("no text")


def test_record_never_raises_on_odd_values(log_path: Path, key_file: Path) -> None:
    cyclic: list[object] = []
    cyclic.append(cyclic)
    audit = AuditLog(settings(log_path, key_file), host="store-001")
    audit.start()
    audit.record(
        "odd",
        data=b"\x00\xff",
        path=Path("/srv/pos"),
        error=ValueError("bad input"),
        nan=float("nan"),
        huge=10**5000,
        cyclic=cyclic,
        unprintable=Unprintable(),
        mapping={1: "one", (2, 3): {4}},
        seq="mine",
        host="till-01",
    )
    audit.record(42)  # type: ignore[arg-type]
    audit.close()

    odd = records(log_path)[2]
    assert odd["data"] == "b'\\x00\\xff'"
    assert odd["path"] == "/srv/pos"
    assert odd["error"] == "bad input"
    assert odd["nan"] == "nan"
    assert odd["huge"] == "<unprintable int>"
    assert isinstance(odd["cyclic"], list)
    assert odd["unprintable"] == "<unprintable Unprintable>"
    assert odd["mapping"] == {"1": "one", "(2, 3)": "{4}"}
    assert (odd["seq"], odd["seq_"], odd["host"], odd["host_"]) == (3, "mine", "store-001", "till-01")
    assert records(log_path)[3]["event"] == "42"
    assert audit.write_errors == 0
    assert verify([log_path], load_key(key_file)).ok


def test_stdout_sink_without_a_file(
    tmp_path: Path, key_file: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    audit = AuditLog(AuditSettings(file=None, key_file=key_file, stdout=True, flush_interval=0.01))
    audit.start()
    audit.record("sale", n=1)
    audit.close()

    copy = tmp_path / "journal.log"
    copy.write_text(capfd.readouterr().out)
    assert [r["event"] for r in records(copy)] == [FILE_START, "audit_started", "sale", "audit_stopped"]
    assert audit.written == 4
    assert verify([copy], load_key(key_file)).ok


def test_short_key_is_refused(log_path: Path, key_file: Path) -> None:
    key_file.write_bytes(b"k" * 31)
    with pytest.raises(AuditError, match="at least 32"):
        AuditLog(settings(log_path, key_file)).start()
    assert not log_path.exists()


def test_key_readable_by_others_is_refused(log_path: Path, key_file: Path) -> None:
    key_file.chmod(0o644)
    with pytest.raises(AuditError, match="other users"):
        AuditLog(settings(log_path, key_file)).start()


def test_missing_directory_is_refused(tmp_path: Path, key_file: Path) -> None:
    with pytest.raises(AuditError, match="does not exist"):
        AuditLog(settings(tmp_path / "nowhere" / "audit.log", key_file)).start()


def test_a_log_needs_a_sink(key_file: Path) -> None:
    with pytest.raises(AuditError, match="no sink"):
        AuditLog(AuditSettings(file=None, key_file=key_file)).start()


@pytest.mark.parametrize("key_length", [32, 63, 64, 65, 200])
def test_hmac_is_hmac_sha256_of_the_line_without_it_for_any_key_length(
    log_path: Path, key_file: Path, key_length: int
) -> None:
    key_file.write_bytes(secrets.token_bytes(key_length))
    write_log(settings(log_path, key_file), 3)

    key = load_key(key_file)
    for line in log_path.read_text().splitlines():
        record = json.loads(line)
        body = canonical({k: v for k, v in record.items() if k != "hmac"}).encode()
        assert record["hmac"] == hmac.new(key, body, hashlib.sha256).hexdigest()
    assert verify([log_path], key).ok


def test_record_with_merges_shared_fields_and_fields_win(log_path: Path, key_file: Path) -> None:
    shared = {"terminal": "till-01", "store": "store-001", "seq": "theirs", "amount": 1}
    audit = AuditLog(settings(log_path, key_file))
    audit.start()
    audit.record_with(shared, "sale", amount=2)
    audit.record_with(shared, "refund", amount=3, note="returned")
    audit.close()

    sale, refund = records(log_path)[2:4]
    assert (sale["event"], sale["terminal"], sale["store"], sale["amount"]) == (
        "sale",
        "till-01",
        "store-001",
        2,
    )
    assert (refund["event"], refund["amount"], refund["note"]) == ("refund", 3, "returned")
    assert sale["seq_"] == refund["seq_"] == "theirs"  # shared fields are renamed like any other
    assert shared == {"terminal": "till-01", "store": "store-001", "seq": "theirs", "amount": 1}
    assert verify([log_path], load_key(key_file)).ok


def test_values_that_look_like_the_hmac_field_do_not_confuse_the_line(log_path: Path, key_file: Path) -> None:
    audit = AuditLog(settings(log_path, key_file))
    audit.start()
    audit.record("sale", a=',"hmac":"x"', nested={"hmac": "0" * 64, "z": [',"hmac":"']}, hmac_="mine")
    audit.close()

    sale = records(log_path)[2]
    assert (sale["a"], sale["nested"], sale["hmac_"]) == (
        ',"hmac":"x"',
        {"hmac": "0" * 64, "z": [',"hmac":"']},
        "mine",
    )
    assert verify([log_path], load_key(key_file)).ok


def test_recording_threads_are_not_held_up_while_a_backlog_is_written(
    key_file: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    # With a 1 s switch interval this thread gets the GIL back only when another thread gives it up.
    # The records are rendered in the writer process; the shipping thread holds the GIL only while it
    # pickles them, in chunks, before it sends them.
    audit = AuditLog(AuditSettings(file=None, key_file=key_file, stdout=True, flush_interval=2.0))
    audit.start()
    switch_interval = sys.getswitchinterval()
    sys.setswitchinterval(1.0)
    try:
        for n in range(20_000):
            audit.record("sale", terminal="till-01", n=n)
        longest_gap = 0.0
        deadline = time.monotonic() + 20
        before = time.monotonic()
        while audit.pending and time.monotonic() < deadline:
            time.sleep(0.0005)
            now = time.monotonic()
            longest_gap, before = max(longest_gap, now - before), now
    finally:
        sys.setswitchinterval(switch_interval)
    audit.close()

    assert audit.written == 20_003
    assert longest_gap < 0.1, f"this thread waited {longest_gap:.3f} s for the GIL"
    capfd.readouterr()


def writer_pid(audit: AuditLog) -> int:
    writer = audit._writer
    assert writer is not None
    return writer._process.pid


def test_a_killed_writer_process_is_replaced_and_nothing_is_lost(log_path: Path, key_file: Path) -> None:
    audit = AuditLog(settings(log_path, key_file))
    audit.start()
    audit.record("sale", n=1)
    wait_until(lambda: audit.written == 3)
    first = writer_pid(audit)
    os.kill(first, signal.SIGKILL)
    for n in range(2, 500):
        audit.record("sale", n=n)
    wait_until(lambda: audit.written >= 3 + 1 + 498)  # the new writer's opening record too
    assert audit.write_errors == 1
    assert writer_pid(audit) != first
    audit.close()

    parsed = records(log_path)
    assert [r["n"] for r in parsed if r["event"] == "sale"] == list(range(1, 500))
    assert [r["event"] for r in parsed].count("audit_writer_restarted") == 1
    assert verify([log_path], load_key(key_file)).ok


def test_the_writer_outlives_signals_to_the_process_group(log_path: Path, key_file: Path) -> None:
    # Ctrl-C in a terminal, or a service manager's SIGTERM to the whole unit, reaches the writer too:
    # the log ends when the proxy closes it, with everything the proxy recorded.
    audit = AuditLog(settings(log_path, key_file))
    audit.start()
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        os.kill(writer_pid(audit), signum)
    audit.record("sale", n=1)
    audit.close()
    assert [r["event"] for r in records(log_path)][-2:] == ["sale", "audit_stopped"]
    assert audit.write_errors == 0


def running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"  # a zombie has exited; whoever adopted it reaps it


def test_close_gives_up_on_a_writer_that_hangs(log_path: Path, key_file: Path) -> None:
    audit = AuditLog(settings(log_path, key_file))
    audit.start()
    writer = writer_pid(audit)
    os.kill(writer, signal.SIGSTOP)  # as a writer stuck on a hung disk
    audit.record("sale", n=1)
    started = time.monotonic()
    with pytest.raises(AuditError, match=r"did not finish within 0\.2 s"):
        audit.close(timeout=0.2)
    assert time.monotonic() - started < 5
    assert audit._thread is not None and not audit._thread.is_alive()
    wait_until(lambda: not running(writer))


class ModuleLookupFails:
    def __getattribute__(self, name: str) -> Any:
        if name == "__module__":
            raise RuntimeError("no module")
        return object.__getattribute__(self, name)


def test_values_pickle_cannot_take_are_written_as_text(log_path: Path, key_file: Path) -> None:
    deep: list[object] = []
    for _ in range(5000):
        deep = [deep]
    audit = AuditLog(settings(log_path, key_file))
    audit.start()
    audit.record("odd", deep=deep)
    audit.record("odd", kind=type(lambda: 0), iterator=type(iter([])), module=type(os))
    audit.record("odd", lookup=ModuleLookupFails())
    audit.record("sale", n=1)
    wait_until(lambda: audit.pending == 0)
    audit.record("sale", n=2)
    audit.close()

    parsed = records(log_path)
    odd = [r for r in parsed if r["event"] == "odd"]
    assert len(odd) == 3
    assert isinstance(odd[0]["deep"], list)
    assert odd[1]["kind"] == "<class 'function'>"
    assert odd[2]["lookup"].startswith("<tests.unit.test_audit.ModuleLookupFails object")
    assert [r["n"] for r in parsed if r["event"] == "sale"] == [1, 2]
    assert audit.write_errors == 0
    assert verify([log_path], load_key(key_file)).ok


def test_a_record_that_cannot_be_rendered_is_replaced_and_the_log_goes_on(
    log_path: Path, key_file: Path
) -> None:
    audit = AuditLog(settings(log_path, key_file))
    audit.start()
    audit.record_with({"store": "store-001", 7: "keys that do not sort"}, "sale", n=1)
    audit.record("sale", n=2)
    audit.close()
    events = [(r["event"], r.get("n")) for r in records(log_path)]
    assert ("audit_record_unrenderable", None) in events
    assert ("sale", 2) in events
    assert verify([log_path], load_key(key_file)).ok


def test_records_the_writer_could_not_write_yet_survive_its_death(
    tmp_path: Path, log_path: Path, key_file: Path
) -> None:
    audit = AuditLog(settings(log_path, key_file))
    audit.start()
    moved = tmp_path / "audit.log.1"
    log_path.rename(moved)
    remove_log_directory(log_path)
    audit.reopen()
    audit.record("during_outage")
    wait_until(lambda: audit.write_errors > 0)  # the writer has it, and could not write it
    os.kill(writer_pid(audit), signal.SIGKILL)
    log_path.parent.mkdir()
    wait_until(lambda: audit.pending == 0)  # a new writer has written it
    audit.close()
    assert "during_outage" in [r["event"] for r in records(log_path)]


def test_a_second_writer_cannot_extend_the_same_chain(
    log_path: Path, key_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("proxy.auditwriter._LOCK_WAIT", 0.2)
    first = AuditLog(settings(log_path, key_file))
    first.start()
    second = AuditLog(settings(log_path, key_file))
    with pytest.raises(AuditError, match="in use by another writer process"):
        second.start()
    first.record("sale", n=1)
    first.close()
    # Once the first has closed the log, a successor continues its chain.
    second.start()
    second.close()
    assert verify([log_path], load_key(key_file)).ok


def test_a_writer_that_cannot_be_restarted_is_retried_with_backoff(
    tmp_path: Path, log_path: Path, key_file: Path
) -> None:
    audit = AuditLog(settings(log_path, key_file))  # flush_interval 10 ms
    audit.start()
    hidden = tmp_path / "key-away"
    key_file.rename(hidden)
    try:
        os.kill(writer_pid(audit), signal.SIGKILL)
        audit.record("sale", n=1)
        time.sleep(1.5)
        # Without backoff: a new process every 10 ms. With it: 20, 40, 80... ms apart.
        assert 1 <= audit.write_errors <= 10, audit.write_errors
    finally:
        hidden.rename(key_file)
        wait_until(lambda: audit.pending == 0)
        audit.close()
    assert [r["n"] for r in records(log_path) if r["event"] == "sale"] == [1]


def test_close_starts_a_writer_even_while_restarts_back_off(
    tmp_path: Path, log_path: Path, key_file: Path
) -> None:
    audit = AuditLog(settings(log_path, key_file))
    audit.start()
    hidden = tmp_path / "key-away"
    key_file.rename(hidden)
    os.kill(writer_pid(audit), signal.SIGKILL)
    audit.record("sale", n=1)
    wait_until(lambda: audit.write_errors >= 2)
    audit._next_restart_at = time.monotonic() + 60  # as after many failed starts
    hidden.rename(key_file)
    audit.close(timeout=5)
    assert [r["n"] for r in records(log_path) if r["event"] == "sale"] == [1]


def test_a_closed_chain_writes_nothing_more(tmp_path: Path, log_path: Path, key_file: Path) -> None:
    writer = ChainWriter(settings(log_path, key_file), component="test", host="test-host")
    writer.open()
    log_path.rename(tmp_path / "audit.log.1")
    remove_log_directory(log_path)
    writer.write([(time.time_ns(), "sale", {}, {"n": 1})], reopen=True)
    writer.close(deadline=0.0)
    assert writer.unwritten == 2  # the new file's start and the sale
    log_path.parent.mkdir()
    writer.close(deadline=time.monotonic() + 1)  # the proxy was told they were not written: they stay so
    assert not log_path.exists()


def test_a_writer_whose_proxy_vanishes_mid_reply_still_closes_its_file(
    log_path: Path, key_file: Path
) -> None:
    writer = _WriterProcess.spawn()
    channel = writer._channel
    _send(channel, ("start", settings(log_path, key_file), "test", "test-host", "audit_started", 1, 1.0))
    assert _receive(channel)[0][0] == "started"
    _send(channel, ("batch", False), _pickled([(time.time_ns(), "sale", {}, {"n": 1})]))
    # Gone without reading the answer: the writer's send fails with ECONNRESET rather than EOF.
    channel.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    channel.close()
    assert writer._process.wait(5) == 0
    assert [r["event"] for r in records(log_path)][-2:] == ["sale", PROXY_LOST]
    assert verify([log_path], load_key(key_file)).ok


_PROXY_THAT_DIES = """
import os, sys, time
from pathlib import Path
from proxy.audit import AuditSettings
from proxy.auditwriter import AuditLog, _pickled, _receive, _send, _WriterProcess

audit = AuditLog(AuditSettings(file=Path(sys.argv[1]), key_file=Path(sys.argv[2]), flush_interval=0.01))
audit.start()
print(os.getpid(), audit._writer._process.pid, flush=True)
for n in range(1000):
    audit.record("sale", n=n)
deadline = time.monotonic() + 10
while audit.written < 1002 and time.monotonic() < deadline:
    time.sleep(0.01)
os.kill(os.getpid(), 9)
"""


def test_a_writer_whose_proxy_died_finishes_its_file_and_exits(log_path: Path, key_file: Path) -> None:
    dying = subprocess.run(
        [sys.executable, "-c", _PROXY_THAT_DIES, str(log_path), str(key_file)],
        capture_output=True,
        text=True,
        timeout=20,
        check=False,
    )
    assert dying.returncode == -signal.SIGKILL, dying.stderr
    proxy, writer = map(int, dying.stdout.split())
    wait_until(lambda: not running(writer))
    written = records(log_path)
    assert [r["n"] for r in written if r["event"] == "sale"] == list(range(1000))
    # The log ends saying that its proxy went away without closing it, and which proxy that was.
    assert written[-1]["event"] == PROXY_LOST and written[-1]["pid"] == proxy, written[-1]
    assert "audit_stopped" not in [r["event"] for r in written]
    assert verify([log_path], load_key(key_file)).ok


_NAMES = st.sampled_from(["a", "seq", "seq_", "hmac", "host", "outcome", "zz", "é", "role", "prev"])
_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=3), inner, max_size=3),
    max_leaves=6,
)
_FIELDS = st.dictionaries(_NAMES, _VALUES, max_size=6)


# Every example starts and stops a writer process (a few hundred ms on a loaded 2-core machine):
# 40 examples, with room for them under load.
@pytest.mark.timeout(180)
@hypothesis_settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(shared=_FIELDS, records=st.lists(_FIELDS, min_size=1, max_size=3))
def test_every_line_is_the_canonical_json_of_its_record_with_its_hmac(
    tmp_path: Path, key_file: Path, shared: dict[str, Any], records: list[dict[str, Any]]
) -> None:
    log_path = tmp_path / f"audit-{secrets.token_hex(4)}.log"
    audit = AuditLog(settings(log_path, key_file))
    audit.start()
    for fields in records:
        audit.record_with(shared, "sale", **fields)
        audit.record("refund", **fields)
    audit.close()

    key = load_key(key_file)
    lines = log_path.read_text().splitlines()
    for line in lines:
        record = json.loads(line)
        assert line == canonical(record)
        body = canonical({k: v for k, v in record.items() if k != "hmac"}).encode()
        assert record["hmac"] == hmac.new(key, body, hashlib.sha256).hexdigest()
    sales = [json.loads(line) for line in lines if json.loads(line)["event"] == "sale"]
    for fields, sale in zip(records, sales, strict=True):
        merged = {**shared, **fields}  # fields win over shared ones
        # The log's own keys keep theirs; the caller's value gets a trailing underscore.
        written_as = {
            name: f"{name}_" if name in ("seq", "hmac", "host", "prev") else name for name in merged
        }
        for name, value in merged.items():
            assert written_as[name] in sale
            plain = value is None or type(value) in (str, bool) or (type(value) is int and abs(value) < 2**63)
            # "seq" and "seq_" both end up as "seq_": the later one wins.
            if plain and list(written_as.values()).count(written_as[name]) == 1:
                assert sale[written_as[name]] == value
    assert verify([log_path], key).ok


# --- what a reload may change of a running audit log (proxy.server.audit_after_reload) ---------


def _audit_section(tmp_path: Path, **settings: Any) -> AuditConfig:
    fields: dict[str, Any] = {"file": tmp_path / "audit.log", "key_file": tmp_path / "audit.key", **settings}
    share = fields.pop("allowed_statements", 1.0)
    return AuditConfig(settings=AuditSettings(**fields), allowed_statements=share)


def test_a_reload_keeps_the_running_audit_file_key_and_writer_settings(tmp_path: Path) -> None:
    running = _audit_section(tmp_path)
    wanted = _audit_section(
        tmp_path,
        file=tmp_path / "elsewhere.log",
        key_file=tmp_path / "other.key",
        rotate_bytes=1024,
        allowed_statements=0.5,
    )
    kept, not_applied = audit_after_reload(running, wanted)
    assert not_applied == ["audit.file", "audit.key_file", "audit.rotate_bytes"]
    assert kept == AuditConfig(settings=running.settings, allowed_statements=0.5)


def test_a_reload_neither_starts_nor_stops_the_audit_log(tmp_path: Path) -> None:
    running = _audit_section(tmp_path)
    assert audit_after_reload(running, None) == (running, ["audit"])
    assert audit_after_reload(None, running) == (None, ["audit"])
    assert audit_after_reload(running, _audit_section(tmp_path)) == (running, [])
    assert audit_after_reload(None, None) == (None, [])


# --- a log file that takes no records (full or unwritable disk) ------------------------------------


def test_records_over_the_held_bound_are_dropped_and_the_chain_says_so(
    tmp_path: Path, log_path: Path, key_file: Path
) -> None:
    audit = AuditLog(settings(log_path, key_file, max_held_records=5))
    audit.start()
    moved = tmp_path / "audit.log.1"
    log_path.rename(moved)
    remove_log_directory(log_path)
    audit.reopen()
    audit.record("first")
    wait_until(lambda: audit.failing is not None)
    failing = audit.failing
    assert failing is not None and not failing.disk_full and "No such file" in failing.error
    for n in range(20):
        audit.record("sale", n=n)
    wait_until(lambda: audit.dropped > 0)
    dropped = audit.dropped

    log_path.parent.mkdir()
    wait_until(lambda: audit.failing is None)
    audit.close()

    written = records(log_path)
    assert len([r for r in written if r["event"] == "sale"]) == 20 - dropped
    [end] = [r for r in written if r["event"] == SINK_RECOVERED]
    assert (end["dropped"], end["on_write_failure"], end["outcome"]) == (dropped, "refuse", "failure")
    report = verify([moved, log_path], load_key(key_file))
    assert not report.ok and report.lost, report
    assert report.problem is not None and report.problem.startswith(f"records lost: {dropped} record(s) from")
    # Every record was checked, those after the loss too.
    assert report.records == len(written) + len(records(moved))


def _log_with_a_loss(log_path: Path, key_file: Path) -> None:
    writer = ChainWriter(settings(log_path, key_file), component="test", host="test-host")
    writer.open()
    now = time.time_ns()
    loss = {"dropped": 3, "dropped_from": "a", "dropped_to": "b", "error": "No space left on device"}
    writer.write([(now, "sale", {}, {"n": 1}), (now, SINK_RECOVERED, {}, loss), (now, "sale", {}, {"n": 2})])
    writer.close(time.monotonic() + 1)


def test_verify_reports_a_recorded_loss_after_checking_the_whole_chain(
    log_path: Path, key_file: Path
) -> None:
    _log_with_a_loss(log_path, key_file)
    report = verify([log_path], load_key(key_file))
    assert report == VerifyReport(
        ok=False,
        records=4,
        problem="records lost: 3 record(s) from a to b were dropped while the log file took none "
        "(No space left on device)",
        file=log_path,
        line=3,
        lost=True,
    )


def test_tampering_after_a_recorded_loss_is_reported_as_tampering(log_path: Path, key_file: Path) -> None:
    _log_with_a_loss(log_path, key_file)
    lines = log_path.read_text().splitlines(keepends=True)
    lines[3] = lines[3].replace('"n":2', '"n":9')
    log_path.write_text("".join(lines))
    report = verify([log_path], load_key(key_file))
    assert (report.ok, report.lost, report.line, report.problem) == (
        False,
        False,
        4,
        "altered record: HMAC mismatch",
    )


def test_a_reload_applies_on_write_failure_but_not_max_held_records(tmp_path: Path) -> None:
    running = _audit_section(tmp_path)
    wanted = dataclasses.replace(
        _audit_section(tmp_path, max_held_records=10), on_write_failure=OnWriteFailure.CONTINUE
    )
    kept, not_applied = audit_after_reload(running, wanted)
    assert not_applied == ["audit.max_held_records"]
    assert kept == dataclasses.replace(running, on_write_failure=OnWriteFailure.CONTINUE)
