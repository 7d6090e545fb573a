"""Service lifecycle: systemd notifications and the graceful drain on SIGTERM."""

from __future__ import annotations

import signal
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psycopg
import pytest

from proxy import certs
from tests.integration.proxyproc import ProxyProcess, TerminalPKI, receive_notifications

StartProxy = Callable[..., ProxyProcess]


def _messages(sock: socket.socket, until: str) -> list[str]:
    return [text for _, text in receive_notifications(sock, until)]


def test_ready_reloading_and_stopping_reach_the_notify_socket(
    start_proxy: StartProxy, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "notify.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(path))
        monkeypatch.setenv("NOTIFY_SOCKET", str(path))
        monkeypatch.setenv("WATCHDOG_USEC", "400000")
        proxy = start_proxy()
        ready = _messages(sock, "READY=1")
        assert any("STATUS=serving on 127.0.0.1:" in message for message in ready)
        assert "WATCHDOG=1" in "".join(_messages(sock, "WATCHDOG=1"))
        proxy.signal(signal.SIGHUP)
        reload = _messages(sock, "READY=1")
        assert any("RELOADING=1" in message and "MONOTONIC_USEC=" in message for message in reload)
        proxy.signal(signal.SIGTERM)
        assert any("STOPPING=1" in message for message in _messages(sock, "STOPPING=1"))
        assert proxy.wait_exit() == 0


def test_sigterm_lets_an_open_transaction_commit_and_ends_idle_sessions_at_once(
    start_proxy: StartProxy, terminal_pki: TerminalPKI, pg_cluster: Any
) -> None:
    with psycopg.connect(
        **pg_cluster.connect_kwargs(user="postgres", dbname="pos"), autocommit=True
    ) as admin:
        admin.execute("CREATE TABLE IF NOT EXISTS public.drained (id int)")
        admin.execute("ALTER TABLE public.drained OWNER TO pos_proxy")
        admin.execute("TRUNCATE public.drained")
    proxy = start_proxy(listen={"drain_timeout": "10s"}, routes={"pos": {"pool": {"mode": "transaction"}}})
    busy = psycopg.connect(**proxy.conninfo(terminal_pki.cashier, terminal_pki.ca), autocommit=True)
    idle = psycopg.connect(**proxy.conninfo(terminal_pki.manager, terminal_pki.ca), autocommit=True)
    try:
        idle.execute("SELECT 1")
        busy.execute("BEGIN")
        busy.execute("INSERT INTO public.drained VALUES (1)")
        proxy.signal(signal.SIGTERM)
        time.sleep(0.5)
        with pytest.raises(psycopg.OperationalError, match="shutting down"):
            idle.execute("SELECT 1")
        busy.execute("INSERT INTO public.drained VALUES (2)")
        busy.execute("COMMIT")
        with pytest.raises(psycopg.OperationalError):
            busy.execute("SELECT 1")
    finally:
        busy.close()
        idle.close()
    assert proxy.wait_exit() == 0
    with psycopg.connect(
        **pg_cluster.connect_kwargs(user="postgres", dbname="pos"), autocommit=True
    ) as admin:
        assert admin.execute("SELECT count(*) FROM public.drained").fetchone() == (2,)


def test_drain_does_not_wait_for_an_idle_terminal_that_never_reads(
    start_proxy: StartProxy, terminal_pki: TerminalPKI
) -> None:
    # The terminal is told 57P01 and sent TLS close_notify; one that never reads never answers
    # that close_notify, which must not hold the drain for the whole drain_timeout.
    proxy = start_proxy(listen={"drain_timeout": "20s"})
    silent = psycopg.connect(**proxy.conninfo(terminal_pki.cashier, terminal_pki.ca), autocommit=True)
    try:
        silent.execute("SELECT 1")
        started = time.monotonic()
        proxy.signal(signal.SIGTERM)
        assert proxy.wait_exit() == 0
        assert time.monotonic() - started < 8
    finally:
        silent.close()


def test_a_new_crl_file_cuts_the_revoked_terminal_without_a_reload(
    start_proxy: StartProxy, tmp_path: Path
) -> None:
    pki = tmp_path / "own-pki"
    certs.init_ca(pki)
    certs.issue_server(pki, dns_names=["localhost"], ip_addresses=["127.0.0.1"])
    stolen = certs.issue_terminal(pki, store="store-009", terminal="till-07", role="cashier")
    proxy = start_proxy(
        tls={
            "cert": str(pki / "server.pem"),
            "key": str(pki / "server.key"),
            "client_ca": str(pki / "ca.pem"),
            "crl": str(pki / "crl.pem"),
        }
    )
    conninfo = {
        "host": "127.0.0.1",
        "port": proxy.port,
        "dbname": "pos",
        "user": "till-07",
        "sslmode": "verify-full",
        "sslrootcert": str(pki / "ca.pem"),
        "sslcert": str(stolen.cert_path),
        "sslkey": str(stolen.key_path),
        "connect_timeout": 10,
    }
    with psycopg.connect(**conninfo, autocommit=True) as connection:
        assert connection.execute("SELECT 1").fetchone() == (1,)
        certs.revoke(pki, stolen.serial)
        proxy.wait_for_event("crl_reloaded")
        with pytest.raises(psycopg.OperationalError, match="revoked"):
            connection.execute("SELECT 1")
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(**conninfo).close()
    proxy.wait_for_event("tls_handshake_failed", reason="certificate revoked")
