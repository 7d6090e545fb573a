"""Fixtures for tests that run the real proxy in front of the real PostgreSQL cluster."""

from __future__ import annotations

import contextlib
import secrets
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from proxy.localpg import LocalPostgres, LocalPostgresTLS
from tests.conftest import running_in_ci
from tests.integration.ledger import CREATE_SALES_TABLE
from tests.integration.proxyproc import ProxyProcess, TerminalPKI, deep_merge, proxy_config, stop_all
from tests.integration.redisproc import RedisServer, find_redis_server


@pytest.fixture(scope="session")
def terminal_pki(tmp_path_factory: pytest.TempPathFactory) -> TerminalPKI:
    return TerminalPKI.create(tmp_path_factory.mktemp("terminal-pki"))


@pytest.fixture(scope="session")
def db_password_file(pg_cluster: Any, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("secrets") / "db-password"
    path.touch(mode=0o600)
    path.write_text(pg_cluster.password + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def base_config(terminal_pki: TerminalPKI, pg_cluster: Any, db_password_file: Path) -> dict[str, Any]:
    return proxy_config(terminal_pki, pg_cluster, db_password_file)


@pytest.fixture(scope="session")
def proxy(base_config: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProxyProcess]:
    """The shared proxy: session pooling, pool of 3, default identity mapping."""
    process = ProxyProcess(tmp_path_factory.mktemp("proxy"), base_config).start()
    yield process
    process.stop()


@pytest.fixture
def start_proxy(base_config: dict[str, Any], tmp_path: Path) -> Iterator[Callable[..., ProxyProcess]]:
    """Start a proxy with config overrides (deep-merged) and extra `pos-proxy run` options
    (``arguments=["--workers", "2"]``); stopped after the test."""
    started: list[ProxyProcess] = []

    def start(*, arguments: Sequence[str] = (), **overrides: Any) -> ProxyProcess:
        process = ProxyProcess(
            tmp_path / f"proxy-{len(started)}", deep_merge(base_config, overrides), arguments
        )
        started.append(process)
        return process.start()

    yield start
    stop_all(started)


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A redis-server of the test's own (Debian's redis-server package), stopped after the test."""
    binary = find_redis_server()
    if binary is None:
        message = "redis-server is not installed (scripts/setup-test-env.sh installs it)"
        if running_in_ci():
            pytest.fail(f"{message}; CI is set: a missing redis-server is an error here, not a skip")
        pytest.skip(message)
    server = RedisServer(binary, tmp_path / "redis").start()
    yield server
    server.stop()


@dataclass(frozen=True, slots=True)
class OwnCluster:
    """A PostgreSQL cluster of one test's own, which it may stop and start."""

    server: LocalPostgres
    password_file: Path

    def route(self, **pool: object) -> dict[str, Any]:
        """Overrides of the `pos` route that point it at this cluster, with these pool settings."""
        return {"port": self.server.port, "password": {"file": str(self.password_file)}, "pool": pool}


@contextlib.contextmanager
def own_cluster_running(
    pg_cluster: Any, directory: Path, settings: Mapping[str, str] | None = None
) -> Iterator[OwnCluster]:
    """A cluster of one test's own (role pos_proxy owning database pos, the shared cluster's server
    certificate, these extra server settings), stopped and deleted on exit."""
    password = secrets.token_urlsafe(12)
    password_file = directory / "own-pg-password"
    password_file.write_text(password, encoding="utf-8")
    server = LocalPostgres(
        directory / "own-pg",
        tls=LocalPostgresTLS(cert=pg_cluster.server.tls.cert, key=pg_cluster.server.tls.key),
        settings=settings,
    )
    server.start()
    try:
        server.create_role("pos_proxy", password)
        server.create_database("pos", owner="pos_proxy")
        yield OwnCluster(server, password_file)
    finally:
        server.stop()


@pytest.fixture
def own_cluster(pg_cluster: Any, tmp_path: Path) -> Iterator[OwnCluster]:
    """A second cluster that a test may stop and start without disturbing the others."""
    with own_cluster_running(pg_cluster, tmp_path) as cluster:
        yield cluster


@pytest.fixture
def durable_cluster(pg_cluster: Any, tmp_path: Path) -> Iterator[OwnCluster]:
    """A cluster of the test's own, with the write ledger's sales table, that acknowledges a commit
    only once it is in the WAL (the throwaway default, synchronous_commit off, would lose
    acknowledged commits to a SIGKILL of PostgreSQL)."""
    with own_cluster_running(pg_cluster, tmp_path, {"synchronous_commit": "on"}) as cluster:
        cluster.server.execute_script(CREATE_SALES_TABLE, dbname="pos")
        yield cluster
