"""Server-side TLS for terminal connections: OpenSSL through memory BIOs over a plain event-loop transport.

uvloop's TLS layer (``connect_accepted_socket(..., ssl=)``) gives every connection a 256 KiB read
buffer, whose first pages stay resident once a handshake has been read into them, and a dozen
objects more; this layer keeps an ``ssl.SSLObject``, its two ``ssl.MemoryBIO`` and two small objects
(docs/performance.md, "Idle memory without uvloop's TLS layer"). Upstream connections keep uvloop's TLS.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
from typing import Any

# RFC 8446 5.1 (RFC 5246 6.2.1 for TLS 1.2): a record carries at most 2**14 bytes of plaintext, and
# OpenSSL's SSL_read returns at most one record. Reading that much takes a whole record every time,
# so the incoming BIO alone says whether more are waiting (a smaller read could leave part of a
# record decrypted inside OpenSSL, unseen). The buffer lives only during the call: CPython shrinks it
# to the record's size. bench/tls_read_cost.py measured 64 KiB and 256 KiB reads no cheaper.
READ_SIZE = 2**14

# A memory BIO keeps, for the connection's life, the largest buffer it ever needed (OpenSSL's BUF_MEM
# grows, never shrinks): a 256 KiB result or upload passed through whole would stay resident in the
# connection, idle or not. So larger plain reads and application writes go through OpenSSL a slice
# at a time, and a BIO keeps about 22 KiB at most. A read slice that ends inside a record, nearly
# each one, costs an SSLWantReadError (about 1.4 us): a few per cent of a bulk upload's CPU, within
# the noise of bench/tls_read_cost.py with 64 and 256 KiB messages (0.93-1.12x against no slicing).
SLICE = 2**14

# What a protocol points at once its connection is lost, instead of the application: the application
# holds the transport, which holds the protocol, and a cycle back would keep a closed session and its
# OpenSSL state alive until the garbage collector's next full pass.
_DETACHED = asyncio.Protocol()


async def accept_tls(
    sock: socket.socket,
    protocol: asyncio.Protocol,
    context: ssl.SSLContext,
    *,
    handshake_timeout: float,
    shutdown_timeout: float,
) -> TLSTransport:
    """Run the server side of a TLS handshake on ``sock`` and connect ``protocol`` to the result.

    Returns once ``protocol.connection_made`` has been called with the TLS transport. On failure
    ``connection_made`` is never called, the socket is closed (after the TLS alert, if OpenSSL
    wrote one) and this raises ``ssl.SSLCertVerificationError`` or ``ssl.SSLError`` (the handshake
    failed), ``TimeoutError`` (not finished within ``handshake_timeout``) or ``ConnectionError``
    (the peer went away). ``shutdown_timeout`` bounds how long a closing connection may take to
    flush what it wrote to a peer that does not read.
    """
    loop = asyncio.get_running_loop()
    handshake: asyncio.Future[None] = loop.create_future()
    tls = TLSServerProtocol(
        loop,
        protocol,
        context,
        handshake,
        handshake_timeout=handshake_timeout,
        shutdown_timeout=shutdown_timeout,
    )
    transport = tls.transport  # the protocol lets go of it once the application has it
    try:
        await loop.connect_accepted_socket(lambda: tls, sock)
        await handshake
    except BaseException:
        tls.abort()  # cancelled while waiting: the handshake's own failures have closed it already
        raise
    return transport


class TLSServerProtocol(asyncio.Protocol):
    """The TLS connection: plain transport events in, decrypted data and protocol callbacks out.

    The records that came in one read of the socket reach the application in one data_received, as
    with uvloop's TLS layer. While the application has paused reading, nothing is decrypted: records
    wait in the incoming BIO, and the plain transport is paused too.
    """

    __slots__ = (
        "_app",
        "_connected",
        "_error",
        "_handshake_timeout",
        "_incoming",
        "_input_ended",
        "_loop",
        "_outgoing",
        "_paused",
        "_peer_done",
        "_plain",
        "_reading",
        "_shutdown_timeout",
        "_sslobj",
        "_timer",
        "_transport",
        "_waiter",
        "closing",
    )

    # Set by connection_made, which the event loop calls before anything else.
    _plain: asyncio.Transport

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        app: asyncio.Protocol,
        context: ssl.SSLContext,
        waiter: asyncio.Future[None],
        *,
        handshake_timeout: float,
        shutdown_timeout: float,
    ) -> None:
        self._loop = loop
        self._app = app
        self._incoming = ssl.MemoryBIO()
        self._outgoing = ssl.MemoryBIO()
        self._sslobj = context.wrap_bio(self._incoming, self._outgoing, server_side=True)
        self._handshake_timeout = handshake_timeout
        self._shutdown_timeout = shutdown_timeout
        # Until the handshake is over: then the application holds the transport, and nothing is waited for.
        self._transport: TLSTransport | None = TLSTransport(self)
        self._waiter: asyncio.Future[None] | None = waiter
        self._timer: asyncio.TimerHandle | None = None  # the handshake's deadline, then a close's
        # The application's transport was closed or aborted, or the connection failed or was lost:
        # the application gets nothing more but its connection_lost.
        self.closing = False
        self._connected = False  # connection_made called, connection_lost not yet
        self._paused = False  # the application paused reading
        self._reading = False  # decrypted data goes to the application now: connected, open, not paused
        self._peer_done = False  # the peer's close_notify or TCP EOF came (maybe while paused)
        self._input_ended = False  # the application has had its eof_received
        self._error: Exception | None = None  # what connection_lost reports, over the plain transport's

    @property
    def transport(self) -> TLSTransport:
        assert self._transport is not None, "the application has the transport"
        return self._transport

    # --- asyncio.Protocol: the plain transport's side ---

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self._plain = transport  # type: ignore[assignment]
        self._timer = self._loop.call_later(self._handshake_timeout, self._handshake_timed_out)

    def data_received(self, data: bytes) -> None:
        if self._reading and len(data) > SLICE:
            self._read_records(memoryview(data))
            return
        self._incoming.write(data)
        if self._reading:
            self._read_records()
        elif self._handshaking():
            self._continue_handshake()
        # Paused: the records wait in the incoming BIO for resume_reading. Closing: they are never read.

    def eof_received(self) -> bool:
        if self._waiter is not None:
            self._fail_handshake(
                ConnectionResetError("the peer closed the connection during the TLS handshake")
            )
            return False
        self._peer_done = True
        if self._reading:
            self._end_input()
        # While paused, the records held come first: _read_held ends the input after them. The plain
        # transport stays open either way: closing it is this layer's job (after close_notify).
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        self.closing = True
        self._reading = False
        self._cancel_timer()
        if self._waiter is not None:
            self._give_up_handshake(
                exc or ConnectionResetError("the connection was lost during the TLS handshake")
            )
        elif self._connected:
            self._connected = False
            app, self._app = self._app, _DETACHED
            app.connection_lost(self._error or exc)

    def pause_writing(self) -> None:
        # The plain transport's buffer is over its high-water mark, so the application's writes are.
        if self._connected:
            self._app.pause_writing()

    def resume_writing(self) -> None:
        if self._connected:
            self._app.resume_writing()

    # --- handshake ---

    def _handshaking(self) -> bool:
        """The handshake is on and its awaiting task still waits (it may have been cancelled)."""
        return self._waiter is not None and not self._waiter.done()

    def _continue_handshake(self) -> None:
        try:
            self._sslobj.do_handshake()
        except ssl.SSLWantReadError:
            self._flush()
            return
        except ssl.SSLError as exc:
            self._fail_handshake(exc)
            return
        self._flush()  # TLS 1.2's last flight is the server's
        self._cancel_timer()
        transport, self._transport = self.transport, None
        waiter, self._waiter = self._waiter, None
        assert waiter is not None
        self._connected = True
        try:
            self._app.connection_made(transport)
        except Exception as exc:
            # The awaiting task learns it (as with uvloop's TLS layer) instead of waiting forever.
            waiter.set_exception(exc)
            self._fail(exc)
            return
        waiter.set_result(None)
        # Nothing reaches the application before the awaiting task has run: it may still turn the
        # terminal away (a revoked certificate under an expired CRL kept in force). Records that
        # come meanwhile, also in further reads of this loop pass, wait in the incoming BIO.
        self._loop.call_soon(self._begin_reading)

    def _begin_reading(self) -> None:
        if self.closing or self._paused:
            return  # resume_reading starts reading, if the application wants more
        self._reading = True
        self._read_held()

    def _handshake_timed_out(self) -> None:
        self._timer = None
        self._fail_handshake(TimeoutError(f"TLS handshake not finished within {self._handshake_timeout:g}s"))

    def _give_up_handshake(self, exc: BaseException) -> None:
        """The handshake will not finish: the task awaiting it learns why (unless it was cancelled)."""
        self._cancel_timer()
        self.closing = True
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_exception(exc)

    def _fail_handshake(self, exc: BaseException) -> None:
        self._give_up_handshake(exc)
        if self._outgoing.pending:
            # OpenSSL's alert says why (certificate expired, unknown CA): flushed before the close.
            self._flush()
            self._close_plain()
        else:
            self._plain.abort()

    # --- reading ---

    def _read_records(self, unfed: memoryview | None = None) -> None:
        """Decrypt the records the incoming BIO holds, and those in ``unfed`` a slice at a time, and
        hand the plaintext on in one call."""
        read = self._sslobj.read
        incoming = self._incoming
        data = b""
        more: list[bytes] | None = None  # several records in one read, as pipelined messages come
        try:
            while True:
                if unfed is not None:
                    incoming.write(unfed[:SLICE])
                    unfed = unfed[SLICE:] if len(unfed) > SLICE else None
                try:
                    while chunk := read(READ_SIZE):
                        if not data:
                            data = chunk
                        elif more is None:
                            more = [data, chunk]
                        else:
                            more.append(chunk)
                        if not incoming.pending:
                            break
                    else:
                        self._peer_done = True  # close_notify
                        break
                except ssl.SSLWantReadError:
                    pass  # the rest of a record is still on its way
                if unfed is None:
                    break
        except ssl.SSLZeroReturnError:
            self._peer_done = True
        except ssl.SSLError as exc:
            # A record that does not decrypt or verify: tampering or a broken peer; never resumable.
            self._fail(exc)
            return
        if data:
            self._app.data_received(data if more is None else b"".join(more))
        if self._peer_done and self._reading:
            self._end_input()  # if what it just got paused the application, _read_held does it on resume
        if self._outgoing.pending:
            # What reading made OpenSSL write: a KeyUpdate answer (TLS 1.3 post-handshake messages).
            self._flush()

    def _read_held(self) -> None:
        """Records that waited while the application was paused, or came with the handshake."""
        if not self._reading:
            return
        try:
            if self._incoming.pending:
                self._read_records()
            if self._reading and self._peer_done:
                self._end_input()
        except Exception as exc:
            # Outside a transport callback nobody else would end the connection; the loop logs exc.
            self._fail(exc)
            raise

    def _end_input(self) -> None:
        """The peer sends nothing more (close_notify or TCP EOF): tell the application, once."""
        if self._input_ended:
            return
        self._input_ended = True
        self._reading = False
        if not self._app.eof_received():
            self.close()

    def pause_reading(self) -> None:
        if self._paused or self.closing:
            return
        self._paused = True
        self._reading = False
        # The plain transport may still deliver what it has read: that waits, encrypted, in the BIO.
        self._plain.pause_reading()

    def resume_reading(self) -> None:
        if not self._paused or self.closing:
            return
        self._paused = False
        self._reading = not self._input_ended
        self._plain.resume_reading()
        # Not in this call: the application may be inside its own data_received.
        self._loop.call_soon(self._read_held)

    # --- writing ---

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self.closing or not data:
            return
        try:
            if len(data) <= SLICE:
                self._sslobj.write(data)  # a record (OpenSSL makes more of a larger write)
            else:
                self._write_slices(memoryview(data))
                return
        except ssl.SSLError as exc:
            self._fail(exc)
            return
        self._plain.write(self._outgoing.read())

    def _write_slices(self, data: memoryview) -> None:
        encrypted = []
        for start in range(0, len(data), SLICE):
            self._sslobj.write(data[start : start + SLICE])
            encrypted.append(self._outgoing.read())
        self._plain.writelines(encrypted)  # one system call (writev) for all of them

    def _flush(self) -> None:
        self._plain.write(self._outgoing.read())

    # --- closing ---

    def close(self) -> None:
        """Send close_notify, then close the plain transport once its buffer is flushed.

        The peer's close_notify is not waited for (RFC 8446 6.1 lets the closing side go). A peer
        that does not read could keep the buffer from draining: ``shutdown_timeout`` ends that.
        """
        if self.closing:
            return
        self.closing = True
        self._reading = False
        try:
            self._sslobj.unwrap()
        except ssl.SSLWantReadError:
            pass  # close_notify written; the peer's own is not awaited
        except ssl.SSLError:
            pass  # OpenSSL sends no close_notify after a fatal alert; the plain close still ends it
        if self._outgoing.pending:
            self._flush()
        self._close_plain()

    def _close_plain(self) -> None:
        plain = self._plain
        plain.close()
        if plain.get_write_buffer_size():
            self._timer = self._loop.call_later(self._shutdown_timeout, plain.abort)

    def abort(self) -> None:
        self.closing = True
        self._reading = False
        self._cancel_timer()
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():
            waiter.cancel()  # nobody awaits it any more
        plain: asyncio.Transport | None = getattr(self, "_plain", None)
        if plain is not None:  # None: cancelled before the event loop connected it
            plain.abort()

    def _fail(self, exc: Exception) -> None:
        """End the connection because of ``exc``, which the application's connection_lost gets."""
        if self._error is None:
            self._error = exc
        if self._outgoing.pending and not self.closing:
            self._flush()  # OpenSSL's alert, so that the peer learns why
        self.abort()

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    # --- what the transport reports ---

    def extra_info(self, name: str, default: Any) -> Any:
        sslobj = self._sslobj
        match name:
            case "ssl_object":
                return sslobj
            case "sslcontext":
                return sslobj.context
            case "peercert":
                return sslobj.getpeercert()
            case "cipher":
                return sslobj.cipher()
            case "compression":
                return sslobj.compression()
        return self._plain.get_extra_info(name, default)

    @property
    def plain(self) -> asyncio.Transport:
        return self._plain

    @property
    def app(self) -> asyncio.Protocol:
        return self._app

    @app.setter
    def app(self, protocol: asyncio.Protocol) -> None:
        self._app = protocol

    @property
    def paused(self) -> bool:
        return self._paused


class TLSTransport(asyncio.Transport):
    """What the application protocol writes to and controls; the TLS work is its protocol's."""

    __slots__ = ("_tls",)

    def __init__(self, tls: TLSServerProtocol) -> None:
        super().__init__()
        self._tls = tls

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self._tls.write(data)

    def close(self) -> None:
        self._tls.close()

    def abort(self) -> None:
        self._tls.abort()

    def is_closing(self) -> bool:
        return self._tls.closing

    def pause_reading(self) -> None:
        self._tls.pause_reading()

    def resume_reading(self) -> None:
        self._tls.resume_reading()

    def is_reading(self) -> bool:
        return not self._tls.paused and not self._tls.closing

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self._tls.extra_info(name, default)

    def get_write_buffer_size(self) -> int:
        # Every write leaves the outgoing BIO at once: only the plain transport buffers.
        return self._tls.plain.get_write_buffer_size()

    def get_write_buffer_limits(self) -> tuple[int, int]:
        return self._tls.plain.get_write_buffer_limits()

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        self._tls.plain.set_write_buffer_limits(high, low)

    def can_write_eof(self) -> bool:
        return False  # TLS has close_notify (close()), not a half-close of the write side

    def get_protocol(self) -> asyncio.BaseProtocol:
        return self._tls.app

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        assert isinstance(protocol, asyncio.Protocol)
        self._tls.app = protocol
