"""Socket options for long-lived TCP connections on both sides of the proxy."""

from __future__ import annotations

import socket

from proxy.config.model import TCPKeepalive

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
