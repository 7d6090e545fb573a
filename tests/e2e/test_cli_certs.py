"""``pos-proxy certs ...`` run as a user would: files, permissions, serials, the CRL, the listing."""

from __future__ import annotations

import re
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from tests.e2e.conftest import Cli, Pki

pytestmark = pytest.mark.e2e

SERIAL_LINE = re.compile(r"[0-9a-f]+")


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def load_cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def load_crl(path: Path) -> x509.CertificateRevocationList:
    return x509.load_pem_x509_crl(path.read_bytes())


def crl_number(crl: x509.CertificateRevocationList) -> int:
    return crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number


def issue_terminal(cli: Cli, store: str, terminal: str, role: str = "cashier") -> str:
    result = cli.ok(
        "certs", "issue-terminal", "--dir", "pki", "--store", store, "--terminal", terminal, "--role", role
    )
    lines = result.stdout.splitlines()
    assert len(lines) == 1, f"stdout must be the serial alone, one line:\n{result.describe()}"
    assert SERIAL_LINE.fullmatch(lines[0]), result.describe()
    return lines[0]


def list_rows(cli: Cli) -> list[dict[str, str]]:
    result = cli.ok("certs", "list", "--dir", "pki")
    header, *lines = result.stdout.splitlines()
    columns = header.split()
    assert columns == ["KIND", "SERIAL", "STATUS", "STORE", "TERMINAL", "ROLE", "NOT", "AFTER", "SUBJECT"]
    rows = []
    for line in lines:
        kind, serial, status, store, terminal, role, not_after, subject = line.split(None, 7)
        rows.append(
            {
                "kind": kind,
                "serial": serial,
                "status": status,
                "store": store,
                "terminal": terminal,
                "role": role,
                "not_after": not_after,
                "subject": subject,
            }
        )
    return rows


# --- init-ca ----------------------------------------------------------------------------------------------


def test_init_ca_creates_ca_key_and_empty_crl(cli: Cli, tmp_path: Path) -> None:
    result = cli.ok("certs", "init-ca", "--dir", "pki")
    pki = tmp_path / "pki"
    assert "pki/ca.pem" in result.stdout

    ca = load_cert(pki / "ca.pem")
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert mode(pki / "ca.key") == 0o600
    assert mode(pki) & 0o077 == 0, "the PKI directory holds private keys: not for other users"

    crl = load_crl(pki / "crl.pem")
    assert crl.issuer == ca.subject
    assert crl.is_signature_valid(ca.public_key())
    assert len(crl) == 0


def test_init_ca_refuses_to_replace_an_existing_ca(cli: Cli, tmp_path: Path) -> None:
    cli.ok("certs", "init-ca", "--dir", "pki")
    before = (tmp_path / "pki" / "ca.pem").read_bytes()

    result = cli.fails("certs", "init-ca", "--dir", "pki")
    assert "already exists" in result.stderr
    assert "--force" in result.stderr
    assert (tmp_path / "pki" / "ca.pem").read_bytes() == before

    cli.ok("certs", "init-ca", "--dir", "pki", "--force")
    assert (tmp_path / "pki" / "ca.pem").read_bytes() != before


# --- issue-server -----------------------------------------------------------------------------------------


def test_issue_server_with_dns_names_and_ip_addresses(cli: Cli, tmp_path: Path) -> None:
    cli.ok("certs", "init-ca", "--dir", "pki")
    result = cli.ok(
        "certs",
        "issue-server",
        "--dir",
        "pki",
        "--dns",
        "localhost",
        "proxy.store.example",
        "--ip",
        "127.0.0.1",
        "::1",
    )
    pki = tmp_path / "pki"
    cert = load_cert(pki / "server.pem")
    assert f"{cert.serial_number:x}" in result.stdout
    assert mode(pki / "server.key") == 0o600

    cert.verify_directly_issued_by(load_cert(pki / "ca.pem"))
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sorted(sans.get_values_for_type(x509.DNSName)) == ["localhost", "proxy.store.example"]
    assert sorted(map(str, sans.get_values_for_type(x509.IPAddress))) == ["127.0.0.1", "::1"]
    usage = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert ExtendedKeyUsageOID.SERVER_AUTH in usage


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ((), "at least one DNS name or IP address"),
        (("--ip", "300.1.1.1"), "invalid IP address"),
        (("--dns", "bad_name!"), "invalid DNS name"),
    ],
)
def test_issue_server_rejects_bad_names(
    cli: Cli, tmp_path: Path, args: tuple[str, ...], message: str
) -> None:
    cli.ok("certs", "init-ca", "--dir", "pki")
    result = cli.fails("certs", "issue-server", "--dir", "pki", *args)
    assert message in result.stderr
    assert not (tmp_path / "pki" / "server.pem").exists()


# --- issue-terminal ---------------------------------------------------------------------------------------


def test_issue_terminal_prints_the_serial_and_writes_cert_and_key(cli: Cli, pki: Pki) -> None:
    serial = issue_terminal(cli, "store-001", "till-01", "cashier")

    cert_path = pki.directory / "terminals" / "store-001-till-01.pem"
    key_path = pki.directory / "terminals" / "store-001-till-01.key"
    assert mode(key_path) == 0o600
    cert = load_cert(cert_path)
    assert cert.serial_number == int(serial, 16)
    cert.verify_directly_issued_by(load_cert(pki.ca))

    assert cert.subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME)[0].value == "cashier"
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.UniformResourceIdentifier) == [
        "urn:pos-db-proxy:terminal:store-001:till-01"
    ]
    usage = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert ExtendedKeyUsageOID.CLIENT_AUTH in usage


def test_issuing_the_same_terminal_twice_fails_clearly(cli: Cli, pki: Pki) -> None:
    serial = issue_terminal(cli, "store-001", "till-01")
    cert_path = pki.directory / "terminals" / "store-001-till-01.pem"
    before = cert_path.read_bytes()

    result = cli.fails(
        "certs", "issue-terminal", "--dir", "pki", "--store", "store-001", "--terminal", "till-01",
        "--role", "manager",
    )  # fmt: skip
    assert "already exists" in result.stderr
    assert "revoke it first" in result.stderr
    assert serial in result.stderr
    assert result.stdout == "", "no serial may be printed for a certificate that was not issued"
    assert cert_path.read_bytes() == before
    assert [row["serial"] for row in list_rows(cli) if row["kind"] == "terminal"] == [serial]


def test_a_revoked_terminal_can_be_issued_again(cli: Cli, pki: Pki) -> None:
    old = issue_terminal(cli, "store-001", "till-01")
    cli.ok("certs", "revoke", "--dir", "pki", "--serial", old)

    new = issue_terminal(cli, "store-001", "till-01")

    assert new != old
    assert load_cert(pki.directory / "terminals" / "store-001-till-01.pem").serial_number == int(new, 16)
    statuses = {row["serial"]: row["status"] for row in list_rows(cli)}
    assert statuses[old] == "revoked"
    assert statuses[new] == "valid"


def test_terminals_whose_file_names_would_collide_are_refused_clearly(cli: Cli, pki: Pki) -> None:
    first = issue_terminal(cli, "store-1", "a")
    clash = cli(
        "certs",
        "issue-terminal",
        "--dir",
        "pki",
        "--store",
        "store",
        "--terminal",
        "1-a",
        "--role",
        "cashier",
    )
    assert clash.returncode == 1
    assert "belongs to terminal store-1/a" in clash.stderr
    cli.ok("certs", "revoke", "--dir", "pki", "--serial", first)
    # Even revoked, the other terminal's files are never overwritten by a different terminal.
    again = cli(
        "certs",
        "issue-terminal",
        "--dir",
        "pki",
        "--store",
        "store",
        "--terminal",
        "1-a",
        "--role",
        "cashier",
    )
    assert again.returncode == 1


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("--store", "store 001", "invalid store id"),
        ("--store", "../etc", "invalid store id"),
        ("--store", "", "invalid store id"),
        ("--store", "s" * 65, "invalid store id"),
        ("--terminal", "till/01", "invalid terminal id"),
        ("--role", "Cashier", "invalid role"),
    ],
)
def test_issue_terminal_rejects_bad_ids(cli: Cli, pki: Pki, option: str, value: str, message: str) -> None:
    ids = {"--store": "store-001", "--terminal": "till-01", "--role": "cashier", option: value}
    argv = [item for pair in ids.items() for item in pair]
    result = cli.fails("certs", "issue-terminal", "--dir", "pki", *argv)
    assert message in result.stderr
    assert result.stdout == ""
    assert not list(pki.directory.glob("terminals/*"))
    assert [row for row in list_rows(cli) if row["kind"] == "terminal"] == []


@pytest.mark.parametrize(
    "command",
    [
        ("issue-terminal", "--store", "store-001", "--terminal", "till-01", "--role", "cashier"),
        ("issue-server", "--dns", "localhost"),
        ("revoke", "--serial", "1a2b"),
        ("list",),
    ],
    ids=lambda command: command[0],
)
def test_commands_without_a_ca_point_to_init_ca(cli: Cli, tmp_path: Path, command: tuple[str, ...]) -> None:
    name, *rest = command
    result = cli.fails("certs", name, "--dir", "pki", *rest)
    assert "no CA in pki" in result.stderr
    assert "pos-proxy certs init-ca --dir pki" in result.stderr
    assert not (tmp_path / "pki" / "terminals").exists()


def test_issue_terminal_in_an_existing_empty_directory_points_to_init_ca(cli: Cli, tmp_path: Path) -> None:
    (tmp_path / "pki").mkdir()
    result = cli.fails(
        "certs", "issue-terminal", "--dir", "pki", "--store", "s", "--terminal", "t", "--role", "cashier"
    )
    assert "pos-proxy certs init-ca --dir pki" in result.stderr


# --- revoke and list --------------------------------------------------------------------------------------


def serial_forms(serial: str) -> dict[str, str]:
    padded = serial.zfill(len(serial) + len(serial) % 2)
    return {
        "plain": serial,
        "0x-upper": "0x" + serial.upper(),
        "colons": ":".join(padded[i : i + 2] for i in range(0, len(padded), 2)),
    }


@pytest.mark.parametrize("form", ["plain", "0x-upper", "colons"])
def test_revoke_rewrites_the_crl_with_that_serial(cli: Cli, pki: Pki, form: str) -> None:
    revoked = issue_terminal(cli, "store-001", "till-01")
    kept = issue_terminal(cli, "store-001", "till-02")
    number_before = crl_number(load_crl(pki.crl))

    result = cli.ok("certs", "revoke", "--dir", "pki", "--serial", serial_forms(revoked)[form])

    assert f"revoked serial {revoked}" in result.stdout
    assert "crl.pem" in result.stdout
    ca = load_cert(pki.ca)
    crl = load_crl(pki.crl)
    assert crl.is_signature_valid(ca.public_key())
    assert crl.issuer == ca.subject
    assert crl_number(crl) > number_before
    entry = crl.get_revoked_certificate_by_serial_number(int(revoked, 16))
    assert entry is not None
    assert crl.get_revoked_certificate_by_serial_number(int(kept, 16)) is None
    assert [e.serial_number for e in crl] == [int(revoked, 16)]


def test_revoking_twice_keeps_one_entry(cli: Cli, pki: Pki) -> None:
    serial = issue_terminal(cli, "store-001", "till-01")
    cli.ok("certs", "revoke", "--dir", "pki", "--serial", serial)
    first = load_crl(pki.crl).get_revoked_certificate_by_serial_number(int(serial, 16))
    cli.ok("certs", "revoke", "--dir", "pki", "--serial", serial)
    crl = load_crl(pki.crl)
    assert [e.serial_number for e in crl] == [int(serial, 16)]
    assert first is not None
    entry = crl.get_revoked_certificate_by_serial_number(int(serial, 16))
    assert entry is not None
    assert entry.revocation_date_utc == first.revocation_date_utc


@pytest.mark.parametrize(
    ("serial", "message"),
    [("abc123", "no issued certificate with serial 0xabc123"), ("xyz", "invalid serial")],
)
def test_revoke_unknown_or_malformed_serial_fails(cli: Cli, pki: Pki, serial: str, message: str) -> None:
    issue_terminal(cli, "store-001", "till-01")
    before = pki.crl.read_bytes()
    result = cli.fails("certs", "revoke", "--dir", "pki", "--serial", serial)
    assert message in result.stderr
    assert pki.crl.read_bytes() == before


def test_list_shows_revoked_and_valid_certificates(cli: Cli, pki: Pki) -> None:
    server_serial = f"{load_cert(pki.server_cert).serial_number:x}"
    revoked = issue_terminal(cli, "store-001", "till-01", "cashier")
    valid = issue_terminal(cli, "store-002", "office-01", "manager")
    cli.ok("certs", "revoke", "--dir", "pki", "--serial", revoked)

    rows = {row["serial"]: row for row in list_rows(cli)}

    assert set(rows) == {server_serial, revoked, valid}
    assert rows[revoked]["status"] == "revoked"
    assert (
        rows[revoked]["kind"],
        rows[revoked]["store"],
        rows[revoked]["terminal"],
        rows[revoked]["role"],
    ) == (
        "terminal",
        "store-001",
        "till-01",
        "cashier",
    )
    assert rows[valid]["status"] == "valid"
    assert (rows[valid]["store"], rows[valid]["terminal"], rows[valid]["role"]) == (
        "store-002",
        "office-01",
        "manager",
    )
    assert rows[server_serial]["status"] == "valid"
    assert rows[server_serial]["kind"] == "server"


def test_crl_command_re_signs_the_crl_keeping_revocations(cli: Cli, pki: Pki) -> None:
    serial = issue_terminal(cli, "store-001", "till-01")
    cli.ok("certs", "revoke", "--dir", "pki", "--serial", serial)
    before = load_crl(pki.crl)

    result = cli.ok("certs", "crl", "--dir", "pki")

    assert "CRL re-signed" in result.stdout
    after = load_crl(pki.crl)
    assert after.is_signature_valid(load_cert(pki.ca).public_key())
    assert crl_number(after) > crl_number(before)
    assert after.next_update_utc is not None and before.next_update_utc is not None
    assert after.next_update_utc >= before.next_update_utc
    assert [entry.serial_number for entry in after] == [int(serial, 16)]
