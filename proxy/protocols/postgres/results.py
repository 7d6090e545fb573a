"""Result-size guard on the reply stream (sans-IO): count rows per portal, per cursor and per
statement, cut off the excess.

Rows are DataRows, and the CopyData messages of a COPY TO STDOUT (one per row for text and CSV).
What a result's rows count against:

- a portal run by Execute: every Execute of it until it is bound anew, so a portal read five rows
  at a time (Execute with a row limit, answered by PortalSuspended) is one result, not many;
- a SQL cursor: every FETCH from it (and every Execute of it by name) until it is declared again or
  closed, so ``FETCH 100 FROM c`` repeated is one result;
- otherwise each statement of a simple Query, and each Bind + Execute of a statement.

Which request a reply answers follows from the order of requests (55.2.3: replies come in request
order; after an error in an extended-query cycle the server skips to Sync): ``sent`` notes each Bind,
Execute, Query, FunctionCall and Sync as the server receives them, ``apply`` matches replies to them.

When a result's rows or bytes cross the terminal's limits, the rest of it is dropped and its end
(CommandComplete, PortalSuspended, or the server's error once the proxy's cancel lands) is replaced
by one ErrorResponse 53400 naming the limit, so the client sees a failed statement and its session
goes on. A portal or cursor over its limit stays over it: each later Execute or FETCH of it fails
the same way.
"""

from __future__ import annotations

import re
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from typing import Final

from pglast import ast, parse_sql
from pglast.parser import ParseError

from proxy.limits import LimitHit, ResultGuard
from proxy.protocols.postgres import messages as m
from proxy.protocols.postgres.prepared import Statement
from proxy.protocols.postgres.refusal import proxy_error_response

CONFIGURATION_LIMIT_EXCEEDED = "53400"
_MAX_MESSAGE: Final = 1 << 30
# A DataRow, or a row of COPY TO STDOUT.
_ROWS: Final = frozenset(b"Dd")
_COPY_DONE: Final = ord("c")
_BIND_COMPLETE: Final = ord("2")
_ERROR: Final = ord("E")
_READY: Final = ord("Z")
# What ends one result: CommandComplete, EmptyQuery, ErrorResponse, PortalSuspended.
_RESULT_ENDS: Final = frozenset(b"CIEs")
_COMMAND_COMPLETE: Final = ord("C")
_PORTAL_SUSPENDED: Final = ord("s")
# Requests, in the stream the server receives.
_PARSE: Final = ord("P")
_BIND: Final = ord("B")
_EXECUTE: Final = ord("E")
_SYNC: Final = ord("S")
_QUERY: Final = ord("Q")
_FUNCTION_CALL: Final = ord("F")
# Only texts holding one of these words can fetch from, declare or close a cursor: the rest are
# never parsed here. A keyword cannot be split by a comment or an escape.
_CURSOR_WORDS: Final = re.compile(rb"fetch|declare|close", re.IGNORECASE)
# Texts longer than this are analysed each time rather than kept in the cache.
_CACHED_TEXT_BYTES: Final = 8192
# Portals and cursors counted by name per session; past this, new names share one count (stricter,
# never looser) so that a client cannot grow the table without bound.
_MAX_NAMED: Final = 1024
# A name no portal or cursor can have (names are C strings): the count shared past _MAX_NAMED.
_OVERFLOW: Final = "\x00"


@dataclass(frozen=True, slots=True)
class CursorUse:
    """What one statement does with a SQL cursor: ``fetch`` rows from it, ``declare`` or ``close`` it
    (``name`` None: CLOSE ALL)."""

    action: str
    name: str | None


# Per statement of a text: its cursor use, if any.
CursorUses = tuple[CursorUse | None, ...]


def cursor_uses(text: bytes) -> CursorUses | None:
    """The cursor use of each statement of ``text``; None when it uses no cursor (or cannot be parsed,
    and then the server runs nothing of it either)."""
    if _CURSOR_WORDS.search(text) is None:
        return None
    if len(text) > _CACHED_TEXT_BYTES:
        return _analysed(text)
    return _cached_analysis(text)


@lru_cache(maxsize=512)
def _cached_analysis(text: bytes) -> CursorUses | None:
    return _analysed(text)


def _analysed(text: bytes) -> CursorUses | None:
    try:
        statements = parse_sql(text.decode("utf-8"))
    except (ParseError, UnicodeDecodeError):
        return None
    uses = tuple(_use(raw.stmt) for raw in statements)
    return uses if any(use is not None for use in uses) else None


def _use(statement: ast.Node | None) -> CursorUse | None:
    if isinstance(statement, ast.FetchStmt) and not statement.ismove:
        return CursorUse("fetch", statement.portalname)
    if isinstance(statement, ast.DeclareCursorStmt):
        return CursorUse("declare", statement.portalname)
    if isinstance(statement, ast.ClosePortalStmt):
        return CursorUse("close", statement.portalname)
    return None


class _Request:
    """One request the server owes replies to: a Bind, Execute, Query (or FunctionCall) or Sync."""

    __slots__ = ("kind", "portal", "statement", "uses")

    def __init__(self, kind: int, portal: str = "", uses: CursorUses | None = None) -> None:
        self.kind = kind
        self.portal = portal  # of a Bind or Execute
        self.uses = uses  # of a Bind's statement, or a Query's statements
        self.statement = 0  # of a Query: the one whose result comes next


class ResultWatch:
    """Watches one client's requests and replies; ``new_guard`` makes the guard for each count."""

    def __init__(
        self,
        new_guard: Callable[[], ResultGuard],
        on_hit: Callable[[LimitHit], None],
        on_cut_running: Callable[[], None],
    ) -> None:
        self._new_guard = new_guard
        self._on_hit = on_hit
        # Called when a batch of replies ends inside a cut result: the server is still sending it, and
        # only then is it worth cancelling (a cancel that arrives after the result ended could hit the
        # client's next statement).
        self._on_cut_running = on_cut_running
        self._guard: ResultGuard | None = None  # of the result under way
        self._cutting: LimitHit | None = None
        self._cancelled = False  # the cut result under way has been cancelled
        self._requests: deque[_Request] = deque()
        # An extended-query cycle failed before its Sync was sent: the server skips to that Sync.
        self._skipping = False
        # Cursor uses of prepared statements (server-side names) and of bound portals, where any.
        self._statements: dict[bytes, CursorUses] = {}
        self._portals: dict[str, CursorUses] = {}
        # Counts of portals and cursors, by name.
        self._named: dict[str, ResultGuard] = {}

    # --- requests -----------------------------------------------------------------------------

    def sent(self, data: bytes, client: bytes, client_frames: list[m.Frame]) -> None:
        """Note the requests in ``data``, what the server receives for the client's ``client``
        messages (the proxy renames prepared statements and replaces refused messages)."""
        for kind, start, end in client_frames:
            # A named statement the server already has is bound without a Parse in ``data``. Its
            # server-side name comes from its text, so what it does with cursors never changes.
            if kind == _PARSE and end > start + 5 and client[start + 5] != 0:
                name_end = client.find(b"\x00", start + 5, end)
                uses = cursor_uses(client[name_end + 1 : client.find(b"\x00", name_end + 1, end)])
                if uses is not None:
                    prepared = Statement.from_parse_body(client[name_end + 1 : end])
                    self._note_statement(prepared.server_name, uses)
        frames, _consumed = m.scan_frames(data, _MAX_MESSAGE)
        for kind, start, end in frames:
            if kind == _PARSE:
                name_end = data.find(b"\x00", start + 5, end)
                uses = cursor_uses(data[name_end + 1 : data.find(b"\x00", name_end + 1, end)])
                self._note_statement(data[start + 5 : name_end], uses)
            elif kind == _SYNC:
                self._skipping = False
                self._requests.append(_Request(_SYNC))
            elif self._skipping:
                continue
            elif kind == _BIND:
                portal_end = data.find(b"\x00", start + 5, end)
                statement = data[portal_end + 1 : data.find(b"\x00", portal_end + 1, end)]
                portal = _name(data[start + 5 : portal_end])
                self._requests.append(_Request(_BIND, portal, self._statements.get(statement)))
            elif kind == _EXECUTE:
                portal = _name(data[start + 5 : data.find(b"\x00", start + 5, end)])
                self._requests.append(_Request(_EXECUTE, portal))
            elif kind == _QUERY:
                self._requests.append(_Request(_QUERY, uses=cursor_uses(data[start + 5 : end - 1])))
            elif kind == _FUNCTION_CALL:
                self._requests.append(_Request(_QUERY))

    def _note_statement(self, name: bytes, uses: CursorUses | None) -> None:
        if uses is None:
            self._statements.pop(name, None)
        elif name in self._statements or len(self._statements) < _MAX_NAMED:
            self._statements[name] = uses

    # --- replies ------------------------------------------------------------------------------

    def apply(self, buffer: bytes, frames: list[m.Frame]) -> tuple[bytes, list[m.Frame]]:
        """The messages to pass on: the same ones unless a result is over its limits."""
        out: bytearray | None = None
        kept: list[m.Frame] = []
        for index, (kind, start, end) in enumerate(frames):
            replacement = self._reply(kind, buffer, start, end)
            if replacement is None:
                if out is not None:
                    kept.append((kind, len(out), len(out) + end - start))
                    out += buffer[start:end]
                continue
            if out is None:
                out = bytearray(buffer[:start])
                kept = list(frames[:index])
            if replacement:
                kept.append((_ERROR, len(out), len(out) + len(replacement)))
                out += replacement
        if self._cutting is not None and not self._cancelled:
            self._cancelled = True
            self._on_cut_running()
        if out is None:
            return buffer, frames
        return bytes(out), kept

    def _reply(self, kind: int, buffer: bytes, start: int, end: int) -> bytes | None:
        """None to pass the message on, b"" to drop it, else the ErrorResponse that replaces it."""
        if kind in _ROWS:
            return b"" if self._cutting is not None or self._crosses(end - start) else None
        if kind == _COPY_DONE:
            return b"" if self._cutting is not None else None
        if kind in _RESULT_ENDS:
            self._guard = None
            self._result_ended(kind, buffer, start, end)
            hit, self._cutting, self._cancelled = self._cutting, None, False
            if hit is None:
                return None
            return proxy_error_response(CONFIGURATION_LIMIT_EXCEEDED, hit.message)
        if kind == _BIND_COMPLETE:
            self._bound()
        elif kind == _READY:
            self._ready()
        return None

    def _crosses(self, nbytes: int) -> bool:
        """Count one row; on the first crossing start cutting and report the hit."""
        guard = self._guard
        if guard is None:
            guard = self._guard = self._owner()
        hit = guard.add(1, nbytes)
        if hit is None:
            return False
        self._cutting = hit
        self._on_hit(hit)
        return True

    def _owner(self) -> ResultGuard:
        """The count the result under way adds to."""
        request = self._requests[0] if self._requests else None
        if request is not None and request.kind == _EXECUTE:
            uses = self._portals.get(request.portal)
            fetched = _fetched(uses[0] if uses else None)
            return self._named_guard(fetched if fetched is not None else request.portal)
        if request is not None and request.kind == _QUERY and request.uses is not None:
            uses = request.uses
            fetched = _fetched(uses[request.statement] if request.statement < len(uses) else None)
            if fetched is not None:
                return self._named_guard(fetched)
        return self._new_guard()

    def _named_guard(self, name: str) -> ResultGuard:
        guard = self._named.get(name)
        if guard is None:
            if len(self._named) >= _MAX_NAMED:
                name = _OVERFLOW
                guard = self._named.get(name)
            if guard is None:
                guard = self._named[name] = self._new_guard()
        return guard

    def _result_ended(self, kind: int, buffer: bytes, start: int, end: int) -> None:
        request = self._requests[0] if self._requests else None
        if request is None:
            return
        if request.kind == _QUERY:
            # One result per statement; after an error the rest is skipped up to ReadyForQuery.
            if kind == _COMMAND_COMPLETE and request.uses is not None:
                if request.statement < len(request.uses):
                    self._cursor_changed(request.uses[request.statement])
                request.statement += 1
            return
        if kind == _ERROR:
            self._skip_to_sync()
        elif request.kind == _EXECUTE:
            self._requests.popleft()
            uses = self._portals.get(request.portal)
            if kind == _COMMAND_COMPLETE and uses:
                self._cursor_changed(uses[0])

    def _cursor_changed(self, use: CursorUse | None) -> None:
        """A DECLARE or CLOSE ran: the cursor's count starts over with its next declaration."""
        if use is None or use.action == "fetch":
            return
        if use.name is None:
            self._named.clear()
        else:
            self._named.pop(use.name, None)

    def _bound(self) -> None:
        """A Bind succeeded: a new portal by that name, counted afresh."""
        request = self._requests.popleft() if self._requests and self._requests[0].kind == _BIND else None
        if request is None:
            return
        self._named.pop(request.portal, None)
        if request.uses is None:
            self._portals.pop(request.portal, None)
        elif request.portal in self._portals or len(self._portals) < _MAX_NAMED:
            self._portals[request.portal] = request.uses

    def _skip_to_sync(self) -> None:
        """An extended-query message failed: the server ignores what follows up to the next Sync."""
        requests = self._requests
        while requests and requests[0].kind != _SYNC:
            requests.popleft()
        self._skipping = not requests

    def _ready(self) -> None:
        """ReadyForQuery ends a Query, FunctionCall or Sync (and anything left before it)."""
        requests = self._requests
        while requests:
            if requests.popleft().kind in (_SYNC, _QUERY):
                return


def _fetched(use: CursorUse | None) -> str | None:
    return use.name if use is not None and use.action == "fetch" else None


def _name(raw: bytes) -> str:
    return raw.decode("utf-8", "surrogateescape")
