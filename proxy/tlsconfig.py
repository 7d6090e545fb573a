"""SSLContext for terminals (required client certificates, CRL) and for upstreams (verify-full by default)."""

from __future__ import annotations

import ssl
from datetime import UTC, datetime
from pathlib import Path

from cryptography import x509

from proxy.config import RouteConfig, SSLMode, TLSConfig

# PostgreSQL 17 clients using sslnegotiation=direct insist on this ALPN protocol.
POSTGRES_ALPN = "postgresql"


def terminal_context(tls: TLSConfig) -> ssl.SSLContext:
    """Server-side context for terminal connections.

    CERT_OPTIONAL rather than CERT_REQUIRED: OpenSSL still fails the handshake on any
    certificate that is presented and does not verify (wrong CA, expired, revoked), but a
    client with no certificate completes it, so we can tell that client in a PostgreSQL
    error (28000) what is missing instead of dropping it with a bare TLS alert.
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = tls.min_version.ssl_version
    context.load_cert_chain(tls.cert, tls.key)
    context.load_verify_locations(cafile=str(tls.client_ca))
    context.verify_mode = ssl.CERT_OPTIONAL
    if tls.crl is not None:
        check_crl(tls.crl, tls.client_ca)
        context.load_verify_locations(cafile=str(tls.crl))
        context.verify_flags |= ssl.VERIFY_CRL_CHECK_LEAF
    context.verify_flags |= ssl.VERIFY_X509_STRICT
    context.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION
    context.set_alpn_protocols([POSTGRES_ALPN])
    return context


class CRLError(ValueError):
    """The CRL would make OpenSSL refuse every terminal: say so before it does."""


def check_crl(crl_path: Path, ca_path: Path, now: datetime | None = None) -> None:
    """The CRL must be signed by a CA in the terminal CA bundle and still be current."""
    try:
        crl = x509.load_pem_x509_crl(crl_path.read_bytes())
    except ValueError as exc:
        raise CRLError(f"tls.crl: {crl_path} holds no PEM CRL") from exc
    authorities = x509.load_pem_x509_certificates(ca_path.read_bytes())
    issuers = [ca for ca in authorities if ca.subject == crl.issuer]
    if not any(crl.is_signature_valid(ca.public_key()) for ca in issuers):  # type: ignore[arg-type]
        raise CRLError(f"tls.crl: {crl_path} is not signed by a CA in tls.client_ca ({ca_path})")
    next_update = crl.next_update_utc
    if next_update is not None and next_update < (now or datetime.now(UTC)):
        raise CRLError(
            f"tls.crl: {crl_path} expired at {next_update:%Y-%m-%d %H:%M} UTC: re-sign it "
            "(pos-proxy certs revoke, or your CA's CRL job), or every terminal is refused"
        )


def revoked_serials(crl_path: Path) -> frozenset[int]:
    crl = x509.load_pem_x509_crl(crl_path.read_bytes())
    return frozenset(entry.serial_number for entry in crl)


def upstream_context(route: RouteConfig) -> ssl.SSLContext | None:
    """Client-side context for server connections, following libpq's sslmode meanings."""
    if route.sslmode is SSLMode.DISABLE:
        return None
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if route.sslmode is SSLMode.REQUIRE:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        return context
    if route.sslrootcert is not None:
        context.load_verify_locations(cafile=str(route.sslrootcert))
    context.check_hostname = route.sslmode is SSLMode.VERIFY_FULL
    context.verify_mode = ssl.CERT_REQUIRED
    return context
