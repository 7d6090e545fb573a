"""Multi-worker mode: the supervisor runs N proxy workers on one port, restarts those that die,
passes signals on, talks to systemd, and serves the one admin API, aggregated over the workers.

Each worker is ``python -m proxy worker``: a ProxyServer with a WorkerSlot (proxy.workers) that binds
the terminal port with SO_REUSEPORT (the kernel spreads connections over the workers) and serves its
admin API on a Unix socket in the supervisor's private 0700 runtime directory. The supervisor answers
admin requests by calling those sockets, so proxy.admin stays the one implementation of the API.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import sys
import tempfile
import time
import urllib.parse
from collections.abc import Coroutine, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import structlog

from proxy.admin import ACTOR_HEADER, AdminListener, AdminServer
from proxy.config.model import Config
from proxy.metrics import FleetMetrics
from proxy.sdnotify import Notifier
from proxy.workers import WorkerSlot

log = structlog.get_logger("pos_proxy.supervisor")

EXIT_OK = 0
EXIT_FAILURE = 1

# A worker that dies again within _STABLE_AFTER of its start waits twice as long before the next
# start, from _RESTART_DELAY_FIRST up to _RESTART_DELAY_MAX: a crash loop costs at most one start
# per 30 s per worker, and _CRASH_LOOP_DEATHS quick deaths in a row are reported as one.
_RESTART_DELAY_FIRST = 0.5
_RESTART_DELAY_MAX = 30.0
_STABLE_AFTER = 30.0
_CRASH_LOOP_DEATHS = 3
_START_TIMEOUT = 30.0  # for every worker to answer on its admin socket
_CALL_TIMEOUT = 10.0  # one admin call to one worker
_EXIT_GRACE = 10.0  # beyond the drain timeout, before a worker that does not exit is killed
_START_POLL = 0.05
# systemd's variables: only the supervisor notifies (NotifyAccess=main) and keeps the watchdog.
_SUPERVISOR_ONLY_ENVIRONMENT = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")


def restart_delay(quick_deaths: int) -> float:
    """Seconds before restarting a worker that died ``quick_deaths`` times in a row soon after starting."""
    return min(_RESTART_DELAY_MAX, _RESTART_DELAY_FIRST * 2.0 ** min(quick_deaths - 1, 16))


@dataclass(slots=True)
class _Worker:
    slot: WorkerSlot
    process: asyncio.subprocess.Process | None = None
    started: float = 0.0
    serving: bool = False  # answered on its admin socket since its last start
    exit_code: int | None = None  # how it ended once the supervisor stopped it

    @property
    def drained(self) -> bool:
        """Exited cleanly, or was stopped while still starting (it had no sessions to drain)."""
        return self.exit_code in (0, None) or (self.exit_code == -signal.SIGTERM and not self.serving)


class Supervisor:
    """Runs the workers and implements proxy.admin.AdminControl over them."""

    def __init__(self, config: Config, count: int, runtime_dir: Path, worker_options: Sequence[str]) -> None:
        self.config = config
        self._worker_options = list(worker_options)
        metrics_dir = runtime_dir / "metrics"
        metrics_dir.mkdir(mode=0o700)
        self.metrics = FleetMetrics(metrics_dir)
        self._environment = {
            **{key: value for key, value in os.environ.items() if key not in _SUPERVISOR_ONLY_ENVIRONMENT},
            "PROMETHEUS_MULTIPROC_DIR": str(metrics_dir),
        }
        self._workers = [
            _Worker(WorkerSlot(index, count, runtime_dir, os.getpid())) for index in range(1, count + 1)
        ]
        self._notifier = Notifier()
        self._tasks: set[asyncio.Task[None]] = set()
        self._stop_requested = asyncio.Event()
        self._stopped = asyncio.Event()
        self._exit_code = EXIT_OK
        self._start_failed = False
        self.admin: AdminServer | None = None

    @property
    def _listen_address(self) -> str:
        return f"{self.config.listen.host}:{self.config.listen.port}"

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, self._on_stop_signal, signum)
        loop.add_signal_handler(signal.SIGHUP, self._spawn_reload, "SIGHUP")
        for worker in self._workers:
            await self._start_process(worker)
        if not all(await asyncio.gather(*(self._wait_up(worker) for worker in self._workers))):
            self._abandon_start("a worker failed to start")
        elif not await self._start_admin():
            self._abandon_start("the admin listener failed to start")
        if self._stop_requested.is_set():
            await self._stopped.wait()
            return self._exit_code
        for worker in self._workers:
            self._spawn(self._keep_running(worker))
        log.info(
            "workers_ready",
            address=self._listen_address,
            workers=len(self._workers),
            pids=[worker.process.pid for worker in self._workers if worker.process is not None],
        )
        self._notifier.ready(f"serving on {self._listen_address} with {len(self._workers)} workers")
        if self._notifier.watchdog_interval is not None:
            self._spawn(self._watchdog_loop(self._notifier.watchdog_interval))
        await self._stopped.wait()
        return self._exit_code

    async def _start_admin(self) -> bool:
        admin = self.config.admin
        if admin is None:
            return True
        token = admin.token.reveal() if admin.token is not None else None
        server = AdminServer(self, AdminListener(admin.host, admin.port, token))
        try:
            await server.start()
        except OSError as exc:
            log.error("admin_listen_failed", host=admin.host, port=admin.port, error=str(exc))
            return False
        self.admin = server
        return True

    def _abandon_start(self, reason: str) -> None:
        if self._stop_requested.is_set():
            return  # a signal stopped the start, which is no failure
        log.error("start_failed", reason=reason, workers=len(self._workers))
        self._start_failed = True
        self._stop(reason)

    # --- workers ---

    async def _start_process(self, worker: _Worker) -> None:
        slot = worker.slot
        worker.process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "proxy",
            "worker",
            "--config",
            str(self.config.source),
            "--index",
            str(slot.index),
            "--count",
            str(slot.count),
            "--runtime-dir",
            str(slot.runtime_dir),
            # Named, not read with getppid() in the worker: the supervisor may die while it starts.
            "--supervisor-pid",
            str(slot.supervisor_pid),
            *self._worker_options,
            env=self._environment,
        )
        worker.started = time.monotonic()
        worker.serving = False
        log.info("worker_started", worker=slot.index, pid=worker.process.pid)

    async def _wait_up(self, worker: _Worker) -> bool:
        """True once the worker answers on its admin socket (it listens by then); False if it exits."""
        deadline = time.monotonic() + _START_TIMEOUT
        while time.monotonic() < deadline and not self._stop_requested.is_set():
            process = worker.process
            if process is None or process.returncode is not None:
                return False
            if worker.slot.admin_socket.exists() and await self._call(worker, "GET", "/healthz", quiet=True):
                worker.serving = True
                return True
            await asyncio.sleep(_START_POLL)
        if not self._stop_requested.is_set():
            log.error("worker_start_timeout", worker=worker.slot.index, timeout_s=_START_TIMEOUT)
        return False

    async def _keep_running(self, worker: _Worker) -> None:
        """Restart the worker whenever it dies, slower while it keeps dying quickly."""
        quick_deaths = 0
        while worker.process is not None:
            process = worker.process
            code = await process.wait()
            self.metrics.forget_worker(process.pid)
            worker.process = None
            if self._stop_requested.is_set():
                return
            quick_deaths = quick_deaths + 1 if time.monotonic() - worker.started < _STABLE_AFTER else 1
            delay = restart_delay(quick_deaths)
            index = worker.slot.index
            log.error("worker_died", worker=index, pid=process.pid, exit=code, restart_in_s=delay)
            if quick_deaths >= _CRASH_LOOP_DEATHS:
                log.error("worker_crash_loop", worker=index, quick_deaths=quick_deaths, restart_in_s=delay)
                self._notifier.status(
                    f"worker {index} keeps dying ({quick_deaths} times); restart in {delay}s"
                )
            else:
                self._notifier.status(f"worker {index} died (exit {code}); restart in {delay}s")
            try:
                async with asyncio.timeout(delay):
                    await self._stop_requested.wait()
                return
            except TimeoutError:
                pass
            await self._start_process(worker)
            self.metrics.worker_restarts_total.inc()
            if await self._wait_up(worker):
                log.info("worker_ready", worker=index, pid=worker.process.pid if worker.process else None)
                self._notifier.status(f"serving on {self._listen_address} with {len(self._workers)} workers")

    def _signal_workers(self, signum: int) -> None:
        for worker in self._workers:
            if worker.process is not None and worker.process.returncode is None:
                worker.process.send_signal(signum)

    def _on_stop_signal(self, signum: int) -> None:
        if self._stop_requested.is_set():
            # The second signal: each worker ends its drain at once.
            log.warning("shutdown_hurried", signal=signal.Signals(signum).name)
            self._signal_workers(signal.SIGTERM)
            return
        log.info("shutdown_requested", signal=signal.Signals(signum).name, workers=len(self._workers))
        self._stop("draining workers")

    def _stop(self, status: str) -> None:
        self._stop_requested.set()
        self._notifier.stopping(status)
        self._signal_workers(signal.SIGTERM)
        self._spawn(self._finish())

    async def _finish(self) -> None:
        """Wait for every worker to drain and exit (killing one that overstays), then stop."""
        limit = self.config.listen.drain_timeout + _EXIT_GRACE
        await asyncio.gather(*(self._reap(worker, limit) for worker in self._workers))
        if self.admin is not None:
            await self.admin.stop()
        codes = {worker.slot.index: worker.exit_code for worker in self._workers}
        drained = all(worker.drained for worker in self._workers)
        self._exit_code = EXIT_OK if drained and not self._start_failed else EXIT_FAILURE
        log.info("workers_stopped", exit_codes=codes)
        current = asyncio.current_task()
        for task in list(self._tasks):
            if task is not current:
                task.cancel()
        self._stopped.set()

    async def _reap(self, worker: _Worker, timeout: float) -> None:
        process = worker.process
        if process is None:
            return
        try:
            async with asyncio.timeout(timeout):
                worker.exit_code = await process.wait()
        except TimeoutError:
            log.error("worker_kill", worker=worker.slot.index, pid=process.pid, waited_s=timeout)
            process.kill()
            worker.exit_code = await process.wait()
        log.info("worker_exited", worker=worker.slot.index, pid=process.pid, exit=worker.exit_code)

    async def _watchdog_loop(self, interval: float) -> None:
        """WATCHDOG=1 only while every worker answers, so systemd restarts a service whose workers hang."""
        while True:
            answers = await self._fan_out("GET", "/healthz", timeout=interval / 2)
            if len(answers) == len(self._workers):
                self._notifier.watchdog()
            await asyncio.sleep(interval / 2)

    def _spawn(self, coroutine: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # --- talking to the workers' admin sockets ---

    async def _call(
        self,
        worker: _Worker,
        method: str,
        path: str,
        *,
        actor: str | None = None,
        timeout: float = _CALL_TIMEOUT,
        quiet: bool = False,
    ) -> tuple[int, bytes] | None:
        """The worker's (status, body), or None when it is not running or does not answer."""
        if worker.process is None:
            return None
        connector = aiohttp.UnixConnector(path=str(worker.slot.admin_socket))
        headers = {ACTOR_HEADER: actor} if actor is not None else {}
        try:
            async with (
                aiohttp.ClientSession(
                    connector=connector, timeout=aiohttp.ClientTimeout(total=timeout)
                ) as session,
                session.request(
                    method, f"http://worker-{worker.slot.index}{path}", headers=headers
                ) as response,
            ):
                return response.status, await response.read()
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            if not quiet:
                log.warning(
                    "worker_unreachable",
                    worker=worker.slot.index,
                    path=path,
                    error=str(exc) or type(exc).__name__,
                )
            return None

    async def _fan_out(
        self, method: str, path: str, *, actor: str | None = None, timeout: float = _CALL_TIMEOUT
    ) -> list[tuple[_Worker, int, bytes]]:
        """The answers of the workers that answered, in worker order."""
        answers = await asyncio.gather(
            *(self._call(worker, method, path, actor=actor, timeout=timeout) for worker in self._workers)
        )
        return [(worker, *answer) for worker, answer in zip(self._workers, answers, strict=True) if answer]

    async def _merged(self, path: str, key: str) -> list[dict[str, Any]]:
        """The workers' lists under ``key``, each entry marked with its ``worker``."""
        merged: list[dict[str, Any]] = []
        for worker, status, body in await self._fan_out("GET", path):
            if status == 200:
                merged.extend({**entry, "worker": worker.slot.index} for entry in json.loads(body)[key])
        return merged

    # --- admin API (AdminControl) ---

    async def pools(self) -> list[dict[str, Any]]:
        return await self._merged("/v1/pools", "pools")

    async def clients(self) -> list[dict[str, Any]]:
        return await self._merged("/v1/clients", "clients")

    async def disconnect_terminal(self, store: str, terminal: str, actor: str) -> int:
        """Every worker cuts the terminal's sessions it holds; a worker that is down holds none."""
        quoted = "/".join(urllib.parse.quote(part, safe="") for part in (store, terminal))
        answers = await self._fan_out("POST", f"/v1/terminals/{quoted}/disconnect", actor=actor)
        return sum(int(json.loads(body)["disconnected"]) for _, status, body in answers if status == 200)

    async def close_idle_server_connections(self, route: str, actor: str) -> int | None:
        """Every worker closes the route's idle server connections in its own pool."""
        path = f"/v1/pools/{urllib.parse.quote(route, safe='')}/close-idle"
        answers = await self._fan_out("POST", path, actor=actor)
        if answers and all(status == 404 for _, status, _ in answers):
            return None
        return sum(int(json.loads(body)["closed"]) for _, status, body in answers if status == 200)

    async def request_reload(self, trigger: str) -> bool:
        """Every running worker re-reads the configuration (one that is restarting reads it as it starts)."""
        self._notifier.reloading()
        running = [worker for worker in self._workers if worker.process is not None]
        answers = await self._fan_out("POST", "/v1/reload", actor=trigger)
        applied = {worker.slot.index: status == 200 for worker, status, _ in answers}
        ok = len(answers) == len(running) and all(applied.values())
        if ok:
            log.info("workers_reloaded", trigger=trigger, workers=sorted(applied))
        else:
            log.error("workers_reload_failed", trigger=trigger, applied=applied, running=len(running))
        self._notifier.ready(f"serving on {self._listen_address}; last reload by {trigger}")
        return ok

    async def readiness(self) -> tuple[bool, Mapping[str, Any]]:
        """Ready when every worker is running and ready."""
        answers = {
            worker.slot.index: (status, body)
            for worker, status, body in await self._fan_out("GET", "/readyz")
        }
        workers: dict[str, Any] = {}
        for worker in self._workers:
            answer = answers.get(worker.slot.index)
            workers[str(worker.slot.index)] = (
                json.loads(answer[1]) if answer else {"ready": False, "running": False}
            )
        ready = all(answer[0] == 200 for answer in answers.values()) and len(answers) == len(self._workers)
        return ready, {"workers": workers}

    async def metrics_text(self) -> bytes:
        # Each worker samples its gauges (pools, caches) into the shared directory as it renders.
        await self._fan_out("GET", "/metrics")
        self.metrics.workers_alive.set(sum(worker.process is not None for worker in self._workers))
        self.metrics.worker_processes.workers = {
            worker.slot.index: worker.process.pid for worker in self._workers if worker.process is not None
        }
        return self.metrics.render()

    def _spawn_reload(self, trigger: str) -> None:
        async def reload() -> None:
            await self.request_reload(trigger)

        self._spawn(reload())


async def supervise(config: Config, count: int, worker_options: Sequence[str]) -> int:
    """Run ``count`` workers until SIGTERM or SIGINT; 0 when every one of them drained and exited 0."""
    # systemd's RuntimeDirectory= when set (private to the service), else the system's temp directory.
    base = os.environ.get("RUNTIME_DIRECTORY", "").split(":")[0] or None
    runtime_dir = Path(tempfile.mkdtemp(prefix="pos-proxy-", dir=base))  # mode 0700
    try:
        return await Supervisor(config, count, runtime_dir, worker_options).run()
    finally:
        shutil.rmtree(runtime_dir, ignore_errors=True)
