"""Dev/ops PKI for terminals: CA, server and terminal certificates, revocation and CRL (used by the CLI and the demo)."""  # noqa: E501

from __future__ import annotations

import fcntl
import ipaddress
import json
import os
import re
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID, ObjectIdentifier

DEFAULT_CA_DAYS = 3650
DEFAULT_SERVER_DAYS = 825
DEFAULT_TERMINAL_DAYS = 397
TERMINAL_URI_PREFIX = "urn:pos-db-proxy:terminal:"

_CA_CERT = "ca.pem"
_CA_KEY = "ca.key"
_CRL = "crl.pem"
_INDEX = "index.json"
_LOCK = ".lock"
_SERVER_CERT = "server.pem"
_SERVER_KEY = "server.key"
_TERMINALS = "terminals"
_INDEX_VERSION = 1

_CRL_VALIDITY = timedelta(days=7)
# Terminal, proxy and CA host clocks drift; a certificate or CRL that starts "now" would be
# rejected as not yet valid by any peer running a few seconds behind.
_CLOCK_SKEW = timedelta(minutes=5)

_ID_RE = re.compile(r"[A-Za-z0-9_-]{1,64}")
_ROLE_RE = re.compile(r"[a-z][a-z0-9_]{0,62}")
_DNS_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_DNS_RE = re.compile(rf"{_DNS_LABEL}(?:\.{_DNS_LABEL})*")
_SERIAL_RE = re.compile(r"(?:0[xX])?([0-9A-Fa-f]+(?::[0-9A-Fa-f]+)*)")


class CertsError(Exception):
    """A PKI operation failed; the message is meant for the operator as is."""


@dataclass(frozen=True, slots=True)
class IssuedCert:
    kind: str
    serial: int
    subject: str
    not_before: datetime
    not_after: datetime
    cert_path: Path
    key_path: Path
    store: str | None
    terminal: str | None
    role: str | None
    revoked: bool

    @property
    def serial_hex(self) -> str:
        return f"{self.serial:x}"

    def status(self, now: datetime | None = None) -> str:
        at = datetime.now(UTC) if now is None else now
        if self.revoked:
            return "revoked"
        if at > self.not_after:
            return "expired"
        if at < self.not_before:
            return "not yet valid"
        return "valid"


@dataclass(frozen=True, slots=True)
class _Record:
    """One line of the registry; paths are relative so the directory can be moved or mounted elsewhere."""

    kind: str
    serial: int
    subject: str
    not_before: datetime
    not_after: datetime
    cert: str
    key: str
    store: str | None
    terminal: str | None
    role: str | None


@dataclass(frozen=True, slots=True)
class _Revocation:
    serial: int
    revoked_at: datetime
    reason: x509.ReasonFlags


@dataclass(slots=True)
class _Registry:
    crl_number: int = 0
    certs: list[_Record] = field(default_factory=list)
    revocations: dict[int, _Revocation] = field(default_factory=dict)


def init_ca(
    directory: Path,
    *,
    common_name: str = "pos-db-proxy dev CA",
    days: int = DEFAULT_CA_DAYS,
    force: bool = False,
) -> Path:
    _check_days(days)
    _check_common_name(common_name)
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    with _exclusive(directory):
        cert_path = directory / _CA_CERT
        if not force and (cert_path.exists() or (directory / _CA_KEY).exists()):
            raise CertsError(
                f"a CA already exists in {directory}: use --force to replace it "
                "(every certificate it issued stops working)"
            )
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
        start = datetime.now(UTC) - _CLOCK_SKEW
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(start)
            .not_valid_after(start + timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(_key_usage(key_cert_sign=True, crl_sign=True), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256())
        )
        _write_atomic(directory / _CA_KEY, _key_pem(key), 0o600)
        _write_atomic(cert_path, cert.public_bytes(serialization.Encoding.PEM), 0o644)
        # Certificates of a replaced CA no longer chain to anything, so the registry starts over.
        _sign_crl(directory, _Registry(), cert, key)
    return cert_path


def issue_server(
    directory: Path,
    *,
    dns_names: Sequence[str],
    ip_addresses: Sequence[str],
    days: int = DEFAULT_SERVER_DAYS,
    common_name: str | None = None,
) -> IssuedCert:
    _check_days(days)
    sans: list[x509.GeneralName] = [x509.DNSName(_check_dns_name(name)) for name in dns_names]
    sans += [x509.IPAddress(_parse_ip(address)) for address in ip_addresses]
    if not sans:
        raise CertsError("a server certificate needs at least one DNS name or IP address")
    cn = common_name if common_name is not None else [*dns_names, *ip_addresses][0]
    _check_common_name(cn)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    with _exclusive(directory):
        ca_cert, ca_key = _load_ca(directory)
        registry = _load_registry(directory)
        cert, key = _build_leaf(
            ca_cert,
            ca_key,
            subject=subject,
            sans=sans,
            usage=ExtendedKeyUsageOID.SERVER_AUTH,
            not_before=datetime.now(UTC) - _CLOCK_SKEW,
            days=days,
        )
        return _store_leaf(
            directory, registry, cert, key, kind="server", cert_rel=_SERVER_CERT, key_rel=_SERVER_KEY
        )


def issue_terminal(
    directory: Path,
    *,
    store: str,
    terminal: str,
    role: str,
    days: int = DEFAULT_TERMINAL_DAYS,
    not_before: datetime | None = None,
) -> IssuedCert:
    _check_id("store", store)
    _check_id("terminal", terminal)
    if not _ROLE_RE.fullmatch(role):
        raise CertsError(
            f"invalid role {role!r}: use lowercase letters, digits, '_', starting with a letter (1-63 chars)"
        )
    _check_days(days)
    if not_before is not None and not_before.tzinfo is None:
        raise ValueError("not_before must be timezone-aware")
    start = datetime.now(UTC) - _CLOCK_SKEW if not_before is None else not_before
    subject = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, store),
            x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, role),
            x509.NameAttribute(NameOID.COMMON_NAME, f"{store}-{terminal}"),
        ]
    )
    uri = x509.UniformResourceIdentifier(f"{TERMINAL_URI_PREFIX}{store}:{terminal}")
    cert_rel = f"{_TERMINALS}/{store}-{terminal}.pem"
    key_rel = f"{_TERMINALS}/{store}-{terminal}.key"
    with _exclusive(directory):
        ca_cert, ca_key = _load_ca(directory)
        registry = _load_registry(directory)
        _refuse_name_clash(registry, cert_rel, store, terminal)
        _refuse_live_overwrite(directory / cert_rel, ca_cert, registry)
        (directory / _TERMINALS).mkdir(mode=0o700, exist_ok=True)
        cert, key = _build_leaf(
            ca_cert,
            ca_key,
            subject=subject,
            sans=[uri],
            usage=ExtendedKeyUsageOID.CLIENT_AUTH,
            not_before=start,
            days=days,
        )
        return _store_leaf(
            directory,
            registry,
            cert,
            key,
            kind="terminal",
            cert_rel=cert_rel,
            key_rel=key_rel,
            store=store,
            terminal=terminal,
            role=role,
        )


def revoke(
    directory: Path, serial: int, *, reason: x509.ReasonFlags = x509.ReasonFlags.key_compromise
) -> IssuedCert:
    if reason is x509.ReasonFlags.remove_from_crl:
        # OpenSSL reads a removeFromCRL entry as "not revoked": accepting it would silently revoke nothing.
        raise CertsError("reason removeFromCRL only applies to delta CRLs; pick another reason")
    with _exclusive(directory):
        ca_cert, ca_key = _load_ca(directory)
        registry = _load_registry(directory)
        record = next((r for r in registry.certs if r.serial == serial), None)
        if record is None:
            raise CertsError(f"no issued certificate with serial 0x{serial:x}")
        # The first revocation time and reason stand: they are what auditors and the CRL should show.
        registry.revocations.setdefault(serial, _Revocation(serial, datetime.now(UTC), reason))
        _sign_crl(directory, registry, ca_cert, ca_key)
    return _issued(directory, record, revoked=True)


def list_issued(directory: Path) -> list[IssuedCert]:
    if not (directory / _CA_CERT).exists():
        raise CertsError(_no_ca_message(directory))
    registry = _load_registry(directory)
    issued = [_issued(directory, r, r.serial in registry.revocations) for r in registry.certs]
    return sorted(issued, key=lambda c: (c.kind, c.not_before, c.serial))


def write_crl(directory: Path) -> Path:
    with _exclusive(directory):
        ca_cert, ca_key = _load_ca(directory)
        return _sign_crl(directory, _load_registry(directory), ca_cert, ca_key)


def parse_serial(text: str) -> int:
    match = _SERIAL_RE.fullmatch(text.strip())
    if match is None:
        raise CertsError(f"invalid serial {text!r}: use hex such as 0x1a2b, 1a2b or 1A:2B")
    return int(match.group(1).replace(":", ""), 16)


def _build_leaf(
    ca_cert: x509.Certificate,
    ca_key: ec.EllipticCurvePrivateKey,
    *,
    subject: x509.Name,
    sans: list[x509.GeneralName],
    usage: ObjectIdentifier,
    not_before: datetime,
    days: int,
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_before + timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(digital_signature=True), critical=True)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(_authority_key_id(ca_cert, ca_key), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    return cert, key


def _store_leaf(
    directory: Path,
    registry: _Registry,
    cert: x509.Certificate,
    key: ec.EllipticCurvePrivateKey,
    *,
    kind: str,
    cert_rel: str,
    key_rel: str,
    store: str | None = None,
    terminal: str | None = None,
    role: str | None = None,
) -> IssuedCert:
    record = _Record(
        kind=kind,
        serial=cert.serial_number,
        subject=cert.subject.rfc4514_string(),
        not_before=cert.not_valid_before_utc,
        not_after=cert.not_valid_after_utc,
        cert=cert_rel,
        key=key_rel,
        store=store,
        terminal=terminal,
        role=role,
    )
    registry.certs.append(record)
    # Registered before the files exist: a crash in between leaves a revocable entry, never an
    # unrevocable certificate on disk.
    _save_registry(directory, registry)
    # Key before certificate, because the certificate file is what marks the pair as present.
    _write_atomic(directory / key_rel, _key_pem(key), 0o600)
    _write_atomic(directory / cert_rel, cert.public_bytes(serialization.Encoding.PEM), 0o644)
    return _issued(directory, record, revoked=False)


def _refuse_name_clash(registry: _Registry, cert_rel: str, store: str, terminal: str) -> None:
    """'-' may appear in both ids, so two terminals can want one file name: never let one take the other's."""
    for record in registry.certs:
        if record.cert == cert_rel and (record.store, record.terminal) != (store, terminal):
            raise CertsError(
                f"terminal {store}/{terminal} would be written to {cert_rel}, which belongs to terminal "
                f"{record.store}/{record.terminal}: choose store and terminal ids that do not collide"
            )


def _refuse_live_overwrite(path: Path, ca_cert: x509.Certificate, registry: _Registry) -> None:
    try:
        existing = x509.load_pem_x509_certificate(path.read_bytes())
    except FileNotFoundError:
        return
    except (OSError, ValueError) as exc:
        raise CertsError(f"cannot read the existing certificate {path} ({exc}): move it away first") from exc
    # Revoked, expired or from a replaced CA: the old certificate opens nothing, so losing it is harmless.
    if existing.serial_number in registry.revocations or existing.not_valid_after_utc < datetime.now(UTC):
        return
    try:
        existing.verify_directly_issued_by(ca_cert)
    except (ValueError, TypeError, InvalidSignature):
        return
    raise CertsError(
        f"certificate already exists: {path} ({existing.subject.rfc4514_string()}, "
        f"serial 0x{existing.serial_number:x}); revoke it first"
    )


def _sign_crl(
    directory: Path, registry: _Registry, ca_cert: x509.Certificate, ca_key: ec.EllipticCurvePrivateKey
) -> Path:
    registry.crl_number += 1
    # Saved before signing so a crash can skip a CRL number but never reuse one.
    _save_registry(directory, registry)
    now = datetime.now(UTC)
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca_cert.subject)
        .last_update(now - _CLOCK_SKEW)
        .next_update(now + _CRL_VALIDITY)
        .add_extension(x509.CRLNumber(registry.crl_number), critical=False)
        .add_extension(_authority_key_id(ca_cert, ca_key), critical=False)
    )
    for revocation in sorted(registry.revocations.values(), key=lambda r: r.serial):
        entry = (
            x509.RevokedCertificateBuilder()
            .serial_number(revocation.serial)
            .revocation_date(revocation.revoked_at)
        )
        # RFC 5280 5.3.1: "unspecified" is expressed by leaving the reason code out.
        if revocation.reason is not x509.ReasonFlags.unspecified:
            entry = entry.add_extension(x509.CRLReason(revocation.reason), critical=False)
        builder = builder.add_revoked_certificate(entry.build())
    crl = builder.sign(ca_key, hashes.SHA256())
    path = directory / _CRL
    _write_atomic(path, crl.public_bytes(serialization.Encoding.PEM), 0o644)
    return path


def _authority_key_id(
    ca_cert: x509.Certificate, ca_key: ec.EllipticCurvePrivateKey
) -> x509.AuthorityKeyIdentifier:
    # Chain building matches this against the CA's own SKI, which a CA made by another tool may
    # have derived differently, so copy it when there is one.
    try:
        ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    except x509.ExtensionNotFound:
        return x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key())
    return x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski)


def _load_ca(directory: Path) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    cert_path, key_path = directory / _CA_CERT, directory / _CA_KEY
    if not cert_path.exists() or not key_path.exists():
        raise CertsError(_no_ca_message(directory))
    try:
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as exc:
        raise CertsError(f"cannot load the CA in {directory}: {exc}") from exc
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise CertsError(f"the CA key {key_path} is not an ECDSA key")
    return cert, key


def _no_ca_message(directory: Path) -> str:
    return f"no CA in {directory}: run `pos-proxy certs init-ca --dir {directory}` first"


@contextmanager
def _exclusive(directory: Path) -> Iterator[None]:
    # Two operators revoking at once must not lose a revocation from index.json and the CRL.
    try:
        fd = os.open(directory / _LOCK, os.O_RDWR | os.O_CREAT, 0o600)
    except FileNotFoundError:
        raise CertsError(_no_ca_message(directory)) from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _load_registry(directory: Path) -> _Registry:
    path = directory / _INDEX
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return _Registry()
    except (OSError, ValueError) as exc:
        raise CertsError(f"cannot read {path}: {exc}") from exc
    try:
        if raw["version"] != _INDEX_VERSION:
            raise ValueError(f"unsupported version {raw['version']!r}")
        revocations = [_revocation_from_json(item) for item in raw["revocations"]]
        return _Registry(
            crl_number=int(raw["crl_number"]),
            certs=[_record_from_json(item) for item in raw["certs"]],
            revocations={r.serial: r for r in revocations},
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise CertsError(f"corrupt index {path}: {exc!r}") from exc


def _save_registry(directory: Path, registry: _Registry) -> None:
    document = {
        "version": _INDEX_VERSION,
        "crl_number": registry.crl_number,
        "certs": [
            {
                "kind": r.kind,
                "serial": f"{r.serial:x}",
                "subject": r.subject,
                "cert": r.cert,
                "key": r.key,
                "not_before": r.not_before.isoformat(),
                "not_after": r.not_after.isoformat(),
                "store": r.store,
                "terminal": r.terminal,
                "role": r.role,
            }
            for r in registry.certs
        ],
        "revocations": [
            {"serial": f"{r.serial:x}", "revoked_at": r.revoked_at.isoformat(), "reason": r.reason.value}
            for r in sorted(registry.revocations.values(), key=lambda r: r.revoked_at)
        ],
    }
    _write_atomic(directory / _INDEX, (json.dumps(document, indent=2) + "\n").encode(), 0o644)


def _record_from_json(raw: Any) -> _Record:
    return _Record(
        kind=str(raw["kind"]),
        serial=int(raw["serial"], 16),
        subject=str(raw["subject"]),
        not_before=datetime.fromisoformat(raw["not_before"]),
        not_after=datetime.fromisoformat(raw["not_after"]),
        cert=str(raw["cert"]),
        key=str(raw["key"]),
        store=raw["store"],
        terminal=raw["terminal"],
        role=raw["role"],
    )


def _revocation_from_json(raw: Any) -> _Revocation:
    return _Revocation(
        serial=int(raw["serial"], 16),
        revoked_at=datetime.fromisoformat(raw["revoked_at"]),
        reason=x509.ReasonFlags(raw["reason"]),
    )


def _issued(directory: Path, record: _Record, revoked: bool) -> IssuedCert:
    return IssuedCert(
        kind=record.kind,
        serial=record.serial,
        subject=record.subject,
        not_before=record.not_before,
        not_after=record.not_after,
        cert_path=directory / record.cert,
        key_path=directory / record.key,
        store=record.store,
        terminal=record.terminal,
        role=record.role,
        revoked=revoked,
    )


def _write_atomic(path: Path, data: bytes, mode: int) -> None:
    # mkstemp opens with os.open(..., O_EXCL, 0o600), so a key is never readable by others even
    # for an instant; os.replace means readers (the proxy reloading its CRL) never see half a file.
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            os.fchmod(handle.fileno(), mode)
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _key_usage(
    *, digital_signature: bool = False, key_cert_sign: bool = False, crl_sign: bool = False
) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=digital_signature,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=key_cert_sign,
        crl_sign=crl_sign,
        encipher_only=False,
        decipher_only=False,
    )


def _check_id(what: str, value: str) -> None:
    if not _ID_RE.fullmatch(value):
        raise CertsError(f"invalid {what} id {value!r}: use letters, digits, '-', '_' (1-64 chars)")


def _check_days(days: int) -> None:
    if days < 1:
        raise CertsError(f"invalid validity {days} days: must be at least 1")


def _check_common_name(name: str) -> None:
    # X.509 caps commonName at 64 characters (RFC 5280 ub-common-name).
    if not 1 <= len(name) <= 64:
        raise CertsError(f"invalid common name {name!r}: must be 1-64 characters")


def _check_dns_name(name: str) -> str:
    if len(name) > 253 or not _DNS_RE.fullmatch(name):
        raise CertsError(f"invalid DNS name {name!r}")
    return name


def _parse_ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        raise CertsError(f"invalid IP address {text!r}") from None
