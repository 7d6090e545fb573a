"""proxy.tlsconfig: the terminal TLS context and what it does with a current, an expired or a foreign CRL."""

from __future__ import annotations

import ssl
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from proxy import certs
from proxy.config import ExpiredCRLAction, TLSConfig
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
