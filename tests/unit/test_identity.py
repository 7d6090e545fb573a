"""proxy.identity: a verified terminal certificate -> Identity, under the configured identity mapping."""

from __future__ import annotations

import hashlib
import re
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from proxy import certs
from proxy.config.load import parse_config
from proxy.config.model import IdentityConfig, IdentitySource, UserNameRule
from proxy.identity import Identity, IdentityError, check_user_name, identify

ROLES = frozenset({"cashier", "manager"})
CN_MAPPING = [
    {"field": "subject.CN", "pattern": r"^(?P<store>[^-]+)-(?P<terminal>.+)$"},
    {"field": "subject.OU", "pattern": r"^(?P<role>[a-z][a-z0-9_]*)$"},
]


def der_of(path: Path) -> bytes:
    return x509.load_pem_x509_certificate(path.read_bytes()).public_bytes(serialization.Encoding.DER)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("identity") / "pki"
    certs.init_ca(directory)
    return directory


@pytest.fixture(scope="module")
def cashier(pki: Path) -> certs.IssuedCert:
    return certs.issue_terminal(pki, store="s001", terminal="t07", role="cashier")


@pytest.fixture(scope="module")
def cashier_der(cashier: certs.IssuedCert) -> bytes:
    return der_of(cashier.cert_path)


def config_identity(tmp_path: Path, identity: dict[str, Any] | None = None) -> IdentityConfig:
    """The IdentityConfig parse_config makes of a minimal config with an optional identity section."""
    for name in ("proxy.crt", "proxy.key", "terminal-ca.crt", "db-ca.crt"):
        (tmp_path / name).write_text("-----BEGIN PLACEHOLDER-----\n")
    data: dict[str, Any] = {
        "tls": {"cert": "proxy.crt", "key": "proxy.key", "client_ca": "terminal-ca.crt"},
        "roles": {"cashier": None},
        "routes": {"pos": {"host": "db.example.internal", "user": "pos_proxy", "sslrootcert": "db-ca.crt"}},
    }
    if identity is not None:
        data["identity"] = identity
    return parse_config(data, base_dir=tmp_path, environ={}).identity


def foreign_cert(
    subject: list[tuple[x509.ObjectIdentifier, str]], sans: list[x509.GeneralName] | None = None
) -> bytes:
    """A self-signed certificate from some other PKI, DER encoded."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(oid, value) for oid, value in subject])
    now = datetime.now(UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(0x1234ABCD)
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(days=1))
    )
    if sans is not None:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    return builder.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.DER)


def identity(store: str = "s001", terminal: str = "t07", role: str = "cashier") -> Identity:
    return Identity(store, terminal, role, serial=1, fingerprint_sha256="00", subject="CN=x")


# --- default mapping ---------------------------------------------------------------------------------------


def test_issued_terminal_certificate_maps_to_its_identity(
    cashier: certs.IssuedCert, cashier_der: bytes
) -> None:
    certificate = x509.load_der_x509_certificate(cashier_der)

    found = identify(cashier_der, IdentityConfig(), ROLES)

    assert (found.store, found.terminal, found.role) == ("s001", "t07", "cashier")
    assert found.serial == cashier.serial == certificate.serial_number
    assert found.serial_hex == f"{certificate.serial_number:x}"
    assert found.fingerprint_sha256 == hashlib.sha256(cashier_der).hexdigest()
    assert found.fingerprint_sha256 == certificate.fingerprint(hashes.SHA256()).hex()
    assert found.subject == "CN=s001-t07,OU=cashier,O=s001"
    assert found.terminal_key == "s001/t07"


def test_config_without_identity_section_uses_the_mapping_for_issued_certificates(
    tmp_path: Path, cashier_der: bytes
) -> None:
    mapping = config_identity(tmp_path)

    assert mapping.user_name is UserNameRule.IGNORE
    assert [source.field for source in mapping.sources] == ["san_uri", "subject.OU"]
    assert identify(cashier_der, mapping, ROLES) == identify(cashier_der, IdentityConfig(), ROLES)


def test_terminal_ids_with_dashes_and_underscores_map(pki: Path) -> None:
    issued = certs.issue_terminal(pki, store="store_9", terminal="till-2", role="manager")

    found = identify(der_of(issued.cert_path), IdentityConfig(), ROLES)

    assert (found.store, found.terminal, found.role) == ("store_9", "till-2", "manager")


def test_role_not_configured_is_refused(cashier_der: bytes) -> None:
    with pytest.raises(IdentityError, match="'cashier' is not a configured role"):
        identify(cashier_der, IdentityConfig(), {"manager"})


def test_foreign_certificate_without_san_uri_has_no_store_or_terminal() -> None:
    der = foreign_cert(
        [(NameOID.COMMON_NAME, "s001-t07"), (NameOID.ORGANIZATIONAL_UNIT_NAME, "cashier")],
        sans=[x509.DNSName("till.example")],
    )

    with pytest.raises(IdentityError, match="no store, terminal under the identity mapping"):
        identify(der, IdentityConfig(), ROLES)


def test_foreign_certificate_without_any_extension_has_no_store_or_terminal() -> None:
    der = foreign_cert([(NameOID.COMMON_NAME, "s001-t07"), (NameOID.ORGANIZATIONAL_UNIT_NAME, "cashier")])

    with pytest.raises(IdentityError, match="no store, terminal"):
        identify(der, IdentityConfig(), ROLES)


def test_role_that_does_not_fit_the_pattern_is_missing() -> None:
    der = foreign_cert(
        [(NameOID.COMMON_NAME, "x"), (NameOID.ORGANIZATIONAL_UNIT_NAME, "Cashiers")],
        sans=[x509.UniformResourceIdentifier("urn:pos-db-proxy:terminal:s1:t1")],
    )

    with pytest.raises(IdentityError, match="no role"):
        identify(der, IdentityConfig(), ROLES)


def test_values_that_do_not_fit_the_pattern_are_ignored() -> None:
    der = foreign_cert(
        [(NameOID.ORGANIZATIONAL_UNIT_NAME, "Retail Ops"), (NameOID.ORGANIZATIONAL_UNIT_NAME, "cashier")],
        sans=[
            x509.UniformResourceIdentifier("https://vendor.example/device/42"),
            x509.UniformResourceIdentifier("urn:pos-db-proxy:terminal:s1:t1"),
        ],
    )

    found = identify(der, IdentityConfig(), ROLES)

    assert (found.store, found.terminal, found.role) == ("s1", "t1", "cashier")
    assert found.serial == 0x1234ABCD


TERMINAL_URI = x509.UniformResourceIdentifier("urn:pos-db-proxy:terminal:s1:t1")


@pytest.mark.parametrize(
    ("subject", "sans", "field"),
    [
        pytest.param(
            [(NameOID.ORGANIZATIONAL_UNIT_NAME, "cashier"), (NameOID.ORGANIZATIONAL_UNIT_NAME, "manager")],
            [TERMINAL_URI],
            "subject.OU",
            id="two-role-ous",
        ),
        pytest.param(
            [(NameOID.ORGANIZATIONAL_UNIT_NAME, "manager"), (NameOID.ORGANIZATIONAL_UNIT_NAME, "cashier")],
            [TERMINAL_URI],
            "subject.OU",
            id="two-role-ous-other-order",
        ),
        pytest.param(
            [(NameOID.ORGANIZATIONAL_UNIT_NAME, "cashier"), (NameOID.ORGANIZATIONAL_UNIT_NAME, "cashier")],
            [TERMINAL_URI],
            "subject.OU",
            id="the-same-role-twice",
        ),
        pytest.param(
            [(NameOID.ORGANIZATIONAL_UNIT_NAME, "cashier")],
            [TERMINAL_URI, x509.UniformResourceIdentifier("urn:pos-db-proxy:terminal:s2:office")],
            "san_uri",
            id="two-terminal-uris",
        ),
        pytest.param(
            [(NameOID.ORGANIZATIONAL_UNIT_NAME, "cashier")],
            [TERMINAL_URI, x509.DNSName("till.example"), TERMINAL_URI],
            "san_uri",
            id="the-same-uri-twice",
        ),
    ],
)
def test_a_field_with_several_matching_values_is_refused(
    subject: list[tuple[x509.ObjectIdentifier, str]], sans: list[x509.GeneralName], field: str
) -> None:
    der = foreign_cert([(NameOID.COMMON_NAME, "s1-t1"), *subject], sans=sans)

    with pytest.raises(IdentityError, match=rf"certificate is ambiguous: {re.escape(field)} has several"):
        identify(der, IdentityConfig(), ROLES)


def test_a_multi_valued_rdn_with_two_roles_is_refused() -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name(
        [
            x509.RelativeDistinguishedName(
                [
                    x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, "cashier"),
                    x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, "manager"),
                ]
            )
        ]
    )
    now = datetime.now(UTC)
    der = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(7)
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([TERMINAL_URI]), critical=False)
        .sign(key, hashes.SHA256())
        .public_bytes(serialization.Encoding.DER)
    )

    with pytest.raises(IdentityError, match=r"ambiguous: subject\.OU has several matching values"):
        identify(der, IdentityConfig(), ROLES)


@pytest.mark.parametrize(
    "common_names",
    [pytest.param(["s1-t1", "s1-t2"], id="two-terminals"), pytest.param(["s1-t1", "s2-t1"], id="two-stores")],
)
def test_custom_mapping_with_two_matching_common_names_is_refused(
    tmp_path: Path, common_names: list[str]
) -> None:
    mapping = config_identity(tmp_path, {"sources": CN_MAPPING})
    der = foreign_cert(
        [
            *((NameOID.COMMON_NAME, name) for name in common_names),
            (NameOID.ORGANIZATIONAL_UNIT_NAME, "cashier"),
        ]
    )

    with pytest.raises(IdentityError, match=r"ambiguous: subject\.CN has several matching values: 's1-t1', "):
        identify(der, mapping, ROLES)


# --- custom mappings ---------------------------------------------------------------------------------------


def test_custom_subject_mapping_from_config_works_for_a_foreign_certificate(tmp_path: Path) -> None:
    mapping = config_identity(tmp_path, {"sources": CN_MAPPING, "user_name": "match-terminal"})
    der = foreign_cert(
        [(NameOID.COMMON_NAME, "berlin7-till-3"), (NameOID.ORGANIZATIONAL_UNIT_NAME, "manager")]
    )

    found = identify(der, mapping, ROLES)

    assert (found.store, found.terminal, found.role) == ("berlin7", "till-3", "manager")
    assert mapping.user_name is UserNameRule.MATCH_TERMINAL
    assert found.subject == "OU=manager,CN=berlin7-till-3"


def test_custom_subject_mapping_works_for_an_issued_certificate(tmp_path: Path, pki: Path) -> None:
    mapping = config_identity(tmp_path, {"sources": CN_MAPPING})
    issued = certs.issue_terminal(pki, store="s002", terminal="t-9", role="cashier")

    found = identify(der_of(issued.cert_path), mapping, ROLES)

    assert (found.store, found.terminal, found.role) == ("s002", "t-9", "cashier")


def test_san_dns_source() -> None:
    mapping = IdentityConfig(
        (
            IdentitySource("san_dns", re.compile(r"^(?P<terminal>[^.]+)\.(?P<store>[^.]+)\.pos\.example$")),
            IdentitySource("subject.O", re.compile(r"^(?P<role>[a-z]+)$")),
        )
    )
    der = foreign_cert(
        [(NameOID.ORGANIZATION_NAME, "cashier")], sans=[x509.DNSName("till4.hamburg.pos.example")]
    )

    found = identify(der, mapping, ROLES)

    assert (found.store, found.terminal, found.role) == ("hamburg", "till4", "cashier")


def test_sources_that_agree_on_a_field_are_fine(cashier_der: bytes) -> None:
    mapping = IdentityConfig(
        (*IdentityConfig().sources, IdentitySource("subject.CN", re.compile(CN_MAPPING[0]["pattern"])))
    )

    found = identify(cashier_der, mapping, ROLES)

    assert (found.store, found.terminal) == ("s001", "t07")


def test_sources_that_disagree_are_refused(cashier_der: bytes) -> None:
    # CN "s001-t07" read the other way round claims store t07, terminal s001.
    swapped = IdentitySource("subject.CN", re.compile(r"^(?P<terminal>[^-]+)-(?P<store>.+)$"))
    mapping = IdentityConfig((*IdentityConfig().sources, swapped))

    with pytest.raises(IdentityError, match=r"disagree on terminal: 't07' vs 's001'"):
        identify(cashier_der, mapping, ROLES)


def test_san_and_subject_naming_different_terminals_are_refused() -> None:
    der = foreign_cert(
        [(NameOID.COMMON_NAME, "s1-t2"), (NameOID.ORGANIZATIONAL_UNIT_NAME, "cashier")],
        sans=[x509.UniformResourceIdentifier("urn:pos-db-proxy:terminal:s1:t1")],
    )
    mapping = IdentityConfig(
        (*IdentityConfig().sources, IdentitySource("subject.CN", re.compile(CN_MAPPING[0]["pattern"])))
    )

    with pytest.raises(IdentityError, match="disagree on terminal: 't1' vs 't2'"):
        identify(der, mapping, ROLES)


def test_optional_group_that_did_not_take_part_is_skipped() -> None:
    mapping = IdentityConfig(
        (
            IdentitySource("subject.CN", re.compile(r"^(?P<store>[^-]+)(?:-(?P<terminal>.+))?$")),
            IdentitySource("subject.serialNumber", re.compile(r"^(?P<terminal>T\d+)$")),
            IdentitySource("subject.OU", re.compile(r"^(?P<role>.+)$")),
        )
    )
    der = foreign_cert(
        [
            (NameOID.COMMON_NAME, "s5"),
            (NameOID.SERIAL_NUMBER, "T100"),
            (NameOID.ORGANIZATIONAL_UNIT_NAME, "cashier"),
        ]
    )

    found = identify(der, mapping, ROLES)

    assert (found.store, found.terminal, found.role) == ("s5", "T100", "cashier")


def test_unknown_field_is_an_identity_error(cashier_der: bytes) -> None:
    mapping = IdentityConfig((IdentitySource("issuer.CN", re.compile(r"^(?P<store>.+)$")),))

    with pytest.raises(IdentityError, match=r"unknown identity field 'issuer\.CN'"):
        identify(cashier_der, mapping, ROLES)


# --- user names --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("user_name", ["", "t07", "cashier", "anything"])
def test_user_name_rule_ignore_accepts_any_user_name(user_name: str) -> None:
    assert check_user_name(identity(), user_name, UserNameRule.IGNORE) is None


def test_user_name_rule_match_terminal() -> None:
    assert check_user_name(identity(), "t07", UserNameRule.MATCH_TERMINAL) is None
    for wrong in ("cashier", "s001", "s001/t07", "T07", ""):
        reason = check_user_name(identity(), wrong, UserNameRule.MATCH_TERMINAL)
        assert reason is not None
        assert "match-terminal" in reason
        assert repr(wrong) in reason


def test_user_name_rule_match_role() -> None:
    assert check_user_name(identity(), "cashier", UserNameRule.MATCH_ROLE) is None
    for wrong in ("t07", "manager", "Cashier", ""):
        reason = check_user_name(identity(), wrong, UserNameRule.MATCH_ROLE)
        assert reason is not None
        assert "match-role" in reason


def test_user_name_rule_applies_to_an_identified_certificate(cashier_der: bytes) -> None:
    found = identify(cashier_der, IdentityConfig(user_name=UserNameRule.MATCH_ROLE), ROLES)

    assert check_user_name(found, "cashier", UserNameRule.MATCH_ROLE) is None
    assert check_user_name(found, "t07", UserNameRule.MATCH_ROLE) is not None
    assert check_user_name(found, "t07", UserNameRule.MATCH_TERMINAL) is None
