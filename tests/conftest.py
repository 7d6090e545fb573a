"""Shared pytest fixtures.

``pg_cluster`` (session scope) is a throwaway PostgreSQL 15 cluster that only accepts TLS
over TCP (verify-full works against ``ca``), with:

* role ``pos_proxy`` (SCRAM-SHA-256 password) owning database ``pos``;
* role ``pos_proxy_md5`` (MD5 password, authenticated with md5) with access to ``pos``;
* superuser ``postgres`` (SCRAM password over TCP; trust over the unix socket).

Without server binaries the fixture skips -- unless ``CI`` is set, where it fails.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from proxy import certs
from proxy.localpg import LocalPostgres, LocalPostgresError, LocalPostgresTLS, find_pg_bindir
from tests import compiled


def pytest_configure(config: pytest.Config) -> None:
    # scripts/compiled-tree.sh: a run meant for the mypyc build must not test the .py modules.
    if compiled.expected() and (wrong := compiled.not_compiled()):
        pytest.exit("POS_PROXY_EXPECT_COMPILED is set but these are not compiled: " + ", ".join(wrong), 4)


def pytest_report_header(config: pytest.Config) -> str | None:
    if compiled.expected():
        return f"mypyc-compiled data path: {len(compiled.compiled_modules())} modules"
    return None


def running_in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


@dataclass(frozen=True, slots=True)
class PgCluster:
    """Connection facts for the session's PostgreSQL cluster."""

    host: str
    port: int
    ca: Path
    password: str
    md5_password: str
    superuser_password: str
    server: LocalPostgres
    dbname: str = "pos"
    user: str = "pos_proxy"
    md5_user: str = "pos_proxy_md5"
    superuser: str = "postgres"

    @property
    def passwords(self) -> Mapping[str, str]:
        return {
            self.user: self.password,
            self.md5_user: self.md5_password,
            self.superuser: self.superuser_password,
        }

    def connect_kwargs(
        self,
        *,
        user: str | None = None,
        password: str | None = None,
        dbname: str | None = None,
        sslmode: str = "verify-full",
        **extra: Any,
    ) -> dict[str, Any]:
        """Keyword arguments for ``psycopg.connect`` (libpq names) to reach the cluster directly."""
        user = user or self.user
        kwargs: dict[str, Any] = {
            "host": self.host,
            "port": self.port,
            "dbname": dbname or self.dbname,
            "user": user,
            "password": password if password is not None else self.passwords.get(user, ""),
            "sslmode": sslmode,
            "sslrootcert": str(self.ca),
            "connect_timeout": 10,
        }
        kwargs.update(extra)
        return kwargs


def _server_pki(directory: Path) -> tuple[Path, Path, Path]:
    """(ca, server cert, server key) for DNS localhost, IP 127.0.0.1 and ::1."""
    ca = certs.init_ca(directory, common_name="pos-db-proxy test database CA")
    issued = certs.issue_server(directory, dns_names=["localhost"], ip_addresses=["127.0.0.1", "::1"])
    return ca, issued.cert_path, issued.key_path


@pytest.fixture(scope="session")
def pg_bindir() -> Path:
    """PostgreSQL server binary directory; skips the test when there is none (fails under CI)."""
    try:
        return find_pg_bindir()
    except LocalPostgresError as exc:
        if running_in_ci():
            pytest.fail(f"{exc} (CI is set: a missing PostgreSQL is an error here, not a skip)")
        pytest.skip(str(exc))


@pytest.fixture(scope="session")
def pg_cluster(pg_bindir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[PgCluster]:
    ca, cert, key = _server_pki(tmp_path_factory.mktemp("pg-pki"))
    superuser_password = secrets.token_urlsafe(18)
    password = secrets.token_urlsafe(18)
    md5_password = secrets.token_urlsafe(18)

    server = LocalPostgres(
        tmp_path_factory.mktemp("pg-cluster"),
        tls=LocalPostgresTLS(cert=cert, key=key, ca=ca),
        superuser_password=superuser_password,
    )
    server.start()
    try:
        server.create_role("pos_proxy", password, method="scram-sha-256")
        server.create_role("pos_proxy_md5", md5_password, method="md5")
        server.create_database("pos", owner="pos_proxy")
        server.execute_script('GRANT ALL ON SCHEMA public TO "pos_proxy_md5";', dbname="pos")
        yield PgCluster(
            host=server.host,
            port=server.port,
            ca=ca,
            password=password,
            md5_password=md5_password,
            superuser_password=superuser_password,
            server=server,
        )
    finally:
        server.stop()
