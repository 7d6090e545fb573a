"""PROXY protocol behind a load balancer: a real proxy, real PostgreSQL, a loopback stand-in balancer.

The balancer (``Balancer``) is a tiny relay on 127.0.0.1 that opens a connection to the proxy from a
chosen loopback address, writes a PROXY header and then pipes bytes both ways, as HAProxy's
send-proxy does. Trusted balancer: 127.0.0.1; 127.0.0.2 plays a host that is not one. The addresses
in the headers (203.0.113.7, 2001:db8::7: documentation ranges) are data only; no traffic goes there.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import signal
import socket
import urllib.request
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import psycopg
import pytest
import yaml

from proxy.localpg import free_port
from tests import proxyheaders as build
from tests.integration.proxyproc import ProxyProcess, TerminalPKI, deep_merge

StartProxy = Callable[..., ProxyProcess]
TOKEN = "admin-test-token-0123456789"
SSL_REQUEST = b"\x00\x00\x00\x08\x04\xd2\x16\x2f"
BALANCER = "127.0.0.1"
NOT_A_BALANCER = "127.0.0.2"
TIMEOUT = 10.0


@pytest.fixture
def balanced(start_proxy: StartProxy, tmp_path: Path) -> tuple[ProxyProcess, int, Path]:
    """A proxy that trusts 127.0.0.1 as its balancer, with the admin API and an audit log."""
    token_file = tmp_path / "admin-token"
    token_file.write_text(TOKEN + "\n", encoding="utf-8")
    key = tmp_path / "audit.key"
    key.touch(mode=0o600)
    key.write_bytes(secrets.token_bytes(32))
    admin_port = free_port()
    proxy = start_proxy(
        listen={
            "proxy_protocol": {
                "enabled": True,
                "trusted_sources": [f"{BALANCER}/32"],
                "header_timeout": "1s",
            }
        },
        admin={"host": "127.0.0.1", "port": admin_port, "token": {"file": str(token_file)}},
        audit={"file": str(tmp_path / "audit.log"), "key_file": str(key)},
        limits={"source_connections": {"per_second": 0.2, "burst": 3}},
    )
    proxy.wait_for_event("admin_listening")
    return proxy, admin_port, tmp_path / "audit.log"


def _admin(port: int, path: str) -> bytes:
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}")
    request.add_header("Authorization", f"Bearer {TOKEN}")
    with urllib.request.urlopen(request, timeout=TIMEOUT) as response:
        body: bytes = response.read()
        return body


def _refusals(admin_port: int, reason: str) -> float:
    metric = f'pos_proxy_client_connections_refused_total{{reason="{reason}"}} '
    for line in _admin(admin_port, "/metrics").decode().splitlines():
        if line.startswith(metric):
            return float(line.removeprefix(metric))
    return 0.0


@asynccontextmanager
async def balancer(proxy: ProxyProcess, header: bytes, *, source: str = BALANCER) -> AsyncIterator[int]:
    """A relay on a free loopback port that forwards to ``proxy`` from ``source``, ``header`` first."""
    handlers: set[asyncio.Task[Any]] = set()

    async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while chunk := await reader.read(65536):
                writer.write(chunk)
                await writer.drain()
        finally:
            writer.close()

    async def relay(client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        handlers.add(task)
        proxy_reader, proxy_writer = await asyncio.wait_for(
            asyncio.open_connection("127.0.0.1", proxy.port, local_addr=(source, 0)), TIMEOUT
        )
        proxy_writer.write(header)
        await asyncio.gather(
            pipe(client_reader, proxy_writer), pipe(proxy_reader, client_writer), return_exceptions=True
        )

    server = await asyncio.start_server(relay, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()
        for handler in handlers:
            handler.cancel()
        await asyncio.wait_for(server.wait_closed(), TIMEOUT)


async def _terminal_session(port: int, proxy: ProxyProcess, pki: TerminalPKI) -> psycopg.AsyncConnection[Any]:
    return await psycopg.AsyncConnection.connect(
        **{**proxy.conninfo(pki.cashier, pki.ca), "port": port}, autocommit=True
    )


async def _first_answer(proxy: ProxyProcess, data: bytes, *, source: str = BALANCER) -> bytes:
    """The proxy's first answer to ``data`` from ``source``: b"S" to an SSLRequest, b"" if it hangs up."""
    reader, writer = await asyncio.wait_for(
        asyncio.open_connection("127.0.0.1", proxy.port, local_addr=(source, 0)), TIMEOUT
    )
    try:
        writer.write(data)
        try:
            return await asyncio.wait_for(reader.read(1), TIMEOUT)
        except ConnectionResetError:
            return b""
    finally:
        writer.close()


async def test_v1_and_v2_headers_give_sessions_the_terminals_address(
    balanced: tuple[ProxyProcess, int, Path], terminal_pki: TerminalPKI
) -> None:
    proxy, admin_port, audit_file = balanced
    async with (
        balancer(proxy, build.v1("203.0.113.7", 40001)) as v1_port,
        balancer(proxy, build.v2("2001:db8::7", 40002, tlvs=build.tlv(0xEA, b"vpce-0123"))) as v2_port,
    ):
        v1_session = await _terminal_session(v1_port, proxy, terminal_pki)
        v2_session = await _terminal_session(v2_port, proxy, terminal_pki)
        async with v1_session, v2_session:
            for session in (v1_session, v2_session):
                assert await (await session.execute("SELECT 41 + 1")).fetchone() == (42,)
            clients = json.loads(await asyncio.to_thread(_admin, admin_port, "/v1/clients"))["clients"]
            assert sorted(client["source"] for client in clients) == [
                "2001:db8::7:40002",
                "203.0.113.7:40001",
            ]
    assert proxy.wait_for_event("session_start", source="203.0.113.7:40001")["terminal"] == "till-01"
    proxy.wait_for_event("session_start", source="2001:db8::7:40002")
    assert proxy.stop() == 0
    audited = [json.loads(line) for line in audit_file.read_text().splitlines()]
    accepted = {record["source"] for record in audited if record["event"] == "connection_accepted"}
    assert accepted == {"203.0.113.7:40001", "2001:db8::7:40002"}


async def test_header_from_an_untrusted_peer_is_refused_and_its_direct_terminals_still_work(
    balanced: tuple[ProxyProcess, int, Path], terminal_pki: TerminalPKI
) -> None:
    proxy, admin_port, audit_file = balanced
    spoofed = build.v2("203.0.113.7", 40003) + SSL_REQUEST
    assert await _first_answer(proxy, spoofed, source=NOT_A_BALANCER) == b""
    refused = proxy.wait_for_event("proxy_header_refused", reason="untrusted")
    assert refused["source"].startswith(f"{NOT_A_BALANCER}:")
    assert await asyncio.to_thread(_refusals, admin_port, "proxy header untrusted") == 1.0
    # A terminal on that host that connects without a header is served as before, under its own address.
    async with (
        balancer(proxy, b"", source=NOT_A_BALANCER) as direct_port,
        await _terminal_session(direct_port, proxy, terminal_pki) as session,
    ):
        assert await (await session.execute("SELECT 1")).fetchone() == (1,)
    assert proxy.wait_for_event("session_start")["source"].startswith(f"{NOT_A_BALANCER}:")
    assert proxy.stop() == 0
    audited = [json.loads(line) for line in audit_file.read_text().splitlines()]
    assert any(
        record["event"] == "connection_refused" and record["source"] == refused["source"]
        for record in audited
    )


def test_trusted_balancer_without_a_header_is_refused(
    balanced: tuple[ProxyProcess, int, Path], terminal_pki: TerminalPKI
) -> None:
    proxy, admin_port, _audit = balanced
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(**proxy.conninfo(terminal_pki.cashier, terminal_pki.ca)).close()
    refused = proxy.wait_for_event("proxy_header_refused", reason="missing")
    assert refused["source"].startswith(f"{BALANCER}:")
    assert "expected a PROXY protocol header" in refused["error"]
    assert _refusals(admin_port, "proxy header missing") == 1.0


async def test_malformed_or_stalled_headers_are_refused_and_other_sessions_carry_on(
    balanced: tuple[ProxyProcess, int, Path], terminal_pki: TerminalPKI
) -> None:
    proxy, admin_port, _audit = balanced
    async with (
        balancer(proxy, build.v1("203.0.113.7", 40004)) as port,
        await _terminal_session(port, proxy, terminal_pki) as session,
    ):
        bad_address = b"PROXY TCP4 203.0.113.300 127.0.0.1 40005 6432\r\n" + SSL_REQUEST
        assert await _first_answer(proxy, bad_address) == b""
        malformed = proxy.wait_for_event("proxy_header_refused", reason="malformed")
        assert "bad IPv4 address" in malformed["error"]
        # Half a header, then silence: refused after header_timeout (1s), not left open.
        assert await _first_answer(proxy, build.v2("203.0.113.7", 40006)[:20]) == b""
        timed_out = proxy.wait_for_event("proxy_header_refused", reason="timeout")
        assert timed_out["error"] == "no header within 1s"
        assert await (await session.execute("SELECT 'still here'")).fetchone() == ("still here",)
    assert await asyncio.to_thread(_refusals, admin_port, "proxy header malformed") == 1.0
    assert await asyncio.to_thread(_refusals, admin_port, "proxy header timeout") == 1.0


async def test_source_rate_limit_counts_the_address_in_the_header(
    balanced: tuple[ProxyProcess, int, Path],
) -> None:
    proxy, admin_port, _audit = balanced
    # burst 3 per source: the fourth connection announced for 203.0.113.7 is turned away...
    answers = [await _first_answer(proxy, build.v1("203.0.113.7", 41000 + n) + SSL_REQUEST) for n in range(4)]
    assert answers == [b"S", b"S", b"S", b""]
    # ...while another terminal behind the same balancer still gets in.
    assert await _first_answer(proxy, build.v2("203.0.113.8", 42000) + SSL_REQUEST) == b"S"
    assert await asyncio.to_thread(_refusals, admin_port, "source rate") == 1.0


async def test_trusted_sources_follow_a_reload(balanced: tuple[ProxyProcess, int, Path]) -> None:
    proxy, _admin_port, _audit = balanced
    header = build.v1("203.0.113.9", 43000) + SSL_REQUEST
    assert await _first_answer(proxy, header, source=NOT_A_BALANCER) == b""
    moved = deep_merge(
        proxy.config, {"listen": {"proxy_protocol": {"trusted_sources": [f"{NOT_A_BALANCER}/32"]}}}
    )
    proxy.config_path.write_text(yaml.safe_dump(moved), encoding="utf-8")
    proxy.signal(signal.SIGHUP)
    reloaded = proxy.wait_for_event("reload_applied")
    assert "listen.proxy_protocol" in reloaded["changed"]
    assert "reload_listen_unchanged" not in proxy.log_text()
    assert await _first_answer(proxy, header, source=NOT_A_BALANCER) == b"S"
    assert await _first_answer(proxy, header, source=BALANCER) == b""
    proxy.wait_for_event("proxy_header_refused", reason="untrusted")
    refused_from = {
        record["source"].rsplit(":", 1)[0]
        for record in proxy.log_events()
        if record["event"] == "proxy_header_refused"
    }
    assert refused_from == {NOT_A_BALANCER, BALANCER}


async def test_a_header_split_across_packets_is_reassembled_and_only_it_is_consumed(
    balanced: tuple[ProxyProcess, int, Path],
) -> None:
    proxy, _admin_port, _audit = balanced
    reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", proxy.port), TIMEOUT)
    writer.transport.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        header = build.v2("203.0.113.10", 44000, tlvs=build.tlv(0x01, b"postgresql"))
        for piece in (header[:5], header[5:14], header[14:30], header[30:] + SSL_REQUEST[:3]):
            writer.write(piece)
            await writer.drain()
            await asyncio.sleep(0.05)
        writer.write(SSL_REQUEST[3:])
        assert await asyncio.wait_for(reader.read(1), TIMEOUT) == b"S"
    finally:
        writer.close()


async def test_a_v2_header_longer_than_one_segment_is_read_whole(
    balanced: tuple[ProxyProcess, int, Path],
) -> None:
    proxy, _admin_port, _audit = balanced
    # Large TLVs (a balancer's certificate details, say) exceed the 536 bytes peeked per round.
    header = build.v2("203.0.113.11", 45000, tlvs=build.tlv(0x20, bytes(3000)))
    assert await _first_answer(proxy, header + SSL_REQUEST) == b"S"
