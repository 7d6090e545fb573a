"""config/prometheus/ (alerts, scrape config) and the Grafana dashboard: well formed, and naming only
real metrics."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from proxy.metrics import FleetMetrics, Metrics
from tests.conftest import running_in_ci

ROOT = Path(__file__).resolve().parents[2]
ALERTS = ROOT / "config" / "prometheus" / "alerts.yml"
SCRAPE_CONFIG = ROOT / "config" / "prometheus" / "prometheus.yml"
DASHBOARD = ROOT / "config" / "grafana" / "pos-db-proxy-dashboard.json"

# The proxy's own, and the process_* series of prometheus-client's process collector.
METRIC_NAME = re.compile(r"\b(?:pos_proxy|process)_[a-z_]+")
TYPE_LINE = re.compile(r"^# TYPE (\S+) (\S+)$", re.MULTILINE)

EXPECTED_ALERTS = {
    "PosProxyDown",
    "PosProxyUpstreamDown",
    "PosProxyPoolSaturated",
    "PosProxyPoolWaitHigh",
    "PosProxyAuthFailureSpike",
    "PosProxyPolicyViolationSpike",
    "PosProxyAuditWriteErrors",
    "PosProxyConfigReloadFailed",
    "PosProxyInternalErrors",
    "PosProxyLimitHits",
    "PosProxySharedLimitsUnavailable",
    "PosProxyTerminalCRLStale",
    "PosProxyStatementsRunningLong",
    "PosProxyDatabaseServerErrors",
    "PosProxyMemoryHigh",
    "PosProxyFileDescriptorsHigh",
}
SEVERITIES = {"critical", "warning", "info"}
DURATION = re.compile(r"^(\d+(ms|s|m|h|d|w|y))+$")


def _exposed_series(multiprocess_dir: Path) -> set[str]:
    """The sample names a fresh Metrics().render() (one process) and FleetMetrics().render() (the
    supervisor of several workers) can expose, read from their `# TYPE` lines.

    prometheus-client writes a counter's TYPE line as the name with `_total` (and its `_created`
    timestamp as a gauge of its own); a histogram's samples are its name plus `_bucket`, `_sum`
    and `_count`. Normalising the counter name keeps this right whichever way a version prints it.
    """
    fleet = FleetMetrics(multiprocess_dir)
    fleet.worker_processes.workers = {0: os.getpid()}
    text = Metrics().render().decode() + fleet.render().decode()
    series: set[str] = set()
    for name, kind in TYPE_LINE.findall(text):
        if kind == "counter":
            series.add(name.removesuffix("_total") + "_total")
        elif kind == "histogram":
            series.update(name + suffix for suffix in ("_bucket", "_sum", "_count"))
        else:
            series.add(name)
    return series


def _family(name: str) -> str:
    for suffix in ("_bucket", "_sum", "_count"):
        if name.endswith(suffix):
            return name.removesuffix(suffix)
    return name


@pytest.fixture(scope="module")
def exposed(tmp_path_factory: pytest.TempPathFactory) -> set[str]:
    return _exposed_series(tmp_path_factory.mktemp("multiprocess"))


@pytest.fixture(scope="module")
def rules() -> list[dict[str, Any]]:
    document = yaml.safe_load(ALERTS.read_text(encoding="utf-8"))
    groups = document["groups"]
    assert [group["name"] for group in groups] == ["pos-db-proxy"]
    return [rule for group in groups for rule in group["rules"]]


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    return loaded


def _panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    """Every panel, including those nested in collapsed rows."""
    found: list[dict[str, Any]] = []
    for panel in dashboard["panels"]:
        found.append(panel)
        found.extend(panel.get("panels", []))
    return found


def _dashboard_queries(dashboard: dict[str, Any]) -> list[str]:
    queries = [target["expr"] for panel in _panels(dashboard) for target in panel.get("targets", [])]
    for variable in dashboard["templating"]["list"]:
        query = variable.get("query")
        queries.append(query["query"] if isinstance(query, dict) else str(query))
    return queries


def test_exposed_series_cover_every_kind(exposed: set[str]) -> None:
    # The normalisation above is what the other tests rely on: check it against known names.
    assert "pos_proxy_client_connections_total" in exposed
    assert "pos_proxy_audit_write_errors_total" in exposed
    assert "pos_proxy_pool_wait_seconds_bucket" in exposed
    assert "pos_proxy_pool_clients_waiting" in exposed
    assert "pos_proxy_build_info" in exposed
    assert "pos_proxy_client_connections" not in exposed
    assert "process_resident_memory_bytes" in exposed
    assert "pos_proxy_worker_open_fds" in exposed


def test_every_expected_alert_is_defined_once(rules: list[dict[str, Any]]) -> None:
    names = [rule["alert"] for rule in rules]
    assert len(names) == len(set(names)), names
    assert set(names) == EXPECTED_ALERTS


def test_every_alert_has_expr_for_severity_and_annotations(rules: list[dict[str, Any]]) -> None:
    for rule in rules:
        name = rule["alert"]
        assert isinstance(rule.get("expr"), str), name
        assert rule["expr"].strip(), name
        assert DURATION.match(str(rule.get("for", ""))), f"{name}: for must be a duration"
        assert rule.get("labels", {}).get("severity") in SEVERITIES, name
        annotations = rule.get("annotations", {})
        assert annotations.get("summary", "").strip(), f"{name}: no summary"
        assert annotations.get("description", "").strip(), f"{name}: no description"


def test_alerts_name_only_exposed_metrics(rules: list[dict[str, Any]], exposed: set[str]) -> None:
    for rule in rules:
        for name in METRIC_NAME.findall(rule["expr"]):
            assert name in exposed, f"{rule['alert']}: {name} is not exposed by proxy.metrics"


def test_every_proxy_alert_but_down_uses_proxy_metrics(rules: list[dict[str, Any]]) -> None:
    for rule in rules:
        if rule["alert"] != "PosProxyDown":
            assert METRIC_NAME.search(rule["expr"]), rule["alert"]


def test_dashboard_names_only_exposed_metrics(dashboard: dict[str, Any], exposed: set[str]) -> None:
    queries = _dashboard_queries(dashboard)
    assert queries
    used = {name for query in queries for name in METRIC_NAME.findall(query)}
    for name in used:
        assert name in exposed, f"{name} is not exposed by proxy.metrics"
    # Every metric family the proxy defines is shown somewhere.
    assert {
        _family(name) for name in exposed if not name.endswith("_created") and not name.startswith("process_")
    } <= {_family(name) for name in used} | {
        "pos_proxy_build_info",
        "pos_proxy_workers_alive",
        "pos_proxy_worker_restarts_total",
    }
    # Process metrics: only those worth a panel.
    assert {"process_resident_memory_bytes", "process_open_fds", "process_max_fds"} <= used


def test_dashboard_panel_ids_are_unique(dashboard: dict[str, Any]) -> None:
    ids = [panel["id"] for panel in _panels(dashboard)]
    assert len(ids) == len(set(ids)), ids


def test_dashboard_panels_do_not_overlap(dashboard: dict[str, Any]) -> None:
    cells: set[tuple[int, int]] = set()
    for panel in dashboard["panels"]:
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24, panel["title"]
        own = {
            (x, y)
            for x in range(grid["x"], grid["x"] + grid["w"])
            for y in range(grid["y"], grid["y"] + grid["h"])
        }
        assert not cells & own, f"{panel['title']} overlaps another panel"
        cells |= own


def test_dashboard_uses_a_datasource_input(dashboard: dict[str, Any]) -> None:
    inputs = dashboard["__inputs"]
    assert {"name": "DS_PROMETHEUS", "type": "datasource", "pluginId": "prometheus"}.items() <= inputs[
        0
    ].items()
    assert isinstance(dashboard["schemaVersion"], int)
    assert dashboard["schemaVersion"] >= 36
    for panel in _panels(dashboard):
        if panel["type"] == "row":
            continue
        assert panel["type"] == "timeseries", panel["title"]
        assert panel["datasource"]["uid"] == "${DS_PROMETHEUS}", panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == "${DS_PROMETHEUS}", panel["title"]
            assert 'job=~"$job"' in target["expr"], panel["title"]
            assert 'instance=~"$instance"' in target["expr"], panel["title"]
    variables = {variable["name"] for variable in dashboard["templating"]["list"]}
    assert {"job", "instance"} <= variables


def test_promtool_accepts_the_rules() -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        missing = "promtool is not on PATH (Debian package prometheus; scripts/setup-test-env.sh installs it)"
        if running_in_ci():
            pytest.fail(f"{missing}; CI is set: a missing promtool is an error here, not a skip")
        pytest.skip(missing)
    result = subprocess.run(
        [promtool, "check", "rules", str(ALERTS)], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_scrape_config_reads_the_admin_token_from_a_file() -> None:
    document = yaml.safe_load(SCRAPE_CONFIG.read_text(encoding="utf-8"))
    (job,) = document["scrape_configs"]
    assert job["job_name"] == "pos-db-proxy"  # the job alerts.yml selects
    assert job["metrics_path"] == "/metrics"
    authorization = job["authorization"]
    assert authorization["type"] == "Bearer"
    # Never the token itself in a file that goes into version control and Prometheus's config page.
    assert set(authorization) == {"type", "credentials_file"}
    assert "bearer_token" not in job
    assert all(target.endswith(":9187") for target in job["static_configs"][0]["targets"])


def test_promtool_accepts_the_scrape_config(tmp_path: Path) -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        missing = "promtool is not on PATH (Debian package prometheus; scripts/setup-test-env.sh installs it)"
        if running_in_ci():
            pytest.fail(f"{missing}; CI is set: a missing promtool is an error here, not a skip")
        pytest.skip(missing)
    # promtool checks that the files it names exist: point them at the rules and a token here.
    token = tmp_path / "token"
    token.write_text("admin-token\n", encoding="utf-8")
    text = SCRAPE_CONFIG.read_text(encoding="utf-8")
    text = text.replace("/etc/prometheus/rules/pos-db-proxy-alerts.yml", str(ALERTS))
    text = text.replace("/etc/prometheus/pos-proxy-admin-token", str(token))
    config = tmp_path / "prometheus.yml"
    config.write_text(text, encoding="utf-8")
    result = subprocess.run(
        [promtool, "check", "config", str(config)], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr
