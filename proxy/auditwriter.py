"""The audit log as the data path uses it: records are queued in memory, shipped in batches to a writer
process, and rendered, chained and written there (``proxy.audit.ChainWriter``).

Why a process: rendering (JSON text, HMAC, chain hash) costs several microseconds a record; on a thread
it holds the GIL the event loop needs, so at thousands of statements a second it slowed the data path
by far more than its own CPU time. Here the proxy's side of a record is a tuple appended on the event
loop and, every ``flush_interval``, a pickle of the batch on the shipping thread (about 0.5 us a
record, in C, in chunks so the event loop never waits long for the GIL).

Durability: ``record`` only appends to an in-memory queue. The queue is unbounded -- nothing is dropped --
and ``pending`` and ``backlog_warnings`` show a writer falling behind. Every ``flush_interval`` the
shipping thread sends what is queued to the writer process and waits for its acknowledgement, which
comes once the lines are handed to the OS with ``os.write``. So a crash of the proxy loses only what was
still queued (normally the last ``flush_interval``); the writer, seeing its parent gone, writes what it
was sent and exits. A crash of the machine can also lose what the OS had not yet written to disk, because
files are fsynced only at rotation and at ``close``. A failed write is counted in ``write_errors`` and
retried by the writer on the next batch. If the writer process dies, the proxy starts a new one (which
continues the chain, or starts a new one with ``audit_chain_break`` if the file's last line was cut)
and sends the unacknowledged batch again: a batch that was partly written before the crash then appears
twice, each record with its own ``seq``; nothing is lost. Nothing is raised into the data path. ``close``
writes everything recorded before it, retrying until its timeout, and raises AuditError if it could
not. The stdout copy is best effort: a failed stdout write is counted, not retried.

Run as ``python -m proxy.auditwriter FD`` by ``AuditLog`` only: FD is its end of a socket pair.
"""

from __future__ import annotations

import io
import os
import pickle
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import structlog

from proxy.audit import AuditError, AuditSettings, ChainWriter, Record, json_ready

__all__ = ["BACKLOG_WARNING", "AuditLog"]

log = structlog.get_logger("pos_proxy.audit")

BACKLOG_WARNING = 1_000_000
# Records per pickle call: the shipping thread holds the GIL for one call (well under a millisecond).
_CHUNK_RECORDS = 1024
# A new writer process must have opened the log by then.
_START_TIMEOUT = 20.0
# close() waits this much beyond its timeout for the writer's last fsync and exit.
_CLOSE_GRACE = 1.0
# The directory holding the proxy package, for the writer process to import it from.
_PACKAGE_ROOT = str(Path(__file__).resolve().parent.parent)
_LENGTH_BYTES = 4
_NO_FIELDS: Mapping[str, object] = {}


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
        # Batches taken from the queue and not yet acknowledged by a writer: (records, pickled chunks).
        self._unsent: list[tuple[int, bytes]] = []
        self._thread: threading.Thread | None = None
        self._writer: _WriterProcess | None = None
        self._stop = threading.Event()
        self._deadline = 0.0
        # A plain flag rather than an Event: setting it takes no lock, so a signal handler may call reopen().
        self._reopen_requested = False
        # Counts of writer processes that have ended, and of the current one.
        self._ended_written = self._ended_errors = 0
        self._writer_written = self._writer_errors = 0
        self._unwritten = 0  # known after close()
        self._backlog_warnings = 0
        self._backlogged = False

    @property
    def written(self) -> int:
        """Records handed to the OS by the file sink (by stdout when there is no file)."""
        return self._ended_written + self._writer_written

    @property
    def write_errors(self) -> int:
        """Failed writes, and writer processes that died or could not be started."""
        return self._ended_errors + self._writer_errors

    @property
    def pending(self) -> int:
        """Records recorded but not yet acknowledged by the writer."""
        return len(self._queue) + sum(count for count, _payload in self._unsent)

    @property
    def backlog_warnings(self) -> int:
        """How often the queue grew past BACKLOG_WARNING records."""
        return self._backlog_warnings

    def start(self) -> None:
        """Start the writer process, which opens or continues the log and writes its opening records,
        and the shipping thread; AuditError says why the log cannot be used."""
        if self._thread is not None:
            raise AuditError("audit log already started")
        self._writer = self._start_writer("audit_started")
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
        self._reopen_requested = True

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
            self._take_batch()
            self._send_batches()
        self._finish()

    def _take_batch(self) -> None:
        # Only what is queued now: a busy data path must not keep one batch from ever being sent.
        backlog = len(self._queue)
        if backlog > BACKLOG_WARNING and not self._backlogged:
            self._backlog_warnings += 1
            log.warning("audit_backlog", pending=backlog)
        self._backlogged = backlog > BACKLOG_WARNING
        if backlog:
            records = [self._queue.popleft() for _ in range(backlog)]
            self._unsent.append((backlog, _pickled(records)))

    def _send_batches(self) -> bool:
        """Send the unacknowledged batches (or an empty one, which lets the writer retry a failed write
        and report its counts); False when the writer died or cannot be started."""
        writer = self._writer or self._restart_writer()
        if writer is None:
            return False
        reopen, self._reopen_requested = self._reopen_requested, False
        try:
            for count, payload in list(self._unsent) or [(0, b"")]:
                writer.send(("batch", reopen, payload))
                self._acknowledged(writer.receive(None))
                if count:
                    self._unsent.pop(0)
                reopen = False
        except (OSError, EOFError, pickle.UnpicklingError) as exc:
            self._reopen_requested |= reopen
            self._writer_died(writer, exc)
            return False
        return True

    def _finish(self) -> None:
        self._take_batch()
        while not self._send_batches():
            remaining = self._deadline - time.monotonic()
            if remaining <= 0:
                break
            time.sleep(min(self._settings.flush_interval, remaining))
        writer = self._writer
        self._unwritten = sum(count for count, _payload in self._unsent)
        if writer is None:
            return
        try:
            writer.send(("close", max(0.0, self._deadline - time.monotonic())))
            self._unwritten += self._acknowledged(writer.receive(self._deadline - time.monotonic() + 1))
        except (OSError, EOFError, pickle.UnpicklingError) as exc:
            self._writer_died(writer, exc)
            self._unwritten += 1  # at least audit_stopped, sent with the last batch, is not known written
        else:
            writer.stop()
            self._writer = None

    def _acknowledged(self, reply: tuple[Any, ...]) -> int:
        """Take a writer's counts and notices from its reply; the records it could not write yet."""
        _kind, self._writer_written, self._writer_errors, unwritten, notices = reply
        _log_notices(notices)
        return int(unwritten)

    def _restart_writer(self) -> _WriterProcess | None:
        try:
            self._writer = self._start_writer("audit_writer_restarted")
        except AuditError as exc:
            self._ended_errors += 1
            log.error("audit_writer_start_failed", error=str(exc), pending=self.pending)
        # A new writer opens the configured path, which is what a reopen asks for.
        self._reopen_requested = False
        return self._writer

    def _writer_died(self, writer: _WriterProcess, exc: BaseException) -> None:
        returncode = writer.stop()
        self._ended_written += self._writer_written
        self._ended_errors += self._writer_errors + 1
        self._writer_written = self._writer_errors = 0
        self._writer = None
        log.error("audit_writer_died", error=repr(exc), returncode=returncode, pending=self.pending)

    def _start_writer(self, event: str) -> _WriterProcess:
        writer = _WriterProcess.spawn()
        try:
            writer.send(("start", self._settings, self._component, self._host, event, os.getpid()))
            kind, detail, notices = writer.receive(_START_TIMEOUT)
        except (OSError, EOFError, pickle.UnpicklingError) as exc:
            writer.stop()
            raise AuditError(f"audit writer process did not start: {exc!r}") from exc
        _log_notices(notices)
        if kind != "started":
            writer.stop()
            raise AuditError(str(detail))
        return writer


class _WriterProcess:
    """A running writer process and this side of its socket pair: length-prefixed pickled messages."""

    def __init__(self, process: subprocess.Popen[bytes], channel: socket.socket) -> None:
        self._process = process
        self._channel = channel

    @classmethod
    def spawn(cls) -> _WriterProcess:
        ours, theirs = socket.socketpair()
        env = dict(os.environ)
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

    def send(self, message: tuple[Any, ...]) -> None:
        _send(self._channel, message)

    def receive(self, timeout: float | None) -> tuple[Any, ...]:
        self._channel.settimeout(timeout)
        return _receive(self._channel)

    def kill(self) -> None:
        self._process.kill()

    def stop(self) -> int | None:
        """Close the channel (a live writer then finishes and exits) and reap the process."""
        self._channel.close()
        try:
            return self._process.wait(_CLOSE_GRACE)
        except subprocess.TimeoutExpired:
            self._process.kill()
            return self._process.wait()


class _RecordPickler(pickle.Pickler):
    """Pickles records with builtin types only, so the writer process never has to import a caller's
    class: any other object becomes what the writer would render of it (its text, mostly)."""

    def reducer_override(self, obj: Any) -> Any:
        # Not called for exact str, int, float, bytes, list, tuple, dict, set and the like.
        if getattr(obj, "__module__", None) == "builtins" and (isinstance(obj, type) or callable(obj)):
            return NotImplemented  # str, list, dict...: also what the reductions below call
        plain = json_ready(obj)
        if isinstance(plain, str):
            return str, (str.__str__(plain),)  # a str subclass: its exact text
        return type(plain), (plain,)


def _pickled(records: list[Record]) -> bytes:
    buffer = io.BytesIO()
    # One pickler for the batch: a session's shared fields are pickled once, and the writer gets them
    # back as one object, which keeps its layout cache effective.
    pickler = _RecordPickler(buffer, protocol=pickle.HIGHEST_PROTOCOL)
    for start in range(0, len(records), _CHUNK_RECORDS):
        pickler.dump(records[start : start + _CHUNK_RECORDS])
    return buffer.getvalue()


def _unpickled(payload: bytes) -> Iterator[Record]:
    stream = io.BytesIO(payload)
    unpickler = pickle.Unpickler(stream)
    while stream.tell() < len(payload):
        yield from unpickler.load()


def _log_notices(notices: list[tuple[str, dict[str, object]]]) -> None:
    for event, fields in notices:
        log.error(event, **fields)


def _send(channel: socket.socket, message: tuple[Any, ...]) -> None:
    data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    channel.sendall(len(data).to_bytes(_LENGTH_BYTES, "big"))
    channel.sendall(data)


def _receive(channel: socket.socket) -> tuple[Any, ...]:
    length = int.from_bytes(_receive_exactly(channel, _LENGTH_BYTES), "big")
    message = pickle.loads(_receive_exactly(channel, length))
    if not isinstance(message, tuple) or not message:
        raise pickle.UnpicklingError(f"not a message: {type(message).__name__}")
    return message


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
    _kind, settings, component, host, event, proxy_pid = _receive(channel)
    writer: ChainWriter | None = None
    try:
        writer = ChainWriter(settings, component=component, host=host)
        resumed = writer.open()
        opening: Record = (time.time_ns(), event, _NO_FIELDS, {"pid": proxy_pid, "resumed": resumed})
        if not writer.write([opening]):
            raise AuditError(f"cannot write audit log {settings.file}")
    except AuditError as exc:
        if writer is not None:
            writer.close(deadline=0.0)
        _send(channel, ("failed", str(exc), _take_notices(writer)))
        return 1
    _send(channel, ("started", resumed, _take_notices(writer)))
    while True:
        try:
            message = _receive(channel)
        except EOFError:
            # The proxy is gone: what it sent is written, and nothing more will come.
            writer.close(deadline=time.monotonic() + settings.flush_interval)
            return 0
        if message[0] == "batch":
            _kind, reopen, payload = message
            writer.write(_unpickled(payload), reopen=reopen)
            _send(channel, ("ack", writer.written, writer.write_errors, 0, _take_notices(writer)))
        else:
            _kind, seconds = message
            writer.close(deadline=time.monotonic() + seconds)
            unwritten = writer.unwritten
            _send(channel, ("closed", writer.written, writer.write_errors, unwritten, _take_notices(writer)))
            return 0


def _take_notices(writer: ChainWriter | None) -> list[tuple[str, dict[str, object]]]:
    if writer is None:
        return []
    notices, writer.notices = writer.notices, []
    return notices


if __name__ == "__main__":
    sys.exit(main(sys.argv))
