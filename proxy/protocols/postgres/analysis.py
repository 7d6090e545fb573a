"""Statement analysis in worker processes, so that parsing a large statement never holds the event loop.

pglast's parser releases the GIL only inside libpg_query; building the Python syntax tree and
walking it hold it, and take most of the time (a 1.3 MB IN list: 80 ms in libpg_query, 1.5 s in
all), so a thread would not let other terminals run. A deep enough tree (``SELECT 1+1+...`` of
60 KB) even overflows the C stack while pglast builds it: in a worker that ends the worker, not
the proxy. A worker is a ``python -m proxy.protocols.postgres.analysis`` child process: length
prefixed pickles over its stdin and stdout, started when first needed, killed when it runs over
the time budget or the proxy stops.
"""

from __future__ import annotations

import asyncio
import pickle
import signal
import struct
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import BinaryIO, Final

import structlog

from proxy.policy.encodings import read_statement
from proxy.policy.postgres import ParseError, StatementFacts, analyze
from proxy.protocols.postgres.sessionstate import NOT_READABLE, Classification, Effect, classify, might_matter

log = structlog.get_logger("pos_proxy.analysis")

_LENGTH: Final = struct.Struct(">I")
# A worker's first word, once its imports are done: its start does not count against a statement.
_READY: Final = b"R"
# A worker imports pglast and the policy modules first: allowed far longer than one analysis.
_START_TIMEOUT: Final = 30.0
# What a statement that could not be analysed counts as for session state: the session keeps its
# server connection (or the statement is refused where pinning is off), as for any state it leaves.
NOT_ANALYSED: Final = Classification(Effect.SESSION_STATE, "statement not analysed")


@dataclass(frozen=True, slots=True)
class Analysis:
    """What the session needs to know of one statement text, found once."""

    # Facts per statement for the role's policy; None when PostgreSQL's parser refuses the text or
    # (readable False) it cannot be read in its client encoding as the server reads it. Empty for a
    # role without a policy: only its session effect counts.
    statements: tuple[StatementFacts, ...] | None
    classification: Classification
    readable: bool = True


@dataclass(frozen=True, slots=True)
class AnalysisRequest:
    sql: bytes
    # The session's client encoding (an accepted one's canonical name), in which the text is read.
    encoding: str
    # The role's policy search_path; None for a role without a policy.
    search_path: tuple[str, ...] | None
    # Longer texts are not parsed at all (a role without a policy has no size limit, and a parse
    # tree takes many times its text's size): NOT_ANALYSED unless a scan shows no session effect.
    parse_up_to: int = 64 * 2**10


class AnalysisFailed(Exception):
    """No answer within the time budget, or the worker died on the statement."""


def analyze_text(request: AnalysisRequest) -> Analysis:
    """The analysis a worker makes (and the tests call directly)."""
    try:
        text = read_statement(request.sql, request.encoding)
    except UnicodeDecodeError:
        return Analysis(None, NOT_READABLE, readable=False)
    classification = _classify_bounded(text, request.parse_up_to)
    if request.search_path is None:
        return Analysis((), classification)
    try:
        return Analysis(tuple(analyze(text, request.search_path)), classification)
    except ParseError:
        return Analysis(None, classification)


def _classify_bounded(text: str, parse_up_to: int) -> Classification:
    if len(text) > parse_up_to and might_matter(text):
        return NOT_ANALYSED
    return classify(text)


class _Worker:
    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self.process = process

    async def ask(self, requests: Sequence[AnalysisRequest]) -> list[Analysis]:
        stdin, stdout = self.process.stdin, self.process.stdout
        assert stdin is not None and stdout is not None
        payload = pickle.dumps(list(requests), protocol=pickle.HIGHEST_PROTOCOL)
        stdin.write(_LENGTH.pack(len(payload)) + payload)
        await stdin.drain()
        (length,) = _LENGTH.unpack(await stdout.readexactly(_LENGTH.size))
        answer: list[Analysis] = pickle.loads(await stdout.readexactly(length))
        return answer


@dataclass(slots=True)
class AnalysisPool:
    """A few worker processes that analyse statements; each session waits for its own answer."""

    workers: int
    timeout: float
    _idle: list[_Worker] = field(default_factory=list)
    _slots: asyncio.Semaphore | None = None
    _busy: set[_Worker] = field(default_factory=set)
    _reaping: set[asyncio.Task[int]] = field(default_factory=set)

    async def analyze(self, requests: Sequence[AnalysisRequest]) -> list[Analysis]:
        """Analyses of ``requests``, in order; AnalysisFailed when there is none in time.

        The time budget applies twice: to waiting for a free worker, and to the analysis itself.
        """
        if self._slots is None:
            self._slots = asyncio.Semaphore(self.workers)
        try:
            async with asyncio.timeout(self.timeout):
                await self._slots.acquire()
        except TimeoutError:
            raise AnalysisFailed("every analysis worker stayed busy") from None
        try:
            try:
                worker = self._idle.pop() if self._idle else await self._start()
            except (OSError, TimeoutError, asyncio.IncompleteReadError) as exc:
                raise AnalysisFailed(f"no analysis worker could be started: {exc!r}") from None
            self._busy.add(worker)
            try:
                async with asyncio.timeout(self.timeout):
                    answer = await worker.ask(requests)
            except BaseException as exc:
                # Timed out, cancelled (the session ended) or died: its pipe is in an unknown state.
                self._kill(worker)
                if isinstance(exc, TimeoutError):
                    raise AnalysisFailed(f"no answer within {self.timeout:g}s") from None
                if isinstance(exc, (OSError, EOFError, asyncio.IncompleteReadError, pickle.UnpicklingError)):
                    raise AnalysisFailed(f"the analysis worker failed: {exc!r}") from None
                raise
            self._busy.discard(worker)
            self._idle.append(worker)
            return answer
        finally:
            self._slots.release()

    async def _start(self) -> _Worker:
        process = await asyncio.wait_for(
            asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                __name__,
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
            ),
            _START_TIMEOUT,
        )
        worker = _Worker(process)
        assert process.stdout is not None
        try:
            ready = await asyncio.wait_for(process.stdout.readexactly(len(_READY)), _START_TIMEOUT)
        except BaseException:
            self._kill(worker)
            raise
        if ready != _READY:
            self._kill(worker)
            raise AnalysisFailed(f"the analysis worker did not start: {ready!r}")
        log.info("analysis_worker_started", pid=process.pid)
        return worker

    def _kill(self, worker: _Worker) -> None:
        self._busy.discard(worker)
        process = worker.process
        if process.returncode is None:
            process.kill()
        log.warning("analysis_worker_stopped", pid=process.pid, returncode=process.returncode)
        task = asyncio.get_running_loop().create_task(process.wait())
        self._reaping.add(task)
        task.add_done_callback(self._reaping.discard)

    async def close(self) -> None:
        """Stop every worker (the proxy is stopping) and wait until they are gone."""
        processes = [worker.process for worker in (*self._idle, *self._busy)]
        self._idle.clear()
        self._busy.clear()
        for process in processes:
            if process.returncode is None:
                process.kill()
        waits = [process.wait() for process in processes] + list(self._reaping)
        if waits:
            await asyncio.wait_for(asyncio.gather(*waits, return_exceptions=True), _START_TIMEOUT)


def serve(requests: BinaryIO, answers: BinaryIO) -> None:
    """A worker's loop: one batch of requests in, their analyses out, until the proxy closes the pipe."""
    answers.write(_READY)
    answers.flush()
    while True:
        header = requests.read(_LENGTH.size)
        if len(header) < _LENGTH.size:
            return
        (length,) = _LENGTH.unpack(header)
        batch: list[AnalysisRequest] = pickle.loads(requests.read(length))
        payload = pickle.dumps([analyze_text(request) for request in batch], protocol=pickle.HIGHEST_PROTOCOL)
        answers.write(_LENGTH.pack(len(payload)) + payload)
        answers.flush()


def main() -> None:
    answers = sys.stdout.buffer
    sys.stdout = sys.stderr  # nothing else may reach the answer pipe
    # Ctrl-C in a terminal reaches the whole process group: the worker ends when the proxy does.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    serve(sys.stdin.buffer, answers)


if __name__ == "__main__":
    # Through the module's importable name: pickles must name its classes, not __main__'s copies.
    from proxy.protocols.postgres.analysis import main as _main

    _main()
