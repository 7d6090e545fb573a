"""Review reproducers for proxy.tlstransport (the SSLSocket layer), on real loopback sockets.

Each test states what the layer should do; the ones that fail on a9efa58 show a defect.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import os
import socket
import ssl

import pytest

from proxy.tlstransport import accept_tls
from tests.unit.test_tlstransport import (  # noqa: F401  (fixtures)
    IO_TIMEOUT,
    PKI,
    App,
    client_context,
    establish,
    listener,
    on_each_loop,
    open_connection,
    pki,
    server_context,
)

pytestmark = pytest.mark.timeout(60)

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
    listener: socket.socket,  # noqa: F811 (the fixture)
    pki: PKI,  # noqa: F811
) -> None:
    """The memory-BIO layer never had a write pending inside OpenSSL; this one has one whenever the
    terminal reads slower than the proxy writes. A KeyUpdate (update_requested) from the terminal
    then makes SSL_read write the answer while an application-data record is half sent."""
    client, transport, app = await establish(listener, pki)
    sent = bytearray()
    while transport.get_write_buffer_size() == 0:  # the client is not reading: the socket fills up
        chunk = os.urandom(32 * 1024)
        transport.write(chunk)
        sent += chunk
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
    listener: socket.socket,  # noqa: F811 (the fixture)
    pki: PKI,  # noqa: F811
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
    sent = bytearray()
    while transport.get_write_buffer_size() == 0:
        chunk = os.urandom(32 * 1024)
        transport.write(chunk)
        sent += chunk
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
    listener: socket.socket,  # noqa: F811 (the fixture)
    pki: PKI,  # noqa: F811
    seen: bool,
) -> None:
    """wrap_socket on a reset socket: SSLSocket._create raises from its recv(1) (after sock.detach(),
    so nothing closes the new SSLSocket but its deallocation), or, if the reset was already reported
    to an earlier call, makes an SSLSocket without an SSL object (_sslobj None): AttributeError."""
    connection = await open_connection(listener, client_context(pki, pki.terminal), App())
    connection.client.sock.setsockopt(
        socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00"
    )
    connection.client.sock.close()  # linger 0: RST
    await asyncio.sleep(0.05)
    server_sock = connection.server_sock
    if seen:
        with pytest.raises(ConnectionResetError):
            server_sock.recv(1, socket.MSG_PEEK)
    fd = server_sock.fileno()
    with pytest.raises(ConnectionError) as raised:
        await accept_tls(
            server_sock,
            connection.app,
            server_context(pki),
            handshake_timeout=IO_TIMEOUT,
            shutdown_timeout=1.0,
        )
    assert raised.value is not None  # its traceback keeps the frames (and their sockets) alive
    with pytest.raises(OSError):
        os.fstat(fd)  # closed by accept_tls, not left to the garbage collector
    assert connection.app.events == []


@pytest.mark.parametrize("size", [14, 600_000])
@on_each_loop
async def test_a_terminal_turned_away_by_the_awaiting_task_never_has_its_first_records_delivered(
    listener: socket.socket,  # noqa: F811 (the fixture)
    pki: PKI,  # noqa: F811
    size: int,
) -> None:
    """As server.py does for a certificate revoked under a kept expired CRL: the task awaiting
    accept_tls closes the session; records sent with the client's Finished must never reach it."""
    app = App()
    connection = await open_connection(listener, client_context(pki, pki.terminal), app)
    connection.server_sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    connection.client.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)

    async def accept_and_turn_away() -> None:
        transport = await accept_tls(
            connection.server_sock,
            app,
            server_context(pki),
            handshake_timeout=IO_TIMEOUT,
            shutdown_timeout=1.0,
        )
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
