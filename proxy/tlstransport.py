"""The proxy's TLS connections, to terminals (accept_tls) and to database servers (connect_tls): a
non-blocking ``ssl.SSLSocket`` driven by the event loop.

OpenSSL reads and writes the socket itself; the event loop only says when the socket is readable
(``add_reader``) or, while something waits to be sent, writable (``add_writer``). An idle connection
keeps the ``SSLSocket`` with its OpenSSL state and one transport object: neither uvloop's TLS layer
(a 256 KiB read buffer per connection and a dozen objects more) nor memory BIOs, which keep the largest
buffer they ever held for the connection's life, nor a plain event-loop transport (docs/performance.md,
"Idle memory without uvloop's TLS layer"). On the busy server connections the gain is time: a read
takes one record off the socket, where uvloop's layer copies through a memory BIO and ends every read
with an SSLWantReadError (docs/performance.md, "server connections on the proxy's TLS layer").

The event loop's readability watch is level-triggered only while the socket holds no error: libuv
(under uvloop) reports a socket error (POLLERR: a reset, a keepalive or user timeout) to the reader
once and then drops the watch for good. A reader that stops early there, trusting to be called again
for the rest, never learns that the peer is gone; so every read checks for that error (see
``_socket_failed``) and, once it is there, reads the socket to its end by itself.
"""

from __future__ import annotations

import asyncio
import collections
import os
import socket
import ssl
from asyncio import trsock
from collections.abc import Callable
from typing import Any

# RFC 8446 5.1 (RFC 5246 6.2.1 for TLS 1.2): a record carries at most 2**14 bytes of plaintext, and
# OpenSSL's SSL_read returns at most one record. Reading that much takes a whole record every time,
# so nothing decrypted is left inside OpenSSL after a read. The buffer lives only during the call:
# CPython shrinks it to the record's size.
READ_SIZE = 2**14

# What one readable event decrypts at most before handing it on (uvloop's read buffer is as large): a
# peer that sends faster than the proxy reads cannot keep the event loop in one callback.
READ_BUDGET = 2**18

# What one SSL_write gets at most: one record. When the socket is full OpenSSL keeps that record,
# partly sent, and the retry must pass the same bytes again, so the unsent rest waits here in pieces
# of this size, and OpenSSL never holds more than a record of it.
SLICE = 2**14

# asyncio's defaults for a transport's write buffer.
HIGH_WATER = 64 * 1024
LOW_WATER = HIGH_WATER // 4

# What a transport points at once its connection is lost, instead of the application: the application
# holds the transport, which holds the protocol, and a cycle back would keep a closed session and its
# OpenSSL state alive until the garbage collector's next full pass.
_DETACHED = asyncio.Protocol()

# How much unread input a closing socket discards at most: close() on a socket with unread data
# sends a reset, which can overtake the alert or close_notify just written.
_DISCARD_READS = 4

Data = bytes | bytearray | memoryview


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
    return await _start_tls(
        sock,
        protocol,
        context,
        server_hostname=None,
        handshake_timeout=handshake_timeout,
        shutdown_timeout=shutdown_timeout,
    )


async def connect_tls(
    sock: socket.socket,
    protocol: asyncio.Protocol,
    context: ssl.SSLContext,
    *,
    server_hostname: str,
    handshake_timeout: float,
    shutdown_timeout: float,
) -> TLSTransport:
    """The client side of accept_tls, for the proxy's connections to its database servers: the
    server's certificate is checked against ``server_hostname`` as ``context`` requires. Same
    results and errors."""
    return await _start_tls(
        sock,
        protocol,
        context,
        server_hostname=server_hostname,
        handshake_timeout=handshake_timeout,
        shutdown_timeout=shutdown_timeout,
    )


async def _start_tls(
    sock: socket.socket,
    protocol: asyncio.Protocol,
    context: ssl.SSLContext,
    *,
    server_hostname: str | None,
    handshake_timeout: float,
    shutdown_timeout: float,
) -> TLSTransport:
    """The handshake on ``sock``: as the client of ``server_hostname``, or as the server without one."""
    loop = asyncio.get_running_loop()
    # OpenSSL reads the socket itself, so it sees a TCP EOF: without this option one that comes
    # without close_notify is a fatal error (UNEXPECTED_EOF_WHILE_READING), and every later write
    # and the close_notify fail with it, dropping what waits to be sent to a terminal that only
    # half-closed. The application is told eof_received either way. (The memory-BIO layer never
    # fed the EOF to OpenSSL.) Options are copied into each connection's SSL object at wrap time.
    if not context.options & ssl.OP_IGNORE_UNEXPECTED_EOF:
        context.options |= ssl.OP_IGNORE_UNEXPECTED_EOF
    try:
        # A socket reset already is not connected: wrap_socket would detach it and then either
        # raise (leaving the new SSLSocket to the garbage collector) or make one without an SSL
        # object.
        sock.getpeername()
        sock.setblocking(False)
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            # As asyncio's and uvloop's TCP transports do: a response's last record must not wait
            # for the ACK of the one before it.
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except OSError as exc:
        sock.close()
        raise ConnectionResetError("the peer reset the connection before the TLS handshake") from exc
    # The SSLSocket takes over the descriptor: ``sock`` is detached from it.
    sslsock = context.wrap_socket(
        sock,
        server_side=server_hostname is None,
        server_hostname=server_hostname,
        do_handshake_on_connect=False,
    )
    if sslsock._sslobj is None:  # type: ignore[attr-defined]  # reset since getpeername()
        sslsock.close()
        raise ConnectionResetError("the peer reset the connection before the TLS handshake")
    handshake: asyncio.Future[None] = loop.create_future()
    transport = TLSTransport(loop, sslsock, protocol, handshake, shutdown_timeout)
    try:
        transport.start_handshake(handshake_timeout)
        await handshake
    except BaseException:
        transport.abort()  # cancelled while waiting: the handshake's own failures have closed it already
        raise
    return transport


class TLSTransport(asyncio.Transport):
    """The TLS connection, as the application protocol sees it.

    Full records read in a row (a large write of the peer's) reach the application in one
    data_received, up to the first shorter one, which usually ends what the peer wrote. While the
    application has paused reading nothing is read: records wait in the kernel's socket buffer,
    and TCP's window slows the peer down.
    """

    __slots__ = (
        "_app",
        "_backlog",
        "_buffered",
        "_closing",
        "_connected",
        "_fd",
        "_high_water",
        "_in_flight",
        "_input_ended",
        "_loop",
        "_low_water",
        "_paused",
        "_peer_done",
        "_read_wants_write",
        "_reader",
        "_shutdown_timeout",
        "_socket_error",
        "_sslobj",
        "_sslsock",
        "_started",
        "_timer",
        "_waiter",
        "_write_paused",
        "_writer",
    )

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        sslsock: ssl.SSLSocket,
        app: asyncio.Protocol,
        waiter: asyncio.Future[None],
        shutdown_timeout: float,
    ) -> None:
        # Not BaseTransport.__init__: it gives every connection a dict for extra info, which
        # get_extra_info here looks up on the socket instead.
        self._loop = loop
        self._sslsock = sslsock
        # The C object under the SSLSocket: its read and write skip the Python wrapper's checks on
        # every record (the socket's state is this transport's to keep).
        self._sslobj: Any = sslsock._sslobj  # type: ignore[attr-defined]
        self._fd = sslsock.fileno()  # -1 once closed
        self._app = app
        self._waiter: asyncio.Future[None] | None = waiter  # until the handshake is over
        self._shutdown_timeout = shutdown_timeout
        self._timer: asyncio.TimerHandle | None = None  # the handshake's deadline, then a close's
        self._reader = False  # registered with the event loop for readability
        self._writer = False  # and for writability
        # Closed or aborted by the application, or failed or lost: the application gets nothing
        # more but its connection_lost.
        self._closing = False
        self._connected = False  # connection_made called, connection_lost not yet scheduled
        self._started = False  # the task awaiting the handshake has run: reading may begin
        self._paused = False  # the application paused reading
        self._peer_done = False  # the peer's close_notify or TCP EOF came (maybe while paused)
        self._input_ended = False  # the application has had its eof_received
        # SSL_read must write first (a KeyUpdate answer) and the socket is full.
        self._read_wants_write = False
        # The socket's pending error (SO_ERROR, taken off it once seen): the event loop may never
        # report this socket again, so what is left on it is read without waiting to be told.
        self._socket_error = 0
        # Unsent data: the record OpenSSL was last refused (it must be offered again as it was),
        # then what was written after it. Both None while nothing waits.
        self._in_flight: bytes | memoryview | None = None
        self._backlog: collections.deque[bytes | memoryview] | None = None
        self._buffered = 0
        self._high_water = HIGH_WATER
        self._low_water = LOW_WATER
        self._write_paused = False

    # --- handshake ---

    def start_handshake(self, timeout: float) -> None:
        self._timer = self._loop.call_later(timeout, self._handshake_timed_out, timeout)
        self._handshake_step()  # the ClientHello may be there already

    def _handshake_step(self) -> None:
        waiter = self._waiter
        if waiter is None or waiter.done():
            self.abort()  # the awaiting task was cancelled; it aborts too when it runs
            return
        try:
            self._sslobj.do_handshake()
        except ssl.SSLWantReadError:
            self._unwatch_write()
            self._watch_read(self._handshake_step)
            return
        except ssl.SSLWantWriteError:
            self._watch_write(self._handshake_step)
            return
        except (ssl.SSLEOFError, ssl.SSLZeroReturnError) as exc:
            # SSLZeroReturnError: a TCP EOF under OP_IGNORE_UNEXPECTED_EOF, or a close_notify.
            gone = ConnectionResetError("the peer closed the connection during the TLS handshake")
            gone.__cause__ = exc
            self._fail_handshake(gone)
            return
        except (ssl.SSLError, OSError) as exc:
            self._fail_handshake(exc)
            return
        self._unwatch_read()
        self._unwatch_write()
        self._cancel_timer()
        self._waiter = None
        self._connected = True
        try:
            self._app.connection_made(self)
        except Exception as exc:
            # The awaiting task learns it (as with uvloop's TLS layer) instead of waiting forever.
            waiter.set_exception(exc)
            self._finish(exc)
            return
        waiter.set_result(None)
        # Nothing reaches the application before the awaiting task has run: it may still turn the
        # terminal away (a revoked certificate under an expired CRL kept in force). Records that
        # come meanwhile wait in the socket.
        self._loop.call_soon(self._begin_reading)

    def _handshake_timed_out(self, timeout: float) -> None:
        self._timer = None
        self._fail_handshake(TimeoutError(f"TLS handshake not finished within {timeout:g}s"))

    def _fail_handshake(self, exc: BaseException) -> None:
        """The handshake will not finish: close the socket (after OpenSSL's alert, which it has
        written already) and tell the awaiting task why."""
        waiter, self._waiter = self._waiter, None
        self._finish(None)
        if waiter is not None and not waiter.done():
            waiter.set_exception(exc)

    def _begin_reading(self) -> None:
        self._started = True
        if self._wants_data():
            self._watch_read(self._on_readable)
            self._on_readable()  # records that came with the client's Finished may be read already

    # --- reading ---

    def _wants_data(self) -> bool:
        return self._started and not (self._paused or self._closing or self._input_ended)

    def _on_readable(self) -> None:
        read = self._sslobj.read
        data = b""
        more: list[bytes] | None = None  # several records at once, as pipelined messages come
        budget = READ_BUDGET
        failure: OSError | None = None
        try:
            while chunk := read(READ_SIZE):
                if not data:
                    data = chunk
                elif more is None:
                    more = [data, chunk]
                else:
                    more.append(chunk)
                budget -= len(chunk)
                if budget <= 0:
                    break
                # A record shorter than the most a record holds is the end of what the peer wrote,
                # nearly always: reading on would end in SSLWantReadError (about 1.9 us, and asking
                # the kernel with FIONREAD 1.2 us, a tenth of a small round trip). Records that
                # do follow it are still on the socket, and the event loop reports it readable
                # again (add_reader watches the level, not the edge), unless the socket has failed
                # (0.6 us to ask): then this may be the last call, and the rest is read now.
                if len(chunk) < READ_SIZE and not self._socket_failed():
                    break
            else:
                self._peer_done = True  # close_notify, or a TCP EOF (OP_IGNORE_UNEXPECTED_EOF)
        except ssl.SSLWantReadError:
            # Nothing more on the socket, or the rest of a record is still on its way. After a
            # socket error the event loop may not say when it comes: the connection is not usable.
            if self._socket_error:
                failure = OSError(self._socket_error, os.strerror(self._socket_error))
        except ssl.SSLWantWriteError:
            # OpenSSL must answer first (a TLS 1.3 KeyUpdate) and the socket is full: read again
            # once it can write.
            self._read_wants_write = True
            self._unwatch_read()
            self._watch_write(self._on_writable)
        except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
            self._peer_done = True  # close_notify, or a TCP EOF without it
        except (ssl.SSLError, OSError) as exc:
            # A record that does not decrypt or verify (tampering or a broken peer; OpenSSL has sent
            # its alert), or the connection reset: never resumable.
            self._finish(exc)
            return
        if data:
            try:
                self._app.data_received(data if more is None else b"".join(more))
            except Exception as exc:
                # As asyncio's transports do: the connection ends, and the event loop's handler logs it.
                self._finish(exc)
                raise
        if failure is not None:
            self._finish(failure)
        elif self._peer_done:
            self._unwatch_read()
            if self._wants_data():
                self._end_input()  # if what it just got paused the application: on resume
        elif budget <= 0 and (self._sslobj.pending() or self._socket_failed()):
            # Reads smaller than a record left the rest inside OpenSSL, or the socket failed: no
            # readable event may come for what remains.
            self._loop.call_soon(self._read_held)

    def _socket_failed(self) -> bool:
        """Whether the socket has had an error (a reset, a timeout), taking it off the socket.

        libuv ends its watch on a socket at the first POLLERR, after one last call of the reader, so
        under uvloop a reader that leaves anything unread then is never called again. POLLERR on a
        TCP socket is exactly a pending SO_ERROR. Taking the error clears POLLERR: the socket's
        records are then read as usual, then its end (recv returns 0: the connection is closed),
        which OpenSSL reports as the peer's end.
        """
        if not self._socket_error and self._fd >= 0:
            self._socket_error = self._sslsock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        return self._socket_error != 0

    def _read_held(self) -> None:
        """What OpenSSL decrypted but did not hand on, what a failed socket still holds, or the
        peer's end, after a pause."""
        if not self._wants_data():
            return
        if self._sslobj.pending() or (self._socket_error and not self._peer_done):
            self._on_readable()
        elif self._peer_done:
            self._end_input()

    def _end_input(self) -> None:
        """The peer sends nothing more (close_notify or TCP EOF): tell the application, once."""
        self._input_ended = True
        self._unwatch_read()
        try:
            keep_open = self._app.eof_received()
        except Exception as exc:
            self._finish(exc)
            raise
        if not keep_open:
            self.close()

    def pause_reading(self) -> None:
        if self._closing or self._paused:
            return
        self._paused = True
        self._unwatch_read()

    def resume_reading(self) -> None:
        if self._closing or not self._paused:
            return
        self._paused = False
        if not self._wants_data():
            return  # _begin_reading starts it
        if not (self._peer_done or self._read_wants_write):
            self._watch_read(self._on_readable)
        # Not in this call: the application may be inside its own data_received.
        self._loop.call_soon(self._read_held)

    def is_reading(self) -> bool:
        return not (self._paused or self._closing)

    # --- writing ---

    def write(self, data: Data) -> None:
        if self._closing or not data:
            return
        if self._in_flight is not None:
            # Behind what waits already; a copy, since the caller may reuse a bytearray.
            piece = data if isinstance(data, bytes) else bytes(data)
            if self._backlog is None:
                self._backlog = collections.deque()
            self._backlog.append(piece)
            self._buffered += len(piece)
            self._maybe_pause_writing()
            return
        # Nothing waits: straight to the socket, as asyncio's transports do.
        write = self._sslobj.write
        size = len(data)
        offset = 0
        try:
            if size <= SLICE:
                write(data)
                return
            view = memoryview(data)
            while offset < size:
                write(view[offset : offset + SLICE])
                offset += SLICE
            return
        except ssl.SSLWantWriteError:
            pass
        except (ssl.SSLError, OSError) as exc:
            self._finish(exc)
            return
        self._hold(data, offset)

    def _hold(self, data: Data, offset: int) -> None:
        """OpenSSL took the record at ``offset`` but the socket is full: keep it and the rest."""
        rest = memoryview(data)[offset:]
        if not isinstance(data, bytes):
            rest = memoryview(bytes(rest))  # the caller may reuse a bytearray
        self._in_flight = rest[:SLICE]  # the same bytes as refused: OpenSSL may have sent part
        if len(rest) > SLICE:
            self._backlog = collections.deque([rest[SLICE:]])
        self._buffered = len(rest)
        self._watch_write(self._on_writable)
        self._maybe_pause_writing()

    def _on_writable(self) -> None:
        if self._read_wants_write:
            self._read_wants_write = False
            if self._wants_data() and not self._peer_done:
                self._watch_read(self._on_readable)
                self._on_readable()
        if self._in_flight is not None and self._fd >= 0:
            self._flush()
        if self._in_flight is None and not self._read_wants_write and self._fd >= 0:
            self._unwatch_write()
            if self._closing:
                self._shut_down()

    def _flush(self) -> None:
        """Send what waits, a record at a time, until the socket is full again."""
        write = self._sslobj.write
        chunk = self._in_flight
        backlog = self._backlog
        try:
            while chunk is not None:
                write(chunk)
                self._buffered -= len(chunk)
                chunk = _next_record(backlog) if backlog else None
        except ssl.SSLWantWriteError:
            pass
        except (ssl.SSLError, OSError) as exc:
            self._finish(exc)
            return
        self._in_flight = chunk
        if chunk is None:
            self._backlog = None
        if self._write_paused and self._buffered <= self._low_water:
            self._write_paused = False
            self._call_app_flow_control("resume_writing")

    def _maybe_pause_writing(self) -> None:
        if not self._write_paused and self._buffered > self._high_water:
            self._write_paused = True
            self._call_app_flow_control("pause_writing")

    def _call_app_flow_control(self, name: str) -> None:
        try:
            getattr(self._app, name)()
        except Exception as exc:
            # As asyncio's transports do: the writer's own call (write) must not fail for it.
            self._loop.call_exception_handler(
                {"message": f"protocol.{name}() failed", "exception": exc, "transport": self}
            )

    def get_write_buffer_size(self) -> int:
        return self._buffered

    def get_write_buffer_limits(self) -> tuple[int, int]:
        return (self._low_water, self._high_water)

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        if high is None:
            high = HIGH_WATER if low is None else 4 * low
        if low is None:
            low = high // 4
        if not high >= low >= 0:
            raise ValueError(f"high ({high!r}) must be >= low ({low!r}) must be >= 0")
        self._high_water = high
        self._low_water = low
        self._maybe_pause_writing()

    def can_write_eof(self) -> bool:
        return False  # TLS has close_notify (close()), not a half-close of the write side

    # --- closing ---

    def close(self) -> None:
        """Send close_notify after what waits to be sent, then close the socket.

        The peer's close_notify is not waited for (RFC 8446 6.1 lets the closing side go). A peer
        that does not read could keep what waits from leaving: ``shutdown_timeout`` ends that.
        """
        if self._closing:
            return
        self._closing = True
        self._unwatch_read()
        if self._in_flight is None:
            self._shut_down()
        else:
            self._timer = self._loop.call_later(self._shutdown_timeout, self.abort)
            # _on_writable shuts down once it has sent the rest.

    def _shut_down(self) -> None:
        try:
            self._sslobj.shutdown()
        except ssl.SSLWantReadError:
            pass  # close_notify sent; the peer's own is not awaited
        except ssl.SSLWantWriteError:
            # The socket is full (a KeyUpdate answer waits in OpenSSL): close_notify goes when it can.
            if self._timer is None:
                self._timer = self._loop.call_later(self._shutdown_timeout, self.abort)
            self._watch_write(self._shut_down)
            return
        except (ssl.SSLError, OSError):
            pass  # no close_notify after a fatal alert or a lost connection; closing ends it
        self._finish(None)

    def abort(self) -> None:
        self._finish(None)

    def is_closing(self) -> bool:
        return self._closing

    def _finish(self, exc: Exception | None) -> None:
        """Close the socket now; the application's connection_lost gets ``exc`` soon after."""
        self._closing = True
        if self._fd < 0:
            return
        self._unwatch_read()
        self._unwatch_write()
        self._cancel_timer()
        self._in_flight = self._backlog = None
        self._buffered = 0
        self._discard_unread()
        self._fd = -1
        self._sslsock.close()
        if self._connected:
            self._connected = False
            self._loop.call_soon(self._lost, exc)

    def _discard_unread(self) -> None:
        try:
            for _ in range(_DISCARD_READS):
                if not os.read(self._fd, 65536):
                    return
        except OSError:
            return  # nothing more to read (EAGAIN), or the connection is gone already

    def _lost(self, exc: Exception | None) -> None:
        app, self._app = self._app, _DETACHED
        app.connection_lost(exc)

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    # --- the event loop's watch on the socket ---

    def _watch_read(self, callback: Callable[[], None]) -> None:
        self._loop.add_reader(self._fd, callback)
        self._reader = True

    def _unwatch_read(self) -> None:
        if self._reader:
            self._reader = False
            self._loop.remove_reader(self._fd)

    def _watch_write(self, callback: Callable[[], None]) -> None:
        self._loop.add_writer(self._fd, callback)
        self._writer = True

    def _unwatch_write(self) -> None:
        if self._writer:
            self._writer = False
            self._loop.remove_writer(self._fd)

    # --- what the transport reports ---

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        sslsock = self._sslsock
        match name:
            case "ssl_object":
                return sslsock
            case "sslcontext":
                return sslsock.context
            case "peercert":
                return sslsock.getpeercert()
            case "cipher":
                return sslsock.cipher()
            case "compression":
                return sslsock.compression()
            case "socket":
                return trsock.TransportSocket(sslsock)
            case "peername" | "sockname":
                try:
                    return sslsock.getpeername() if name == "peername" else sslsock.getsockname()
                except OSError:
                    return default  # closed
        return default

    def get_protocol(self) -> asyncio.BaseProtocol:
        return self._app

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        assert isinstance(protocol, asyncio.Protocol)
        self._app = protocol


def _next_record(backlog: collections.deque[bytes | memoryview]) -> bytes | memoryview:
    """The next SSL_write's bytes from the backlog: a record's worth, small writes joined."""
    head = backlog.popleft()
    if len(head) >= SLICE:
        view = memoryview(head)
        if len(view) > SLICE:
            backlog.appendleft(view[SLICE:])
        return view[:SLICE]
    if not backlog or len(head) + len(backlog[0]) > SLICE:
        return head
    pieces = [head]
    size = len(head)
    while backlog and size + len(backlog[0]) <= SLICE:
        piece = backlog.popleft()
        pieces.append(piece)
        size += len(piece)
    return b"".join(pieces)
