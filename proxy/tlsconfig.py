"""SSLContext for terminals (required client certificates, CRL) and for upstreams (verify-full by default)."""

from __future__ import annotations

import ssl

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
        context.load_verify_locations(cafile=str(tls.crl))
        context.verify_flags |= ssl.VERIFY_CRL_CHECK_LEAF
    context.verify_flags |= ssl.VERIFY_X509_STRICT
    context.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION
    context.set_alpn_protocols([POSTGRES_ALPN])
    return context


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
