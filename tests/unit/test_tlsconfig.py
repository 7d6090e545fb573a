"""proxy.tlsconfig: the terminal TLS context and what it does with a current, an expired or a foreign CRL."""

from __future__ import annotations

import contextlib
import ssl
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from proxy import certs
from proxy.config.model import ExpiredCRLAction, TLSConfig
from proxy.tlsconfig import CRLError, CRLExpired, load_terminal_tls

AFTER_NEXT_UPDATE = datetime.now(UTC) + timedelta(days=8)  # certs signs CRLs for 7 days


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, int]:
    """A CA with a server certificate and a CRL revoking one terminal: (directory, revoked serial)."""
    directory = tmp_path_factory.mktemp("pki")
    certs.init_ca(directory)
    certs.issue_server(directory, dns_names=["localhost"], ip_addresses=["127.0.0.1"])
    stolen = certs.issue_terminal(directory, store="store-001", terminal="till-09", role="cashier")
    certs.revoke(directory, stolen.serial)
    return directory, stolen.serial


def _tls(directory: Path, **overrides: object) -> TLSConfig:
    values: dict[str, object] = {
        "cert": directory / "server.pem",
        "key": directory / "server.key",
        "client_ca": directory / "ca.pem",
        "crl": directory / "crl.pem",
    }
    values.update(overrides)
    return TLSConfig(**values)  # type: ignore[arg-type]


def test_a_current_crl_is_checked_by_openssl(pki: tuple[Path, int]) -> None:
    directory, stolen = pki
    terminal_tls = load_terminal_tls(_tls(directory))
    assert terminal_tls.context.verify_flags & ssl.VERIFY_CRL_CHECK_LEAF
    assert terminal_tls.crl is not None
    assert stolen in terminal_tls.crl.revoked
    assert not terminal_tls.crl.expired()
    assert not terminal_tls.kept
    assert not terminal_tls.revokes(stolen)  # OpenSSL refuses it in the handshake


def test_an_expired_crl_is_kept_by_the_proxy_with_keep_last(pki: tuple[Path, int]) -> None:
    directory, stolen = pki
    terminal_tls = load_terminal_tls(_tls(directory), now=AFTER_NEXT_UPDATE)
    # OpenSSL would fail every handshake against it (X509_V_ERR_CRL_HAS_EXPIRED): it does not get it.
    assert not terminal_tls.context.verify_flags & ssl.VERIFY_CRL_CHECK_LEAF
    assert terminal_tls.kept
    assert terminal_tls.revokes(stolen)
    assert not terminal_tls.revokes(stolen + 1)


def test_an_expired_crl_is_refused_with_refuse(pki: tuple[Path, int]) -> None:
    directory, _ = pki
    with pytest.raises(CRLExpired, match=r"crl\.pem expired at .* UTC"):
        load_terminal_tls(_tls(directory, expired_crl=ExpiredCRLAction.REFUSE), now=AFTER_NEXT_UPDATE)


def test_a_kept_crl_is_used_instead_of_an_unreadable_file(pki: tuple[Path, int], tmp_path: Path) -> None:
    directory, stolen = pki
    in_force = load_terminal_tls(_tls(directory)).crl
    assert in_force is not None
    broken = tmp_path / "crl.pem"
    broken.write_text("half a CRL", encoding="utf-8")
    with pytest.raises(CRLError):
        load_terminal_tls(_tls(directory, crl=broken))
    terminal_tls = load_terminal_tls(_tls(directory, crl=broken), now=AFTER_NEXT_UPDATE, kept=in_force)
    assert terminal_tls.kept
    assert terminal_tls.revokes(stolen)


def test_a_crl_from_another_ca_is_refused(pki: tuple[Path, int], tmp_path: Path) -> None:
    directory, _ = pki
    certs.init_ca(tmp_path / "other")
    with pytest.raises(CRLError, match=r"not signed by a CA in tls\.client_ca"):
        load_terminal_tls(_tls(directory, crl=tmp_path / "other" / "crl.pem"))


def _pump(source: ssl.MemoryBIO, target: ssl.MemoryBIO) -> None:
    if source.pending:
        target.write(source.read())


def test_terminals_get_no_session_tickets(pki: tuple[Path, int]) -> None:
    # libpq never resumes; a ticket would cost each handshake and each idle connection for nothing.
    directory, _ = pki
    till = certs.issue_terminal(directory, store="store-001", terminal="till-01", role="cashier")
    server_context = load_terminal_tls(_tls(directory)).context
    client_context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client_context.load_verify_locations(directory / "ca.pem")
    client_context.load_cert_chain(till.cert_path, till.key_path)
    to_server, to_client = ssl.MemoryBIO(), ssl.MemoryBIO()
    from_server, from_client = ssl.MemoryBIO(), ssl.MemoryBIO()
    server = server_context.wrap_bio(to_server, from_server, server_side=True)
    client = client_context.wrap_bio(to_client, from_client, server_hostname="localhost")
    for _ in range(10):
        for side in (client, server):
            with contextlib.suppress(ssl.SSLWantReadError):
                side.do_handshake()
        _pump(from_client, to_server)
        _pump(from_server, to_client)
    assert client.version() == "TLSv1.3"
    server.write(b"ready")  # a TLS 1.3 server sends its tickets after the handshake, before this
    _pump(from_server, to_client)
    assert client.read(5) == b"ready"
    assert client.session is not None and not client.session.has_ticket
    assert server.getpeercert() is not None  # the terminal's certificate was verified in full
