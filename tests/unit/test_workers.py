"""Multi-worker mode's pure parts: dividing the configuration, the worker count, the restart backoff."""

from __future__ import annotations

import dataclasses
import os
import types
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from proxy.audit import AuditSettings
from proxy.cli import _build_parser
from proxy.config.load import MAX_WORKERS, parse_config, parse_workers
from proxy.config.model import AuditConfig, Config
from proxy.limits import LimitSettings, Rate
from proxy.supervisor import restart_delay
from proxy.workers import WorkerSlot, share, worker_audit_file
from proxy.yamlreader import ConfigError


@given(total=st.integers(0, 10_000), count=st.integers(1, MAX_WORKERS))
def test_shares_add_up_to_the_total_and_differ_by_at_most_one(total: int, count: int) -> None:
    shares = [share(total, index, count) for index in range(1, count + 1)]
    assert sum(shares) == total
    assert max(shares) - min(shares) <= 1
    assert shares == sorted(shares, reverse=True)  # the remainder goes to the first workers


def test_a_cap_is_never_divided_down_to_zero() -> None:
    slots = [WorkerSlot(index, 4, Path("/run"), 1) for index in (1, 2, 3, 4)]
    assert [slot.cap(6) for slot in slots] == [2, 2, 1, 1]
    assert [slot.cap(2) for slot in slots] == [1, 1, 1, 1]
    assert slots[0].cap(None) is None


def test_worker_audit_files_are_named_after_the_configured_one() -> None:
    assert worker_audit_file(Path("/var/log/pos-proxy/audit.log"), 2) == Path(
        "/var/log/pos-proxy/audit-w2.log"
    )
    assert worker_audit_file(Path("/var/log/audit"), 1) == Path("/var/log/audit-w1")


def _config(tmp_path: Path) -> Config:
    for name in ("proxy.crt", "proxy.key", "terminal-ca.crt", "db-ca.crt"):
        (tmp_path / name).write_text("-----BEGIN PLACEHOLDER-----\n")
    data = {
        "tls": {"cert": "proxy.crt", "key": "proxy.key", "client_ca": "terminal-ca.crt"},
        "roles": {"cashier": None},
        "routes": {
            "pos": {
                "host": "db.example.internal",
                "user": "pos_proxy",
                "sslrootcert": "db-ca.crt",
                "pool": {"size": 5, "min_idle": 3},
            }
        },
    }
    config = parse_config(data, base_dir=tmp_path, environ={})
    caps = LimitSettings(
        connections_per_terminal=3,
        connections_per_store=5,
        connections_per_role=40,
        statements=Rate(10.0, 20),
        role_statements=Rate(100.0, 200),
    )
    return dataclasses.replace(
        config,
        roles=types.MappingProxyType({"cashier": dataclasses.replace(config.roles["cashier"], limits=caps)}),
        limits=dataclasses.replace(
            config.limits,
            stores=types.MappingProxyType({"store-001": LimitSettings(connections_per_store=3)}),
        ),
        audit=AuditConfig(AuditSettings(file=tmp_path / "audit.log", key_file=tmp_path / "audit.key")),
    )


def test_each_worker_runs_its_slice_of_pools_and_aggregate_caps(tmp_path: Path) -> None:
    config = _config(tmp_path)
    first, second = (WorkerSlot(index, 2, tmp_path, 1).shape(config) for index in (1, 2))
    assert [c.routes["pos"].pool.size for c in (first, second)] == [3, 2]
    assert [c.routes["pos"].pool.min_idle for c in (first, second)] == [2, 1]
    assert [c.roles["cashier"].limits.connections_per_role for c in (first, second)] == [20, 20]
    assert [c.roles["cashier"].limits.connections_per_store for c in (first, second)] == [3, 2]
    assert [c.limits.stores["store-001"].connections_per_store for c in (first, second)] == [2, 1]
    # A terminal's connections land on any worker: its cap and the rates stay whole in each.
    for shaped in (first, second):
        limits = shaped.roles["cashier"].limits
        assert limits.connections_per_terminal == 3
        assert limits.statements == Rate(10.0, 20) and limits.role_statements == Rate(100.0, 200)
    assert [c.audit.settings.file for c in (first, second) if c.audit is not None] == [
        tmp_path / "audit-w1.log",
        tmp_path / "audit-w2.log",
    ]
    # What is not divided is left alone.
    assert first.routes["pos"].host == config.routes["pos"].host and first.tls == config.tls


def test_one_worker_of_one_runs_the_configuration_as_written(tmp_path: Path) -> None:
    config = _config(tmp_path)
    shaped = WorkerSlot(1, 1, tmp_path, 1).shape(config)
    assert shaped.routes == config.routes and shaped.roles == config.roles


@pytest.mark.parametrize(("value", "count"), [(1, 1), (4, 4), ("3", 3), (MAX_WORKERS, MAX_WORKERS)])
def test_worker_counts(value: object, count: int) -> None:
    assert parse_workers(value) == count


def test_auto_is_the_cores_this_process_may_run_on() -> None:
    assert parse_workers("auto") == min(MAX_WORKERS, len(os.sched_getaffinity(0)))


@pytest.mark.parametrize("value", [0, -1, MAX_WORKERS + 1, "two", "", True, 1.5])
def test_bad_worker_counts_are_refused(value: object) -> None:
    with pytest.raises(ValueError, match="worker count"):
        parse_workers(value)


def test_listen_workers_in_the_config_names_its_key_path(tmp_path: Path) -> None:
    config = _config(tmp_path)
    assert config.listen.workers == 1
    data = {"listen": {"workers": "many"}, "tls": {}, "roles": {}, "routes": {}}
    with pytest.raises(ConfigError) as caught:
        parse_config(data, base_dir=tmp_path, environ={})
    assert any(str(problem).startswith("listen.workers:") for problem in caught.value.problems)


def test_the_workers_option_wins_over_the_config_and_is_checked(capsys: pytest.CaptureFixture[str]) -> None:
    parser = _build_parser()
    assert parser.parse_args(["run", "--config", "x.yaml", "--workers", "2"]).workers == 2
    assert parser.parse_args(["run", "--config", "x.yaml"]).workers is None
    with pytest.raises(SystemExit):
        parser.parse_args(["run", "--config", "x.yaml", "--workers", "0"])
    assert "worker count" in capsys.readouterr().err


def test_a_worker_that_keeps_dying_is_restarted_ever_more_slowly() -> None:
    delays = [restart_delay(deaths) for deaths in range(1, 12)]
    assert delays[0] == 0.5
    assert delays == sorted(delays)
    assert max(delays) == 30.0  # at most one start per 30 s per worker in a crash loop
    assert restart_delay(10_000) == 30.0
