"""SSLContext for terminals (required client certificates, CRL) and for upstreams (verify-full by default)."""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from cryptography import x509

from proxy.config.model import ExpiredCRLAction, RouteConfig, SSLMode, TLSConfig

# PostgreSQL 17 clients using sslnegotiation=direct insist on this ALPN protocol.
POSTGRES_ALPN = "postgresql"


@dataclass(frozen=True, slots=True)
class LoadedCRL:
    """The terminal CRL as loaded: what it revokes and until when it is current."""

    revoked: frozenset[int]
    next_update: datetime | None

    def expired(self, now: datetime | None = None) -> bool:
        return self.next_update is not None and self.next_update <= (now or datetime.now(UTC))


@dataclass(frozen=True, slots=True)
class TerminalTLS:
    """The server-side TLS context for terminals, with the CRL it enforces."""

    context: ssl.SSLContext
    crl: LoadedCRL | None
    # An expired CRL kept (tls.expired_crl: keep-last): OpenSSL is not given it, since it would refuse
    # every terminal (X509_V_ERR_CRL_HAS_EXPIRED), so the proxy refuses its serials after the handshake.
    kept: bool = False

    def revokes(self, serial: int) -> bool:
        """Whether the proxy itself must refuse this certificate (OpenSSL checks a current CRL)."""
        return self.kept and self.crl is not None and serial in self.crl.revoked


def load_terminal_tls(
    tls: TLSConfig, now: datetime | None = None, *, kept: LoadedCRL | None = None
) -> TerminalTLS:
    """Server-side context for terminal connections.

    ``kept``: an expired CRL to go on enforcing instead of reading tls.crl (which could not be read).

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
    crl = kept
    if crl is None and tls.crl is not None:
        crl = load_crl(tls.crl, tls.client_ca)
    if tls.crl is not None and crl is not None:
        if not crl.expired(now):
            context.load_verify_locations(cafile=str(tls.crl))
            context.verify_flags |= ssl.VERIFY_CRL_CHECK_LEAF
        elif tls.expired_crl is ExpiredCRLAction.KEEP_LAST:
            kept = crl
        else:
            assert crl.next_update is not None
            raise CRLExpired(
                f"tls.crl: {tls.crl} expired at {crl.next_update:%Y-%m-%d %H:%M:%S} UTC: re-sign it "
                "(pos-proxy certs revoke, or your CA's CRL job); with tls.expired_crl: refuse every "
                "terminal is refused until then"
            )
    context.verify_flags |= ssl.VERIFY_X509_STRICT
    context.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION
    # No TLS 1.3 session tickets: libpq never resumes a session, issuing them costs every handshake
    # CPU and every idle connection 2-5 KiB (bench/idle_tls_floor.py, bench/run.py), and without resumption
    # each connection's certificate is verified in full, against the CRL loaded at that moment.
    context.num_tickets = 0
    context.set_alpn_protocols([POSTGRES_ALPN])
    return TerminalTLS(context, crl, kept=kept is not None)


class CRLError(ValueError):
    """The CRL cannot be used: not a PEM CRL, or not signed by the terminal CA."""


class CRLExpired(CRLError):
    """The CRL is past its nextUpdate and tls.expired_crl says to refuse rather than keep it."""


def load_crl(crl_path: Path, ca_path: Path) -> LoadedCRL:
    """The CRL, which must be signed by a CA in the terminal CA bundle."""
    try:
        crl = x509.load_pem_x509_crl(crl_path.read_bytes())
    except ValueError as exc:
        raise CRLError(f"tls.crl: {crl_path} holds no PEM CRL") from exc
    authorities = x509.load_pem_x509_certificates(ca_path.read_bytes())
    issuers = [ca for ca in authorities if ca.subject == crl.issuer]
    if not any(crl.is_signature_valid(ca.public_key()) for ca in issuers):  # type: ignore[arg-type]
        raise CRLError(f"tls.crl: {crl_path} is not signed by a CA in tls.client_ca ({ca_path})")
    return LoadedCRL(frozenset(entry.serial_number for entry in crl), crl.next_update_utc)


def upstream_context(route: RouteConfig) -> ssl.SSLContext | None:
    """Client-side context for server connections, following libpq's sslmode meanings, presenting
    the route's client certificate when it has one. Raises ssl.SSLError or OSError when the files
    changed since the config check into something unusable."""
    if route.sslmode is SSLMode.DISABLE:
        return None
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    client = route.client_certificate
    if client is not None:
        passphrase = client.password.reveal() if client.password is not None else ""
        # A callable, not the string: with none given, OpenSSL would prompt on the terminal for one.
        context.load_cert_chain(client.cert, client.key, password=lambda: passphrase)
    if route.sslmode is SSLMode.REQUIRE:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        return context
    if route.sslrootcert is not None:
        context.load_verify_locations(cafile=str(route.sslrootcert))
    context.check_hostname = route.sslmode is SSLMode.VERIFY_FULL
    context.verify_mode = ssl.CERT_REQUIRED
    return context


class UpstreamTLS:
    """The TLS context a route's new server connections (and cancel requests) use.

    Mutable on purpose: a reload that only rotates the route's client certificate puts the new
    context here, so the pool, its idle connections and the sessions holding the route all go on,
    and every connection opened from then on presents the new pair.
    """

    __slots__ = ("context",)

    def __init__(self, context: ssl.SSLContext | None) -> None:
        self.context = context
