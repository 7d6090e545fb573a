"""The throwaway PostgreSQL cluster behaves as the rest of the suite assumes."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import psycopg
import pytest

from proxy.localpg import LocalPostgres, LocalPostgresError

if TYPE_CHECKING:
    from tests.conftest import PgCluster

pytestmark = pytest.mark.integration


def test_plaintext_tcp_is_refused(pg_cluster: PgCluster) -> None:
    with pytest.raises(psycopg.OperationalError, match="no encryption"):
        psycopg.connect(**pg_cluster.connect_kwargs(sslmode="disable"))


def test_tls_verify_full_with_scram(pg_cluster: PgCluster) -> None:
    with psycopg.connect(**pg_cluster.connect_kwargs()) as conn:
        row = conn.execute(
            "SELECT current_user, current_database(), s.ssl, s.version"
            " FROM pg_stat_ssl s WHERE s.pid = pg_backend_pid()"
        ).fetchone()
    assert row is not None
    user, dbname, ssl, version = row
    assert (user, dbname, ssl) == ("pos_proxy", "pos", True)
    assert version.startswith("TLSv1.")
    stored = pg_cluster.server.psql("SELECT rolpassword FROM pg_authid WHERE rolname = 'pos_proxy'")
    assert stored.startswith("SCRAM-SHA-256$")


def test_verify_full_checks_the_host_name(pg_cluster: PgCluster) -> None:
    kwargs = pg_cluster.connect_kwargs(hostaddr=pg_cluster.host)
    kwargs["host"] = "not-the-server.invalid"
    with pytest.raises(psycopg.OperationalError, match="does not match host name"):
        psycopg.connect(**kwargs)


def test_wrong_password_is_refused(pg_cluster: PgCluster) -> None:
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        psycopg.connect(**pg_cluster.connect_kwargs(password="not-the-password"))


def test_md5_user_authenticates_with_md5(pg_cluster: PgCluster) -> None:
    stored = pg_cluster.server.psql("SELECT rolpassword FROM pg_authid WHERE rolname = 'pos_proxy_md5'")
    assert stored.startswith("md5")
    with psycopg.connect(**pg_cluster.connect_kwargs(user=pg_cluster.md5_user)) as conn:
        row = conn.execute("SELECT current_user").fetchone()
    assert row == ("pos_proxy_md5",)
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        psycopg.connect(**pg_cluster.connect_kwargs(user=pg_cluster.md5_user, password="nope"))


def test_superuser_over_tls(pg_cluster: PgCluster) -> None:
    with psycopg.connect(**pg_cluster.connect_kwargs(user="postgres", dbname="postgres")) as conn:
        row = conn.execute("SELECT rolsuper FROM pg_roles WHERE rolname = current_user").fetchone()
    assert row == (True,)


def test_psql_reports_sql_errors(pg_cluster: PgCluster) -> None:
    assert pg_cluster.server.psql("SELECT 1, 'a'; SELECT 2") == "1|a\n2\n"
    with pytest.raises(LocalPostgresError, match="no_such_table"):
        pg_cluster.server.psql("SELECT * FROM no_such_table", dbname="pos")


@pytest.mark.usefixtures("pg_bindir")
def test_stop_and_start_server_only_keep_data(tmp_path: Path) -> None:
    """A second, plaintext cluster: bounce it without disturbing the session cluster."""
    pg = LocalPostgres(tmp_path / "bounce", superuser_password="su-secret")
    try:
        pg.start()
        name, password = 'odd "role" o\'name', "pa'ss\\word:x"
        pg.create_role(name, password)
        pg.create_database("bounce db", owner=name)
        kwargs: dict[str, Any] = {
            "host": pg.host,
            "port": pg.port,
            "dbname": "bounce db",
            "user": name,
            "password": password,
            "sslmode": "disable",
            "connect_timeout": 5,
        }
        with psycopg.connect(**kwargs) as conn:
            conn.execute("CREATE TABLE kept (v int)")
            conn.execute("INSERT INTO kept VALUES (42)")

        datadir, port = pg.datadir, pg.port
        pg.stop_server_only()
        assert not pg.is_running()
        assert datadir.is_dir()
        pg.stop_server_only()  # idempotent
        with pytest.raises(psycopg.OperationalError):
            psycopg.connect(**kwargs)

        pg.start_server_only()
        assert pg.is_running() and pg.port == port
        with psycopg.connect(**kwargs) as conn:
            assert conn.execute("SELECT v FROM kept").fetchall() == [(42,)]

        pg.restart()
        assert pg.psql("SELECT count(*) FROM kept", dbname="bounce db") == "1\n"
    finally:
        pg.stop()
    assert not pg.is_running()
    assert not datadir.exists()
    pg.stop()  # idempotent after stop too
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(**kwargs)


def test_a_killed_server_recovers_its_acknowledged_commits(tmp_path: Path) -> None:
    """kill_server_only() ends the postmaster and every backend at once (a crash); with
    synchronous_commit on, what was acknowledged comes back from the WAL on the next start."""
    pg = LocalPostgres(tmp_path / "crash", settings={"synchronous_commit": "on"})
    try:
        pg.start()
        pg.execute_script("CREATE TABLE kept (v int); INSERT INTO kept VALUES (7);")
        pg.kill_server_only()
        assert not pg.is_running()
        pg.kill_server_only()  # idempotent
        pg.start_server_only()
        assert pg.psql("SELECT v FROM kept") == "7\n"
    finally:
        pg.stop()
