"""Listeners and lifecycle: accept terminals, negotiate TLS, run sessions, shut down cleanly."""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import os
import signal
import socket
import ssl
import time
from collections.abc import Coroutine, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog

from proxy.admin import AdminListener, AdminServer
from proxy.audit import AuditError, OnWriteFailure
from proxy.auditwriter import AuditLog
from proxy.config.load import load_config
from proxy.config.model import AdminConfig, AuditConfig, Config, ExpiredCRLAction, WireProtocol
from proxy.errors import AdminShutdown, AuthenticationRefused, ProtocolViolation
from proxy.eventloop import log_unhandled_error
from proxy.frontend import Encryption, Frontend
from proxy.limits import Limiter, SourceRateLimiter
from proxy.metrics import Metrics, build_labels
from proxy.policy.engine import PolicyEngine, StatementSummaries
from proxy.policy.learn import ReviewLog
from proxy.preauth import PendingStartup, PendingStartups, RecordThrottle
from proxy.protocols.postgres.analysis import AnalysisPool
from proxy.protocols.postgres.frontend import PostgresFrontend
from proxy.protocols.postgres.session import ClientSession, Route, SessionEnvironment, SessionRegistry
from proxy.protocols.proxyheader import (
    HeaderProblem,
    ProxyHeader,
    ProxyHeaderError,
    parse_proxy_header,
)
from proxy.sdnotify import Notifier
from proxy.tcp import readable, recv_exactly, tune_socket
from proxy.tlsconfig import CRLExpired, UpstreamTLS, load_terminal_tls, upstream_context
from proxy.tlstransport import accept_tls
from proxy.workers import WorkerSlot
from proxy.yamlreader import ConfigError, ConfigProblem

if TYPE_CHECKING:
    from proxy.sharedlimits import RedisSharedLimits

log = structlog.get_logger("pos_proxy.server")

_RECYCLE_INTERVAL = 1.0
# How long a closing session may take to flush its last bytes: a terminal that never reads would
# otherwise hold a drain (or its socket) open.
_TLS_SHUTDOWN_TIMEOUT = 2.0
# How often a worker checks that its supervisor is still there.
_SUPERVISOR_CHECK_INTERVAL = 1.0


def build_policy_engine(config: Config) -> PolicyEngine:
    for role in config.roles.values():
        if role.policy is None:
            log.warning("role_without_policy", role=role.name, effect="all statements allowed")
        else:
            log.info("role_policy", role=role.name, mode=role.policy.mode.value, file=str(role.policy_file))
    settings = config.policy
    return PolicyEngine(
        {name: role.policy for name, role in config.roles.items()},
        settings.cache_size,
        cache_bytes=settings.cache_bytes,
        max_statement_bytes=settings.max_statement_bytes,
    )


def build_statement_summaries(config: Config) -> StatementSummaries:
    settings = config.policy
    return StatementSummaries(
        settings.cache_size, cache_bytes=settings.cache_bytes, parse_up_to=settings.analyze_in_worker_above
    )


# proxy-protocol.txt section 2: senders fit the header in one 536-byte segment; longer ones take more rounds.
_HEADER_PEEK_SIZE = 536
_RELOADABLE = ("tls", "identity", "roles", "routes", "policy", "limits", "admin")
# Connections taken from the kernel's queue per wakeup of the listener, so that a burst of new
# terminals cannot hold the event loop from the sessions already running (asyncio's own figure).
_ACCEPTS_PER_WAKEUP = 100
# After an accept error (out of descriptors): how long to leave the queue alone before trying again.
_ACCEPT_BACKOFF = 0.1
_EXPIRED_CRL_ALARM_INTERVAL = 60.0


# The server's sessions and routes are still PostgreSQL's (the neutral session gate comes later).
_PostgresFrontend = Frontend[Route, SessionEnvironment, ClientSession]


@dataclasses.dataclass
class _Listener:
    """A listening socket and the front end its terminals speak."""

    sock: socket.socket
    frontend: _PostgresFrontend
    # While accepting is paused after an accept error (descriptors exhausted): the resume timer.
    paused: asyncio.TimerHandle | None = None


class ProxyServer:
    """Owns the listening sockets, the sessions and the pools for one configuration.

    With a ``worker`` slot it is one of several processes under a supervisor (proxy.supervisor):
    it shares the port through SO_REUSEPORT, runs its slice of the configuration and serves its
    admin API on a private Unix socket for the supervisor only.
    """

    def __init__(self, config: Config, worker: WorkerSlot | None = None) -> None:
        self._worker = worker
        config = self._shape(config)
        self.config = config
        self._terminal_tls = load_terminal_tls(config.tls)
        self.metrics = Metrics()
        guessing = self.metrics.limit_hits_total.labels("wrong cancel keys per source address")
        self._registry = SessionRegistry(wrong_keys_refused=guessing.inc)
        # One front end per wire protocol, for the listeners and the routes that speak it.
        self._frontends: dict[WireProtocol, _PostgresFrontend] = {
            WireProtocol.POSTGRES: PostgresFrontend(self._registry)
        }
        self.routes: Mapping[str, Route] = {
            name: self._frontends[route.protocol].build_route(
                route, UpstreamTLS(upstream_context(route)), self.metrics
            )
            for name, route in config.routes.items()
        }
        self.audit = AuditLog(config.audit.settings) if config.audit is not None else None
        if self.audit is not None and config.audit is not None:
            self.audit.on_write_failure = config.audit.on_write_failure
        self._shared_limits = _shared_limit_store(config, self.metrics)
        listen = config.listen
        self._pending = PendingStartups(
            listen.max_pending_handshakes, listen.max_pending_handshakes_per_source
        )
        self._preauth_records = RecordThrottle(listen.preauth_records_per_second)
        # Workers start when a statement first needs one; their number takes effect at restart.
        self._analysis = AnalysisPool(config.policy.analysis_workers, config.policy.analysis_timeout)
        self._environment = SessionEnvironment(
            config=config,
            routes=self.routes,
            registry=self._registry,
            metrics=self.metrics,
            limiter=Limiter(shared=self._shared_limits),
            policies=build_policy_engine(config),
            summaries=build_statement_summaries(config),
            analysis=self._analysis,
            review=ReviewLog(config.policy.review_file) if config.policy.review_file else None,
            audit=self.audit,
            preauth_records=self._preauth_records,
        )
        # Each bound to its front end; empty before start and once accepting has stopped.
        self._listeners: list[_Listener] = []
        self._tasks: set[asyncio.Task[None]] = set()
        self._stopped = asyncio.Event()
        self.admin: AdminServer | None = None
        self._reported_hits = self._reported_misses = 0
        self._reported_audit = (0, 0, 0)
        self._draining = False
        self._drain_cut = asyncio.Event()
        self.exit_code = 0  # 1 once the audit log could not write everything at shutdown
        # The CRL file as the TLS context loaded it, to notice when it is replaced.
        self._crl_stamp = _file_stamp(config.tls.crl)
        # While an expired CRL is in force: when to re-read it and log crl_expired again.
        self._crl_alarm_at = 0.0
        # Only the supervisor talks to systemd when there are workers (NotifyAccess=main).
        self._notifier = Notifier({}) if worker is not None else Notifier()
        self._source_limiter = SourceRateLimiter(config.limits.source_connections)
        # Per route: when its server was last probed with a TCP connect, and the answer.
        self._note_crl()

    @property
    def address(self) -> tuple[str, int]:
        assert self._listeners
        host, port = self._listeners[0].sock.getsockname()[:2]
        return str(host), int(port)

    async def start(self) -> None:
        asyncio.get_running_loop().set_exception_handler(self._report_unhandled_error)
        if self.audit is not None:
            self.audit.start()
        else:
            log.warning("audit_disabled", reason="no audit section in the configuration")
        if self._shared_limits is not None:
            await self._shared_limits.start()
        listen = self.config.listen
        family = socket.AF_INET6 if ":" in listen.host else socket.AF_INET
        sock = socket.create_server(
            (listen.host, listen.port), family=family, backlog=1024, reuse_port=self._worker is not None
        )
        sock.setblocking(False)
        # listen: has no protocol of its own yet: its terminals speak PostgreSQL.
        listener = _Listener(sock, self._frontends[WireProtocol.POSTGRES])
        self._listeners.append(listener)
        asyncio.get_running_loop().add_reader(sock.fileno(), self._accept_ready, listener)
        self._spawn(self._recycle_loop())
        admin = self.config.admin
        if self._worker is not None:
            self.admin = AdminServer(self, AdminListener("", 0, None, unix_path=self._worker.admin_socket))
            await self.admin.start()
            self._spawn(self._watch_supervisor(self._worker.supervisor_pid))
        elif admin is not None:
            token = admin.token.reveal() if admin.token is not None else None
            self.admin = AdminServer(self, AdminListener(admin.host, admin.port, token))
            await self.admin.start()
        log.info(
            "listening",
            host=self.address[0],
            port=self.address[1],
            routes=sorted(self.routes),
            **build_labels(),
        )
        self._notifier.ready(f"serving on {self.address[0]}:{self.address[1]}")
        if self._notifier.watchdog_interval is not None:
            self._spawn(self._watchdog_loop(self._notifier.watchdog_interval))

    def _report_unhandled_error(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        # Counted as well as logged: ops alert on the counter (PosProxyInternalErrors).
        self.metrics.internal_errors_total.inc()
        log_unhandled_error(loop, context)

    async def wait_stopped(self) -> None:
        await self._stopped.wait()

    def install_signal_handlers(self) -> None:
        loop = asyncio.get_running_loop()
        # A supervised worker leaves SIGINT (a terminal's Ctrl-C reaches the whole process group)
        # to the supervisor, which turns it into one SIGTERM per worker.
        stop_signals = (signal.SIGTERM,) if self._worker is not None else (signal.SIGTERM, signal.SIGINT)
        for signum in stop_signals:
            loop.add_signal_handler(signum, self._on_stop_signal, signum)
        loop.add_signal_handler(signal.SIGHUP, self.reload, "SIGHUP")
        if self._worker is not None:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})  # blocked by `pos-proxy worker`

    def reload(self, trigger: str) -> bool:
        """Re-read the config file; apply it to new connections, or keep the old one whole."""
        self._notifier.reloading()
        try:
            return self._reload(trigger)
        finally:
            self._notifier.ready(f"serving; last reload by {trigger}")

    def _reload(self, trigger: str) -> bool:
        source = self.config.source
        try:
            if source is None:
                raise ConfigError([ConfigProblem("", "the configuration was not loaded from a file")])
            config = self._shape(load_config(source))
            audit, audit_not_applied = audit_after_reload(self.config.audit, config.audit)
            config = dataclasses.replace(config, audit=audit)
            terminal_tls = load_terminal_tls(config.tls)
            # Built here, where a pair that changed on disk since the config check fails the reload whole.
            upstream_contexts = {
                name: upstream_context(route)
                for name, route in config.routes.items()
                if (current := self.routes.get(name)) is None or current.config != route
            }
            review = self._review_log_for(config)
        except (ConfigError, OSError, ValueError) as exc:
            self.metrics.config_reloads_total.labels("failed").inc()
            log.error("reload_failed", trigger=trigger, config=str(source), error=str(exc))
            self._audit("config_reload", "failure", trigger=trigger, error=str(exc))
            return False
        changed = [name for name in _RELOADABLE if getattr(config, name) != getattr(self.config, name)]
        if config.audit is not None and self.config.audit is not None:
            # The sampling shares: all of the audit section that a reload changes.
            changed += [
                f"audit.{item.name}"
                for item in dataclasses.fields(config.audit)
                if getattr(config.audit, item.name) != getattr(self.config.audit, item.name)
            ]
        if audit_not_applied:
            running = self.config.audit
            log.warning(
                "reload_audit_unchanged",
                keys=audit_not_applied,
                file=str(running.settings.file) if running is not None else None,
                reason="the audit log's file, key, witness and writer settings take effect at restart",
            )
        # The trusted balancers apply to the next accepted connection; the socket itself stays.
        if config.listen.proxy_protocol != self.config.listen.proxy_protocol:
            changed.append("listen.proxy_protocol")
        listen_rest = dataclasses.replace(config.listen, proxy_protocol=self.config.listen.proxy_protocol)
        if listen_rest != self.config.listen:
            log.warning("reload_listen_unchanged", reason="listen settings take effect at restart")
        if config.limits.shared != self.config.limits.shared:
            log.warning("reload_shared_limits_unchanged", reason="limits.shared takes effect at restart")
        self.routes = self._rebuild_routes(config, upstream_contexts)
        self.config = config
        self._terminal_tls = terminal_tls
        self._crl_stamp = _file_stamp(config.tls.crl)
        self._note_crl()
        if config.limits.source_connections != self._source_limiter.rate:
            self._source_limiter = SourceRateLimiter(config.limits.source_connections)
        self._flush_review()
        self._environment = dataclasses.replace(
            self._environment,
            config=config,
            routes=self.routes,
            policies=build_policy_engine(config),
            summaries=build_statement_summaries(config),
            review=review,
        )
        self._analysis.timeout = config.policy.analysis_timeout
        for session in list(self._registry.live):
            session.use_environment(self._environment)
        self.metrics.config_reloads_total.labels("ok").inc()
        log.info("reload_applied", trigger=trigger, changed=changed, not_applied=audit_not_applied)
        self._audit(
            "config_reload", "success", trigger=trigger, changed=changed, not_applied=audit_not_applied
        )
        if self.audit is not None:
            if config.audit is not None:
                self.audit.on_write_failure = config.audit.on_write_failure
            # logrotate moved the file away before signalling: write to a fresh one.
            self.audit.reopen()
        if terminal_tls.crl is not None:
            self._cut_revoked_terminals(terminal_tls.crl.revoked)
        return True

    def _audit(self, event: str, outcome: str, **fields: object) -> None:
        if self.audit is not None:
            self.audit.record(event, outcome=outcome, **fields)

    def _review_log_for(self, config: Config) -> ReviewLog | None:
        current = self._environment.review
        if config.policy.review_file is None:
            return None
        if current is not None and current.path == config.policy.review_file:
            return current
        return ReviewLog(config.policy.review_file)

    # --- admin API (AdminControl) ---

    async def pools(self) -> list[dict[str, Any]]:
        """Like PgBouncer's SHOW POOLS."""
        return [
            {**dataclasses.asdict(route.pool.stats()), "mode": route.config.pool.mode.value}
            for route in self.routes.values()
        ]

    async def clients(self) -> list[dict[str, Any]]:
        """Like PgBouncer's SHOW CLIENTS."""
        return [session.describe() for session in self._registry.live]

    async def disconnect_terminal(self, store: str, terminal: str, actor: str) -> int:
        """Cut a terminal's live sessions now (a stolen till); pair with certs revoke + reload."""
        cut = 0
        for session in list(self._registry.live):
            identity = session.identity
            if identity is not None and (identity.store, identity.terminal) == (store, terminal):
                session.terminate(
                    AdminShutdown("terminating connection due to administrator command"),
                    f"disconnected by {actor}",
                )
                cut += 1
        log.warning("admin_disconnect", store=store, terminal=terminal, sessions=cut, actor=actor)
        self._audit("admin_disconnect", "success", store=store, terminal=terminal, sessions=cut, actor=actor)
        return cut

    async def close_idle_server_connections(self, route: str, actor: str) -> int | None:
        """Close a route's idle server connections (before a DROP DATABASE, say); None: no such route."""
        found = self.routes.get(route)
        if found is None:
            return None
        closed = found.pool.close_idle()
        log.info("admin_close_idle", route=route, closed=closed, actor=actor)
        self._audit("admin_close_idle", "success", route=route, closed=closed, actor=actor)
        return closed

    async def request_reload(self, trigger: str) -> bool:
        return self.reload(trigger)

    async def readiness(self) -> tuple[bool, dict[str, Any]]:
        """Listener up and every route's server reachable, as its pool's breaker says.

        pos_proxy_upstream_up follows the same breaker, so the two always agree: a route is
        unreachable from a failed connect until one succeeds; a pool with no server connection to
        vouch for its server probes it with a TCP connect (each maintenance tick, and here, at most
        every few seconds), so a quiet outage trips the breaker too.
        """
        routes = {
            name: "reachable" if await route.pool.check_upstream() else "unreachable"
            for name, route in self.routes.items()
        }
        listening = bool(self._listeners)
        ready = listening and all(status == "reachable" for status in routes.values())
        details: dict[str, Any] = {"listener": listening, "routes": routes}
        audit, audit_config = self.audit, self.config.audit
        if audit is not None and audit_config is not None:
            failing = audit.failing
            mode = audit_config.on_write_failure
            details["audit"] = "writable" if failing is None else f"failing ({mode.value}): {failing.error}"
            # Refusing every statement, the proxy is no use to a till: a balancer should send it elsewhere.
            ready = ready and (failing is None or mode is OnWriteFailure.CONTINUE)
        return ready, details

    async def metrics_text(self) -> bytes:
        """Gauges sampled now from the pools and caches, then everything rendered."""
        metrics = self.metrics
        for name, route in self.routes.items():
            stats = route.pool.stats()
            metrics.pool_server_connections.labels(name, "active").set(stats.active)
            metrics.pool_server_connections.labels(name, "idle").set(stats.idle)
            metrics.pool_server_connections.labels(name, "opening").set(stats.opening)
            metrics.pool_clients_waiting.labels(name).set(stats.waiting)
        self._sample_long_statements()
        statements = self._environment.statement_stats
        cache = metrics.prepared_statement_cache_total
        cache.labels("hit").inc(statements.hits - self._reported_hits)
        cache.labels("miss").inc(statements.misses - self._reported_misses)
        self._reported_hits, self._reported_misses = statements.hits, statements.misses
        if self.audit is not None and self.config.audit is not None:
            audit = self.audit
            reported_written, reported_errors, reported_dropped = self._reported_audit
            # Never below what was reported: a counter cannot go back.
            written, errors = max(audit.written, reported_written), max(audit.write_errors, reported_errors)
            dropped = audit.dropped
            metrics.audit_records_total.inc(written - reported_written)
            metrics.audit_write_errors_total.inc(errors - reported_errors)
            metrics.audit_records_dropped_total.inc(dropped - reported_dropped)
            self._reported_audit = (written, errors, dropped)
            failing = audit.failing is not None
            refusing = failing and self.config.audit.on_write_failure is OnWriteFailure.REFUSE
            metrics.audit_log_writable.set(0 if failing else 1)
            metrics.audit_refusing_statements.set(1 if refusing else 0)
        return metrics.render()

    def _sample_long_statements(self) -> None:
        threshold = (self.config.admin or AdminConfig()).long_statement_after
        now = time.perf_counter()
        running_long = dict.fromkeys(self.routes, 0)
        for session in self._registry.live:
            route = session.route_name
            if route in running_long and session.running_for(now) > threshold:
                running_long[route] += 1
        for route, count in running_long.items():
            self.metrics.statements_running_long.labels(route).set(count)

    def _shape(self, config: Config) -> Config:
        return self._worker.shape(config) if self._worker is not None else config

    def _rebuild_routes(
        self, config: Config, upstream_contexts: Mapping[str, ssl.SSLContext | None]
    ) -> dict[str, Route]:
        """Keep the pools of routes whose settings did not change; retire the others. A route whose
        client certificate alone changed keeps its pool: new server connections present the new pair,
        those already open stay as they are (the server checked the certificate at their handshake)."""
        routes: dict[str, Route] = {}
        for name, route_config in config.routes.items():
            current = self.routes.get(name)
            if current is not None and current.config == route_config:
                routes[name] = current
            elif current is not None and current.config == dataclasses.replace(
                route_config, client_certificate=current.config.client_certificate
            ):
                current.tls.context = upstream_contexts[name]
                routes[name] = dataclasses.replace(current, config=route_config)
                client = route_config.client_certificate
                log.info(
                    "upstream_client_certificate_reloaded",
                    route=name,
                    sslcert=str(client.cert) if client is not None else None,
                )
            else:
                routes[name] = self._frontends[route_config.protocol].build_route(
                    route_config, UpstreamTLS(upstream_contexts[name]), self.metrics
                )
        for name, route in self.routes.items():
            kept = routes.get(name)
            if kept is None or kept.pool is not route.pool:
                # Sessions still using it give their connections back to a closing pool, which closes them.
                self._spawn(route.pool.close())
        return routes

    def _cut_revoked_terminals(self, revoked: frozenset[int]) -> None:
        for session in list(self._registry.live):
            if session.identity is not None and session.identity.serial in revoked:
                session.terminate(
                    AuthenticationRefused("the terminal certificate has been revoked"), "certificate revoked"
                )

    def _on_stop_signal(self, signum: int) -> None:
        log.info("shutdown_requested", signal=signal.Signals(signum).name)
        if self._draining:
            # The second signal: no more waiting for transactions.
            self._drain_cut.set()
            return
        # Here, not in the task: a connection must not be accepted between the signal and its start.
        self._begin_drain()
        self._spawn(self.shutdown(drain=self.config.listen.drain_timeout))

    def _begin_drain(self) -> None:
        """Stop accepting; a connection accepted earlier that has not finished its startup yet is
        refused with 57P01 when it does (its TLS handshake may still be under way)."""
        self._draining = True
        self._registry.draining = True
        self._stop_accepting()

    def _flush_review(self) -> None:
        review = self._environment.review
        if review is None:
            return
        try:
            review.flush()
        except OSError as exc:
            log.error("review_file_write_failed", path=str(review.path), error=str(exc))

    async def shutdown(self, drain: float = 0.0) -> None:
        """Stop accepting; end idle sessions with 57P01 at once and the others when their
        transaction is over, for up to ``drain`` seconds; close the pools; flush the audit log."""
        self._begin_drain()
        self._notifier.stopping("draining sessions")
        for session in list(self._registry.live):
            session.drain()
        if drain > 0 and self._registry.live:
            waits = [
                asyncio.ensure_future(self._registry.wait_until_empty()),
                asyncio.ensure_future(self._drain_cut.wait()),
            ]
            await asyncio.wait(waits, timeout=drain, return_when=asyncio.FIRST_COMPLETED)
            for waiting in waits:
                waiting.cancel()
        for session in list(self._registry.live):
            session.terminate(AdminShutdown("terminating connection: the proxy is shutting down"), "shutdown")
        for route in self.routes.values():
            await route.pool.close()
        await self._analysis.close()
        if self.admin is not None:
            await self.admin.stop()
        if self._shared_limits is not None:
            await self._shared_limits.close()
        self._flush_review()
        # Observations since the last scrape: with --workers the shared files keep them after exit.
        self.metrics.fold_batched()
        if self.audit is not None:
            # Everything recorded so far reaches the file before the process exits.
            try:
                self.audit.close()
            except AuditError as exc:
                # A full or unwritable disk at exit: the loss is said and the exit code shows it,
                # but the process still ends (a hang would keep a restart from fixing anything).
                log.error("audit_close_failed", error=str(exc), dropped=self.audit.dropped)
                self.exit_code = 1
        current = asyncio.current_task()
        for task in list(self._tasks) + list(self._registry.tasks):
            if task is not current:
                task.cancel()
        self._stopped.set()

    def _spawn(self, coroutine: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        task = asyncio.get_running_loop().create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _watchdog_loop(self, interval: float) -> None:
        """WatchdogSec=: a stuck event loop stops these pings and systemd restarts the service."""
        while True:
            self._notifier.watchdog()
            await asyncio.sleep(interval)

    async def _watch_supervisor(self, supervisor_pid: int) -> None:
        """A worker whose supervisor died (SIGKILL, OOM) drains and exits instead of living on alone."""
        # An orphan is adopted by init (or a subreaper), so its parent changes; nothing signals that.
        while True:
            await asyncio.sleep(_SUPERVISOR_CHECK_INTERVAL)
            if os.getppid() != supervisor_pid:
                break
        log.error("supervisor_gone", supervisor_pid=supervisor_pid)
        self._on_stop_signal(signal.SIGTERM)

    async def _recycle_loop(self) -> None:
        while True:
            await asyncio.sleep(_RECYCLE_INTERVAL)
            self._report_suppressed_records()
            self._flush_review()
            self._follow_crl()
            for route in self.routes.values():
                route.pool.recycle()

    def _follow_crl(self) -> None:
        """Re-read the CRL when its file changes, and when the one in force passes its nextUpdate (it may
        have been replaced unnoticed; if not, tls.expired_crl decides), without an operator's reload."""
        path = self.config.tls.crl
        if path is None:
            return
        stamp = _file_stamp(path)
        changed = stamp is not None and stamp != self._crl_stamp
        if not changed:
            in_force = self._terminal_tls.crl
            if in_force is None or not in_force.expired() or time.monotonic() < self._crl_alarm_at:
                return
        self._crl_stamp = stamp
        try:
            terminal_tls = load_terminal_tls(self.config.tls)
        except CRLExpired:
            # tls.expired_crl: refuse. The expired CRL stays with OpenSSL, which refuses every terminal.
            self._note_crl()
            return
        except (OSError, ValueError) as exc:
            # A half-written or foreign CRL: keep enforcing the previous one.
            log.error("crl_reload_failed", path=str(path), error=str(exc))
            self._keep_expired_crl()
            return
        self._terminal_tls = terminal_tls
        self._note_crl()
        if changed:
            log.info("crl_reloaded", path=str(path))
            self._audit("config_reload", "success", trigger="CRL file changed", changed=["tls.crl"])
        if terminal_tls.crl is not None:
            self._cut_revoked_terminals(terminal_tls.crl.revoked)

    def _note_crl(self) -> None:
        """Export the CRL's nextUpdate; while the CRL in force is expired, say so loudly once a minute."""
        crl = self._terminal_tls.crl
        expired = crl is not None and crl.expired()
        self.metrics.crl_expired.set(1 if expired else 0)
        if crl is None or crl.next_update is None:
            return
        self.metrics.crl_next_update_timestamp_seconds.set(crl.next_update.timestamp())
        if not expired or time.monotonic() < self._crl_alarm_at:
            return
        self._crl_alarm_at = time.monotonic() + _EXPIRED_CRL_ALARM_INTERVAL
        log.error(
            "crl_expired",
            path=str(self.config.tls.crl),
            next_update=crl.next_update.isoformat(),
            action=self.config.tls.expired_crl.value,
            effect=(
                "the expired CRL's revocations are enforced by the proxy; install a fresh CRL"
                if self._terminal_tls.kept
                else "every terminal is refused until a fresh CRL is installed"
            ),
        )

    def _keep_expired_crl(self) -> None:
        """The CRL file could not be re-read: with keep-last, an expired CRL in force is kept by the
        proxy rather than left to OpenSSL, which would refuse every terminal."""
        in_force = self._terminal_tls.crl
        if (
            self.config.tls.expired_crl is ExpiredCRLAction.KEEP_LAST
            and in_force is not None
            and in_force.expired()
            and not self._terminal_tls.kept
        ):
            try:
                self._terminal_tls = load_terminal_tls(self.config.tls, kept=in_force)
            except (OSError, ValueError) as exc:
                log.error("crl_keep_failed", path=str(self.config.tls.crl), error=str(exc))
        self._note_crl()

    def _report_suppressed_records(self) -> None:
        """Once a second, how many pre-authentication records the throttle held back, by event."""
        suppressed = self._preauth_records.take_suppressed()
        if suppressed:
            log.warning("preauth_records_suppressed", suppressed=suppressed)
            self._audit("preauth_records_suppressed", "failure", suppressed=suppressed)

    def preauth_log(self, event: str, *, warning: bool = False, **fields: object) -> bool:
        """Log an event of the pre-authentication phase, which anyone can cause, unless its kind is
        over listen.preauth_records_per_second (then only counted); True if it was logged."""
        if not self._preauth_records.allow(event):
            return False
        (log.warning if warning else log.info)(event, **fields)
        return True

    def _drop_pending(self, dropped: list[PendingStartup]) -> None:
        """The caps on connections in the pre-authentication phase were reached: end the oldest."""
        for pending in dropped:
            self.metrics.client_connections_refused_total.labels("pending startups").inc()
            self.preauth_log(
                "pending_startup_dropped",
                warning=True,
                source=pending.source,
                pending=len(self._pending),
                reason="too many connections have not finished startup",
            )
            pending.drop()

    def _accept_ready(self, listener: _Listener) -> None:
        """The listener is readable: take what the kernel has queued, a bounded batch per wakeup.

        A reader callback rather than a task awaiting ``sock_accept``: stopping (``_stop_accepting``)
        then takes effect in the call that asks for it, with no accept already under way that would
        take one more connection, or try again on the closed socket, afterwards."""
        loop = asyncio.get_running_loop()
        for _ in range(_ACCEPTS_PER_WAKEUP):
            try:
                sock, address = listener.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                # Out of file descriptors or similar: back off instead of spinning.
                log.error("accept_failed", error=str(exc))
                loop.remove_reader(listener.sock.fileno())
                listener.paused = loop.call_later(_ACCEPT_BACKOFF, self._resume_accepting, listener)
                return
            try:
                self._admit_connection(listener.frontend, sock, (address[0], address[1]))
            except OSError as exc:
                # The peer reset it before it could be tuned: nothing to serve.
                log.info("accept_dropped", source=f"{address[0]}:{address[1]}", error=str(exc))
                sock.close()

    def _resume_accepting(self, listener: _Listener) -> None:
        listener.paused = None
        if listener in self._listeners:
            asyncio.get_running_loop().add_reader(listener.sock.fileno(), self._accept_ready, listener)

    def _stop_accepting(self) -> None:
        """No connection is accepted after this returns; those the kernel still queued are refused
        (reset) as the listening sockets close."""
        listeners, self._listeners = self._listeners, []
        for listener in listeners:
            if listener.paused is not None:
                listener.paused.cancel()
                listener.paused = None
            asyncio.get_running_loop().remove_reader(listener.sock.fileno())
            listener.sock.close()

    def _admit_connection(
        self, frontend: _PostgresFrontend, sock: socket.socket, address: tuple[str, int]
    ) -> None:
        sock.setblocking(False)
        loop = asyncio.get_running_loop()
        # A balancer's own address says nothing about the terminal: its connections are
        # counted by the address in their PROXY header instead.
        proxied = self.config.listen.proxy_protocol.trusts(address[0])
        if not proxied and not self._admit_source(address[0]):
            sock.close()
            return
        listen = self.config.listen
        tune_socket(sock, listen.tcp_keepalive, listen.tcp_user_timeout)
        # A balancer's connection counts towards its terminal's source once the header says which.
        pending, dropped = self._pending.admit(
            None if proxied else address[0], loop.time() + listen.startup_timeout
        )
        self._drop_pending(dropped)
        task = self._spawn(self._negotiate(frontend, sock, address, pending, proxied=proxied))
        task.add_done_callback(functools.partial(_close_unless_handed_over, sock))
        pending.drop = task.cancel

    def _admit_source(self, host: str) -> bool:
        if self._source_limiter.allow(host) > 0:
            # A handshake flood is turned away before any TLS work is spent on it.
            self.metrics.client_connections_refused_total.labels("source rate").inc()
            self.metrics.limit_hits_total.labels("connections per source address").inc()
            return False
        return True

    async def _negotiate(
        self,
        frontend: _PostgresFrontend,
        sock: socket.socket,
        peer: tuple[str, int],
        pending: PendingStartup,
        *,
        proxied: bool,
    ) -> None:
        """Pre-TLS phase: the PROXY header from a trusted balancer, the front end's preamble, TLS.

        The PROXY header, the negotiation and the TLS handshake together must end within
        listen.handshake_timeout of accept (and the startup packet follow within startup_timeout of
        it, the session's timer): a peer trickling bytes gets no fresh budget at each step."""
        timeout = self.config.listen.handshake_timeout
        deadline = min(asyncio.get_running_loop().time() + timeout, pending.startup_deadline)
        source: str | None = f"{peer[0]}:{peer[1]}"
        started = False
        try:
            if proxied:
                source = await self._proxied_source(sock, peer, pending, deadline)
            if source is None:
                return
            async with asyncio.timeout_at(deadline):
                encryption = await frontend.preamble(sock, source, self)
            if encryption is not Encryption.NONE:
                started = await self._start_tls_session(
                    frontend, sock, source, pending, deadline, direct=encryption is Encryption.DIRECT
                )
        except TimeoutError:
            self.preauth_log("handshake_timeout", source=source, timeout_s=timeout)
        except ProtocolViolation as exc:
            self.preauth_log("handshake_protocol_error", source=source, error=str(exc))
        except OSError as exc:
            self.preauth_log("handshake_failed", source=source, error=str(exc))
        finally:
            # Cancelled (dropped by the caps, or shutdown) included; a started session owns both.
            if not started:
                pending.finish()
            if sock.fileno() != -1:
                sock.close()

    async def _proxied_source(
        self, sock: socket.socket, peer: tuple[str, int], pending: PendingStartup, deadline: float
    ) -> str | None:
        """The terminal's address from the PROXY header a trusted balancer sends first; None: refused."""
        settings = self.config.listen.proxy_protocol
        balancer = f"{peer[0]}:{peer[1]}"
        header_deadline = min(asyncio.get_running_loop().time() + settings.header_timeout, deadline)
        try:
            async with asyncio.timeout_at(header_deadline):
                header = await _receive_proxy_header(sock)
        except TimeoutError:
            self.refuse_proxy_header(balancer, "timeout", f"no header within {settings.header_timeout:g}s")
            return None
        except ProxyHeaderError as exc:
            self.refuse_proxy_header(balancer, exc.problem.value, str(exc))
            return None
        if header is None:
            return None  # closed before a byte: a balancer's plain TCP health check
        host, port = header.source or peer
        if not self._admit_source(host):
            return None
        self._drop_pending(self._pending.move(pending, host))
        return f"{host}:{port}"

    def refuse_proxy_header(self, peer: str, reason: str, error: str) -> None:
        self.metrics.client_connections_refused_total.labels(f"proxy header {reason}").inc()
        if self.preauth_log("proxy_header_refused", warning=True, source=peer, reason=reason, error=error):
            self._audit("connection_refused", "failure", source=peer, reason=f"PROXY header: {error}")

    async def _start_tls_session(
        self,
        frontend: _PostgresFrontend,
        sock: socket.socket,
        source: str,
        pending: PendingStartup,
        deadline: float,
        *,
        direct: bool,
    ) -> bool:
        """The TLS handshake, by ``deadline`` (loop time); True once the session owns the connection
        (and ``pending``) from then on."""
        session = frontend.create_session(self._environment, source, pending, direct_tls=direct)
        started = time.monotonic()
        try:
            await accept_tls(
                sock,
                session,
                self._terminal_tls.context,
                handshake_timeout=max(0.0, deadline - asyncio.get_running_loop().time()),
                shutdown_timeout=_TLS_SHUTDOWN_TIMEOUT,
            )
        except ssl.SSLError as exc:
            reason = exc.verify_message if isinstance(exc, ssl.SSLCertVerificationError) else exc.reason
            self.metrics.tls_handshake_failures_total.labels(
                "certificate" if isinstance(exc, ssl.SSLCertVerificationError) else "tls"
            ).inc()
            reason = reason or str(exc)
            if self.preauth_log("tls_handshake_failed", warning=True, source=source, reason=reason):
                self._audit("connection_refused", "failure", source=source, reason=f"TLS: {reason}")
            return False
        except (OSError, TimeoutError) as exc:
            self.metrics.tls_handshake_failures_total.labels("network").inc()
            self.preauth_log("tls_handshake_failed", source=source, reason=str(exc) or type(exc).__name__)
            return False
        except Exception as exc:
            # The session could not start on a finished handshake (say a certificate OpenSSL
            # verified that the identity code cannot read): the connection is already closed.
            log.error("session_start_failed", source=source, error=repr(exc))
            self._audit("connection_refused", "failure", source=source, reason=f"session start: {exc}")
            return False
        self.metrics.tls_handshake_seconds.observe(time.monotonic() - started)
        if session.identity is not None and self._terminal_tls.revokes(session.identity.serial):
            # An expired CRL is kept (tls.expired_crl: keep-last): OpenSSL does not see it, we do.
            log.warning(
                "tls_handshake_failed", source=source, reason="certificate revoked (expired CRL kept)"
            )
            session.terminate(
                AuthenticationRefused("the terminal certificate has been revoked"), "certificate revoked"
            )
        return True


def audit_after_reload(
    running: AuditConfig | None, wanted: AuditConfig | None
) -> tuple[AuditConfig | None, list[str]]:
    """The audit section a reload runs with, and the keys it asked to change in vain.

    Where and how the log is written (file, key, witness, stdout, rotation, flush interval) is the
    writer process's and stays until a restart: switching files at a reload would have to carry the
    chain into a file that may hold another one, and a new key would leave records no single key
    verifies; starting or stopping the log at a reload is refused as well. Only the sampling shares
    of allowed statements follow the reload. The running settings stay in the config the proxy
    keeps, so every later reload of the same file says again what it did not apply."""
    if running == wanted:
        return wanted, []
    if running is None or wanted is None:
        return running, ["audit"]
    not_applied = [
        f"audit.{item.name}"
        for item in dataclasses.fields(running.settings)
        if getattr(running.settings, item.name) != getattr(wanted.settings, item.name)
    ]
    return dataclasses.replace(wanted, settings=running.settings), not_applied


def _shared_limit_store(config: Config, metrics: Metrics) -> RedisSharedLimits | None:
    if config.limits.shared is None:
        return None
    # Imported only when configured: the redis package is an optional extra.
    from proxy.sharedlimits import RedisSharedLimits  # noqa: PLC0415

    return RedisSharedLimits(config.limits.shared, metrics)


def _file_stamp(path: Path | None) -> tuple[int, int, int, int] | None:
    """What changes whenever a file is replaced or rewritten, even with its old mtime put back
    (cp -p, rsync -t): the change time cannot be set from user space."""
    try:
        info = path.stat() if path is not None else None
    except OSError:
        return None
    return (info.st_mtime_ns, info.st_ctime_ns, info.st_size, info.st_ino) if info is not None else None


def _close_unless_handed_over(sock: socket.socket, _task: asyncio.Task[None]) -> None:
    """A negotiation task cancelled before its first step (dropped by the pre-authentication caps
    in the same burst of accepts) never reached the code that closes its socket."""
    if sock.fileno() != -1:
        sock.close()


async def _receive_proxy_header(sock: socket.socket) -> ProxyHeader | None:
    """Consume exactly the PROXY header at the start of ``sock``; None at EOF before its first byte.

    Peeks, so the bytes after the header stay for the TLS layer. Bytes the codec wants more after are
    all part of the header, so they are consumed as they come (a level-triggered reader on bytes left
    waiting would spin); each round consumes at least one byte, and the header is at most 64 KiB.
    """
    received = bytearray()
    while True:
        await readable(sock)
        waiting = sock.recv(_HEADER_PEEK_SIZE, socket.MSG_PEEK)
        if not waiting:
            if not received:
                return None
            raise ProxyHeaderError(HeaderProblem.MALFORMED, "the connection closed inside the header")
        header = parse_proxy_header(received + waiting)
        if header is not None:
            await recv_exactly(sock, header.length - len(received))
            return header
        received += await recv_exactly(sock, len(waiting))


async def serve(config: Config, worker: WorkerSlot | None = None) -> int:
    """Run the proxy (or one supervised worker) until SIGTERM or SIGINT; return the exit code."""
    server = ProxyServer(config, worker)
    try:
        await server.start()
    except BaseException:
        await server.shutdown()  # stops the audit writer, which would keep the process alive
        raise
    server.install_signal_handlers()
    await server.wait_stopped()
    return server.exit_code
