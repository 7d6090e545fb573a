"""asyncio client session: a terminal's TLS connection from startup to Terminate, lent a server connection."""

from __future__ import annotations

import asyncio
import enum
import hmac
import secrets
import ssl
import time
from collections.abc import Coroutine, Mapping
from dataclasses import dataclass, field
from typing import Any, cast

import structlog

from proxy.config import Config, RouteConfig
from proxy.errors import (
    AuthenticationRefused,
    FeatureNotSupported,
    ProtocolViolation,
    ProxyError,
    UnknownDatabase,
    UpstreamLost,
    UpstreamUnavailable,
)
from proxy.identity import Identity, IdentityError, check_user_name, identify
from proxy.pool import UpstreamPool
from proxy.protocols.postgres import messages as m
from proxy.protocols.postgres.parameters import SessionParameters, StartupParameterError
from proxy.protocols.postgres.upstream import (
    InternalQueryFailed,
    ServerConnection,
    UpstreamConnectError,
    send_cancel,
)

log = structlog.get_logger("pos_proxy.session")


@dataclass(frozen=True, slots=True)
class Route:
    config: RouteConfig
    pool: UpstreamPool[ServerConnection]
    tls: ssl.SSLContext | None


@dataclass(slots=True)
class SessionRegistry:
    """Live sessions by the BackendKeyData the proxy gave them, and the tasks they started."""

    sessions: dict[int, ClientSession] = field(default_factory=dict)
    live: set[ClientSession] = field(default_factory=set)
    tasks: set[asyncio.Task[None]] = field(default_factory=set)

    def register(self, session: ClientSession) -> tuple[int, int]:
        while True:
            process_id = secrets.randbelow(2**31 - 1) + 1
            if process_id not in self.sessions:
                break
        self.sessions[process_id] = session
        return process_id, secrets.randbits(31)

    def unregister(self, process_id: int) -> None:
        self.sessions.pop(process_id, None)

    def spawn(self, coroutine: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        task = asyncio.get_running_loop().create_task(coroutine)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return task

    def cancel(self, request: m.CancelRequest, source: str) -> None:
        """Route a CancelRequest to the session it names; unknown or wrong keys do nothing."""
        session = self.sessions.get(request.process_id)
        if session is None or not hmac.compare_digest(
            session.secret_key.to_bytes(4, "big"), request.secret_key.to_bytes(4, "big", signed=True)
        ):
            log.info("cancel_ignored", source=source, reason="unknown backend key")
            return
        session.cancel_current_query(source)


@dataclass(frozen=True, slots=True)
class SessionEnvironment:
    config: Config
    routes: Mapping[str, Route]
    registry: SessionRegistry


class _State(enum.Enum):
    STARTUP = "startup"
    CONNECTING = "connecting"
    READY = "ready"
    CLOSED = "closed"


class ClientSession(asyncio.Protocol):
    """The terminal side of the protocol; message framing is sans-IO in ``messages``."""

    def __init__(self, environment: SessionEnvironment, source: str) -> None:
        self._env = environment
        self.source = source
        self.identity: Identity | None = None
        self.process_id = 0
        self.secret_key = 0
        self._transport: asyncio.Transport | None = None
        self._state = _State.STARTUP
        self._buffer = bytearray()
        self._refusal: tuple[str, ProxyError] | None = None
        self._route: Route | None = None
        self._parameters: SessionParameters | None = None
        self._server: ServerConnection | None = None
        self._connect_task: asyncio.Task[None] | None = None
        self._startup_timer: asyncio.TimerHandle | None = None
        self._started_at = time.monotonic()
        self._max_message = environment.config.listen.max_message_size
        self._reading_paused = False

    # --- asyncio.Protocol: terminal side ---

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self._transport = cast(asyncio.Transport, transport)
        self._env.registry.live.add(self)
        loop = asyncio.get_running_loop()
        self._startup_timer = loop.call_later(
            self._env.config.listen.startup_timeout, self._startup_timed_out
        )
        self._identify(self._transport)

    def data_received(self, data: bytes) -> None:
        try:
            if self._state is _State.READY:
                self._forward(data)
                return
            self._buffer += data
            if self._state is _State.STARTUP:
                self._read_startup()
        except ProxyError as exc:
            self._fail(exc, reason=str(exc))

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        previous, self._state = self._state, _State.CLOSED
        if self._startup_timer is not None:
            self._startup_timer.cancel()
        if self._connect_task is not None:
            self._connect_task.cancel()
        self._env.registry.live.discard(self)
        if self.process_id:
            self._env.registry.unregister(self.process_id)
        self._release_server()
        if previous is not _State.STARTUP or self.identity is not None:
            log.info(
                "session_end", **self._log_fields(), duration_s=round(time.monotonic() - self._started_at, 3)
            )

    def pause_writing(self) -> None:
        # The terminal reads slower than the server sends: stop reading the server.
        if self._server is not None:
            self._server.pause_reading()

    def resume_writing(self) -> None:
        if self._server is not None:
            self._server.resume_reading()

    # --- ServerPeer: what the lent server connection calls ---

    def server_data(self, data: bytes) -> None:
        if self._transport is not None:
            self._transport.write(data)

    def server_lost(self, reason: str) -> None:
        self._server = None
        self._fail(UpstreamLost("lost the connection to the database server"), reason=reason)

    def pause_client_reading(self) -> None:
        if self._transport is not None and not self._reading_paused:
            self._reading_paused = True
            self._transport.pause_reading()

    def resume_client_reading(self) -> None:
        if self._transport is not None and self._reading_paused and self._state is _State.READY:
            self._reading_paused = False
            self._transport.resume_reading()

    # --- startup ---

    def _identify(self, transport: asyncio.Transport) -> None:
        ssl_object = transport.get_extra_info("ssl_object")
        certificate = ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
        if certificate is None:
            self._refusal = (
                "no client certificate presented",
                AuthenticationRefused(
                    "a terminal certificate is required",
                    hint="connect with sslmode=verify-full and the terminal's sslcert and sslkey",
                ),
            )
            return
        config = self._env.config
        try:
            self.identity = identify(certificate, config.identity, config.roles.keys())
        except IdentityError as exc:
            self._refusal = (str(exc), AuthenticationRefused("the terminal certificate is not accepted"))

    def _startup_timed_out(self) -> None:
        if self._state is _State.STARTUP:
            self._fail(ProtocolViolation("startup did not complete in time"), reason="startup timeout")

    def _read_startup(self) -> None:
        length = m.startup_packet_length(self._buffer)
        if length is None or len(self._buffer) < length:
            return
        packet = m.parse_startup_packet(bytes(self._buffer[:length]))
        del self._buffer[:length]
        if isinstance(packet, m.CancelRequest):
            self._env.registry.cancel(packet, self.source)
            self._close()
        elif isinstance(packet, m.StartupMessage):
            self._begin(packet)
        else:
            raise ProtocolViolation("encryption is already negotiated on this connection")

    def _begin(self, startup: m.StartupMessage) -> None:
        if self._startup_timer is not None:
            self._startup_timer.cancel()
        if self._refusal is not None:
            reason, error = self._refusal
            self._fail(error, reason=reason)
            return
        assert self.identity is not None
        refusal = check_user_name(self.identity, startup.user, self._env.config.identity.user_name)
        if refusal is not None:
            self._fail(
                AuthenticationRefused("the startup user name does not match the terminal"), reason=refusal
            )
            return
        route = self._env.routes.get(startup.database)
        if route is None:
            self._fail(
                UnknownDatabase(f'database "{startup.database}" does not exist'), reason="no such route"
            )
            return
        try:
            self._parameters = SessionParameters.from_startup(startup.parameters)
        except StartupParameterError as exc:
            self._fail(FeatureNotSupported(str(exc)), reason=str(exc))
            return
        self._route = route
        self._state = _State.CONNECTING
        self.pause_client_reading()
        self._connect_task = self._env.registry.spawn(self._attach_server(route))

    async def _attach_server(self, route: Route) -> None:
        assert self._parameters is not None
        try:
            self._server = await route.pool.acquire()
            await self._parameters.apply(self._server, route.config.pool.connect_timeout)
        except ProxyError as exc:
            self._fail(exc, reason=str(exc.__cause__ or exc))
            return
        except InternalQueryFailed as exc:
            self._fail(exc.as_client_error(), reason=str(exc))
            return
        except UpstreamConnectError as exc:
            self._fail(UpstreamUnavailable("could not prepare a database connection"), reason=str(exc))
            return
        if self._state is not _State.CONNECTING or self._transport is None:
            return
        server = self._server
        server.attach(self)
        self.process_id, self.secret_key = self._env.registry.register(self)
        reply = [m.build_authentication_ok()]
        reply += [m.build_parameter_status(name, value) for name, value in server.reported.items()]
        reply.append(m.build_backend_key_data(self.process_id, self.secret_key))
        reply.append(m.build_ready_for_query(b"I"))
        self._transport.write(b"".join(reply))
        self._state = _State.READY
        log.info("session_start", **self._log_fields(), server_connection=server.id)
        self.resume_client_reading()
        if self._buffer:
            pending, self._buffer = bytes(self._buffer), bytearray()
            self.data_received(pending)

    # --- ready: forwarding ---

    def _forward(self, data: bytes) -> None:
        source: bytes | bytearray
        if self._buffer:
            self._buffer += data
            source = self._buffer
        else:
            source = data
        frames, consumed = m.scan_frames(source, self._max_message)
        if frames:
            for index, (kind, start, _end) in enumerate(frames):
                if kind not in m.FRONTEND_TYPES:
                    raise ProtocolViolation(f"invalid frontend message type {kind}")
                if kind == m.MSG_TERMINATE:
                    if index:
                        self._send_to_server(bytes(source[:start]), frames[:index])
                    self._close()
                    return
            self._send_to_server(
                data if source is data and consumed == len(data) else bytes(source[:consumed]), frames
            )
        if source is self._buffer:
            del self._buffer[:consumed]
        elif consumed < len(data):
            self._buffer += data[consumed:]

    def _send_to_server(self, data: bytes, frames: list[m.Frame]) -> None:
        server = self._server
        if server is None:
            raise UpstreamLost("lost the connection to the database server")
        server.forward_from_client(data, frames)

    # --- cancel ---

    def cancel_current_query(self, source: str) -> None:
        server, route = self._server, self._route
        if server is None or route is None or self._state is not _State.READY:
            log.info("cancel_ignored", **self._log_fields(), reason="no server connection")
            return
        log.info("cancel_forwarded", **self._log_fields(), from_source=source, server_connection=server.id)
        self._env.registry.spawn(_deliver_cancel(route, server.backend_key))

    # --- ending ---

    def _release_server(self) -> None:
        server, self._server = self._server, None
        if server is None or self._route is None:
            return
        server.detach()
        self._route.pool.release(server, reusable=server.is_clean)

    def _fail(self, error: ProxyError, *, reason: str) -> None:
        log.warning(
            "session_refused" if self._state is not _State.READY else "session_error",
            **self._log_fields(),
            sqlstate=error.sqlstate,
            client_message=error.message,
            reason=reason,
        )
        if self._transport is not None and not self._transport.is_closing():
            self._transport.write(
                m.build_error_response(
                    "FATAL" if error.fatal else "ERROR",
                    error.sqlstate,
                    error.message,
                    detail=error.detail,
                    hint=error.hint,
                )
            )
        self._close()

    def _close(self) -> None:
        if self._transport is not None:
            self._transport.close()

    def terminate(self, error: ProxyError, reason: str) -> None:
        """End the session from outside (shutdown, admin disconnect) with a FATAL error."""
        self._fail(error, reason=reason)

    def _log_fields(self) -> dict[str, object]:
        fields: dict[str, object] = {"source": self.source}
        if self.identity is not None:
            fields.update(
                store=self.identity.store,
                terminal=self.identity.terminal,
                role=self.identity.role,
                serial=self.identity.serial_hex,
            )
        if self._route is not None:
            fields["route"] = self._route.config.database
        return fields


async def _deliver_cancel(route: Route, backend_key: tuple[int, int]) -> None:
    try:
        await send_cancel(route.config, route.tls, backend_key)
    except UpstreamConnectError as exc:
        log.warning("cancel_failed", route=route.config.database, error=str(exc))
