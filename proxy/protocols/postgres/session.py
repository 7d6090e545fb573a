"""asyncio client session: a terminal's TLS connection from startup to Terminate, lent a server connection."""

from __future__ import annotations

import asyncio
import enum
import hmac
import random
import secrets
import ssl
import time
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from dataclasses import dataclass, field
from typing import Any, Final, NamedTuple, cast

import structlog
from prometheus_client import Counter

from proxy.audit import OnWriteFailure
from proxy.auditwriter import AuditLog
from proxy.config.model import Config, PoolMode, RouteConfig, SessionStateAction
from proxy.errors import (
    AdminShutdown,
    AuthenticationRefused,
    FeatureNotSupported,
    IdleInTransactionTimeout,
    InsufficientPrivilege,
    PolicyViolationLimit,
    ProtocolViolation,
    ProxyError,
    TooManyConnections,
    UnknownDatabase,
    UpstreamLost,
    UpstreamUnavailable,
)
from proxy.identity import Identity, IdentityError, check_user_name, identify
from proxy.limits import Limiter, LimitHit, LimitSettings, resolve
from proxy.metrics import BatchedHistogram, Metrics
from proxy.policy.encodings import (
    DEFAULT_ENCODING,
    accepted_encoding,
    read_statement,
    refusal_message,
    write_statement,
)
from proxy.policy.engine import (
    ANALYSIS_UNFINISHED,
    PROGRAM_LIMIT_EXCEEDED,
    Decision,
    PolicyEngine,
    StatementSummaries,
)
from proxy.policy.learn import ReviewLog
from proxy.policy.model import PolicyMode
from proxy.policy.postgres import ParseError, analyze
from proxy.policy.redact import unparsable
from proxy.pool import UpstreamPool
from proxy.preauth import PendingStartup, RecordThrottle, WrongCancelKeys
from proxy.protocols.postgres import messages as m
from proxy.protocols.postgres.analysis import (
    NOT_ANALYSED,
    Analysis,
    AnalysisFailed,
    AnalysisPool,
    AnalysisRequest,
)
from proxy.protocols.postgres.bindvalues import bound_texts, declared_types
from proxy.protocols.postgres.classifiercache import SessionStateClassifier
from proxy.protocols.postgres.parameters import (
    SessionParameters,
    StartupParameterError,
)
from proxy.protocols.postgres.prepared import (
    ClientStatements,
    Statement,
    StatementStats,
    sync_quietly,
    take_ready_synthetics,
)
from proxy.protocols.postgres.refusal import Refusal, audit_unwritable, ends_transaction, read_error
from proxy.protocols.postgres.results import ResultWatch
from proxy.protocols.postgres.sessionstate import Classification, Effect, classify
from proxy.protocols.postgres.timeouts import (
    UNBOUNDED,
    StatementTimeoutChanges,
    capped_statement_timeout,
    ceiling_milliseconds,
)
from proxy.protocols.postgres.upstream import (
    CancelOutcome,
    InternalQueryFailed,
    ServerConnection,
    UpstreamConnectError,
    send_cancel,
)
from proxy.shares import ServerShares, ShareAccount, default_share_cap
from proxy.tlsconfig import POSTGRES_ALPN, UpstreamTLS

log = structlog.get_logger("pos_proxy.session")


@dataclass(frozen=True, slots=True)
class Route:
    config: RouteConfig
    pool: UpstreamPool[ServerConnection]
    tls: UpstreamTLS
    # What the server reported at startup, for answering terminals without a server connection.
    server_parameters: dict[str, str] = field(default_factory=dict)
    # Read on every hand-over: an attribute of its own, not three lookups into the configuration.
    transaction_pooling: bool = field(init=False)
    # Server connections a terminal may hold when its limits do not say (default_share_cap): also
    # read on every hand-over.
    default_share_cap: int = field(init=False)
    # The server connections of this pool each terminal holds (limits.max_server_connections_per_terminal).
    shares: ServerShares = field(default_factory=ServerShares)
    # How the server reports a reported setting a client asked for at startup ("iso" is "ISO, MDY",
    # "true" is "on"), learned on this route's connections: a terminal is told what the server says.
    spellings: dict[tuple[str, str], str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "transaction_pooling", self.config.pool.mode is PoolMode.TRANSACTION)
        object.__setattr__(self, "default_share_cap", default_share_cap(self.config.pool.size))


@dataclass(slots=True)
class SessionRegistry:
    """Live sessions by the BackendKeyData the proxy gave them, and the tasks they started."""

    # By pid: a session-mode client is given its server backend's pid, which another client may
    # hold too for a moment (the backend served a session that is still ending, or a route to
    # another server has a backend of the same pid). Their secret keys differ, and the key decides.
    sessions: dict[int, list[ClientSession]] = field(default_factory=dict)
    live: set[ClientSession] = field(default_factory=set)
    _emptied: asyncio.Event | None = None
    tasks: set[asyncio.Task[None]] = field(default_factory=set)
    # The proxy is shutting down: a session finishing its startup now is refused (57P01).
    draining: bool = False
    # Guessing a cancel key is slowed to a few tries a minute per source address.
    wrong_keys: WrongCancelKeys = field(default_factory=WrongCancelKeys)
    # Counts a cancel not looked up because its source sent too many wrong keys (a metric's child).
    wrong_keys_refused: Callable[[], None] | None = None

    def register(self, session: ClientSession, process_id: int = 0) -> tuple[int, int]:
        """The pid and secret key for the client's BackendKeyData: ``process_id`` (its server
        backend's), or one of the proxy's own that no live session has; the key is always random,
        and unlike that of any other session with the same pid."""
        while not process_id:
            candidate = secrets.randbelow(2**31 - 1) + 1
            if candidate not in self.sessions:
                process_id = candidate
        sharing = self.sessions.setdefault(process_id, [])
        while True:
            secret_key = secrets.randbits(31)
            if all(other.secret_key != secret_key for other in sharing):
                break
        sharing.append(session)
        return process_id, secret_key

    def unregister(self, session: ClientSession) -> None:
        sharing = self.sessions.get(session.process_id)
        if sharing is not None and session in sharing:
            sharing.remove(session)
            if not sharing:
                del self.sessions[session.process_id]

    def session_closed(self, session: ClientSession) -> None:
        self.live.discard(session)
        if not self.live and self._emptied is not None:
            self._emptied.set()

    async def wait_until_empty(self) -> None:
        if self.live:
            self._emptied = asyncio.Event()
            await self._emptied.wait()

    def spawn(self, coroutine: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        task = asyncio.get_running_loop().create_task(coroutine)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return task

    def cancel(self, request: m.CancelRequest, source: str) -> asyncio.Task[None] | None:
        """Route a CancelRequest to the session it names; unknown or wrong keys do nothing.

        Returns the cancel's delivery to the server, if one is on its way: the terminal's cancel
        connection stays open until it is done, as PostgreSQL's stays until the server has acted
        on it, so a client that goes on once its cancel call returned never meets the cancel later.
        """
        address = source.rpartition(":")[0] or source
        if self.wrong_keys.refused(address):
            # Not looked up: a right key among the guesses must not tell the guesser anything.
            if self.wrong_keys_refused is not None:
                self.wrong_keys_refused()
            return None
        key = request.secret_key.to_bytes(4, "big", signed=True)
        for session in self.sessions.get(request.process_id, ()):
            if hmac.compare_digest(session.secret_key.to_bytes(4, "big"), key):
                return session.cancel_current_query(source)
        log.info("cancel_ignored", source=source, reason="unknown backend key")
        if self.wrong_keys.wrong(address):
            window = self.wrong_keys.window
            log.warning(
                "cancel_keys_refused",
                source=address,
                wrong_keys=self.wrong_keys.limit,
                window_s=window,
                reason=f"too many wrong cancel keys: its cancels are ignored for up to {window:g} s",
            )
        return None


@dataclass(frozen=True, slots=True)
class SessionEnvironment:
    config: Config
    routes: Mapping[str, Route]
    registry: SessionRegistry
    metrics: Metrics = field(default_factory=Metrics)
    limiter: Limiter = field(default_factory=Limiter)
    audit: AuditLog | None = None
    summaries: StatementSummaries = field(default_factory=StatementSummaries)
    policies: PolicyEngine = field(default_factory=lambda: PolicyEngine({}))
    review: ReviewLog | None = None
    classifier: SessionStateClassifier = field(default_factory=SessionStateClassifier)
    statement_stats: StatementStats = field(default_factory=StatementStats)
    # Records of connections refused before they started (the server's pre-TLS ones too).
    preauth_records: RecordThrottle = field(default_factory=lambda: RecordThrottle(20))
    timeout_changes: StatementTimeoutChanges = field(default_factory=StatementTimeoutChanges)
    # Where statements too long to analyse on the event loop go; None: analysed in place.
    analysis: AnalysisPool | None = None


_SHUTTING_DOWN = AdminShutdown(
    "terminating connection due to administrator command: the proxy is shutting down"
)

# Bytes a client may send while waiting for a server connection before it is no longer read.
_STASH_HIGH_WATER: Final = 256 * 1024
# Messages that each run a statement, for the statement rate: a simple Query, an Execute (also of
# a statement prepared long before, which a Parse count would miss) and a FunctionCall.
_STATEMENT_MESSAGES: Final = frozenset((m.MSG_QUERY, m.MSG_EXECUTE, m.MSG_FUNCTION_CALL))
# What _check_statements looks at: statement texts and function calls; with audit or statement
# limits, or after a policy reload, also each Bind (which statement a portal runs) and Execute.
_CHECKED_MESSAGES: Final = frozenset((m.MSG_QUERY, m.MSG_PARSE, m.MSG_FUNCTION_CALL))
_CHECKED_MESSAGES_COUNTING: Final = _CHECKED_MESSAGES | {m.MSG_BIND, m.MSG_EXECUTE}
_NO_SESSION_EFFECT: Final = Effect.NONE
_STATEMENT_TEXTS: Final = frozenset((m.MSG_QUERY, m.MSG_PARSE))
# Texts of statements a client no longer has, kept until this many pile up (see _note_parsed_text).
_STALE_TEXTS: Final = 8
# Frontend messages that go on to the server (Terminate ends the session instead).
_PASSED_ON: Final = m.FRONTEND_TYPES - {m.MSG_TERMINATE}
# Frontend messages after which the server owes a ReadyForQuery: Query, Sync, FunctionCall.
_SYNC_POINTS: Final = frozenset(b"QSF")
_MSG_SYNC: Final = ord("S")
QUERY_CANCELED = "57014"
# What the session knows of the unnamed portal (55.2.3: a simple Query destroys it).
_UNNAMED_PORTAL_NONE: Final = 0
_UNNAMED_PORTAL_BOUND: Final = 1
_UNNAMED_PORTAL_DESTROYED: Final = 2
_BIND_OR_QUERY: Final = frozenset((m.MSG_BIND, m.MSG_QUERY))
_DESCRIBE: Final = ord("D")
CONFIGURATION_LIMIT_EXCEEDED = "53400"
UNDEFINED_STATEMENT = "26000"  # invalid_sql_statement_name
RESERVED_NAME = "42939"  # reserved_name
# NAMEDATALEN - 1: the server keys prepared statements by a name's first this many bytes (in the
# database encoding), so two longer names the proxy tells apart would be one statement there.
_MAX_STATEMENT_NAME_BYTES: Final = 63
_NAME_TOO_LONG: Final = Refusal(
    "42622",  # name_too_long
    f"prepared statement names longer than {_MAX_STATEMENT_NAME_BYTES} bytes are not supported: "
    "the server reads only their first bytes",
)
# Prepared statements that change carried settings a session keeps before dropping closed ones.
_MAX_CARRYING_STATEMENTS: Final = 256
# Spellings of reported startup settings a route remembers (Route.spellings).
_MAX_SPELLINGS: Final = 1000
# Stands for an analysis that did not finish in time: refused, or pinned without a policy.
_UNFINISHED: Final = Analysis(None, NOT_ANALYSED)
# An execution's audit record when its statement's decision is no longer cached: a portal only
# runs a statement the server prepared, so its Parse was allowed.
_ALLOWED_AT_PARSE: Final = Decision(True, "allowed at parse")
# A Query whose text holds a NUL before its terminator: PostgreSQL fails it (08P01), so does the proxy.
_MALFORMED_QUERY: Final = Refusal(ProtocolViolation.sqlstate, "invalid message format")

# Low-cardinality reasons for refused connections, by the SQLSTATE the client was given.
_REFUSAL_REASONS = {
    "28000": "authentication",
    "3D000": "unknown database",
    "0A000": "unsupported startup",
    "53300": "pool timeout",
    "08001": "upstream unavailable",
    "08P01": "protocol violation",
    "57P01": "shutdown",
}


class _State(enum.Enum):
    STARTUP = "startup"
    CONNECTING = "connecting"
    READY = "ready"
    CLOSED = "closed"


class _StatementChecks(NamedTuple):
    mode: PolicyMode | None  # the role's policy mode; None: no policy for the role
    auditing: bool
    limited: bool  # statements per second limits
    # The policy was reloaded while the client had prepared statements: each Bind is looked at,
    # to decide a statement prepared under an earlier policy again before it runs.
    rechecking: bool = False


def _policy_refusal(decision: Decision | None, mode: PolicyMode | None) -> str | None:
    """The rule of a policy decision that refuses the statement: only enforce mode refuses, but the
    proxy's own size bound refuses in every mode (as _apply_policy does), and nothing reads the text."""
    if decision is None or decision.allowed:
        return None
    if mode is not PolicyMode.ENFORCE and decision.sqlstate != PROGRAM_LIMIT_EXCEEDED:
        return None
    return decision.rule


def _waits_on_client(server: ServerConnection) -> bool:
    """Whether ``server`` now waits for its client's next message while the client holds it: idle
    in a transaction after a ReadyForQuery, or inside an extended-protocol cycle the client has not
    synced (55.2.3), once every message of it is answered, or at once when the client asked for no
    answer (no Flush last), since then it cannot be waiting for one."""
    if server.unsynced:
        return not server.state.pending or not server.flushed
    return server.transaction_status != b"I" and not server.state.pending


class _BoundStatement(NamedTuple):
    """A client's statement decided at each Bind from its bound values (Effect.DECIDED_AT_BIND)."""

    text: bytes  # as the client sent it
    sql: str  # as the server parsed it
    types: tuple[int, ...]  # the parameter types its Parse declared
    reason: str  # why it is refused where no values are read


def _remember(rules: dict[bytes, str], name: bytes, rule: str | None) -> None:
    """Keep (or, once the name is reused for a statement nobody refused, forget) a refusal's rule."""
    if rule is None:
        rules.pop(name, None)
    else:
        rules[name] = rule


class ClientSession(asyncio.Protocol):
    """The terminal side of the protocol; message framing is sans-IO in ``messages``."""

    # One per terminal, thousands of them idle: slots rather than a dict of some 40 attributes.
    __slots__ = (
        "_analyses",
        "_analysis_task",
        "_analyze_above",
        "_audit_who",
        "_bound_statements",
        "_buffer",
        "_bytes_in",
        "_bytes_out",
        "_cancelling",
        "_carrying_statements",
        "_connect_task",
        "_counted_connection",
        "_cycle_started",
        "_decision_counters",
        "_direct_tls",
        "_draining",
        "_encoding",
        "_env",
        "_idle_transaction_since",
        "_idle_transaction_timeout",
        "_idle_transaction_timer",
        "_latency",
        "_limits",
        "_max_message",
        "_parameters",
        "_parsed_texts",
        "_pending",
        "_pinned_by",
        "_pool_wait",
        "_portal_texts",
        "_portals_before_reload",
        "_reading_paused",
        "_reading_settings",
        "_rebound_portals",
        "_rechecking",
        "_refusal",
        "_refused_portals",
        "_refused_statements",
        "_result_watch",
        "_rollback_portals",
        "_route",
        "_server",
        "_settings_to_read",
        "_share_account",
        "_share_held",
        "_share_timer",
        "_share_waiting",
        "_skipping_to_sync",
        "_sql_prepared",
        "_started",
        "_started_at",
        "_startup_timer",
        "_stash",
        "_stash_frames",
        "_stash_size",
        "_state",
        "_statement_checks",
        "_statements",
        "_statements_run",
        "_timeout_ceiling",
        "_transport",
        "_unnamed_portal",
        "_violations",
        "_waiting",
        "_waiting_since",
        "identity",
        "process_id",
        "secret_key",
        "source",
    )

    def __init__(
        self,
        environment: SessionEnvironment,
        source: str,
        *,
        direct_tls: bool = False,
        pending: PendingStartup | None = None,
    ) -> None:
        self._env = environment
        self.source = source
        self._direct_tls = direct_tls
        self._started = False
        self.identity: Identity | None = None
        self.process_id = 0
        self.secret_key = 0
        self._transport: asyncio.Transport | None = None
        self._state = _State.STARTUP
        self._buffer = bytearray()
        self._refusal: tuple[str, ProxyError] | None = None
        self._route: Route | None = None
        self._parameters: SessionParameters | None = None
        # The client_encoding the server reads this client's statements in: the proxy reads them so.
        self._encoding = DEFAULT_ENCODING
        self._server: ServerConnection | None = None
        self._statements = ClientStatements(environment.statement_stats)
        # Whole client messages waiting for a server connection (transaction pooling).
        self._stash: list[bytes] = []  # as they came: mostly one read, sent on without a copy
        self._stash_frames: list[m.Frame] = []  # the stash's messages, found when they came
        self._stash_size = 0
        self._pinned_by: str | None = None
        # Carried settings (sessionstate.CARRIED_SETTINGS) this client's statements may have changed
        # on its server connection: read back before the connection goes to anyone else.
        self._settings_to_read: set[str] = set()
        # Reading them back: what the client sends meanwhile waits in the stash.
        self._reading_settings = False
        # The client's prepared statements (by name, b"" unnamed) that change carried settings: each
        # Bind of one changes them again.
        self._carrying_statements: dict[bytes, frozenset[str]] = {}
        # The client's prepared statements decided at each Bind, from the values bound
        # (sessionstate.Effect.DECIDED_AT_BIND).
        self._bound_statements: dict[bytes, _BoundStatement] = {}
        self._violations = 0
        self._limits = LimitSettings()
        self._statement_checks = _StatementChecks(None, environment.audit is not None, False)
        self._counted_connection = False
        self._result_watch: ResultWatch | None = None
        self._cycle_started = 0.0
        self._latency: BatchedHistogram | None = None
        self._decision_counters: dict[tuple[str, bool], tuple[Counter, Counter]] = {}
        self._statements_run = 0
        # Statement texts by prepared-statement and portal name, so executions can be audited.
        self._parsed_texts: dict[bytes, bytes] = {}
        self._portal_texts: dict[bytes, bytes] = {}
        # While the audit log fails (refusing): portals bound to a ROLLBACK whose text is certain,
        # the only ones that may run (see _refused_unaudited).
        self._rollback_portals: set[bytes] = set()
        # SQL PREPARE statements by the name they prepare, decided again for each EXECUTE of it.
        self._sql_prepared: dict[str, bytes] = {}
        # A reload came while portals were open: until that transaction ends, only portals bound
        # since (decided under the current policy at their Bind) may run.
        self._portals_before_reload = False
        self._rebound_portals: set[bytes] = set()
        self._rechecking = False  # see _StatementChecks.rechecking
        # The rule that refused a Parse, by statement and then portal name: the client's Bind and
        # Execute of it run nothing of its text (the server fails them), so they are refused too.
        self._refused_statements: dict[bytes, str] = {}
        self._refused_portals: dict[bytes, str] = {}
        self._bytes_in = 0
        self._unnamed_portal = _UNNAMED_PORTAL_NONE
        self._bytes_out = 0
        self._connect_task: asyncio.Task[None] | None = None
        # In line for a server connection under transaction pooling (no task: the pool calls back).
        self._waiting: _ServerRequest | None = None
        self._waiting_since = 0.0
        self._pool_wait: BatchedHistogram | None = None
        self._startup_timer: asyncio.TimerHandle | None = None
        self._started_at = time.monotonic()
        self._max_message = environment.config.listen.max_message_size
        self._reading_paused = False
        self._draining = False
        self._audit_who: Mapping[str, object] | None = None  # see _audit_identity
        # This connection's entry among those not through startup yet (server.py's caps and deadline).
        self._pending = pending
        # A share of the pool for this terminal, counted on its account (Route.shares, kept from the
        # route's choice on): held, or waited for until _share_timer.
        self._share_account: ShareAccount | None = None
        self._share_held = False
        self._share_waiting = False
        self._share_timer: asyncio.TimerHandle | None = None
        # Idle inside a transaction since (monotonic; 0.0: not idle), checked by one timer at a time.
        self._idle_transaction_timeout: float | None = None
        self._idle_transaction_since = 0.0
        self._idle_transaction_timer: asyncio.TimerHandle | None = None
        # The role's statement_timeout in ms when its policy keeps clients from raising it; 0: none.
        self._timeout_ceiling = 0
        # Statements longer than this are analysed in a worker process before they are checked.
        self._analyze_above = environment.config.policy.analyze_in_worker_above
        # While one runs: the client is not read, and what it already sent waits in _buffer.
        self._analysis_task: asyncio.Task[None] | None = None
        # Worker analyses of statement texts waiting to be checked (_check_statements takes them).
        self._analyses: dict[bytes, Analysis] = {}
        # The delivery of a cancel to this client's server connection, while it is on its way: the
        # client's messages wait in the stash meanwhile, so it cannot land on them.
        self._cancelling: asyncio.Task[None] | None = None
        # A cancelled extended-protocol cycle that never reached a server: its messages up to the
        # Sync are dropped, as the server drops them after an error (55.2.3).
        self._skipping_to_sync = False

    # --- asyncio.Protocol: terminal side ---

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self._transport = cast(asyncio.Transport, transport)
        self._env.registry.live.add(self)
        loop = asyncio.get_running_loop()
        if self._pending is not None:
            # The deadline runs from accept, not from here: the whole pre-authentication phase is bounded.
            self._pending.drop = self._drop_unstarted
            self._startup_timer = loop.call_at(self._pending.startup_deadline, self._startup_timed_out)
        else:
            self._startup_timer = loop.call_later(
                self._env.config.listen.startup_timeout, self._startup_timed_out
            )
        if self._direct_tls and not self._agreed_on_postgres_alpn():
            # As PostgreSQL 17: direct TLS without ALPN "postgresql" may be another protocol's
            # traffic replayed at us (a cross-protocol attack), so no PostgreSQL bytes are sent.
            log.warning(
                "tls_handshake_failed", source=self.source, reason="direct TLS without ALPN postgresql"
            )
            self._transport.abort()
            return
        self._identify(self._transport)

    @property
    def _role(self) -> str:
        assert self.identity is not None
        return self.identity.role

    def _agreed_on_postgres_alpn(self) -> bool:
        assert self._transport is not None
        ssl_object = self._transport.get_extra_info("ssl_object")
        return ssl_object is not None and ssl_object.selected_alpn_protocol() == POSTGRES_ALPN

    def data_received(self, data: bytes) -> None:
        try:
            if self._state is _State.READY:
                if self._idle_transaction_since:
                    # The client spoke: its idle time starts again (a Flush or a partial message
                    # owes no ReadyForQuery that would re-arm the clock).
                    self._idle_transaction_since = time.monotonic()
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
        if isinstance(exc, ssl.SSLError):
            # A record that failed to decrypt or verify after the handshake: tampering on the way, or
            # a broken terminal TLS stack.
            # typeshed says str, but reason is None when the error did not come from OpenSSL
            # (compiled with mypyc, reading it as a str would raise TypeError right here).
            reason: str | None = getattr(exc, "reason", None)
            log.warning("tls_error", **self._log_fields(), reason=reason or str(exc))
        self._state = _State.CLOSED
        self._startup_over()
        for timer in (self._startup_timer, self._share_timer, self._idle_transaction_timer):
            if timer is not None:
                timer.cancel()
        if self._connect_task is not None:
            self._connect_task.cancel()
        waiting, self._waiting = self._waiting, None
        if waiting is not None and self._route is not None:
            self._route.pool.withdraw(waiting)
        if self._share_waiting and self._share_account is not None:
            self._share_waiting = False
            self._share_account.withdraw(self)
        self._env.registry.session_closed(self)
        if self._counted_connection and self.identity is not None:
            identity = self.identity
            self._env.limiter.close_connection(identity.store, identity.terminal, identity.role)
        if self.process_id:
            self._env.registry.unregister(self)
        self._release_server()
        self._give_back_share()
        if self._started:
            self._env.metrics.client_connections_active.labels(self._role).dec()
            self._audit(
                "session_end",
                "success",
                duration_s=round(time.monotonic() - self._started_at, 3),
                statements=self._statements_run,
                bytes_from_terminal=self._bytes_in,
                bytes_to_terminal=self._bytes_out,
            )
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
        self._bytes_out += len(data)
        server = self._server
        if server is not None:
            if server.state.errors_seen:
                server.state.errors_seen = False
                data = self._errors_passing(data)
            if server.unsynced and not server.state.pending and self._idle_transaction_timeout is not None:
                # Every message of an unsynced cycle is answered (a Flush asked for it): from now on
                # the server waits on the client, and no ReadyForQuery will say so.
                self._idle_from_now()
        if self._transport is not None and self._state is not _State.CLOSED:
            self._transport.write(data)

    def _errors_passing(self, data: bytes) -> bytes:
        """Count the ErrorResponses among the server's messages (``data``, whole messages) by who
        raised them; the proxy's own (refusals the server raised for it, result limits) reach the
        client with the proxy's fields only, not as errors of a PL/pgSQL function."""
        metrics = self._env.metrics
        frames, _consumed = m.scan_frames(bytes(data), len(data))
        parts: list[bytes] = []
        passed = 0
        for kind, start, end in frames:
            if kind != m.MSG_ERROR_RESPONSE:
                continue
            sqlstate, proxys_own = read_error(data[start + 5 : end])
            metrics.client_error("server" if proxys_own is None else "proxy", sqlstate)
            if proxys_own is not None:
                parts += (data[passed:start], proxys_own)
                passed = end
        if not parts:
            return data
        parts.append(data[passed:])
        return b"".join(parts)

    def server_parameter(self, name: str, value: str) -> None:
        if self._parameters is not None:
            self._parameters.note_reported(name, value)
        if name == "client_encoding":
            self._client_encoding_reported(value)
        elif name == "standard_conforming_strings" and value != "on":
            # Backslashes would escape in string literals, which the proxy's parser reads as on.
            self._server_reads_otherwise(name, value, "standard_conforming_strings must stay on")

    def _client_encoding_reported(self, value: str) -> None:
        """The server now reads this client's statements in ``value``: so does the proxy, or, for an
        encoding it cannot read as the server does (switched to where the proxy could not see, say
        inside a function), the session ends before the client sends another statement in it."""
        encoding = accepted_encoding(value)
        if encoding is not None:
            self._encoding = encoding
            return
        self._server_reads_otherwise("client_encoding", value, refusal_message(value))

    def _server_reads_otherwise(self, name: str, value: str, message: str) -> None:
        """The server reported a setting under which it splits statements otherwise than the proxy
        reads them: the session ends, and that server connection with it."""
        server, self._server = self._server, None
        if server is not None:
            # Its session now reads statements so: it serves nobody else.
            server.detach()
            server.close()
        self._audit(
            f"unsupported_{name}",
            "failure",
            setting=name,
            value=value,
            server_connection=server.id if server is not None else None,
        )
        self._fail(FeatureNotSupported(message), reason=f"server reported {name} {value}")
        self._state = _State.CLOSED  # nothing more of this server's output reaches the client

    def server_ready(self) -> None:
        """A ReadyForQuery: the statements sent since the server was last ready are done."""
        if self._portals_before_reload and self._server is not None and self._server.is_clean:
            # The transaction ended, and every portal with it.
            self._portals_before_reload = False
            self._rebound_portals.clear()
        if self._cycle_started and self._latency is not None:
            self._latency.observe(time.perf_counter() - self._cycle_started)
            self._cycle_started = 0.0
        if self._draining and not self.in_transaction:
            self.terminate(_SHUTTING_DOWN, "shutdown: transaction finished")
            return
        server = self._server
        if server is not None and server.cancel_requested and self._drop_server_after_unanswered_cancel():
            return
        if (
            self._idle_transaction_timeout is not None
            and server is not None
            and server.transaction_status != b"I"
            and not server.state.pending
            and not server.unsynced
        ):
            # Everything sent is answered and a transaction is open: the server waits on the client.
            self._idle_from_now()

    def _idle_from_now(self) -> None:
        """The server may be waiting on the client from now on: start its idle clock."""
        assert self._idle_transaction_timeout is not None
        self._idle_transaction_since = time.monotonic()
        if self._idle_transaction_timer is None:
            self._idle_transaction_timer = asyncio.get_running_loop().call_later(
                self._idle_transaction_timeout, self._check_idle_transaction
            )

    def _check_idle_transaction(self) -> None:
        """PgBouncer's idle_transaction_timeout: a client that opened a transaction, or an
        extended-protocol cycle it has not synced, and went quiet holds a server connection (and
        its locks) from everyone else; cut it off and close that connection, which rolls the
        transaction back."""
        self._idle_transaction_timer = None
        timeout, since, server = self._idle_transaction_timeout, self._idle_transaction_since, self._server
        if timeout is None or not since or server is None:
            return
        if not _waits_on_client(server):
            return  # busy again, or the transaction ended: the next idle moment re-arms
        remaining = since + timeout - time.monotonic()
        if remaining > 0:
            self._idle_transaction_timer = asyncio.get_running_loop().call_later(
                remaining, self._check_idle_transaction
            )
            return
        if server.unsynced and self._only_statements_in_cycle(server):
            self._sync_open_cycle(server, timeout)
            return
        # Closed now rather than when the terminal's TLS connection is gone: the pool gets it back at once.
        where = "an extended-protocol cycle without Sync" if server.unsynced else "transaction"
        self._release_server()
        self._give_back_share()
        self._fail(
            IdleInTransactionTimeout("terminating connection due to idle-in-transaction timeout"),
            reason=f"idle in {where} for {timeout:g} s",
        )

    def _only_statements_in_cycle(self, server: ServerConnection) -> bool:
        """Whether the client's open cycle only prepared, described or closed statements (as
        asyncpg's Connection.prepare leaves it), the server answered all of it without an error,
        and no transaction block is open: a Sync then ends nothing but the implicit transaction
        (and the locks that parsing took), and the statements outlive it."""
        return (
            not server.cycle_runs_portal
            and not server.state.pending
            and not server.state.skipping
            and server.transaction_status == b"I"
            and not server.cancel_requested
            and self._cancelling is None
        )

    def _sync_open_cycle(self, server: ServerConnection, timeout: float) -> None:
        """End the client's idle statements-only cycle with a Sync of the proxy's own, whose
        ReadyForQuery the client never sees: the connection is then idle outside a transaction
        (server_idle lends it back under transaction pooling). The client's Bind, Execute and Sync
        later open a cycle of their own, on whichever connection, its statements prepared there
        as for any transaction (the unnamed one parsed again where the server's may be another's)."""
        sync = sync_quietly(server.state)
        frames = [(_MSG_SYNC, 0, len(sync))]
        if self._result_watch is not None:
            self._result_watch.sent(sync, sync, frames)
        self._cycle_started = 0.0  # the statement's latency counts from the client's next message
        log.info("open_cycle_synced", **self._log_fields(), server_connection=server.id, idle_s=timeout)
        server.send(sync, frames)

    @property
    def lets_go_between_transactions(self) -> bool:
        route = self._route
        return route is not None and route.transaction_pooling and self._pinned_by is None

    def server_idle(self) -> None:
        """The server finished everything asked of it outside a transaction: lend it back."""
        server = self._server
        if server is None or not self.lets_go_between_transactions:
            return
        route = self._route
        assert route is not None
        self._server = None
        server.detach()
        if self._settings_to_read:
            self._read_settings_back(route, server)
            return
        route.pool.give_back(server)
        self._give_back_share()

    def _read_settings_back(self, route: Route, server: ServerConnection) -> None:
        """Learn the carried settings this client's transaction may have changed, then lend the
        connection back: the client's next transaction, on whichever connection, has them as the
        server left them (also after a rollback, an error, a RESET or a value bound at run time)."""
        names = sorted(self._settings_to_read)
        self._settings_to_read.clear()
        self._reading_settings = True
        self._env.registry.spawn(self._follow_settings(route, server, names))

    async def _follow_settings(self, route: Route, server: ServerConnection, names: list[str]) -> None:
        try:
            values = await server.read_settings(names, route.config.pool.connect_timeout)
        except (InternalQueryFailed, UpstreamConnectError, ProtocolViolation, UnicodeDecodeError) as exc:
            # The settings stay unknown on that connection; what this client has is unknown too.
            self._settings_unread(
                server, UpstreamLost("lost the connection to the database server"), str(exc)
            )
            return
        except Exception:
            log.exception("settings_read_back_failed", **self._log_fields(), server_connection=server.id)
            self._env.metrics.internal_errors_total.inc()
            self._settings_unread(server, ProxyError("internal error in the proxy"), "internal error")
            return
        if self._parameters is not None:
            self._parameters.wanted.update(values)
        self._reading_settings = False
        route.pool.give_back(server) if server.is_clean else server.close()
        self._give_back_share()
        if (
            self._stash
            and self._state is _State.READY
            and self._server is None
            and self._waiting is None
            and self._take_share(route)
        ):
            # What the client sent meanwhile goes on as _dispatch would have sent it.
            self._join_pool_line(route)

    def server_lost(self, reason: str) -> None:
        server, self._server = self._server, None
        # After the server's own FATAL the client expects the end of the connection: a second
        # ErrorResponse would read to libpq as two results for its one command.
        told = server is not None and server.fatal_passed_on
        self._fail(UpstreamLost("lost the connection to the database server"), reason=reason, tell=not told)

    def pause_client_reading(self) -> None:
        if self._transport is not None and not self._reading_paused:
            self._reading_paused = True
            self._transport.pause_reading()

    def resume_client_reading(self) -> None:
        if (
            self._transport is not None
            and self._reading_paused
            and self._state is _State.READY
            and self._analysis_task is None  # what comes meanwhile would only pile up in _buffer
        ):
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

    def _startup_over(self) -> None:
        """Out of the pre-authentication phase (through it, or ended): no longer counted by its caps."""
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.finish()

    def _drop_unstarted(self) -> None:
        """Dropped by the pre-authentication caps to make room for a newer connection."""
        if self._transport is not None:
            self._transport.abort()

    def _read_startup(self) -> None:
        length = m.startup_packet_length(self._buffer)
        if length is None or len(self._buffer) < length:
            return
        packet = m.parse_startup_packet(bytes(self._buffer[:length]))
        del self._buffer[:length]
        if isinstance(packet, m.CancelRequest):
            delivery = self._env.registry.cancel(packet, self.source)
            if delivery is None:
                self._close()
            else:
                # Closed once the server has acted on it (SessionRegistry.cancel says why).
                self.pause_client_reading()
                delivery.add_done_callback(self._cancel_delivered)
        elif isinstance(packet, m.StartupMessage):
            self._begin(packet)
        else:
            raise ProtocolViolation("encryption is already negotiated on this connection")

    def _begin(self, startup: m.StartupMessage) -> None:
        self._startup_over()
        if self._startup_timer is not None:
            self._startup_timer.cancel()
            self._startup_timer = None  # a cancelled handle an idle session would keep for nothing
        if self._refusal is not None:
            reason, error = self._refusal
            self._fail(error, reason=reason)
            return
        if self._env.registry.draining:
            # Accepted before the drain began, still in its handshake when it did.
            self._fail(_SHUTTING_DOWN, reason="shutdown")
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
        self._encoding = self._parameters.wanted["client_encoding"]
        role_timeout = self._env.config.roles[self._role].statement_timeout
        if role_timeout is not None:
            # The role's statement_timeout travels with the client's settings to every server
            # connection it uses; one the client asked for at startup may only be lower.
            wanted = self._parameters.wanted
            wanted["statement_timeout"] = capped_statement_timeout(
                wanted.get("statement_timeout"), role_timeout
            )
        capped = frozenset({"statement_timeout"}) if role_timeout is not None else frozenset()
        refusal = self._parameters.refusal_for(self._role, self._env.policies, capped)
        if refusal is not None:
            # As PostgreSQL refuses a startup setting the role may not SET: FATAL 42501.
            self._fail(InsufficientPrivilege(refusal), reason=f"startup setting refused: {refusal}")
            return
        self._parameters.follow_policy(self._role, self._env.policies)
        if not self._admit_connection():
            return
        self._route = route
        self._share_account = route.shares.account(self.identity.terminal_key)
        self._idle_transaction_timeout = route.config.pool.idle_transaction_timeout
        self._statements.max_count = route.config.pool.max_client_prepared_statements
        self._statements.max_bytes = route.config.pool.max_client_prepared_bytes
        # A server connection of the client's own keeps the client's statement names.
        self._statements.renames = route.transaction_pooling
        metrics = self._env.metrics
        self._pool_wait = metrics.batched(metrics.pool_wait_seconds, route.config.database)
        admission = self._env.limiter.shared_admission(self.identity.store, self._role, self._limits)
        if admission is not None:
            self._state = _State.CONNECTING
            self.pause_client_reading()
            self._connect_task = self._env.registry.spawn(self._await_shared_admission(admission, route))
            return
        self._connect(route)

    async def _await_shared_admission(self, admission: Awaitable[LimitHit | None], route: Route) -> None:
        """The connection limits shared with other proxies (limits.shared) let it in, or not."""
        hit = await admission
        if self._state is not _State.CONNECTING:
            return
        if hit is not None:
            self._limit_hit(hit)
            self._fail(TooManyConnections(hit.message), reason=hit.limit)
            return
        self._connect(route)

    def _connect(self, route: Route) -> None:
        if route.transaction_pooling and route.server_parameters and self._spelled_as_the_server(route):
            # No server connection is needed just to say hello.
            self._answer_startup(route.server_parameters, None)
            self.resume_client_reading()
            if self._buffer:
                self.data_received(b"")
            return
        self._state = _State.CONNECTING
        self.pause_client_reading()
        self._connect_task = self._env.registry.spawn(self._lease_server(route))

    def _spelled_as_the_server(self, route: Route) -> bool:
        """Whether this client's reported startup settings are known in the server's spelling (then
        spelled so); otherwise a server connection is set up first and reports them."""
        assert self._parameters is not None
        wanted, reported = self._parameters.wanted, route.server_parameters
        for name, value in wanted.items():
            if name not in reported or reported[name] == value or name == "client_encoding":
                continue  # client_encoding is carried in the server's name already (parameters.py)
            spelled = route.spellings.get((name, value))
            if spelled is None:
                return False
            wanted[name] = spelled
        return True

    def _learn_spellings(self, route: Route, asked: Mapping[str, str], server: ServerConnection) -> None:
        """After the startup settings were set on ``server``: how it reports what the client asked."""
        assert self._parameters is not None
        wanted, spellings = self._parameters.wanted, route.spellings
        for name, value in asked.items():
            spelled = server.reported.get(name)
            # Also a value already spelled so (client_encoding, always canonical): known from now on.
            if spelled is not None and spelled == wanted.get(name):
                if len(spellings) >= _MAX_SPELLINGS:
                    spellings.clear()  # clients asking for ever new values: start over
                spellings[(name, value)] = spelled

    def _admit_connection(self) -> bool:
        """Resolve this terminal's limits and count the connection, or refuse it (53300)."""
        identity = self.identity
        assert identity is not None
        config = self._env.config
        self._limits = resolve(
            config.roles[identity.role].limits,
            config.limits.stores.get(identity.store),
            config.limits.terminals.get(identity.terminal_key),
        )
        self._note_statement_checks()
        hit = self._env.limiter.open_connection(
            identity.store, identity.terminal, identity.role, self._limits
        )
        if hit is not None:
            self._limit_hit(hit)
            self._fail(TooManyConnections(hit.message), reason=hit.limit)
            return False
        self._counted_connection = True
        limits = self._limits
        if (
            limits.max_rows_per_statement
            or limits.max_bytes_per_statement
            or limits.max_rows_per_minute
            or limits.max_bytes_per_minute
        ):
            limiter = self._env.limiter
            self._result_watch = ResultWatch(
                lambda: limiter.result_guard(identity.store, identity.terminal, limits),
                self._limit_hit,
                self._cancel_cut_result,
            )
        return True

    def _cancel_cut_result(self) -> None:
        """Too many rows or bytes, and the server is still sending more: stop the statement there."""
        self.cancel_current_query("result-size guard")

    def _limit_hit(self, hit: LimitHit) -> None:
        self._env.metrics.limit_hits_total.labels(hit.limit).inc()
        log.warning("limit_hit", **self._log_fields(), limit=hit.limit, retry_after_s=hit.retry_after)
        self._audit("limit_hit", "failure", limit=hit.limit, retry_after_s=hit.retry_after)

    async def _lease_server(self, route: Route, server: ServerConnection | None = None) -> None:
        """Get a server connection (unless handed one) in step with this client's settings, then go on."""
        assert self._parameters is not None
        try:
            if server is None:
                waited_from = time.monotonic()
                server = await route.pool.acquire()
                self._observe_wait(waited_from)
            # Not this session's server until its settings match: what the client sends in the
            # meantime joins the stash behind what already waits there, instead of overtaking it.
            asked = dict(self._parameters.wanted) if self._state is _State.CONNECTING else None
            try:
                if self._must_reset(server):
                    await server.reset_session_settings(route.config.pool.connect_timeout)
                await self._parameters.apply(server, route.config.pool.connect_timeout)
            except BaseException:
                self._server = server  # released when the session ends: to the pool only if clean
                raise
            if asked is not None:
                self._learn_spellings(route, asked, server)
        except ProxyError as exc:
            self._fail(exc, reason=str(exc.__cause__ or exc))
            return
        except InternalQueryFailed as exc:
            self._fail(exc.as_client_error(), reason=str(exc))
            return
        except UpstreamConnectError as exc:
            self._fail(UpstreamUnavailable("could not prepare a database connection"), reason=str(exc))
            return
        if self._transport is None or self._state is _State.CLOSED:
            self._server = server
            self._release_server()
            return
        self._start_on(route, server)

    def _server_granted(self, server: ServerConnection) -> None:
        """The pool handed this waiting client a server connection, in the call that freed it."""
        self._waiting = None
        route = self._route
        assert route is not None and self._parameters is not None
        if self._transport is None or self._transport.is_closing():
            route.pool.give_back(server)
            return
        self._observe_wait(self._waiting_since)
        if self._needs_sync(server):
            # Setting them takes a round trip to the server: the one case that needs a task.
            self._connect_task = self._env.registry.spawn(self._lease_server(route, server))
            return
        self._start_on(route, server)

    def _server_refused(self, error: BaseException) -> None:
        self._waiting = None
        failure = error if isinstance(error, ProxyError) else UpstreamUnavailable(str(error))
        self._fail(failure, reason=str(error.__cause__ or error))

    def _observe_wait(self, waited_from: float) -> None:
        if self._pool_wait is not None:
            self._pool_wait.observe(time.monotonic() - waited_from)

    def _needs_sync(self, server: ServerConnection) -> bool:
        """Whether ``server`` needs a round trip (_lease_server) before this client may use it."""
        assert self._parameters is not None
        return self._parameters.needs_sync(server) or self._must_reset(server)

    def _must_reset(self, server: ServerConnection) -> bool:
        """A client whose policy is enforced must not run under settings (search_path, role) that
        an unvetted client's stored SQL may have changed out of sight on ``server``."""
        return server.unvetted_use and self._statement_checks.mode is PolicyMode.ENFORCE

    def _hold(self, server: ServerConnection) -> None:
        self._server = server
        server.attach(self)
        server.result_watch = self._result_watch
        if self._statement_checks.mode is not PolicyMode.ENFORCE:
            server.unvetted_use = True

    def _start_on(self, route: Route, server: ServerConnection) -> None:
        """Attach ``server`` and send it what the client sent while it had none."""
        starting = self._state is _State.CONNECTING
        if starting:
            # First: the attached server connection names the backend by the pid given here. In
            # session mode that is the backend's own (pg_backend_pid() and notifications agree
            # with the driver's pid); in transaction mode the backend changes, so the proxy's.
            self._answer_startup(
                server.reported, server.id, 0 if route.transaction_pooling else server.backend_key[0]
            )
        self._hold(server)
        if starting and route.transaction_pooling and not self._stash:
            # The startup only needed the server's parameters: lend it back at once.
            self.server_idle()
        if self._stash and self._server is server:
            stash = self._stash[0] if len(self._stash) == 1 else b"".join(self._stash)
            frames = self._stash_frames
            self._stash, self._stash_frames, self._stash_size = [], [], 0
            try:
                self._send(stash, frames)
            except ProxyError as exc:
                self._fail(exc, reason=str(exc))
                return
        elif route.transaction_pooling and not starting:
            # What it was leased for was cancelled while it waited: nothing to send.
            self.server_idle()
        self.resume_client_reading()
        if self._buffer:
            # Bytes that came right behind the startup packet.
            self.data_received(b"")

    def _answer_startup(
        self, server_parameters: Mapping[str, str], server_id: int | None, backend_pid: int = 0
    ) -> None:
        assert self._transport is not None and self._parameters is not None
        self.process_id, self.secret_key = self._env.registry.register(self, backend_pid)
        reported = dict(server_parameters)
        for name, value in self._parameters.wanted.items():
            if name in reported:
                reported[name] = value
        reply = [m.build_authentication_ok()]
        reply += [m.build_parameter_status(name, value) for name, value in reported.items()]
        reply.append(m.build_backend_key_data(self.process_id, self.secret_key))
        reply.append(m.build_ready_for_query(b"I"))
        self._transport.write(b"".join(reply))
        self._state = _State.READY
        self._started = True
        metrics = self._env.metrics
        metrics.client_connections_total.labels(self._role).inc()
        metrics.client_connections_active.labels(self._role).inc()
        self._latency = metrics.batched(metrics.statement_seconds, self._role)
        self._audit("connection_accepted", "success", **self._tls_fields())
        log.info("session_start", **self._log_fields(), server_connection=server_id)

    # --- ready: forwarding ---

    def _forward(self, data: bytes) -> None:
        self._bytes_in += len(data)
        if self._analysis_task is not None:
            # Behind a statement being analysed: in order, once its decision is in.
            self._buffer += data
            return
        if self._buffer:
            data = m.take_whole_messages(self._buffer, data, self._max_message)
            if not data:
                return
        frames, consumed = m.scan_frames(data, self._max_message)
        # The whole messages leave the buffer before they are acted on: a server connection the
        # pool grants during _dispatch feeds the buffer's rest back in (_start_on).
        chunk = data
        if consumed < len(data):
            chunk = data[:consumed]
            self._buffer += memoryview(data)[consumed:]
        unnamed_portal = self._unnamed_portal
        for index, (kind, start, end) in enumerate(frames):
            if kind in _PASSED_ON:
                if kind in _BIND_OR_QUERY:  # the two that change the unnamed portal
                    if kind == m.MSG_BIND:
                        if end > start + 5 and chunk[start + 5] == 0:
                            unnamed_portal = _UNNAMED_PORTAL_BOUND
                    elif unnamed_portal == _UNNAMED_PORTAL_BOUND:
                        unnamed_portal = _UNNAMED_PORTAL_DESTROYED
                elif unnamed_portal == _UNNAMED_PORTAL_DESTROYED and _uses_unnamed_portal(
                    chunk, kind, start, end
                ):
                    # The protocol says the portal is gone; PostgreSQL 15.18 may still find it, freed
                    # when a Query failed the transaction, and die with SIGSEGV reading it: the
                    # postmaster then restarts and every store's sessions end. Found by tests/fuzz.
                    raise ProtocolViolation(
                        "the unnamed portal was destroyed by a simple Query; Bind it again"
                    )
                continue
            if kind != m.MSG_TERMINATE:
                raise ProtocolViolation(f"invalid frontend message type {kind}")
            chunk = chunk[:start]
            if len(chunk) <= self._analyze_above or not self._analyzing(chunk, frames[:index], closing=True):
                if index:
                    self._dispatch(chunk, frames[:index])
                self._close()
            return
        self._unnamed_portal = unnamed_portal
        if frames and (len(chunk) <= self._analyze_above or not self._analyzing(chunk, frames)):
            self._dispatch(chunk, frames)

    def _analyzing(self, chunk: bytes, frames: list[m.Frame], *, closing: bool = False) -> bool:
        """Whether a statement among ``frames`` is too long to analyse on the event loop: then it
        is analysed in a worker process first, and the messages are dispatched (and the session
        closed, with ``closing``: a Terminate follows them) once its decision is in."""
        pool = self._env.analysis
        if pool is None:
            return False
        requests = self._analysis_requests(chunk, frames)
        if not requests:
            return False
        self.pause_client_reading()
        self._analysis_task = self._env.registry.spawn(
            self._analyze_then_dispatch(pool, requests, chunk, frames, closing)
        )
        return True

    def _analysis_requests(self, chunk: bytes, frames: list[m.Frame]) -> list[AnalysisRequest]:
        """The long statement texts among ``frames`` that no cache can answer."""
        mode = self._statement_checks.mode
        policies, classifier = self._env.policies, self._env.classifier
        policy = policies.policy(self._role) if mode is not None else None
        search_path = policy.search_path if policy is not None else None
        requests: dict[bytes, AnalysisRequest] = {}
        for kind, start, end in frames:
            if end - start <= self._analyze_above or kind not in _STATEMENT_TEXTS:
                continue
            text = chunk[start + 5 : end - 1] if kind == m.MSG_QUERY else _parse_text(chunk, start, end)[1]
            if len(text) <= self._analyze_above or text in requests:
                continue
            decision = policies.cached(self._role, text, self._encoding) if mode is not None else None
            if decision is not None and decision.sqlstate == PROGRAM_LIMIT_EXCEEDED:
                continue  # refused unread
            if (mode is not None and decision is None) or classifier.cached(text, self._encoding) is None:
                requests[text] = AnalysisRequest(
                    text, self._encoding, search_path, policies.max_statement_bytes
                )
        return list(requests.values())

    async def _analyze_then_dispatch(
        self,
        pool: AnalysisPool,
        requests: list[AnalysisRequest],
        chunk: bytes,
        frames: list[m.Frame],
        closing: bool,
    ) -> None:
        # Fail closed: _check_statements refuses statements without an analysis (or pins them,
        # for a role without a policy).
        answers = [_UNFINISHED] * len(requests)
        try:
            answers = await pool.analyze(requests)
        except AnalysisFailed as exc:
            log.warning(
                "statement_analysis_failed",
                **self._log_fields(),
                reason=str(exc),
                statement_bytes=[len(request.sql) for request in requests],
            )
        except Exception:
            log.exception("statement_analysis_failed", **self._log_fields())
            self._env.metrics.internal_errors_total.inc()
        self._analysis_task = None
        if self._state is not _State.READY:
            return
        for request, answer in zip(requests, answers, strict=True):
            self._analyses[request.sql] = answer
        try:
            self.resume_client_reading()
            if frames:
                self._dispatch(chunk, frames)
            if closing:
                self._close()
                return
            if self._stash_size > _STASH_HIGH_WATER:
                self.pause_client_reading()
            if self._buffer:
                self.data_received(b"")
        except ProxyError as exc:
            self._fail(exc, reason=str(exc))
        except Exception:
            log.exception("statement_dispatch_failed", **self._log_fields())
            self._env.metrics.internal_errors_total.inc()
            self.terminate(ProxyError("internal error in the proxy"), "internal error")

    def _dispatch(self, chunk: bytes, frames: list[m.Frame]) -> None:
        """Send whole client messages to the server connection, leasing one first if needed."""
        if self._skipping_to_sync:
            chunk, frames = self._skip_to_sync(chunk, frames)
            if not frames:
                return
        if self._server is not None:
            if self._cancelling is None:
                self._send(chunk, frames)
            else:
                # Held until the server has acted on the cancel: it must not find these running.
                self._stash_messages(chunk, frames)
            return
        route = self._route
        if route is None or self._state is not _State.READY:
            raise UpstreamLost("lost the connection to the database server")
        # Between transactions under transaction pooling: borrow a server for this one, if this
        # terminal is within its share of the pool.
        has_share = self._share_held or self._take_share(route)
        if has_share and not self._stash and not self._reading_settings and self._parameters is not None:
            idle = route.pool.try_acquire()
            if idle is not None and not self._needs_sync(idle):
                self._hold(idle)
                self._send(chunk, frames)
                return
            if idle is not None:
                route.pool.give_back(idle)
        self._stash_messages(chunk, frames)
        if (
            has_share
            and self._waiting is None
            and not self._reading_settings
            and (self._connect_task is None or self._connect_task.done())
        ):
            self._join_pool_line(route)

    def _stash_messages(self, chunk: bytes, frames: list[m.Frame]) -> None:
        if self._stash:
            offset = self._stash_size
            self._stash_frames += [(kind, start + offset, end + offset) for kind, start, end in frames]
        else:
            self._stash_frames = frames  # made for this read by scan_frames: the stash's to extend
        self._stash.append(chunk)
        self._stash_size += len(chunk)
        if self._stash_size > _STASH_HIGH_WATER:
            # A client that keeps sending while it waits is held off until a server is lent.
            self.pause_client_reading()

    def _send_stash(self) -> None:
        """Dispatch what waited in the stash (behind a cancel on its way) now that it may go on."""
        if not self._stash:
            return
        stash = self._stash[0] if len(self._stash) == 1 else b"".join(self._stash)
        frames = self._stash_frames
        self._stash, self._stash_frames, self._stash_size = [], [], 0
        self._dispatch(stash, frames)
        if self._stash_size <= _STASH_HIGH_WATER:
            self.resume_client_reading()

    def _skip_to_sync(self, chunk: bytes, frames: list[m.Frame]) -> tuple[bytes, list[m.Frame]]:
        """Drop the messages up to the Sync of a cancelled cycle, answer that Sync, keep the rest."""
        for index, (kind, _start, end) in enumerate(frames):
            if kind == _MSG_SYNC:
                self._skipping_to_sync = False
                if self._transport is not None:
                    self._transport.write(m.build_ready_for_query(b"I"))
                return chunk[end:], [(k, start - end, stop - end) for k, start, stop in frames[index + 1 :]]
        return b"", []

    def _join_pool_line(self, route: Route, waiting_since: float | None = None) -> None:
        """Wait for a server connection: max_client_wait in all from ``waiting_since`` (when the
        statement started waiting for the terminal's share of the pool), else from now."""
        self._waiting_since = time.monotonic() if waiting_since is None else waiting_since
        self._waiting = _ServerRequest(self)
        route.pool.request(self._waiting, self._waiting_since)

    # --- this terminal's share of the pool ---

    def _take_share(self, route: Route) -> bool:
        """Take one of the server connections this terminal may hold, or wait in its line for one."""
        if self._share_waiting:
            return False
        account = self._share_account
        assert account is not None
        cap = self._limits.max_server_connections_per_terminal or route.default_share_cap
        if account.take(cap, self):
            self._share_held = True
            return True
        self._share_waiting = True
        self._waiting_since = time.monotonic()
        self._share_timer = asyncio.get_running_loop().call_later(
            route.config.pool.max_client_wait, self._share_wait_over, cap
        )
        log.info("server_share_wait", **self._log_fields(), held=account.held, cap=cap)
        return False

    def share_granted(self) -> None:
        """Another session of this terminal gave its share back (in that session's call): go on."""
        self._share_waiting = False
        self._share_held = True
        if self._share_timer is not None:
            self._share_timer.cancel()
            self._share_timer = None
        route = self._route
        if route is None or self._state is not _State.READY:
            self._give_back_share()
            return
        if self._stash and self._server is None and self._waiting is None:
            try:
                self._join_pool_line(route, self._waiting_since)
            except Exception:
                # This runs inside the session that gave the share back: a fault here ends this one.
                log.exception("server_share_grant_failed", **self._log_fields())
                self._env.metrics.internal_errors_total.inc()
                self.terminate(ProxyError("internal error in the proxy"), "internal error")

    def _share_wait_over(self, cap: int) -> None:
        self._share_timer = None
        route, identity, account = self._route, self.identity, self._share_account
        if not self._share_waiting or route is None or identity is None or account is None:
            return
        self._share_waiting = False
        account.withdraw(self)
        hit = LimitHit(
            "server connections per terminal",
            None,
            f"terminal {identity.terminal_key} already holds {cap} server connection(s), its limit, "
            f"and none was given back within {route.config.pool.max_client_wait:g} s",
        )
        self._limit_hit(hit)
        self._fail(
            TooManyConnections(hit.message, hint="end open transactions on the terminal's other connections"),
            reason=hit.limit,
        )

    def _give_back_share(self) -> None:
        if self._share_held and self._share_account is not None:
            self._share_held = False
            self._share_account.give_back()

    def _send(self, chunk: bytes, frames: list[m.Frame]) -> None:
        server = self._server
        assert server is not None
        if not self._cycle_started:
            self._cycle_started = time.perf_counter()
        refusals, forget_at, named_in_sql = self._check_statements(chunk, frames)
        data = self._statements.rewrite(
            chunk, frames, server.state, refusals, forget_at, named_in_sql=named_in_sql
        )
        if self._result_watch is not None:
            # Which portal, cursor or statement each result belongs to follows from what the server got.
            self._result_watch.sent(data, chunk, frames)
        server.send(data, frames)
        if server.unsynced and self._idle_transaction_timeout is not None:
            # Mid-cycle: no ReadyForQuery will start the clock until the client sends a Sync.
            self._idle_from_now()
        synthetic = take_ready_synthetics(server.state)
        if synthetic and self._transport is not None:
            self._transport.write(synthetic)

    def _check_statements(
        self, chunk: bytes, frames: list[m.Frame]
    ) -> tuple[dict[int, Refusal], list[int], dict[int, list[tuple[bytes, Statement]]]]:
        """Apply the role's policy, then pin or refuse statements that leave session state behind.

        Returns the refusals, keyed by the offset of the message each one replaces, the offsets
        of statements that drop the server's prepared statements, and the client's statements
        that SQL EXECUTE or DEALLOCATE in a Query names, by the Query's offset.
        """
        refusals: dict[int, Refusal] = {}
        forget_at: list[int] = []
        named_in_sql: dict[int, list[tuple[bytes, Statement]]] = {}
        mode, auditing, limited, rechecking = self._statement_checks
        audit = self._env.audit
        # The log's own flag first: the call (and its settings) only while the log refuses.
        audit_refusal = self._audit_refusal() if audit is not None and audit.refusing else None
        policies = self._env.policies
        classifier = self._env.classifier
        analyses = self._analyses
        analysis: Analysis | None = None
        carrying = self._carrying_statements
        bound = self._bound_statements
        if bound and len(bound) >= _MAX_CARRYING_STATEMENTS:
            self._forget_closed_bound_statements()
        checked = (
            _CHECKED_MESSAGES_COUNTING
            if limited or auditing or rechecking or carrying or bound
            else _CHECKED_MESSAGES
        )
        # After a reload: statement names parsed earlier in these messages, decided just now.
        parsed_here: set[bytes] = set()
        parsed_name = b""
        # The text of the last Parse decided here and its decision: an Execute of it in the same
        # read (a driver's Parse, Bind, Execute, Sync) is audited with that decision, not a second.
        parse_decided: tuple[bytes, Decision] | None = None
        for kind, start, end in frames:
            if kind not in checked:
                continue
            if audit_refusal is not None and self._refused_unaudited(kind, chunk, start, end):
                refusals[start] = audit_refusal
                continue
            if limited and kind in _STATEMENT_MESSAGES and self._over_statement_rate(start, refusals):
                continue
            if kind == m.MSG_PARSE:
                # Drivers mostly use the unnamed statement, whose empty name needs no search for its end.
                unnamed = end > start + 5 and chunk[start + 5] == 0
                name_end = start + 5 if unnamed else chunk.find(b"\x00", start + 5, end)
                text = chunk[name_end + 1 : chunk.find(b"\x00", name_end + 1, end)]
                parsed_name = chunk[start + 5 : name_end]
                if not unnamed and self._cut_by_server(parsed_name):
                    refusals[start] = _NAME_TOO_LONG
                    continue
                if not unnamed:
                    over = self._statements.over_limit(parsed_name, end - name_end - 1)
                    if over is not None:
                        refusals[start] = over
                        continue
                if auditing:
                    if unnamed:  # one text, always kept: nothing to prune
                        self._parsed_texts[b""] = text
                    else:
                        self._note_parsed_text(parsed_name, text)
            elif kind == m.MSG_QUERY:
                text = chunk[start + 5 : end - 1]
                self._statements_run += 1
                if rechecking:
                    parsed_here.add(b"")  # the unnamed statement is gone: rewrite answers for it
                if b"\x00" in text:
                    # PostgreSQL reads a Query's text up to its first NUL, then fails the message as
                    # malformed. Never decided nor cached (nor parsed for the audit: a digest).
                    refusals[start] = _MALFORMED_QUERY
                    reason = _MALFORMED_QUERY.message
                    log.warning("malformed_message", **self._log_fields(), reason=reason, message="Query")
                    self._audit("malformed_message", "failure", reason=reason)
                    self._audit_statement(
                        Decision(False, "malformed message", reason, statements=(("", unparsable(text)),)),
                        mode,
                        text,
                        "malformed message",
                    )
                    continue
            elif kind == m.MSG_FUNCTION_CALL:
                self._apply_policy(policies.decide_function_call(self._role), start, refusals)
                continue
            elif kind == m.MSG_BIND:  # only with audit, statement limits or after a reload
                portal_end = chunk.find(b"\x00", start + 5, end)
                statement = chunk[portal_end + 1 : chunk.find(b"\x00", portal_end + 1, end)]
                portal = chunk[start + 5 : portal_end]
                carried = carrying.get(statement) if carrying else None
                if carried:
                    # Each execution changes them again, on whichever server connection runs it.
                    self._carry_settings(carried)
                deferred = bound.get(statement) if bound else None
                refused_at_bind = None
                if deferred is not None:
                    values = chunk[portal_end + len(statement) + 2 : end]
                    refused_at_bind = self._decide_bound(deferred, values, start, refusals)
                if auditing:
                    if len(self._portal_texts) >= self._statements.max_count:
                        # Named portals live until their transaction ends: only a hostile client
                        # keeps this many, and loses the texts its audit records would show.
                        self._portal_texts.clear()
                        self._refused_portals.clear()
                        self._rollback_portals.clear()
                    text = self._portal_texts[portal] = self._parsed_texts.get(statement, b"")
                    if audit_refusal is not None:
                        self._note_rollback_portal(portal, statement, text)
                    if refused_at_bind or self._refused_statements or self._refused_portals:
                        # else nothing to keep or forget
                        refused = refused_at_bind or self._refused_statements.get(statement)
                        _remember(self._refused_portals, portal, refused)
                if rechecking and mode is not None:
                    if statement not in parsed_here:
                        self._recheck_prepared(statement, start, refusals)
                    if self._portals_before_reload:
                        self._rebound_portals.add(portal)
                continue
            else:  # Execute, only with audit, statement limits or after a reload
                if self._portals_before_reload and mode is not None:
                    self._refuse_portal_before_reload(chunk, start, end, refusals)
                if auditing:
                    # Each execution is audited, also of a statement prepared long before.
                    portal = chunk[start + 5 : chunk.find(b"\x00", start + 5, end)]
                    executed = self._portal_texts.get(portal, b"")
                    self._statements_run += 1
                    if not mode:
                        decision = None
                    elif parse_decided is not None and executed is parse_decided[0]:
                        decision = parse_decided[1]
                    else:
                        decision = self._executed_decision(executed)
                    refused_by = self._refused_portals.get(portal) or (
                        None if decision is None or decision.allowed else _policy_refusal(decision, mode)
                    )
                    self._audit_statement(decision, mode, executed, refused_by)
                continue
            if analyses:
                analysis = analyses.get(text)
            if mode is None:
                decision = None
            elif analysis is None:
                decision = policies.decide(self._role, text, self._encoding)
                if kind == m.MSG_PARSE:
                    parse_decided = (text, decision)
            elif analysis is _UNFINISHED:
                decision = ANALYSIS_UNFINISHED
            else:
                decision = policies.decide_analyzed(
                    self._role, text, analysis.statements, self._encoding, readable=analysis.readable
                )
            if kind == m.MSG_QUERY and self._statements.renames and self._statements.by_name:
                named = self._protocol_statements_named(text, decision)
                if named:
                    named_in_sql[start] = named
            if decision is not None and decision.prepared_names and decision.allowed:
                decision = self._follow_prepared_names(decision)
            # An allowed statement (the data path's case) is refused by no rule: no call for it.
            refused_by = None if decision is None or decision.allowed else _policy_refusal(decision, mode)
            if refused_by is None:
                # Refused in every policy mode and without a policy: decided before the statement
                # is audited, so that its record says what became of it.
                if (
                    mode is not None
                    and self._timeout_ceiling
                    and self._raises_statement_timeout(text, start, refusals)
                ):
                    refused_by = "statement_timeout"
                else:
                    if analysis is None:
                        found = classifier.classify(text, self._encoding)
                    elif analysis is _UNFINISHED:
                        found = analysis.classification
                    else:
                        found = classifier.classified(text, self._encoding, analysis.classification)
                    if found.executes and carrying:
                        self._carry_executed(found.executes)
                    if found.executes and bound:
                        found = self._executes_bound(found)
                    # Decided at each Bind of it, if the proxy can keep it (else refused below).
                    at_bind = (
                        found.effect is Effect.DECIDED_AT_BIND
                        and kind == m.MSG_PARSE
                        and self._note_bound_statement(parsed_name, chunk[name_end + 1 : end], found.reason)
                    )
                    if at_bind:
                        checked = _CHECKED_MESSAGES_COUNTING  # its Binds may follow in these messages
                    elif found.effect is not _NO_SESSION_EFFECT:
                        refused_by = self._check_session_state(found, start, refusals, forget_at)
                    if (found.settings or self._carrying_statements) and kind == m.MSG_PARSE:
                        self._note_carrying_statement(parsed_name, found.settings)
                    if kind == m.MSG_PARSE and bound and not at_bind:
                        bound.pop(parsed_name, None)
            if (
                kind == m.MSG_QUERY
                or refused_by is not None
                or (decision is not None and not decision.allowed)
            ):
                self._audit_statement(decision, mode, text, refused_by)
            if auditing and (refused_by is not None or self._refused_statements) and kind == m.MSG_PARSE:
                _remember(self._refused_statements, parsed_name, refused_by)
            if decision is not None:
                self._apply_policy(decision, start, refusals)
            if rechecking and kind == m.MSG_PARSE and start not in refusals:
                # Decided just now; a refused Parse leaves the client's older statement of that
                # name in place, so a Bind of it is still decided again.
                parsed_here.add(parsed_name)
        if analyses:
            analyses.clear()
        return refusals, forget_at, named_in_sql

    def _audit_refusal(self) -> Refusal | None:
        """While the audit log takes no records and audit.on_write_failure is refuse: the refusal
        of every statement (the log writes the records held meanwhile once it takes them again)."""
        audit, settings = self._env.audit, self._env.config.audit
        failing = audit.failing if audit is not None else None
        if failing is None or settings is None or settings.on_write_failure is not OnWriteFailure.REFUSE:
            return None
        return audit_unwritable(failing.disk_full)

    def _refused_unaudited(self, kind: int, chunk: bytes, start: int, end: int) -> bool:
        """Whether a message runs a statement that must wait for the audit log; a ROLLBACK may end a
        transaction (which a refused statement failed) and free its server connection."""
        if kind == m.MSG_QUERY:
            return not ends_transaction(chunk[start + 5 : end - 1])
        if kind == m.MSG_EXECUTE:
            return chunk[start + 5 : chunk.find(b"\x00", start + 5, end)] not in self._rollback_portals
        return kind == m.MSG_FUNCTION_CALL

    def _note_rollback_portal(self, portal: bytes, statement: bytes, text: bytes) -> None:
        """Under session pooling a named statement's text is the proxy's guess: the client's own
        names reach the server, where a second Parse of one fails (42P05) and SQL PREPARE and
        DEALLOCATE change them out of the proxy's books. Only the unnamed statement (each Parse
        replaces it) or a name the proxy keeps (transaction pooling) is surely the ROLLBACK it reads."""
        if ends_transaction(text) and (not statement or self._statements.renames):
            self._rollback_portals.add(portal)
        else:
            self._rollback_portals.discard(portal)

    def _raises_statement_timeout(self, text: bytes, start: int, refusals: dict[int, Refusal]) -> bool:
        """The role's statement_timeout is a ceiling: SET, set_config, RESET and DISCARD ALL may
        not leave a longer one (or none) in force."""
        longest = self._env.timeout_changes.longest(text, self._encoding)
        if longest is None or (longest != UNBOUNDED and longest <= self._timeout_ceiling):
            return False
        message = (
            f"statement_timeout may only be lowered for role {self._role} "
            f"(at most {self._timeout_ceiling} ms, and not reset)"
        )
        log.warning("policy_violation", **self._log_fields(), rule="statement_timeout", reason=message)
        self._audit("policy_violation", "failure", rule="statement_timeout", reason=message)
        refusals[start] = Refusal(InsufficientPrivilege.sqlstate, message)
        return True

    def _executed_decision(self, text: bytes) -> Decision:
        """The decision on an executed statement's text, for its audit record: a long text whose
        decision has left the cache since its Parse is not parsed again on the event loop."""
        policies = self._env.policies
        if len(text) <= self._analyze_above:
            return policies.decide(self._role, text, self._encoding)
        return policies.cached(self._role, text, self._encoding) or _ALLOWED_AT_PARSE

    def _note_parsed_text(self, name: bytes, text: bytes) -> None:
        """Keep a statement's text for the audit records of its executions. Texts of statements
        the client no longer has (closed, refused) are dropped before a few pile up, so these
        stay within the client's prepared-statement limits (ClientStatements.over_limit)."""
        texts = self._parsed_texts
        texts[name] = text
        by_name = self._statements.by_name
        if len(texts) > len(by_name) + _STALE_TEXTS:
            # This Parse is not in by_name yet (the rewrite after these checks adds it): kept too.
            self._parsed_texts = {
                kept: texts[kept] for kept in texts if kept in (b"", name) or kept in by_name
            }

    def _over_statement_rate(self, start: int, refusals: dict[int, Refusal]) -> bool:
        identity = self.identity
        assert identity is not None
        hit = self._env.limiter.statement(identity.store, identity.terminal, identity.role, self._limits)
        if hit is None:
            return False
        self._limit_hit(hit)
        refusals[start] = Refusal(CONFIGURATION_LIMIT_EXCEEDED, hit.message)
        return True

    def _follow_prepared_names(self, decision: Decision) -> Decision:
        """Decide what an EXECUTE runs: the PREPARE this session sent for the name, under the
        current policy (a reload may forbid it now); note what PREPARE and DEALLOCATE change."""
        prepared = self._sql_prepared
        for use in decision.prepared_names:
            if use.action == "EXECUTE":
                # The PREPARE's text as the proxy read it (kept in UTF-8 whatever the client's
                # encoding), and one it prepared with the protocol (Parse) as the client sent it. A
                # PREPARE the server refused (the name taken by that Parse, a failed transaction)
                # is still recorded: the server may run either, so both must be allowed.
                bodies: list[tuple[bytes, str]] = []
                sql_body = prepared.get(use.name or "")
                if sql_body is not None:
                    bodies.append((sql_body, DEFAULT_ENCODING))
                statement = self._protocol_statement(use.name or "")
                if statement is not None:
                    bodies.append((statement.text, self._encoding))
                if not bodies:
                    # Not this session's: possibly another terminal's, on a shared server connection.
                    return Decision(
                        False,
                        "prepared statement",
                        f'prepared statement "{use.name}" does not exist',
                        UNDEFINED_STATEMENT,
                        decision.statements,
                    )
                for body, encoding in bodies:
                    executed = self._env.policies.decide(self._role, body, encoding)
                    if not executed.allowed:
                        return Decision(
                            False,
                            f"{executed.rule} on execute",
                            executed.message,
                            executed.sqlstate,
                            decision.statements,
                        )
            elif use.action == "PREPARE" and use.name is not None:
                # The server keeps the first of two PREPAREs of one name (the second fails).
                prepared.setdefault(use.name, use.text.encode())
            elif use.name is None:
                prepared.clear()
            else:
                prepared.pop(use.name, None)
                # The server has one namespace for both: the name is gone whichever way it was made.
                name = self._statement_name(use.name)
                if name is not None:
                    server = self._server
                    self._statements.deallocated(name, server.state if server is not None else None)
        return decision

    def _statement_name(self, name: str) -> bytes | None:
        """A statement name from the SQL text as the client's Parse would have spelled it."""
        try:
            return write_statement(name, self._encoding)
        except (UnicodeEncodeError, LookupError):
            return None

    def _protocol_statement(self, name: str) -> Statement | None:
        """The named statement this client prepared with Parse, that SQL names ``name``."""
        spelled = self._statement_name(name)
        return self._statements.by_name.get(spelled) if spelled is not None else None

    def _protocol_statements_named(
        self, text: bytes, decision: Decision | None
    ) -> list[tuple[bytes, Statement]]:
        """The statements this client prepared with Parse that SQL EXECUTE or DEALLOCATE in ``text``
        names (the policy decides such an EXECUTE by the statement's text, _follow_prepared_names)."""
        server = self._server
        if server is not None and server.transaction_status == b"E":
            return []  # the server refuses every statement before it looks at a name (25P02)
        if decision is not None:
            uses = decision.prepared_names
        else:  # a role without a policy: the SQL is read here, when it may name one
            lowered = text.lower()
            if b"execute" not in lowered and b"deallocate" not in lowered:
                return []
            try:
                facts = analyze(read_statement(text, self._encoding), ("public",))
            except (ParseError, UnicodeDecodeError):
                return []  # the server refuses it as well
            uses = tuple(found.prepared_name for found in facts if found.prepared_name is not None)
        named: list[tuple[bytes, Statement]] = []
        for use in uses:
            if use.action == "PREPARE" or use.name is None or use.name in self._sql_prepared:
                continue
            spelled = self._statement_name(use.name)
            statement = self._statements.by_name.get(spelled) if spelled is not None else None
            if spelled is None or statement is None:
                continue
            named.append((spelled, statement))
            if use.action == "DEALLOCATE" and decision is None:
                self._statements.deallocated(spelled, None)
        return named

    def _cut_by_server(self, name: bytes) -> bool:
        """Whether the server would read only the first bytes of statement name ``name``."""
        if len(name) > _MAX_STATEMENT_NAME_BYTES:
            return True
        if name.isascii():
            return False
        try:  # the server converts it to the database encoding (UTF8) first
            spelled = read_statement(name, self._encoding).encode("utf-8")
        except (UnicodeDecodeError, LookupError):
            return False  # the server refuses it
        return len(spelled) > _MAX_STATEMENT_NAME_BYTES

    def _recheck_prepared(self, name: bytes, start: int, refusals: dict[int, Refusal]) -> None:
        """A Bind of a statement prepared under an earlier policy: decide its text again first."""
        statements = self._statements
        if not statements.renames and self._cut_by_server(name):
            # Never parsed here (such a Parse is refused): on the client's own server connection
            # it would reach the statement of its first bytes, which the proxy cannot tell.
            refusals[start] = _NAME_TOO_LONG
            return
        statement = statements.by_name.get(name) if name else statements.unnamed
        texts: list[tuple[bytes, str]] = []
        if statement is not None and statement.generation != statements.generation:
            texts.append((statement.text, self._encoding))
        if name and not statements.renames:
            # On the client's own server connection a Bind reaches a statement SQL PREPARE made,
            # also when the proxy holds a Parse of that name the server refused (the name was taken).
            try:
                sql_text = self._sql_prepared.get(read_statement(name, self._encoding))
            except UnicodeDecodeError:
                sql_text = None  # no name SQL could give
            if sql_text is not None:
                texts.append((Statement(name, sql_text + b"\x00").text, DEFAULT_ENCODING))
        if not texts:
            # Unknown names and the missing unnamed statement are answered in rewrite; the server
            # answers for a name it does not have.
            return
        for text, encoding in texts:
            decision = self._env.policies.decide(self._role, text, encoding)
            if decision.prepared_names and decision.allowed:
                decision = self._follow_prepared_names(decision)
            if not decision.allowed:
                break
        if not decision.allowed:
            mode = self._statement_checks.mode
            self._audit_statement(
                decision, mode, text, _policy_refusal(decision, mode), on="bind after policy reload"
            )
        self._apply_policy(decision, start, refusals, on="bind after policy reload")
        if decision.allowed:
            server = self._server
            statements.redecided(name, server.state if server is not None else None)

    def _refuse_portal_before_reload(
        self, chunk: bytes, start: int, end: int, refusals: dict[int, Refusal]
    ) -> None:
        portal = chunk[start + 5 : chunk.find(b"\x00", start + 5, end)]
        if portal in self._rebound_portals or self._statement_checks.mode is not PolicyMode.ENFORCE:
            return
        reason = "the policy was reloaded after this portal was bound: bind it again"
        self._audit("policy_violation", "failure", rule="portal before reload", reason=reason)
        log.warning("policy_violation", **self._log_fields(), rule="portal before reload", reason=reason)
        refusals[start] = Refusal(InsufficientPrivilege.sqlstate, reason)

    def _apply_policy(
        self, decision: Decision, start: int, refusals: dict[int, Refusal], on: str | None = None
    ) -> None:
        mode = self._statement_checks.mode
        if decision.sqlstate == PROGRAM_LIMIT_EXCEEDED and not decision.allowed:
            # The proxy's own size bound, not the policy's say: refused in every mode.
            mode = PolicyMode.ENFORCE
        allowed = decision.allowed or mode is not PolicyMode.ENFORCE
        counters = self._decision_counters.get((decision.rule, allowed))
        if counters is None:
            # labels() looks the child up under a lock: once per session and outcome is enough.
            metrics = self._env.metrics
            counters = self._decision_counters[(decision.rule, allowed)] = (
                metrics.policy_decisions_total.labels(self._role, decision.rule),
                metrics.statements_total.labels(self._role, "allowed" if allowed else "refused"),
            )
        for counter in counters:
            counter.inc()
        if decision.allowed:
            if mode is PolicyMode.LEARN and decision.rule != "housekeeping":
                self._learn(decision)
            return
        fields = self._log_fields()
        statements = [text for _fingerprint, text in decision.statements]
        if mode is PolicyMode.MONITOR:
            log.warning(
                "policy_would_refuse",
                **fields,
                rule=decision.rule,
                reason=decision.message,
                statements=statements,
            )
            return
        if mode is PolicyMode.LEARN:
            self._learn(decision)
            return
        self._violations += 1
        # ``on``: refused when it was about to run, not when it came (a statement prepared earlier).
        where = {"on": on} if on is not None else {}
        self._audit(
            "policy_violation",
            "failure",
            rule=decision.rule,
            reason=decision.message,
            statements=statements,
            **where,
        )
        log.warning(
            "policy_violation",
            **fields,
            rule=decision.rule,
            reason=decision.message,
            statements=statements,
            **where,
        )
        policy = self._env.policies.policy(self._role)
        limit = policy.max_violations if policy is not None else None
        if limit is not None and self._violations >= limit:
            raise PolicyViolationLimit(f"too many refused statements for role {self._role}")
        refusals[start] = Refusal(decision.sqlstate, decision.message)

    def _audit_statement(
        self,
        decision: Decision | None,
        mode: PolicyMode | None,
        text: bytes,
        refused_by: str | None,
        on: str | None = None,
    ) -> None:
        """Refused statements always (``refused_by``: the rule that refused it, whichever check
        that was; ``on``: when it was decided, if not at its Parse or Query); allowed ones as the
        role's sampling share says."""
        audit, config = self._env.audit, self._env.config.audit
        if audit is None or config is None:
            return
        refused = refused_by is not None
        share = config.statement_share(self._role)
        if not refused and (share <= 0.0 or (share < 1.0 and random.random() >= share)):
            return
        statements = decision.statements if decision is not None and decision.statements else None
        if statements is None:
            statements = self._env.summaries.summarize(text, self._encoding)
        audit.record_with(
            self._audit_identity(),
            "statement",
            outcome="failure" if refused else "success",
            decision="refused" if refused else "allowed",
            rule=refused_by or (decision.rule if decision is not None else "no policy"),
            policy_mode=mode.value if mode is not None else None,
            fingerprints=[fingerprint for fingerprint, _text in statements],
            statement=" ; ".join(normalized for _fingerprint, normalized in statements),
            server_connection=self._server.id if self._server is not None else None,
            **({"on": on} if on is not None else {}),
        )

    def _learn(self, decision: Decision) -> None:
        review = self._env.review
        policy = self._env.policies.policy(self._role)
        if review is None or policy is None:
            return
        policy_file = self._env.config.roles[self._role].policy_file
        for fingerprint, text in decision.statements:
            if fingerprint and fingerprint not in policy.fingerprints:
                review.record(self._role, fingerprint, text, policy_file)

    def _check_session_state(
        self, found: Classification, start: int, refusals: dict[int, Refusal], forget_at: list[int]
    ) -> str | None:
        """Pin or refuse a statement that would leave state behind in a shared server session, and
        refuse one that would switch to a client encoding the proxy cannot read, whatever the role.
        Returns the rule that refused it, if one did."""
        if found.settings:
            self._carry_settings(found.settings)
        if found.effect is Effect.UNSUPPORTED_ENCODING or found.effect is Effect.DECIDED_AT_BIND:
            # DECIDED_AT_BIND here: no Bind follows (a Query, SQL PREPARE), so no value comes.
            log.warning("client_encoding_refused", **self._log_fields(), reason=found.reason)
            self._audit("unsupported_client_encoding", "failure", reason=found.reason)
            refusals[start] = Refusal(FeatureNotSupported.sqlstate, found.reason)
            return "client encoding"
        if found.effect is Effect.FORGETS_STATEMENTS:
            forget_at.append(start)
            if self._server is not None:
                # DISCARD ALL also resets every setting, if it runs: the proxy no longer knows them.
                self._server.note_settings_may_have_reset()
        elif found.effect is Effect.RESERVED_NAME:
            refusals[start] = Refusal(RESERVED_NAME, found.reason)
            return "reserved statement name"
        elif found.effect is Effect.CARRIED_SETTING:
            pass  # followed by _carry_settings: the client keeps transaction pooling
        elif self._route is not None and self._route.transaction_pooling and self._pinned_by is None:
            if self._route.config.pool.session_state is SessionStateAction.PIN:
                self._pinned_by = found.reason
                self._env.metrics.sessions_pinned_total.labels(self._route.config.database).inc()
                log.info("session_pinned", **self._log_fields(), reason=found.reason)
            else:
                refusals[start] = Refusal(
                    FeatureNotSupported.sqlstate,
                    f"{found.reason} is not supported under transaction pooling",
                    hint="use SET LOCAL inside a transaction, or a session-pooling route",
                )
                return "transaction pooling"
        return None

    def _note_carrying_statement(self, name: bytes, settings: frozenset[str]) -> None:
        """The client's statement ``name`` now changes carried ``settings`` whenever it is bound
        (none: it no longer does)."""
        carrying = self._carrying_statements
        if not settings:
            carrying.pop(name, None)
            return
        if len(carrying) >= _MAX_CARRYING_STATEMENTS:
            # Names the client closed are dropped here rather than on every Close.
            by_name = self._statements.by_name
            for closed in [kept for kept in carrying if kept and kept not in by_name]:
                del carrying[closed]  # in place: _check_statements holds this dict
        carrying[name] = settings

    def _note_bound_statement(self, name: bytes, body: bytes, reason: str) -> bool:
        """The client's statement ``name`` (Parse ``body`` after the name) is decided at each Bind;
        False when it cannot be (its Parse is then refused): a malformed body, or the client
        already holds too many such statements."""
        bound = self._bound_statements
        types = declared_types(body)
        if types is None or (name not in bound and len(bound) >= _MAX_CARRYING_STATEMENTS):
            return False
        text = body[: body.find(b"\x00")]
        try:  # read as the server parsed it
            bound[name] = _BoundStatement(text, read_statement(text, self._encoding), types, reason)
        except UnicodeDecodeError:
            return False
        return True

    def _forget_closed_bound_statements(self) -> None:
        """Drop the statements decided at Bind that the client has closed. Only before a chunk's
        checks: a statement parsed in the chunk being checked is not in by_name yet, and a Bind
        of it must still be decided."""
        by_name = self._statements.by_name
        for closed in [kept for kept in self._bound_statements if kept and kept not in by_name]:
            del self._bound_statements[closed]

    def _decide_bound(
        self,
        deferred: _BoundStatement,
        bind_body: bytes,
        start: int,
        refusals: dict[int, Refusal],
    ) -> str | None:
        """Decide a Bind of a statement whose set_config names its setting or value by a parameter:
        the bound values (read in the client encoding now in force, as the server reads them)
        stand where constants would, and the same rules apply (sessionstate.py). Returns the rule
        that refused it, if one did."""
        found = classify(deferred.sql, bound_texts(bind_body, deferred.types, self._encoding))
        if found.effect is Effect.DECIDED_AT_BIND:  # a value the proxy cannot read
            found = Classification(Effect.UNSUPPORTED_ENCODING, found.reason)
        if found.effect is _NO_SESSION_EFFECT:
            return None
        refused_by = self._check_session_state(found, start, refusals, [])
        if refused_by is not None:
            mode = self._statement_checks.mode
            self._audit_statement(None, mode, deferred.text, refused_by, on="bind")
        return refused_by

    def _executes_bound(self, found: Classification) -> Classification:
        """SQL EXECUTE of a statement decided at each Bind: the values in EXECUTE are not read
        here, so it is refused as that statement's Parse would have been without Bind."""
        for name in found.executes:
            spelled = self._statement_name(name)
            deferred = self._bound_statements.get(spelled) if spelled is not None else None
            if deferred is not None:
                return Classification(Effect.UNSUPPORTED_ENCODING, deferred.reason)
        return found

    def _settings_unread(self, server: ServerConnection, error: ProxyError, reason: str) -> None:
        server.close()
        self._reading_settings = False
        self._give_back_share()
        self._fail(error, reason=f"reading back settings: {reason}")

    def _carry_executed(self, names: frozenset[str]) -> None:
        """SQL EXECUTE of statements the client prepared through the protocol: those that change
        carried settings change them again, as a Bind of them does."""
        for name in names:
            spelled = self._statement_name(name)
            carried = self._carrying_statements.get(spelled) if spelled is not None else None
            if carried:
                self._carry_settings(carried)

    def _carry_settings(self, names: frozenset[str]) -> None:
        """A statement on its way may change carried settings: whatever it leaves on this server
        connection, the next client gets its own values set, and this client keeps what it set."""
        server = self._server
        if server is not None:
            server.note_settings_unknown(names)
        if self.lets_go_between_transactions:
            self._settings_to_read.update(names)

    # --- cancel ---

    def cancel_current_query(self, source: str) -> asyncio.Task[None] | None:
        """Cancel the client's statement: on the server connection running it (returns that
        delivery), or here if it has not reached one yet. Only ever this client's statement."""
        server, route = self._server, self._route
        if route is None or self._state is not _State.READY:
            self._ignore_cancel(source, "no server connection")
            return None
        if self._stash and (
            server is None or (not server.has_work_in_flight and server.transaction_status == b"I")
        ):
            # Waiting for a server connection (or behind a cancel on its way), outside a transaction.
            self._cancel_waiting_statement(source)
            return None
        if server is None:
            # Between transactions there is nothing to cancel, and nobody else's query may be.
            self._ignore_cancel(source, "no server connection")
            return None
        if not server.has_work_in_flight:
            # As PostgreSQL, which ignores a cancel for a backend waiting for its client.
            self._ignore_cancel(source, "no statement running")
            return None
        if self._cancelling is not None:
            return self._cancelling  # the one on its way is for the same statements
        log.info("cancel_forwarded", **self._log_fields(), from_source=source, server_connection=server.id)
        self._audit("cancel", "success", from_source=source, server_connection=server.id)
        # Lent to nobody else while the cancel may land; the client's next messages wait for it.
        server.cancel_requested = True
        self._cancelling = self._env.registry.spawn(self._deliver_cancel(route, server))
        return self._cancelling

    def _ignore_cancel(self, source: str, reason: str) -> None:
        log.info("cancel_ignored", **self._log_fields(), reason=reason)
        self._audit("cancel", "failure", from_source=source, reason=reason)

    def _cancel_delivered(self, _delivery: asyncio.Task[None]) -> None:
        self._close()  # this session's connection only carried the CancelRequest

    async def _deliver_cancel(self, route: Route, server: ServerConnection) -> None:
        outcome = CancelOutcome.UNCONFIRMED
        try:
            # Not sent if the statements it was meant for are over by the time the connection is
            # open: the client's next ones are not sent before it is settled, so none are running.
            outcome = await send_cancel(
                route.config,
                route.tls.context,
                server.backend_key,
                lambda: self._server is server and server.has_work_in_flight,
            )
        except UpstreamConnectError as exc:
            outcome = CancelOutcome.NOT_SENT
            log.warning("cancel_failed", route=route.config.database, error=str(exc))
        finally:
            self._cancel_settled(server, outcome)

    def _cancel_settled(self, server: ServerConnection, outcome: CancelOutcome) -> None:
        """The cancel was answered by the server, not needed, or never answered: go on."""
        self._cancelling = None
        if outcome is CancelOutcome.UNCONFIRMED:
            log.warning("cancel_unanswered", **self._log_fields(), server_connection=server.id)
        else:
            server.cancel_requested = False  # nothing of it can land any more
            if outcome is CancelOutcome.NOT_SENT:
                log.info("cancel_not_sent", **self._log_fields(), server_connection=server.id)
        if self._server is not server or self._state is not _State.READY:
            return  # let go meanwhile, and closed: it was not clean
        try:
            if not self._drop_server_after_unanswered_cancel() and not self._stash and server.is_clean:
                self.server_idle()
            self._send_stash()
        except ProxyError as exc:
            self._fail(exc, reason=str(exc))
            return
        if self._draining and not self.in_transaction:
            self.terminate(_SHUTTING_DOWN, "shutdown: transaction finished")

    def _drop_server_after_unanswered_cancel(self) -> bool:
        """Under transaction pooling, close the server connection of a cancel that was sent but
        never answered once it is idle between transactions: the cancel may still land on whatever
        it runs next. The client takes another connection for its next transaction."""
        server = self._server
        if (
            server is None
            or not server.cancel_requested
            or self._cancelling is not None
            or server.has_work_in_flight
            or server.transaction_status != b"I"
            or not self.lets_go_between_transactions
        ):
            return False
        self._release_server()  # closes it: not clean
        self._give_back_share()
        return True

    def _cancel_waiting_statement(self, source: str) -> None:
        """The client's first statement still waiting for a server connection never runs: it is
        answered as PostgreSQL answers a cancelled statement, and what the client sent after it
        keeps its place."""
        assert self._transport is not None
        stash = self._stash[0] if len(self._stash) == 1 else b"".join(self._stash)
        frames = self._stash_frames
        cut = next((end for kind, _start, end in frames if kind in _SYNC_POINTS), None)
        reply = m.build_error_response("ERROR", QUERY_CANCELED, "canceling statement due to user request")
        if cut is None:
            cut = len(stash)
            self._skipping_to_sync = True  # the Sync is still to come: answered when it does
        else:
            reply += m.build_ready_for_query(b"I")
        rest = stash[cut:]
        self._stash = [rest] if rest else []
        self._stash_frames = [(kind, start - cut, end - cut) for kind, start, end in frames if start >= cut]
        self._stash_size = len(rest)
        log.info("cancel_answered", **self._log_fields(), from_source=source, reason="waiting statement")
        self._audit("cancel", "success", from_source=source, server_connection=None)
        self._transport.write(reply)
        if not self._stash and self._server is None:
            self._leave_pool_line()
        if self._stash_size <= _STASH_HIGH_WATER:
            self.resume_client_reading()

    def _leave_pool_line(self) -> None:
        """Nothing waits for a server connection any more: leave the pool's line, and the
        terminal's line for a share, or give back the share taken for it."""
        route, account = self._route, self._share_account
        assert route is not None and account is not None
        waiting, self._waiting = self._waiting, None
        if waiting is not None:
            route.pool.withdraw(waiting)
        if self._share_waiting:
            self._share_waiting = False
            account.withdraw(self)
            if self._share_timer is not None:
                self._share_timer.cancel()
                self._share_timer = None
        elif not self._reading_settings and (self._connect_task is None or self._connect_task.done()):
            # Else a server connection whose settings are being set (or read back) holds it: its
            # hand-back (_start_on, _follow_settings) returns the share.
            self._give_back_share()

    # --- ending ---

    def _release_server(self) -> None:
        server, self._server = self._server, None
        if server is None or self._route is None:
            return
        server.detach()
        if self._route.transaction_pooling and self._pinned_by is None:
            self._route.pool.give_back(server) if server.is_clean else server.close()
        else:
            self._route.pool.release(server, reusable=server.is_clean)

    def _fail(self, error: ProxyError, *, reason: str, tell: bool = True) -> None:
        recorded = True
        if not self._started:
            self._env.metrics.client_connections_refused_total.labels(
                _REFUSAL_REASONS.get(error.sqlstate, "other")
            ).inc()
            # Anyone who can open a TLS connection can cause these: throttled (counts reported).
            recorded = self._env.preauth_records.allow("connection_refused")
            if recorded:
                self._audit(
                    "connection_refused",
                    "failure",
                    reason=reason,
                    sqlstate=error.sqlstate,
                    **self._tls_fields(),
                )
        if recorded:
            log.warning(
                "session_refused" if self._state is not _State.READY else "session_error",
                **self._log_fields(),
                sqlstate=error.sqlstate,
                client_message=error.message,
                reason=reason,
            )
        if tell and self._transport is not None and not self._transport.is_closing():
            self._env.metrics.client_error("proxy", error.sqlstate)
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

    @property
    def in_transaction(self) -> bool:
        """Work in flight on the server that a graceful shutdown lets finish."""
        return self._server is not None and not self._server.is_clean

    def drain(self) -> None:
        """Shutdown: end the session now if it is idle, else when its transaction is over."""
        self._draining = True
        if not self.in_transaction:
            self.terminate(_SHUTTING_DOWN, "shutdown")

    def terminate(self, error: ProxyError, reason: str) -> None:
        """End the session from outside (shutdown, admin disconnect) with a FATAL error."""
        self._fail(error, reason=reason)

    def _audit(self, event: str, outcome: str, **fields: object) -> None:
        audit = self._env.audit
        if audit is not None:
            audit.record_with(self._audit_identity(), event, outcome=outcome, **fields)

    def _audit_identity(self) -> Mapping[str, object]:
        """PCI DSS 10.2.2: who (terminal identity), from where, and which resource.

        Built once both identity and route are known (neither changes afterwards), then shared by every
        record of the session, so a statement record does not copy them on the data path."""
        if self._audit_who is not None:
            return self._audit_who
        fields: dict[str, object] = {"source": self.source}
        identity = self.identity
        if identity is not None:
            fields.update(
                store=identity.store,
                terminal=identity.terminal,
                role=identity.role,
                serial=identity.serial_hex,
            )
        if self._route is not None:
            fields["route"] = self._route.config.database
            if identity is not None:
                self._audit_who = fields
        return fields

    def _tls_fields(self) -> dict[str, object]:
        ssl_object = self._transport.get_extra_info("ssl_object") if self._transport is not None else None
        if ssl_object is None:
            return {}
        cipher = ssl_object.cipher()
        fields: dict[str, object] = {
            "tls_version": ssl_object.version(),
            "cipher": cipher[0] if cipher else None,
        }
        if self.identity is not None:
            fields.update(subject=self.identity.subject, fingerprint_sha256=self.identity.fingerprint_sha256)
        return fields

    def use_environment(self, environment: SessionEnvironment) -> None:
        """A reload: policies, roles and limits apply to this live session from now on, also to
        the statements it prepared before (decided again when next bound or executed)."""
        if environment.policies is not self._env.policies:
            statements = self._statements
            statements.generation += 1
            if statements.by_name or statements.unnamed is not None or self._sql_prepared:
                self._rechecking = True
            server = self._server
            if server is not None and not server.is_clean:
                # Portals it bound in its open transaction were decided under the old policy.
                self._portals_before_reload = self._rechecking = True
                self._rebound_portals.clear()
        self._env = environment
        self._analyze_above = environment.config.policy.analyze_in_worker_above
        self._note_statement_checks()

    def _note_statement_checks(self) -> None:
        """What _check_statements must do for each statement, worked out once, not per message."""
        limits = self._limits
        self._statement_checks = _StatementChecks(
            self._env.policies.mode(self.identity.role) if self.identity is not None else None,
            auditing=self._env.audit is not None,
            limited=bool(limits.statements or limits.role_statements or limits.store_statements),
            rechecking=self._rechecking,
        )
        role = self._env.config.roles.get(self.identity.role) if self.identity is not None else None
        enforced = self._statement_checks.mode is PolicyMode.ENFORCE
        ceiling = role.statement_timeout if role is not None and enforced else None
        self._timeout_ceiling = ceiling_milliseconds(ceiling) if ceiling is not None else 0

    def running_for(self, now: float) -> float:
        """Seconds the statements sent to the server last have run (``now``: time.perf_counter()),
        0 while none is running."""
        started = self._cycle_started
        return now - started if started else 0.0

    @property
    def route_name(self) -> str | None:
        return self._route.config.database if self._route is not None else None

    def describe(self) -> dict[str, object]:
        """This session for the admin API (like a row of PgBouncer's SHOW CLIENTS)."""
        server = self._server
        return {
            **self._log_fields(),
            "state": self._state.value,
            "connected_s": round(time.monotonic() - self._started_at, 3),
            "server_connection": server.id if server is not None else None,
            "pinned_by": self._pinned_by,
        }

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


def _uses_unnamed_portal(chunk: bytes, kind: int, start: int, end: int) -> bool:
    """An Execute or a Describe of the unnamed portal (its name, the empty string, is one NUL)."""
    if kind == m.MSG_EXECUTE:
        return end > start + 5 and chunk[start + 5] == 0
    return kind == _DESCRIBE and end > start + 6 and chunk[start + 5] == ord("P") and chunk[start + 6] == 0


def _parse_text(chunk: bytes, start: int, end: int) -> tuple[int, bytes]:
    """Where the statement name of the Parse message at ``start`` ends, and its statement text."""
    # Drivers mostly use the unnamed statement: no search for the end of an empty name.
    empty_name = end > start + 5 and chunk[start + 5] == 0
    name_end = start + 5 if empty_name else chunk.find(b"\x00", start + 5, end)
    return name_end, chunk[name_end + 1 : chunk.find(b"\x00", name_end + 1, end)]


class _ServerRequest:
    """A client's place in its pool's line under transaction pooling. The pool answers it in the
    call that frees a connection, so the connection goes on to this client's stashed messages
    at once instead of sitting idle until the event loop's next turn."""

    __slots__ = ("_answered", "_session")

    def __init__(self, session: ClientSession) -> None:
        self._session = session
        self._answered = False

    def done(self) -> bool:
        return self._answered

    def set_result(self, server: ServerConnection, /) -> None:
        self._answered = True
        try:
            self._session._server_granted(server)
        except Exception:
            # This runs inside whichever session freed the connection: a fault in this client's
            # handling must end this client (and the connection, in an unknown state), not that one.
            log.exception("server_grant_failed", server_connection=server.id)
            self._session._env.metrics.internal_errors_total.inc()
            server.close()
            self._session.terminate(ProxyError("internal error in the proxy"), "internal error")

    def set_exception(self, exception: BaseException, /) -> None:
        self._answered = True
        self._session._server_refused(exception)

    def cancel(self) -> bool:
        answered, self._answered = self._answered, True
        return not answered
