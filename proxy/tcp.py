"""Socket options for long-lived TCP connections on both sides of the proxy, and the raw reads of
the pre-TLS phase."""

from __future__ import annotations

import asyncio
import socket

from proxy.config.model import TCPKeepalive
from proxy.errors import ProtocolViolation

# Linux's option number (linux/tcp.h); Python names it from 3.6 on Linux only.
_TCP_USER_TIMEOUT = getattr(socket, "TCP_USER_TIMEOUT", None)


def tune_socket(sock: socket.socket, keepalive: TCPKeepalive, user_timeout: float | None) -> None:
    """No Nagle delay (the wire protocol is request/response), and two bounds on a dead peer.

    Keepalive probes with our intervals (where the platform lets us set them: Linux, macOS,
    Windows 10+) notice a peer lost behind a WAN link or a NAT that drops idle flows in minutes
    instead of the kernel's two hours. But the kernel probes only while nothing it sent waits for
    an acknowledgement: a statement sent into a link that died is retransmitted for about 15
    minutes (tcp_retries2) before the read fails. TCP_USER_TIMEOUT (Linux) bounds that time, and
    with keepalives on, also ends the connection once probes stay unanswered that long.
    """
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for option, value in (
        ("TCP_KEEPIDLE", keepalive.idle),
        ("TCP_KEEPINTVL", keepalive.interval),
        ("TCP_KEEPCNT", keepalive.count),
    ):
        if hasattr(socket, option):
            sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, option), value)
    if user_timeout is not None and _TCP_USER_TIMEOUT is not None:
        sock.setsockopt(socket.IPPROTO_TCP, _TCP_USER_TIMEOUT, round(user_timeout * 1000))


async def peek_byte(sock: socket.socket) -> int | None:
    """The first byte waiting on ``sock`` without consuming it (None at EOF).

    We must look before reading: a PostgreSQL 17 direct-TLS client starts with a TLS
    record that the TLS layer has to see from its first byte.
    """
    await readable(sock)
    data = sock.recv(1, socket.MSG_PEEK)
    return data[0] if data else None


async def readable(sock: socket.socket) -> None:
    loop = asyncio.get_running_loop()
    readable: asyncio.Future[None] = loop.create_future()

    def mark_readable() -> None:
        if not readable.done():
            readable.set_result(None)

    loop.add_reader(sock.fileno(), mark_readable)
    try:
        await readable
    finally:
        loop.remove_reader(sock.fileno())


async def recv_exactly(sock: socket.socket, size: int) -> bytes:
    loop = asyncio.get_running_loop()
    chunks = bytearray()
    while len(chunks) < size:
        chunk = await loop.sock_recv(sock, size - len(chunks))
        if not chunk:
            raise ProtocolViolation("connection closed during startup")
        chunks += chunk
    return bytes(chunks)
