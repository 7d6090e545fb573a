"""Every Prometheus metric, defined once (prometheus-client), low-cardinality labels only."""

from __future__ import annotations

from bisect import bisect_left
from importlib import machinery, metadata, util
from pathlib import Path
from typing import Final

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    generate_latest,
)
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead

__all__ = ["CONTENT_TYPE", "LATENCY_BUCKETS", "BatchedHistogram", "FleetMetrics", "Metrics"]

# What render() produces; the admin API sends it as the Content-Type of /metrics.
CONTENT_TYPE: Final = CONTENT_TYPE_LATEST
# From a fast LAN round trip (0.5 ms) to a slow WAN statement or handshake (10 s).
LATENCY_BUCKETS: Final = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)


# One of the modules a compiled build (setup.py, POS_PROXY_COMPILE=1) ships as a C extension.
_COMPILED_WITNESS: Final = "proxy.protocols.postgres.session"


def build_labels() -> dict[str, str]:
    """``version`` of the package and ``build``: ``mypyc`` when the data path runs compiled."""
    try:
        version = metadata.version("pos-db-proxy")
    except metadata.PackageNotFoundError:
        version = "unknown"
    spec = util.find_spec(_COMPILED_WITNESS)
    origin = (spec.origin if spec is not None else None) or ""
    build = "mypyc" if origin.endswith(tuple(machinery.EXTENSION_SUFFIXES)) else "pure"
    return {"version": version, "build": build}


class Metrics:
    """The proxy's metrics in a registry of their own (the server makes one; tests make fresh ones).

    Labels are roles, routes, reasons, decisions and other small fixed sets: never terminal or store
    identities or statement text, which would make a series per till or per query.
    """

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        registry = self.registry

        self.client_connections_active = Gauge(
            "pos_proxy_client_connections_active",
            "Client connections open now.",
            ["role"],
            registry=registry,
            multiprocess_mode="livesum",
        )
        self.client_connections_total = Counter(
            "pos_proxy_client_connections_total", "Client connections accepted.", ["role"], registry=registry
        )
        self.client_connections_refused_total = Counter(
            "pos_proxy_client_connections_refused_total",
            "Client connections refused before a session started.",
            ["reason"],
            registry=registry,
        )
        self.tls_handshake_seconds = Histogram(
            "pos_proxy_tls_handshake_seconds",
            "Duration of client TLS handshakes that completed.",
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.tls_handshake_failures_total = Counter(
            "pos_proxy_tls_handshake_failures_total",
            "Client TLS handshakes that failed.",
            ["reason"],
            registry=registry,
        )
        self.statements_total = Counter(
            "pos_proxy_statements_total",
            "Statements received from clients, by policy decision.",
            ["role", "decision"],
            registry=registry,
        )
        self.statement_seconds = Histogram(
            "pos_proxy_statement_seconds",
            "Time from a statement's arrival to the end of its result.",
            ["role"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.pool_server_connections = Gauge(
            "pos_proxy_pool_server_connections",
            "Server connections of a route's pool, by state (active, idle, opening).",
            ["route", "state"],
            registry=registry,
            multiprocess_mode="livesum",
        )
        self.pool_clients_waiting = Gauge(
            "pos_proxy_pool_clients_waiting",
            "Clients waiting for a server connection.",
            ["route"],
            registry=registry,
            multiprocess_mode="livesum",
        )
        self.pool_wait_seconds = Histogram(
            "pos_proxy_pool_wait_seconds",
            "Time clients waited for a server connection.",
            ["route"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.server_connection_errors_total = Counter(
            "pos_proxy_server_connection_errors_total",
            "Failed attempts to open a server connection.",
            ["route"],
            registry=registry,
        )
        self.server_connections_opened_total = Counter(
            "pos_proxy_server_connections_opened_total",
            "Server connections opened.",
            ["route"],
            registry=registry,
        )
        self.upstream_up = Gauge(
            "pos_proxy_upstream_up",
            "1 while a route's server is reachable, 0 from a failed connect until one succeeds again.",
            ["route"],
            registry=registry,
            # With --workers: up only while every live worker reaches it.
            multiprocess_mode="livemin",
        )
        self.upstream_down_total = Counter(
            "pos_proxy_upstream_down_total",
            "Times a route's server became unreachable (connects failing for a transient reason).",
            ["route"],
            registry=registry,
        )
        self.limit_hits_total = Counter(
            "pos_proxy_limit_hits_total",
            "Connections, statements and results refused by a limit.",
            ["limit"],
            registry=registry,
        )
        self.prepared_statement_cache_total = Counter(
            "pos_proxy_prepared_statement_cache_total",
            "Prepared statement cache lookups, by result (hit, miss).",
            ["result"],
            registry=registry,
        )
        self.policy_decisions_total = Counter(
            "pos_proxy_policy_decisions_total",
            "Policy decisions, by the rule that decided.",
            ["role", "rule"],
            registry=registry,
        )
        self.audit_records_total = Counter(
            "pos_proxy_audit_records_total", "Audit records written.", registry=registry
        )
        self.audit_write_errors_total = Counter(
            "pos_proxy_audit_write_errors_total",
            "Audit records that could not be written.",
            registry=registry,
        )
        self.config_reloads_total = Counter(
            "pos_proxy_config_reloads_total",
            "Configuration reloads, by result (ok, failed).",
            ["result"],
            registry=registry,
        )
        self.crl_expired = Gauge(
            "pos_proxy_crl_expired",
            "1 while the terminal CRL in force is past its nextUpdate and no fresh one has been loaded.",
            registry=registry,
            multiprocess_mode="livemax",
        )
        self.crl_next_update_timestamp_seconds = Gauge(
            "pos_proxy_crl_next_update_timestamp_seconds",
            "The nextUpdate of the terminal CRL in force (Unix time; 0 without a CRL).",
            registry=registry,
            multiprocess_mode="livemin",
        )
        self.sessions_pinned_total = Counter(
            "pos_proxy_sessions_pinned_total",
            "Client sessions pinned to one server connection (session state the pool cannot reset).",
            ["route"],
            registry=registry,
        )
        # Only a proxy with limits.shared has the series; the label is its on_unavailable setting.
        # Over several worker processes: 0 as soon as one live worker cannot reach the store.
        self.shared_limits_available = Gauge(
            "pos_proxy_shared_limits_available",
            "1 while the shared limit store (Redis, limits.shared) answers; 0 while its fallback applies.",
            ["fallback"],
            registry=registry,
            multiprocess_mode="livemin",
        )
        self.shared_limit_lease_refills_total = Counter(
            "pos_proxy_shared_limit_lease_refills_total",
            "Token leases refilled from the shared store, by result (granted; short: bucket empty).",
            ["result"],
            registry=registry,
        )
        self.shared_limit_store_failures_total = Counter(
            "pos_proxy_shared_limit_store_failures_total",
            "Shared limit store calls that failed or timed out, by operation (lease, connection, sync).",
            ["operation"],
            registry=registry,
        )
        self.internal_errors_total = Counter(
            "pos_proxy_internal_errors_total",
            "Errors in the proxy that nothing handled (each also an internal_error log event): bugs.",
            registry=registry,
        )
        self.build_info = Info(
            "pos_proxy_build", "The running proxy's version and build (pure or mypyc).", registry=registry
        )
        self.build_info.info(build_labels())

        # Series of the fixed label sets exist from the start at 0, so rate() and alerts see the
        # first event instead of a series appearing out of nowhere.
        for result in ("ok", "failed"):
            self.config_reloads_total.labels(result=result)
        for result in ("hit", "miss"):
            self.prepared_statement_cache_total.labels(result=result)
        for result in ("granted", "short"):
            self.shared_limit_lease_refills_total.labels(result=result)
        for operation in ("lease", "connection", "sync"):
            self.shared_limit_store_failures_total.labels(operation=operation)

        self._batched: dict[tuple[int, tuple[str, ...]], BatchedHistogram] = {}

    def batched(self, histogram: Histogram, *labels: str) -> BatchedHistogram:
        """The data path's way to observe ``histogram`` with ``labels`` (one per label set)."""
        key = (id(histogram), labels)
        batched = self._batched.get(key)
        if batched is None:
            batched = self._batched[key] = BatchedHistogram(histogram.labels(*labels))
        return batched

    def fold_batched(self) -> None:
        """Fold what the data path counted into the histograms (at each render, and at shutdown)."""
        for batched in self._batched.values():
            batched.fold()

    def render(self) -> bytes:
        """The Prometheus text exposition of every metric, served as CONTENT_TYPE."""
        self.fold_batched()
        return generate_latest(self.registry)


class BatchedHistogram:
    """Observations of one histogram child counted in plain Python and folded into it when the
    metrics are rendered (by this process: with --workers each one renders into the shared
    directory when the supervisor asks) and when the proxy shuts down; a process that dies
    loses what it counted since.

    ``Histogram.observe`` takes a lock twice and walks the buckets, about 1.1 us, once per
    statement on the data path; this is a bisect and two additions. The fold writes to the
    child's bucket and sum values, prometheus-client's own attributes: tests/unit/test_metrics.py
    checks that the exposition is the one ``observe`` gives.
    """

    __slots__ = ("_bounds", "_child", "_counts", "_sum")

    def __init__(self, child: Histogram) -> None:
        self._child = child
        self._bounds: list[float] = child._upper_bounds
        self._counts = [0] * len(self._bounds)
        self._sum = 0.0

    def observe(self, amount: float) -> None:
        # The first bucket whose upper bound is at least ``amount``, as Histogram.observe counts.
        self._counts[bisect_left(self._bounds, amount)] += 1
        self._sum += amount

    def fold(self) -> None:
        child = self._child
        for index, count in enumerate(self._counts):
            if count:
                child._buckets[index].inc(count)
                self._counts[index] = 0
        if self._sum:
            child._sum.inc(self._sum)
            self._sum = 0.0


class FleetMetrics:
    """The supervisor's /metrics with several workers: every worker's metrics, summed, plus its own.

    Workers run with PROMETHEUS_MULTIPROC_DIR set, so each value of ``Metrics`` lives in a file per
    process there: counters and histograms of dead workers still count (their totals do not go back),
    and the gauges above are ``livesum``: the sum over the workers alive (``mark_process_dead`` drops a
    dead worker's). ``pos_proxy_build`` (an Info, which multiprocess mode cannot hold) is the supervisor's.
    """

    def __init__(self, multiprocess_dir: Path) -> None:
        self.registry = CollectorRegistry()
        self.multiprocess_dir = multiprocess_dir
        # prometheus-client's multiprocess module has no type hints.
        MultiProcessCollector(self.registry, path=str(multiprocess_dir))  # type: ignore[no-untyped-call]
        self.workers_alive = Gauge(
            "pos_proxy_workers_alive", "Worker processes running now.", registry=self.registry
        )
        self.worker_restarts_total = Counter(
            "pos_proxy_worker_restarts_total",
            "Worker processes the supervisor restarted after they died.",
            registry=self.registry,
        )
        self.build_info = Info(
            "pos_proxy_build",
            "The running proxy's version and build (pure or mypyc).",
            registry=self.registry,
        )
        self.build_info.info(build_labels())

    def forget_worker(self, pid: int) -> None:
        """A worker died: its live gauges no longer count (its counters still do)."""
        mark_process_dead(pid, str(self.multiprocess_dir))  # type: ignore[no-untyped-call]

    def render(self) -> bytes:
        return generate_latest(self.registry)
