"""Every Prometheus metric, defined once (prometheus-client), low-cardinality labels only."""

from __future__ import annotations

import os
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
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead
from prometheus_client.registry import Collector

__all__ = [
    "CONTENT_TYPE",
    "ERROR_SOURCES",
    "LATENCY_BUCKETS",
    "BatchedHistogram",
    "FleetMetrics",
    "Metrics",
    "WorkerProcessCollector",
    "sqlstate_label",
]

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


# Who raised an error a client was sent: the database server, or the proxy (its refusals and limits,
# though the server raises a refusal, are the proxy's).
ERROR_SOURCES: Final = ("server", "proxy")

# The SQLSTATE classes of PostgreSQL 15 (Appendix A, errcodes.txt). An error code is its own label
# only when it is one of _NAMED_SQLSTATES; any other code of a known class counts under that class's
# generic code ("23" -> "23000"), and a code of no known class (a PL/pgSQL RAISE may set any five
# characters) under "other", so no client can make a series per code it invents.
_SQLSTATE_CLASSES: Final = frozenset(
    {
        "00",
        "01",
        "02",
        "03",
        "08",
        "09",
        "0A",
        "0B",
        "0F",
        "0L",
        "0P",
        "0Z",
        "20",
        "21",
        "22",
        "23",
        "24",
        "25",
        "26",
        "27",
        "28",
        "2B",
        "2D",
        "2F",
        "34",
        "38",
        "39",
        "3B",
        "3D",
        "3F",
        "40",
        "42",
        "44",
        "53",
        "54",
        "55",
        "57",
        "58",
        "72",
        "F0",
        "HV",
        "P0",
        "XX",
    }
)
# The codes a point-of-sale operator tells apart: every one the proxy itself sends (proxy/errors.py,
# policy, limits, refusals), and the server's common ones (conflicts, constraint violations,
# cancellation, shutdown, resources).
_NAMED_SQLSTATES: Final = frozenset(
    {
        # the proxy's own
        "08P01",
        "28000",
        "3D000",
        "53300",
        "08001",
        "08006",
        "57P01",
        "0A000",
        "42501",
        "25P03",
        "42601",
        "22021",
        "54001",
        "54000",
        "53400",
        "26000",
        "42939",
        "57014",
        "XX000",
        # the server's common ones
        "40001",
        "40P01",
        "23505",
        "23503",
        "23502",
        "23514",
        "25P02",
        "25006",
        "55P03",
        "55000",
        "42P01",
        "42703",
        "42883",
        "42P05",
        "42P18",
        "22P02",
        "22001",
        "22003",
        "22007",
        "22012",
        "53200",
        "53100",
        "57P02",
        "57P03",
        "28P01",
        "34000",
        "P0001",
    }
)


def sqlstate_label(sqlstate: str) -> str:
    """The ``sqlstate`` label of an error: a small fixed set of values whatever a client raises."""
    if sqlstate in _NAMED_SQLSTATES:
        return sqlstate
    if len(sqlstate) == 5 and sqlstate[:2] in _SQLSTATE_CLASSES:
        return sqlstate[:2] + "000"
    return "other"


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
        self.statements_running_long = Gauge(
            "pos_proxy_statements_running_long",
            "Statements running now for longer than admin.long_statement_after (default 30 s), by route.",
            ["route"],
            registry=registry,
            multiprocess_mode="livesum",
        )
        self.client_errors_total = Counter(
            "pos_proxy_client_errors_total",
            "Errors sent to clients, by who raised them (server, proxy) and SQLSTATE (the code for common "
            "ones, else its class's generic code CC000, else other).",
            ["source", "sqlstate"],
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
        # Over several worker processes: 0 as soon as one live worker's log file takes no records.
        self.audit_log_writable = Gauge(
            "pos_proxy_audit_log_writable",
            "1 while the audit log file takes records; 0 while it does not (full or unwritable disk).",
            registry=registry,
            multiprocess_mode="livemin",
        )
        # Not a label of the gauge above: a mode changed by a reload would leave a stale series in
        # the workers' multiprocess files.
        self.audit_refusing_statements = Gauge(
            "pos_proxy_audit_refusing_statements",
            "1 while statements are refused because the audit log file takes no records "
            "(audit.on_write_failure: refuse); 0 otherwise.",
            registry=registry,
            multiprocess_mode="livemax",
        )
        self.audit_records_dropped_total = Counter(
            "pos_proxy_audit_records_dropped_total",
            "Audit records dropped while the log file took none and audit.max_held_records were held.",
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
        # process_resident_memory_bytes, process_open_fds, process_max_fds, process_cpu_seconds_total
        # and the rest, of this process (Linux /proc; nothing elsewhere). prometheus-client registers
        # one only in its global registry, which the admin API does not serve.
        ProcessCollector(registry=registry)

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
        for source in ERROR_SOURCES:
            self.client_errors_total.labels(source, "other")

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

    def client_error(self, source: str, sqlstate: str) -> None:
        """An ErrorResponse went to a client (``source``: one of ERROR_SOURCES)."""
        self.client_errors_total.labels(source, sqlstate_label(sqlstate)).inc()

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

        # The supervisor's own process_* series, and each live worker's memory and descriptors: the
        # multiprocess files hold metric values only, so the supervisor reads the workers' /proc.
        ProcessCollector(registry=self.registry)
        self.worker_processes = WorkerProcessCollector()
        self.registry.register(self.worker_processes)

    def forget_worker(self, pid: int) -> None:
        """A worker died: its live gauges no longer count (its counters still do)."""
        mark_process_dead(pid, str(self.multiprocess_dir))  # type: ignore[no-untyped-call]

    def render(self) -> bytes:
        return generate_latest(self.registry)


class WorkerProcessCollector(Collector):
    """Resident memory and open descriptors of each live worker, labelled by its slot (0, 1, ...).

    prometheus-client's ProcessCollector reports one process without labels; the supervisor sets
    ``workers`` (slot -> pid) as workers start and stop. Values come from /proc (Linux); a worker
    that has just exited, or another OS, gives no sample rather than an error.
    """

    def __init__(self, proc: Path = Path("/proc")) -> None:
        self.workers: dict[int, int] = {}
        self._proc = proc
        self._page_size = _page_size()

    def collect(self) -> list[Metric]:
        memory = GaugeMetricFamily(
            "pos_proxy_worker_resident_memory_bytes",
            "Resident memory of each worker process.",
            labels=["worker"],
        )
        descriptors = GaugeMetricFamily(
            "pos_proxy_worker_open_fds", "Open file descriptors of each worker process.", labels=["worker"]
        )
        for slot, pid in sorted(self.workers.items()):
            directory = self._proc / str(pid)
            try:
                # /proc/PID/statm: size resident shared ... in pages.
                resident_pages = int((directory / "statm").read_text(encoding="ascii").split()[1])
                open_fds = sum(1 for _ in (directory / "fd").iterdir())
            except (OSError, IndexError, ValueError):
                continue
            memory.add_metric([str(slot)], resident_pages * self._page_size)
            descriptors.add_metric([str(slot)], open_fds)
        return [memory, descriptors]


def _page_size() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 4096
