"""TCP relays at this end of a store link (tests/integration/netns.py): the terminals' end, which
connects over the link to the proxy, and the database's end, which the proxy reaches over the link.
This machine's kernel has no netem, so a relay is what delays a link: it holds each chunk it reads
for ``delay`` seconds before passing it on, each way, in order and without stalling the chunks
behind it.

A relay's sockets keep alive after a second of silence, as a till's libpq with
``keepalives_idle=1`` or PostgreSQL with ``tcp_keepalives_idle = 1`` would: without it, a relay
end whose peer timed out during a partition, with nothing of its own in flight, would wait for
ever and hold its PostgreSQL backend (or its till) with it.  When either side of a relayed
connection ends, the relay closes both.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
from collections.abc import Coroutine, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

_T = TypeVar("_T")

CONNECT_TIMEOUT = 3.0
CHUNK = 65536
# Chunks a relay holds per direction before it stops reading: backpressure reaches the sender.
HELD_CHUNKS = 64
KEEPALIVE_IDLE = 1
KEEPALIVE_INTERVAL = 1
# Longer than the partitions the tests make: the relay's ends outlive a partition, so that what
# ends a connection is the proxy's timeouts, not the relay's.
KEEPALIVE_COUNT = 20


def _keep_alive(writer: asyncio.StreamWriter) -> None:
    sock = writer.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, KEEPALIVE_IDLE)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, KEEPALIVE_INTERVAL)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, KEEPALIVE_COUNT)


class Relay:
    """Accepts on ``listen_host`` (a free port) and relays each connection to ``target``."""

    def __init__(self, listen_host: str, target: tuple[str, int]) -> None:
        self.listen_host = listen_host
        self.target = target
        self.port = 0
        # Seconds each chunk is held, each way; the test changes it while the relay runs (a float
        # assignment is atomic, and the relay reads it once per chunk).
        self.delay = 0.0
        self._server: asyncio.Server | None = None
        self._connections: set[asyncio.Task[None]] = set()
        self._writers: set[asyncio.StreamWriter] = set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._accepted, self.listen_host, 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        """Stop accepting and reset every relayed connection; its task then ends by itself (a task
        the server started is not to be cancelled: asyncio logs that as an error)."""
        if self._server is not None:
            self._server.close()
        for writer in self._writers:
            writer.transport.abort()
        if self._connections:
            await asyncio.wait(self._connections, timeout=CONNECT_TIMEOUT + 2)

    async def _accepted(self, near_reader: asyncio.StreamReader, near_writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._connections.add(task)
        self._writers.add(near_writer)
        try:
            await self._relay(near_reader, near_writer)
        finally:
            self._connections.discard(task)
            self._writers.discard(near_writer)

    async def _relay(self, near_reader: asyncio.StreamReader, near_writer: asyncio.StreamWriter) -> None:
        try:
            far_reader, far_writer = await asyncio.wait_for(
                asyncio.open_connection(*self.target), CONNECT_TIMEOUT
            )
        except (OSError, TimeoutError):
            near_writer.close()  # as a refused connect looks to the client: closed at once
            return
        writers = (near_writer, far_writer)
        self._writers.add(far_writer)
        for writer in writers:
            _keep_alive(writer)
        directions = [
            asyncio.create_task(self._pump(near_reader, far_writer)),
            asyncio.create_task(self._pump(far_reader, near_writer)),
        ]
        try:
            await asyncio.wait(directions, return_when=asyncio.FIRST_COMPLETED)
        finally:
            self._writers.discard(far_writer)
            for writer in writers:
                writer.close()
            for direction in directions:
                direction.cancel()
            await asyncio.gather(*directions, return_exceptions=True)

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Until the reader's end or a broken side: each chunk held ``delay`` seconds, then passed on."""
        loop = asyncio.get_running_loop()
        held: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue(HELD_CHUNKS)

        async def read() -> None:
            with contextlib.suppress(OSError):  # a reset, or a link the keepalives gave up on
                while data := await reader.read(CHUNK):
                    await held.put((loop.time() + self.delay, data))
            await held.put((loop.time() + self.delay, b""))

        reading = asyncio.create_task(read())
        try:
            while True:
                due, data = await held.get()
                await asyncio.sleep(max(0.0, due - loop.time()))
                if not data:
                    return
                writer.write(data)
                await writer.drain()
        except OSError:
            return  # the other side broke: the caller closes both
        finally:
            reading.cancel()
            await asyncio.gather(reading, return_exceptions=True)


class Relays:
    """Relays served by one event loop in a thread of its own."""

    def __init__(self) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="relays", daemon=True)
        self._relays: list[Relay] = []

    def _call(self, coroutine: Coroutine[Any, Any, _T]) -> _T:
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(timeout=10)

    def start(self) -> None:
        self._thread.start()

    def add(self, listen_host: str, target: tuple[str, int]) -> Relay:
        relay = Relay(listen_host, target)
        self._call(relay.start())
        self._relays.append(relay)
        return relay

    def close(self) -> None:
        for relay in self._relays:
            self._call(relay.close())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()


@contextmanager
def relays() -> Iterator[Relays]:
    running = Relays()
    running.start()
    try:
        yield running
    finally:
        running.close()
