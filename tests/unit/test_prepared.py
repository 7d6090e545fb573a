"""proxy.protocols.postgres.prepared: named prepared statements across pooled server connections.

A small in-memory PostgreSQL stand-in (``FakeServer``) models just enough of the extended query
protocol (PostgreSQL docs 55.2.3 and 55.7): named statements and portals, one reply per message,
and "after an error, discard messages until Sync". Each test runs client messages through
``ClientStatements.rewrite`` to a fake server connection and the replies back through
``filter_server_messages``, then compares what the client saw with what one fake server fed the
client's messages directly would have sent.
"""

from __future__ import annotations

import itertools
import re
import struct
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from proxy.protocols.postgres import messages as m
from proxy.protocols.postgres.prepared import (
    ClientStatements,
    Reply,
    ServerState,
    ServerStatements,
    Statement,
    StatementStats,
    filter_server_messages,
    pass_untouched_replies,
    take_ready_synthetics,
)
from proxy.protocols.postgres.refusal import Refusal

MAX = 1 << 20
_INT16 = struct.Struct("!h")
_INT32 = struct.Struct("!i")

# --- client message builders (55.7) ----------------------------------------------------------------------


def parse(name: bytes, text: bytes, types: Sequence[int] = ()) -> bytes:
    body = name + b"\x00" + text + b"\x00" + _INT16.pack(len(types))
    return m.build_message(b"P", body + b"".join(_INT32.pack(oid) for oid in types))


def bind(statement: bytes, portal: bytes = b"") -> bytes:
    return m.build_message(b"B", portal + b"\x00" + statement + b"\x00" + _INT16.pack(0) * 3)


def describe(kind: bytes, name: bytes) -> bytes:
    return m.build_message(b"D", kind + name + b"\x00")


def execute(portal: bytes = b"") -> bytes:
    return m.build_message(b"E", portal + b"\x00" + _INT32.pack(0))


def close(kind: bytes, name: bytes) -> bytes:
    return m.build_message(b"C", kind + name + b"\x00")


def sync() -> bytes:
    return m.build_message(b"S", b"")


def flush() -> bytes:
    return m.build_message(b"H", b"")


def query(text: bytes) -> bytes:
    return m.build_message(b"Q", text + b"\x00")


def server_name(text: bytes, types: Sequence[int] = ()) -> bytes:
    """The server-side name the proxy gives a statement: derived from the Parse body after the name."""
    body = text + b"\x00" + _INT16.pack(len(types)) + b"".join(_INT32.pack(oid) for oid in types)
    return Statement.from_parse_body(body).server_name


def frames_of(data: bytes) -> list[tuple[str, bytes]]:
    frames, consumed = m.scan_frames(data, MAX)
    assert consumed == len(data), "a stream must hold whole messages only"
    return [(chr(kind), bytes(data[start + 5 : end])) for kind, start, end in frames]


def kinds(data: bytes) -> str:
    return "".join(kind for kind, _ in frames_of(data))


def sqlstates(data: bytes) -> list[str]:
    return [m.parse_error_fields(body)["C"] for kind, body in frames_of(data) if kind == "E"]


def _cstring(buffer: bytes, position: int) -> tuple[bytes, int]:
    end = buffer.index(b"\x00", position)
    return buffer[position:end], end + 1


# --- the fake server --------------------------------------------------------------------------------------

PARSE_COMPLETE = m.build_message(b"1", b"")
BIND_COMPLETE = m.build_message(b"2", b"")
CLOSE_COMPLETE = m.build_message(b"3", b"")
NO_DATA = m.build_message(b"n", b"")
_RAISE = re.compile(r"ERRCODE = E'(?P<code>[^']*)', MESSAGE = E'(?P<message>(?:[^']|'')*)'")


class ServerError(Exception):
    def __init__(self, sqlstate: str, message: str) -> None:
        super().__init__(message)
        self.sqlstate = sqlstate
        self.message = message


@dataclass
class FakeServer:
    """PostgreSQL's extended query protocol, as far as these tests need it."""

    # Statement texts this server refuses to parse (a syntax error, a table missing here...).
    fail_texts: set[bytes] = field(default_factory=set)
    statements: dict[bytes, tuple[bytes, bytes]] = field(default_factory=dict)  # name -> (text, types)
    portals: dict[bytes, bytes] = field(default_factory=dict)  # portal -> statement text
    skipping: bool = False  # discarding messages until Sync after an error (55.2.3)
    received: list[tuple[str, bytes]] = field(default_factory=list)
    duplicate_parses: int = 0

    def feed(self, data: bytes) -> bytes:
        return b"".join(self.handle(kind, body) for kind, body in frames_of(data))

    def handle(self, kind: str, body: bytes) -> bytes:
        self.received.append((kind, body))
        if kind == "S":
            self.skipping = False
            self.portals.clear()  # the implicit transaction ends, and its portals with it
            return m.build_ready_for_query(b"I")
        if self.skipping or kind == "H":
            return b""
        try:
            return self._handle(kind, body)
        except ServerError as exc:
            error = m.build_error_response("ERROR", exc.sqlstate, exc.message)
            if kind == "Q":
                return error + m.build_ready_for_query(b"I")
            self.skipping = True
            return error

    def _handle(self, kind: str, body: bytes) -> bytes:
        if kind == "Q":
            text, _ = _cstring(body, 0)
            self.statements.pop(b"", None)  # exec_simple_query drops the unnamed statement first
            self._check_parses(text)
            self._run(text)
            return m.build_message(b"C", b"SELECT 1\x00") + m.build_ready_for_query(b"I")
        if kind == "P":
            name, position = _cstring(body, 0)
            text, position = _cstring(body, position)
            if not name:
                self.statements.pop(b"", None)  # exec_parse_message drops it before parsing
            self._check_parses(text)
            if name and name in self.statements:
                self.duplicate_parses += 1
                raise ServerError("42P05", f'prepared statement "{name.decode()}" already exists')
            self.statements[name] = (text, body[position:])
            return PARSE_COMPLETE
        if kind == "B":
            portal, position = _cstring(body, 0)
            name, _ = _cstring(body, position)
            self.portals[portal] = self._statement(name)[0]
            return BIND_COMPLETE
        if kind == "D":
            name, _ = _cstring(body, 1)
            if body[:1] == b"S":
                text, types = self._statement(name)
                return m.build_message(b"t", types) + self._row_description(text)
            return self._row_description(self._portal(name))
        if kind == "E":
            portal, _ = _cstring(body, 0)
            text = self._run(self._portal(portal))
            if text.startswith(b"SELECT"):
                row = m.build_message(b"D", _INT16.pack(1) + _INT32.pack(len(text)) + text)
                return row + m.build_message(b"C", b"SELECT 1\x00")
            return m.build_message(b"C", b"INSERT 0 1\x00")
        if kind == "C":
            name, _ = _cstring(body, 1)
            (self.statements if body[:1] == b"S" else self.portals).pop(name, None)
            return CLOSE_COMPLETE
        raise AssertionError(f"the fake server does not handle {kind!r}")

    def _check_parses(self, text: bytes) -> None:
        if text in self.fail_texts:
            raise ServerError("42601", f"syntax error in {text.decode()}")

    def _run(self, text: bytes) -> bytes:
        raised = _RAISE.search(text.decode())
        if text.startswith(b"DO ") and raised:
            raise ServerError(raised["code"], raised["message"].replace("''", "'"))
        return text

    def _statement(self, name: bytes) -> tuple[bytes, bytes]:
        if name not in self.statements:
            what = f'prepared statement "{name.decode()}"' if name else "unnamed prepared statement"
            raise ServerError("26000", f"{what} does not exist")
        return self.statements[name]

    def _portal(self, name: bytes) -> bytes:
        if name not in self.portals:
            raise ServerError("34000", f'portal "{name.decode()}" does not exist')
        return self.portals[name]

    @staticmethod
    def _row_description(text: bytes) -> bytes:
        if not text.startswith(b"SELECT"):
            return NO_DATA
        column = b"?column?\x00" + _INT32.pack(0) + _INT16.pack(0) + _INT32.pack(25) + _INT16.pack(-1)
        return m.build_message(b"T", _INT16.pack(1) + column + _INT32.pack(-1) + _INT16.pack(0))

    def parsed_names(self) -> list[bytes]:
        return [_cstring(body, 0)[0] for kind, body in self.received if kind == "P"]


# --- the proxy side: a server connection and a client, as the session code drives them -------------------


def read_replies(chunk: bytes, state: ServerState) -> bytes:
    """What the client sees of whole server messages. Where ServerConnection reads them in one
    pass (pass_untouched_replies), that pass must give what the message-by-message path gives
    and leave the reply queue as that does."""
    shadow = ServerState(state.statements, deque(state.pending), state.skipping)
    untouched = pass_untouched_replies(chunk, shadow, MAX)
    frames, _ = m.scan_frames(chunk, MAX)
    visible, status, parameters = filter_server_messages(chunk, frames, state)
    if untouched is not None:
        consumed, one_pass_status, one_pass_parameters, last_start = untouched
        assert (chunk[:consumed], one_pass_status, one_pass_parameters) == (visible, status, parameters)
        assert (list(shadow.pending), shadow.skipping) == (list(state.pending), state.skipping)
        assert last_start == (frames[-1][1] if frames else 0)
    return visible


@dataclass
class Conn:
    """One pooled server connection: the fake server and the proxy's state for it."""

    server: FakeServer
    state: ServerState
    undelivered: bytes = b""  # replies the server sent that the proxy has not read yet

    @classmethod
    def new(cls, capacity: int = 100, fail_texts: set[bytes] | None = None) -> Conn:
        return cls(FakeServer(fail_texts=set(fail_texts or ())), ServerState(ServerStatements(capacity)))

    def deliver(self, split_after: Sequence[int] = ()) -> bytes:
        """Let the proxy read the undelivered replies, in reads ending after the given frame counts."""
        data, self.undelivered = self.undelivered, b""
        frames, _ = m.scan_frames(data, MAX)
        out: list[bytes] = []
        cuts = sorted({0, len(frames), *(cut for cut in split_after if 0 < cut < len(frames))})
        for first, last in itertools.pairwise(cuts):
            begin, finish = frames[first][1], frames[last - 1][2]
            chunk = data[begin:finish]
            out.append(read_replies(chunk, self.state))
        if not frames:
            visible, _status, _parameters = filter_server_messages(b"", [], self.state)
            out.append(visible)
        return b"".join(out)


class Client:
    def __init__(self) -> None:
        self.stats = StatementStats()
        self.statements = ClientStatements(self.stats)

    def send(self, conn: Conn, data: bytes, refusals: Mapping[int, Refusal] | None = None) -> bytes:
        """Rewrite whole client messages for ``conn``; return what the client sees at once (synthetics)."""
        frames, consumed = m.scan_frames(data, MAX)
        assert consumed == len(data)
        offsets = [start for _, start, _ in frames]
        by_offset = {offsets[index]: refusal for index, refusal in (refusals or {}).items()}
        rewritten = self.statements.rewrite(data, frames, conn.state, by_offset or None)
        visible = take_ready_synthetics(conn.state)
        conn.undelivered += conn.server.feed(rewritten)
        return visible

    def exchange(self, conn: Conn, *messages: bytes, refusals: Mapping[int, Refusal] | None = None) -> bytes:
        """Send messages (refusals keyed by message index), let every reply through; what the client saw."""
        visible = self.send(conn, b"".join(messages), refusals)
        return visible + conn.deliver()


def reference(*messages: bytes, server: FakeServer | None = None) -> bytes:
    """What one server fed these messages directly sends back."""
    server = server if server is not None else FakeServer()
    return b"".join(server.feed(message) for message in messages)


T1, T2, T3, T4 = b"SELECT 1", b"SELECT 2", b"SELECT 3", b"INSERT INTO t VALUES (1)"


# --- straightforward rewriting ------------------------------------------------------------------------


def test_named_parse_gets_a_server_name_derived_from_text_and_types() -> None:
    conn, client = Conn.new(), Client()
    seen = client.exchange(conn, parse(b"s1", T1), bind(b"s1"), execute(), sync())
    assert seen == reference(parse(b"s1", T1), bind(b"s1"), execute(), sync())
    assert list(conn.server.statements) == [server_name(T1)]
    assert server_name(T1).startswith(b"pdp_")
    assert len(server_name(T1)) < 64  # NAMEDATALEN
    assert server_name(T1, (23,)) != server_name(T1)
    assert server_name(T1) in conn.state.statements
    assert not conn.state.pending


def test_unnamed_statements_and_portals_pass_unchanged() -> None:
    conn, client = Conn.new(), Client()
    messages = [parse(b"", T1), bind(b"", b"p1"), describe(b"P", b"p1"), execute(b"p1"), close(b"P", b"p1")]
    data = b"".join([*messages, sync()])
    frames, _ = m.scan_frames(data, MAX)
    assert client.statements.rewrite(data, frames, conn.state) == data
    # Nothing to change: the reply filter only waits for the cycle's ReadyForQuery.
    expectations = [(expected.reply, expected.ends_with) for expected in conn.state.pending]
    assert expectations == [(Reply.FORWARD, b"Z")]
    conn.undelivered = conn.server.feed(data)
    assert conn.deliver() == reference(*messages, sync())
    assert not conn.state.pending


def test_describe_statement_and_close_use_server_names() -> None:
    conn, client = Conn.new(), Client()
    messages = [parse(b"s", T1, (23,)), describe(b"S", b"s"), close(b"S", b"s"), sync()]
    seen = client.exchange(conn, *messages)
    assert seen == reference(*messages)
    assert kinds(seen) == "1tT3Z"
    # The Close only forgets the client's name: the server keeps the statement for others.
    assert [kind for kind, _ in conn.server.received] == ["P", "D", "S"]
    assert server_name(T1, (23,)) in conn.server.statements
    assert b"s" not in client.statements.by_name


def test_describe_of_a_statement_without_rows_answers_nodata() -> None:
    conn, client = Conn.new(), Client()
    messages = [parse(b"ins", T4), describe(b"S", b"ins"), bind(b"ins"), execute(), sync()]
    seen = client.exchange(conn, *messages)
    assert seen == reference(*messages)
    assert kinds(seen) == "1tn2CZ"


def test_unknown_names_reach_the_server_unchanged_and_fail_there() -> None:
    conn, client = Conn.new(), Client()
    messages = [bind(b"nope"), execute(), sync(), describe(b"S", b"nope"), sync()]
    seen = client.exchange(conn, *messages)
    assert seen == reference(*messages)
    assert sqlstates(seen) == ["26000", "26000"]
    assert kinds(seen) == "EZEZ"
    assert not conn.state.pending


def test_close_of_an_unknown_statement_is_no_error_and_is_answered_by_the_proxy() -> None:
    conn, client = Conn.new(), Client()
    seen = client.exchange(conn, close(b"S", b"never"), sync())
    assert seen == reference(close(b"S", b"never"), sync())
    assert [kind for kind, _ in conn.server.received] == ["S"]


# --- two clients, two server connections --------------------------------------------------------------


def test_two_clients_share_server_statements_across_two_connections() -> None:
    conns = [Conn.new(), Conn.new()]
    alice, bob = Client(), Client()
    refs = {id(alice): FakeServer(), id(bob): FakeServer()}

    def run(client: Client, conn: Conn, *messages: bytes) -> bytes:
        seen = client.exchange(conn, *messages)
        assert frames_of(seen) == frames_of(reference(*messages, server=refs[id(client)]))
        assert not conn.state.pending
        return seen

    # Each prepares with its own names; the same text means the same server-side statement.
    assert kinds(run(alice, conns[0], parse(b"a_one", T1), parse(b"a_two", T2), sync())) == "11Z"
    assert kinds(run(bob, conns[1], parse(b"b_one", T1), parse(b"b_three", T3), sync())) == "11Z"
    # Each binds on the connection the other one prepared on.
    seen = run(alice, conns[1], bind(b"a_one"), execute(), bind(b"a_two"), execute(), sync())
    assert kinds(seen) == "2DC2DCZ"
    seen = run(bob, conns[0], bind(b"b_one"), execute(), bind(b"b_three"), execute(), sync())
    assert kinds(seen) == "2DC2DCZ"
    # Bob preparing what Alice already has on connection 0 sends nothing for the Parse.
    before = len(conns[0].server.received)
    seen = run(bob, conns[0], parse(b"b_two", T2), bind(b"b_two"), execute(), sync())
    assert kinds(seen) == "12DCZ"
    assert [kind for kind, _ in conns[0].server.received[before:]] == ["B", "E", "S"]
    # Alice closing her name leaves the shared statement for Bob.
    run(alice, conns[0], close(b"S", b"a_two"), sync())
    assert kinds(run(bob, conns[0], bind(b"b_two"), execute(), sync())) == "2DCZ"
    assert kinds(run(alice, conns[0], bind(b"a_two"), execute(), sync())) == "EZ"  # 26000 as for real

    for conn in conns:
        assert conn.server.duplicate_parses == 0
        # The unnamed statement is the raising block that answered Alice's unknown name.
        named = [name for name in conn.server.statements if name]
        assert sorted(named) == sorted(server_name(t) for t in (T1, T2, T3))
        names = conn.server.parsed_names()
        assert len(names) == len(set(names)), "each statement is prepared once per server connection"
    assert alice.stats.misses + bob.stats.misses == 6
    assert bob.stats.hits >= 1


def test_client_parse_of_a_statement_the_server_has_is_answered_in_order() -> None:
    conn, alice, bob = Conn.new(), Client(), Client()
    alice.exchange(conn, parse(b"x", T2), sync())
    # A synthetic ParseComplete that has replies ahead of it waits for them, and precedes the Bind's.
    messages = [parse(b"", T1), bind(b""), execute(), parse(b"y", T2), bind(b"y"), execute(), sync()]
    visible_at_once = bob.send(conn, b"".join(messages))
    assert visible_at_once == b""
    seen = conn.deliver()
    assert seen == reference(*messages)
    assert kinds(seen) == "12DC12DCZ"
    assert [kind for kind, _ in conn.server.received[-6:]] == ["P", "B", "E", "B", "E", "S"]
    # Nothing ahead: the synthetic ParseComplete goes out as the messages are sent.
    visible_at_once = bob.send(conn, parse(b"z", T2) + bind(b"z") + execute() + sync())
    assert visible_at_once == PARSE_COMPLETE
    assert kinds(conn.deliver()) == "2DCZ"
    assert not conn.state.pending


@pytest.mark.parametrize("reads", [(), (1,), (1, 2), (2, 3, 4)])
def test_synthetic_replies_keep_their_place_across_reads(reads: tuple[int, ...]) -> None:
    conn, alice, bob = Conn.new(), Client(), Client()
    alice.exchange(conn, parse(b"x", T1), sync())
    bob.exchange(Conn.new(), parse(b"bx", T1), sync())
    bobs_server = FakeServer()
    reference(parse(b"bx", T1), sync(), server=bobs_server)
    messages = [bind(b"bx"), execute(), parse(b"mine", T1), describe(b"S", b"mine"), sync()]
    visible = bob.send(conn, b"".join(messages))
    seen = visible + conn.deliver(split_after=reads)
    assert seen == reference(*messages, server=bobs_server)
    assert kinds(seen) == "2DC1tTZ"
    assert not conn.state.pending


def test_pipelined_sends_before_replies_are_read() -> None:
    conn, client = Conn.new(), Client()
    first = [parse(b"a", T1), bind(b"a"), execute(), sync()]
    second = [parse(b"b", T1), bind(b"b"), execute(), close(b"S", b"a"), sync()]
    assert client.send(conn, b"".join(first)) == b""
    # The server already has T1's statement, but the replies to the first batch are still unread.
    assert client.send(conn, b"".join(second)) == b""
    seen = conn.deliver(split_after=(2,))
    assert seen == reference(*first, *second)
    assert kinds(seen) == "12DCZ12DC3Z"
    assert not conn.state.pending


# --- errors --------------------------------------------------------------------------------------------


def test_error_in_an_injected_parse_reaches_the_client_and_the_statement_is_prepared_again() -> None:
    healthy, broken = Conn.new(), Conn.new(fail_texts={T3})
    client = Client()
    client.exchange(healthy, parse(b"s", T3), sync())
    # On a connection where the text does not parse, the Parse the proxy adds fails.
    seen = client.exchange(broken, bind(b"s"), execute(), sync())
    assert kinds(seen) == "EZ"
    assert sqlstates(seen) == ["42601"]
    assert not broken.state.pending
    assert server_name(T3) not in broken.state.statements
    assert server_name(T3) not in broken.server.statements
    # Once the text parses there, the next use prepares it again.
    broken.server.fail_texts.clear()
    seen = client.exchange(broken, bind(b"s"), execute(), sync())
    assert kinds(seen) == "2DCZ"
    assert broken.server.parsed_names() == [server_name(T3), server_name(T3)]
    assert broken.server.duplicate_parses == 0
    assert not broken.state.pending


def test_error_in_a_client_parse_forgets_the_server_statement() -> None:
    conn, client = Conn.new(fail_texts={T3}), Client()
    messages = [parse(b"bad", T3), bind(b"bad"), execute(), sync()]
    seen = client.exchange(conn, *messages)
    assert seen == reference(*messages, server=FakeServer(fail_texts={T3}))
    assert server_name(T3) not in conn.state.statements
    assert not conn.state.pending


def test_error_skips_to_sync_including_the_proxys_own_messages() -> None:
    conn, client = Conn.new(), Client()
    # The unnamed Parse fails; the Parse the proxy adds for "a" and its Bind are skipped by the server.
    client.exchange(Conn.new(), parse(b"a", T1), sync())
    conn.server.fail_texts.add(T4)
    messages = [parse(b"", T4), bind(b"a"), execute(), close(b"S", b"gone"), sync()]
    seen = client.exchange(conn, *messages)
    assert kinds(seen) == "EZ"
    assert not conn.state.pending
    assert server_name(T1) not in conn.state.statements
    assert server_name(T1) not in conn.server.statements
    # The statement is prepared when next used, without a duplicate.
    assert kinds(client.exchange(conn, bind(b"a"), execute(), sync())) == "2DCZ"
    assert conn.server.duplicate_parses == 0


def test_error_after_a_synthetic_reply_keeps_the_synthetic_and_skips_the_rest() -> None:
    conn, alice, bob = Conn.new(fail_texts={T4}), Client(), Client()
    alice.exchange(conn, parse(b"x", T1), sync())
    messages = [parse(b"", T2), bind(b""), execute(), parse(b"mine", T1), parse(b"", T4), bind(b""), sync()]
    seen = bob.send(conn, b"".join(messages)) + conn.deliver()
    assert seen == reference(*messages, server=FakeServer(fail_texts={T4}))
    assert kinds(seen) == "12DC1EZ"
    assert not conn.state.pending


# --- eviction --------------------------------------------------------------------------------------------


def test_eviction_at_capacity_closes_the_least_recently_used_statement() -> None:
    conn, client = Conn.new(capacity=2), Client()
    seen = client.exchange(conn, parse(b"a", T1), parse(b"b", T2), sync())
    assert kinds(seen) == "11Z"
    # Using "a" makes "b" the least recently used.
    assert kinds(client.exchange(conn, bind(b"a"), execute(), sync())) == "2DCZ"
    before = len(conn.server.received)
    seen = client.exchange(conn, parse(b"c", T3), sync())
    assert seen == PARSE_COMPLETE + m.build_ready_for_query(b"I")  # no CloseComplete for the eviction
    sent = conn.server.received[before:]
    assert sent[0] == ("C", b"S" + server_name(T2) + b"\x00")
    assert [kind for kind, _ in sent] == ["C", "P", "S"]
    assert sorted(conn.server.statements) == sorted([server_name(T1), server_name(T3)])
    assert len(conn.state.statements) == 2
    assert server_name(T2) not in conn.state.statements
    # The evicted statement comes back when used, evicting the next least recently used ("a").
    seen = client.exchange(conn, bind(b"b"), execute(), sync())
    assert kinds(seen) == "2DCZ"
    assert sorted(conn.server.statements) == sorted([server_name(T2), server_name(T3)])
    assert conn.server.duplicate_parses == 0
    assert not conn.state.pending


def test_server_statements_lru() -> None:
    statements = ServerStatements(2)
    assert statements.add(b"a") == []
    assert statements.add(b"b") == []
    statements.use(b"a")
    assert statements.add(b"c") == [b"b"]
    assert b"a" in statements and b"c" in statements and len(statements) == 2
    statements.forget(b"a")
    statements.forget(b"missing")
    assert len(statements) == 1
    statements.clear()
    assert len(statements) == 0


def test_eviction_close_skipped_after_an_error_leaves_the_statement_known() -> None:
    conn, client = Conn.new(capacity=2, fail_texts={T4}), Client()
    client.exchange(conn, parse(b"a", T1), parse(b"b", T2), parse(b"c", T3), sync())
    # Server: T2, T3. Binding "a" evicts T2 -- but the unnamed Parse before it fails, so the server
    # skips the Close of T2 (and the Parse of T1): T2 stays on the server.
    seen = client.exchange(conn, parse(b"", T4), bind(b"a"), execute(), sync())
    assert kinds(seen) == "EZ"
    assert server_name(T2) in conn.server.statements
    seen = client.exchange(conn, bind(b"b"), execute(), sync())
    assert conn.server.duplicate_parses == 0
    assert kinds(seen) == "2DCZ"


# --- ordering of several synthetic replies ----------------------------------------------------------------


def test_consecutive_synthetic_replies_after_a_forwarded_one() -> None:
    conn, client = Conn.new(), Client()
    client.exchange(conn, parse(b"a", T1), parse(b"b", T2), sync())
    messages = [bind(b"a"), execute(), close(b"S", b"a"), close(b"S", b"b"), sync()]
    seen = client.exchange(conn, *messages)
    assert kinds(seen) == "2DC33Z"
    assert not conn.state.pending


# --- a Query inside an extended-protocol error -----------------------------------------------------------


def test_query_discarded_after_an_extended_protocol_error() -> None:
    conn, client = Conn.new(fail_texts={T4}), Client()
    messages = [parse(b"", T4), bind(b""), execute(), query(b"SELECT 1"), sync()]
    seen = client.exchange(conn, *messages)
    assert seen == reference(*messages, server=FakeServer(fail_texts={T4}))
    assert kinds(seen) == "EZ"
    assert not conn.state.pending


def test_a_sync_read_on_its_own_still_ends_the_skipping_after_a_query_inside_the_cycle() -> None:
    # The Sync alone is an untouched batch, but the cycle it ends was opened by the earlier read:
    # it must stay where the server's skipping ends, or the next answers of the proxy's own vanish.
    conn, client = Conn.new(fail_texts={T4}), Client()
    seen = client.send(conn, parse(b"", T4) + bind(b"") + execute() + query(b"SELECT 1"))
    seen += client.send(conn, sync())
    seen += conn.deliver()
    assert kinds(seen) == "EZ"
    assert not conn.state.pending
    assert not conn.state.skipping
    assert kinds(client.exchange(conn, close(b"S", b"a"), sync())) == "3Z"


@pytest.mark.parametrize("rest", [[bind(b"a"), execute(), sync()], [close(b"S", b"a"), sync()]])
def test_messages_sent_after_the_error_was_read_are_skipped_too(rest: list[bytes]) -> None:
    conn, client = Conn.new(fail_texts={T4}), Client()
    client.exchange(conn, parse(b"a", T1), sync())
    first = [parse(b"", T4), bind(b""), execute(), flush()]
    seen = client.send(conn, b"".join(first)) + conn.deliver()
    assert kinds(seen) == "E"
    # The rest of the pipeline arrives after the proxy has passed the error on.
    seen += client.send(conn, b"".join(rest)) + conn.deliver()
    assert (
        seen
        == reference(parse(b"a", T1), sync(), *first, *rest, server=FakeServer(fail_texts={T4}))[
            len(reference(parse(b"a", T1), sync())) :
        ]
    )
    assert kinds(seen) == "EZ"
    assert not conn.state.pending


def test_query_between_extended_messages() -> None:
    conn, client = Conn.new(), Client()
    messages = [parse(b"a", T1), query(b"SELECT 9"), bind(b"a"), execute(), sync()]
    seen = client.exchange(conn, *messages)
    assert seen == reference(*messages)
    assert kinds(seen) == "1CZ2DCZ"
    assert not conn.state.pending


# --- asynchronous messages and parameter reports ---------------------------------------------------------


def test_asynchronous_messages_pass_while_proxy_replies_are_dropped() -> None:
    conn, client = Conn.new(), Client()
    client.exchange(Conn.new(), parse(b"a", T1), sync())
    client.send(conn, bind(b"a") + execute() + sync())
    notice = m.build_error_response("NOTICE", "00000", "hello", kind=b"N")
    status = m.build_parameter_status("application_name", "till")
    replies = frames_of(conn.undelivered)
    assert [kind for kind, _ in replies] == ["1", "2", "D", "C", "Z"]
    # A notice and a parameter report arrive right after the dropped ParseComplete.
    data = PARSE_COMPLETE + notice + status + conn.undelivered[len(PARSE_COMPLETE) :]
    conn.undelivered = b""
    frames, _ = m.scan_frames(data, MAX)
    out, ready, parameters = filter_server_messages(data, frames, conn.state)
    assert kinds(out) == "NS2DCZ"
    assert ready == b"I"
    assert parameters == [b"application_name\x00till\x00"]
    assert not conn.state.pending


def test_filter_without_pending_replies_passes_everything() -> None:
    state = ServerState(ServerStatements(4))
    data = m.build_parameter_status("TimeZone", "UTC") + m.build_ready_for_query(b"T")
    frames, _ = m.scan_frames(data, MAX)
    out, _ready, parameters = filter_server_messages(data, frames, state)
    assert out == data
    assert parameters == [b"TimeZone\x00UTC\x00"]


def _notification(pid: int, payload: bytes) -> bytes:
    return m.build_message(b"A", struct.pack("!i", pid) + b"price_change\x00" + payload + b"\x00")


def test_own_notifications_name_the_backend_by_the_clients_pid() -> None:
    state = ServerState(ServerStatements(4))
    state.notifier_pids = (4242, 777_000_111)
    data = _notification(4242, b"own") + _notification(5151, b"other") + m.build_ready_for_query(b"I")
    # The single-pass reader leaves notifications to filter_server_messages.
    assert pass_untouched_replies(data, state, MAX) is None
    frames, _ = m.scan_frames(data, MAX)
    out, _ready, _parameters = filter_server_messages(data, frames, state)
    assert out == _notification(777_000_111, b"own") + data[len(_notification(4242, b"own")) :]


def test_notifications_pass_unchanged_without_an_attached_client() -> None:
    state = ServerState(ServerStatements(4))
    data = _notification(4242, b"own")
    frames, _ = m.scan_frames(data, MAX)
    assert filter_server_messages(data, frames, state)[0] == data


# --- refusals --------------------------------------------------------------------------------------------

REFUSAL = Refusal("0A000", "SET work_mem is not supported under transaction pooling", hint="use SET LOCAL")


def test_refused_parse_runs_a_raising_block_whose_error_alone_reaches_the_client() -> None:
    conn, client = Conn.new(), Client()
    messages = [parse(b"r", b"SET work_mem = '1MB'"), bind(b"r"), execute(), sync()]
    seen = client.exchange(conn, *messages, refusals={0: REFUSAL})
    assert kinds(seen) == "EZ"
    assert sqlstates(seen) == ["0A000"]
    error = m.parse_error_fields(frames_of(seen)[0][1])
    assert error["M"] == REFUSAL.message
    sent = [kind for kind, _ in conn.server.received]
    # The Bind of the never-created "r" is refused in turn (26000) rather than forwarded: a
    # forwarded name could reach a statement another client prepared.
    assert sent == ["P", "B", "E", "P", "B", "E", "E", "S"]
    text = _cstring(conn.server.received[0][1], 1)[0]
    assert text.startswith(b"DO $refused_")
    assert b"r" not in client.statements.by_name
    assert not conn.state.pending


def test_refused_parse_after_other_messages() -> None:
    conn, client = Conn.new(), Client()
    messages = [parse(b"a", T1), bind(b"a"), execute(), parse(b"", b"LISTEN x"), bind(b""), execute(), sync()]
    seen = client.exchange(conn, *messages, refusals={3: REFUSAL})
    assert kinds(seen) == "12DCEZ"
    assert sqlstates(seen) == ["0A000"]
    assert not conn.state.pending


def test_execute_over_the_rate_limit_fails_in_its_cycle_and_the_statement_stays_usable() -> None:
    # Executions of a statement prepared long before are statements too: the rate limit refuses
    # the Execute itself, inside the client's cycle, and the prepared statement survives.
    conn, client = Conn.new(), Client()
    client.exchange(conn, parse(b"a", T1), sync())
    over = Refusal("53400", "statement rate limit for terminal till-01 exceeded")
    seen = client.exchange(conn, bind(b"a"), execute(), sync(), refusals={1: over})
    assert kinds(seen) == "2EZ"
    assert sqlstates(seen) == ["53400"]
    assert m.parse_error_fields(frames_of(seen)[1][1])["M"] == over.message
    assert not conn.state.pending
    assert kinds(client.exchange(conn, bind(b"a"), execute(), sync())) == "2DCZ"


def test_refused_query_is_replaced_by_a_query() -> None:
    conn, client = Conn.new(), Client()
    seen = client.exchange(conn, query(b"LISTEN x"), query(b"SELECT 1"), refusals={0: REFUSAL})
    assert kinds(seen) == "EZCZ"
    assert sqlstates(seen) == ["0A000"]
    assert [kind for kind, _ in conn.server.received] == ["Q", "Q"]
    assert conn.server.received[0][1].startswith(b"DO $refused_")
    assert not conn.state.pending


# --- the unnamed statement: a client reaches only its own ----------------------------------------------

PAYROLL = b"SELECT salary FROM payroll"


@pytest.mark.parametrize("reuse", [[bind(b""), execute()], [describe(b"S", b"")]])
def test_unnamed_statement_another_client_left_is_never_reached(reuse: list[bytes]) -> None:
    conn, manager, cashier = Conn.new(), Client(), Client()
    manager.exchange(conn, parse(b"", PAYROLL), sync())
    before = len(conn.server.received)
    seen = cashier.exchange(conn, *reuse, sync())
    assert seen == reference(*reuse, sync())  # what the cashier's own server says: 26000
    assert sqlstates(seen) == ["26000"]
    # The raising block in place of the cashier's Bind or Describe, which never reach the server.
    sent = conn.server.received[before:]
    assert "".join(kind for kind, _ in sent) == "PBE" + kinds(b"".join(reuse[1:])) + "S"
    assert sent[0][1].startswith(b"\x00DO $refused_")
    assert b"payroll" not in seen


def test_unnamed_statement_is_parsed_again_where_another_client_left_one() -> None:
    first, second, client, other = Conn.new(), Conn.new(), Client(), Client()
    client.exchange(first, parse(b"", T1), sync())
    other.exchange(second, parse(b"", PAYROLL), sync())
    # The client's next transaction lands on the other connection: it still runs its own statement.
    seen = client.exchange(second, bind(b""), execute(), sync())
    assert kinds(seen) == "2DCZ"
    assert T1 in seen and b"payroll" not in seen
    assert second.server.parsed_names()[-1] == b""  # parsed again, its ParseComplete dropped
    # Back on its first connection, where its statement still is: no second Parse.
    parses = len(first.server.parsed_names())
    assert kinds(client.exchange(first, bind(b""), execute(), sync())) == "2DCZ"
    assert len(first.server.parsed_names()) == parses


def test_a_parse_skipped_after_an_error_cannot_leave_another_clients_statement_bound() -> None:
    conn, manager, cashier = Conn.new(), Client(), Client()
    manager.exchange(conn, parse(b"", PAYROLL), sync())
    # The cashier's Parse follows an error: the server skips it and keeps the manager's statement.
    # The next cycle is sent before any reply is read (pipelined) and binds "its" unnamed statement.
    seen = cashier.send(conn, execute(b"no such portal") + parse(b"", T1) + sync())
    seen += cashier.send(conn, bind(b"") + execute() + sync())
    seen += conn.deliver()
    assert b"payroll" not in seen
    assert kinds(seen) == "EZ2DCZ"  # 34000, then the cashier's own statement, parsed again
    assert sqlstates(seen) == ["34000"]
    assert T1 in seen


def test_after_a_simple_query_the_unnamed_statement_is_gone() -> None:
    conn, client = Conn.new(), Client()
    messages = [parse(b"", T1), sync(), query(T2), bind(b""), execute(), sync()]
    seen = client.exchange(conn, *messages[:3]) + client.exchange(conn, *messages[3:])
    assert seen == reference(*messages)
    assert sqlstates(seen) == ["26000"]


def test_close_of_the_unnamed_statement_ends_it_for_the_client() -> None:
    conn, client = Conn.new(), Client()
    messages = [parse(b"", T1), sync(), close(b"S", b""), sync(), bind(b""), execute(), sync()]
    seen = client.exchange(conn, *messages[:4]) + client.exchange(conn, *messages[4:])
    assert seen == reference(*messages)
    assert sqlstates(seen) == ["26000"]


# --- property: any sequence of client operations looks like one real server -------------------------------

NAMES = (b"a", b"b", b"c")
UNKNOWN = b"zz"
TEXTS: tuple[tuple[bytes, tuple[int, ...]], ...] = (
    (T1, ()),
    (T2, ()),
    (b"SELECT $1::int", (23,)),
    (T4, ()),
)
BAD = b"SELEC oops"
OPS = ("parse", "bind", "describe", "close", "unnamed", "query", "flush", "portal", "reuse")


@dataclass
class UnnamedModel:
    """Where the proxy knowingly differs from one server about a client's unnamed statement: after
    a Parse of it that failed or was skipped, or a Query or Close skipped after an error, the proxy
    takes the client's last Parse (or the drop) as done, so reusing it answers differently (never
    with another client's statement)."""

    unsure: bool = False


@dataclass
class Batch:
    messages: list[bytes] = field(default_factory=list)
    expected: list[bytes] = field(default_factory=list)


def draw_batch(
    data: st.DataObject, ref: FakeServer, *, avoid_known_bugs: bool, unnamed: UnnamedModel | None = None
) -> Batch:
    """Client messages up to a Sync, each fed to the client's reference server as it is drawn.

    Left out, as deliberate differences from a real server rather than what is tested here:
    a Parse of a name the client already has (the proxy replaces it instead of failing with 42P05),
    named Parse or Close while the server discards messages after an error (the proxy applies them
    anyway), a named Parse of text that fails (the proxy remembers the name), and reusing the
    unnamed statement where the proxy's idea of it differs (UnnamedModel).
    """
    batch = Batch()
    last = ""
    unnamed = unnamed if unnamed is not None else UnnamedModel()

    def add(*messages: bytes) -> None:
        for message in messages:
            batch.messages.append(message)
            batch.expected.append(ref.feed(message))

    for _ in range(data.draw(st.integers(0, 7), label="ops")):
        op = data.draw(st.sampled_from(OPS), label="op")
        adjacent_synthetics = avoid_known_bugs and last in ("parse", "close")
        if op == "parse":
            name = data.draw(st.sampled_from(NAMES), label="name")
            text, types = data.draw(st.sampled_from(TEXTS), label="text")
            if ref.skipping or name in ref.statements or adjacent_synthetics:
                continue
            add(parse(name, text, types))
        elif op in ("bind", "describe"):
            name = data.draw(st.sampled_from((*NAMES, UNKNOWN)), label="name")
            if avoid_known_bugs and ref.skipping:
                continue
            add(*((bind(name), execute()) if op == "bind" else (describe(b"S", name),)))
        elif op == "close":
            name = data.draw(st.sampled_from((*NAMES, UNKNOWN)), label="name")
            if ref.skipping or adjacent_synthetics:
                continue
            add(close(b"S", name))
        elif op == "unnamed":
            text, types = data.draw(st.sampled_from((*TEXTS, (BAD, ()))), label="text")
            unnamed.unsure = ref.skipping or text == BAD
            add(parse(b"", text, types), bind(b""), execute())
        elif op == "reuse":
            # The unnamed statement again, without parsing it: a later cycle, maybe another connection.
            if unnamed.unsure:
                continue
            what = data.draw(st.sampled_from(("bind", "describe", "close")), label="reuse")
            if what == "close":
                unnamed.unsure = ref.skipping
                add(close(b"S", b""))
            else:
                add(*((bind(b""), execute()) if what == "bind" else (describe(b"S", b""),)))
        elif op == "query":
            if avoid_known_bugs and ref.skipping:
                continue
            unnamed.unsure = ref.skipping
            add(query(data.draw(st.sampled_from((T1, BAD)), label="query")))
        elif op == "flush":
            add(flush())
            continue  # no reply: does not separate synthetic replies
        else:
            add(describe(b"P", b""))
        last = op
    add(sync())
    return batch


def kinds_of(replies: list[bytes]) -> str:
    return "".join(kinds(reply) for reply in replies)


def run_batch(
    data: st.DataObject, client: Client, conn: Conn, batch: Batch, *, avoid_known_bugs: bool
) -> bytes:
    """Send the batch in random whole-message chunks, reading replies at random points."""
    seen: list[bytes] = []
    count = len(batch.messages)
    cuts = (
        sorted(data.draw(st.sets(st.integers(1, count - 1), max_size=3), label="cuts")) if count > 1 else []
    )
    for first, last in zip([0, *cuts], [*cuts, count], strict=True):
        seen.append(client.send(conn, b"".join(batch.messages[first:last])))
        # Reading replies mid-batch after an error: see test_messages_sent_after_the_error_was_read...
        may_read = not (avoid_known_bugs and any(kind == "E" for kind in kinds_of(batch.expected)))
        if last == count or (may_read and data.draw(st.booleans(), label="read now")):
            reads = data.draw(st.lists(st.integers(1, 12), max_size=3), label="reads")
            seen.append(conn.deliver(split_after=reads))
    return b"".join(seen)


def check_sequences(data: st.DataObject, capacity: int, *, avoid_known_bugs: bool) -> None:
    conns = [Conn.new(capacity, {BAD}), Conn.new(capacity, {BAD})]
    clients = [Client(), Client()]
    refs = [FakeServer(fail_texts={BAD}), FakeServer(fail_texts={BAD})]
    models = [UnnamedModel(), UnnamedModel()]
    for _ in range(data.draw(st.integers(1, 8), label="transactions")):
        who = data.draw(st.integers(0, 1), label="client")
        conn = data.draw(st.sampled_from(conns), label="server connection")
        batch = draw_batch(data, refs[who], avoid_known_bugs=avoid_known_bugs, unnamed=models[who])
        seen = run_batch(data, clients[who], conn, batch, avoid_known_bugs=avoid_known_bugs)
        assert frames_of(seen) == frames_of(b"".join(batch.expected))
        assert not conn.state.pending
        assert conn.server.duplicate_parses == 0
    for conn in conns:
        assert set(conn.server.statements) - {b""} == set(conn.state.statements._names)
        assert len(conn.state.statements) <= capacity


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), capacity=st.integers(1, 4))
def test_client_sees_what_one_server_would_send(data: st.DataObject, capacity: int) -> None:
    check_sequences(data, capacity, avoid_known_bugs=True)


@settings(
    max_examples=300,
    deadline=None,
    derandomize=True,
    phases=[Phase.generate],  # a failure is expected: no shrinking
    suppress_health_check=[HealthCheck.too_slow],
)
@given(data=st.data(), capacity=st.integers(1, 4))
def test_client_sees_what_one_server_would_send_with_errors_anywhere(
    data: st.DataObject, capacity: int
) -> None:
    check_sequences(data, capacity, avoid_known_bugs=False)


# --- policy generations ---------------------------------------------------------------------------------


def test_statements_carry_the_policy_generation_they_were_decided_under() -> None:
    conn, client = Conn.new(), Client()
    client.exchange(conn, parse(b"a", T1), parse(b"", T2), sync())
    statements = client.statements
    assert (statements.by_name[b"a"].generation, statements.unnamed and statements.unnamed.generation) == (
        0,
        0,
    )
    assert (statements.by_name[b"a"].text, statements.unnamed and statements.unnamed.text) == (T1, T2)
    statements.generation = 1  # a reload
    unnamed = statements.unnamed
    statements.redecided(b"a", conn.state)
    statements.redecided(b"", conn.state)
    assert statements.by_name[b"a"].generation == 1
    assert statements.unnamed is not None and statements.unnamed.generation == 1
    assert statements.unnamed is not unnamed and conn.state.unnamed is statements.unnamed
    # Still the client's own statement on that connection: no second Parse.
    parses = len(conn.server.parsed_names())
    assert kinds(client.exchange(conn, bind(b""), execute(), bind(b"a"), execute(), sync())) == "2DC2DCZ"
    assert len(conn.server.parsed_names()) == parses


def test_a_refused_bind_runs_the_raising_block_and_skips_the_rest() -> None:
    conn, client = Conn.new(), Client()
    client.exchange(conn, parse(b"a", T1), sync())
    refused = Refusal("42501", "reading table public.stock is not allowed for role cashier")
    seen = client.exchange(conn, bind(b"a"), execute(), sync(), refusals={0: refused})
    assert kinds(seen) == "EZ" and sqlstates(seen) == ["42501"]
    assert T1 not in seen
    assert kinds(client.exchange(conn, bind(b"a"), execute(), sync())) == "2DCZ"
