"""Opening a server connection: which failures the pool may retry, and the TCP options set on it."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

from proxy.config.model import PoolConfig, RouteConfig, SSLMode, TCPKeepalive
from proxy.localpg import free_port
from proxy.pool import ServerUnreachable
from proxy.protocols.postgres import messages as m
from proxy.protocols.postgres.upstream import UpstreamConnectError, connect_server, open_socket

pytestmark = pytest.mark.timeout(10)

KEEPALIVE = TCPKeepalive(idle=42, interval=7, count=3)


def _route(port: int) -> RouteConfig:
    return RouteConfig(
        database="pos",
        host="127.0.0.1",
        port=port,
        dbname="pos",
        user="pos_proxy",
        sslmode=SSLMode.DISABLE,
        pool=PoolConfig(connect_timeout=2.0, tcp_keepalive=KEEPALIVE),
    )


Answer = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@pytest.fixture
async def fake_server() -> AsyncIterator[Callable[[Answer], Awaitable[int]]]:
    """A loopback server that reads the startup packet and answers as the test says."""
    servers: list[asyncio.Server] = []

    async def start(answer: Answer) -> int:
        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            length = int.from_bytes(await reader.readexactly(4), "big")
            await reader.readexactly(length - 4)
            await answer(reader, writer)
            writer.close()

        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        servers.append(server)
        return int(server.sockets[0].getsockname()[1])

    yield start
    for server in servers:
        server.close()
        await server.wait_closed()


def _refusing(sqlstate: str, message: str) -> Answer:
    async def answer(_reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(m.build_error_response("FATAL", sqlstate, message))
        await writer.drain()

    return answer


async def _connect(port: int) -> None:
    connection = await connect_server(_route(port), None, lambda _connection: None, {})
    connection.close()


@pytest.mark.parametrize(
    ("sqlstate", "message"),
    [
        ("57P03", "the database system is starting up"),
        ("57P01", "terminating connection due to administrator command"),
        ("53300", "sorry, too many clients already"),
    ],
)
async def test_a_server_starting_up_shutting_down_or_full_is_worth_retrying(
    fake_server: Callable[[Answer], Awaitable[int]], sqlstate: str, message: str
) -> None:
    port = await fake_server(_refusing(sqlstate, message))
    with pytest.raises(ServerUnreachable, match=sqlstate):
        await _connect(port)


@pytest.mark.parametrize(
    ("sqlstate", "message"),
    [
        ("28P01", 'password authentication failed for user "pos_proxy"'),
        ("3D000", 'database "pos" does not exist'),
        ("28000", "no pg_hba.conf entry"),
    ],
)
async def test_a_refusal_of_the_proxy_itself_is_not_retried(
    fake_server: Callable[[Answer], Awaitable[int]], sqlstate: str, message: str
) -> None:
    port = await fake_server(_refusing(sqlstate, message))
    with pytest.raises(UpstreamConnectError, match=sqlstate) as caught:
        await _connect(port)
    assert not caught.value.transient


async def test_a_closed_port_and_a_server_hanging_up_are_worth_retrying(
    fake_server: Callable[[Answer], Awaitable[int]],
) -> None:
    with pytest.raises(ServerUnreachable, match="failed"):
        await _connect(free_port())

    async def hang_up(_reader: asyncio.StreamReader, _writer: asyncio.StreamWriter) -> None:
        return

    with pytest.raises(ServerUnreachable, match="closed"):
        await _connect(await fake_server(hang_up))


async def test_server_sockets_get_nodelay_and_the_routes_keepalive_intervals() -> None:
    with socket.create_server(("127.0.0.1", 0)) as listener:
        sock = await open_socket(_route(listener.getsockname()[1]), 2.0)
        with sock:
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
            assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE)
            if hasattr(socket, "TCP_KEEPIDLE"):
                assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE) == 42
                assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL) == 7
                assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT) == 3
