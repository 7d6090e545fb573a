"""Tamper-evident audit log: records built cheaply on the data path,
then rendered, chained and written in batches off it.

Format: one JSON object per line in canonical form (keys sorted, no spaces, ASCII), structlog-style
``event`` and ``timestamp`` (UTC, microseconds, ``2026-11-25T04:14:47.123456Z``) plus ``component``,
``host``, ``seq`` (1, 2, ... continuing across the files of one log), ``prev`` (hex SHA-256 of the
previous record's line as written, newline included, so ``sed -n Np FILE | sha256sum`` reproduces it;
``"0" * 64`` before the first record of a log) and ``hmac`` (hex HMAC-SHA256 under the key file over the
canonical JSON of the record without ``hmac``). Every file starts with an ``audit_file_start`` record whose
``prev`` is the chain anchor (the hash of the previous file's last line) and whose ``previous_file`` names
that file (null for a new log). ``audit_started`` and ``audit_stopped`` mark the log being started and
stopped; ``audit_chain_break`` says why a log had to start a new chain (a damaged tail, a changed key).
``audit_sink_failed`` and ``audit_sink_recovered`` bracket a time the log file took no records (a full or
unwritable disk); the second says how many records were dropped meanwhile, which ``verify`` reports.

Writing: ``proxy.auditwriter.AuditLog`` queues records on the data path and ships them to a writer
process, where ``ChainWriter`` renders each record once, from a layout kept per kind of record (shared
mapping, event, field names) that holds the sorted keys and the fixed fields already as JSON; the HMAC
input is that text without the ``hmac`` field, which is then spliced in. Durability is described there.

Limits: the chain exposes an altered, inserted, removed or reordered record anywhere except at the very end
of the newest file, where cutting off whole lines leaves a shorter valid chain. That end is anchored outside
the log: with a witness file (``AuditSettings.witness_file``, best on another filesystem that the log's
readers cannot write) every flushed batch replaces a signed ``Checkpoint`` of (seq, hash, file) there;
``verify`` with the witness reports a log that ends before it, and a writer that opens a log shorter than
the checkpoint writes ``audit_chain_gap`` (which ``verify`` reports) instead of silently going on. A witness
put back from an older copy goes undetected, as does cutting both. The stdout copy to journald is another
witness. ``verify`` trusts the anchor of the first file it is given, so a retained window of a log
verifies; a complete log starts at seq 1, prev zeros.
"""

from __future__ import annotations

import dataclasses
import enum
import errno
import fcntl
import hashlib
import hmac
import json
import math
import os
import secrets
import stat
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from contextlib import suppress
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from functools import lru_cache
from pathlib import Path

__all__ = [
    "CHAIN_GAP",
    "FILE_START",
    "GENESIS",
    "MIN_KEY_BYTES",
    "SINK_RECOVERED",
    "AuditError",
    "AuditSettings",
    "ChainWriter",
    "Checkpoint",
    "OnWriteFailure",
    "Record",
    "VerifyReport",
    "iso_timestamp",
    "json_ready",
    "load_key",
    "verify",
]

FILE_START = "audit_file_start"
CHAIN_GAP = "audit_chain_gap"
SINK_RECOVERED = "audit_sink_recovered"
GENESIS = "0" * 64
MIN_KEY_BYTES = 32

# Fields the log itself sets; a caller's field of the same name is kept with a trailing underscore.
_RESERVED = frozenset({"event", "timestamp", "component", "host", "seq", "prev", "hmac"})
# Deeper structures are rendered with str(): it bounds the work and ends cycles.
_MAX_DEPTH = 4
# Write within a long batch too, so a backlog is not held in memory a second time as rendered lines.
_CHUNK_BYTES = 1 << 20
_READ_BYTES = 1 << 16
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
# One encoder for every record: json.dumps with options builds a new one per call.
_ENCODER = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)
# Ints outside this range are rendered as text (see _plain).
_INT_MIN, _INT_END = -(2**63), 2**64
_NO_FIELDS: Mapping[str, object] = {}
# One record as recorded: time.time_ns(), event, fields shared with other records, its own fields.
Record = tuple[int, object, Mapping[str, object], Mapping[str, object]]
_ESCAPE = json.encoder.encode_basestring_ascii  # a str as JSON text, as _ENCODER writes it
# Record layouts the writer keeps (see _Layout); it forgets them all when there are more.
_MAX_LAYOUTS = 4096


class AuditError(Exception):
    """The audit log cannot be opened, its key cannot be used, or close() could not write everything."""


class OnWriteFailure(enum.Enum):
    """What statements do while the audit log file takes no records (a full or unwritable disk)."""

    REFUSE = "refuse"  # refused (53100 disk full, else 58030), so nothing runs that is not audited
    CONTINUE = "continue"  # run on; the records are held in memory, up to max_held_records


# Errors of a write that mean the filesystem is out of space (53100 disk_full for the client).
DISK_FULL_ERRNOS = frozenset((errno.ENOSPC, errno.EDQUOT))


@dataclass(frozen=True, slots=True)
class AuditSettings:
    file: Path | None  # None: no file sink
    key_file: Path  # HMAC key: raw bytes, at least MIN_KEY_BYTES of them
    stdout: bool = False  # also write each line to stdout (journald)
    rotate_bytes: int = 100 * 1024 * 1024
    rotate_interval: float = 86400.0  # seconds; rotate when the current file is older
    flush_interval: float = 0.2  # seconds between batch writes
    # Where a signed checkpoint of the chain's end is kept, outside the log (see Checkpoint).
    witness_file: Path | None = None
    # While the file takes no records, at most this many are held in memory; later ones are dropped,
    # counted, and said in the chain (audit_sink_recovered) once it takes records again.
    max_held_records: int = 100_000

    def __post_init__(self) -> None:
        if self.rotate_bytes <= 0 or self.rotate_interval <= 0 or self.flush_interval <= 0:
            raise AuditError("audit rotate_bytes, rotate_interval and flush_interval must be positive")
        if self.max_held_records < 0:
            raise AuditError("audit max_held_records must not be negative")
        if self.witness_file is not None and (self.file is None or self.witness_file == self.file):
            raise AuditError("the audit witness file needs a log file, and a path of its own")


@dataclass(frozen=True, slots=True)
class VerifyReport:
    ok: bool
    records: int  # records that verified before the first problem (all of them when ok)
    problem: str | None = None
    file: Path | None = None
    line: int | None = None  # 1-based
    witnessed: int | None = None  # the witness's seq, when one was checked and matched
    # The problem is a loss the log itself records (a chain gap, records dropped while the disk was
    # full); every record was checked and the chain and HMACs are intact.
    lost: bool = False


@dataclass(frozen=True, slots=True)
class Checkpoint:
    """The end of the chain as last written: kept in the witness file, outside the log, replaced after
    every batch the log took. Cutting the newest records off the log leaves them in the witness: the
    log then ends before ``seq``. HMAC-signed with the log's key, so it cannot be made to agree."""

    file: str  # the log file being written
    device: int
    inode: int
    seq: int  # of the last record written
    hash: str  # SHA-256 of that record's line
    timestamp: str

    def render(self, key: bytes) -> bytes:
        body = {
            "file": self.file,
            "device": self.device,
            "inode": self.inode,
            "seq": self.seq,
            "hash": self.hash,
            "timestamp": self.timestamp,
        }
        return f"{_canonical({**body, 'hmac': _mac(key, _canonical(body))})}\n".encode("ascii")

    @classmethod
    def read(cls, path: Path, key: bytes) -> Checkpoint | None:
        """The checkpoint in ``path``; None when there is none yet; AuditError when it cannot be trusted."""
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise AuditError(f"cannot read audit witness {path}: {exc.strerror}") from exc
        try:
            record = json.loads(data)
            mac = record.pop("hmac")
            checkpoint = cls(
                record["file"],
                record["device"],
                record["inode"],
                record["seq"],
                record["hash"],
                record["timestamp"],
            )
        except (ValueError, KeyError, TypeError, AttributeError):
            raise AuditError(f"audit witness {path} is not a checkpoint") from None
        if not (isinstance(mac, str) and hmac.compare_digest(mac, _mac(key, _canonical(record)))):
            raise AuditError(f"audit witness {path} fails the HMAC check (altered, or another key)")
        return checkpoint


@dataclass(frozen=True, slots=True)
class _Entry:
    """What verification needs of one parsed line."""

    seq: int
    prev: str
    event: str
    authentic: bool  # its HMAC matches
    lost: str | None = None  # an audit_chain_gap record: which records the writer found missing


def load_key(path: Path) -> bytes:
    """The HMAC key: the file's raw bytes, at least MIN_KEY_BYTES long and not accessible to other users."""
    try:
        mode = path.stat().st_mode
        key = path.read_bytes()
    except OSError as exc:
        raise AuditError(f"cannot read audit key file {path}: {exc.strerror}") from exc
    # Anyone who can read the key can forge records that verify.
    if mode & stat.S_IRWXO:
        raise AuditError(f"audit key file {path} is accessible to other users; chmod o-rwx it")
    if len(key) < MIN_KEY_BYTES:
        raise AuditError(f"audit key file {path} holds {len(key)} bytes; at least {MIN_KEY_BYTES} are needed")
    return key


class ChainWriter:
    """Renders records into one hash chain and writes them to the sinks; used by one thread at a time
    (the audit writer process, see proxy.auditwriter).

    Operational events (a write failure, a broken chain) are collected in ``notices`` for the caller to
    log, so that this class writes nothing but audit lines to stdout."""

    def __init__(self, settings: AuditSettings, *, component: str, host: str) -> None:
        if settings.file is None and not settings.stdout:
            raise AuditError("audit log has no sink: configure a file, stdout, or both")
        self._settings = settings
        self._component = component
        self._host = host
        self.written = 0  # records handed to the OS by the file sink (by stdout when there is no file)
        self.write_errors = 0
        # Why the file last failed to take a line: (errno, message), None once it took them all.
        self.failure: tuple[int | None, str] | None = None
        self.notices: list[tuple[str, dict[str, object]]] = []
        self._reopen_pending = False
        self._signer = _Signer(b"")
        self._layouts: dict[tuple[int, str, tuple[str, ...]], _Layout] = {}
        # The hmac field while a record is encoded; see _emit.
        self._hmac_mark = secrets.token_hex(16)
        self._hmac_field = f',"hmac":"{self._hmac_mark}"'
        self._fd: int | None = None  # None with a file sink: the next flush opens the configured path
        self._out = bytearray()  # rendered lines the file has not taken yet
        self._stdout_lines: list[str] = []
        self._size = 0  # of the current file, counting lines still in _out
        self._file_started_ns = 0
        self._seq = 0
        self._prev = GENESIS
        self._lock_fd: int | None = None
        self._closed = False
        self._key = b""
        self._witnessed = -1  # the seq the witness file holds

    @property
    def unwritten(self) -> int:
        """Rendered records the file has not taken yet."""
        return self._out.count(b"\n")

    def open(self, lock_wait: float = 0.0) -> bool:
        """Load the key and open or continue the log; True when an intact existing chain is continued.

        The log's lock file (``.audit.log.lock`` next to ``audit.log``) is locked until ``close``: a
        writer left over from a proxy that died may still be finishing its last batch, and two writers
        must never extend one chain. ``lock_wait``: seconds to wait for such a writer to finish. The
        file stays: removing it would let a writer that already opened it and one that makes a new one
        both hold "the" lock."""
        key = self._key = load_key(self._settings.key_file)
        self._signer = _Signer(key)
        path = self._settings.file
        if path is None:
            self._start_file(None)
            return False
        if not path.parent.is_dir():
            raise AuditError(f"audit log directory {path.parent} does not exist")
        self._lock(path, lock_wait)
        return self._open(path, key)

    def write(self, records: Iterable[Record], *, reopen: bool = False) -> bool:
        """Render records in order and hand them to the OS; False when the file did not take them all
        (they are kept and retried by the next call)."""
        if (reopen or self._reopen_pending) and self._fd is not None:
            self._reopen_pending = not self._is_current() and not self._next_file(rename=False)
        may_rotate = True
        for t_ns, event, shared, fields in records:
            if may_rotate and self._rotation_due(t_ns):
                # One failed attempt per call is enough; the next call tries again.
                may_rotate = self._next_file(rename=True)
            try:
                self._emit(t_ns, event, fields, shared)
            except Exception as exc:
                # A record that cannot be rendered (a caller's mapping with keys that do not sort) is
                # replaced by one that says so, rather than stopping the log.
                problem: dict[str, object] = {"event_name": _text(event), "error": repr(exc)}
                self.notices.append(("audit_record_unrenderable", problem))
                self._emit(t_ns, "audit_record_unrenderable", problem)
            if len(self._out) >= _CHUNK_BYTES:
                self._flush()
        if not self._flush():
            return False
        self._checkpoint()
        return True

    def close(self, deadline: float) -> None:
        """Retry what is unwritten until ``deadline`` (time.monotonic()), then fsync and close the file
        and let go of the lock; once closed, nothing more is written."""
        if self._closed:
            return
        self._closed = True
        while self._out and not self._flush() and (remaining := deadline - time.monotonic()) > 0:
            time.sleep(min(self._settings.flush_interval, remaining))
        if not self._out:
            self._checkpoint()
        self._close_file()
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # the lock goes with it
            self._lock_fd = None

    def _lock(self, path: Path, wait: float) -> None:
        lock_path = path.with_name(f".{path.name}.lock")
        try:
            self._lock_fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise AuditError(f"cannot open audit lock file {lock_path}: {exc.strerror}") from exc
        deadline = time.monotonic() + wait
        while True:
            try:
                fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise AuditError(
                        f"audit log {path} is in use by another writer process (lock file {lock_path})"
                    ) from None
                time.sleep(0.05)

    def _open(self, path: Path, key: bytes) -> bool:
        try:
            fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
            size = os.fstat(fd).st_size
            tail = _last_line(fd, size) if size else b""
        except OSError as exc:
            raise AuditError(f"cannot open audit log {path}: {exc.strerror}") from exc
        checkpoint = self._last_checkpoint(key)
        if not size:
            self._fd = fd
            emptied = False
            if isinstance(checkpoint, Checkpoint):
                # The file was moved away (rotated by hand) or emptied: the chain goes on from where
                # the witness saw it end, so the files verify as one log, and an emptied one says so.
                self._seq, self._prev = checkpoint.seq, checkpoint.hash
                emptied = (checkpoint.device, checkpoint.inode) == _identity(fd)
            continued = self._seq
            self._start_file(None)
            self._check_against(checkpoint, 0 if emptied else continued, emptied)
            return False
        entry = _tail_entry(tail, key)
        if isinstance(entry, _Entry):
            self._fd, self._size, self._seq = fd, size, entry.seq
            self._prev = hashlib.sha256(tail).hexdigest()
            self._file_started_ns = _file_started_ns(fd)
            self._check_against(checkpoint, entry.seq, False)
            return True
        # The damaged file is kept for the reviewer, and the new chain says why it could not continue it.
        os.close(fd)
        damaged = _rotated_path(path)
        try:
            os.rename(path, damaged)
        except OSError as exc:
            raise AuditError(f"cannot move damaged audit log {path} aside: {exc.strerror}") from exc
        self.notices.append(("audit_chain_break", {"file": str(damaged), "reason": entry}))
        self._start_file(damaged.name)
        self._emit(time.time_ns(), "audit_chain_break", {"previous_file": damaged.name, "reason": entry})
        return False

    def _last_checkpoint(self, key: bytes) -> Checkpoint | str | None:
        """The witness's checkpoint, if one is configured and exists; why it cannot be trusted, if not."""
        witness = self._settings.witness_file
        if witness is None:
            return None
        try:
            return Checkpoint.read(witness, key)
        except AuditError as exc:
            return str(exc)

    def _check_against(self, checkpoint: Checkpoint | str | None, found_seq: int, emptied: bool) -> None:
        """After the log was opened: records it lost since the witness saw it are a gap in the chain,
        and a witness that cannot be trusted is said so, rather than the log silently going on."""
        if isinstance(checkpoint, str):
            problem: dict[str, object] = {"witness": str(self._settings.witness_file), "reason": checkpoint}
            self.notices.append(("audit_witness_invalid", problem))
            self._emit(time.time_ns(), "audit_witness_invalid", problem)
        elif checkpoint is not None and (emptied or checkpoint.seq > found_seq):
            reason = "the log file was emptied" if emptied else "the log ends before the witness's checkpoint"
            self._chain_gap(checkpoint, found_seq, reason)

    def _chain_gap(self, checkpoint: Checkpoint, found_seq: int, reason: str) -> None:
        """Records were cut off the log since the witness saw it: say so in the chain, not silently go on."""
        gap: dict[str, object] = {
            "expected_seq": checkpoint.seq,
            "found_seq": found_seq,
            "reason": reason,
            "witness_file": checkpoint.file,
            "witness_timestamp": checkpoint.timestamp,
        }
        self.notices.append((CHAIN_GAP, gap))
        self._emit(time.time_ns(), CHAIN_GAP, gap)

    def _checkpoint(self) -> None:
        """Replace the witness's checkpoint with the chain's end, once the file holds every line."""
        witness = self._settings.witness_file
        if witness is None or self._fd is None or self._out or self._seq == self._witnessed:
            return
        device, inode = _identity(self._fd)
        checkpoint = Checkpoint(
            str(self._settings.file), device, inode, self._seq, self._prev, iso_timestamp(time.time_ns())
        )
        staged = witness.with_name(f".{witness.name}.tmp")
        try:
            fd = os.open(staged, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
            try:
                os.write(fd, checkpoint.render(self._key))
            finally:
                os.close(fd)
            # A reader sees the old checkpoint or the new one, never half of one.
            os.replace(staged, witness)
        except OSError as exc:
            self._failed(exc)
            return
        self._witnessed = self._seq

    def _rotation_due(self, t_ns: int) -> bool:
        settings = self._settings
        return settings.file is not None and (
            self._size >= settings.rotate_bytes
            or t_ns - self._file_started_ns >= settings.rotate_interval * 1_000_000_000
        )

    def _is_current(self) -> bool:
        """Whether the configured path is still the file being written."""
        assert self._settings.file is not None and self._fd is not None
        try:
            there, ours = os.stat(self._settings.file), os.fstat(self._fd)
        except OSError:
            return False
        return (there.st_dev, there.st_ino) == (ours.st_dev, ours.st_ino)

    def _next_file(self, *, rename: bool) -> bool:
        """End the current file (renamed aside if asked and still in place); chain a new one at the path."""
        assert self._settings.file is not None
        path = self._settings.file
        previous = path.name
        # Lines already rendered carry the current file's chain position, so they must land in it.
        if not self._flush():
            return False
        if rename and self._is_current():
            target = _rotated_path(path)
            try:
                os.rename(path, target)
            except OSError as exc:
                self._failed(exc)
                return False
            previous = target.name
        self._close_file()
        self._start_file(previous)
        return True

    def _start_file(self, previous_file: str | None) -> None:
        self._size = 0
        self._file_started_ns = time.time_ns()
        self._emit(self._file_started_ns, FILE_START, {"previous_file": previous_file})

    def _emit(
        self,
        t_ns: int,
        event: object,
        fields: Mapping[str, object],
        shared: Mapping[str, object] = _NO_FIELDS,
    ) -> None:
        """Render one record into the chain and the sinks' buffers (nothing, when it raises)."""
        seq = self._seq + 1
        name = event if type(event) is str else _text(event)
        key = (id(shared), name, tuple(fields))
        layout = self._layouts.get(key)
        if layout is None or layout.shared is not shared:
            if len(self._layouts) >= _MAX_LAYOUTS:
                self._layouts.clear()
            layout = _Layout(
                shared, name, fields, component=self._component, host=self._host, hmac_mark=self._hmac_mark
            )
            self._layouts[key] = layout
        own = (f'"{iso_timestamp(t_ns)}"', str(seq), f'"{self._prev}"')
        parts = [layout.start]
        for slot, after in layout.slots:
            parts.append(own[slot] if isinstance(slot, int) else _json_value(fields[slot]))
            parts.append(after)
        # One text serves both forms: without the hmac field it is the HMAC's input, and the line is the
        # same text with the digest in place of the mark. The mark is random and known only to this
        # object, so it cannot come from a caller's values and occurs once, where the field goes.
        text = "".join(parts)
        cut = text.index(self._hmac_field)
        head, tail = text[:cut], text[cut + len(self._hmac_field) :]
        digest = self._signer.hexdigest(f"{head}{tail}".encode("ascii"))
        rendered = f'{head},"hmac":"{digest}"{tail}\n'
        line = rendered.encode("ascii")
        self._seq = seq
        self._prev = hashlib.sha256(line).hexdigest()
        self._size += len(line)
        if self._settings.file is not None:
            self._out += line
        if self._settings.stdout:
            self._stdout_lines.append(rendered)

    def _flush(self) -> bool:
        """Hand rendered lines to the OS; False when the file did not take them all (kept for retry)."""
        if self._stdout_lines:
            text = "".join(self._stdout_lines)
            count = len(self._stdout_lines)
            self._stdout_lines.clear()
            try:
                sys.stdout.write(text)
                sys.stdout.flush()
            except (OSError, ValueError) as exc:
                self._failed(exc)
            else:
                if self._settings.file is None:
                    self.written += count
        if not self._out:
            return True
        assert self._settings.file is not None
        try:
            if self._fd is None:
                self._fd = os.open(
                    self._settings.file, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600
                )
            while self._out:
                # A short write leaves the rest for the retry, so no byte is written twice.
                taken = os.write(self._fd, self._out)
                self.written += self._out.count(b"\n", 0, taken)
                del self._out[:taken]
        except OSError as exc:
            self.failure = (exc.errno, exc.strerror or str(exc))
            self._failed(exc)
            return False
        self.failure = None
        return True

    def _close_file(self) -> None:
        if self._fd is None:
            return
        try:
            os.fsync(self._fd)
        except OSError as exc:
            self._failed(exc)
        with suppress(OSError):
            os.close(self._fd)
        self._fd = None

    def _failed(self, exc: Exception) -> None:
        self.write_errors += 1
        # The 1st, 2nd, 4th, 8th... error: an outage is visible in the operational log without flooding it.
        if self.write_errors & (self.write_errors - 1) == 0:
            failure = {"error": str(exc), "write_errors": self.write_errors}
            self.notices.append(("audit_write_failed", failure))


def verify(paths: Sequence[Path], key: bytes, witness: Path | None = None) -> VerifyReport:
    """Check the files of one log, oldest first, and report the first problem found; with ``witness``,
    also that the log still reaches the checkpoint kept there (its newest records were not cut off).

    A loss the log records itself (a chain gap, records dropped while the file took none) does not end
    the check: the records after it are verified too, and the first such loss is reported (``lost``)
    when nothing worse is found."""
    if not paths:
        return VerifyReport(False, 0, "no files to verify")
    checkpoint = None
    if witness is not None:
        try:
            checkpoint = Checkpoint.read(witness, key)
        except AuditError as exc:
            return VerifyReport(False, 0, str(exc), witness)
        if checkpoint is None:
            return VerifyReport(False, 0, f"no audit witness at {witness}", witness)
    records = 0
    last_hash: str | None = None
    next_seq: int | None = None
    first_seq: int | None = None
    witnessed_hash: str | None = None
    first_loss: VerifyReport | None = None
    for path in paths:
        try:
            data = path.read_bytes()
        except OSError as exc:
            return VerifyReport(False, records, f"cannot read file: {exc.strerror}", path, None)
        lines = data.split(b"\n")
        tail = lines.pop()  # empty when the file ends with a newline
        entries = [_parse(line, key) for line in lines]
        for index, entry in enumerate(entries):
            problem = _problem(entries, index, last_hash, next_seq)
            if problem is not None:
                return VerifyReport(False, records, problem, path, index + 1)
            assert isinstance(entry, _Entry)
            if entry.lost is not None and first_loss is None:
                first_loss = VerifyReport(False, records, entry.lost, path, index + 1, lost=True)
            records += 1
            last_hash = hashlib.sha256(lines[index] + b"\n").hexdigest()
            next_seq = entry.seq + 1
            first_seq = entry.seq if first_seq is None else first_seq
            if checkpoint is not None and entry.seq == checkpoint.seq:
                witnessed_hash = last_hash
        if tail:
            problem = "truncated tail: the last line is not newline-terminated"
            return VerifyReport(False, records, problem, path, len(lines) + 1)
        if not lines:
            return VerifyReport(False, records, f"empty file: no {FILE_START} record", path, None)
    report = VerifyReport(True, records)
    if checkpoint is not None:
        assert next_seq is not None and first_seq is not None
        report = _against_checkpoint(
            checkpoint,
            witness,
            records=records,
            first_seq=first_seq,
            last_seq=next_seq - 1,
            witnessed_hash=witnessed_hash,
        )
    if report.ok and first_loss is not None:
        return dataclasses.replace(first_loss, records=records, witnessed=report.witnessed)
    return report


def _against_checkpoint(
    checkpoint: Checkpoint,
    witness: Path | None,
    *,
    records: int,
    first_seq: int,
    last_seq: int,
    witnessed_hash: str | None,
) -> VerifyReport:
    """Whether an intact chain from ``first_seq`` to ``last_seq`` still holds the witness's checkpoint."""
    seen = f"the witness {witness} saw seq {checkpoint.seq} in {checkpoint.file} at {checkpoint.timestamp}"
    if last_seq < checkpoint.seq:
        missing = checkpoint.seq - last_seq
        problem = f"cut tail: the log ends at seq {last_seq}, but {seen}: {missing} newest record(s) missing"
        return VerifyReport(False, records, problem)
    if checkpoint.seq < first_seq:
        problem = f"the files start at seq {first_seq}, after {seen}: give the files that hold it"
        return VerifyReport(False, records, problem)
    if witnessed_hash != checkpoint.hash:
        problem = f"seq {checkpoint.seq} is not the record {seen}: the log was replaced from there on"
        return VerifyReport(False, records, problem)
    return VerifyReport(True, records, witnessed=checkpoint.seq)


def _problem(
    entries: list[_Entry | str], index: int, last_hash: str | None, next_seq: int | None
) -> str | None:
    entry = entries[index]
    if isinstance(entry, str):
        return (
            f"truncated tail: the last line is {entry}" if index == len(entries) - 1 else f"line is {entry}"
        )
    if not entry.authentic:
        following = entries[index + 1] if index + 1 < len(entries) else None
        if isinstance(following, _Entry) and not following.authentic:
            return "HMAC mismatch here and on the next record: wrong key, or several records altered"
        if isinstance(following, _Entry) and following.prev == last_hash:
            return "inserted record: HMAC mismatch, and the next record chains to the one before it"
        return "altered record: HMAC mismatch"
    if index == 0 and entry.event != FILE_START:
        return f"file starts with {entry.event!r}, not {FILE_START}: its first record was removed"
    if next_seq is not None and entry.seq != next_seq:
        if entry.seq < next_seq:
            return f"reordered or replayed record: seq goes back from {next_seq - 1} to {entry.seq}"
        if any(isinstance(later, _Entry) and later.seq == next_seq for later in entries[index + 1 :]):
            return f"reordered records: seq {entry.seq} where {next_seq} was expected, which comes later"
        if index == 0:
            return f"removed records: seq jumps from {next_seq - 1} to {entry.seq} between files"
        return f"removed record: seq jumps from {next_seq - 1} to {entry.seq}"
    if last_hash is not None and entry.prev != last_hash:
        if index == 0:
            return "chain broken: the file's anchor is not the hash of the previous file's last record"
        return "chain broken: prev is not the hash of the previous line"
    return None


def _parse(line: bytes, key: bytes) -> _Entry | str:
    """A line as an entry, or what is wrong with its form."""
    try:
        record = json.loads(line)
        canonical = isinstance(record, dict) and _canonical(record).encode() == line
    except (ValueError, RecursionError):
        return "not JSON"
    if not canonical:
        return "not a record in canonical form"
    seq, prev, event, mac = (record.get(name) for name in ("seq", "prev", "event", "hmac"))
    if type(seq) is not int or not isinstance(prev, str) or not isinstance(event, str):
        return "a record without seq, prev or event"
    record.pop("hmac", None)
    authentic = isinstance(mac, str) and hmac.compare_digest(
        mac.encode(), _mac(key, _canonical(record)).encode()
    )
    lost = None
    if event == CHAIN_GAP:
        lost = (
            f"records lost: on restart the log ended at seq {record.get('found_seq')}, but its witness had "
            f"seen seq {record.get('expected_seq')} ({record.get('reason')})"
        )
    elif event == SINK_RECOVERED and record.get("dropped"):
        lost = (
            f"records lost: {record.get('dropped')} record(s) from {record.get('dropped_from')} to "
            f"{record.get('dropped_to')} were dropped while the log file took none ({record.get('error')})"
        )
    return _Entry(seq, prev, event, authentic, lost)


def _tail_entry(tail: bytes, key: bytes) -> _Entry | str:
    """The last line of an existing file as an entry to continue from, or why the chain cannot continue."""
    if not tail.endswith(b"\n"):
        return "the last line is not newline-terminated (an interrupted write)"
    entry = _parse(tail[:-1], key)
    if isinstance(entry, str):
        return f"the last line is {entry}"
    if not entry.authentic:
        return "the last record fails the HMAC check (altered, or the key changed)"
    return entry


def _last_line(fd: int, size: int) -> bytes:
    """The file's last line, newline included when it has one."""
    chunks: list[bytes] = []
    end = size
    while end > 0:
        start = max(0, end - _READ_BYTES)
        chunk = os.pread(fd, end - start, start)
        # The file's final byte may be the last line's own newline, which does not end an earlier line.
        cut = chunk.rfind(b"\n", 0, len(chunk) - 1 if end == size else len(chunk))
        if cut >= 0:
            chunks.append(chunk[cut + 1 :])
            break
        chunks.append(chunk)
        end = start
    return b"".join(reversed(chunks))


def _file_started_ns(fd: int) -> int:
    """When a continued file was started (its first record), so rotate_interval survives restarts."""
    first = os.pread(fd, _READ_BYTES, 0).split(b"\n", 1)[0]
    try:
        started = datetime.strptime(json.loads(first)["timestamp"], "%Y-%m-%dT%H:%M:%S.%fZ")
    except (ValueError, KeyError, TypeError):
        return time.time_ns()
    return (started.replace(tzinfo=UTC) - _EPOCH) // timedelta(microseconds=1) * 1000


def _identity(fd: int) -> tuple[int, int]:
    """(device, inode) of an open file: which file it is, whatever its name now."""
    status = os.fstat(fd)
    return status.st_dev, status.st_ino


def _rotated_path(path: Path) -> Path:
    stamp = datetime.now(UTC)
    # os.rename replaces an existing target, so never pick a name that is taken.
    while (target := path.with_name(f"{path.name}.{stamp:%Y%m%dT%H%M%S%f}")).exists():
        stamp += timedelta(microseconds=1)
    return target


def iso_timestamp(t_ns: int) -> str:
    """time.time_ns() as the log writes times: UTC, microseconds, ``2026-11-25T04:14:47.123456Z``."""
    seconds, nanos = divmod(t_ns, 1_000_000_000)
    return f"{_second(seconds)}.{nanos // 1000:06d}Z"


@lru_cache(maxsize=4)
def _second(seconds: int) -> str:
    # Formatting the date is most of a timestamp's cost, and a batch's records share few seconds.
    return f"{datetime.fromtimestamp(seconds, UTC):%Y-%m-%dT%H:%M:%S}"


def _canonical(record: Mapping[str, object]) -> str:
    return _ENCODER.encode(record)


def _mac(key: bytes, body: str) -> str:
    return hmac.new(key, body.encode("ascii"), hashlib.sha256).hexdigest()


class _Signer:
    """HMAC-SHA256 (RFC 2104) under one key, its padded key blocks hashed once rather than per record:
    the digests of ``hmac.new(key, body, hashlib.sha256)`` (which ``verify`` uses) at half the cost."""

    __slots__ = ("_inner", "_outer")

    def __init__(self, key: bytes) -> None:
        block = hashlib.sha256().block_size
        if len(key) > block:
            key = hashlib.sha256(key).digest()
        key = key.ljust(block, b"\0")
        self._inner = hashlib.sha256(bytes(byte ^ 0x36 for byte in key))
        self._outer = hashlib.sha256(bytes(byte ^ 0x5C for byte in key))

    def hexdigest(self, body: bytes) -> str:
        inner = self._inner.copy()
        inner.update(body)
        outer = self._outer.copy()
        outer.update(inner.digest())
        return outer.hexdigest()


class _Layout:
    """The canonical JSON of one kind of record (the same shared mapping, event and field names): its keys
    in sorted order as fixed text -- shared fields, event, component, host, the hmac mark -- around slots
    filled per record: a field's name, or an index into (timestamp, seq, prev)."""

    __slots__ = ("shared", "slots", "start")

    def __init__(
        self,
        shared: Mapping[str, object],
        event: str,
        field_names: Iterable[str],
        *,
        component: str,
        host: str,
        hmac_mark: str,
    ) -> None:
        self.shared = shared  # also keeps its id, part of the cache key, from being reused
        # As in {**shared, **fields} and then renaming the log's own keys: the later of two names wins.
        merged: dict[str, str | None] = dict.fromkeys(shared)
        merged.update((name, name) for name in field_names)
        fixed: dict[str, str] = {}
        filled: dict[str, str | int] = {}
        for name, field_name in merged.items():
            key = f"{name}_" if name in _RESERVED else name
            if field_name is None:
                fixed[key] = _json_value(shared[name])
                filled.pop(key, None)
            else:
                filled[key] = field_name
                fixed.pop(key, None)
        own_fixed = {"event": event, "component": component, "host": host, "hmac": hmac_mark}
        fixed.update((key, _ENCODER.encode(value)) for key, value in own_fixed.items())
        filled.update(timestamp=0, seq=1, prev=2)
        segments = ["{"]
        slots: list[str | int] = []
        for index, key in enumerate(sorted(fixed.keys() | filled.keys())):
            segments[-1] += f"{',' if index else ''}{_ENCODER.encode(key)}:"
            if key in fixed:
                segments[-1] += fixed[key]
            else:
                slots.append(filled[key])
                segments.append("")
        segments[-1] += "}"
        self.start = segments[0]
        self.slots = list(zip(slots, segments[1:], strict=True))


def _json_value(value: object) -> str:
    """The canonical JSON of one field's value: JSON types as they are, anything else as text."""
    if isinstance(value, str):
        return _ESCAPE(value)
    if value is None:
        return "null"
    if value is True or value is False:
        return "true" if value else "false"
    if isinstance(value, int) and _INT_MIN <= value < _INT_END:
        return int.__repr__(value)
    if value.__class__ is list and all(item.__class__ is str for item in value):
        # A statement's fingerprints: the common case, in a fifth of the encoder's time.
        return f"[{','.join(map(_ESCAPE, value))}]"
    return _ENCODER.encode(json_ready(value))


def json_ready(value: object) -> object:
    """The value as data the JSON encoder cannot fail on: JSON types as they are, anything else as text."""
    # Odd containers (a mapping whose items() raises) fall back to their text rather than stop the writer.
    try:
        return _plain(value, 0)
    except Exception:
        return _text(value)


def _plain(value: object, depth: int) -> object:
    """The value as JSON-ready data that json.dumps cannot fail on."""
    if value is None or isinstance(value, str | bool):
        return value
    if isinstance(value, int):
        # Larger ints cannot always be printed (sys.set_int_max_str_digits) and rarely parse back exactly.
        return int(value) if _INT_MIN <= value < _INT_END else _text(value)
    if isinstance(value, float):
        return float(value) if math.isfinite(value) else _text(value)
    if depth < _MAX_DEPTH:
        if isinstance(value, Mapping):
            return {_text(k): _plain(v, depth + 1) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return [_plain(v, depth + 1) for v in value]
    return _text(value)


def _text(value: object) -> str:
    try:
        return str(value)
    except Exception:
        return f"<unprintable {type(value).__name__}>"
