"""The audit log as the data path uses it: records are queued in memory, shipped in batches to a writer
process, and rendered, chained and written there (``proxy.audit.ChainWriter``).

Why a process: rendering (JSON text, HMAC, chain hash) costs several microseconds a record; on a thread
it holds the GIL the event loop needs, so at thousands of statements a second it slowed the data path
by far more than its own CPU time. Here the proxy's side of a record is a tuple appended on the event
loop and, every ``flush_interval``, a pickle of the batch on the shipping thread (about 0.5 us a
record, in C, in chunks so the event loop never waits long for the GIL).

Durability: ``record`` only appends to an in-memory queue. The queue is unbounded -- nothing is dropped --
and ``pending`` and ``backlog_warnings`` show a writer falling behind. Every ``flush_interval`` the
shipping thread sends what is queued to the writer process and waits for its answer; the proxy lets go
of a batch only once the writer reports every line it has rendered handed to the OS with ``os.write``.
So a crash of the proxy loses what was still queued or on its way (normally the last one or two
``flush_interval``); the writer, seeing its parent gone, writes what it was sent, then an
``audit_proxy_lost`` record that says so, checkpoints the witness and exits. A crash of
the machine can also lose what the OS had not yet written to disk, because files are fsynced only at
rotation and at ``close``. A failed write is counted in ``write_errors`` and retried by the writer on
the next batch. If the writer process dies, the proxy starts a new one (with backoff while that fails;
it continues the chain, or starts a new one with ``audit_chain_break`` if the file's last line was cut)
and sends the batches not yet known written again: records the old writer had written before it died
then appear twice, each with its own ``seq``; nothing is lost.

A full or unwritable disk: while the log file takes no records (or no writer can open it) the log is
``failing``; the data path reads that to refuse statements or run on (``OnWriteFailure``, the caller's
choice), and ``audit_sink_failing`` and ``audit_sink_recovered`` say each change in the operational
log, once. What the file did not take is held and written, in order, once it takes records again; at
most ``max_held_records`` are held, later ones are dropped and counted (``dropped``). The chain shows
the outage: ``audit_sink_failed`` where it began, ``audit_sink_recovered`` (with the dropped records'
count and time span, which ``verify`` reports as lost) where it ended. A lock file keeps two writers (one left
from a proxy that died, one of its successor) off one chain. Nothing is raised into the data path.
``close`` writes everything recorded before it, retrying until its timeout, and raises AuditError if it
could not. The stdout copy is best effort: a failed stdout write is counted, not retried.

Run as ``python -m proxy.auditwriter FD`` by ``AuditLog`` only: FD is its end of a socket pair.
"""

from __future__ import annotations

import contextlib
import io
import os
import pickle
import signal
import site
import socket
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

from proxy.audit import (
    DISK_FULL_ERRNOS,
    SINK_RECOVERED,
    AuditError,
    AuditSettings,
    ChainWriter,
    OnWriteFailure,
    Record,
    iso_timestamp,
    json_ready,
)

__all__ = ["BACKLOG_WARNING", "PROXY_LOST", "AuditLog", "SinkFailure"]

log = structlog.get_logger("pos_proxy.audit")

BACKLOG_WARNING = 1_000_000
# Records per pickle call: the shipping thread holds the GIL for one call (well under a millisecond).
_CHUNK_RECORDS = 1024
# A new writer process must have opened the log by then; it waits up to _LOCK_WAIT of it for the lock.
_START_TIMEOUT = 20.0
_LOCK_WAIT = 10.0
# Restarts of a writer that cannot be started back off up to this many seconds apart; while closing,
# a start is tried only with at least _MIN_START_TIME left (a Python process takes a while to start).
_RESTART_MAX_DELAY = 30.0
_MIN_START_TIME = 1.0
# close() waits this much beyond its timeout for the writer's last fsync and exit.
_CLOSE_GRACE = 1.0
# The directory holding the proxy package, for a writer process started from a source checkout.
_PACKAGE_ROOT = str(Path(__file__).resolve().parent.parent)
_HEADER_BYTES, _PAYLOAD_BYTES = 4, 8
_NO_FIELDS: Mapping[str, object] = {}
# The writer's last record when its channel ends without the proxy closing the log.
PROXY_LOST = "audit_proxy_lost"
PROXY_LOST_REASON = (
    "the proxy ended (or gave up on this writer) without closing the log: "
    "records it had not yet sent to the writer are not in the log"
)
# What _RecordPickler reduces other objects to: these must themselves pickle by reference.
_REDUCTION_TYPES = (str, int, float, bool, dict, list)
# What a broken channel to the writer process raises on this side.
_CHANNEL_ERRORS = (OSError, EOFError, ValueError, pickle.UnpicklingError)


@dataclass(frozen=True, slots=True)
class SinkFailure:
    """Why the audit log takes no records now."""

    error: str
    disk_full: bool  # out of space (ENOSPC, EDQUOT), rather than unwritable
    since_ns: int  # time.time_ns() when the log stopped taking records


class AuditLog:
    """One chained audit log: ``record`` from any thread; one thread ships, one writer process writes."""

    def __init__(
        self, settings: AuditSettings, *, component: str = "pos-db-proxy", host: str | None = None
    ) -> None:
        self._settings = settings
        self._component = component
        self._host = socket.gethostname() if host is None else host
        # deque.append and popleft are atomic, so record() takes no lock and never waits for the shipper.
        self._queue: deque[Record] = deque()
        # Batches taken from the queue (record count, pickled chunks): not yet sent to the current writer,
        # and sent but not yet known written (resent to the next writer if this one dies).
        self._unsent: list[tuple[int, bytes]] = []
        self._unconfirmed: list[tuple[int, bytes]] = []
        self._thread: threading.Thread | None = None
        self._writer: _WriterProcess | None = None
        self._stop = threading.Event()
        self._deadline = 0.0
        # reopen() may be called from a signal handler: it only counts, the shipping thread compares.
        self._reopens_requested = 0
        self._reopens_sent = 0
        # (written, write_errors) of the log, replaced whole so a reader never sees half an update.
        self._counts = (0, 0)
        self._ended_counts = (0, 0)  # of writer processes that have ended
        self._next_restart_at = 0.0
        self._failed_restarts = 0
        self._unwritten = 0  # known after close()
        self._backlog_warnings = 0
        self._backlogged = False
        # Said in the log lines and records of an outage; the caller keeps it current (a reload).
        self._on_write_failure = OnWriteFailure.REFUSE
        self._failing: SinkFailure | None = None
        # Whether the log fails and on_write_failure is refuse: one attribute the data path tests on
        # every read. The shipping thread and a reload both change it; the lock keeps the two from
        # writing a value made of the other's stale half.
        self.refusing = False
        self._refusing_lock = threading.Lock()
        self._dropped = 0
        # The records dropped in the current outage: how many, and the times of the first and last.
        self._outage_drops = (0, 0, 0)

    @property
    def written(self) -> int:
        """Records handed to the OS by the file sink (by stdout when there is no file)."""
        return self._counts[0]

    @property
    def write_errors(self) -> int:
        """Failed writes, and writer processes that died or could not be started."""
        return self._counts[1]

    @property
    def pending(self) -> int:
        """Records recorded but not yet known written."""
        batches = [*self._unsent, *self._unconfirmed]
        return len(self._queue) + sum(count for count, _payload in batches)

    @property
    def on_write_failure(self) -> OnWriteFailure:
        return self._on_write_failure

    @on_write_failure.setter
    def on_write_failure(self, mode: OnWriteFailure) -> None:
        with self._refusing_lock:
            self._on_write_failure = mode
            self._note_refusing()

    def _note_refusing(self) -> None:
        self.refusing = self._failing is not None and self._on_write_failure is OnWriteFailure.REFUSE

    @property
    def failing(self) -> SinkFailure | None:
        """Why the log file takes no records now (None while it does): the last write failed, or no
        writer process could open the log."""
        return self._failing

    @property
    def dropped(self) -> int:
        """Records dropped because more than ``max_held_records`` waited for a failing log file."""
        return self._dropped

    @property
    def backlog_warnings(self) -> int:
        """How often the queue grew past BACKLOG_WARNING records."""
        return self._backlog_warnings

    def start(self) -> None:
        """Start the writer process, which opens or continues the log and writes its opening records,
        and the shipping thread; AuditError says why the log cannot be used."""
        if self._thread is not None:
            raise AuditError("audit log already started")
        self._writer = self._start_writer("audit_started", _START_TIMEOUT)
        self._thread = threading.Thread(target=self._run, name="pos-proxy-audit-shipper", daemon=False)
        self._thread.start()

    def record(self, event: str, /, **fields: object) -> None:
        """Queue one audit event; O(1), never blocks, never raises.

        The writer renders the fields later (JSON types as they are, anything else with str()), so pass
        values that are not changed afterwards. Fields named like the log's own keys get a trailing ``_``.
        """
        self._queue.append((time.time_ns(), event, _NO_FIELDS, fields))

    def record_with(self, shared: Mapping[str, object], event: str, /, **fields: object) -> None:
        """``record`` for a caller whose records repeat the same fields (a session's identity): ``shared``
        is passed by reference, merged by the writer (``fields`` win), and must not be changed afterwards."""
        self._queue.append((time.time_ns(), event, shared, fields))

    def reopen(self) -> None:
        """After logrotate moved the file (SIGHUP): the next batch starts a new one at the configured path."""
        self._reopens_requested += 1

    def close(self, timeout: float = 5.0) -> None:
        """Write everything recorded so far, fsync, and stop the writer process and the shipping thread."""
        thread = self._thread
        if thread is None or self._stop.is_set():
            return
        self.record("audit_stopped")
        self._deadline = time.monotonic() + timeout
        self._stop.set()
        thread.join(timeout + _CLOSE_GRACE)
        if thread.is_alive():
            # A writer stuck (a hung disk, a stopped process) would keep the shipping thread, and with it
            # the process, from ever ending: stop it, which ends the thread's wait for its answer.
            writer = self._writer
            if writer is not None:
                writer.kill()
            thread.join(_CLOSE_GRACE)
            raise AuditError(f"audit writer did not finish within {timeout} s")
        if self._unwritten:
            raise AuditError(
                f"{self._unwritten} audit records could not be written ({self.write_errors} write errors)"
            )

    # --- shipping thread -------------------------------------------------------------------------

    def _run(self) -> None:
        while not self._stop.wait(self._settings.flush_interval):
            try:
                self._take_batch()
                # close() may come while this round runs: from then on its deadline bounds every wait.
                self._send_batches(self._deadline if self._stop.is_set() else None)
            except Exception:
                # A bug here must not stop the log: what is queued stays queued for the next round.
                log.exception("audit_shipping_failed", pending=self.pending)
        try:
            self._finish()
        except Exception:
            log.exception("audit_shipping_failed", pending=self.pending)
            self._unwritten = self.pending

    def _take_batch(self) -> None:
        # Only what is queued now: a busy data path must not keep one batch from ever being sent.
        backlog = len(self._queue)
        if backlog > BACKLOG_WARNING and not self._backlogged:
            self._backlog_warnings += 1
            log.warning("audit_backlog", pending=backlog)
        self._backlogged = backlog > BACKLOG_WARNING
        if backlog:
            records = [self._queue.popleft() for _ in range(backlog)]
            if self._failing is not None:
                records = self._held(records)
                if not records:
                    return
            try:
                payload = _pickled(records)
            except BaseException:
                self._queue.extendleft(reversed(records))  # back in front, in order, for the next round
                raise
            self._unsent.append((backlog, payload))

    def _send_batches(self, deadline: float | None) -> bool:
        """Send the unsent batches (or an empty one, which lets the writer retry a failed write and
        report its counts); False when the writer died or cannot be (re)started before ``deadline``."""
        writer = self._writer or self._restart_writer(deadline)
        if writer is None:
            return False
        reopens = self._reopens_requested
        try:
            for count, payload in list(self._unsent) or [(0, b"")]:
                timeout = None if deadline is None else max(0.0, deadline - time.monotonic()) + _CLOSE_GRACE
                reply = writer.exchange(("batch", reopens != self._reopens_sent), payload, timeout)
                self._reopens_sent = reopens
                if count:
                    self._unconfirmed.append(self._unsent.pop(0))
                    self._failed_restarts = 0  # a writer that takes a batch is a writer that works
                unwritten, failure = self._acknowledged(reply)
                if not unwritten:
                    self._unconfirmed.clear()  # the writer has handed every line it rendered to the OS
                    self._sink_recovered()
                else:
                    self._sink_failed(*(failure or (None, "the log file did not take every record")))
        except _CHANNEL_ERRORS as exc:
            self._writer_died(writer, exc)
            return False
        return True

    def _held(self, records: list[Record]) -> list[Record]:
        """Of records taken while the log file fails, those it may hold (max_held_records in all);
        the rest are dropped, counted, and said in the chain when the outage ends."""
        held = sum(count for count, _payload in (*self._unsent, *self._unconfirmed))
        room = max(0, self._settings.max_held_records - held)
        if len(records) <= room:
            return records
        dropped = records[room:]
        count, first_ns, _last_ns = self._outage_drops
        if not count:
            log.error(
                "audit_records_dropping",
                held=held + room,
                max_held_records=self._settings.max_held_records,
                on_write_failure=self.on_write_failure.value,
            )
            first_ns = dropped[0][0]
        self._outage_drops = (count + len(dropped), first_ns, dropped[-1][0])
        self._dropped += len(dropped)
        return records[:room]

    def _sink_failed(self, errno: int | None, error: str) -> None:
        failing = self._failing
        since = time.time_ns() if failing is None else failing.since_ns
        with self._refusing_lock:
            self._failing = SinkFailure(error, errno in DISK_FULL_ERRNOS, since)
            self._note_refusing()
        if failing is not None:
            return
        mode = self.on_write_failure.value
        log.error("audit_sink_failing", error=error, on_write_failure=mode, pending=self.pending)
        # Held with the records of the outage: the chain shows where it began.
        self.record("audit_sink_failed", outcome="failure", error=error, on_write_failure=mode)

    def _sink_recovered(self) -> None:
        failing = self._failing
        if failing is None:
            return
        with self._refusing_lock:
            self._failing = None
            self._note_refusing()
        dropped, first_ns, last_ns = self._outage_drops
        self._outage_drops = (0, 0, 0)
        mode = self.on_write_failure.value
        outage_s = round((time.time_ns() - failing.since_ns) / 1e9, 3)
        log.warning(
            "audit_sink_recovered",
            outage_s=outage_s,
            dropped=dropped,
            on_write_failure=mode,
            error=failing.error,
        )
        span = (
            {"dropped_from": iso_timestamp(first_ns), "dropped_to": iso_timestamp(last_ns)} if dropped else {}
        )
        self.record(
            SINK_RECOVERED,
            outcome="failure" if dropped else "success",
            error=failing.error,
            failed_at=iso_timestamp(failing.since_ns),
            outage_s=outage_s,
            dropped=dropped,
            on_write_failure=mode,
            **span,
        )

    def _finish(self) -> None:
        while True:
            self._take_batch()
            sent = self._send_batches(self._deadline)
            # A log that took its records again just now has queued the record saying so: send it too.
            if sent and not self._queue:
                break
            remaining = self._deadline - time.monotonic()
            if remaining <= 0:
                break
            if not sent:
                time.sleep(min(self._settings.flush_interval, remaining))
        writer = self._writer
        self._unwritten = self.pending
        if writer is None:
            return
        try:
            remaining = max(0.0, self._deadline - time.monotonic())
            reply = writer.exchange(("close", remaining), b"", remaining + _CLOSE_GRACE)
        except _CHANNEL_ERRORS as exc:
            self._writer_died(writer, exc)
            return
        writer.stop()
        self._writer = None
        # The writer knows what it could not write of all it was sent (its own records included);
        # anything recorded since the last batch was not sent at all.
        self._unwritten = len(self._queue) + self._acknowledged(reply)[0]
        if not self._unwritten:
            self._unconfirmed.clear()

    def _acknowledged(self, reply: tuple[Any, ...]) -> tuple[int, tuple[int | None, str] | None]:
        """Take a writer's counts and notices from its reply; the records it has not written yet, and
        why the file last failed to take them (errno, message)."""
        _kind, written, errors, unwritten, notices, failure = reply
        ended_written, ended_errors = self._ended_counts
        self._counts = (ended_written + written, ended_errors + errors)
        _log_notices(notices)
        return int(unwritten), failure

    def _restart_writer(self, deadline: float | None) -> _WriterProcess | None:
        """A new writer, unless the last ones failed too recently; while closing (``deadline``), one
        attempt whatever the backoff, if there is time left for a process to start."""
        now = time.monotonic()
        if deadline is None and now < self._next_restart_at:
            return None
        if deadline is not None and deadline - now < _MIN_START_TIME:
            return None
        timeout = _START_TIMEOUT if deadline is None else min(_START_TIMEOUT, deadline - now)
        try:
            self._writer = self._start_writer("audit_writer_restarted", timeout)
        except AuditError as exc:
            self._back_off(str(exc))
            return None
        # The backoff goes on until a batch is acknowledged: a writer that dies on what it is sent
        # is restarted no faster than one that cannot start.
        self._back_off(None)
        # What the old writer may not have written goes to the new one first, in order.
        self._unsent[:0] = self._unconfirmed
        self._unconfirmed.clear()
        return self._writer

    def _back_off(self, error: str | None) -> None:
        """Put off the next restart (longer each time); ``error``: this start failed, counted and logged."""
        self._failed_restarts += 1
        delay = min(_RESTART_MAX_DELAY, self._settings.flush_interval * 2 ** min(self._failed_restarts, 16))
        self._next_restart_at = time.monotonic() + delay
        if error is not None:
            self._add_errors(1)
            log.error("audit_writer_start_failed", error=error, pending=self.pending, retry_in_s=delay)
            self._sink_failed(None, error)

    def _writer_died(self, writer: _WriterProcess, exc: BaseException) -> None:
        returncode = writer.stop()
        self._writer = None
        self._add_errors(1)
        self._ended_counts = self._counts
        log.error("audit_writer_died", error=repr(exc), returncode=returncode, pending=self.pending)

    def _add_errors(self, count: int) -> None:
        written, errors = self._counts
        self._counts = (written, errors + count)
        ended_written, ended_errors = self._ended_counts
        self._ended_counts = (ended_written, ended_errors + count)

    def _start_writer(self, event: str, timeout: float) -> _WriterProcess:
        writer = _WriterProcess.spawn()
        # Known to close() while it starts, so a start that hangs can be cut short.
        self._writer = writer
        # A new writer opens the configured path, which is what any reopen asked for.
        self._reopens_sent = self._reopens_requested
        start = ("start", self._settings, self._component, self._host, event, os.getpid(), _LOCK_WAIT)
        try:
            kind, detail, notices = writer.exchange(start, b"", timeout)
        except _CHANNEL_ERRORS as exc:
            writer.kill()
            self._writer = None
            raise AuditError(f"audit writer process did not start: {exc!r}") from exc
        _log_notices(notices)
        if kind != "started":
            writer.stop()
            self._writer = None
            raise AuditError(str(detail))
        return writer


class _WriterProcess:
    """A running writer process and this side of its socket pair."""

    def __init__(self, process: subprocess.Popen[bytes], channel: socket.socket) -> None:
        self._process = process
        self._channel = channel

    @classmethod
    def spawn(cls) -> _WriterProcess:
        try:
            ours, theirs = socket.socketpair()
        except OSError as exc:
            raise AuditError(f"cannot start the audit writer process: {exc.strerror}") from exc
        env = dict(os.environ)
        if _PACKAGE_ROOT not in site.getsitepackages():
            env["PYTHONPATH"] = os.pathsep.join(filter(None, [_PACKAGE_ROOT, env.get("PYTHONPATH")]))
        try:
            # -P: nothing from the working directory shadows the package.
            process = subprocess.Popen(
                [sys.executable, "-P", "-m", "proxy.auditwriter", str(theirs.fileno())],
                pass_fds=[theirs.fileno()],
                stdin=subprocess.DEVNULL,
                env=env,
            )
        except OSError as exc:
            ours.close()
            raise AuditError(f"cannot start the audit writer process: {exc.strerror}") from exc
        finally:
            theirs.close()
        return cls(process, ours)

    def exchange(self, message: tuple[Any, ...], payload: bytes, timeout: float | None) -> tuple[Any, ...]:
        """Send a message and wait up to ``timeout`` seconds (None: as long as it takes) for the reply."""
        self._channel.settimeout(timeout)
        _send(self._channel, message, payload)
        reply, _payload = _receive(self._channel)
        return reply

    def kill(self) -> None:
        """Stop the process now; the channel is shut too, so a wait for its answer ends even while the
        process cannot die yet (stuck in the kernel on a hung disk)."""
        self._process.kill()
        with contextlib.suppress(OSError):
            self._channel.shutdown(socket.SHUT_RDWR)
        self.stop()

    def stop(self) -> int | None:
        """Close the channel (a live writer then finishes and exits) and reap the process; None when it
        has not exited even after a kill."""
        self._channel.close()
        try:
            return self._process.wait(_CLOSE_GRACE)
        except subprocess.TimeoutExpired:
            self._process.kill()
        try:
            return self._process.wait(_CLOSE_GRACE)
        except subprocess.TimeoutExpired:
            return None


class _RecordPickler(pickle.Pickler):
    """Pickles records with builtin types only, so the writer process never has to import a caller's
    class: any other object becomes what the writer would render of it (its text, mostly)."""

    def reducer_override(self, obj: Any) -> Any:
        # Not called for exact str, int, float, bytes, list, tuple, dict, set and the like.
        if type(obj) is type and obj in _REDUCTION_TYPES:
            return NotImplemented  # the callables of the reductions below
        plain = json_ready(obj)
        if isinstance(plain, str):
            return str, (str.__str__(plain),)  # a str subclass: its exact text
        return type(plain), (plain,)


def _pickled(records: list[Record]) -> bytes:
    try:
        return _dumped(records)
    except Exception:
        # Values pickle cannot take (nested past the recursion limit...): such a record goes as the text
        # the writer would have rendered of each of its fields.
        return _dumped([_encodable(record) for record in records])


def _dumped(records: list[Record]) -> bytes:
    buffer = io.BytesIO()
    # One pickler for the batch: a session's shared fields are pickled once, and the writer gets them
    # back as one object, which keeps its layout cache effective.
    pickler = _RecordPickler(buffer, protocol=pickle.HIGHEST_PROTOCOL)
    for start in range(0, len(records), _CHUNK_RECORDS):
        pickler.dump(records[start : start + _CHUNK_RECORDS])
    return buffer.getvalue()


def _encodable(record: Record) -> Record:
    try:
        _dumped([record])
        return record
    except Exception:
        pass
    t_ns, event, shared, fields = record
    try:
        plain: Record = (
            t_ns,
            json_ready(event),
            {str(json_ready(name)): json_ready(value) for name, value in dict(shared).items()},
            {name: json_ready(value) for name, value in fields.items()},
        )
        _dumped([plain])
    except Exception as exc:
        return t_ns, "audit_record_unencodable", _NO_FIELDS, {"event_name": repr(event), "error": repr(exc)}
    return plain


def _unpickled(payload: bytes) -> Iterator[Record]:
    stream = io.BytesIO(payload)
    unpickler = pickle.Unpickler(stream)
    while stream.tell() < len(payload):
        yield from unpickler.load()


def _log_notices(notices: list[tuple[str, dict[str, object]]]) -> None:
    for event, fields in notices:
        log.error(event, **fields)


def _send(channel: socket.socket, message: tuple[Any, ...], payload: bytes = b"") -> None:
    """A frame: header and payload lengths, the pickled message, then the payload as it is."""
    header = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    channel.sendall(len(header).to_bytes(_HEADER_BYTES, "big") + len(payload).to_bytes(_PAYLOAD_BYTES, "big"))
    channel.sendall(header)
    if payload:
        channel.sendall(payload)


def _receive(channel: socket.socket) -> tuple[tuple[Any, ...], bytes]:
    lengths = _receive_exactly(channel, _HEADER_BYTES + _PAYLOAD_BYTES)
    header = _receive_exactly(channel, int.from_bytes(lengths[:_HEADER_BYTES], "big"))
    payload = _receive_exactly(channel, int.from_bytes(lengths[_HEADER_BYTES:], "big"))
    message = pickle.loads(header)
    if not isinstance(message, tuple) or not message:
        raise pickle.UnpicklingError(f"not a message: {type(message).__name__}")
    return message, payload


def _receive_exactly(channel: socket.socket, size: int) -> bytes:
    data = bytearray(size)
    view = memoryview(data)
    got = 0
    while got < size:
        received = channel.recv_into(view[got:])
        if not received:
            raise EOFError("the other side closed the audit channel")
        got += received
    return bytes(data)


# --- the writer process -------------------------------------------------------------------------


def main(argv: list[str]) -> int:
    # The proxy decides when the log ends: a Ctrl-C or a service manager's SIGTERM to the whole group
    # must not stop the writer before the proxy has sent its last records.
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, signal.SIG_IGN)
    with socket.socket(fileno=int(argv[1])) as channel:
        return _serve(channel)


def _serve(channel: socket.socket) -> int:
    (_kind, settings, component, host, event, proxy_pid, lock_wait), _payload = _receive(channel)
    writer: ChainWriter | None = None
    try:
        writer = ChainWriter(settings, component=component, host=host)
        resumed = writer.open(lock_wait)
        opening: Record = (time.time_ns(), event, _NO_FIELDS, {"pid": proxy_pid, "resumed": resumed})
        if not writer.write([opening]):
            raise AuditError(f"cannot write audit log {settings.file}")
    except AuditError as exc:
        if writer is not None:
            writer.close(deadline=0.0)
        _send(channel, ("failed", str(exc), _take_notices(writer)))
        return 1
    try:
        _send(channel, ("started", resumed, _take_notices(writer)))
        if not _write_until_closed(channel, writer):
            # The chain itself says where the proxy went away, so a reviewer reading a log that goes
            # on with a later audit_started knows which records may never have reached it.
            gone = {"pid": proxy_pid, "reason": PROXY_LOST_REASON}
            writer.write([(time.time_ns(), PROXY_LOST, _NO_FIELDS, gone)])
        return 0
    except OSError:
        return 0  # the proxy gave up waiting for this start
    finally:
        # The proxy is gone (or closed the log): what it sent is written, and nothing more will come.
        writer.close(deadline=time.monotonic() + settings.flush_interval)


def _write_until_closed(channel: socket.socket, writer: ChainWriter) -> bool:
    """Write what the proxy sends until it closes the log (True) or the channel ends without that
    (False: the proxy died, or gave up on this writer)."""
    while True:
        try:
            message, payload = _receive(channel)
        except _CHANNEL_ERRORS:
            return False
        closing: bool = message[0] != "batch"
        if not closing:
            _kind, reopen = message
            try:
                records = list(_unpickled(payload))
            except Exception as exc:
                # The proxy pickles builtin types only; should a batch still not decode, the log says so.
                problem = {"error": repr(exc)}
                records = [(time.time_ns(), "audit_records_undecodable", _NO_FIELDS, problem)]
            writer.write(records, reopen=reopen)
        else:
            _kind, seconds = message
            writer.close(deadline=time.monotonic() + seconds)
        notices = _take_notices(writer)
        reply = ("ack", writer.written, writer.write_errors, writer.unwritten, notices, writer.failure)
        try:
            _send(channel, reply)
        except OSError:
            return closing
        if closing:
            return True


def _take_notices(writer: ChainWriter | None) -> list[tuple[str, dict[str, object]]]:
    if writer is None:
        return []
    notices, writer.notices = writer.notices, []
    return notices


if __name__ == "__main__":
    sys.exit(main(sys.argv))
