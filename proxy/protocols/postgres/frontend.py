"""The PostgreSQL front end: the plaintext preamble before TLS (the client speaks first), the session
on the TLS connection, a route's pool (connector and DISCARD ALL reset) and ErrorResponse bytes."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable

from proxy.config.model import RouteConfig
from proxy.errors import AuthenticationRefused, ProtocolViolation, ProxyError
from proxy.frontend import Encryption, Preauth
from proxy.metrics import Metrics
from proxy.policy.encodings import DEFAULT_ENCODING
from proxy.pool import PoolSettings, ServerUnreachable, UpstreamPool
from proxy.preauth import PendingStartup
from proxy.protocols.postgres import messages as m
from proxy.protocols.postgres.session import ClientSession, Route, SessionEnvironment, SessionRegistry
from proxy.protocols.postgres.startup import UpstreamRefused
from proxy.protocols.postgres.upstream import (
    InternalQueryFailed,
    ServerConnection,
    UpstreamConnectError,
    connect_server,
    open_socket,
)
from proxy.protocols.proxyheader import FIRST_BYTES
from proxy.tcp import peek_byte, recv_exactly
from proxy.tlsconfig import UpstreamTLS

# Shown in pg_stat_activity for pooled connections until a client sets its own name.
SERVER_APPLICATION_NAME = "pos-db-proxy"
_UPSTREAM_PROBE_TIMEOUT = 2.0
PLAINTEXT_REFUSAL = AuthenticationRefused(
    "pos-db-proxy accepts only TLS connections with a terminal certificate",
    hint="connect with sslmode=verify-full and the terminal's sslcert and sslkey",
)


def build_route(route: RouteConfig, tls: UpstreamTLS, metrics: Metrics) -> Route:
    server_parameters: dict[str, str] = {}

    async def connect(on_closed: Callable[[ServerConnection], None]) -> ServerConnection:
        try:
            # What RESET ALL and DISCARD ALL return a session to, whatever the role's or database's
            # defaults: the client encoding and string literals the proxy's parser reads.
            connection = await connect_server(
                route,
                tls.context,
                on_closed,
                {
                    "application_name": SERVER_APPLICATION_NAME,
                    "client_encoding": DEFAULT_ENCODING,
                    "standard_conforming_strings": "on",
                },
            )
        except (ServerUnreachable, UpstreamConnectError, UpstreamRefused, ProtocolViolation):
            metrics.server_connection_errors_total.labels(route.database).inc()
            raise
        metrics.server_connections_opened_total.labels(route.database).inc()
        if not server_parameters:
            server_parameters.update(connection.reported)
        return connection

    async def reset(connection: ServerConnection) -> bool:
        if not connection.is_clean:
            return False
        try:
            await connection.run_internal("DISCARD ALL", route.pool.connect_timeout)
        except (InternalQueryFailed, UpstreamConnectError):
            return False
        connection.forget_session()
        return True

    settings = PoolSettings(
        size=route.pool.size,
        min_idle=route.pool.min_idle,
        max_client_wait=route.pool.max_client_wait,
        idle_timeout=route.pool.server_idle_timeout,
        lifetime=route.pool.server_lifetime,
        connect_timeout=route.pool.connect_timeout,
        retry_delay=route.pool.connect_retry_delay,
        retry_max_delay=route.pool.connect_retry_max_delay,
    )

    async def probe() -> None:
        """A TCP connect to the server, closed before a startup packet: no backend starts (PostgreSQL
        logs it only under log_connections)."""
        try:
            sock = await open_socket(route, min(route.pool.connect_timeout, _UPSTREAM_PROBE_TIMEOUT))
        except UpstreamConnectError as exc:
            raise ServerUnreachable(str(exc)) from exc
        sock.close()

    def upstream_changed(up: bool) -> None:
        metrics.upstream_up.labels(route.database).set(1 if up else 0)
        if not up:
            metrics.upstream_down_total.labels(route.database).inc()

    metrics.upstream_up.labels(route.database).set(1)
    metrics.upstream_down_total.labels(route.database)
    pool: UpstreamPool[ServerConnection] = UpstreamPool(
        route.database, settings, connect, reset, upstream_changed, probe=probe
    )
    return Route(config=route, pool=pool, tls=tls, server_parameters=server_parameters)


class PostgresFrontend:
    """PostgreSQL terminals: SSLRequest or direct TLS, GSSENC refused, cancel requests handled before
    TLS (libpq sends them in plaintext on a new connection), any other plaintext startup refused."""

    default_port = 6432

    def __init__(self, registry: SessionRegistry) -> None:
        # Where a CancelRequest finds the session its key belongs to.
        self._registry = registry

    async def preamble(self, sock: socket.socket, source: str, preauth: Preauth) -> Encryption:
        """Pre-TLS phase (55.2.10, 55.2.11): SSLRequest, GSSENCRequest, direct TLS, or a refusal."""
        loop = asyncio.get_running_loop()
        gssenc_refused = False
        while True:
            first = await peek_byte(sock)
            if first is None:
                return Encryption.NONE
            if first in FIRST_BYTES:
                # Only listen.proxy_protocol.trusted_sources may say where a connection comes from.
                preauth.refuse_proxy_header(source, "untrusted", "PROXY header from an untrusted peer")
                return Encryption.NONE
            if first == m.TLS_HANDSHAKE_RECORD:
                return Encryption.DIRECT
            head = await recv_exactly(sock, 4)
            length = m.startup_packet_length(head)
            assert length is not None
            packet = m.parse_startup_packet(head + await recv_exactly(sock, length - 4))
            if isinstance(packet, m.SSLRequest):
                await loop.sock_sendall(sock, b"S")
                return Encryption.NEGOTIATED
            if isinstance(packet, m.GSSENCRequest):
                # libpq asks once and goes on with an SSLRequest or startup; asking again is a loop.
                if gssenc_refused:
                    raise ProtocolViolation("GSSENCRequest repeated after it was refused")
                gssenc_refused = True
                await loop.sock_sendall(sock, b"N")
                continue
            if isinstance(packet, m.CancelRequest):
                delivery = self._registry.cancel(packet, source)
                if delivery is not None:
                    # Closed once the server has acted on it (SessionRegistry.cancel says why);
                    # the wait leaves the delivery itself alone when the handshake time runs out.
                    await asyncio.wait((delivery,))
                return Encryption.NONE
            preauth.preauth_log(
                "session_refused",
                warning=True,
                source=source,
                sqlstate=PLAINTEXT_REFUSAL.sqlstate,
                reason="plaintext startup",
            )
            preauth.metrics.client_error("proxy", PLAINTEXT_REFUSAL.sqlstate)
            await loop.sock_sendall(sock, self.render_error(PLAINTEXT_REFUSAL))
            return Encryption.NONE

    def create_session(
        self, environment: SessionEnvironment, source: str, pending: PendingStartup, *, direct_tls: bool
    ) -> ClientSession:
        return ClientSession(environment, source, direct_tls=direct_tls, pending=pending)

    def build_route(self, route: RouteConfig, tls: UpstreamTLS, metrics: Metrics) -> Route:
        return build_route(route, tls, metrics)

    def render_error(self, error: ProxyError) -> bytes:
        return m.build_error_response(
            "FATAL", error.sqlstate, error.message, detail=error.detail, hint=error.hint
        )
