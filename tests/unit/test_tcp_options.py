"""The socket options tune_socket sets, read back from the kernel."""

from __future__ import annotations

import socket
import sys

import pytest

from proxy.config.model import TCPKeepalive
from proxy.tcp import tune_socket

linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="TCP_USER_TIMEOUT is Linux's")


def _option(sock: socket.socket, name: str) -> int:
    return sock.getsockopt(socket.IPPROTO_TCP, getattr(socket, name))


@linux_only
def test_keepalive_and_user_timeout_are_set_as_configured() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        tune_socket(sock, TCPKeepalive(idle=7, interval=3, count=4), 2.5)
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
        assert [_option(sock, name) for name in ("TCP_KEEPIDLE", "TCP_KEEPINTVL", "TCP_KEEPCNT")] == [7, 3, 4]
        # Milliseconds, as the kernel counts them.
        assert _option(sock, "TCP_USER_TIMEOUT") == 2500
        assert _option(sock, "TCP_NODELAY") == 1


@linux_only
def test_no_user_timeout_leaves_the_kernel_default() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        tune_socket(sock, TCPKeepalive(), None)
        assert _option(sock, "TCP_USER_TIMEOUT") == 0
