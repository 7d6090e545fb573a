"""A certificate whose identity fields are ambiguous is refused, whatever order its fields come in.

The attacker here holds a certificate the terminal CA really signed (a mis-issued one, or one
from a CA process that copies requested subject fields): it names two roles or two terminals,
hoping the proxy picks the more powerful one by field order.
"""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import psycopg
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from tests.integration.proxyproc import ProxyProcess, Terminal, TerminalPKI

STORE = "store-001"


def _uri(terminal: str) -> x509.UniformResourceIdentifier:
    return x509.UniformResourceIdentifier(f"urn:pos-db-proxy:terminal:{STORE}:{terminal}")


def mint(pki: TerminalPKI, directory: Path, name: str, roles: list[str], uris: list[str]) -> Terminal:
    """A client certificate signed by the proxy's own terminal CA, with the given OUs and SAN URIs."""
    ca_cert = x509.load_pem_x509_certificate(pki.ca.read_bytes())
    ca_key = serialization.load_pem_private_key((pki.directory / "ca.key").read_bytes(), password=None)
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, STORE),
            *(x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, role) for role in roles),
            x509.NameAttribute(NameOID.COMMON_NAME, f"{STORE}-{name}"),
        ]
    )
    now = datetime.now(UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName([_uri(uri) for uri in uris]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    cert_path, key_path = directory / f"{name}.pem", directory / f"{name}.key"
    cert_path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    key_path.chmod(0o600)
    return Terminal(STORE, name, roles[0], cert_path, key_path, f"{certificate.serial_number:x}")


def _connect(proxy: ProxyProcess, pki: TerminalPKI, terminal: Terminal) -> psycopg.Connection:
    return psycopg.connect(**proxy.conninfo(terminal, pki.ca), autocommit=True)


def _refusals(proxy: ProxyProcess) -> list[dict[str, object]]:
    return [record for record in proxy.log_events() if record.get("event") == "session_refused"]


def _next_refusal(proxy: ProxyProcess, seen: int, timeout: float = 10.0) -> dict[str, object]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        refusals = _refusals(proxy)
        if len(refusals) > seen:
            return refusals[seen]
        time.sleep(0.05)
    raise AssertionError(f"no new session_refused in the proxy log:\n{proxy.log_text()[-4000:]}")


def test_a_minted_certificate_with_one_role_and_one_terminal_is_accepted(
    proxy: ProxyProcess, terminal_pki: TerminalPKI, tmp_path: Path
) -> None:
    # The control: the same minting as the attacks below, unambiguous, gets in with its identity.
    terminal = mint(terminal_pki, tmp_path, "till-minted", ["cashier"], ["till-minted"])
    with _connect(proxy, terminal_pki, terminal) as connection:
        assert connection.execute("SELECT 1").fetchone() == (1,)
    started = proxy.wait_for_event("session_start", terminal="till-minted")
    assert (started["store"], started["role"]) == (STORE, "cashier")


@pytest.mark.parametrize(
    ("roles", "uris"),
    [
        pytest.param(["cashier", "manager"], ["till-two-roles"], id="two-roles"),
        pytest.param(["manager", "cashier"], ["till-two-roles-swapped"], id="two-roles-swapped"),
        pytest.param(["cashier"], ["till-two-uris", "office-01"], id="two-terminals"),
        pytest.param(["cashier"], ["office-01", "till-two-uris-swapped"], id="two-terminals-swapped"),
    ],
)
def test_a_certificate_with_ambiguous_identity_fields_is_refused(
    proxy: ProxyProcess, terminal_pki: TerminalPKI, tmp_path: Path, roles: list[str], uris: list[str]
) -> None:
    name = uris[-1]
    field = "san_uri" if len(uris) > 1 else "subject.OU"
    terminal = mint(terminal_pki, tmp_path, name, roles, uris)
    seen = len(_refusals(proxy))
    with pytest.raises(psycopg.OperationalError) as raised:
        _connect(proxy, terminal_pki, terminal).close()
    message = str(raised.value)
    assert "the terminal certificate is not accepted" in message
    assert "ambiguous" not in message and "manager" not in message  # the reason stays in the log
    refusal = _next_refusal(proxy, seen)
    assert refusal["sqlstate"] == "28000"
    assert str(refusal["reason"]).startswith(
        f"certificate is ambiguous: {field} has several matching values: "
    )
    assert not [
        record
        for record in proxy.log_events()
        if record.get("event") == "session_start" and record.get("serial") == terminal.serial_hex
    ]
    # A terminal with an honest certificate is not affected.
    with _connect(proxy, terminal_pki, terminal_pki.cashier) as connection:
        assert connection.execute("SELECT 2").fetchone() == (2,)


def test_the_audit_log_records_why_an_ambiguous_certificate_was_refused(
    start_proxy: Callable[..., ProxyProcess], terminal_pki: TerminalPKI, tmp_path: Path
) -> None:
    key = tmp_path / "audit.key"
    key.touch(mode=0o600)
    key.write_bytes(secrets.token_bytes(32))
    audit = tmp_path / "audit.log"
    proxy = start_proxy(audit={"file": str(audit), "key_file": str(key)})
    terminal = mint(terminal_pki, tmp_path, "till-audited", ["manager", "cashier"], ["till-audited"])
    with pytest.raises(psycopg.OperationalError, match="the terminal certificate is not accepted"):
        _connect(proxy, terminal_pki, terminal).close()
    assert proxy.stop() == 0
    records = [json.loads(line) for line in audit.read_text().splitlines()]
    (refused,) = [record for record in records if record["event"] == "connection_refused"]
    assert refused["outcome"] == "failure" and refused["sqlstate"] == "28000"
    assert refused["reason"] == (
        "certificate is ambiguous: subject.OU has several matching values: 'manager', 'cashier'"
    )
    assert not [record for record in records if record["event"] == "connection_accepted"]
