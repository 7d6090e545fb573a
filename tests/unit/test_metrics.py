"""proxy.metrics: values move, render() shows them, instances are independent, labels as documented."""

from __future__ import annotations

import os
from importlib import metadata
from pathlib import Path

import pytest
from prometheus_client import Counter, Gauge, Histogram, Info
from prometheus_client.parser import text_string_to_metric_families

from proxy.metrics import CONTENT_TYPE, LATENCY_BUCKETS, Metrics, WorkerProcessCollector, sqlstate_label
from tests import compiled

# attribute -> (type, label names), exactly as documented for the lead's wiring.
DOCUMENTED: dict[str, tuple[type, tuple[str, ...]]] = {
    "client_connections_active": (Gauge, ("role",)),
    "client_connections_total": (Counter, ("role",)),
    "client_connections_refused_total": (Counter, ("reason",)),
    "tls_handshake_seconds": (Histogram, ()),
    "tls_handshake_failures_total": (Counter, ("reason",)),
    "statements_total": (Counter, ("role", "decision")),
    "statement_seconds": (Histogram, ("role",)),
    "pool_server_connections": (Gauge, ("route", "state")),
    "pool_clients_waiting": (Gauge, ("route",)),
    "pool_wait_seconds": (Histogram, ("route",)),
    "server_connection_errors_total": (Counter, ("route",)),
    "server_connections_opened_total": (Counter, ("route",)),
    "limit_hits_total": (Counter, ("limit",)),
    "prepared_statement_cache_total": (Counter, ("result",)),
    "policy_decisions_total": (Counter, ("role", "rule")),
    "audit_records_total": (Counter, ()),
    "audit_write_errors_total": (Counter, ()),
    "audit_log_writable": (Gauge, ()),
    "audit_refusing_statements": (Gauge, ()),
    "audit_records_dropped_total": (Counter, ()),
    "config_reloads_total": (Counter, ("result",)),
    "sessions_pinned_total": (Counter, ("route",)),
    "shared_limits_available": (Gauge, ("fallback",)),
    "shared_limit_lease_refills_total": (Counter, ("result",)),
    "shared_limit_store_failures_total": (Counter, ("operation",)),
    "upstream_up": (Gauge, ("route",)),
    "upstream_down_total": (Counter, ("route",)),
    "crl_expired": (Gauge, ()),
    "crl_next_update_timestamp_seconds": (Gauge, ()),
    "internal_errors_total": (Counter, ()),
    "statements_running_long": (Gauge, ("route",)),
    "client_errors_total": (Counter, ("source", "sqlstate")),
    "build_info": (Info, ()),
}
# prometheus-client's process collector (Linux /proc): the only series without the prefix.
PROCESS_FAMILIES = {
    "process_virtual_memory_bytes",
    "process_resident_memory_bytes",
    "process_start_time_seconds",
    "process_cpu_seconds",
    "process_open_fds",
    "process_max_fds",
}
FORBIDDEN_LABELS = {"terminal", "store", "query", "fingerprint", "sql"}


def families(metrics: Metrics) -> dict[str, list[tuple[str, dict[str, str], float]]]:
    """From the registry: family name -> [(sample name, labels, value)]."""
    return {
        family.name: [(sample.name, sample.labels, sample.value) for sample in family.samples]
        for family in metrics.registry.collect()
    }


def value(metrics: Metrics, sample_name: str, **labels: str) -> float | None:
    """A sample's value as render() shows it, None if it is not shown."""
    for family in text_string_to_metric_families(metrics.render().decode()):
        for sample in family.samples:
            if sample.name == sample_name and sample.labels == labels:
                return sample.value
    return None


def touch_everything(metrics: Metrics) -> None:
    """One observation on every metric, through exactly its documented label names."""
    for attribute, (kind, label_names) in DOCUMENTED.items():
        metric = getattr(metrics, attribute)
        if kind is Info:
            continue
        child = metric.labels(**{name: "x" for name in label_names}) if label_names else metric
        if kind is Gauge:
            child.set(1)
        elif kind is Counter:
            child.inc()
        else:
            child.observe(0.01)


def test_values_move_and_render_shows_them() -> None:
    metrics = Metrics()
    metrics.client_connections_active.labels(role="cashier").inc()
    metrics.client_connections_active.labels(role="cashier").inc()
    metrics.client_connections_active.labels(role="cashier").dec()
    metrics.statements_total.labels(role="cashier", decision="allowed").inc(3)
    metrics.limit_hits_total.labels(limit="statements per terminal").inc()
    metrics.pool_server_connections.labels(route="pos", state="idle").set(4)
    metrics.tls_handshake_seconds.observe(0.003)
    metrics.audit_records_total.inc(2)

    assert value(metrics, "pos_proxy_client_connections_active", role="cashier") == 1
    assert value(metrics, "pos_proxy_statements_total", role="cashier", decision="allowed") == 3
    assert value(metrics, "pos_proxy_limit_hits_total", limit="statements per terminal") == 1
    assert value(metrics, "pos_proxy_pool_server_connections", route="pos", state="idle") == 4
    assert value(metrics, "pos_proxy_tls_handshake_seconds_count") == 1
    assert value(metrics, "pos_proxy_tls_handshake_seconds_bucket", le="0.005") == 1
    assert value(metrics, "pos_proxy_tls_handshake_seconds_bucket", le="0.0025") == 0
    assert value(metrics, "pos_proxy_audit_records_total") == 2
    assert b'pos_proxy_statements_total{decision="allowed",role="cashier"} 3.0' in metrics.render()


def test_fixed_label_sets_start_at_zero() -> None:
    metrics = Metrics()
    for result in ("ok", "failed"):
        assert value(metrics, "pos_proxy_config_reloads_total", result=result) == 0
    for result in ("hit", "miss"):
        assert value(metrics, "pos_proxy_prepared_statement_cache_total", result=result) == 0


def test_build_info_carries_the_package_version_and_build() -> None:
    try:
        expected = metadata.version("pos-db-proxy")
    except metadata.PackageNotFoundError:
        expected = "unknown"
    build = "mypyc" if compiled.expected() else "pure"
    assert value(Metrics(), "pos_proxy_build_info", version=expected, build=build) == 1


def test_every_metric_is_prefixed() -> None:
    metrics = Metrics()
    touch_everything(metrics)
    ours = {name for name in families(metrics) if name not in PROCESS_FAMILIES}
    assert len(ours) == len(DOCUMENTED)
    samples = [line for line in metrics.render().decode().splitlines() if not line.startswith("#")]
    assert samples
    assert all(line.startswith("pos_proxy_") or line.startswith("process_") for line in samples)


@pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="the process collector reads Linux /proc")
def test_the_registry_the_admin_api_serves_has_this_process_memory_and_descriptors() -> None:
    metrics = Metrics()
    resident = value(metrics, "process_resident_memory_bytes")
    open_fds = value(metrics, "process_open_fds")
    max_fds = value(metrics, "process_max_fds")
    assert resident is not None and 10 * 2**20 < resident < 4 * 2**30
    assert open_fds is not None and max_fds is not None and 3 <= open_fds < max_fds


def test_sqlstate_labels_are_a_small_fixed_set_whatever_a_client_raises() -> None:
    assert sqlstate_label("42501") == "42501"  # a policy refusal: named
    assert sqlstate_label("53400") == "53400"
    assert sqlstate_label("40P01") == "40P01"
    assert sqlstate_label("22023") == "22000"  # a known class, an unnamed code: the class's generic code
    assert sqlstate_label("P0004") == "P0000"
    # RAISE ... USING ERRCODE may set any five characters; nothing else is a SQLSTATE.
    for invented in ("ZZ999", "AB123", "", "4250", "425011", "xx000", "42501\n"):
        assert sqlstate_label(invented) == "other", invented
    metrics = Metrics()
    metrics.client_error("server", "ZZ999")
    metrics.client_error("server", "23505")
    metrics.client_error("proxy", "42501")
    assert value(metrics, "pos_proxy_client_errors_total", source="server", sqlstate="other") == 1
    assert value(metrics, "pos_proxy_client_errors_total", source="server", sqlstate="23505") == 1
    assert value(metrics, "pos_proxy_client_errors_total", source="proxy", sqlstate="42501") == 1
    assert value(metrics, "pos_proxy_client_errors_total", source="proxy", sqlstate="other") == 0


def test_worker_processes_are_read_from_proc(tmp_path: Path) -> None:
    collector = WorkerProcessCollector(proc=tmp_path)
    for pid, pages, fds in ((101, 2560, 3), (102, 5120, 0)):
        (tmp_path / str(pid) / "fd").mkdir(parents=True)
        (tmp_path / str(pid) / "statm").write_text(f"99999 {pages} 100 1 0 200 0\n", encoding="ascii")
        for fd in range(fds):
            (tmp_path / str(pid) / "fd" / str(fd)).touch()
    collector.workers = {0: 101, 1: 102, 2: 103}  # 103 has just exited: no sample, no error
    found = {
        family.name: {sample.labels["worker"]: sample.value for sample in family.samples}
        for family in collector.collect()
    }
    page = os.sysconf("SC_PAGE_SIZE")
    assert found == {
        "pos_proxy_worker_resident_memory_bytes": {"0": 2560 * page, "1": 5120 * page},
        "pos_proxy_worker_open_fds": {"0": 3, "1": 0},
    }


def test_two_instances_do_not_clash() -> None:
    first, second = Metrics(), Metrics()
    first.client_connections_total.labels(role="cashier").inc()
    first.config_reloads_total.labels(result="ok").inc()
    assert value(first, "pos_proxy_client_connections_total", role="cashier") == 1
    assert value(second, "pos_proxy_client_connections_total", role="cashier") is None
    assert value(second, "pos_proxy_config_reloads_total", result="ok") == 0


def test_label_sets_are_exactly_as_documented() -> None:
    metrics = Metrics()
    touch_everything(metrics)
    by_family = families(metrics)
    for attribute, (kind, label_names) in DOCUMENTED.items():
        assert isinstance(getattr(metrics, attribute), kind), attribute
        family = getattr(metrics, attribute).describe()[0].name
        if kind is Info:
            expected = {"version", "build"}
        else:
            expected = set(label_names) | ({"le"} if kind is Histogram else set())
        seen = {frozenset(labels) for name, labels, _ in by_family[family] if not name.endswith("_created")}
        # Every sample carries exactly these labels, except a histogram's _sum and _count (no "le").
        assert frozenset(expected) in seen, attribute
        assert all(labels <= expected for labels in seen), attribute


def test_no_metric_is_labelled_by_terminal_store_or_statement() -> None:
    metrics = Metrics()
    touch_everything(metrics)
    labels = {
        name
        for samples in families(metrics).values()
        for _, sample_labels, _ in samples
        for name in sample_labels
    }
    assert not labels & FORBIDDEN_LABELS


def test_wrong_label_names_are_refused() -> None:
    with pytest.raises(ValueError):
        Metrics().statements_total.labels(role="cashier", terminal="till-01")


def test_latency_buckets_cover_lan_to_wan() -> None:
    assert LATENCY_BUCKETS[0] == 0.0005
    assert LATENCY_BUCKETS[-1] == 10.0
    assert list(LATENCY_BUCKETS) == sorted(LATENCY_BUCKETS)


def test_content_type_is_the_text_exposition_format() -> None:
    assert CONTENT_TYPE.startswith("text/plain")


def exposed(metrics: Metrics) -> list[str]:
    """render()'s lines without creation times, which differ between two Metrics, and without the
    process's own figures (CPU seconds, memory), which move between two renders."""
    return [
        line
        for line in metrics.render().decode().splitlines()
        if "_created" not in line and not line.startswith("process_")
    ]


LATENCIES = [0.0, 0.0001, 0.0005, 0.00051, 0.003, 0.25, 0.2500001, 10.0, 10.5, 3600.0]


def test_batched_observations_render_as_observe_would_have_them() -> None:
    direct, batched = Metrics(), Metrics()
    for seconds in LATENCIES:
        direct.statement_seconds.labels("cashier").observe(seconds)
        batched.batched(batched.statement_seconds, "cashier").observe(seconds)
    # Counted, not folded in yet.
    assert value(direct, "pos_proxy_statement_seconds_count", role="cashier") == len(LATENCIES)
    assert {
        sample[2]
        for sample in families(batched)["pos_proxy_statement_seconds"]
        if not sample[0].endswith("_created")
    } == {0.0}
    assert exposed(batched) == exposed(direct)
    # Folded once: rendering again adds nothing; later observations add to what is there.
    assert exposed(batched) == exposed(direct)
    direct.statement_seconds.labels("cashier").observe(0.002)
    batched.batched(batched.statement_seconds, "cashier").observe(0.002)
    assert exposed(batched) == exposed(direct)


def test_one_batched_histogram_per_metric_and_label_set() -> None:
    metrics = Metrics()
    cashier = metrics.batched(metrics.statement_seconds, "cashier")
    assert metrics.batched(metrics.statement_seconds, "cashier") is cashier
    assert metrics.batched(metrics.statement_seconds, "manager") is not cashier
    assert metrics.batched(metrics.pool_wait_seconds, "cashier") is not cashier
    cashier.observe(0.002)
    metrics.batched(metrics.pool_wait_seconds, "pos").observe(0.5)
    assert value(metrics, "pos_proxy_statement_seconds_count", role="cashier") == 1.0
    assert value(metrics, "pos_proxy_statement_seconds_count", role="manager") == 0.0
    assert value(metrics, "pos_proxy_pool_wait_seconds_bucket", route="pos", le="0.25") == 0.0
    assert value(metrics, "pos_proxy_pool_wait_seconds_bucket", route="pos", le="0.5") == 1.0


def test_fold_batched_puts_the_counts_into_the_histogram_without_a_render() -> None:
    metrics = Metrics()
    metrics.batched(metrics.pool_wait_seconds, "pos").observe(0.5)
    child = metrics.pool_wait_seconds.labels("pos")
    assert child._sum.get() == 0.0
    metrics.fold_batched()
    assert child._sum.get() == 0.5
    metrics.fold_batched()
    assert child._sum.get() == 0.5
