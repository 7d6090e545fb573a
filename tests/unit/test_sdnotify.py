"""sd_notify messages on a real datagram socket, as systemd would receive them."""

from __future__ import annotations

import os
import socket
from pathlib import Path

from proxy.sdnotify import Notifier


def test_without_notify_socket_nothing_is_sent() -> None:
    notifier = Notifier({})
    assert not notifier.enabled
    notifier.ready("serving")  # must not fail
    assert notifier.watchdog_interval is None


def test_messages_arrive_as_assignments(tmp_path: Path) -> None:
    path = tmp_path / "notify"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(path))
        sock.settimeout(5)
        notifier = Notifier({"NOTIFY_SOCKET": str(path)})
        notifier.ready("serving on 127.0.0.1:6432")
        assert sock.recv(4096) == b"READY=1\nSTATUS=serving on 127.0.0.1:6432"
        notifier.reloading()
        reloading = sock.recv(4096).decode().split("\n")
        assert reloading[0] == "RELOADING=1" and reloading[1].startswith("MONOTONIC_USEC=")
        notifier.stopping("draining")
        assert sock.recv(4096) == b"STOPPING=1\nSTATUS=draining"
        notifier.watchdog()
        assert sock.recv(4096) == b"WATCHDOG=1"


def test_abstract_namespace_socket() -> None:
    name = f"pos-proxy-test-{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(5)
        Notifier({"NOTIFY_SOCKET": "@" + name}).status("hello")
        assert sock.recv(4096) == b"STATUS=hello"


def test_watchdog_interval_is_half_the_timeout_and_only_for_this_process() -> None:
    assert Notifier({"WATCHDOG_USEC": "30000000"}).watchdog_interval == 15.0
    assert Notifier({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid())}).watchdog_interval == 15.0
    assert Notifier({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "1"}).watchdog_interval is None


def test_a_vanished_service_manager_is_not_an_error(tmp_path: Path) -> None:
    Notifier({"NOTIFY_SOCKET": str(tmp_path / "gone")}).ready("serving")
