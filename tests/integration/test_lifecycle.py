"""Service lifecycle: systemd notifications and the graceful drain on SIGTERM."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import ssl
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest
import yaml
from cryptography import x509

from proxy import certs
from proxy.protocols.postgres import messages as m
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


@dataclass(frozen=True, slots=True)
class ConnectAttempt:
    started: float  # time.monotonic() when connect() was called
    served: bool  # the startup completed and a statement ran
    error: str = ""


def _connect_in_a_loop(
    proxy: ProxyProcess, pki: TerminalPKI, stop: threading.Event, attempts: list[ConnectAttempt]
) -> None:
    """New terminals, one after the other as fast as they go, until ``stop`` (bounded in count and time)."""
    deadline = time.monotonic() + 60
    for _ in range(3000):
        if stop.is_set() or time.monotonic() > deadline:
            return
        started = time.monotonic()
        try:
            with psycopg.connect(
                **proxy.conninfo(pki.cashier, pki.ca, connect_timeout="3"), autocommit=True
            ) as connection:
                connection.execute("SELECT 1")
        except psycopg.OperationalError as exc:
            attempts.append(ConnectAttempt(started, served=False, error=str(exc)))
            time.sleep(0.002)  # a refused connect returns at once: leave the machine's cores some air
        else:
            attempts.append(ConnectAttempt(started, served=True))


@pytest.mark.parametrize("workers", [1, 2], ids=["single", "workers-2"])
def test_sigterm_stops_accepting_at_once_and_drains_without_an_internal_error(
    start_proxy: StartProxy, terminal_pki: TerminalPKI, workers: int
) -> None:
    drain_timeout = 6.0
    proxy = start_proxy(
        arguments=["--workers", str(workers)] if workers > 1 else [],
        listen={"drain_timeout": f"{drain_timeout}s"},
        routes={"pos": {"pool": {"mode": "transaction", "size": 8}}},
    )
    if workers > 1:
        proxy.wait_for_event("workers_ready", timeout=30)
    attempts: list[ConnectAttempt] = []
    stop = threading.Event()
    connector = threading.Thread(target=_connect_in_a_loop, args=(proxy, terminal_pki, stop, attempts))
    idle = [
        psycopg.connect(**proxy.conninfo(terminal_pki.manager, terminal_pki.ca), autocommit=True)
        for _ in range(4)
    ]
    # Another terminal than the loop's: a transaction holds one of its few server connections.
    busy = psycopg.connect(**proxy.conninfo(terminal_pki.manager, terminal_pki.ca), autocommit=True)
    try:
        for connection in idle:
            connection.execute("SELECT 1")
        busy.execute("BEGIN")
        busy.execute("SELECT 1")
        connector.start()
        deadline = time.monotonic() + 20
        while sum(attempt.served for attempt in attempts) < 5 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert sum(attempt.served for attempt in attempts) >= 5, attempts[-3:]
        signalled = time.monotonic()
        proxy.signal(signal.SIGTERM)
        time.sleep(0.5)
        # The transaction in flight finishes; the idle terminals were told at once.
        busy.execute("SELECT 2")
        busy.execute("COMMIT")
        for connection in idle:
            with pytest.raises(psycopg.OperationalError, match="shutting down"):
                connection.execute("SELECT 1")
        assert proxy.wait_exit(timeout=drain_timeout + 10) == 0
        exited = time.monotonic()
    finally:
        stop.set()
        if connector.is_alive():
            connector.join(timeout=30)
        busy.close()
        for connection in idle:
            connection.close()
    assert exited - signalled < drain_timeout, "the drain overran listen.drain_timeout"
    after = [attempt for attempt in attempts if attempt.started > signalled]
    # The loop really was knocking while the proxy shut down.
    assert after, "no connection attempt after the signal"
    assert [attempt for attempt in after if attempt.served] == []
    for attempt in after:
        assert "shutting down" in attempt.error or "refused" in attempt.error or "closed" in attempt.error, (
            attempt.error
        )
    proxy.check_log()


def test_a_terminal_whose_handshake_spans_the_signal_is_refused_with_57p01(
    start_proxy: StartProxy, terminal_pki: TerminalPKI
) -> None:
    """Accepted before SIGTERM, TLS and startup after it (while a transaction holds the drain open):
    FATAL 57P01, not a session."""
    proxy = start_proxy(listen={"drain_timeout": "10s"}, routes={"pos": {"pool": {"mode": "transaction"}}})
    busy = psycopg.connect(**proxy.conninfo(terminal_pki.manager, terminal_pki.ca), autocommit=True)
    context = proxy.ssl_context(terminal_pki.cashier, terminal_pki.ca)
    try:
        busy.execute("BEGIN")
        busy.execute("SELECT 1")
        with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as raw:
            raw.sendall(m.build_ssl_request())
            assert raw.recv(1) == b"S"
            proxy.signal(signal.SIGTERM)
            proxy.wait_for_event("shutdown_requested")
            with context.wrap_socket(raw, server_hostname="localhost") as tls:
                tls.sendall(m.build_startup_message({"user": "till-01", "database": "pos"}))
                reply = b""
                with contextlib.suppress(ssl.SSLEOFError, ConnectionResetError):
                    while chunk := tls.recv(65536):
                        reply += chunk
        assert reply[:1] == b"E", reply[:64]
        fields = m.parse_error_fields(reply[5 : 1 + int.from_bytes(reply[1:5], "big")])
        assert (fields["S"], fields["C"]) == ("FATAL", "57P01"), fields
        assert "shutting down" in fields["M"]
        busy.execute("COMMIT")
    finally:
        busy.close()
    assert proxy.wait_exit() == 0


@dataclass(frozen=True, slots=True)
class OwnPKI:
    """A CA of the test's own (its CRL can be rewritten at will) and a proxy that trusts it."""

    directory: Path
    proxy: ProxyProcess
    honest: certs.IssuedCert
    stolen: certs.IssuedCert

    @property
    def crl(self) -> Path:
        return self.directory / "crl.pem"

    def conninfo(self, terminal: certs.IssuedCert) -> dict[str, Any]:
        return {
            "host": "127.0.0.1",
            "port": self.proxy.port,
            "dbname": "pos",
            "user": "till",
            "sslmode": "verify-full",
            "sslrootcert": str(self.directory / "ca.pem"),
            "sslcert": str(terminal.cert_path),
            "sslkey": str(terminal.key_path),
            "connect_timeout": 10,
        }

    def select(self, terminal: certs.IssuedCert) -> object:
        with psycopg.connect(**self.conninfo(terminal), autocommit=True) as connection:
            row = connection.execute("SELECT 'sold'").fetchone()
            return row[0] if row else None


def _own_pki(
    start_proxy: StartProxy, directory: Path, tls: Mapping[str, object] | None = None, **overrides: Any
) -> OwnPKI:
    certs.init_ca(directory)
    certs.issue_server(directory, dns_names=["localhost"], ip_addresses=["127.0.0.1"])
    honest = certs.issue_terminal(directory, store="store-009", terminal="till-01", role="cashier")
    stolen = certs.issue_terminal(directory, store="store-009", terminal="till-07", role="cashier")
    certs.write_crl(directory)
    proxy = start_proxy(
        tls={
            "cert": str(directory / "server.pem"),
            "key": str(directory / "server.key"),
            "client_ca": str(directory / "ca.pem"),
            "crl": str(directory / "crl.pem"),
            **(tls or {}),
        },
        **overrides,
    )
    return OwnPKI(directory, proxy, honest, stolen)


def test_a_new_crl_file_cuts_the_revoked_terminal_without_a_reload(
    start_proxy: StartProxy, tmp_path: Path
) -> None:
    pki = _own_pki(start_proxy, tmp_path / "own-pki")
    with psycopg.connect(**pki.conninfo(pki.stolen), autocommit=True) as connection:
        assert connection.execute("SELECT 1").fetchone() == (1,)
        certs.revoke(pki.directory, pki.stolen.serial)
        pki.proxy.wait_for_event("crl_reloaded")
        with pytest.raises(psycopg.OperationalError, match="revoked"):
            connection.execute("SELECT 1")
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(**pki.conninfo(pki.stolen)).close()
    pki.proxy.wait_for_event("tls_handshake_failed", reason="certificate revoked")


def test_an_expired_crl_is_kept_until_a_fresh_one_replaces_it_in_place_with_the_same_mtime(
    start_proxy: StartProxy, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # CRLs signed now are current for 8 s only: the proxy sees this one pass its nextUpdate.
    monkeypatch.setattr(certs, "_CRL_VALIDITY", timedelta(seconds=8))
    pki = _own_pki(start_proxy, tmp_path / "own-pki")
    certs.revoke(pki.directory, pki.stolen.serial)
    next_update = x509.load_pem_x509_crl(pki.crl.read_bytes()).next_update_utc
    assert next_update is not None
    pki.proxy.wait_for_event("crl_reloaded")
    assert pki.select(pki.honest) == "sold"
    with pytest.raises(psycopg.OperationalError):
        pki.select(pki.stolen)

    expired = pki.proxy.wait_for_event(
        "crl_expired", timeout=15, action="keep-last", next_update=next_update.isoformat()
    )
    assert "enforced by the proxy" in expired["effect"]
    # OpenSSL alone would now fail every terminal (CRL has expired); the till keeps selling...
    assert pki.select(pki.honest) == "sold"
    # ... and the stolen one stays out, refused by the proxy from the kept CRL.
    with pytest.raises(psycopg.OperationalError, match="revoked"):
        pki.select(pki.stolen)
    pki.proxy.wait_for_event("tls_handshake_failed", reason="certificate revoked (expired CRL kept)")

    # The CRL job finally runs and puts the file back with its old mtime (cp -p, rsync -t).
    before = pki.crl.stat()
    monkeypatch.setattr(certs, "_CRL_VALIDITY", timedelta(days=7))
    certs.write_crl(pki.directory)
    os.utime(pki.crl, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert pki.crl.stat().st_mtime_ns == before.st_mtime_ns
    reloads = sum(1 for record in pki.proxy.log_events() if record.get("event") == "crl_reloaded")
    _wait_until(
        lambda: sum(1 for r in pki.proxy.log_events() if r.get("event") == "crl_reloaded") > reloads, 10
    )
    assert pki.select(pki.honest) == "sold"
    with pytest.raises(psycopg.OperationalError):
        pki.select(pki.stolen)
    pki.proxy.wait_for_event("tls_handshake_failed", reason="certificate revoked")


def test_an_expired_crl_refuses_every_terminal_with_expired_crl_refuse(
    start_proxy: StartProxy, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Long enough for the proxy to start on a busy machine: with refuse, an expired CRL stops it.
    monkeypatch.setattr(certs, "_CRL_VALIDITY", timedelta(seconds=10))
    pki = _own_pki(start_proxy, tmp_path / "own-pki", {"expired_crl": "refuse"})
    assert pki.select(pki.honest) == "sold"
    expired = pki.proxy.wait_for_event("crl_expired", timeout=15, action="refuse")
    assert "every terminal is refused" in expired["effect"]
    with pytest.raises(psycopg.OperationalError):
        pki.select(pki.honest)
    pki.proxy.wait_for_event("tls_handshake_failed", reason="CRL has expired")


def _wait_until(predicate: Callable[[], bool], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.1)


def _served_certificate(pki: OwnPKI) -> bytes:
    """The DER certificate the proxy presents now, to the honest terminal."""
    context = ssl.create_default_context(cafile=str(pki.directory / "ca.pem"))
    context.load_cert_chain(pki.honest.cert_path, pki.honest.key_path)
    return pki.proxy.served_certificate(context)


def _sales_policy(*readable: str) -> dict[str, Any]:
    return {
        "mode": "enforce",
        "search_path": ["public"],
        "allow": {"kinds": ["SELECT", "INSERT"], "read": list(readable), "write": ["reload_sales"]},
    }


def test_sighup_under_load_swaps_certificate_crl_and_policy_with_zero_client_errors(
    start_proxy: StartProxy, tmp_path: Path, pg_cluster: Any
) -> None:
    with psycopg.connect(
        **pg_cluster.connect_kwargs(user="postgres", dbname="pos"), autocommit=True
    ) as admin:
        admin.execute(
            "CREATE TABLE IF NOT EXISTS public.reload_sales (till int, seq int, PRIMARY KEY (till, seq))"
        )
        admin.execute("CREATE TABLE IF NOT EXISTS public.reload_stock (item int)")
        for table in ("reload_sales", "reload_stock"):
            admin.execute(f"ALTER TABLE public.{table} OWNER TO pos_proxy")
        admin.execute("TRUNCATE public.reload_sales")
    policy = tmp_path / "cashier-policy.yaml"
    policy.write_text(yaml.safe_dump(_sales_policy()), encoding="utf-8")
    pki = _own_pki(
        start_proxy,
        tmp_path / "own-pki",
        roles={"cashier": {"policy": str(policy)}},
        routes={"pos": {"pool": {"mode": "transaction", "size": 4}}},
    )
    first_certificate = _served_certificate(pki)
    errors: list[str] = []
    committed = [0] * 4
    stop = threading.Event()

    def till(number: int, reconnect_each_time: bool) -> None:
        connection: psycopg.Connection | None = None
        seq = 0
        while not stop.is_set():
            seq += 1
            try:
                if connection is None:
                    connection = psycopg.connect(**pki.conninfo(pki.honest), autocommit=True)
                with connection.transaction():
                    connection.execute("INSERT INTO reload_sales (till, seq) VALUES (%s, %s)", (number, seq))
                    connection.execute("SELECT count(*) FROM reload_sales WHERE till = %s", (number,))
                committed[number] += 1
            except psycopg.Error as exc:
                errors.append(f"till {number}: {exc.sqlstate}: {exc}")
            if reconnect_each_time and connection is not None:
                connection.close()
                connection = None
            time.sleep(0.01)
        if connection is not None:
            connection.close()

    tills = [threading.Thread(target=till, args=(n, n % 2 == 0), daemon=True) for n in range(4)]
    for thread in tills:
        thread.start()
    rounds = 4
    try:
        for round_number in range(rounds):
            time.sleep(1)
            # A new server certificate (the old one revoked: that rewrites the CRL too) and a new policy.
            served = x509.load_der_x509_certificate(_served_certificate(pki))
            certs.revoke(pki.directory, served.serial_number, reason=x509.ReasonFlags.superseded)
            certs.issue_server(pki.directory, dns_names=["localhost"], ip_addresses=["127.0.0.1"])
            readable = ("reload_stock",) if round_number % 2 == 0 else ()
            policy.write_text(yaml.safe_dump(_sales_policy(*readable)), encoding="utf-8")
            pki.proxy.signal(signal.SIGHUP)
            _wait_until(
                lambda done=round_number: (
                    sum(1 for r in pki.proxy.log_events() if r.get("event") == "reload_applied") > done
                ),
                10,
            )
        time.sleep(1)
    finally:
        stop.set()
        for thread in tills:
            thread.join(20)
    assert not any(thread.is_alive() for thread in tills)
    assert errors == []
    assert all(count > 10 for count in committed), committed
    assert not [r for r in pki.proxy.log_events() if r.get("event") == "reload_failed"]
    # The new certificate is the one presented, and the last policy (no reload_stock) is in force.
    assert _served_certificate(pki) != first_certificate
    with psycopg.connect(**pki.conninfo(pki.honest), autocommit=True) as connection:
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            connection.execute("SELECT item FROM reload_stock")
        assert connection.execute("SELECT count(*) FROM reload_sales").fetchone() == (sum(committed),)
