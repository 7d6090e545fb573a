"""The audit chain's end anchored in a witness file: a cut tail is reported by verify and by the next
writer; rotation, a log moved away and a damaged witness are handled. ChainWriter on real files."""

from __future__ import annotations

import dataclasses
import json
import secrets
import time
from pathlib import Path
from typing import Any

import pytest

from proxy.audit import CHAIN_GAP, AuditError, AuditSettings, ChainWriter, Checkpoint, load_key, verify
from proxy.workers import WorkerSlot
from tests.unit.test_workers import _config as _worker_config

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def key_file(tmp_path: Path) -> Path:
    path = tmp_path / "audit.key"
    path.write_bytes(secrets.token_bytes(32))
    path.chmod(0o600)
    return path


@pytest.fixture
def paths(tmp_path: Path) -> tuple[Path, Path]:
    logs, elsewhere = tmp_path / "logs", tmp_path / "witness"
    logs.mkdir()
    elsewhere.mkdir()
    return logs / "audit.log", elsewhere / "audit.witness"


def _settings(paths: tuple[Path, Path], key_file: Path, **overrides: Any) -> AuditSettings:
    log, witness = paths
    return AuditSettings(**{"file": log, "key_file": key_file, "witness_file": witness, **overrides})


def _write(config: AuditSettings, count: int, batches: int = 1) -> None:
    writer = ChainWriter(config, component="test", host="test-host")
    writer.open()
    for batch in range(batches):
        records = [(time.time_ns(), "sale", {}, {"batch": batch, "n": n}) for n in range(count)]
        assert writer.write(records)
    writer.close(time.monotonic() + 5)


def _cut_newest(path: Path, lines: int) -> None:
    """Remove the newest records in place (same file, same inode), whole lines."""
    kept = path.read_bytes().splitlines(keepends=True)[:-lines]
    with path.open("r+b") as file:
        file.truncate(sum(map(len, kept)))


def _files(log: Path) -> list[Path]:
    return [*sorted(log.parent.glob(f"{log.name}.*")), log]


def test_every_batch_replaces_a_signed_checkpoint_of_the_chain_end(
    paths: tuple[Path, Path], key_file: Path
) -> None:
    log, witness = paths
    _write(_settings(paths, key_file), 5, batches=3)
    checkpoint = Checkpoint.read(witness, load_key(key_file))
    assert checkpoint is not None
    last = log.read_bytes().splitlines(keepends=True)[-1]
    assert checkpoint.seq == json.loads(last)["seq"]
    assert checkpoint.file == str(log)
    report = verify([log], load_key(key_file), witness)
    assert report.ok and report.witnessed == checkpoint.seq, report


def test_verify_with_the_witness_reports_a_cut_tail_that_the_chain_alone_cannot_see(
    paths: tuple[Path, Path], key_file: Path
) -> None:
    log, witness = paths
    _write(_settings(paths, key_file), 10)
    key = load_key(key_file)
    _cut_newest(log, 3)
    assert verify([log], key).ok  # whole lines cut off the end leave a shorter valid chain...
    report = verify([log], key, witness)  # ...which the witness exposes
    assert not report.ok
    assert report.problem is not None and report.problem.startswith("cut tail: the log ends at seq ")
    assert "3 newest record(s) missing" in report.problem


def test_a_writer_that_finds_the_log_cut_records_a_chain_gap_and_verify_reports_it(
    paths: tuple[Path, Path], key_file: Path
) -> None:
    log, witness = paths
    config = _settings(paths, key_file)
    _write(config, 10)
    before = Checkpoint.read(witness, load_key(key_file))
    assert before is not None
    _cut_newest(log, 4)
    writer = ChainWriter(config, component="test", host="test-host")
    assert writer.open()  # the shorter chain is intact: it is continued...
    assert writer.write([(time.time_ns(), "audit_started", {}, {})])
    writer.close(time.monotonic() + 5)
    gaps = [json.loads(line) for line in log.read_text().splitlines() if CHAIN_GAP in line]
    # ...but not silently: the chain says what was lost, and the operational log is told.
    assert len(gaps) == 1
    assert gaps[0]["expected_seq"] == before.seq
    assert gaps[0]["found_seq"] == before.seq - 4
    report = verify([log], load_key(key_file), witness)
    assert not report.ok and report.problem is not None and "records lost" in report.problem, report


def test_an_emptied_log_is_a_gap_but_a_log_moved_away_continues_the_chain(
    paths: tuple[Path, Path], key_file: Path
) -> None:
    log, _witness = paths
    config = _settings(paths, key_file)
    key = load_key(key_file)
    _write(config, 5)
    rotated = log.with_name("audit.log.moved")
    log.rename(rotated)  # logrotate without a reload, then a restart
    _write(config, 5)
    report = verify([rotated, log], key, config.witness_file)
    assert report.ok, report
    log.write_bytes(b"")  # emptied in place
    _write(config, 1)
    report = verify([log], key, config.witness_file)
    assert not report.ok and report.problem is not None and "records lost" in report.problem, report


def test_rotation_keeps_the_witness_on_the_current_file(paths: tuple[Path, Path], key_file: Path) -> None:
    log, witness = paths
    config = _settings(paths, key_file, rotate_bytes=2048)
    _write(config, 10, batches=5)
    files = _files(log)
    assert len(files) > 2
    key = load_key(key_file)
    assert verify(files, key, witness).ok
    checkpoint = Checkpoint.read(witness, key)
    assert checkpoint is not None and checkpoint.inode == log.stat().st_ino
    _cut_newest(log, 1)
    report = verify(files, key, witness)
    assert not report.ok and report.problem is not None and report.problem.startswith("cut tail")


def test_a_forged_or_missing_witness_fails_verify_and_is_reported_by_the_writer(
    paths: tuple[Path, Path], key_file: Path
) -> None:
    log, witness = paths
    config = _settings(paths, key_file)
    _write(config, 3)
    key = load_key(key_file)
    record = json.loads(witness.read_text())
    record["seq"] = 1  # make the witness agree with a log cut down to its first record
    witness.write_text(json.dumps(record))
    report = verify([log], key, witness)
    assert not report.ok and report.problem is not None and "HMAC" in report.problem
    writer = ChainWriter(config, component="test", host="test-host")
    writer.open()
    writer.close(time.monotonic() + 5)
    assert [event for event, _fields in writer.notices] == ["audit_witness_invalid"]
    assert "audit_witness_invalid" in log.read_text()
    witness.unlink()
    report = verify([log], key, witness)
    assert not report.ok and report.problem == f"no audit witness at {witness}"


def test_the_witness_needs_a_log_file_and_a_path_of_its_own(paths: tuple[Path, Path], key_file: Path) -> None:
    log, _witness = paths
    with pytest.raises(AuditError):
        AuditSettings(file=log, key_file=key_file, witness_file=log)
    with pytest.raises(AuditError):
        AuditSettings(file=None, key_file=key_file, stdout=True, witness_file=log)


def test_each_worker_has_a_witness_of_its_own(tmp_path: Path, key_file: Path) -> None:
    witness = tmp_path / "w" / "audit.witness"
    settings = AuditSettings(file=tmp_path / "audit.log", key_file=key_file, witness_file=witness)
    config = _worker_config(tmp_path)
    assert config.audit is not None
    config = dataclasses.replace(config, audit=dataclasses.replace(config.audit, settings=settings))
    shaped = [WorkerSlot(index, 2, tmp_path, 1).shape(config).audit for index in (1, 2)]
    assert [(a.settings.file, a.settings.witness_file) for a in shaped if a is not None] == [
        (tmp_path / "audit-w1.log", tmp_path / "w" / "audit-w1.witness"),
        (tmp_path / "audit-w2.log", tmp_path / "w" / "audit-w2.witness"),
    ]
