"""The leanest transaction pooler we can write on the proxy's own stack: the floor of a Python
data path, for bench/run.py's `lean` configuration.

uvloop, asyncio Protocols and uvloop's TLS layer on both sides (client certificates verified,
verify-full to PostgreSQL; the proxy has its own TLS layer, proxy/tlstransport.py, on both since
2026-11-30 late). Per message it does only what any transaction pooler must:
find message boundaries, count the ReadyForQuery each Sync or Query is owed, and lend the server
connection to the next waiting client when the server is idle. No policy, audit, limits, metrics,
prepared-statement tracking, parameter sync, cancel or error handling beyond closing, and it
recognises Terminate only as the last message of a read (as pgbench and psql send it): it is a
measuring stick, not a product. If the proxy costs about what this costs, the gap to PgBouncer is
in the stack (interpreter, uvloop's TLS), not in the proxy's own code.

    python bench/lean_pooler.py --port 6433 --upstream-port 5432 --database pos --user bench \\
        --password-file pw --cert front.pem --key front.key --client-ca terminal-ca.pem \\
        --upstream-ca db-ca.pem --pool-size 20
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import ssl
import struct
from collections import deque
from collections.abc import Awaitable, Callable
from pathlib import Path

import uvloop

from proxy import allocator
from proxy.protocols.postgres import messages as m
from proxy.protocols.postgres.startup import UpstreamHandshake

_LENGTH = struct.Struct("!I")
_SYNC_POINTS = frozenset(b"SQF")  # Sync, Query, FunctionCall: each is owed one ReadyForQuery
_READY = 0x5A
_TERMINATE = 0x58
_IDLE = 0x49
_READY_ONLY = frozenset((_READY,))


def scan(buffer: bytes | bytearray, counted: frozenset[int]) -> tuple[int, int, int]:
    """Bytes of whole messages at the start, how many are of a ``counted`` type, the last one's end."""
    position = count = last_counted_end = 0
    available = len(buffer)
    unpack = _LENGTH.unpack_from
    while available - position >= 5:
        end = position + 1 + unpack(buffer, position + 1)[0]
        if end > available:
            break
        if buffer[position] in counted:
            count += 1
            last_counted_end = end
        position = end
    return position, count, last_counted_end


Connect = Callable[["Pool"], Awaitable["ServerSide"]]


class Pool:
    def __init__(self, connect: Connect, size: int) -> None:
        self.connect = connect
        self.size = size
        self.idle: list[ServerSide] = []
        self.waiting: deque[ClientSide] = deque()
        self.parameters: dict[str, str] = {}
        self._reopening: set[asyncio.Task[None]] = set()

    async def fill(self) -> None:
        for _ in range(self.size):
            self.idle.append(await self.connect(self))

    def lend(self, client: ClientSide) -> None:
        if self.idle:
            self.idle.pop().attach(client)
        else:
            self.waiting.append(client)

    def give_back(self, server: ServerSide) -> None:
        if server.closed:
            return
        while self.waiting:
            client = self.waiting.popleft()
            if not client.closed:
                server.attach(client)
                return
        self.idle.append(server)

    def replace(self, server: ServerSide) -> None:
        if server in self.idle:
            self.idle.remove(server)

        async def reopen() -> None:
            self.give_back(await self.connect(self))  # a failure shows in the log and the pool stays smaller

        task = asyncio.get_running_loop().create_task(reopen())
        self._reopening.add(task)
        task.add_done_callback(self._reopening.discard)


class ServerSide(asyncio.Protocol):
    def __init__(self, pool: Pool, handshake: UpstreamHandshake) -> None:
        self.pool = pool
        self.handshake: UpstreamHandshake | None = handshake
        self.ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.client: ClientSide | None = None
        self.closed = False
        self.owed = 0  # ReadyForQuery messages the server still owes
        self.in_transaction = False
        self.buffer = bytearray()
        self.transport: asyncio.Transport

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if not self.ready.done():
            self.ready.set_exception(ConnectionError(f"server connection lost: {exc}"))
        if self.client is not None:
            self.client.transport.close()
        self.pool.replace(self)

    def attach(self, client: ClientSide) -> None:
        self.client = client
        client.server = self
        if client.pending:
            self.send(bytes(client.pending), client.pending_owed)
            client.pending.clear()
            client.pending_owed = 0

    def send(self, data: bytes | bytearray, owed: int) -> None:
        self.owed += owed
        self.transport.write(data)

    def data_received(self, data: bytes) -> None:
        if self.handshake is not None:
            self._startup(data)
            return
        source: bytes | bytearray = data
        if self.buffer:
            self.buffer += data
            source = self.buffer
        whole, readies, last_ready_end = scan(source, _READY_ONLY)
        client = self.client
        if client is not None and whole:
            client.transport.write(source if whole == len(source) else source[:whole])
        if whole < len(source):
            self.buffer = bytearray(source[whole:])
        elif self.buffer:
            self.buffer = bytearray()
        if not readies:
            return
        self.owed -= readies
        self.in_transaction = source[last_ready_end - 1] != _IDLE
        if self.owed == 0 and not self.in_transaction:
            if client is not None:
                client.server = None
            self.client = None
            self.pool.give_back(self)
        elif self.owed == 0 and client is None:
            self.transport.close()  # its client left inside a transaction

    def _startup(self, data: bytes) -> None:
        assert self.handshake is not None
        self.buffer += data
        received = bytes(self.buffer)  # scan_frames reads bytes
        frames, consumed = m.scan_frames(received, 1 << 20)
        for kind, start, end in frames:
            reply = self.handshake.receive(kind, received[start + 5 : end])
            if reply is not None:
                self.transport.write(reply)
        del self.buffer[:consumed]
        if self.handshake.done:
            self.pool.parameters.update(self.handshake.parameters)
            self.handshake = None
            self.ready.set_result(None)


class ClientSide(asyncio.Protocol):
    def __init__(self, pool: Pool) -> None:
        self.pool = pool
        self.started = False
        self.closed = False
        self.server: ServerSide | None = None
        self.buffer = bytearray()
        self.pending = bytearray()  # whole messages waiting for a server connection
        self.pending_owed = 0
        self.transport: asyncio.Transport

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        server, self.server = self.server, None
        if server is None:
            return
        server.client = None
        if server.owed == 0 and not server.in_transaction:
            self.pool.give_back(server)
        elif server.owed == 0:
            server.transport.close()
        # else: the server's answer is still coming; data_received decides when it has.

    def data_received(self, data: bytes) -> None:
        source: bytes | bytearray = data
        if self.buffer:
            self.buffer += data
            source = self.buffer
        if not self.started:
            self._startup(source)
            return
        whole, owed, _ = scan(source, _SYNC_POINTS)
        if whole:
            chunk = source if whole == len(source) else source[:whole]
            if chunk[whole - 5] == _TERMINATE and chunk[whole - 4 : whole] == b"\x00\x00\x00\x04":
                self.transport.close()
                return
            if self.server is not None:
                self.server.send(bytes(chunk) if chunk is self.buffer else chunk, owed)
            else:
                was_waiting = bool(self.pending)
                self.pending += chunk
                self.pending_owed += owed
                if not was_waiting:
                    self.pool.lend(self)
        if whole < len(source):
            self.buffer = bytearray(source[whole:])
        elif self.buffer:
            self.buffer = bytearray()

    def _startup(self, source: bytes | bytearray) -> None:
        if len(source) < 4 or len(source) < _LENGTH.unpack_from(source)[0]:
            self.buffer = bytearray(source)
            return
        self.started = True
        self.buffer = bytearray(source[_LENGTH.unpack_from(source)[0] :])
        reply = [m.build_authentication_ok()]
        reply += [m.build_parameter_status(k, v) for k, v in self.pool.parameters.items()]
        reply += [m.build_backend_key_data(1, 1), m.build_ready_for_query(b"I")]
        self.transport.write(b"".join(reply))


def upstream_connector(args: argparse.Namespace) -> Connect:
    context = ssl.create_default_context(cafile=str(args.upstream_ca))
    password = Path(args.password_file).read_text(encoding="utf-8").strip()

    async def connect(pool: Pool) -> ServerSide:
        loop = asyncio.get_running_loop()
        sock = socket.socket()
        sock.setblocking(False)
        try:
            async with asyncio.timeout(10):
                await loop.sock_connect(sock, ("127.0.0.1", args.upstream_port))
                await loop.sock_sendall(sock, m.build_ssl_request())
                if await loop.sock_recv(sock, 1) != b"S":
                    raise ConnectionError("PostgreSQL refused TLS")
                handshake = UpstreamHandshake(
                    user=args.user, database=args.database, password=password, parameters={}
                )
                server = ServerSide(pool, handshake)
                await loop.create_connection(
                    lambda: server, sock=sock, ssl=context, server_hostname="127.0.0.1"
                )
                server.transport.write(handshake.startup_message())
                await server.ready
        except BaseException:
            sock.close()
            raise
        return server

    return connect


async def accept(listener: socket.socket, context: ssl.SSLContext, pool: Pool) -> None:
    loop = asyncio.get_running_loop()

    async def negotiate(sock: socket.socket) -> None:
        try:
            async with asyncio.timeout(10):
                request = b""
                while len(request) < 8:
                    more = await loop.sock_recv(sock, 8 - len(request))
                    if not more:
                        raise ConnectionError("closed before SSLRequest")
                    request += more
                await loop.sock_sendall(sock, b"S")
                await loop.connect_accepted_socket(lambda: ClientSide(pool), sock, ssl=context)
        except (OSError, TimeoutError, ssl.SSLError):
            sock.close()

    tasks: set[asyncio.Task[None]] = set()
    while True:
        sock, _ = await loop.sock_accept(listener)
        task = loop.create_task(negotiate(sock))
        tasks.add(task)
        task.add_done_callback(tasks.discard)


async def main(args: argparse.Namespace) -> None:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(args.cert, args.key)
    context.load_verify_locations(cafile=str(args.client_ca))
    context.verify_mode = ssl.CERT_REQUIRED
    context.num_tickets = 0
    pool = Pool(upstream_connector(args), args.pool_size)
    await pool.fill()
    listener = socket.create_server(("127.0.0.1", args.port), backlog=1024)
    listener.setblocking(False)
    await accept(listener, context, pool)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    for name in ("port", "upstream-port", "pool-size"):
        parser.add_argument(f"--{name}", type=int, required=True)
    for name in ("database", "user"):
        parser.add_argument(f"--{name}", required=True)
    for name in ("password-file", "cert", "key", "client-ca", "upstream-ca"):
        parser.add_argument(f"--{name}", type=Path, required=True)
    return parser.parse_args()


if __name__ == "__main__":
    allocator.keep_read_buffers_on_heap()  # as the proxy's event loop does
    uvloop.run(main(parse_args()))
