"""proxy.certs: the CA, server and terminal certificates and the CRL the proxy trusts."""

from __future__ import annotations

import ipaddress
import json
import ssl
import stat
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from proxy import certs
from proxy.certs import CertsError, IssuedCert


@pytest.fixture
def pki(tmp_path: Path) -> Path:
    directory = tmp_path / "pki"
    certs.init_ca(directory)
    return directory


def _cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def _crl(directory: Path) -> x509.CertificateRevocationList:
    return x509.load_pem_x509_crl((directory / "crl.pem").read_bytes())


def _crl_number(crl: x509.CertificateRevocationList) -> int:
    return crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _ca_ski(directory: Path) -> bytes:
    ca = _cert(directory / "ca.pem")
    return ca.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value.digest


def _terminal(directory: Path, terminal: str = "t1", **kwargs: Any) -> IssuedCert:
    return certs.issue_terminal(directory, store="s1", terminal=terminal, role="cashier", **kwargs)


def test_init_ca_writes_a_p256_ca_a_private_key_and_an_empty_signed_crl(tmp_path: Path) -> None:
    directory = tmp_path / "new" / "pki"

    ca_path = certs.init_ca(directory, common_name="Test CA")

    assert ca_path == directory / "ca.pem"
    assert _mode(directory) == 0o700
    assert _mode(directory / "ca.key") == 0o600
    assert b"BEGIN PRIVATE KEY" in (directory / "ca.key").read_bytes()
    ca = _cert(ca_path)
    assert ca.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "Test CA"
    key = ca.public_key()
    assert isinstance(key, ec.EllipticCurvePublicKey)
    assert isinstance(key.curve, ec.SECP256R1)
    assert isinstance(ca.signature_hash_algorithm, hashes.SHA256)
    constraints = ca.extensions.get_extension_for_class(x509.BasicConstraints)
    assert constraints.critical
    assert constraints.value.ca
    assert constraints.value.path_length == 0
    usage = ca.extensions.get_extension_for_class(x509.KeyUsage)
    assert usage.critical
    assert usage.value.key_cert_sign
    assert usage.value.crl_sign
    assert not usage.value.digital_signature
    ca.verify_directly_issued_by(ca)
    crl = _crl(directory)
    assert len(crl) == 0
    assert crl.is_signature_valid(key)
    assert _crl_number(crl) == 1
    assert certs.list_issued(directory) == []


def test_init_ca_refuses_to_replace_a_ca_unless_forced(pki: Path) -> None:
    before = (pki / "ca.pem").read_bytes()
    _terminal(pki)

    with pytest.raises(CertsError, match="already exists"):
        certs.init_ca(pki)
    assert (pki / "ca.pem").read_bytes() == before

    certs.init_ca(pki, force=True)
    assert (pki / "ca.pem").read_bytes() != before
    # The old CA's certificates no longer chain, so the registry and the CRL start over.
    assert certs.list_issued(pki) == []
    assert _crl_number(_crl(pki)) == 1
    # The old CA's terminal file is dead weight, so re-issuing over it needs no revocation.
    _cert(_terminal(pki).cert_path).verify_directly_issued_by(_cert(pki / "ca.pem"))


def test_server_certificate_has_the_sans_and_chains_to_the_ca(pki: Path) -> None:
    issued = certs.issue_server(
        pki, dns_names=["localhost", "proxy.example"], ip_addresses=["127.0.0.1", "::1"]
    )

    assert issued.kind == "server"
    assert issued.cert_path == pki / "server.pem"
    assert issued.key_path == pki / "server.key"
    assert issued.subject == "CN=localhost"
    assert (issued.store, issued.terminal, issued.role) == (None, None, None)
    assert _mode(issued.key_path) == 0o600
    assert len(x509.load_pem_x509_certificates(issued.cert_path.read_bytes())) == 1
    cert = _cert(issued.cert_path)
    cert.verify_directly_issued_by(_cert(pki / "ca.pem"))
    assert cert.serial_number == issued.serial
    assert issued.not_before == cert.not_valid_before_utc
    assert issued.not_after - issued.not_before == timedelta(days=certs.DEFAULT_SERVER_DAYS)
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["localhost", "proxy.example"]
    assert san.get_values_for_type(x509.IPAddress) == [
        ipaddress.ip_address("127.0.0.1"),
        ipaddress.ip_address("::1"),
    ]
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.SERVER_AUTH]
    assert cert.extensions.get_extension_for_class(x509.KeyUsage).value.digital_signature
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    aki = cert.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    assert aki.key_identifier == _ca_ski(pki)


def test_server_certificate_is_reissued_in_place(pki: Path) -> None:
    first = certs.issue_server(pki, dns_names=["localhost"], ip_addresses=[])
    second = certs.issue_server(pki, dns_names=[], ip_addresses=["10.0.0.5"], common_name="proxy")

    assert _cert(pki / "server.pem").serial_number == second.serial != first.serial
    assert second.subject == "CN=proxy"
    # The replaced certificate stays registered so it can still be revoked.
    assert {c.serial for c in certs.list_issued(pki)} == {first.serial, second.serial}


@pytest.mark.parametrize(
    ("dns_names", "ip_addresses", "message"),
    [
        ([], [], "at least one"),
        (["localhost"], ["10.0.0.300"], "invalid IP address '10.0.0.300'"),
        (["localhost"], ["10.0.0.0/8"], "invalid IP address"),
        (["bad name"], [], "invalid DNS name 'bad name'"),
        (["-leading.example"], [], "invalid DNS name"),
    ],
)
def test_server_certificate_rejects_bad_names(
    pki: Path, dns_names: list[str], ip_addresses: list[str], message: str
) -> None:
    with pytest.raises(CertsError, match=message):
        certs.issue_server(pki, dns_names=dns_names, ip_addresses=ip_addresses)
    assert not (pki / "server.pem").exists()


def test_terminal_certificate_carries_the_identity_and_chains_to_the_ca(pki: Path) -> None:
    issued = certs.issue_terminal(pki, store="store-042", terminal="lane_7", role="cashier")

    assert issued.cert_path == pki / "terminals" / "store-042-lane_7.pem"
    assert issued.key_path == pki / "terminals" / "store-042-lane_7.key"
    assert (issued.kind, issued.store, issued.terminal, issued.role) == (
        "terminal",
        "store-042",
        "lane_7",
        "cashier",
    )
    assert _mode(issued.key_path) == 0o600
    cert = _cert(issued.cert_path)
    cert.verify_directly_issued_by(_cert(pki / "ca.pem"))
    assert issued.subject == cert.subject.rfc4514_string()
    assert cert.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)[0].value == "store-042"
    assert cert.subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME)[0].value == "cashier"
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "store-042-lane_7"
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == [
        f"{certs.TERMINAL_URI_PREFIX}store-042:lane_7"
    ]
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    assert issued.not_after - issued.not_before == timedelta(days=certs.DEFAULT_TERMINAL_DAYS)
    assert issued.status() == "valid"


@pytest.mark.parametrize(
    ("store", "terminal", "role", "message"),
    [
        ("a b", "t1", "cashier", r"invalid store id 'a b': use letters, digits, '-', '_' \(1-64 chars\)"),
        ("s" * 65, "t1", "cashier", "invalid store id"),
        ("s1", "", "cashier", "invalid terminal id ''"),
        ("s1", "t1/../x", "cashier", "invalid terminal id"),
        ("s1", "t1\n", "cashier", "invalid terminal id"),
        ("s1", "t1", "Cashier", "invalid role 'Cashier'"),
        ("s1", "t1", "1st", "invalid role"),
        ("s1", "t1", "r" * 64, "invalid role"),
    ],
)
def test_terminal_ids_are_validated(pki: Path, store: str, terminal: str, role: str, message: str) -> None:
    with pytest.raises(CertsError, match=message):
        certs.issue_terminal(pki, store=store, terminal=terminal, role=role)
    assert certs.list_issued(pki) == []


def test_not_before_mints_expired_and_not_yet_valid_certificates(pki: Path) -> None:
    now = datetime.now(UTC)

    expired = _terminal(pki, "old", not_before=now - timedelta(days=10), days=1)
    future = _terminal(pki, "new", not_before=now + timedelta(days=1))

    assert expired.status() == "expired"
    assert future.status() == "not yet valid"
    assert future.status(now + timedelta(days=2)) == "valid"
    assert _cert(expired.cert_path).not_valid_after_utc < now


def test_live_terminal_certificate_is_not_overwritten_until_revoked(pki: Path) -> None:
    first = _terminal(pki)

    with pytest.raises(CertsError, match=r"certificate already exists: .*revoke it first"):
        _terminal(pki)
    assert _cert(first.cert_path).serial_number == first.serial

    certs.revoke(pki, first.serial)
    second = _terminal(pki)
    assert _cert(second.cert_path).serial_number == second.serial != first.serial


def test_expired_terminal_certificate_may_be_replaced(pki: Path) -> None:
    _terminal(pki, not_before=datetime.now(UTC) - timedelta(days=10), days=1)

    assert _terminal(pki).status() == "valid"


def test_ids_joined_by_dash_that_share_a_file_name_do_not_overwrite_each_other(pki: Path) -> None:
    certs.issue_terminal(pki, store="a-b", terminal="c", role="cashier")

    with pytest.raises(CertsError, match="belongs to terminal a-b/c"):
        certs.issue_terminal(pki, store="a", terminal="b-c", role="cashier")


def test_revoke_writes_a_ca_signed_crl_with_every_revoked_serial(pki: Path) -> None:
    ca_key = _cert(pki / "ca.pem").public_key()
    assert isinstance(ca_key, ec.EllipticCurvePublicKey)
    first, second, kept = _terminal(pki, "t1"), _terminal(pki, "t2"), _terminal(pki, "t3")

    revoked = certs.revoke(pki, first.serial)
    assert revoked.revoked
    assert revoked.serial == first.serial
    crl = _crl(pki)
    assert crl.is_signature_valid(ca_key)
    assert _crl_number(crl) == 2
    entry = crl.get_revoked_certificate_by_serial_number(first.serial)
    assert entry is not None
    assert entry.extensions.get_extension_for_class(x509.CRLReason).value.reason == (
        x509.ReasonFlags.key_compromise
    )
    assert crl.next_update_utc is not None
    assert crl.next_update_utc - datetime.now(UTC) > timedelta(days=6, hours=23)
    assert crl.last_update_utc <= datetime.now(UTC)
    aki = crl.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    assert aki.key_identifier == _ca_ski(pki)

    certs.revoke(pki, second.serial, reason=x509.ReasonFlags.superseded)
    crl = _crl(pki)
    assert crl.is_signature_valid(ca_key)
    assert _crl_number(crl) == 3
    assert {r.serial_number for r in crl} == {first.serial, second.serial}
    assert crl.get_revoked_certificate_by_serial_number(kept.serial) is None


def test_revoking_twice_is_idempotent_but_re_signs_the_crl(pki: Path) -> None:
    issued = _terminal(pki)
    certs.revoke(pki, issued.serial)
    revoked_at = _crl(pki).get_revoked_certificate_by_serial_number(issued.serial)

    certs.revoke(pki, issued.serial, reason=x509.ReasonFlags.cessation_of_operation)

    crl = _crl(pki)
    assert _crl_number(crl) == 3
    assert len(crl) == 1
    again = crl.get_revoked_certificate_by_serial_number(issued.serial)
    assert again is not None
    assert revoked_at is not None
    assert again.revocation_date_utc == revoked_at.revocation_date_utc
    assert again.extensions.get_extension_for_class(x509.CRLReason).value.reason == (
        x509.ReasonFlags.key_compromise
    )


def test_unspecified_reason_is_left_out_and_remove_from_crl_is_refused(pki: Path) -> None:
    issued = _terminal(pki)

    with pytest.raises(CertsError, match="removeFromCRL"):
        certs.revoke(pki, issued.serial, reason=x509.ReasonFlags.remove_from_crl)
    certs.revoke(pki, issued.serial, reason=x509.ReasonFlags.unspecified)

    entry = _crl(pki).get_revoked_certificate_by_serial_number(issued.serial)
    assert entry is not None
    assert len(entry.extensions) == 0


def test_revoke_of_an_unknown_serial_fails(pki: Path) -> None:
    with pytest.raises(CertsError, match="no issued certificate with serial 0xabc"):
        certs.revoke(pki, 0xABC)
    assert _crl_number(_crl(pki)) == 1


def test_write_crl_re_signs_with_a_higher_number(pki: Path) -> None:
    issued = _terminal(pki)
    certs.revoke(pki, issued.serial)

    assert certs.write_crl(pki) == pki / "crl.pem"

    crl = _crl(pki)
    assert _crl_number(crl) == 3
    assert crl.get_revoked_certificate_by_serial_number(issued.serial) is not None


def test_list_issued_reports_status_sorted_by_kind_then_start(pki: Path) -> None:
    now = datetime.now(UTC)
    # Distinct start times: certificates minted within the same second have no defined order.
    revoked = _terminal(pki, "t1", not_before=now - timedelta(days=2))
    valid = _terminal(pki, "t2", not_before=now - timedelta(days=1))
    expired = _terminal(pki, "t3", not_before=now - timedelta(days=30), days=1)
    server = certs.issue_server(pki, dns_names=["localhost"], ip_addresses=[])
    certs.revoke(pki, revoked.serial)

    listed = certs.list_issued(pki)

    assert [c.serial for c in listed] == [server.serial, expired.serial, revoked.serial, valid.serial]
    assert [c.status() for c in listed] == ["valid", "expired", "revoked", "valid"]
    assert listed[2].serial_hex == f"{revoked.serial:x}"
    assert listed[2].cert_path == revoked.cert_path


def test_index_records_certificates_and_revocations_relative_to_the_directory(pki: Path) -> None:
    issued = _terminal(pki)
    certs.revoke(pki, issued.serial)

    index = json.loads((pki / "index.json").read_text())

    (record,) = index["certs"]
    assert record["kind"] == "terminal"
    assert record["serial"] == issued.serial_hex
    assert record["cert"] == "terminals/s1-t1.pem"
    assert record["key"] == "terminals/s1-t1.key"
    assert (record["store"], record["terminal"], record["role"]) == ("s1", "t1", "cashier")
    assert datetime.fromisoformat(record["not_after"]) == issued.not_after
    (revocation,) = index["revocations"]
    assert revocation["serial"] == issued.serial_hex
    assert revocation["reason"] == "keyCompromise"
    assert not list(pki.glob(".*.tmp")), "atomic writes must not leave temporary files behind"


def test_operations_without_a_ca_say_how_to_create_one(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    empty = tmp_path / "empty"
    empty.mkdir()
    expected = r"no CA in .*: run `pos-proxy certs init-ca --dir .*` first"

    for directory in (missing, empty):
        with pytest.raises(CertsError, match=expected):
            certs.issue_server(directory, dns_names=["localhost"], ip_addresses=[])
        with pytest.raises(CertsError, match=expected):
            certs.issue_terminal(directory, store="s1", terminal="t1", role="cashier")
        with pytest.raises(CertsError, match=expected):
            certs.revoke(directory, 1)
        with pytest.raises(CertsError, match=expected):
            certs.list_issued(directory)
        with pytest.raises(CertsError, match=expected):
            certs.write_crl(directory)


def test_a_ca_without_subject_key_identifier_still_gets_a_matching_authority_key_id(pki: Path) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "foreign CA")])
    now = datetime.now(UTC)
    foreign = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(days=1))
        .not_valid_after(now + timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(key, hashes.SHA256())
    )
    (pki / "ca.pem").write_bytes(foreign.public_bytes(serialization.Encoding.PEM))
    (pki / "ca.key").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )

    cert = _cert(_terminal(pki).cert_path)

    cert.verify_directly_issued_by(foreign)
    aki = cert.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    assert aki == x509.AuthorityKeyIdentifier.from_issuer_public_key(key.public_key())


def test_non_positive_validity_is_refused(pki: Path) -> None:
    with pytest.raises(CertsError, match="invalid validity 0 days"):
        _terminal(pki, days=0)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("0x1a2b", 0x1A2B),
        ("0X1A2B", 0x1A2B),
        ("1a2b", 0x1A2B),
        ("1A:2B", 0x1A2B),
        ("  7f:00:3c\n", 0x7F003C),
    ],
)
def test_parse_serial_accepts_openssl_forms(text: str, expected: int) -> None:
    assert certs.parse_serial(text) == expected


@pytest.mark.parametrize("text", ["", "0x", "xyz", "1a2g", "1A::2B", ":1a", "1a:", "-1", "0x-1"])
def test_parse_serial_rejects_garbage(text: str) -> None:
    with pytest.raises(CertsError, match="invalid serial"):
        certs.parse_serial(text)


def test_serial_round_trips_through_serial_hex(pki: Path) -> None:
    issued = _terminal(pki)

    assert certs.parse_serial(issued.serial_hex) == issued.serial
    assert certs.parse_serial(f"0x{issued.serial_hex}") == issued.serial


# --- end to end: the files work as-is for stdlib TLS with a CRL-checking server ---------------------


def _server_context(directory: Path) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(directory / "server.pem", directory / "server.key")
    context.verify_mode = ssl.CERT_REQUIRED
    context.load_verify_locations(cafile=directory / "ca.pem")
    context.load_verify_locations(cafile=directory / "crl.pem")
    context.verify_flags |= ssl.VERIFY_CRL_CHECK_LEAF
    return context


def _client_context(directory: Path, terminal: IssuedCert) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=directory / "ca.pem")
    context.load_cert_chain(terminal.cert_path, terminal.key_path)
    return context


def _handshake(server_context: ssl.SSLContext, client_context: ssl.SSLContext) -> dict[str, Any]:
    """Run a TLS handshake in memory (no sockets, no threads) and return the client cert the server saw."""
    to_server, to_client = ssl.MemoryBIO(), ssl.MemoryBIO()
    server_out, client_out = ssl.MemoryBIO(), ssl.MemoryBIO()
    server = server_context.wrap_bio(to_server, server_out, server_side=True)
    client = client_context.wrap_bio(to_client, client_out, server_hostname="localhost")
    pending = [client, server]
    # A TLS 1.3 handshake takes two round trips; the bound turns a stuck exchange into a failure.
    for _ in range(10):
        for side in list(pending):
            try:
                side.do_handshake()
                pending.remove(side)
            except ssl.SSLWantReadError:
                pass
        to_server.write(client_out.read())
        to_client.write(server_out.read())
        if not pending:
            peer = server.getpeercert()
            assert peer is not None
            return peer
    raise AssertionError("TLS handshake did not complete")


def test_tls_server_accepts_a_valid_terminal_and_refuses_it_once_revoked(pki: Path) -> None:
    certs.issue_server(pki, dns_names=["localhost"], ip_addresses=["127.0.0.1"])
    terminal = _terminal(pki)
    other = _terminal(pki, "t2")

    peer = _handshake(_server_context(pki), _client_context(pki, terminal))
    assert ("URI", f"{certs.TERMINAL_URI_PREFIX}s1:t1") in peer["subjectAltName"]

    certs.revoke(pki, terminal.serial)
    # An SSLContext keeps the CRL it loaded; only a fresh context sees the new one.
    server_context = _server_context(pki)
    with pytest.raises(ssl.SSLError, match="certificate revoked"):
        _handshake(server_context, _client_context(pki, terminal))
    _handshake(server_context, _client_context(pki, other))


def test_tls_server_refuses_an_expired_terminal(pki: Path) -> None:
    certs.issue_server(pki, dns_names=["localhost"], ip_addresses=[])
    expired = _terminal(pki, not_before=datetime.now(UTC) - timedelta(days=10), days=1)

    with pytest.raises(ssl.SSLError, match="certificate has expired"):
        _handshake(_server_context(pki), _client_context(pki, expired))
