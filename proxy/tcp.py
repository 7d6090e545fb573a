"""Socket options for long-lived TCP connections on both sides of the proxy."""

from __future__ import annotations

import socket

from proxy.config import TCPKeepalive


def tune_socket(sock: socket.socket, keepalive: TCPKeepalive) -> None:
    """No Nagle delay (the wire protocol is request/response), and keepalive probes with our intervals
    where the platform lets us set them (Linux, macOS, Windows 10+), so a peer lost behind a WAN link
    or a NAT that drops idle flows is noticed in minutes instead of the kernel's two hours."""
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for option, value in (
        ("TCP_KEEPIDLE", keepalive.idle),
        ("TCP_KEEPINTVL", keepalive.interval),
        ("TCP_KEEPCNT", keepalive.count),
    ):
        if hasattr(socket, option):
            sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, option), value)
