"""A route presents a client certificate to a database whose pg_hba.conf requires one
(clientcert=verify-full), and a reload rotates it: routes.<db>.sslcert / sslkey / sslpassword."""

from __future__ import annotations

import secrets
import shutil
import signal
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from proxy import certs
from proxy.localpg import LocalPostgres, LocalPostgresTLS
from tests.integration.proxyproc import ProxyProcess, Terminal, TerminalPKI

StartProxy = Callable[..., ProxyProcess]
_SERIAL_SQL = "SELECT client_dn, client_serial::text FROM pg_stat_ssl WHERE pid = pg_backend_pid()"


@dataclass(frozen=True, slots=True)
class ClientPair:
    cert: Path
    key: Path
    serial: int


@dataclass(frozen=True, slots=True)
class DatabaseClientCA:
    """The CA the database trusts for client certificates (its ssl_ca_file)."""

    directory: Path

    @property
    def cert(self) -> Path:
        return self.directory / "ca.pem"

    def issue(self, user: str, name: str) -> ClientPair:
        """A certificate whose CN is the database user, as clientcert=verify-full wants."""
        ca_cert = x509.load_pem_x509_certificate(self.cert.read_bytes())
        ca_key = serialization.load_pem_private_key((self.directory / "ca.key").read_bytes(), password=None)
        assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
        key = ec.generate_private_key(ec.SECP256R1())
        start = datetime.now(UTC) - timedelta(minutes=5)
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, user)]))
            .issuer_name(ca_cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(start)
            .not_valid_after(start + timedelta(days=2))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
            .sign(ca_key, hashes.SHA256())
        )
        pair = ClientPair(self.directory / f"{name}.crt", self.directory / f"{name}.key", cert.serial_number)
        pair.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        pair.key.touch(mode=0o600)
        pair.key.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        )
        return pair


@dataclass(frozen=True, slots=True)
class ClientCertCluster:
    server: LocalPostgres
    password_file: Path
    ca: DatabaseClientCA

    def route(self, **overrides: Any) -> dict[str, Any]:
        return {"port": self.server.port, "password": {"file": str(self.password_file)}, **overrides}


@pytest.fixture(scope="module")
def clientcert_cluster(
    pg_cluster: Any, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ClientCertCluster]:
    """A cluster (role pos_proxy owning database pos) whose every TCP login needs a client certificate
    that its client CA signed for the login's user name, on top of the SCRAM password."""
    directory = tmp_path_factory.mktemp("db-client-ca")
    certs.init_ca(directory, common_name="test database client CA")
    ca = DatabaseClientCA(directory)
    password = secrets.token_urlsafe(12)
    password_file = directory / "db-password"
    password_file.write_text(password, encoding="utf-8")
    server = LocalPostgres(
        tmp_path_factory.mktemp("clientcert-pg"),
        tls=LocalPostgresTLS(
            cert=pg_cluster.server.tls.cert,
            key=pg_cluster.server.tls.key,
            ca=ca.cert,
            require_client_certificate=True,
        ),
    )
    server.start()
    try:
        server.create_role("pos_proxy", password)
        server.create_database("pos", owner="pos_proxy")
        yield ClientCertCluster(server, password_file, ca)
    finally:
        server.stop()


def _connect(proxy: ProxyProcess, pki: TerminalPKI, terminal: Terminal | None = None) -> psycopg.Connection:
    return psycopg.connect(**proxy.conninfo(terminal or pki.cashier, pki.ca), autocommit=True)


def _client_serial(connection: psycopg.Connection) -> int:
    row = connection.execute(_SERIAL_SQL).fetchone()
    assert row is not None and row[0] == "/CN=pos_proxy"
    return int(row[1])


def test_without_a_client_certificate_the_server_refuses_the_proxy_and_the_terminal_gets_a_clean_error(
    start_proxy: StartProxy, terminal_pki: TerminalPKI, clientcert_cluster: ClientCertCluster
) -> None:
    proxy = start_proxy(routes={"pos": clientcert_cluster.route(pool={"connect_timeout": "2s"})})
    with pytest.raises(psycopg.OperationalError) as raised:
        _connect(proxy, terminal_pki).close()
    message = str(raised.value)
    assert "could not connect to the database server" in message
    for leak in (str(clientcert_cluster.server.port), "localhost", "pos_proxy", "certificate"):
        assert leak not in message, leak
    password = clientcert_cluster.password_file.read_text(encoding="utf-8")
    assert password not in message and password not in proxy.log_text()
    failure = proxy.wait_for_event("server_connect_failed")
    assert "requires a valid client certificate" in failure["error"]


@pytest.mark.parametrize("mode", ["session", "transaction"])
def test_route_with_a_client_certificate_connects_and_the_server_sees_it(
    start_proxy: StartProxy, terminal_pki: TerminalPKI, clientcert_cluster: ClientCertCluster, mode: str
) -> None:
    pair = clientcert_cluster.ca.issue("pos_proxy", f"proxy-{mode}")
    route = clientcert_cluster.route(sslcert=str(pair.cert), sslkey=str(pair.key), pool={"mode": mode})
    proxy = start_proxy(routes={"pos": route})
    with _connect(proxy, terminal_pki) as connection:
        assert connection.execute("SELECT current_user").fetchone() == ("pos_proxy",)
        assert _client_serial(connection) == pair.serial


def test_a_certificate_issued_for_another_user_is_refused_by_verify_full(
    start_proxy: StartProxy, terminal_pki: TerminalPKI, clientcert_cluster: ClientCertCluster
) -> None:
    pair = clientcert_cluster.ca.issue("someone_else", "someone-else")
    proxy = start_proxy(
        routes={"pos": clientcert_cluster.route(sslcert=str(pair.cert), sslkey=str(pair.key))}
    )
    with pytest.raises(psycopg.OperationalError, match="could not connect to the database server"):
        _connect(proxy, terminal_pki).close()
    # The server words a CN mismatch like a wrong password (its log says which).
    assert "28P01" in proxy.wait_for_event("server_connect_failed")["error"]


@pytest.mark.parametrize("mode", ["session", "transaction"])
def test_reload_rotates_the_client_certificate_for_new_server_connections_only(
    start_proxy: StartProxy,
    terminal_pki: TerminalPKI,
    clientcert_cluster: ClientCertCluster,
    tmp_path: Path,
    mode: str,
) -> None:
    ca = clientcert_cluster.ca
    old, new = ca.issue("pos_proxy", f"old-{mode}"), ca.issue("pos_proxy", f"new-{mode}")
    # The paths the config names stay; the files behind them are replaced, as a renewal job does.
    cert, key = tmp_path / "pos-db-client.crt", tmp_path / "pos-db-client.key"
    shutil.copyfile(old.cert, cert)
    shutil.copyfile(old.key, key)
    route = clientcert_cluster.route(sslcert=str(cert), sslkey=str(key), pool={"mode": mode, "size": 3})
    proxy = start_proxy(routes={"pos": route})
    with _connect(proxy, terminal_pki) as before:
        # An open transaction holds its server connection in either mode.
        before.execute("BEGIN")
        assert _client_serial(before) == old.serial
        shutil.copyfile(new.cert, cert)
        shutil.copyfile(new.key, key)
        proxy.signal(signal.SIGHUP)
        proxy.wait_for_event("upstream_client_certificate_reloaded", route="pos")
        # Another terminal: a terminal's share of a small transaction-mode pool is one connection.
        with _connect(proxy, terminal_pki, terminal_pki.manager) as after:
            assert _client_serial(after) == new.serial
        # The connection opened before the reload goes on as it was: same transaction, same pool.
        assert _client_serial(before) == old.serial
        before.execute("COMMIT")
        assert before.execute("SELECT 1").fetchone() == (1,)
    assert proxy.wait_for_event("reload_applied")["changed"] == ["routes"]


def test_a_reload_with_a_mismatched_pair_is_refused_and_the_old_pair_stays_in_use(
    start_proxy: StartProxy,
    terminal_pki: TerminalPKI,
    clientcert_cluster: ClientCertCluster,
    tmp_path: Path,
) -> None:
    ca = clientcert_cluster.ca
    good, other = ca.issue("pos_proxy", "good"), ca.issue("pos_proxy", "other")
    cert, key = tmp_path / "pos-db-client.crt", tmp_path / "pos-db-client.key"
    shutil.copyfile(good.cert, cert)
    shutil.copyfile(good.key, key)
    proxy = start_proxy(routes={"pos": clientcert_cluster.route(sslcert=str(cert), sslkey=str(key))})
    # A renewal job that has written the new certificate but not yet its key.
    shutil.copyfile(other.cert, cert)
    proxy.signal(signal.SIGHUP)
    failure = proxy.wait_for_event("reload_failed")
    assert f"routes.pos.sslkey: {key} is not the key of {cert}" in failure["error"]
    with _connect(proxy, terminal_pki) as connection:
        assert _client_serial(connection) == good.serial
