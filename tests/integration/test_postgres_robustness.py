"""Misbehaving, slow and unusual clients: the proxy refuses them precisely and keeps serving everyone else."""

from __future__ import annotations

import hashlib
import os
import socket
import ssl
import struct
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, suppress
from typing import Any

import psycopg
import pytest

from proxy.protocols.postgres import messages as m
from tests.integration.proxyproc import ProxyProcess, Terminal, TerminalPKI

# Every socket read is bounded by this; no test waits on the proxy longer than that per step.
IO_TIMEOUT = 10.0
# Both timeouts in the base test configuration (listen.handshake_timeout, listen.startup_timeout).
CONFIGURED_TIMEOUT = 3.0
GSSENC_REQUEST = struct.pack("!ii", 8, m.GSSENC_REQUEST_CODE)

Message = tuple[bytes, bytes]


class PeerClosed(Exception):
    """The proxy closed the connection (FIN, TLS close_notify or reset)."""


class RawClient:
    """A hand-driven PostgreSQL frontend over one (usually TLS) socket."""

    def __init__(self, sock: socket.socket) -> None:
        sock.settimeout(IO_TIMEOUT)
        self.sock = sock
        self.source = "{}:{}".format(*sock.getsockname()[:2])
        self._buffer = bytearray()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def send_bytewise(self, data: bytes, pause: float = 0.001) -> None:
        """One write (one TLS record) per byte, so the proxy sees every split point."""
        for index in range(len(data)):
            self.sock.sendall(data[index : index + 1])
            time.sleep(pause)

    def _fill(self, size: int, deadline: float) -> None:
        while len(self._buffer) < size:
            if time.monotonic() > deadline:
                raise TimeoutError(f"no complete message within {IO_TIMEOUT}s: {bytes(self._buffer)!r}")
            try:
                chunk = self.sock.recv(65536)
            except (ConnectionResetError, BrokenPipeError, ssl.SSLEOFError) as exc:
                raise PeerClosed(str(exc)) from exc
            if not chunk:
                raise PeerClosed("end of stream")
            self._buffer += chunk

    def read_message(self) -> Message:
        deadline = time.monotonic() + IO_TIMEOUT
        self._fill(5, deadline)
        kind = bytes(self._buffer[:1])
        (length,) = struct.unpack_from("!I", self._buffer, 1)
        assert 4 <= length <= 2**24, f"implausible backend message length {length} for {kind!r}"
        self._fill(1 + length, deadline)
        payload = bytes(self._buffer[5 : 1 + length])
        del self._buffer[: 1 + length]
        return kind, payload

    def read_until_ready(self) -> list[Message]:
        received: list[Message] = []
        for _ in range(10_000):
            kind, payload = self.read_message()
            received.append((kind, payload))
            if kind == b"Z":
                return received
            if kind == b"E" and m.parse_error_fields(payload).get("S") == "FATAL":
                return received
        raise AssertionError("no ReadyForQuery after 10000 messages")

    def startup(self, user: str, database: str = "pos") -> list[Message]:
        self.send(m.build_startup_message({"user": user, "database": database}))
        return self.read_until_ready()

    def expect_fatal(self, sqlstate: str) -> dict[str, str]:
        """The next message is ErrorResponse FATAL ``sqlstate`` and then the proxy closes."""
        kind, payload = self.read_message()
        assert kind == b"E", (kind, payload)
        fields = m.parse_error_fields(payload)
        assert fields.get("S") == "FATAL", fields
        assert fields.get("V") == "FATAL", fields
        assert fields.get("C") == sqlstate, fields
        self.expect_closed()
        return fields

    def expect_closed(self) -> None:
        """Nothing more arrives and the proxy ends the connection (within IO_TIMEOUT)."""
        try:
            self._fill(len(self._buffer) + 1, time.monotonic() + IO_TIMEOUT)
        except PeerClosed:
            assert not self._buffer, f"unread bytes before close: {bytes(self._buffer)!r}"
            return
        raise AssertionError(f"unexpected data instead of end of stream: {bytes(self._buffer)!r}")

    def close(self) -> None:
        with suppress(OSError):
            self.sock.close()


def tcp_connect(proxy: ProxyProcess, source: str | None = None) -> socket.socket:
    """A plain TCP connection to the proxy, from the loopback address ``source`` if given."""
    sock = socket.create_connection(
        ("127.0.0.1", proxy.port), timeout=IO_TIMEOUT, source_address=(source, 0) if source else None
    )
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def recv_exactly(sock: socket.socket, size: int) -> bytes:
    data = b""
    deadline = time.monotonic() + IO_TIMEOUT
    while len(data) < size and time.monotonic() < deadline:
        chunk = sock.recv(size - len(data))
        if not chunk:
            break
        data += chunk
    return data


def tls_client(
    proxy: ProxyProcess,
    pki: TerminalPKI,
    terminal: Terminal,
    *,
    gssenc_first: bool = False,
    direct: bool = False,
) -> RawClient:
    """TCP, then (unless ``direct``) SSLRequest -> 'S', then the TLS handshake as ``terminal``."""
    sock = tcp_connect(proxy)
    try:
        if gssenc_first:
            sock.sendall(GSSENC_REQUEST)
            assert recv_exactly(sock, 1) == b"N"
        context = proxy.ssl_context(terminal, pki.ca)
        if direct:
            context.set_alpn_protocols(["postgresql"])
        else:
            sock.sendall(m.build_ssl_request())
            assert recv_exactly(sock, 1) == b"S"
        return RawClient(context.wrap_socket(sock, server_hostname="127.0.0.1"))
    except BaseException:
        sock.close()
        raise


@contextmanager
def raw_session(
    proxy: ProxyProcess, pki: TerminalPKI, terminal: Terminal, **options: Any
) -> Iterator[RawClient]:
    """A TLS client whose startup reached ReadyForQuery."""
    client = tls_client(proxy, pki, terminal, **options)
    try:
        received = client.startup(terminal.terminal)
        assert_startup_succeeded(received)
        yield client
    finally:
        client.close()


def assert_startup_succeeded(received: list[Message]) -> None:
    kinds = [kind for kind, _ in received]
    assert kinds[0] == b"R" and m.parse_authentication(received[0][1])[0] == m.AUTH_OK, received
    assert b"K" in kinds, received
    assert received[-1] == (b"Z", b"I"), received


def data_row_values(payload: bytes) -> list[bytes | None]:
    (count,) = struct.unpack_from("!h", payload, 0)
    position = 2
    values: list[bytes | None] = []
    for _ in range(count):
        (size,) = struct.unpack_from("!i", payload, position)
        position += 4
        if size < 0:
            values.append(None)
        else:
            values.append(payload[position : position + size])
            position += size
    return values


def run_query(client: RawClient, sql: str) -> list[Message]:
    client.send(m.build_query(sql))
    return client.read_until_ready()


def assert_single_value(received: list[Message], value: bytes) -> None:
    kinds = [kind for kind, _ in received]
    assert kinds == [b"T", b"D", b"C", b"Z"], received
    assert data_row_values(received[1][1]) == [value]
    assert received[2][1] == b"SELECT 1\x00"
    assert received[3][1] == b"I"


def psycopg_session(proxy: ProxyProcess, pki: TerminalPKI, terminal: Terminal) -> psycopg.Connection:
    return psycopg.connect(**proxy.conninfo(terminal, pki.ca), autocommit=True)


def assert_proxy_serves(proxy: ProxyProcess, pki: TerminalPKI) -> None:
    with psycopg_session(proxy, pki, pki.cashier) as connection:
        assert connection.execute("SELECT 'still serving'").fetchone() == ("still serving",)


def expect_dropped(sock: socket.socket, timeout: float) -> float:
    """Wait (bounded) for the proxy to close a plain TCP socket; return how long it took."""
    sock.settimeout(timeout)
    started = time.monotonic()
    try:
        data = sock.recv(4096)
    except ConnectionResetError:
        data = b""
    except TimeoutError:
        pytest.fail(f"the proxy did not drop the connection within {timeout}s")
    assert data == b"", f"unexpected bytes from the proxy: {data!r}"
    return time.monotonic() - started


# --- the data path: framing checks ---


def test_oversized_message_is_refused_without_disturbing_other_sessions(
    proxy: ProxyProcess, terminal_pki: TerminalPKI
) -> None:
    with psycopg_session(proxy, terminal_pki, terminal_pki.manager) as before:
        assert before.execute("SELECT 'before'").fetchone() == ("before",)
        with raw_session(proxy, terminal_pki, terminal_pki.cashier) as client:
            # Only the header: the proxy must refuse on the length word, not wait for 100 MiB.
            client.send(b"Q" + struct.pack("!I", 100 * 2**20))
            fields = client.expect_fatal("08P01")
            source = client.source
        assert "invalid message length" in fields["M"]
        assert before.execute("SELECT 'during'").fetchone() == ("during",)
    with psycopg_session(proxy, terminal_pki, terminal_pki.cashier) as after:
        assert after.execute("SELECT 'after'").fetchone() == ("after",)
    logged = proxy.wait_for_event("session_error", source=source, sqlstate="08P01")
    assert logged["terminal"] == "till-01"


def test_message_length_below_minimum_is_a_protocol_violation(
    proxy: ProxyProcess, terminal_pki: TerminalPKI
) -> None:
    with raw_session(proxy, terminal_pki, terminal_pki.cashier) as client:
        client.send(b"Q" + struct.pack("!I", 2))
        fields = client.expect_fatal("08P01")
    assert "invalid message length 2" in fields["M"]


def test_unknown_frontend_message_type_is_a_protocol_violation(
    proxy: ProxyProcess, terminal_pki: TerminalPKI
) -> None:
    with raw_session(proxy, terminal_pki, terminal_pki.cashier) as client:
        client.send(b"!" + struct.pack("!I", 4))
        fields = client.expect_fatal("08P01")
    assert "invalid frontend message type" in fields["M"]


def test_simple_query_works_through_a_raw_client(proxy: ProxyProcess, terminal_pki: TerminalPKI) -> None:
    with raw_session(proxy, terminal_pki, terminal_pki.cashier) as client:
        assert_single_value(run_query(client, "SELECT 'raw ' || 42"), b"raw 42")


def test_messages_split_into_single_byte_writes_still_work(
    proxy: ProxyProcess, terminal_pki: TerminalPKI
) -> None:
    client = tls_client(proxy, terminal_pki, terminal_pki.cashier)
    try:
        client.send_bytewise(m.build_startup_message({"user": "till-01", "database": "pos"}))
        assert_startup_succeeded(client.read_until_ready())
        client.send_bytewise(m.build_query("SELECT 'byte by byte'"))
        assert_single_value(client.read_until_ready(), b"byte by byte")
    finally:
        client.close()


def test_pipelined_queries_in_one_write_get_two_answers(
    proxy: ProxyProcess, terminal_pki: TerminalPKI
) -> None:
    with raw_session(proxy, terminal_pki, terminal_pki.cashier) as client:
        client.send(m.build_query("SELECT 'first'") + m.build_query("SELECT 'second'"))
        first = client.read_until_ready()
        second = client.read_until_ready()
        assert_single_value(first, b"first")
        assert_single_value(second, b"second")
        # And the session is still in step afterwards.
        assert_single_value(run_query(client, "SELECT 'third'"), b"third")


def test_startup_packet_and_query_in_one_write(proxy: ProxyProcess, terminal_pki: TerminalPKI) -> None:
    """Bytes that arrive while the proxy is still acquiring a server connection are not lost."""
    client = tls_client(proxy, terminal_pki, terminal_pki.cashier)
    try:
        client.send(
            m.build_startup_message({"user": "till-01", "database": "pos"}) + m.build_query("SELECT 'eager'")
        )
        assert_startup_succeeded(client.read_until_ready())
        assert_single_value(client.read_until_ready(), b"eager")
    finally:
        client.close()


def test_large_query_below_the_message_limit_passes(proxy: ProxyProcess, terminal_pki: TerminalPKI) -> None:
    filler = "x" * (900 * 1024)  # 1 MiB is the configured max_message_size
    with raw_session(proxy, terminal_pki, terminal_pki.cashier) as client:
        assert_single_value(run_query(client, f"SELECT length('{filler}')"), str(len(filler)).encode())


def test_large_replies_reach_the_client_whole(proxy: ProxyProcess, terminal_pki: TerminalPKI) -> None:
    """A value of several MiB arrives in many reads, kept as a partial message until its last part;
    a long result mixes whole and partial messages in every read. Both come through byte for byte."""
    with psycopg_session(proxy, terminal_pki, terminal_pki.cashier) as connection:
        big = connection.execute("SELECT repeat('ab', 3000000) || 'end'").fetchone()
        assert big == ("ab" * 3_000_000 + "end",)
        rows = connection.execute("SELECT g, md5(g::text) FROM generate_series(1, 50000) AS g").fetchall()
        assert len(rows) == 50_000
        assert rows[-1] == (50_000, hashlib.md5(b"50000").hexdigest())
        assert all(number == index + 1 for index, (number, _digest) in enumerate(rows))


def test_query_just_above_the_message_limit_is_refused(
    proxy: ProxyProcess, terminal_pki: TerminalPKI
) -> None:
    query = m.build_query("SELECT '" + "x" * 2**20 + "'")
    with raw_session(proxy, terminal_pki, terminal_pki.cashier) as client:
        client.send(query[:5])  # the proxy decides on the header alone
        fields = client.expect_fatal("08P01")
    assert f"invalid message length {len(query) - 1}" in fields["M"]


def test_client_vanishing_mid_query_does_not_poison_the_pool(
    proxy: ProxyProcess, terminal_pki: TerminalPKI
) -> None:
    client = tls_client(proxy, terminal_pki, terminal_pki.cashier)
    try:
        assert_startup_succeeded(client.startup("till-01"))
        client.send(m.build_query("SELECT g, repeat('y', 200) FROM generate_series(1, 200000) AS g"))
        assert client.read_message()[0] == b"T"
    finally:
        client.close()  # abruptly, with most of the result still in flight
    proxy.wait_for_event("session_end", source=client.source)
    # More sessions than the pool holds: each would notice a server connection with stale output.
    for index in range(5):
        with psycopg_session(proxy, terminal_pki, terminal_pki.manager) as connection:
            assert connection.execute("SELECT %s::int, 'fresh'", (index,)).fetchone() == (index, "fresh")


# --- timeouts ---


def test_silent_tcp_client_is_dropped_after_the_handshake_timeout(proxy: ProxyProcess) -> None:
    with tcp_connect(proxy) as sock:
        source = "{}:{}".format(*sock.getsockname()[:2])
        elapsed = expect_dropped(sock, timeout=8.0)
    assert CONFIGURED_TIMEOUT - 0.5 <= elapsed < 8.0
    logged = proxy.wait_for_event("handshake_timeout", source=source)
    assert logged["timeout_s"] == CONFIGURED_TIMEOUT


def test_tls_client_without_a_startup_packet_is_dropped_after_the_startup_timeout(
    proxy: ProxyProcess, terminal_pki: TerminalPKI
) -> None:
    client = tls_client(proxy, terminal_pki, terminal_pki.cashier)
    try:
        started = time.monotonic()
        try:
            kind, payload = client.read_message()
        except PeerClosed:
            pass
        else:
            assert kind == b"E", (kind, payload)
            fields = m.parse_error_fields(payload)
            assert (fields.get("S"), fields.get("C")) == ("FATAL", "08P01"), fields
            client.expect_closed()
        elapsed = time.monotonic() - started
    finally:
        client.close()
    assert CONFIGURED_TIMEOUT - 0.5 <= elapsed < 8.0
    proxy.wait_for_event("session_refused", source=client.source, reason="startup timeout")


# --- encryption negotiation ---


def test_gssenc_request_is_declined_and_tls_follows_on_the_same_socket(
    proxy: ProxyProcess, terminal_pki: TerminalPKI
) -> None:
    with raw_session(proxy, terminal_pki, terminal_pki.cashier, gssenc_first=True) as client:
        assert isinstance(client.sock, ssl.SSLSocket)
        assert client.sock.version() in ("TLSv1.2", "TLSv1.3")
        assert_single_value(run_query(client, "SELECT 'after gssenc'"), b"after gssenc")


def test_direct_tls_negotiation_with_alpn(proxy: ProxyProcess, terminal_pki: TerminalPKI) -> None:
    """PostgreSQL 17 ``sslnegotiation=direct``: a TLS ClientHello is the first thing sent."""
    with raw_session(proxy, terminal_pki, terminal_pki.cashier, direct=True) as client:
        assert isinstance(client.sock, ssl.SSLSocket)
        assert client.sock.selected_alpn_protocol() == "postgresql"
        assert_single_value(run_query(client, "SELECT 'direct'"), b"direct")


@pytest.mark.parametrize("alpn", [None, ["http/1.1"]], ids=["no-alpn", "http-alpn"])
def test_direct_tls_without_the_postgresql_alpn_gets_no_session(
    proxy: ProxyProcess, terminal_pki: TerminalPKI, alpn: list[str] | None
) -> None:
    """PostgreSQL 17 refuses direct TLS unless ALPN selected "postgresql" (cross-protocol defence)."""
    context = proxy.ssl_context(terminal_pki.cashier, terminal_pki.ca)
    if alpn is not None:
        context.set_alpn_protocols(alpn)
    sock = tcp_connect(proxy)
    try:
        tls = context.wrap_socket(sock, server_hostname="127.0.0.1")
    except (ssl.SSLError, ConnectionError):
        sock.close()
        return  # refused during the handshake, as PostgreSQL does for a foreign ALPN
    client = RawClient(tls)
    try:
        assert tls.selected_alpn_protocol() is None
        client.send(m.build_startup_message({"user": "till-01", "database": "pos"}))
        try:
            received = client.read_until_ready()
        except PeerClosed:
            received = []
    finally:
        client.close()
    assert b"Z" not in [kind for kind, _ in received], f"direct TLS without ALPN got a session: {received}"


def test_a_tampered_tls_record_ends_the_session_and_is_logged(
    proxy: ProxyProcess, terminal_pki: TerminalPKI
) -> None:
    with raw_session(proxy, terminal_pki, terminal_pki.cashier) as client:
        # An application-data record (TLS 1.3 outer header) whose tag cannot verify.
        os.write(client.sock.fileno(), b"\x17\x03\x03\x00\x20" + os.urandom(32))
        with pytest.raises((ssl.SSLError, ConnectionResetError)):
            client.sock.recv(4096)  # the proxy's alert, or a reset
    logged = proxy.wait_for_event("tls_error", source=client.source, terminal="till-01")
    assert logged["reason"] == "DECRYPTION_FAILED_OR_BAD_RECORD_MAC"
    proxy.wait_for_event("session_end", source=client.source)
    assert_proxy_serves(proxy, terminal_pki)


def test_plaintext_pipelined_after_ssl_request_is_not_accepted(
    proxy: ProxyProcess, terminal_pki: TerminalPKI
) -> None:
    """Bytes sent in the clear behind an SSLRequest must never count as the encrypted startup."""
    with tcp_connect(proxy) as sock:
        source = "{}:{}".format(*sock.getsockname()[:2])
        sock.sendall(m.build_ssl_request() + m.build_startup_message({"user": "till-01", "database": "pos"}))
        assert recv_exactly(sock, 1) == b"S"
        sock.settimeout(IO_TIMEOUT)
        try:
            rest = sock.recv(4096)
        except ConnectionResetError:
            rest = b""
        # At most a TLS alert record (content type 21), never a PostgreSQL message.
        assert rest == b"" or rest[:1] == b"\x15", rest
    proxy.wait_for_event("tls_handshake_failed", source=source)
    assert_proxy_serves(proxy, terminal_pki)


def test_tls_handshake_that_never_starts_is_dropped_after_the_handshake_timeout(
    proxy: ProxyProcess,
) -> None:
    with tcp_connect(proxy) as sock:
        source = "{}:{}".format(*sock.getsockname()[:2])
        sock.sendall(m.build_ssl_request())
        assert recv_exactly(sock, 1) == b"S"
        elapsed = expect_dropped(sock, timeout=8.0)
    assert CONFIGURED_TIMEOUT - 0.5 <= elapsed < 8.0
    proxy.wait_for_event("tls_handshake_failed", source=source)


def test_garbage_instead_of_a_startup_packet_is_dropped(
    proxy: ProxyProcess, terminal_pki: TerminalPKI
) -> None:
    with tcp_connect(proxy) as sock:
        source = "{}:{}".format(*sock.getsockname()[:2])
        sock.sendall(b"GET / HTTP/1.1\r\nHost: till\r\n\r\n")
        expect_dropped(sock, timeout=IO_TIMEOUT)
    logged = proxy.wait_for_event("handshake_protocol_error", source=source)
    assert "invalid startup packet length" in logged["error"]
    assert_proxy_serves(proxy, terminal_pki)


def test_oversized_startup_packet_before_tls_is_dropped(
    proxy: ProxyProcess, terminal_pki: TerminalPKI
) -> None:
    with tcp_connect(proxy) as sock:
        source = "{}:{}".format(*sock.getsockname()[:2])
        sock.sendall(struct.pack("!ii", 20_000, m.PROTOCOL_3_0))
        expect_dropped(sock, timeout=IO_TIMEOUT)
    logged = proxy.wait_for_event("handshake_protocol_error", source=source)
    assert "invalid startup packet length 20000" in logged["error"]
    assert_proxy_serves(proxy, terminal_pki)


def test_oversized_startup_packet_inside_tls_is_a_protocol_violation(
    proxy: ProxyProcess, terminal_pki: TerminalPKI
) -> None:
    client = tls_client(proxy, terminal_pki, terminal_pki.cashier)
    try:
        client.send(struct.pack("!ii", 20_000, m.PROTOCOL_3_0))
        fields = client.expect_fatal("08P01")
    finally:
        client.close()
    assert "invalid startup packet length 20000" in fields["M"]
    assert_proxy_serves(proxy, terminal_pki)


def test_second_ssl_request_inside_tls_is_a_protocol_violation(
    proxy: ProxyProcess, terminal_pki: TerminalPKI
) -> None:
    client = tls_client(proxy, terminal_pki, terminal_pki.cashier)
    try:
        client.send(m.build_ssl_request())
        fields = client.expect_fatal("08P01")
    finally:
        client.close()
    assert "already negotiated" in fields["M"]


# --- identity ---


def test_match_terminal_requires_the_startup_user_to_be_the_terminal_id(
    start_proxy: Callable[..., ProxyProcess], terminal_pki: TerminalPKI
) -> None:
    strict = start_proxy(identity={"user_name": "match-terminal"})
    with raw_session(strict, terminal_pki, terminal_pki.cashier) as client:
        assert_single_value(run_query(client, "SELECT current_user"), b"pos_proxy")
    with psycopg_session(strict, terminal_pki, terminal_pki.cashier) as connection:
        assert connection.execute("SELECT 'matched'").fetchone() == ("matched",)

    client = tls_client(strict, terminal_pki, terminal_pki.cashier)
    try:
        client.send(m.build_startup_message({"user": "office-01", "database": "pos"}))
        fields = client.expect_fatal("28000")
    finally:
        client.close()
    assert "does not match the terminal" in fields["M"]
    logged = strict.wait_for_event("session_refused", source=client.source, sqlstate="28000")
    assert "office-01" in logged["reason"]

    with pytest.raises(psycopg.OperationalError, match="does not match the terminal"):
        psycopg.connect(**strict.conninfo(terminal_pki.cashier, terminal_pki.ca, user="pos_proxy")).close()


# --- many clients at once ---


def test_concurrent_sessions_succeed_alongside_misbehaving_clients(
    proxy: ProxyProcess, terminal_pki: TerminalPKI
) -> None:
    good_sessions = 20
    start = threading.Barrier(good_sessions + 2, timeout=IO_TIMEOUT)

    def good(index: int) -> tuple[int, int]:
        terminal = terminal_pki.cashier if index % 2 else terminal_pki.manager
        start.wait()
        with psycopg_session(proxy, terminal_pki, terminal) as connection:
            row = connection.execute("SELECT %s::int * 2, pg_backend_pid()", (index,)).fetchone()
        assert row is not None
        return index, row[0]

    def oversized() -> str:
        start.wait()
        with raw_session(proxy, terminal_pki, terminal_pki.cashier) as client:
            client.send(b"Q" + struct.pack("!I", 100 * 2**20))
            return client.expect_fatal("08P01")["C"]

    def garbage() -> None:
        start.wait()
        with tcp_connect(proxy) as sock:
            sock.sendall(b"\x00\x00\x00\x03garbage")
            expect_dropped(sock, timeout=IO_TIMEOUT)

    # A silent client squats on a connection the whole time.
    with tcp_connect(proxy), ThreadPoolExecutor(max_workers=good_sessions + 2) as pool:
        results = [pool.submit(good, index) for index in range(good_sessions)]
        misbehaving = pool.submit(oversized)
        dropped = pool.submit(garbage)
        answers = dict(future.result(timeout=30) for future in results)
        assert misbehaving.result(timeout=30) == "08P01"
        dropped.result(timeout=30)
    assert answers == {index: index * 2 for index in range(good_sessions)}
    assert_proxy_serves(proxy, terminal_pki)
