"""Session pooling against the real server: reuse, reset, limits, dirty connections, upstream failures."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import asyncpg
import psycopg
import pytest

from tests.integration.conftest import OwnCluster
from tests.integration.proxyproc import ProxyProcess, TerminalPKI

StartProxy = Callable[..., ProxyProcess]


def _connect(proxy: ProxyProcess, pki: TerminalPKI, **extra: Any) -> psycopg.Connection:
    return psycopg.connect(**proxy.conninfo(pki.cashier, pki.ca, **extra), autocommit=True)


def _superuser(cluster: Any) -> psycopg.Connection:
    return psycopg.connect(**cluster.connect_kwargs(user="postgres", dbname="pos"), autocommit=True)


def test_server_connection_is_reused_and_reset_between_sessions(
    start_proxy: StartProxy, terminal_pki: TerminalPKI
) -> None:
    proxy = start_proxy(routes={"pos": {"pool": {"size": 1}}})
    with _connect(proxy, terminal_pki) as first:
        first_pid = first.execute("SELECT pg_backend_pid()").fetchone()
        first.execute("SET statement_timeout = '1234ms'")
        first.execute("CREATE TEMP TABLE scratch (id int)")
    with _connect(proxy, terminal_pki) as second:
        assert second.execute("SELECT pg_backend_pid()").fetchone() == first_pid
        assert second.execute("SHOW statement_timeout").fetchone() == ("0",)
        assert second.execute("SELECT to_regclass('pg_temp.scratch')").fetchone() == (None,)


def test_clients_beyond_the_pool_wait_then_get_53300(
    start_proxy: StartProxy, terminal_pki: TerminalPKI
) -> None:
    proxy = start_proxy(routes={"pos": {"pool": {"size": 1, "max_client_wait": "1s"}}})
    with _connect(proxy, terminal_pki) as holder:
        holder.execute("SELECT 1")
        started = time.monotonic()
        with pytest.raises(psycopg.OperationalError) as raised:
            _connect(proxy, terminal_pki).close()
        waited = time.monotonic() - started
    assert "no server connection became free within 1 s" in str(raised.value)
    assert 0.8 < waited < 5
    proxy.wait_for_event("session_refused", sqlstate="53300")
    with _connect(proxy, terminal_pki) as later:
        assert later.execute("SELECT 'served'").fetchone() == ("served",)


def test_waiting_client_gets_the_connection_when_it_is_released(
    start_proxy: StartProxy, terminal_pki: TerminalPKI
) -> None:
    proxy = start_proxy(routes={"pos": {"pool": {"size": 1, "max_client_wait": "10s"}}})
    results: list[object] = []
    holder = _connect(proxy, terminal_pki)
    holder.execute("SELECT 1")

    def wait_for_turn() -> None:
        with _connect(proxy, terminal_pki) as waiter:
            results.append(waiter.execute("SELECT 'my turn'").fetchone())

    thread = threading.Thread(target=wait_for_turn)
    thread.start()
    time.sleep(0.5)
    assert results == []
    holder.close()
    thread.join(10)
    assert results == [("my turn",)]


async def test_client_vanishing_mid_transaction_leaves_no_transaction_behind(
    proxy: ProxyProcess, terminal_pki: TerminalPKI, pg_cluster: Any
) -> None:
    with _superuser(pg_cluster) as admin:
        admin.execute("CREATE TABLE IF NOT EXISTS public.vanish (id int PRIMARY KEY)")
        admin.execute("ALTER TABLE public.vanish OWNER TO pos_proxy")
        admin.execute("INSERT INTO public.vanish VALUES (1) ON CONFLICT DO NOTHING")
    connection = await asyncpg.connect(
        host="127.0.0.1",
        port=proxy.port,
        user="till-01",
        database="pos",
        ssl=proxy.ssl_context(terminal_pki.cashier, terminal_pki.ca),
        timeout=10,
    )
    transaction = connection.transaction()
    await transaction.start()
    await connection.execute("SELECT id FROM public.vanish WHERE id = 1 FOR UPDATE")
    connection.terminate()  # drops the socket with no Terminate and no ROLLBACK
    await asyncio.sleep(0.1)  # let this event loop actually close the socket
    deadline = time.monotonic() + 10
    with _superuser(pg_cluster) as admin:
        while time.monotonic() < deadline:
            open_transactions = admin.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE usename = 'pos_proxy' AND xact_start IS NOT NULL"
            ).fetchone()
            if open_transactions == (0,):
                break
            await asyncio.sleep(0.1)
        assert open_transactions == (0,)
    with _connect(proxy, terminal_pki, options="") as other:
        other.execute("SET lock_timeout = '2s'")
        assert other.execute("SELECT id FROM public.vanish WHERE id = 1 FOR UPDATE").fetchone() == (1,)


def test_md5_authentication_to_the_server(
    start_proxy: StartProxy, terminal_pki: TerminalPKI, pg_cluster: Any, tmp_path: Path
) -> None:
    password_file = tmp_path / "md5-password"
    password_file.write_text(pg_cluster.md5_password, encoding="utf-8")
    proxy = start_proxy(routes={"pos": {"user": "pos_proxy_md5", "password": {"file": str(password_file)}}})
    with _connect(proxy, terminal_pki) as connection:
        assert connection.execute("SELECT current_user").fetchone() == ("pos_proxy_md5",)


def test_wrong_server_password_gives_a_clean_08001(
    start_proxy: StartProxy, terminal_pki: TerminalPKI, tmp_path: Path
) -> None:
    password_file = tmp_path / "wrong-password"
    password_file.write_text("not-the-password", encoding="utf-8")
    proxy = start_proxy(routes={"pos": {"password": {"file": str(password_file)}}})
    with pytest.raises(psycopg.OperationalError) as raised:
        _connect(proxy, terminal_pki).close()
    assert "could not connect to the database server" in str(raised.value)
    assert "not-the-password" not in str(raised.value)
    failure = proxy.wait_for_event("server_connect_failed")
    assert "28P01" in failure["error"]
    assert "not-the-password" not in proxy.log_text()


def test_server_certificate_that_does_not_verify_is_refused(
    start_proxy: StartProxy, terminal_pki: TerminalPKI, pg_cluster: Any
) -> None:
    # The terminal CA did not sign the database's certificate: verify-full must fail.
    proxy = start_proxy(routes={"pos": {"sslrootcert": str(terminal_pki.ca)}})
    with pytest.raises(psycopg.OperationalError) as raised:
        _connect(proxy, terminal_pki).close()
    message = str(raised.value)
    assert "could not connect to the database server" in message
    assert str(pg_cluster.port) not in message
    assert "localhost" not in message
    assert "certificate verify failed" in proxy.wait_for_event("server_connect_failed")["error"]


def test_upstream_down_gives_a_clean_error_and_the_pool_recovers(
    start_proxy: StartProxy, terminal_pki: TerminalPKI, own_cluster: OwnCluster
) -> None:
    server = own_cluster.server
    # The backoff's cap below max_client_wait: a client that comes after the restart is served by the
    # next probe, however many probes failed while the server was down.
    route = own_cluster.route(connect_timeout="1s", max_client_wait="1s", connect_retry_max_delay="0.5s")
    proxy = start_proxy(routes={"pos": route})
    with _connect(proxy, terminal_pki) as connection:
        assert connection.execute("SELECT 1").fetchone() == (1,)
        server.stop_server_only()
        with pytest.raises(psycopg.OperationalError):
            connection.execute("SELECT 1")
    # A new client waits max_client_wait for the server to come back, then gets 08001.
    started = time.monotonic()
    with pytest.raises(psycopg.OperationalError) as raised:
        _connect(proxy, terminal_pki).close()
    assert time.monotonic() - started >= 0.9
    assert "could not connect to the database server" in str(raised.value)
    assert str(server.port) not in str(raised.value)
    server.start_server_only()
    with _connect(proxy, terminal_pki) as connection:
        assert connection.execute("SELECT 'back'").fetchone() == ("back",)
