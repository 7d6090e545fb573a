"""Named prepared statements across pooled server connections (sans-IO).

In transaction pooling a client's next transaction may run on another server connection
than the one it prepared its statements on. The proxy therefore:

* gives every statement a server-side name derived from its text and parameter types, so
  clients preparing the same statement share one server-side statement;
* rewrites statement names in Parse, Bind, Describe and Close (55.7), prepares a statement
  on the current server connection when that one lacks it, answers Close itself, and drops
  the server's answers to the messages it added on its own;
* never lets a client use a server-side statement older than its own Parse of it: a client's
  Parse always reaches the server (the copy there is replaced), and a copy the server calls
  stale (0A000 "cached plan must not change result type", after ALTER TABLE and the like) is
  replaced at its next use, so a driver that re-prepares after that error gets a fresh plan as
  it would from the server;
* never lets a client bind a copy whose result columns differ from those its own Describe of
  the statement returned (a copy prepared after a schema change): it answers 0A000 as the server
  answers for the client's own statement then, and skips to the client's Sync as the server would;
* keeps at most ``capacity`` statements per server connection, closing the least recently
  used one on the server when a new one needs room;
* follows each client's unnamed statement itself: a server connection's unnamed statement
  may be another client's (it outlives transactions, 55.2.3), so a Bind or Describe of the
  unnamed statement reaches the server only where the proxy knows the client's own is there
  (behind its Parse in the same cycle, or on that connection with every reply in and no
  error since); elsewhere the proxy parses the client's statement again first, or answers as
  the server would when the client has none.

In session pooling the server connection is the client's alone: named statements pass with
the client's own names (``ClientStatements.renames`` off) and the proxy only follows which
names exist, for the policy's sake.

Responses arrive in the order requests were sent (55.2.3), so a FIFO of expected replies is
enough to know which server message answers which request.
"""

from __future__ import annotations

import enum
import hashlib
import time
from collections import OrderedDict, deque
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Final

from librt.strings import read_i32_be

from proxy.errors import ProtocolViolation
from proxy.protocols.postgres import messages as m
from proxy.protocols.postgres.refusal import Refusal

_PARSE_COMPLETE: Final = b"1\x00\x00\x00\x04"
_CLOSE_COMPLETE: Final = b"3\x00\x00\x00\x04"
# Messages the server may send at any time, outside any request's reply (55.2.7).
_ASYNCHRONOUS: Final = frozenset(b"NAS")
_ERROR: Final = ord("E")
# PostgreSQL's answer to a Bind or Describe of a statement whose result type changed since it was
# prepared (plancache.c, RevalidateCachedQuery): the statement stays broken until closed.
_STALE_PLAN: Final = b"\x00C0A000\x00"  # the SQLSTATE field (never the first: severity is)
# What the server answers to a Bind of a statement whose result columns changed since its Parse
# (plancache.c): drivers recognise it by the routine (asyncpg) or the message (pgjdbc) and prepare
# again.
STALE_PLAN_ERROR: Final = m.build_message(
    b"E",
    b"SERROR\x00VERROR\x00C0A000\x00Mcached plan must not change result type\x00"
    b"Fplancache.c\x00RRevalidateCachedQuery\x00\x00",
)
# CommandComplete tags after which the server has no named prepared statements left.
_FORGETTING_TAGS: Final = (b"DISCARD ALL\x00", b"DEALLOCATE ALL\x00")


class Reply(enum.Enum):
    FORWARD = 1  # the client asked: pass the server's reply on
    DROP = 2  # the proxy asked: the client must never see the reply (errors excepted)
    SYNTHETIC = 3  # nothing was sent: the proxy answers in the server's place


# Module globals: looked up once per message on the reply path, cheaper than the enum attribute.
_DROP: Final = Reply.DROP
_SYNTHETIC: Final = Reply.SYNTHETIC


@dataclass(frozen=True, slots=True)
class Expected:
    """The reply one request will get: which message types end it, and what to do with it.

    Immutable, so the common ones are shared constants instead of one object per message.
    """

    ends_with: bytes
    reply: Reply = Reply.FORWARD
    synthetic: bytes = b""
    # Server-side statement this Parse creates: forgotten again if the server skips or refuses it.
    creates: bytes | None = None
    # Server-side statement this Parse replaces (after the proxy's Close of it): stale if skipped.
    replaces: bytes | None = None
    # Evicted or replaced statement this Close removes: back on the list (stale) if skipped.
    closes: bytes | None = None
    # Server-side statement this Bind or Describe uses: a 0A000 answer marks it stale.
    uses: bytes | None = None
    # A Describe of a client's statement: where its result description is noted, under which name.
    noted_in: tuple[dict[bytes, bytes], bytes] | None = None
    # The Sync ending an extended-protocol cycle: where skipping after an error stops (55.2.3).
    sync: bool = False

    @property
    def ends_cycle(self) -> bool:
        return self.ends_with == b"Z"


_EXPECT_PARSE: Final = b"1"
_EXPECT_BIND: Final = b"2"
_EXPECT_CLOSE: Final = b"3"
_EXPECT_DESCRIBE: Final = b"Tn"
_EXPECT_EXECUTE: Final = b"CIs"
_EXPECT_READY: Final = b"Z"
# The replies of the client's own messages, passed on as they come.
_PARSED: Final = Expected(_EXPECT_PARSE)
_BOUND: Final = Expected(_EXPECT_BIND)
_CLOSED: Final = Expected(_EXPECT_CLOSE)
_DESCRIBED: Final = Expected(_EXPECT_DESCRIBE)
_EXECUTED: Final = Expected(_EXPECT_EXECUTE)
_READY: Final = Expected(_EXPECT_READY)
_SYNCED: Final = Expected(_EXPECT_READY, sync=True)
# A Parse the proxy added: its ParseComplete is not the client's.
_PARSED_QUIETLY: Final = Expected(_EXPECT_PARSE, Reply.DROP)
_CLOSED_QUIETLY: Final = Expected(_EXPECT_CLOSE, Reply.DROP)
# A Sync the proxy added around a client's Query: its ReadyForQuery is not the client's.
_SYNCED_QUIETLY: Final = Expected(_EXPECT_READY, Reply.DROP, sync=True)
_SYNC_MESSAGE: Final = m.build_message(b"S", b"")
_ANSWERS: Final = {0x42: _BOUND, 0x44: _DESCRIBED, 0x43: _CLOSED}


# Server-side names of the proxy's statements start with this: no client may name one in SQL.
SERVER_NAME_PREFIX: Final = "pdp_"


@dataclass(frozen=True, slots=True)
class Statement:
    """A client's prepared statement: its server-side name (empty for the unnamed statement), the
    Parse body after the name, and the policy generation its text was last decided under."""

    server_name: bytes
    body: bytes
    generation: int = 0
    # When the client parsed it (time.monotonic_ns): a server-side copy prepared before that may
    # have a plan the client's own Parse would not get from the server.
    parsed_at: int = 0

    @classmethod
    def from_parse_body(cls, body: bytes, generation: int = 0, parsed_at: int = 0) -> Statement:
        digest = hashlib.blake2b(body, digest_size=12).hexdigest()
        return cls(f"{SERVER_NAME_PREFIX}{digest}".encode(), body, generation, parsed_at)

    @property
    def text(self) -> bytes:
        """The statement text, as the policy decides it."""
        return self.body[: self.body.find(b"\x00")]

    def parse_message(self) -> bytes:
        return m.build_message(b"P", self.server_name + b"\x00" + self.body)


# The preparation time of a server-side statement that may exist but must not be used: older than
# any client's Parse, so its next use closes and prepares it again.
STALE: Final = -1


class ServerStatements:
    """Statements prepared on one server connection, least recently used first, each with the
    time it was prepared (STALE: it may be on the server, but must be prepared again first)."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._names: OrderedDict[bytes, int] = OrderedDict()
        # The result description (RowDescription or NoData message) of each copy, once described.
        self.descriptions: dict[bytes, bytes] = {}

    def __contains__(self, name: bytes) -> bool:
        return name in self._names

    def __len__(self) -> int:
        return len(self._names)

    def prepared_at(self, name: bytes) -> int | None:
        """When ``name`` was prepared on the server (STALE: unusable); None when it is not there."""
        return self._names.get(name)

    def use(self, name: bytes) -> None:
        self._names.move_to_end(name)

    def add(self, name: bytes, prepared_at: int = 0) -> list[bytes]:
        """Record ``name`` as prepared; return the names to close on the server to make room."""
        self._names[name] = prepared_at
        self._names.move_to_end(name)
        descriptions = self.descriptions
        descriptions.pop(name, None)
        evicted: list[bytes] = []
        while len(self._names) > self.capacity:
            oldest, _ = self._names.popitem(last=False)
            descriptions.pop(oldest, None)
            evicted.append(oldest)
        return evicted

    def keep(self, name: bytes) -> None:
        """Record a statement the client named itself (session pooling): never evicted by the proxy."""
        self._names[name] = 0

    def forget(self, name: bytes) -> None:
        self._names.pop(name, None)
        self.descriptions.pop(name, None)

    def mark_stale(self, name: bytes) -> None:
        if name in self._names:
            self._names[name] = STALE
        self.descriptions.pop(name, None)

    def invalidate(self, name: bytes) -> None:
        """The server failed the copy with 0A000: its result type changed since it was prepared.
        Stale, but when it was prepared is kept (below STALE): see invalidated_copy_prepared_at."""
        prepared_at = self._names.get(name)
        if prepared_at is not None and prepared_at >= 0:
            self._names[name] = STALE - 1 - prepared_at
        self.descriptions.pop(name, None)

    def invalidated_copy_prepared_at(self, name: bytes) -> int | None:
        """When the copy the server invalidated was prepared; None if it was not invalidated."""
        prepared_at = self._names.get(name)
        return STALE - 1 - prepared_at if prepared_at is not None and prepared_at < STALE else None

    def mark_all_stale(self) -> None:
        """The statements may all be gone (DISCARD ALL, DEALLOCATE ALL sent): each is closed and
        prepared again at its next use, which is right whether or not that statement ran."""
        for name in self._names:
            self._names[name] = STALE
        self.descriptions.clear()

    def restore(self, name: bytes) -> None:
        """A Close that never ran: the statement is still there (the next add trims the list)."""
        self._names[name] = STALE
        self._names.move_to_end(name, last=False)
        self.descriptions.pop(name, None)

    def clear(self) -> None:
        self._names.clear()
        self.descriptions.clear()


@dataclass(slots=True)
class StatementStats:
    hits: int = 0
    misses: int = 0


@dataclass(slots=True)
class ServerState:
    """One server connection's prepared statements and the replies it owes, in request order."""

    statements: ServerStatements
    pending: deque[Expected] = field(default_factory=deque)
    # An extended-protocol error was seen and its Sync has not been sent yet: until then the
    # server discards whatever else arrives, and so must the reply queue.
    skipping: bool = False
    # The client statement whose Parse last filled the server's unnamed statement; None when the
    # proxy cannot vouch for what is there. Whether that Parse ran is certain only later in its
    # cycle, or once every reply is in with no error (an error clears this).
    unnamed: Statement | None = None
    # An ErrorResponse went through the reply filter since the client session last looked: it counts
    # them by SQLSTATE and shows the proxy's own as such (refusal.read_error). Errors are rare, so
    # the session looks again only when this is set.
    errors_seen: bool = False
    # The pid NotificationResponse names the sender by, as the server sends it for this connection's
    # own backend and as the attached client knows that backend (its BackendKeyData): a client
    # recognises its own notifications by it. None while no client is attached.
    notifier_pids: tuple[int, int] | None = None

    def forget_unnamed(self) -> None:
        """The server's unnamed statement is gone or unknown (a simple Query, a reset)."""
        self.unnamed = None


# What one client may hold in named statements: the proxy keeps each one's text for as long as
# the client does, so a client preparing ever more distinct statements must meet a limit.
MAX_CLIENT_STATEMENTS: Final = 1000
MAX_CLIENT_STATEMENT_BYTES: Final = 2 * 2**20
_CONFIGURATION_LIMIT_EXCEEDED: Final = "53400"


class ClientStatements:
    """One client's prepared statements, and the rewriting of its messages for a server connection."""

    def __init__(
        self,
        stats: StatementStats,
        max_count: int = MAX_CLIENT_STATEMENTS,
        max_bytes: int = MAX_CLIENT_STATEMENT_BYTES,
    ) -> None:
        self.by_name: dict[bytes, Statement] = {}
        # The client's unnamed statement (55.2.3): from its Parse to its next unnamed Parse, simple
        # Query or Close of it; None while it has none.
        self.unnamed: Statement | None = None
        # The policy generation the session decides new statements under (it counts reloads).
        self.generation = 0
        # Whether statement names are the proxy's (transaction pooling) or the client's own (a
        # server connection that serves this client alone).
        self.renames = True
        # The result description the client got from its Describe of each named statement.
        self.described: dict[bytes, bytes] = {}
        # The reply expectation of a Bind of each named statement, made once per statement.
        self._bound: dict[bytes, Expected] = {}
        # The proxy answered an error in the server's place: as the server after an error (55.2.3),
        # it drops the client's messages up to its next Sync.
        self.skipping_to_sync = False
        self.stats = stats
        self.max_count = max_count
        self.max_bytes = max_bytes
        self.held_bytes = 0  # of the Parse bodies in by_name

    def over_limit(self, name: bytes, body_size: int) -> Refusal | None:
        """The refusal of a Parse of named statement ``name`` (body of ``body_size`` bytes) that
        would take this client over its limits; None when it fits."""
        old = self.by_name.get(name)
        count = len(self.by_name) + (old is None)
        held = self.held_bytes + body_size - (len(old.body) if old is not None else 0)
        if count <= self.max_count and held <= self.max_bytes:
            return None
        return Refusal(
            _CONFIGURATION_LIMIT_EXCEEDED,
            f"too many prepared statements on this connection: the limit is {self.max_count} "
            f"statements of {self.max_bytes} bytes in all",
            hint="close (DEALLOCATE) prepared statements that are no longer needed",
        )

    def rewrite(
        self,
        source: bytes,
        frames: list[m.Frame],
        server: ServerState,
        refusals: Mapping[int, Refusal] | None = None,
        forget_at: Collection[int] = (),
        *,
        named_in_sql: Mapping[int, Sequence[tuple[bytes, Statement]]] | None = None,
    ) -> bytes:
        """Turn whole client messages into what the current server connection must receive.

        ``refusals`` maps the start offset of a refused Query, Parse, Bind, Execute or FunctionCall
        to the refusal that replaces it; ``forget_at`` holds the offsets of messages after which the
        server has no prepared statements left (DISCARD ALL, DEALLOCATE ALL); ``named_in_sql`` maps
        the offset of a Query to the client's statements (name and statement) its SQL EXECUTE or
        DEALLOCATE names: on the server they exist under the proxy's names only, so the Query
        runs between a Parse of each under the client's name and a Close of it.
        """
        pending = server.pending
        # Whether a Bind or Describe of the unnamed statement reaches this client's own: its Parse
        # went to this server, and every reply is in without an error that could mean it failed.
        ready = self.unnamed is not None and server.unnamed is self.unnamed and not pending
        if not (refusals or forget_at or named_in_sql or server.skipping or self.skipping_to_sync) and (
            not pending or pending[-1].ends_with == _EXPECT_READY
        ):
            cycle_ends = self._untouched_cycle_ends(source, frames, server, ready)
            if cycle_ends:
                # Nothing to rename, answer or drop: each cycle's replies pass on whole up to its
                # ReadyForQuery, so the expectation of its end is all the reply filter needs.
                pending.extend(cycle_ends)
                end = frames[-1][2]
                return source if end == len(source) else source[:end]
        splice = _Splice(source)
        out = splice.parts
        expect = pending.append
        for kind, start, end in frames:
            body_start = start + 5
            if self.skipping_to_sync:
                if kind != 0x53:
                    splice.drop(start, end)
                    continue
                self.skipping_to_sync = False
            if refusals and start in refusals:
                splice.drop(start, end)
                refusal = refusals[start]
                if kind in _EXTENDED_REFUSABLE:
                    _raise_in_place(refusal, out, server)
                    if kind == 0x50 and source[body_start] == 0:
                        # As after a failed Parse of it: the client has no unnamed statement.
                        self.unnamed = None
                else:
                    out.append(refusal.as_query())
                    expect(_READY)
                    server.unnamed = None
                    if kind == 0x51:  # the client's Query would have dropped it on the server too
                        self.unnamed = None
                ready = False
                continue
            if kind == 0x50:  # 'P' Parse
                name_end = _cstring_end(source, body_start, end)
                if name_end == body_start:
                    self._parsed_unnamed(source, name_end + 1, end, server)
                    ready = True
                    expect(_PARSED)
                    continue
                name = source[body_start:name_end]
                if not self.renames:
                    expect(self._parsed_own_name(name, source[name_end + 1 : end], server))
                    continue
                splice.drop(start, end)
                parsed = Statement.from_parse_body(
                    source[name_end + 1 : end], self.generation, time.monotonic_ns()
                )
                self._hold(name, parsed)
                # The client asked for a plan made now: an older copy on this server is replaced.
                self._prepare(parsed, server, out, Reply.FORWARD)
            elif kind in _NAMING_MESSAGES:
                if kind == 0x42:  # Bind: portal name, then statement name
                    name_start = _cstring_end(source, body_start, end) + 1
                elif end > body_start and source[body_start] == 0x53:  # Describe/Close 'S' + name
                    name_start = body_start + 1
                else:  # of a portal: nothing to rename
                    name_start = -1
                name_end = _cstring_end(source, name_start, end) if name_start > 0 else name_start
                answer = _ANSWERS[kind]
                if name_start < 0:  # a portal: it ends with its transaction, which no other client shares
                    expect(answer)
                    continue
                if name_end == name_start:  # the unnamed statement
                    if kind == 0x43:  # Close: gone for the client and from the server
                        self.unnamed = server.unnamed = None
                        ready = False
                    elif not ready:
                        statement = self.unnamed
                        if statement is None:
                            splice.drop(start, end)
                            _raise_in_place(_NO_UNNAMED_STATEMENT, out, server)
                            continue
                        # The server's unnamed statement may be another client's: parse ours again.
                        splice.flush(start)
                        out.append(statement.parse_message())
                        expect(_PARSED_QUIETLY)
                        server.unnamed = statement
                        ready = True
                    expect(answer)
                    continue
                name = source[name_start:name_end]
                if not self.renames:  # the client's own name, on its own server connection
                    if kind == 0x43:
                        self._release(name)
                        server.statements.forget(name)
                    expect(answer)
                    continue
                splice.drop(start, end)
                if kind == 0x43:
                    # Closing a named statement only forgets the client's name: the server-side
                    # statement stays for others. Closing an unknown name is no error (55.7 Close).
                    self._release(name)
                    expect(Expected(_EXPECT_CLOSE, Reply.SYNTHETIC, _CLOSE_COMPLETE))
                    continue
                statement = self.by_name.get(name)
                if statement is None:
                    self._refuse_unknown(name, out, server)
                    ready = False
                    continue
                server_name = statement.server_name
                if kind == 0x42 and self._predates_invalidation(name, statement, server):
                    self._answer_stale_plan(server)
                    ready = False
                    continue
                self._prepare(statement, server, out, Reply.DROP)
                if kind == 0x42 and self._result_changed(name, server_name, server):
                    # The client's own statement would fail so on the server: so does this Bind.
                    self._answer_stale_plan(server)
                    ready = False
                    continue
                renamed = source[body_start:name_start] + server_name + source[name_end:end]
                out.append(m.build_message(bytes((kind,)), renamed))
                if kind == 0x42:
                    bound = self._bound.get(name)
                    if bound is None or bound.uses != server_name:
                        bound = self._bound[name] = Expected(_EXPECT_BIND, uses=server_name)
                    expect(bound)
                else:
                    expect(Expected(_EXPECT_DESCRIBE, uses=server_name, noted_in=(self.described, name)))
            else:
                named = named_in_sql.get(start) if named_in_sql else None
                if named:
                    # Each Sync ends a cycle of the proxy's own: a failing Parse cannot make the
                    # server skip the client's Query (55.2.3), nor a client cycle depend on it.
                    splice.flush(start)
                    for client_name, statement in named:
                        out.append(m.build_message(b"P", client_name + b"\x00" + statement.body))
                        expect(_PARSED_QUIETLY)
                    out.append(_SYNC_MESSAGE)
                    expect(_SYNCED_QUIETLY)
                    splice.flush(end)  # the client's Query
                    expect(_READY)
                    self.unnamed = server.unnamed = None
                    for client_name, _statement in named:
                        out.append(m.build_message(b"C", b"S" + client_name + b"\x00"))
                        expect(_CLOSED_QUIETLY)
                    out.append(_SYNC_MESSAGE)
                    expect(_SYNCED_QUIETLY)
                    ready = False
                    continue
                if kind == 0x45:  # 'E' Execute
                    expect(_EXECUTED)
                elif kind == 0x53:  # 'S' Sync: the next cycle cannot tell whether this one's Parse ran
                    expect(_SYNCED)
                    ready = False
                elif kind in _CYCLE_ENDERS:
                    expect(_READY)
                    ready = False
                    if kind == 0x51:  # 'Q': the server drops the unnamed statement (exec_simple_query)
                        self.unnamed = server.unnamed = None
                if start in forget_at:
                    # The client's statements are gone if it runs (if it fails, the server says so
                    # at their next use); the server's copies are prepared again at theirs.
                    self.forget_all()
                    if self.renames:
                        server.statements.mark_all_stale()
                    else:  # the client's own names: gone, or still there and named again by it
                        server.statements.clear()
        splice.finish(frames)
        return b"".join(out)

    def _hold(self, name: bytes, statement: Statement) -> None:
        replaced = self.by_name.get(name)
        if replaced is not None:
            self.held_bytes -= len(replaced.body)
            self.described.pop(name, None)
            self._bound.pop(name, None)
        self.by_name[name] = statement
        self.held_bytes += len(statement.body)

    def _release(self, name: bytes) -> None:
        closed = self.by_name.pop(name, None)
        if closed is not None:
            self.held_bytes -= len(closed.body)
            self.described.pop(name, None)
            self._bound.pop(name, None)

    def forget_all(self) -> None:
        """DEALLOCATE ALL or DISCARD ALL: the client has no named statements left."""
        self.by_name.clear()
        self.described.clear()
        self._bound.clear()
        self.held_bytes = 0

    def _answer_stale_plan(self, server: ServerState) -> None:
        """Answer a Bind as the server answers one of a statement whose result type changed, and
        drop what follows up to the client's Sync, as the server would after the error."""
        server.pending.append(Expected(_EXPECT_BIND, Reply.SYNTHETIC, STALE_PLAN_ERROR))
        self.skipping_to_sync = True

    def _predates_invalidation(self, name: bytes, statement: Statement, server: ServerState) -> bool:
        """Whether client statement ``name``, which the client described, was parsed no later than
        a copy the server has since invalidated: its own statement would be invalid too. (A copy
        prepared now would return the new columns the client's driver does not expect.)"""
        if name not in self.described:
            return False
        planned = server.statements.invalidated_copy_prepared_at(statement.server_name)
        return planned is not None and planned >= statement.parsed_at

    def _result_changed(self, name: bytes, server_name: bytes, server: ServerState) -> bool:
        """Whether the copy of client statement ``name`` on ``server`` returns other columns than
        the client's Describe of it said (both known): a copy prepared after a schema change."""
        seen = self.described.get(name)
        if seen is None:
            return False
        current = server.statements.descriptions.get(server_name)
        return current is not None and current != seen

    def deallocated(self, name: bytes, server: ServerState | None) -> None:
        """SQL DEALLOCATE of ``name`` (sent as it is): on the client's own server connection the
        name is gone there too."""
        self._release(name)
        if not self.renames and server is not None:
            server.statements.forget(name)

    def _parsed_own_name(self, name: bytes, body: bytes, server: ServerState) -> Expected:
        """A Parse of named statement ``name`` that reaches the server as it is (session pooling).

        The server refuses a second Parse of a name it has (42P05) and keeps the first: so does
        the text the proxy holds for the name. A Parse that fails leaves nothing behind.
        """
        if name in server.statements:
            return _PARSED
        self._hold(name, Statement(name, body, self.generation))
        server.statements.keep(name)
        return Expected(_EXPECT_PARSE, creates=name)

    def _parsed_unnamed(self, source: bytes, body_start: int, end: int, server: ServerState) -> None:
        """The client's Parse of the unnamed statement (its body from ``body_start``) goes to ``server``."""
        body = source[body_start:end]
        current = self.unnamed
        if current is None or current.generation != self.generation or current.body != body:
            # Drivers parse the same few texts over and over: a new object only for a new one.
            current = self.unnamed = Statement(b"", body, self.generation)
        server.unnamed = current

    def _refuse_unknown(self, name: bytes, out: list[bytes], server: ServerState) -> None:
        """A Bind or Describe of a name this client never prepared gets the server's own error.

        Forwarding the name could reach a server-side statement someone else prepared (server
        names are derived from the statement text), so the client could run a statement its
        role's policy never allowed.
        """
        label = name.decode("utf-8", errors="replace")
        _raise_in_place(
            Refusal(_UNDEFINED_STATEMENT, f'prepared statement "{label}" does not exist'), out, server
        )

    def _prepare(self, statement: Statement, server: ServerState, out: list[bytes], reply: Reply) -> bool:
        """Add a Parse for ``statement`` unless the server has a copy prepared since the client's
        Parse of it (a stale or older copy is closed first); return whether one was added."""
        statements = server.statements
        name = statement.server_name
        prepared_at = statements.prepared_at(name)
        if prepared_at is not None and prepared_at >= statement.parsed_at and reply is _DROP:
            statements.use(name)
            self.stats.hits += 1
            return False
        self.stats.misses += 1
        pending = server.pending
        if prepared_at is not None:
            out.append(m.build_message(b"C", b"S" + name + b"\x00"))
            pending.append(Expected(_EXPECT_CLOSE, Reply.DROP, closes=name))
        # A copy made now is as new as any client's Parse of it so far.
        for evicted in statements.add(name, max(time.monotonic_ns(), statement.parsed_at)):
            out.append(m.build_message(b"C", b"S" + evicted + b"\x00"))
            pending.append(Expected(_EXPECT_CLOSE, Reply.DROP, closes=evicted))
        out.append(statement.parse_message())
        if prepared_at is None:
            pending.append(Expected(_EXPECT_PARSE, reply, creates=name))
        else:
            pending.append(Expected(_EXPECT_PARSE, reply, replaces=name))
        # What the copy returns, for the clients that described the statement earlier (see rewrite).
        out.append(m.build_message(b"D", b"S" + name + b"\x00"))
        pending.append(Expected(_EXPECT_DESCRIBE, Reply.DROP, uses=name))
        return True

    def redecided(self, name: bytes, server: ServerState | None) -> None:
        """The statement of ``name`` (empty: the unnamed one) was decided again under the current
        policy generation."""
        statement = self.by_name.get(name) if name else self.unnamed
        if statement is None:
            return
        current = Statement(statement.server_name, statement.body, self.generation, statement.parsed_at)
        if name:
            self.by_name[name] = current
            return
        self.unnamed = current
        if server is not None and server.unnamed is statement:
            server.unnamed = current

    def _untouched_cycle_ends(
        self, source: bytes, frames: list[m.Frame], server: ServerState, ready: bool
    ) -> list[Expected]:
        """The reply expectations of client messages that reach the server as they are (only the
        unnamed statement, ending with a cycle's end): one per Sync, Query or FunctionCall, as the
        general path has them; empty for messages the proxy must look at closer.

        A Query or FunctionCall inside an extended-protocol cycle gets no ReadyForQuery when an
        earlier message of the cycle fails (the server skips to Sync): such batches take the
        general path, which follows the skipping message by message. A Sync keeps its mark
        (_SYNCED): it is where that skipping ends, also for a cycle opened by an earlier batch.
        A Bind or Describe of the unnamed statement that is not ``ready`` (see rewrite) takes the
        general path too; the unnamed statement the messages leave behind is noted as rewrite does.
        """
        cycle_ends: list[Expected] = []
        in_cycle = False
        parsed = parsed_end = -1  # where the last unnamed Parse among them starts and ends
        dropped = False  # a Query or a Close of the unnamed statement came after it
        for kind, start, end in frames:
            if kind == 0x53:  # 'S' Sync
                cycle_ends.append(_SYNCED)
                in_cycle = ready = False
                continue
            if kind in _CYCLE_ENDERS:
                if in_cycle:
                    return []
                cycle_ends.append(_READY)
                ready = False
                if kind == 0x51:  # 'Q'
                    parsed, dropped = -1, True
                continue
            in_cycle = True
            # A statement name, or a message too short or odd to tell: the general path decides.
            if kind == 0x50:  # 'P' Parse: the statement name comes first
                named = end == start + 5 or source[start + 5] != 0
                if not named:
                    parsed, parsed_end, dropped, ready = start, end, False, True
            elif kind == 0x42:  # 'B' Bind: portal name, then statement name
                unnamed_portal = end > start + 5 and source[start + 5] == 0
                portal_end = start + 5 if unnamed_portal else source.find(b"\x00", start + 5, end)
                named = portal_end < 0 or portal_end + 1 >= end or source[portal_end + 1] != 0 or not ready
            elif kind in _DESCRIBE_CLOSE:  # 'S' + a statement's name, or 'P' + a portal's
                named = end < start + 7 or (source[start + 5] == 0x53 and source[start + 6] != 0)
                if not named and source[start + 5] == 0x53:  # the unnamed statement
                    if kind == 0x43:
                        parsed, dropped, ready = -1, True, False
                    else:
                        named = not ready
            else:
                named = False
            if named:
                return []
        if not (frames and frames[-1][0] in _CYCLE_ENDERS):
            return []
        if parsed >= 0:
            self._parsed_unnamed(source, parsed + 6, parsed_end, server)
        elif dropped:
            self.unnamed = server.unnamed = None
        return cycle_ends


_UNDEFINED_STATEMENT: Final = "26000"  # invalid_sql_statement_name
_NO_UNNAMED_STATEMENT: Final = Refusal(_UNDEFINED_STATEMENT, "unnamed prepared statement does not exist")
# Parse (a refused statement), Bind (a statement the current policy refuses) and Execute (an
# execution over a rate limit) are refused inside the client's extended-protocol cycle; a Query or
# FunctionCall is replaced by a Query.
_EXTENDED_REFUSABLE: Final = frozenset(b"PBE")
_CYCLE_ENDERS: Final = frozenset(b"SQF")  # Sync, Query, FunctionCall: each gets one ReadyForQuery
# Bind, Describe and Close name a prepared statement the proxy may have to rename.
_NAMING_MESSAGES: Final = frozenset(b"BDC")
_DESCRIBE_CLOSE: Final = frozenset(b"DC")
# The server messages pass_untouched_replies notes: ReadyForQuery, ErrorResponse, CommandComplete,
# ParameterStatus, NotificationResponse.
_NOTED_REPLIES: Final = frozenset(b"ZECSA")


def filter_server_messages(
    source: bytes, frames: list[m.Frame], server: ServerState
) -> tuple[bytes, bytes | None, list[bytes]]:
    """What the client must see of the server's messages, the last ReadyForQuery status,
    and the ParameterStatus payloads among them."""
    pending = server.pending
    splice = _Splice(source)
    out = splice.parts
    status: bytes | None = None
    parameters: list[bytes] = []
    for kind, start, end in frames:
        if server.skipping:
            _skip_to_sync(server)
        head = pending[0] if pending else None
        if head is not None and head.reply is _SYNTHETIC:
            splice.flush(start)
            out.append(take_ready_synthetics(server))
            head = pending[0] if pending else None
        if head is None or kind in _ASYNCHRONOUS:
            if kind == 0x53:  # 'S' ParameterStatus
                parameters.append(source[start + 5 : end])
            elif kind == 0x41 and server.notifier_pids is not None:  # 'A' NotificationResponse
                _rename_notifier(splice, source, start, end, server.notifier_pids)
            continue
        if kind == _ERROR:
            # The error may be of the Parse that filled the unnamed statement (or of one before it).
            server.unnamed = None
            server.errors_seen = True
            if head.uses is not None and source.find(_STALE_PLAN, start + 5, end) >= 0:
                # The server keeps the statement, and fails every use of it, until it is closed.
                server.statements.invalidate(head.uses)
            if not (head.ends_cycle and not head.sync):
                # Not a simple Query's own error: the server now skips everything up to Sync (55.2.3).
                server.skipping = True
                _skip_to_sync(server)
            continue
        if kind == 0x43 and source.startswith(_FORGETTING_TAGS, start + 5):  # 'C' CommandComplete
            server.statements.clear()
        elif head.uses is not None and kind in _DESCRIPTIONS and head.ends_with is _EXPECT_DESCRIBE:
            _note_description(server, head, source[start:end])
        if head.reply is _DROP:
            splice.drop(start, end)
        if kind in head.ends_with:
            pending.popleft()
            if kind == 0x5A:  # 'Z'
                status = source[end - 1 : end]
    splice.finish(frames)
    if pending and pending[0].reply is _SYNTHETIC:
        out.append(take_ready_synthetics(server))
    return out[0] if len(out) == 1 else b"".join(out), status, parameters


# Whole server messages read in one pass: the bytes they span (all passed on as they are), the
# status of the last ReadyForQuery among them, their ParameterStatus payloads, and where the
# last of them starts. A plain tuple: a NamedTuple costs a Python-level call per read.
UntouchedReplies = tuple[int, bytes | None, list[bytes], int]


def pass_untouched_replies(source: bytes, server: ServerState, max_size: int) -> UntouchedReplies | None:
    """The whole server messages at the start of ``source`` in one pass, when every one of them
    answers a cycle the proxy changed nothing in (ClientStatements.rewrite) or nothing at all;
    None when the proxy must look at them message by message (scan_frames and
    filter_server_messages, which give the same result in this case at twice the cost).
    """
    pending = server.pending
    if server.skipping or (pending and not _ends_untouched(pending[0])):
        return None
    parameters: list[bytes] = []
    position = readies = last_start = 0
    status_at = -1
    available = len(source)
    while available - position >= 5:
        length = read_i32_be(source, position + 1)
        if length < 4 or length > max_size:
            raise m.invalid_length(source, position, length)
        end = position + 1 + length
        if end > available:
            break
        kind = source[position]
        # Most replies (ParseComplete, BindComplete, RowDescription, DataRow) need no closer look:
        # one set lookup each rather than the five comparisons below.
        if kind in _NOTED_REPLIES:
            if kind == 0x5A:  # 'Z'
                readies += 1
                status_at = end - 1
            elif kind == _ERROR:  # as in filter_server_messages
                server.unnamed = None
                server.errors_seen = True
            elif kind == 0x43:  # 'C' CommandComplete
                if source.startswith(_FORGETTING_TAGS, position + 5):
                    server.statements.clear()
            elif kind == 0x53:  # 'S' ParameterStatus
                parameters.append(source[position + 5 : end])
            else:  # 'A' NotificationResponse: its pid may be rewritten (filter_server_messages)
                return None
        last_start = position
        position = end
    if readies > len(pending):
        return None
    if readies > 1 and not all(_ends_untouched(pending[index]) for index in range(1, readies)):
        return None
    # What follows the last ReadyForQuery must not answer a message the proxy changed, nor may
    # the proxy answer one itself right behind it.
    following = pending[readies] if readies < len(pending) else _READY
    if not _ends_untouched(following) and (position > status_at + 1 or following.reply is _SYNTHETIC):
        return None
    for _ in range(readies):
        pending.popleft()
    status = source[status_at : status_at + 1] if readies else None
    return position, status, parameters, last_start


_DESCRIPTIONS: Final = frozenset(b"Tn")  # RowDescription, NoData


def _note_description(server: ServerState, head: Expected, description: bytes) -> None:
    """A Describe of a server-side statement was answered: what it returns now."""
    assert head.uses is not None
    if head.uses in server.statements:
        server.statements.descriptions[head.uses] = description
    if head.noted_in is not None:
        noted, name = head.noted_in
        noted[name] = description


def _ends_untouched(expected: Expected) -> bool:
    """The end of a cycle whose replies all pass on as they are."""
    return expected is _READY or expected is _SYNCED


class _Splice:
    """Output built from a buffer of whole messages: the buffer passes on in runs as it is, with
    messages of the proxy's own put in between, or some of the buffer's left out. A message
    that passes on costs nothing: only the places where something changes are named. The
    messages start at the buffer's first byte and follow each other (as scan_frames finds them)."""

    __slots__ = ("_run_start", "_source", "parts")

    def __init__(self, source: bytes) -> None:
        self._source = source
        self._run_start = 0
        self.parts: list[bytes] = []

    def flush(self, at: int) -> None:
        """Pass on the buffer up to ``at``: what goes into ``parts`` next comes after it."""
        if at > self._run_start:
            self.parts.append(bytes(self._source[self._run_start : at]))
        self._run_start = at

    def drop(self, start: int, end: int) -> None:
        """Leave out the message from ``start`` to ``end``."""
        self.flush(start)
        self._run_start = end

    def finish(self, frames: list[m.Frame]) -> None:
        if frames:
            self.flush(frames[-1][2])


def _rename_notifier(splice: _Splice, source: bytes, start: int, end: int, pids: tuple[int, int]) -> None:
    """A NotificationResponse from this connection's own backend names the pid the client was given."""
    server_pid, client_pid = pids
    if read_i32_be(source, start + 5) == server_pid:
        splice.drop(start, end)
        renamed = (
            bytes(source[start : start + 5]) + client_pid.to_bytes(4, "big") + bytes(source[start + 9 : end])
        )
        splice.parts.append(renamed)


def _raise_in_place(refusal: Refusal, out: list[bytes], server: ServerState) -> None:
    """The raising block runs as Parse, Bind, Execute: only its error is the client's. It takes
    the server's unnamed statement."""
    out.append(refusal.as_extended())
    server.unnamed = None
    expect = server.pending.append
    expect(_PARSED_QUIETLY)
    expect(Expected(_EXPECT_BIND, Reply.DROP))
    expect(_EXECUTED)


def _skip_to_sync(server: ServerState) -> None:
    """Drop what the server discards after an error, undoing what those messages would have done."""
    pending = server.pending
    while pending and not pending[0].sync:
        skipped = pending.popleft()
        if skipped.creates is not None:
            server.statements.forget(skipped.creates)
        if skipped.replaces is not None:
            server.statements.mark_stale(skipped.replaces)
        if skipped.closes is not None:
            server.statements.restore(skipped.closes)
    if pending:
        server.skipping = False


def take_ready_synthetics(server: ServerState) -> bytes:
    """Answers the proxy can give now because every reply before them has been passed on."""
    if server.skipping:
        _skip_to_sync(server)
    pending = server.pending
    out = b""
    while pending and pending[0].reply is _SYNTHETIC:
        out += pending.popleft().synthetic
    return out


def sync_quietly(server: ServerState) -> bytes:
    """A Sync of the proxy's own, to end an extended-protocol cycle the client left open: its
    ReadyForQuery is not the client's. Only the implicit transaction ends: prepared statements,
    the unnamed one too, outlive a Sync (55.2.3)."""
    server.pending.append(_SYNCED_QUIETLY)
    return _SYNC_MESSAGE


def _cstring_end(source: bytes, start: int, end: int) -> int:
    position = source.find(b"\x00", start, end)
    if position < 0:
        raise ProtocolViolation("malformed message: missing string terminator")
    return position
