"""One connection to the database server: opened with TLS and the proxy's credentials, lent to sessions."""

from __future__ import annotations

import asyncio
import contextlib
import enum
import itertools
import socket
import ssl
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Final, Protocol, cast

import structlog

from proxy.config.model import RouteConfig
from proxy.errors import ProtocolViolation, ProxyError, caused_by
from proxy.policy.encodings import DEFAULT_ENCODING, accepted_encoding, read_statement
from proxy.pool import ServerUnreachable
from proxy.protocols.postgres import messages as m
from proxy.protocols.postgres.parameters import SESSION_PARAMETERS, quote_literal
from proxy.protocols.postgres.prepared import (
    ServerState,
    ServerStatements,
    filter_server_messages,
    pass_untouched_replies,
)
from proxy.protocols.postgres.results import ResultWatch
from proxy.protocols.postgres.startup import UpstreamHandshake, UpstreamRefused
from proxy.tcp import tune_socket
from proxy.tlstransport import connect_tls

log = structlog.get_logger("pos_proxy.upstream")

# A backend message cannot exceed PostgreSQL's 1 GiB allocation limit (MaxAllocSize).
MAX_BACKEND_MESSAGE: Final = 1 << 30
_connection_ids = itertools.count(1)
# The settings a client may choose, as the server names them in ParameterStatus.
_TRACKED_SETTINGS: Final = frozenset(SESSION_PARAMETERS.values())
# A value no client can want (startup and ParameterStatus values end at a NUL): the setting may
# differ from the route's value, and nobody knows how.
_UNKNOWN_VALUE: Final = "\x00unknown"


class UpstreamConnectError(Exception):
    """A server connection could not be opened or used; the text is for the operator's log only.

    ``transient``: the server could not be reached or went away (refused, timed out, reset, starting
    up), so trying again later may work; False for what a retry cannot fix (a wrong password, a failed
    certificate check, a server that will not do TLS).
    """

    def __init__(self, reason: str, *, transient: bool = True) -> None:
        super().__init__(reason)
        self.transient = transient


# Startup refusals that pass by themselves (PostgreSQL's errcodes.txt): the server is starting up,
# shutting down or in recovery (57P03), was shut down (57P01, 57P02), or is out of connection slots.
_TRANSIENT_STARTUP_REFUSALS = frozenset({"57P01", "57P02", "57P03", "53300", "08006"})


class InternalQueryFailed(Exception):
    """The server refused a query the proxy ran for a client (a startup setting, most likely)."""

    def __init__(self, sqlstate: str, message: str) -> None:
        super().__init__(f"{sqlstate}: {message}")
        self.sqlstate = sqlstate
        self.message = message

    def as_client_error(self) -> ProxyError:
        # The server's own words are safe to pass on: they are about the client's own setting.
        error = ProxyError(self.message)
        error.sqlstate = self.sqlstate
        return error


class ServerPeer(Protocol):
    """What a server connection needs from the client session it is lent to."""

    # The pid the client was given in BackendKeyData (0 before its startup is answered).
    process_id: int

    def server_data(self, data: bytes) -> None: ...

    def server_parameter(self, name: str, value: str) -> None: ...

    def server_ready(self) -> None: ...

    def server_idle(self) -> None: ...

    @property
    def lets_go_between_transactions(self) -> bool:
        """Transaction pooling, not pinned: it takes another connection for its next transaction."""
        ...

    def server_lost(self, reason: str) -> None: ...

    def pause_client_reading(self) -> None: ...

    def resume_client_reading(self) -> None: ...


class ServerConnection(asyncio.Protocol):
    """asyncio side of a server connection; message framing and auth are sans-IO (messages, startup)."""

    def __init__(self, route: RouteConfig, on_closed: Callable[[ServerConnection], None]) -> None:
        self.id = next(_connection_ids)
        self.route = route
        self.created_at = time.monotonic()
        self.idle_since = self.created_at
        self.reported: dict[str, str] = {}
        # What the server reported at startup: the route's values, which RESET goes back to.
        self._startup_reported: dict[str, str] = {}
        # The tracked settings (SESSION_PARAMETERS) that may differ from the route's values: as the
        # proxy set them for a client (spelled as the client did) or as the server last reported
        # them. Empty on a connection no client changed, which is what makes hand-overs free.
        self.changed_settings: dict[str, str] = {}
        # A client whose SQL no enforced policy vets has used this connection: stored SQL it reached
        # (a view, a column default, a trigger calling set_config) may have changed any setting, or
        # the role, with no trace in a statement or a ParameterStatus. Reset before a vetted client
        # runs on it (reset_session_settings).
        self.unvetted_use = False
        # What a client wanted that it last found here (SessionParameters.needs_sync), with the
        # changed settings as they were then; forgotten when a reported value changes. A hand-over
        # to a client that wants the same, with nothing changed since, is two small comparisons.
        self._settings_found_for: tuple[dict[str, str], dict[str, str]] | None = None
        self.backend_key: tuple[int, int] = (0, 0)
        self.transaction_status = b"I"
        # Extended-protocol messages sent since the last Sync: the server is mid-cycle.
        self.unsynced = False
        # The last message sent was a Flush: the server answers everything sent so far without
        # waiting for more (protocol 55.2.3); otherwise a mid-cycle server may answer nothing yet.
        self.flushed = False
        # The open cycle has a Bind or Execute: a portal may hold a snapshot and the locks its run
        # took, so only the client's own Sync may end the cycle (see ClientSession._check_idle_transaction).
        self.cycle_runs_portal = False
        # A cancel for this connection is on its way, or was sent and never answered: it may still
        # land, so the connection is lent to nobody else meanwhile (and never again if unanswered).
        self.cancel_requested = False
        self.state = ServerState(ServerStatements(route.pool.max_prepared_statements))
        # The attached client's result-size guard, when its limits have one.
        self.result_watch: ResultWatch | None = None
        # The server's FATAL (57P01 on shutdown, ...) was passed on to the client: nothing may follow it.
        self.fatal_passed_on = False
        # The server said FATAL while no client's work was in flight: it is closing, lend it to nobody.
        self.saying_goodbye = False
        self.closed = False
        self._reading_paused = False  # by pause_reading: a terminal reads slower than this server sends
        self._on_closed = on_closed
        self._transport: asyncio.Transport | None = None
        self._buffer = bytearray()
        self._peer: ServerPeer | None = None
        self._handshake: UpstreamHandshake | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._internal_error: tuple[str, str] | None = None
        self._internal_row: bytes | None = None
        self._internal_busy = False

    # --- lifecycle ---

    @property
    def usable(self) -> bool:
        return not self.closed and self._transport is not None and not self.saying_goodbye

    @property
    def has_work_in_flight(self) -> bool:
        """Sent messages the server has not answered yet, or an extended-protocol cycle not synced."""
        return bool(self.state.pending) or self.unsynced

    @property
    def is_clean(self) -> bool:
        """Idle on the server with nothing in flight: safe to give to another client."""
        return (
            self.usable
            and not self._internal_busy
            and not self.cancel_requested
            and not self.state.pending
            and not self.unsynced
            and self.transaction_status == b"I"
            # A FATAL after the last ReadyForQuery (a server shutting down sends one to idle
            # backends): the connection is about to close, so it must not carry another client's
            # messages, which would be lost with it.
            and not self.fatal_passed_on
        )

    def close(self) -> None:
        if self._transport is not None and not self.closed:
            with contextlib.suppress(RuntimeError):
                self._transport.write(m.build_terminate())
            self._transport.close()
        self._mark_closed()

    def _mark_closed(self) -> None:
        if self.closed:
            return
        self.closed = True
        self._fail_waiter("server connection closed")
        self._on_closed(self)

    # --- asyncio.Protocol ---

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self._transport = cast(asyncio.Transport, transport)

    def connection_lost(self, exc: Exception | None) -> None:
        peer, self._peer = self._peer, None
        self._mark_closed()
        if peer is not None:
            peer.server_lost(f"server connection {self.id} lost: {exc or 'closed by server'}")

    def pause_writing(self) -> None:
        if self._peer is not None:
            self._peer.pause_client_reading()

    def resume_writing(self) -> None:
        if self._peer is not None:
            self._peer.resume_client_reading()

    def data_received(self, data: bytes) -> None:
        try:
            self._receive(data)
        except (ProtocolViolation, UpstreamRefused) as exc:
            log.warning(
                "server_protocol_error", server_connection=self.id, route=self.route.database, error=str(exc)
            )
            transient = isinstance(exc, UpstreamRefused) and exc.sqlstate in _TRANSIENT_STARTUP_REFUSALS
            self._fail_waiter(str(exc), transient=transient)
            if self._transport is not None:
                self._transport.abort()

    def _receive(self, buffer: bytes) -> None:
        if self._buffer:
            buffer = m.take_whole_messages(self._buffer, buffer, MAX_BACKEND_MESSAGE)
            if not buffer:
                return
        peer = self._peer
        untouched = (
            pass_untouched_replies(buffer, self.state, MAX_BACKEND_MESSAGE)
            if peer is not None and self.result_watch is None
            else None
        )
        if untouched is not None:
            assert peer is not None
            consumed, status, parameters, last_start = untouched
            if consumed:
                out = buffer if consumed == len(buffer) else buffer[:consumed]
                last = (buffer[last_start], last_start, consumed)
                self._deliver(peer, buffer, out, status=status, parameters=parameters, last=last)
        else:
            frames, consumed = m.scan_frames(buffer, MAX_BACKEND_MESSAGE)
            if peer is not None:
                self._pass_on(peer, buffer, frames)
            elif frames:
                self._receive_detached(buffer, frames)
        if consumed < len(buffer):
            self._buffer += memoryview(buffer)[consumed:]

    def _pass_on(self, peer: ServerPeer, buffer: bytes, frames: list[m.Frame]) -> None:
        """Give the client what it must see of these messages, following state on the way."""
        if self.result_watch is not None:
            buffer, frames = self.result_watch.apply(buffer, frames)
        out, status, parameters = filter_server_messages(buffer, frames, self.state)
        last = frames[-1] if frames else None
        self._deliver(peer, buffer, out, status=status, parameters=parameters, last=last)

    def _deliver(
        self,
        peer: ServerPeer,
        buffer: bytes,
        out: bytes,
        *,
        status: bytes | None,
        parameters: list[bytes],
        last: m.Frame | None,
    ) -> None:
        """Give the client ``out``, what it must see of the server's messages, noting the reported
        parameters, the transaction status and a FATAL as the ``last`` message of ``buffer``."""
        for payload in parameters:
            name, value = m.parse_parameter_status(payload)
            self._note_reported(name, value)
            peer.server_parameter(name, value)
        if last is not None and last[0] == m.MSG_ERROR_RESPONSE:
            # A FATAL is the last message a server sends before it closes: only a batch's last one can be.
            _kind, start, end = last
            fields = m.parse_error_fields(buffer[start + 5 : end])
            if fields.get("S") in ("FATAL", "PANIC"):
                goodbye = buffer[start:end]
                if (
                    status == b"I"
                    and not self.state.pending
                    and peer.lets_go_between_transactions
                    and out.endswith(goodbye)
                ):
                    # Right behind the ReadyForQuery that ended the client's transaction (a fast
                    # shutdown reaches every idle backend): the goodbye is this connection's, not
                    # the client's, which takes another connection for its next transaction. libpq
                    # would read it while idle as a notice and then report the lost connection
                    # without an SQLSTATE.
                    out = out[: len(out) - len(goodbye)]
                    self.saying_goodbye = True
                    log.info("server_closing", server_connection=self.id, reason=fields.get("M", ""))
                else:
                    self.fatal_passed_on = True
        if out:
            peer.server_data(out)
        if status is not None:
            self.transaction_status = status
            peer.server_ready()
            if (self.saying_goodbye or (status == b"I" and self.is_clean)) and self._peer is peer:
                peer.server_idle()  # the pool closes a connection saying goodbye instead of lending it
        if self.fatal_passed_on and not self.closed:
            # The server closes the connection after its FATAL (protocol 55.2.9): end it here rather
            # than wait for that close, which a dead link or a lost reset may never bring. The client
            # then gets the end of its connection (server_lost) right behind the FATAL.
            self.close()

    def _receive_detached(self, buffer: bytes, frames: list[m.Frame]) -> None:
        for kind, start, end in frames:
            payload = buffer[start + 5 : end]
            if self._handshake is not None:
                reply = self._handshake.receive(kind, payload)
                if reply is not None and self._transport is not None:
                    self._transport.write(reply)
                if self._handshake.done:
                    self.note_startup_parameters(self._handshake.parameters)
                    self.backend_key = self._handshake.backend_key or (0, 0)
                    self._handshake = None
                    self._resolve_waiter()
                continue
            if kind == m.MSG_PARAMETER_STATUS:
                self._note_reported(*m.parse_parameter_status(payload))
            elif kind == _DATA_ROW:
                self._internal_row = bytes(payload)
            elif kind == m.MSG_ERROR_RESPONSE:
                fields = m.parse_error_fields(payload)
                self._internal_error = (fields.get("C", "XX000"), fields.get("M", ""))
                if fields.get("S") in ("FATAL", "PANIC"):
                    self.saying_goodbye = True
                    log.info("server_closing", server_connection=self.id, reason=fields.get("M", ""))
            elif kind == m.MSG_READY_FOR_QUERY:
                self.transaction_status = payload
                self._resolve_waiter()

    # --- settings ---

    def note_startup_parameters(self, parameters: Mapping[str, str]) -> None:
        """The ParameterStatus values of the server's startup: the values of the route."""
        self._settings_found_for = None
        self.reported.update(parameters)
        self._startup_reported.update(parameters)

    def _note_reported(self, name: str, value: str) -> None:
        self._settings_found_for = None
        self.reported[name] = value
        if name in _TRACKED_SETTINGS:
            if value == self._startup_reported.get(name):
                self.changed_settings.pop(name, None)
            else:
                self.changed_settings[name] = value

    def has_setting(self, name: str, value: str) -> bool:
        """Whether tracked setting ``name`` is ``value`` here, as spelled or as reported."""
        changed = self.changed_settings.get(name)
        if changed is not None and changed == value:
            return True
        # A reported setting's last ParameterStatus is its value; an unreported one at the
        # route's value is unknown to the proxy, so it is set when a client asks for it.
        return self.reported.get(name) == value

    def settings_found_for(self, wanted: Mapping[str, str]) -> bool:
        """Whether a client that wanted exactly ``wanted`` found every setting here as it wants
        (``note_settings_found``), and nothing changed since: the changed settings are compared
        (whatever changed them), a new reported value forgets it (_note_reported)."""
        found = self._settings_found_for
        return found is not None and found[0] == wanted and found[1] == self.changed_settings

    def note_settings_found(self, wanted: Mapping[str, str]) -> None:
        """Every tracked setting here is as ``wanted`` says (copies kept: both may change)."""
        self._settings_found_for = (dict(wanted), dict(self.changed_settings))

    def note_settings_applied(self, resets: Iterable[str], changes: Mapping[str, str]) -> None:
        """The proxy's set_config for a client succeeded: ``resets`` went back to the route's values."""
        for name in resets:
            self.changed_settings.pop(name, None)
        for name, value in changes.items():
            reported = self.reported.get(name)
            if reported is None:
                self.changed_settings[name] = value
            elif reported == self._startup_reported.get(name):
                self.changed_settings.pop(name, None)
            else:
                self.changed_settings[name] = reported

    def note_settings_unknown(self, names: Iterable[str]) -> None:
        """A client's statement may change these settings (SET, RESET, set_config): until the proxy
        reads them back, the next client's are set or reset whatever it finds here."""
        for name in names:
            self.changed_settings[SESSION_PARAMETERS.get(name, name)] = _UNKNOWN_VALUE

    async def reset_session_settings(self, timeout: float) -> None:
        """Every setting and the role back to the route's values, and no temporary table, cursor,
        channel or session lock left, as DISCARD ALL resets them but keeping the prepared
        statements: nothing a client changed out of the proxy's sight stays."""
        await self.run_internal(_RESET_SESSION_SETTINGS, timeout)
        # The reported ones the reset changed were reported (ParameterStatus): all are the route's.
        self.changed_settings.clear()
        self.unvetted_use = False

    async def read_settings(self, names: Iterable[str], timeout: float) -> dict[str, str]:
        """The current values of ``names`` (lower case), read with one query while no client is
        attached, and noted as this connection's: compared without another set from now on."""
        canonical = [SESSION_PARAMETERS.get(name, name) for name in names]
        calls = ", ".join(f"pg_catalog.current_setting({quote_literal(name)})" for name in canonical)
        self._internal_row = None
        await self.run_internal(f"SELECT {calls}", timeout)
        row = self._take_internal_row()
        # In the client encoding the last client left the connection in (always one the proxy reads).
        encoding = (
            accepted_encoding(self.reported.get("client_encoding", DEFAULT_ENCODING)) or DEFAULT_ENCODING
        )
        try:  # as the server reads the same bytes in a statement (SERVER_READINGS)
            values = (
                m.parse_text_row(row, lambda value: read_statement(value, encoding))
                if row is not None
                else []
            )
        except UnicodeDecodeError:
            values = []  # a value the proxy cannot read as the server does: not known
        if len(values) != len(canonical) or None in values:
            raise InternalQueryFailed("XX000", "the server did not return the settings asked for")
        settings = {name: value for name, value in zip(canonical, values, strict=True) if value is not None}
        for name, value in settings.items():
            if name in self._startup_reported:
                self._note_reported(name, value)
            else:
                self.changed_settings[name] = value
        return settings

    def _take_internal_row(self) -> bytes | None:
        row, self._internal_row = self._internal_row, None
        return row

    def note_settings_may_have_reset(self) -> None:
        """A client ran DISCARD ALL (or DEALLOCATE ALL): whether the settings the proxy set are
        still there depends on whether it succeeded, so the next client's are set again."""
        self.changed_settings = dict.fromkeys(self.changed_settings, _UNKNOWN_VALUE)

    # --- waiting for the server without a client attached ---

    def _resolve_waiter(self) -> None:
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _fail_waiter(self, reason: str, *, transient: bool = True) -> None:
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_exception(UpstreamConnectError(reason, transient=transient))

    async def _wait_ready(self, timeout: float) -> None:
        loop = asyncio.get_running_loop()
        self._waiter = loop.create_future()
        try:
            async with asyncio.timeout(timeout):
                await self._waiter
        except TimeoutError as exc:
            raise caused_by(UpstreamConnectError(f"server did not answer within {timeout:g}s"), exc) from exc

    async def authenticate(self, timeout: float, parameters: Mapping[str, str]) -> None:
        password = self.route.password.reveal() if self.route.password is not None else None
        self._handshake = UpstreamHandshake(
            user=self.route.user, database=self.route.dbname, password=password, parameters=parameters
        )
        assert self._transport is not None
        self._transport.write(self._handshake.startup_message())
        await self._wait_ready(timeout)

    async def run_internal(self, sql: str, timeout: float) -> None:
        """Run a proxy-issued simple query (reset, parameter sync) while no client is attached."""
        if not self.is_clean or self._peer is not None or self._transport is None:
            raise UpstreamConnectError("server connection is not idle")
        self._internal_error = None
        self._internal_busy = True
        self.state.forget_unnamed()  # a simple Query drops the server's unnamed statement
        self._transport.write(m.build_query(sql))
        try:
            await self._wait_ready(timeout)
        except BaseException:
            # The answer is still on its way: nobody else may use this connection.
            self.close()
            raise
        self._internal_busy = False
        # Through a method: here mypy would take the attribute for the None assigned above (it
        # does not see data_received set it during the await), and mypyc compiles it that way.
        error = self._take_internal_error()
        if error is not None:
            raise InternalQueryFailed(*error)

    def _take_internal_error(self) -> tuple[str, str] | None:
        error, self._internal_error = self._internal_error, None
        return error

    # --- lending to a client session ---

    def attach(self, peer: ServerPeer) -> None:
        self._peer = peer
        # Its own notifications name the backend as the client knows it (55.2.8).
        self.state.notifier_pids = (self.backend_key[0], peer.process_id)

    def detach(self) -> None:
        self._peer = None
        self.state.notifier_pids = None
        self.result_watch = None
        self.idle_since = time.monotonic()
        self.resume_reading()

    def send(self, data: bytes, frames: list[m.Frame]) -> None:
        """Send client messages (already rewritten), noting whether an extended cycle is open."""
        if frames:
            self.flushed = frames[-1][0] == _FLUSH
        # The last message that opens or ends an extended-protocol cycle decides.
        for kind, _start, _end in reversed(frames):
            if kind in _SYNC_POINT_TYPES:
                self.unsynced = False
                break
            if kind in _EXTENDED_QUERY_TYPES:
                self.cycle_runs_portal = self._runs_portal(frames)
                self.unsynced = True
                break
        assert self._transport is not None
        self._transport.write(data)

    def _runs_portal(self, frames: list[m.Frame]) -> bool:
        """Whether the cycle these messages leave open (begun in them or before) has a Bind or
        Execute. A Describe or Close of a portal needs none to count: with no transaction block
        open, the only portals left before this cycle are WITH HOLD cursors', which hold neither
        a snapshot nor locks (they are materialised at their commit)."""
        for kind, _start, _end in reversed(frames):
            if kind in _SYNC_POINT_TYPES:
                return False
            if kind in _PORTAL_RUNNING_TYPES:
                return True
        return self.unsynced and self.cycle_runs_portal

    def forget_session(self) -> None:
        """After the pool's DISCARD ALL: nothing the proxy set or prepared on this connection remains."""
        self.changed_settings.clear()
        self.unvetted_use = False
        self.state.statements.clear()
        self.state.forget_unnamed()

    def pause_reading(self) -> None:
        if self._transport is not None and not self.closed:
            self._reading_paused = True
            self._transport.pause_reading()

    def resume_reading(self) -> None:
        # Known here rather than asked of the transport: every hand-over back to the pool resumes.
        if self._reading_paused and self._transport is not None and not self.closed:
            self._reading_paused = False
            self._transport.resume_reading()


_DATA_ROW: Final = ord("D")
_FLUSH: Final = ord("H")
# DISCARD ALL's resets but DEALLOCATE ALL (the clients' prepared statements stay), and the role,
# which RESET ALL leaves alone; any user may go back to the one it logged in as. DISCARD TEMP:
# tables are looked up in pg_temp before any schema of a search_path that does not name it, so a
# temporary table would shadow the one a policy decided on. CLOSE ALL, UNLISTEN * and the advisory
# locks: a WITH HOLD cursor, a channel or a session lock taken out of sight (in a function) would
# otherwise stay with the server session, readable or held on behalf of whoever comes next.
_RESET_SESSION_SETTINGS: Final = (
    "SET SESSION AUTHORIZATION DEFAULT; RESET ROLE; RESET ALL; DISCARD TEMP; CLOSE ALL; UNLISTEN *;"
    " SELECT pg_advisory_unlock_all(); DISCARD SEQUENCES"
)
# Messages that open an extended-protocol cycle, which a Sync must end. Not Flush: it asks only for
# the output so far and cannot fail (psycopg's pipeline sends one right after its Sync).
_EXTENDED_QUERY_TYPES: Final = frozenset(b"PBDEC")
# Bind and Execute: they create and run a portal.
_PORTAL_RUNNING_TYPES: Final = frozenset(b"BE")
# Messages after which the server owes one ReadyForQuery (Query, Sync, FunctionCall).
_SYNC_POINT_TYPES: Final = frozenset(b"QSF")
# How long a closing server connection may take to flush its last writes (Terminate, close_notify).
_TLS_SHUTDOWN_TIMEOUT: Final = 2.0


async def open_socket(route: RouteConfig, timeout: float) -> socket.socket:
    """TCP connect with keepalives, since store-to-cloud links drop idle flows silently.

    Every failure here is transient (UpstreamConnectError.transient): a name that does not resolve
    now may resolve in a minute on a flaky WAN, and a refused port is a server not started yet.
    """
    loop = asyncio.get_running_loop()
    try:
        async with asyncio.timeout(timeout):
            infos = await loop.getaddrinfo(route.host, route.port, type=socket.SOCK_STREAM)
            last_error: OSError | None = None
            for family, kind, proto, _name, address in infos:
                sock = socket.socket(family, kind, proto)
                sock.setblocking(False)
                try:
                    await loop.sock_connect(sock, address)
                except OSError as exc:
                    sock.close()
                    last_error = exc
                    continue
                tune_socket(sock, route.pool.tcp_keepalive, route.pool.tcp_user_timeout)
                return sock
    except TimeoutError as exc:
        raise caused_by(
            UpstreamConnectError(f"connect to {route.host}:{route.port} timed out after {timeout:g}s"), exc
        ) from exc
    except OSError as exc:
        raise caused_by(UpstreamConnectError(f"cannot resolve {route.host}: {exc}"), exc) from exc
    raise UpstreamConnectError(f"connect to {route.host}:{route.port} failed: {last_error}")


async def _negotiate_tls(sock: socket.socket, route: RouteConfig, timeout: float) -> None:
    """SSLRequest (55.2.10): the server answers one byte, 'S' to go on with TLS or 'N'."""
    loop = asyncio.get_running_loop()
    try:
        async with asyncio.timeout(timeout):
            await loop.sock_sendall(sock, m.build_ssl_request())
            answer = await loop.sock_recv(sock, 1)
    except TimeoutError as exc:
        raise caused_by(UpstreamConnectError("server did not answer the SSLRequest in time"), exc) from exc
    except OSError as exc:
        raise caused_by(UpstreamConnectError(f"SSLRequest failed: {exc}"), exc) from exc
    if not answer:
        raise UpstreamConnectError("server closed the connection after the SSLRequest")
    if answer != b"S":
        raise UpstreamConnectError(
            f"server refused TLS (answered {answer!r}) but sslmode is {route.sslmode.value}",
            transient=False,
        )


async def _open_transport(
    route: RouteConfig,
    context: ssl.SSLContext | None,
    timeout: float,
    protocol_factory: Callable[[], asyncio.Protocol],
) -> asyncio.BaseTransport:
    sock = await open_socket(route, timeout)
    try:
        if context is None:
            transport, _ = await asyncio.get_running_loop().create_connection(protocol_factory, sock=sock)
            return transport
        await _negotiate_tls(sock, route, timeout)
        # The proxy's own TLS layer, as for terminals: OpenSSL reads the socket itself, one record
        # per read and no SSLWantReadError raised per read as on uvloop's memory BIOs.
        return await connect_tls(
            sock,
            protocol_factory(),
            context,
            server_hostname=route.host,
            handshake_timeout=timeout,
            shutdown_timeout=_TLS_SHUTDOWN_TIMEOUT,
        )
    except ssl.SSLError as exc:
        sock.close()
        # The server going away mid-handshake is transient; a certificate or protocol mismatch is not.
        transient = isinstance(exc, ssl.SSLEOFError | ssl.SSLZeroReturnError | ssl.SSLSyscallError)
        raise caused_by(
            UpstreamConnectError(f"TLS to {route.host}:{route.port} failed: {exc}", transient=transient), exc
        ) from exc
    except (OSError, TimeoutError) as exc:
        sock.close()
        raise caused_by(
            UpstreamConnectError(f"connection to {route.host}:{route.port} failed: {exc}"), exc
        ) from exc
    except BaseException:
        sock.close()
        raise


async def connect_server(
    route: RouteConfig,
    context: ssl.SSLContext | None,
    on_closed: Callable[[ServerConnection], None],
    parameters: Mapping[str, str],
) -> ServerConnection:
    """Open, secure and authenticate a new server connection for ``route``.

    A failure that may pass raises the pool's ServerUnreachable, so the pool retries it while clients
    wait; any other failure raises UpstreamConnectError and fails the waiting client at once.
    """
    timeout = route.pool.connect_timeout
    connection = ServerConnection(route, on_closed)
    try:
        await _open_transport(route, context, timeout, lambda: connection)
        try:
            await connection.authenticate(timeout, parameters)
        except BaseException:
            connection.close()
            raise
    except UpstreamConnectError as exc:
        if exc.transient:
            raise caused_by(ServerUnreachable(str(exc)), exc) from exc
        raise
    return connection


class _CancelProtocol(asyncio.Protocol):
    """Resolves ``closed`` when the server closes the CancelRequest connection.

    At module level (not inside send_cancel) so that mypyc can compile this module.
    """

    def __init__(self, closed: asyncio.Future[None]) -> None:
        self._closed = closed

    def connection_lost(self, exc: Exception | None) -> None:
        if not self._closed.done():
            self._closed.set_result(None)


class CancelOutcome(enum.Enum):
    NOT_SENT = "not sent"  # no longer wanted once the connection was open: nothing can land
    ANSWERED = "answered"  # the server closed the connection: it has acted on the request
    UNCONFIRMED = "unconfirmed"  # sent, but not answered in time: it may still land at any moment


async def send_cancel(
    route: RouteConfig,
    context: ssl.SSLContext | None,
    backend_key: tuple[int, int],
    still_wanted: Callable[[], bool],
) -> CancelOutcome:
    """Deliver a CancelRequest for the given real backend key on a fresh connection (55.2.7),
    unless ``still_wanted`` says otherwise once that connection is open (opening it takes round
    trips, during which the statement may have ended)."""
    closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    transport = await _open_transport(
        route, context, route.pool.connect_timeout, lambda: _CancelProtocol(closed)
    )
    try:
        if not still_wanted():
            return CancelOutcome.NOT_SENT
        cast(asyncio.WriteTransport, transport).write(m.build_cancel_request(*backend_key))
        # The server closes the connection once it has signalled the backend (libpq's own cancel
        # waits for this too): from then on the cancel cannot reach a statement sent afterwards.
        async with asyncio.timeout(route.pool.connect_timeout):
            await closed
        return CancelOutcome.ANSWERED
    except TimeoutError:
        return CancelOutcome.UNCONFIRMED
    finally:
        transport.close()
