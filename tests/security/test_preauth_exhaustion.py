"""Connections that never finish startup cannot lock terminals out.

Anyone who reaches the port can open connections and send nothing, half a TLS ClientHello, or
one byte at a time. The proxy keeps at most ``listen.max_pending_handshakes`` of them (and
``max_pending_handshakes_per_source`` per address), dropping the oldest first, bounds the whole
pre-authentication phase by its timeouts counted from accept, answers GSSENCRequest once, and
throttles the log and audit records all this causes (counting what it held back). Loopback only;
a few hundred sockets at most (they stay well under the test process's descriptor limit).
"""

from __future__ import annotations

import json
import secrets
import socket
import ssl
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import psycopg
import pytest

from proxy.protocols.postgres import messages as m
from tests.integration.proxyproc import ProxyProcess, TerminalPKI

StartProxy = Callable[..., ProxyProcess]

_FLOOD = 300
# A legitimate terminal's connect + SELECT 1 normally takes well under this, even on a loaded machine.
_NORMAL_CONNECT = 3.0
_GSSENC_REQUEST = struct.pack("!ii", 8, m.GSSENC_REQUEST_CODE)
# The start of a TLS record carrying a ClientHello, whose length promises more than ever comes.
_HALF_CLIENT_HELLO = bytes.fromhex("16030100c8010000c40303") + secrets.token_bytes(16)


@contextmanager
def _flood(proxy: ProxyProcess, sources: list[str], count: int = _FLOOD) -> Iterator[list[socket.socket]]:
    """``count`` connections spread over the ``sources`` (loopback addresses); every other one sends
    half a ClientHello, the rest nothing at all."""
    sockets: list[socket.socket] = []
    try:
        for number in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sockets.append(sock)
            sock.bind((sources[number % len(sources)], 0))
            sock.connect(("127.0.0.1", proxy.port))
            if number % 2:
                sock.sendall(_HALF_CLIENT_HELLO)
            sock.setblocking(False)
        yield sockets
    finally:
        for sock in sockets:
            sock.close()


def _closed_by_proxy(sockets: list[socket.socket]) -> int:
    closed = 0
    for sock in sockets:
        try:
            closed += sock.recv(1) == b""
        except BlockingIOError:
            continue
        except OSError:  # reset
            closed += 1
    return closed


def _wait_closed(sockets: list[socket.socket], at_least: int, timeout: float = 10.0) -> int:
    deadline = time.monotonic() + timeout
    while (closed := _closed_by_proxy(sockets)) < at_least and time.monotonic() < deadline:
        time.sleep(0.1)
    return closed


def _terminal_select_1_seconds(proxy: ProxyProcess, pki: TerminalPKI) -> float:
    started = time.monotonic()
    with psycopg.connect(**proxy.conninfo(pki.cashier, pki.ca), autocommit=True) as connection:
        assert connection.execute("SELECT 1").fetchone() == (1,)
    return time.monotonic() - started


def test_a_flood_from_the_terminals_own_address_is_capped_per_source_oldest_first(
    start_proxy: StartProxy, terminal_pki: TerminalPKI
) -> None:
    cap = 40
    proxy = start_proxy(listen={"max_pending_handshakes_per_source": cap, "handshake_timeout": "30s"})
    # From 127.0.0.1, as the terminal itself: a store behind one NAT address.
    with _flood(proxy, ["127.0.0.1"]) as flood:
        closed = _wait_closed(flood, _FLOOD - cap)
        assert closed == _FLOOD - cap, f"{closed} of {_FLOOD} closed: at most {cap} may stay"
        seconds = _terminal_select_1_seconds(proxy, terminal_pki)
        assert seconds < _NORMAL_CONNECT, f"the terminal took {seconds:.2f} s"
        # Its own connection made room by dropping the oldest of the flood.
        assert _wait_closed(flood, _FLOOD - cap + 1) == _FLOOD - cap + 1
    dropped = proxy.wait_for_event("pending_startup_dropped")
    assert dropped["source"] == "127.0.0.1"


def test_a_flood_from_many_addresses_is_capped_globally_oldest_first(
    start_proxy: StartProxy, terminal_pki: TerminalPKI
) -> None:
    cap = 100
    proxy = start_proxy(listen={"max_pending_handshakes": cap, "handshake_timeout": "30s"})
    # With a descriptor limit the uncapped flood would exhaust, the caps are what keeps accept working.
    subprocess.run(["prlimit", f"--pid={proxy.pid}", "--nofile=250:250"], check=True, timeout=10)
    with _flood(proxy, [f"127.0.0.{host}" for host in range(2, 32)]) as flood:
        closed = _wait_closed(flood, _FLOOD - cap)
        assert closed == _FLOOD - cap, f"{closed} of {_FLOOD} closed: at most {cap} may stay"
        seconds = _terminal_select_1_seconds(proxy, terminal_pki)
        assert seconds < _NORMAL_CONNECT, f"the terminal took {seconds:.2f} s"
    assert not any(event.get("event") == "accept_failed" for event in proxy.log_events())


def _slow_connect(proxy: ProxyProcess, *, pause: float) -> tuple[socket.socket, float]:
    """TCP connect, then an SSLRequest one byte per ``pause``; returns the socket after 'S'."""
    sock = socket.create_connection(("127.0.0.1", proxy.port), timeout=10)
    accepted = time.monotonic()
    for byte in m.build_ssl_request():
        time.sleep(pause)
        sock.sendall(bytes([byte]))
    assert sock.recv(1) == b"S"
    return sock, accepted


def _trickle_until_closed(sock: socket.socket, data: bytes, pause: float) -> bytes:
    """Send ``data`` one byte per ``pause`` until the proxy answers or closes; what it sent."""
    sock.settimeout(pause)
    for byte in data:
        try:
            sock.sendall(bytes([byte]))
            answer = sock.recv(4096)
        except TimeoutError:
            continue
        except (OSError, ssl.SSLError):
            return b""
        return answer
    raise AssertionError("the whole packet went through")


def test_a_slow_loris_before_tls_lives_no_longer_than_the_handshake_timeout(
    start_proxy: StartProxy,
) -> None:
    proxy = start_proxy(listen={"handshake_timeout": "2s", "startup_timeout": "3s"})
    sock = socket.create_connection(("127.0.0.1", proxy.port), timeout=10)
    started = time.monotonic()
    try:
        _trickle_until_closed(sock, m.build_startup_message({"user": "x", "database": "pos" * 20}), 1.0)
    finally:
        sock.close()
    assert time.monotonic() - started < 2.0 + 1.2


def test_a_slow_loris_through_tls_lives_no_longer_than_the_startup_timeout_from_accept(
    start_proxy: StartProxy, terminal_pki: TerminalPKI
) -> None:
    # Each step alone stays within its timeout; without one deadline from accept the SSLRequest
    # (2.5 s), the TLS handshake and the startup packet would each get a fresh budget (6.5 s+).
    proxy = start_proxy(listen={"handshake_timeout": "3s", "startup_timeout": "4s"})
    sock, accepted = _slow_connect(proxy, pause=0.31)
    context = proxy.ssl_context(terminal_pki.cashier, terminal_pki.ca)
    with context.wrap_socket(sock, server_hostname="127.0.0.1") as tls:
        startup = m.build_startup_message(
            {"user": "till-01", "database": "pos", "application_name": "x" * 40}
        )
        answer = _trickle_until_closed(tls, startup, 1.0)
    lifetime = time.monotonic() - accepted
    assert lifetime < 4.0 + 1.2, f"the connection lived {lifetime:.2f} s"
    assert answer == b"" or (answer[:1] == b"E" and b"startup did not complete in time" in answer)


def test_a_repeated_gssenc_request_ends_the_connection(
    start_proxy: StartProxy, terminal_pki: TerminalPKI
) -> None:
    proxy = start_proxy()
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as sock:
        sock.sendall(_GSSENC_REQUEST)
        assert sock.recv(1) == b"N"
        sock.sendall(_GSSENC_REQUEST)
        assert sock.recv(1) == b""
    # libpq's gssencmode=prefer: one GSSENCRequest, then an SSLRequest on the same socket.
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as sock:
        sock.sendall(_GSSENC_REQUEST)
        assert sock.recv(1) == b"N"
        sock.sendall(m.build_ssl_request())
        assert sock.recv(1) == b"S"
    proxy.wait_for_event("handshake_protocol_error", error="GSSENCRequest repeated after it was refused")


def _verify(key: Path, log: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "proxy", "audit", "verify", "--key", str(key), str(log)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_preauth_records_are_throttled_with_counts_and_the_audit_chain_verifies(
    start_proxy: StartProxy, terminal_pki: TerminalPKI, tmp_path: Path
) -> None:
    key = tmp_path / "audit.key"
    key.touch(mode=0o600)
    key.write_bytes(secrets.token_bytes(32))
    audit_log = tmp_path / "audit.log"
    per_second, attempts = 3, 40
    proxy = start_proxy(
        listen={"preauth_records_per_second": per_second},
        audit={"file": str(audit_log), "key_file": str(key), "flush_interval": "50ms"},
    )
    foreign = proxy.ssl_context(terminal_pki.foreign, terminal_pki.ca)
    started = time.monotonic()
    for _ in range(attempts):
        with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as sock:
            sock.sendall(m.build_ssl_request())
            assert sock.recv(1) == b"S"
            with (
                pytest.raises((ssl.SSLError, OSError)),
                foreign.wrap_socket(sock, server_hostname="127.0.0.1") as tls,
            ):
                tls.sendall(m.build_startup_message({"user": "till-01", "database": "pos"}))
                if not tls.recv(1):
                    raise ConnectionResetError("closed")
    seconds = time.monotonic() - started
    proxy.wait_for_event("preauth_records_suppressed")
    time.sleep(1.5)  # the last second's count
    proxy.stop()

    events = list(proxy.log_events())
    logged = [event for event in events if event.get("event") == "tls_handshake_failed"]
    suppressed = sum(
        event["suppressed"].get("tls_handshake_failed", 0)
        for event in events
        if event.get("event") == "preauth_records_suppressed"
    )
    assert logged, "the first failures are always logged"
    assert len(logged) <= per_second * (int(seconds) + 2)
    assert len(logged) + suppressed == attempts

    records = [json.loads(line) for line in audit_log.read_text().splitlines()]
    refused = [record for record in records if record["event"] == "connection_refused"]
    assert len(refused) == len(logged)
    assert all(record["reason"].startswith("TLS:") for record in refused)
    counted = [record for record in records if record["event"] == "preauth_records_suppressed"]
    assert sum(record["suppressed"].get("tls_handshake_failed", 0) for record in counted) == suppressed
    result = _verify(key, audit_log)
    assert result.returncode == 0, result.stdout + result.stderr
