"""The terminals' TLS layer (proxy.tlstransport) on real loopback sockets, under uvloop and asyncio's loop.

The client is an ``ssl.SSLObject`` over its own memory BIOs, driven by hand, so that a test can tell
a close_notify from a bare TCP EOF, send a tampered record, or hold back the end of its handshake.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import functools
import gc
import inspect
import os
import socket
import ssl
import struct
import weakref
from collections.abc import Callable, Coroutine, Iterator
from contextlib import closing, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import pytest
import uvloop

from proxy import certs, tlstransport
from proxy.tlsconfig import POSTGRES_ALPN
from proxy.tlstransport import TLSTransport, accept_tls, connect_tls

pytestmark = pytest.mark.timeout(60)

# Every wait on a peer in these tests is bounded by this.
IO_TIMEOUT = 5.0
BIG = 200 * 1024  # over 64 KiB: many records, and more than one plain read or write


def reset_on_close(sock: socket.socket | Any) -> None:
    """SO_LINGER 0: closing ``sock`` sends a reset (RST) instead of a FIN."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


@dataclass(frozen=True, slots=True)
class PKI:
    ca: Path
    server_cert: Path
    server_key: Path
    terminal: certs.IssuedCert
    foreign: certs.IssuedCert  # a terminal certificate from another CA


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> PKI:
    directory = tmp_path_factory.mktemp("tls-pki")
    ca = certs.init_ca(directory)
    server = certs.issue_server(directory, dns_names=["localhost"], ip_addresses=["127.0.0.1"])
    terminal = certs.issue_terminal(directory, store="store-001", terminal="till-01", role="cashier")
    foreign_directory = directory / "foreign"
    certs.init_ca(foreign_directory, common_name="someone else's CA")
    foreign = certs.issue_terminal(foreign_directory, store="store-001", terminal="till-01", role="cashier")
    return PKI(ca, server.cert_path, server.key_path, terminal, foreign)


def server_context(pki: PKI, verify_mode: ssl.VerifyMode = ssl.CERT_REQUIRED) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(pki.server_cert, pki.server_key)
    context.load_verify_locations(cafile=str(pki.ca))
    context.verify_mode = verify_mode
    context.num_tickets = 0
    context.set_alpn_protocols([POSTGRES_ALPN])
    return context


def client_context(
    pki: PKI, terminal: certs.IssuedCert | None, maximum_version: ssl.TLSVersion | None = None
) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.load_verify_locations(cafile=str(pki.ca))
    if terminal is not None:
        context.load_cert_chain(terminal.cert_path, terminal.key_path)
    if maximum_version is not None:
        context.maximum_version = maximum_version
    context.set_alpn_protocols([POSTGRES_ALPN])
    return context


LOOPS: dict[str, Callable[[], asyncio.AbstractEventLoop]] = {
    "uvloop": uvloop.new_event_loop,
    "asyncio": asyncio.new_event_loop,
}


def on_each_loop(test: Callable[..., Coroutine[Any, Any, None]]) -> Callable[..., None]:
    """Run an async test on a fresh loop of each kind: uvloop, which the proxy runs on, and asyncio's own."""

    @functools.wraps(test)
    def run(loop_factory: Callable[[], asyncio.AbstractEventLoop], **fixtures: Any) -> None:
        unhandled: list[dict[str, Any]] = []
        with asyncio.Runner(loop_factory=loop_factory) as runner:
            runner.get_loop().set_exception_handler(lambda _, context: unhandled.append(context))
            runner.run(asyncio.wait_for(test(**fixtures), 30))
        # Expected network errors end a connection; none reaches the event loop's handler.
        assert unhandled == []

    # What pytest reads to pass fixtures and parameters: the test's own, and the loop.
    loop_parameter = inspect.Parameter("loop_factory", inspect.Parameter.POSITIONAL_OR_KEYWORD)
    run.__signature__ = inspect.signature(test).replace(  # type: ignore[attr-defined]
        parameters=[loop_parameter, *inspect.signature(test).parameters.values()]
    )
    on_each: Callable[..., None] = pytest.mark.parametrize(
        "loop_factory", list(LOOPS.values()), ids=list(LOOPS)
    )(run)
    return on_each


class App(asyncio.Protocol):
    """Records what the TLS layer tells the application."""

    def __init__(self, *, pause_on_data: bool = False) -> None:
        self.transport: TLSTransport | None = None
        self.received = bytearray()
        self.chunks = 0
        self.events: list[str] = []
        self.lost: list[Exception | None] = []
        self._pause_on_data = pause_on_data
        self._changed = asyncio.Event()

    async def until(self, condition: Callable[[], bool], what: str) -> None:
        """Wait (bounded) for the callbacks to bring ``condition`` about."""
        async with asyncio.timeout(IO_TIMEOUT):
            while not condition():
                self._changed.clear()
                await self._changed.wait()
        assert condition(), what

    def _note(self, event: str) -> None:
        self.events.append(event)
        self._changed.set()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, TLSTransport)
        self.transport = transport
        self._note("connection_made")

    def data_received(self, data: bytes) -> None:
        assert "eof_received" not in self.events and not self.lost, "data after the end"
        self.received += data
        self.chunks += 1
        self._changed.set()
        if self._pause_on_data:
            assert self.transport is not None
            self.transport.pause_reading()

    def eof_received(self) -> bool:
        self._note("eof_received")
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost.append(exc)
        self._note("connection_lost")

    def pause_writing(self) -> None:
        self._note("pause_writing")

    def resume_writing(self) -> None:
        self._note("resume_writing")


class Client:
    """A TLS client over a non-blocking loopback socket: every wait is bounded by IO_TIMEOUT."""

    def __init__(self, sock: socket.socket, context: ssl.SSLContext) -> None:
        self.sock = sock
        self.incoming = ssl.MemoryBIO()
        self.outgoing = ssl.MemoryBIO()
        self.tls = context.wrap_bio(self.incoming, self.outgoing, server_hostname="localhost")

    async def handshake(self, *, send_finished: bool = True) -> None:
        """The client's side; with TLS 1.3 its last flight stays unsent unless ``send_finished``."""
        while True:
            try:
                self.tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                await self.send_pending()
                if not await self._receive():
                    raise ConnectionResetError(
                        "the server closed the connection during the handshake"
                    ) from None
        if send_finished:
            await self.send_pending()

    async def send_pending(self) -> None:
        if self.outgoing.pending:
            await self.send_raw(self.outgoing.read())

    async def send_raw(self, data: bytes) -> None:
        await asyncio.wait_for(asyncio.get_running_loop().sock_sendall(self.sock, data), IO_TIMEOUT)

    async def send(self, data: bytes) -> None:
        self.tls.write(data)
        await self.send_pending()

    async def _receive(self) -> bool:
        """More bytes from the server into the incoming BIO; False at TCP EOF."""
        loop = asyncio.get_running_loop()
        data = await asyncio.wait_for(loop.sock_recv(self.sock, 65536), IO_TIMEOUT)
        if not data:
            self.incoming.write_eof()
            return False
        self.incoming.write(data)
        return True

    async def receive(self) -> bytes:
        """Decrypted bytes; b"" at the server's close_notify; ssl.SSLEOFError at a TCP EOF without it."""
        while True:
            try:
                return self.tls.read(65536)
            except ssl.SSLWantReadError:
                await self.send_pending()
                await self._receive()
            except ssl.SSLZeroReturnError:
                return b""

    async def receive_exactly(self, size: int) -> bytes:
        received = bytearray()
        while len(received) < size:
            chunk = await self.receive()
            assert chunk, f"the server closed after {len(received)} of {size} bytes"
            received += chunk
        return bytes(received)

    async def close_notify(self) -> None:
        with suppress(ssl.SSLWantReadError):
            self.tls.unwrap()
        await self.send_pending()

    async def raw_end_of_stream(self) -> bytes:
        """Everything the server sends until its TCP EOF, undecrypted."""
        loop = asyncio.get_running_loop()
        received = bytearray()
        while chunk := await asyncio.wait_for(loop.sock_recv(self.sock, 65536), IO_TIMEOUT):
            received += chunk
        return bytes(received)


@dataclass
class Connection:
    client: Client
    server_sock: socket.socket
    app: App


@dataclass
class Handshake(Connection):
    """A connection whose server side is in accept_tls."""

    accepting: asyncio.Task[TLSTransport]

    async def expect_closed_without_a_session(self) -> None:
        """connection_made never came, and the server's socket is closed: the client reads TCP EOF."""
        assert self.app.events == []
        assert await self.client.raw_end_of_stream() == b""
        assert self.server_sock.fileno() == -1


class Established(NamedTuple):
    client: Client
    transport: TLSTransport
    app: App


@pytest.fixture
def listener() -> Iterator[socket.socket]:
    with closing(socket.create_server(("127.0.0.1", 0))) as sock:
        sock.setblocking(False)
        yield sock


async def open_connection(listener: socket.socket, context: ssl.SSLContext, app: App) -> Connection:
    loop = asyncio.get_running_loop()
    sock = socket.socket()
    sock.setblocking(False)
    await asyncio.wait_for(loop.sock_connect(sock, listener.getsockname()), IO_TIMEOUT)
    server_sock, _ = await asyncio.wait_for(loop.sock_accept(listener), IO_TIMEOUT)
    return Connection(Client(sock, context), server_sock, app)


async def start_handshake(
    listener: socket.socket,
    pki: PKI,
    app: App | None = None,
    *,
    client: ssl.SSLContext | None = None,
    verify_mode: ssl.VerifyMode = ssl.CERT_REQUIRED,
    handshake_timeout: float = IO_TIMEOUT,
) -> Handshake:
    """A connection from a client (by default the PKI's terminal) with accept_tls running on it."""
    connection = await open_connection(listener, client or client_context(pki, pki.terminal), app or App())
    accepting = asyncio.ensure_future(
        accept(connection, pki, verify_mode=verify_mode, handshake_timeout=handshake_timeout)
    )
    return Handshake(connection.client, connection.server_sock, connection.app, accepting)


async def accept(
    connection: Connection,
    pki: PKI,
    *,
    verify_mode: ssl.VerifyMode = ssl.CERT_REQUIRED,
    handshake_timeout: float = IO_TIMEOUT,
) -> TLSTransport:
    """accept_tls on the server side of ``connection``, as server.py runs it (shorter timeouts)."""
    return await accept_tls(
        connection.server_sock,
        connection.app,
        server_context(pki, verify_mode),
        handshake_timeout=handshake_timeout,
        shutdown_timeout=1.0,
    )


async def open_with_room(listener: socket.socket, pki: PKI, app: App) -> Connection:
    """A terminal's connection whose socket buffers hold a burst sent right behind its Finished."""
    connection = await open_connection(listener, client_context(pki, pki.terminal), app)
    connection.client.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
    connection.server_sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    return connection


async def establish(
    listener: socket.socket, pki: PKI, app: App | None = None, *, client: ssl.SSLContext | None = None
) -> Established:
    handshake = await start_handshake(listener, pki, app, client=client)
    await handshake.client.handshake()
    transport = await asyncio.wait_for(handshake.accepting, IO_TIMEOUT)
    return Established(handshake.client, transport, handshake.app)


# --- handshake ---


@on_each_loop
async def test_a_terminal_with_a_certificate_gets_a_transport_that_reports_the_tls_session(
    listener: socket.socket, pki: PKI
) -> None:
    client, transport, app = await establish(listener, pki)
    assert app.events == ["connection_made"]
    assert app.transport is transport
    ssl_object = transport.get_extra_info("ssl_object")
    assert isinstance(ssl_object, ssl.SSLSocket)
    assert ssl_object.getpeercert(binary_form=True) == ssl.PEM_cert_to_DER_cert(
        pki.terminal.cert_path.read_text()
    )
    assert ssl_object.selected_alpn_protocol() == POSTGRES_ALPN
    assert ssl_object.version() == "TLSv1.3"
    assert transport.get_extra_info("cipher") == ssl_object.cipher()
    assert dict(transport.get_extra_info("peercert")["subject"][0])  # decoded on request
    assert isinstance(transport.get_extra_info("sslcontext"), ssl.SSLContext)
    assert transport.get_extra_info("peername") == client.sock.getsockname()
    assert transport.get_extra_info("sockname") == client.sock.getpeername()
    assert transport.get_extra_info("socket").fileno() >= 0
    assert transport.get_extra_info("no such thing", "default") == "default"
    assert not transport.is_closing() and transport.is_reading()
    assert not transport.can_write_eof()
    assert transport.get_protocol() is app
    transport.close()


@pytest.mark.parametrize(
    "version", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3], ids=["TLSv1.2", "TLSv1.3"]
)
@on_each_loop
async def test_messages_over_64_kib_cross_intact_both_ways(
    listener: socket.socket, pki: PKI, version: ssl.TLSVersion
) -> None:
    client_tls = client_context(pki, pki.terminal, maximum_version=version)
    client, transport, app = await establish(listener, pki, client=client_tls)
    assert transport.get_extra_info("ssl_object").version() == version.name.replace("v1_", "v1.")
    upload, download = os.urandom(BIG), os.urandom(BIG)
    await client.send(upload)
    await app.until(lambda: len(app.received) >= BIG, "the whole upload")
    assert app.received == upload
    transport.write(download)
    assert await client.receive_exactly(BIG) == download
    transport.close()


@pytest.mark.parametrize("size", [14, 600_000])
@on_each_loop
async def test_the_first_message_sent_with_the_clients_finished_arrives_after_connection_made(
    listener: socket.socket, pki: PKI, size: int
) -> None:
    # Also when it fills more than one read of the event loop's buffer in the same loop pass: the
    # task awaiting the handshake may still turn the terminal away (a revoked certificate).
    app = App()
    connection = await open_with_room(listener, pki, app)
    first = bytes(range(256)) * (size // 256) + b"x" * (size % 256)

    async def accept_and_look() -> tuple[TLSTransport, bytes]:
        transport = await accept(connection, pki)
        return transport, bytes(app.received)

    accepting = asyncio.ensure_future(accept_and_look())
    await connection.client.handshake(send_finished=False)
    connection.client.tls.write(first)
    await connection.client.send_pending()  # Finished and the first records in one send
    transport, seen_on_return = await asyncio.wait_for(accepting, IO_TIMEOUT)
    assert seen_on_return == b""  # the task awaiting the handshake ran first
    await app.until(lambda: app.received == first, "the first message")
    transport.close()


class FailingApp(App):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        raise ValueError("the application could not start")


@on_each_loop
async def test_an_application_that_fails_to_start_fails_the_accept_instead_of_hanging_it(
    listener: socket.socket, pki: PKI
) -> None:
    handshake = await start_handshake(listener, pki, FailingApp())
    await handshake.client.handshake()
    with pytest.raises(ValueError, match="could not start"):
        await asyncio.wait_for(handshake.accepting, IO_TIMEOUT)
    await handshake.app.until(lambda: len(handshake.app.lost) == 1, "connection_lost")
    assert isinstance(handshake.app.lost[0], ValueError)


@dataclass(frozen=True, slots=True)
class Refusal:
    terminal: str | None  # the PKI's certificate the client presents
    verify_mode: ssl.VerifyMode
    error: type[ssl.SSLError]  # what accept_tls raises,
    why: str  # with this reason or verify message,
    alert: str  # and what the alert tells the client


@pytest.mark.parametrize(
    "refusal",
    [
        Refusal(
            None, ssl.CERT_REQUIRED, ssl.SSLError, "PEER_DID_NOT_RETURN_A_CERTIFICATE", "CERTIFICATE_REQUIRED"
        ),
        Refusal(
            "foreign",
            ssl.CERT_OPTIONAL,
            ssl.SSLCertVerificationError,
            "unable to get local issuer certificate",
            "UNKNOWN_CA",
        ),
    ],
    ids=["no certificate", "another CA"],
)
@on_each_loop
async def test_a_refused_terminal_gets_an_alert_and_the_server_the_reason(
    listener: socket.socket, pki: PKI, refusal: Refusal
) -> None:
    terminal = getattr(pki, refusal.terminal) if refusal.terminal is not None else None
    handshake = await start_handshake(
        listener, pki, client=client_context(pki, terminal), verify_mode=refusal.verify_mode
    )
    await handshake.client.handshake()  # TLS 1.3: the client is done before the server decides
    with pytest.raises(refusal.error) as refused:
        await asyncio.wait_for(handshake.accepting, IO_TIMEOUT)
    error = refused.value
    # As server.py reads it for its log line and audit record.
    assert (
        error.verify_message if isinstance(error, ssl.SSLCertVerificationError) else error.reason
    ) == refusal.why
    with pytest.raises(ssl.SSLError, match=refusal.alert):
        await handshake.client.receive()  # the alert came before the close
    await handshake.expect_closed_without_a_session()


@on_each_loop
async def test_a_handshake_that_does_not_finish_in_time_raises_timeout_error(
    listener: socket.socket, pki: PKI
) -> None:
    loop = asyncio.get_running_loop()
    started = loop.time()
    handshake = await start_handshake(listener, pki, handshake_timeout=0.3)
    with pytest.raises(TimeoutError, match=r"within 0\.3s"):
        await handshake.accepting
    assert 0.25 <= loop.time() - started < IO_TIMEOUT
    await handshake.expect_closed_without_a_session()


@on_each_loop
async def test_a_peer_that_leaves_during_the_handshake_raises_connection_error(
    listener: socket.socket, pki: PKI
) -> None:
    handshake = await start_handshake(listener, pki)
    with suppress(ssl.SSLWantReadError):
        handshake.client.tls.do_handshake()
    hello = handshake.client.outgoing.read()
    await handshake.client.send_raw(hello[: len(hello) // 2])
    handshake.client.sock.close()
    with pytest.raises(ConnectionError):
        await asyncio.wait_for(handshake.accepting, IO_TIMEOUT)
    assert handshake.app.events == []
    await asyncio.sleep(0.05)  # the event loop closes the socket in a callback of its own
    assert handshake.server_sock.fileno() == -1


@on_each_loop
async def test_cancelling_the_handshake_closes_the_socket(listener: socket.socket, pki: PKI) -> None:
    handshake = await start_handshake(listener, pki)
    await asyncio.sleep(0.05)
    handshake.accepting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await handshake.accepting
    await handshake.expect_closed_without_a_session()


# --- reading ---


@on_each_loop
async def test_paused_reading_holds_data_and_resuming_delivers_it_in_order(
    listener: socket.socket, pki: PKI
) -> None:
    client, transport, app = await establish(listener, pki, App(pause_on_data=True))
    messages = [bytes([index]) * 1000 for index in range(50)]
    await client.send(messages[0])
    await app.until(lambda: app.chunks == 1, "the first message")
    assert not transport.is_reading()
    for message in messages[1:]:
        await client.send(message)  # a record each, read by the plain transport as they come
    await asyncio.sleep(0.2)
    assert app.chunks == 1, "data delivered while paused"
    # Each resume delivers what comes next (at least one record), and the application pauses again.
    for chunks in range(2, len(messages) + 1):
        transport.resume_reading()
        await app.until(lambda: app.chunks == chunks, "the held data after resume_reading")  # noqa: B023
        await asyncio.sleep(0.01)
        assert app.chunks == chunks, "data delivered while paused again"
        if len(app.received) == 1000 * len(messages):
            break
    assert app.received == b"".join(messages)
    await client.send(b"after")
    transport.resume_reading()
    await app.until(lambda: app.received.endswith(b"after"), "data sent after the resume")
    transport.close()


@on_each_loop
async def test_the_peers_close_notify_is_eof_received_then_connection_lost(
    listener: socket.socket, pki: PKI
) -> None:
    client, transport, app = await establish(listener, pki)
    await client.send(b"last words")
    await client.close_notify()
    await app.until(lambda: app.lost == [None], "connection_lost")
    assert app.received == b"last words"
    assert app.events == ["connection_made", "eof_received", "connection_lost"]
    assert await client.receive() == b""  # the server's close_notify in answer
    assert transport.is_closing()


@on_each_loop
async def test_a_tcp_eof_without_close_notify_is_eof_received_then_connection_lost(
    listener: socket.socket, pki: PKI
) -> None:
    client, _, app = await establish(listener, pki)
    await client.send(b"last words")
    client.sock.shutdown(socket.SHUT_WR)
    await app.until(lambda: app.lost == [None], "connection_lost")
    assert app.received == b"last words"
    assert app.events == ["connection_made", "eof_received", "connection_lost"]


@on_each_loop
async def test_records_held_while_paused_come_before_the_eof(listener: socket.socket, pki: PKI) -> None:
    client, transport, app = await establish(listener, pki)
    transport.pause_reading()
    await client.send(b"held")
    client.sock.shutdown(socket.SHUT_WR)
    await asyncio.sleep(0.2)
    assert app.events == ["connection_made"] and app.received == b""
    transport.resume_reading()
    await app.until(lambda: app.lost == [None], "connection_lost")
    assert app.received == b"held"
    assert app.events == ["connection_made", "eof_received", "connection_lost"]


@on_each_loop
async def test_a_tampered_record_after_the_handshake_ends_the_connection_with_an_ssl_error(
    listener: socket.socket, pki: PKI
) -> None:
    client, _, app = await establish(listener, pki)
    client.tls.write(b"SELECT 1")
    record = bytearray(client.outgoing.read())
    record[-1] ^= 0x01  # the AEAD tag no longer matches
    await client.send_raw(bytes(record))
    await app.until(lambda: len(app.lost) == 1, "connection_lost")
    assert isinstance(app.lost[0], ssl.SSLError)
    assert app.lost[0].reason == "DECRYPTION_FAILED_OR_BAD_RECORD_MAC"
    assert app.received == b""
    assert app.events == ["connection_made", "connection_lost"]
    with pytest.raises(ssl.SSLError, match="BAD_RECORD_MAC"):
        await client.receive()  # told why by an alert


# --- writing and closing ---


@on_each_loop
async def test_writes_to_a_peer_that_does_not_read_are_buffered_with_flow_control(
    listener: socket.socket, pki: PKI
) -> None:
    client, transport, app = await establish(listener, pki)
    assert transport.get_write_buffer_limits() == (16 * 1024, 64 * 1024)  # asyncio's defaults
    transport.set_write_buffer_limits(high=128 * 1024)
    assert transport.get_write_buffer_limits() == (32 * 1024, 128 * 1024)
    transport.set_write_buffer_limits(high=64 * 1024, low=16 * 1024)
    sent = bytearray()
    for _ in range(400):  # more than the kernel's socket buffers take: the client is not reading
        chunk = os.urandom(16 * 1024)
        transport.write(chunk)
        sent += chunk
        if "pause_writing" in app.events:
            break
    assert app.events == ["connection_made", "pause_writing"]
    assert transport.get_write_buffer_size() > 64 * 1024
    assert await client.receive_exactly(len(sent)) == sent
    await app.until(lambda: "resume_writing" in app.events, "resume_writing")
    assert transport.get_write_buffer_size() == 0
    transport.close()


@on_each_loop
async def test_close_sends_close_notify_after_what_was_written(listener: socket.socket, pki: PKI) -> None:
    client, transport, app = await establish(listener, pki)
    transport.write(b"goodbye")
    transport.close()
    assert transport.is_closing()
    transport.write(b"dropped")  # after close: ignored, as asyncio's transports do
    transport.close()
    assert await client.receive_exactly(7) == b"goodbye"
    assert await client.receive() == b""  # close_notify, not a bare TCP EOF
    assert await client.raw_end_of_stream() == b""
    await app.until(lambda: app.lost == [None], "connection_lost")
    assert app.events == ["connection_made", "connection_lost"]


def write_until(transport: TLSTransport, done: Callable[[], bool]) -> bytes:
    """Write random 32 KiB pieces to a peer that does not read until ``done()``; return them all."""
    written = bytearray()
    for _ in range(2048):  # 64 MiB at most; the kernel's buffers take a few
        if done():
            return bytes(written)
        piece = os.urandom(32 * 1024)
        transport.write(piece)
        written += piece
    raise AssertionError("the peer's socket never filled up")


@on_each_loop
async def test_a_close_to_a_peer_that_does_not_read_ends_after_the_shutdown_timeout(
    listener: socket.socket, pki: PKI
) -> None:
    _, transport, app = await establish(listener, pki)
    write_until(transport, lambda: "pause_writing" in app.events)
    loop = asyncio.get_running_loop()
    closed_at = loop.time()
    transport.close()
    await app.until(lambda: len(app.lost) == 1, "connection_lost after the shutdown timeout")
    assert loop.time() - closed_at >= 0.9  # shutdown_timeout=1.0, not at once
    assert app.events[-1] == "connection_lost"


@on_each_loop
async def test_abort_ends_the_connection_without_close_notify(listener: socket.socket, pki: PKI) -> None:
    client, transport, app = await establish(listener, pki)
    transport.abort()
    transport.abort()
    transport.close()
    assert transport.is_closing()
    with pytest.raises((ssl.SSLEOFError, ConnectionResetError)):
        await client.receive()
    await app.until(lambda: app.lost == [None], "connection_lost")
    await asyncio.sleep(0.05)
    assert app.events == ["connection_made", "connection_lost"]


@on_each_loop
async def test_a_peer_that_resets_the_connection_is_connection_lost_once(
    listener: socket.socket, pki: PKI
) -> None:
    client, transport, app = await establish(listener, pki)
    reset_on_close(client.sock)
    client.sock.close()  # linger 0: RST
    await app.until(lambda: len(app.lost) == 1, "connection_lost")
    transport.write(b"too late")
    transport.close()
    await asyncio.sleep(0.05)
    assert app.events.count("connection_lost") == 1


@on_each_loop
async def test_a_lost_connection_is_freed_without_the_garbage_collector(
    listener: socket.socket, pki: PKI
) -> None:
    """No reference cycle through the TLS layer: a closed session's OpenSSL state goes with it."""

    async def close_one() -> weakref.ref[App]:
        established = await establish(listener, pki)
        app = established.app
        established.transport.close()
        await app.until(lambda: app.lost == [None], "connection_lost")
        await asyncio.sleep(0.05)  # the event loop lets go of its own references
        return weakref.ref(app)

    gc.disable()
    try:
        gone = await close_one()
        assert gone() is None
    finally:
        gc.enable()


@on_each_loop
async def test_small_writes_buffered_behind_a_full_socket_arrive_in_order_then_close_notify(
    listener: socket.socket, pki: PKI
) -> None:
    client, transport, app = await establish(listener, pki)
    # The kernel's buffers full, ours in use.
    write_until(transport, lambda: transport.get_write_buffer_size() > 0)
    held = transport.get_write_buffer_size()
    messages = [b"%06d;" % index for index in range(20_000)]  # 140 KB of small writes, in the buffer
    for message in messages:
        transport.write(bytearray(message))  # copied: the caller may reuse a bytearray
    assert transport.get_write_buffer_size() == held + sum(map(len, messages))
    assert app.events == ["connection_made", "pause_writing"]
    transport.close()  # after what waits
    received = bytearray()
    while (chunk := await client.receive()) != b"":
        received += chunk
    assert received.endswith(b"".join(messages))
    await app.until(lambda: app.lost == [None], "connection_lost")
    assert app.events == ["connection_made", "pause_writing", "resume_writing", "connection_lost"]


@on_each_loop
async def test_a_write_of_several_mib_arrives_intact(listener: socket.socket, pki: PKI) -> None:
    client, transport, app = await establish(listener, pki)
    big = os.urandom(6 * 1024 * 1024 + 123)
    transport.write(memoryview(big))
    assert transport.get_write_buffer_size() > 0  # more than the kernel takes at once
    assert await client.receive_exactly(len(big)) == big
    await app.until(lambda: transport.get_write_buffer_size() == 0, "the buffer drained")
    transport.write(b"and after")
    assert await client.receive_exactly(9) == b"and after"
    transport.close()


class PausesOnce(App):
    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self.chunks == 1:
            assert self.transport is not None
            self.transport.pause_reading()


@on_each_loop
async def test_resuming_delivers_what_openssl_decrypted_before_the_pause(
    listener: socket.socket, pki: PKI, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Reads smaller than a record, and a budget of one read per event: the rest of the record is
    # decrypted inside OpenSSL, and no readable event will come for it.
    monkeypatch.setattr(tlstransport, "READ_SIZE", 100)
    monkeypatch.setattr(tlstransport, "READ_BUDGET", 100)
    client, transport, app = await establish(listener, pki, PausesOnce())
    message = os.urandom(1000)
    await client.send(message)  # one record
    await app.until(lambda: app.chunks == 1, "the first read")
    assert app.received == message[:100]
    await asyncio.sleep(0.1)
    assert app.chunks == 1, "data delivered while paused"
    transport.resume_reading()
    assert app.chunks == 1, "delivered from inside resume_reading"
    await app.until(lambda: len(app.received) == len(message), "the rest of the record")
    assert app.received == message
    transport.close()


@on_each_loop
async def test_a_peer_that_resets_during_a_buffered_write_is_connection_lost_with_the_error(
    listener: socket.socket, pki: PKI
) -> None:
    client, transport, app = await establish(listener, pki)
    write_until(transport, lambda: "pause_writing" in app.events)
    reset_on_close(client.sock)
    client.sock.close()  # linger 0: RST, with the server's records unread
    await app.until(lambda: len(app.lost) == 1, "connection_lost")
    assert isinstance(app.lost[0], OSError)
    assert transport.is_closing() and transport.get_write_buffer_size() == 0
    transport.write(b"too late")
    transport.close()
    await asyncio.sleep(0.05)
    assert app.events.count("connection_lost") == 1


# --- a TCP EOF with writes waiting, a reset before the handshake, a KeyUpdate, a terminal turned away ---

_SSL_KEY_UPDATE_REQUESTED = 1


def _libssl() -> ctypes.CDLL:
    lib = ctypes.CDLL(ctypes.util.find_library("ssl") or "libssl.so.3")
    lib.SSL_key_update.argtypes = [ctypes.c_void_p, ctypes.c_int]
    lib.SSL_key_update.restype = ctypes.c_int
    return lib


def _ssl_pointer(sslobj: ssl.SSLObject) -> int:
    """The SSL* of an ssl.SSLObject (CPython 3.11's PySSLSocket: PyObject_HEAD, Socket, ssl)."""
    inner = sslobj._sslobj  # type: ignore[attr-defined]
    pointer = ctypes.c_void_p.from_address(
        id(inner) + 2 * ctypes.sizeof(ctypes.c_void_p) + ctypes.sizeof(ctypes.c_ssize_t)
    ).value
    assert pointer
    return pointer


def _request_key_update(sslobj: ssl.SSLObject) -> None:
    """A TLS 1.3 KeyUpdate with update_requested, as JSSE sends after its key limit (jdk.tls.keyLimits)."""
    assert _libssl().SSL_key_update(_ssl_pointer(sslobj), _SSL_KEY_UPDATE_REQUESTED) == 1
    sslobj.do_handshake()  # writes the KeyUpdate into the outgoing BIO


@on_each_loop
async def test_a_key_update_while_a_write_waits_for_the_socket_keeps_the_connection(
    listener: socket.socket,
    pki: PKI,
) -> None:
    """The memory-BIO layer never had a write pending inside OpenSSL; this one has one whenever the
    terminal reads slower than the proxy writes. A KeyUpdate (update_requested) from the terminal
    then makes SSL_read write the answer while an application-data record is half sent."""
    client, transport, app = await establish(listener, pki)
    # The socket full, a record half sent.
    sent = write_until(transport, lambda: transport.get_write_buffer_size() > 0)
    _request_key_update(client.tls)
    await client.send_pending()
    await asyncio.sleep(0.2)  # the server reads the KeyUpdate
    assert app.lost == [], f"the connection was lost: {app.lost!r}"
    assert await client.receive_exactly(len(sent)) == sent
    transport.write(b"after")
    assert await client.receive_exactly(5) == b"after"
    transport.close()


@pytest.mark.parametrize(
    "version", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3], ids=["TLSv1.2", "TLSv1.3"]
)
@pytest.mark.parametrize("ending", ["close_notify", "tcp_eof"])
@on_each_loop
async def test_what_waits_to_be_sent_goes_out_before_close_notify_when_the_peer_ends_its_side(
    listener: socket.socket,
    pki: PKI,
    version: ssl.TLSVersion,
    ending: str,
) -> None:
    """When the terminal ends its side while a result is still being sent, the result goes out, then
    close_notify, and connection_lost(None). The memory-BIO layer never fed a TCP EOF to OpenSSL; on
    its own socket OpenSSL 3 makes it a fatal error (UNEXPECTED_EOF_WHILE_READING) before close() has
    flushed: what waited is dropped, no close_notify, and connection_lost gets an SSLEOFError (which
    session.connection_lost logs as "tls_error", tampering or a broken TLS stack)."""
    client, transport, app = await establish(
        listener, pki, client=client_context(pki, pki.terminal, maximum_version=version)
    )
    sent = write_until(transport, lambda: transport.get_write_buffer_size() > 0)
    if ending == "close_notify":
        await client.close_notify()
    else:
        client.sock.shutdown(socket.SHUT_WR)
    await app.until(lambda: "eof_received" in app.events, "eof_received")
    received = bytearray()
    try:
        while chunk := await client.receive():
            received += chunk
    except ssl.SSLError as exc:
        pytest.fail(f"the client got {len(received)} of {len(sent)} bytes, then {exc!r}")
    assert received == sent  # and then the server's close_notify (receive() returned b"")
    await app.until(lambda: len(app.lost) == 1, "connection_lost")
    assert app.lost == [None]


@pytest.mark.parametrize("seen", [False, True], ids=["reset", "reset already seen by a peek"])
@on_each_loop
async def test_a_connection_reset_before_the_handshake_raises_connection_error_and_closes_the_socket(
    listener: socket.socket,
    pki: PKI,
    seen: bool,
) -> None:
    """wrap_socket on a reset socket: SSLSocket._create raises from its recv(1) (after sock.detach(),
    so nothing closes the new SSLSocket but its deallocation), or, if the reset was already reported
    to an earlier call, makes an SSLSocket without an SSL object (_sslobj None): AttributeError."""
    connection = await open_connection(listener, client_context(pki, pki.terminal), App())
    reset_on_close(connection.client.sock)
    connection.client.sock.close()  # linger 0: RST
    await asyncio.sleep(0.05)
    server_sock = connection.server_sock
    if seen:
        with pytest.raises(ConnectionResetError):
            server_sock.recv(1, socket.MSG_PEEK)
    fd = server_sock.fileno()
    with pytest.raises(ConnectionError) as raised:
        await accept(connection, pki)
    assert raised.value is not None  # its traceback keeps the frames (and their sockets) alive
    with pytest.raises(OSError):
        os.fstat(fd)  # closed by accept_tls, not left to the garbage collector
    assert connection.app.events == []


@pytest.mark.parametrize("size", [14, 600_000])
@on_each_loop
async def test_a_terminal_turned_away_by_the_awaiting_task_never_has_its_first_records_delivered(
    listener: socket.socket,
    pki: PKI,
    size: int,
) -> None:
    """As server.py does for a certificate revoked under a kept expired CRL: the task awaiting
    accept_tls closes the session; records sent with the client's Finished must never reach it."""
    app = App()
    connection = await open_with_room(listener, pki, app)

    async def accept_and_turn_away() -> None:
        transport = await accept(connection, pki)
        transport.write(b"refused")
        transport.close()

    accepting = asyncio.ensure_future(accept_and_turn_away())
    await connection.client.handshake(send_finished=False)
    connection.client.tls.write(os.urandom(size))
    await connection.client.send_pending()  # Finished and the first records together
    await asyncio.wait_for(accepting, IO_TIMEOUT)
    await app.until(lambda: len(app.lost) == 1, "connection_lost")
    await asyncio.sleep(0.05)
    assert app.received == b""
    assert app.events == ["connection_made", "connection_lost"]


# --- the client side: connect_tls, as the proxy connects to its database servers ---


async def connect_both_ends(
    listener: socket.socket, pki: PKI, server_hostname: str
) -> tuple[asyncio.Task[TLSTransport], asyncio.Task[TLSTransport], App, App]:
    """connect_tls and accept_tls on the two ends of one TCP connection (the server asks for no
    client certificate, as PostgreSQL here)."""
    connection = await open_connection(listener, client_context(pki, None), App())
    client_app = App()
    connecting = asyncio.ensure_future(
        connect_tls(
            connection.client.sock,
            client_app,
            client_context(pki, None),
            server_hostname=server_hostname,
            handshake_timeout=IO_TIMEOUT,
            shutdown_timeout=1.0,
        )
    )
    accepting = asyncio.ensure_future(accept(connection, pki, verify_mode=ssl.CERT_NONE))
    return connecting, accepting, client_app, connection.app


@on_each_loop
async def test_connect_tls_checks_the_server_name_and_carries_data_both_ways(
    listener: socket.socket, pki: PKI
) -> None:
    connecting, accepting, client_app, server_app = await connect_both_ends(listener, pki, "localhost")
    client, server = await asyncio.wait_for(asyncio.gather(connecting, accepting), IO_TIMEOUT)
    assert client.get_extra_info("peercert")["subjectAltName"][0] == ("DNS", "localhost")
    upload, download = os.urandom(BIG), os.urandom(BIG)
    client.write(upload)
    server.write(download)
    await server_app.until(lambda: len(server_app.received) >= BIG, "the whole upload")
    await client_app.until(lambda: len(client_app.received) >= BIG, "the whole download")
    assert (server_app.received, client_app.received) == (upload, download)
    client.close()
    await server_app.until(lambda: server_app.lost, "the close")
    assert server_app.events[-2:] == ["eof_received", "connection_lost"]


@on_each_loop
async def test_connect_tls_to_a_server_of_another_name_fails_verification(
    listener: socket.socket, pki: PKI
) -> None:
    connecting, accepting, client_app, _server_app = await connect_both_ends(listener, pki, "db.example")
    with pytest.raises(ssl.SSLCertVerificationError, match="Hostname mismatch"):
        await asyncio.wait_for(connecting, IO_TIMEOUT)
    with pytest.raises((ssl.SSLError, ConnectionError)):  # the client's alert, or its closed socket
        await asyncio.wait_for(accepting, IO_TIMEOUT)
    assert client_app.events == []


@pytest.mark.parametrize("read_budget", [tlstransport.READ_BUDGET, 100], ids=["budget", "a record an event"])
@pytest.mark.parametrize("records", [1, 3])
@on_each_loop
async def test_records_and_a_reset_that_arrive_together_are_all_delivered_then_connection_lost(
    listener: socket.socket, pki: PKI, monkeypatch: pytest.MonkeyPatch, records: int, read_budget: int
) -> None:
    """A database server's FATAL with a reset right behind it, both on the socket before the proxy's
    event loop looks: a backend ended (pg_terminate_backend, a fast shutdown) with the proxy's next
    message unread in its socket, while the proxy was busy. libuv reports a socket error to uvloop's
    reader once and then stops watching the socket: the reader took the FATAL, stopped at its short
    record as a level-triggered watch allows, and was never called again; the session hung."""
    monkeypatch.setattr(tlstransport, "READ_BUDGET", read_budget)
    connecting, accepting, proxy_app, _server_app = await connect_both_ends(listener, pki, "localhost")
    _, server = await asyncio.wait_for(asyncio.gather(connecting, accepting), IO_TIMEOUT)
    await asyncio.sleep(0.05)  # both ends reading
    messages = [bytes([index]) * 200 for index in range(records)]
    reset_on_close(server.get_extra_info("socket"))
    for message in messages:
        server.write(message)  # a record each, sent at once
    server.abort()  # the reset, in the same pass of the event loop
    await proxy_app.until(lambda: bool(proxy_app.lost), "connection_lost")
    assert proxy_app.received == b"".join(messages)
    await asyncio.sleep(0.05)
    assert proxy_app.events.count("connection_lost") == 1


@on_each_loop
async def test_records_before_a_reset_reach_an_application_that_pauses_after_each(
    listener: socket.socket, pki: PKI, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Once the reset is seen, what is left on the socket is read on resume without a readable event."""
    monkeypatch.setattr(tlstransport, "READ_BUDGET", 100)
    connection = await open_connection(listener, client_context(pki, None), App())
    proxy_app = App(pause_on_data=True)
    connecting = connect_tls(
        connection.client.sock,
        proxy_app,
        client_context(pki, None),
        server_hostname="localhost",
        handshake_timeout=IO_TIMEOUT,
        shutdown_timeout=1.0,
    )
    accepting = accept(connection, pki, verify_mode=ssl.CERT_NONE)
    proxy_side, server = await asyncio.wait_for(asyncio.gather(connecting, accepting), IO_TIMEOUT)
    await asyncio.sleep(0.05)
    messages = [bytes([index]) * 200 for index in range(3)]
    reset_on_close(server.get_extra_info("socket"))
    for message in messages:
        server.write(message)
    server.abort()
    for chunks in range(1, len(messages) + 1):
        await proxy_app.until(lambda: proxy_app.chunks == chunks, "the next record")  # noqa: B023
        await asyncio.sleep(0.02)
        assert proxy_app.chunks == chunks, "data delivered while paused"
        proxy_side.resume_reading()
    await proxy_app.until(lambda: bool(proxy_app.lost), "connection_lost")
    assert proxy_app.received == b"".join(messages)
