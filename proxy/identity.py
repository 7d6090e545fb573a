"""Terminal certificate -> Identity(store, terminal, role, serial, fingerprint), per the identity mapping."""

from __future__ import annotations

import hashlib
from collections.abc import Collection
from dataclasses import dataclass, field

from cryptography import x509
from cryptography.x509.oid import NameOID

from proxy.config.model import IdentityConfig, UserNameRule

_SUBJECT_FIELDS = {
    "subject.CN": NameOID.COMMON_NAME,
    "subject.O": NameOID.ORGANIZATION_NAME,
    "subject.OU": NameOID.ORGANIZATIONAL_UNIT_NAME,
    "subject.L": NameOID.LOCALITY_NAME,
    "subject.ST": NameOID.STATE_OR_PROVINCE_NAME,
    "subject.C": NameOID.COUNTRY_NAME,
    "subject.serialNumber": NameOID.SERIAL_NUMBER,
}


class IdentityError(Exception):
    """The certificate cannot be mapped to a terminal; the text is the reason for the log."""


@dataclass(frozen=True, slots=True)
class Identity:
    store: str
    terminal: str
    role: str
    serial: int
    fingerprint_sha256: str
    subject: str
    # store/terminal: the key of the terminal's limits and of its share of a pool, read on every
    # hand-over, so made once.
    terminal_key: str = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "terminal_key", f"{self.store}/{self.terminal}")

    @property
    def serial_hex(self) -> str:
        return f"{self.serial:x}"


def identify(certificate_der: bytes, mapping: IdentityConfig, roles: Collection[str]) -> Identity:
    """Map a verified client certificate to an Identity, or raise IdentityError saying why not."""
    certificate = x509.load_der_x509_certificate(certificate_der)
    found: dict[str, str] = {}
    for source in mapping.sources:
        matches = [
            match
            for value in _field_values(certificate, source.field)
            if (match := source.pattern.fullmatch(value)) is not None
        ]
        if len(matches) > 1:
            # Two values fit (two role OUs, two terminal URIs): picking one by its position in
            # the certificate would let whoever ordered the fields choose the identity.
            values = ", ".join(repr(match.string) for match in matches)
            raise IdentityError(
                f"certificate is ambiguous: {source.field} has several matching values: {values}"
            )
        for match in matches:
            for name, captured in match.groupdict().items():
                if captured is None:
                    continue
                if found.setdefault(name, captured) != captured:
                    raise IdentityError(
                        f"certificate fields disagree on {name}: {found[name]!r} vs {captured!r}"
                    )
    missing = [name for name in ("store", "terminal", "role") if name not in found]
    if missing:
        raise IdentityError(f"certificate carries no {', '.join(missing)} under the identity mapping")
    if found["role"] not in roles:
        raise IdentityError(f"certificate role {found['role']!r} is not a configured role")
    return Identity(
        store=found["store"],
        terminal=found["terminal"],
        role=found["role"],
        serial=certificate.serial_number,
        fingerprint_sha256=hashlib.sha256(certificate_der).hexdigest(),
        subject=certificate.subject.rfc4514_string(),
    )


def check_user_name(identity: Identity, user_name: str, rule: UserNameRule) -> str | None:
    """Return why the startup packet's user name is refused under ``rule``, or None if it is fine."""
    if rule is UserNameRule.IGNORE:
        return None
    expected = identity.terminal if rule is UserNameRule.MATCH_TERMINAL else identity.role
    if user_name != expected:
        return f"startup user {user_name!r} does not match the certificate ({rule.value})"
    return None


def _field_values(certificate: x509.Certificate, field: str) -> list[str]:
    if field in _SUBJECT_FIELDS:
        return [
            str(attribute.value)
            for attribute in certificate.subject.get_attributes_for_oid(_SUBJECT_FIELDS[field])
        ]
    try:
        names = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    if field == "san_uri":
        return names.get_values_for_type(x509.UniformResourceIdentifier)
    if field == "san_dns":
        return names.get_values_for_type(x509.DNSName)
    raise IdentityError(f"unknown identity field {field!r}")
