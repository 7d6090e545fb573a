"""Protocol-agnostic upstream pool: acquire, release, FIFO wait queue, reset, idle and lifetime recycling."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar

import structlog

from proxy.errors import TooManyConnections, UpstreamUnavailable

log = structlog.get_logger("pos_proxy.pool")


class PooledConnection(Protocol):
    @property
    def usable(self) -> bool: ...

    @property
    def created_at(self) -> float: ...

    @property
    def idle_since(self) -> float: ...

    def close(self) -> None: ...


C = TypeVar("C", bound=PooledConnection)

# The pool hands its "this connection has closed" callback to the connector, so a connection
# that dies on its own (server restart, network loss) frees its slot exactly once.
Connector = Callable[[Callable[[C], None]], Awaitable[C]]
Resetter = Callable[[C], Awaitable[bool]]


@dataclass(frozen=True, slots=True)
class PoolSettings:
    size: int
    min_idle: int
    max_client_wait: float
    idle_timeout: float
    lifetime: float
    connect_timeout: float


@dataclass(frozen=True, slots=True)
class PoolStats:
    name: str
    size: int
    active: int
    idle: int
    opening: int
    waiting: int
    opened_total: int
    connect_failures_total: int


class UpstreamPool(Generic[C]):
    """Server connections for one route. Waiting clients are served strictly first come, first served."""

    def __init__(self, name: str, settings: PoolSettings, connect: Connector[C], reset: Resetter[C]) -> None:
        self.name = name
        self.settings = settings
        self._connect = connect
        self._reset = reset
        # Most recently used last: reusing the warmest connection lets cold ones reach idle_timeout.
        self._idle: deque[C] = deque()
        # Clients in line for a connection, with their deadlines; only live futures are kept.
        self._waiters: deque[tuple[float, asyncio.Future[C]]] = deque()
        self._expiry: asyncio.TimerHandle | None = None
        self._members: set[C] = set()
        self._opening = 0
        # Of ``_opening``: opens whose connection goes to the first waiter (``_open_for_waiter``), so a
        # waiter behind one of them does not need an open of its own.
        self._opening_for_waiters = 0
        # Released connections whose reset is still pending: close() must close them itself, since a
        # reset task cancelled before it ran never gets the chance to.
        self._resetting: set[C] = set()
        self._opened_total = 0
        self._connect_failures = 0
        self._tasks: set[asyncio.Task[None]] = set()
        self._closing = False

    # --- acquire / release ---

    async def acquire(self) -> C:
        """A clean server connection, waiting up to max_client_wait behind earlier clients."""
        waiter = self.request()
        try:
            return await waiter
        except asyncio.CancelledError:
            self.withdraw(waiter)
            raise

    def request(self) -> asyncio.Future[C]:
        """Join the line for a connection; the future gets one, or TooManyConnections after
        max_client_wait. For callers on the data path, which add a callback instead of a task."""
        waiter: asyncio.Future[C] = asyncio.get_running_loop().create_future()
        if self._closing:
            waiter.set_exception(UpstreamUnavailable("the proxy is shutting down"))
            return waiter
        connection = self.try_acquire()
        if connection is not None:
            waiter.set_result(connection)
            return waiter
        self._waiters.append((time.monotonic() + self.settings.max_client_wait, waiter))
        if self._expiry is None:
            self._arm_expiry()
        self._serve_waiters()
        return waiter

    def withdraw(self, waiter: asyncio.Future[C]) -> None:
        """The client behind ``waiter`` is gone: leave the line, passing on a connection it was handed."""
        if waiter.done() and not waiter.cancelled():
            if waiter.exception() is None:
                self._hand_over(waiter.result())
            return
        waiter.cancel()
        for index, (_deadline, queued) in enumerate(self._waiters):
            if queued is waiter:
                del self._waiters[index]
                break

    def _arm_expiry(self) -> None:
        """One timer per pool: every wait is max_client_wait long, so the head of the line
        always has the earliest deadline."""
        self._expiry = None
        if self._waiters:
            delay = max(0.0, self._waiters[0][0] - time.monotonic())
            self._expiry = asyncio.get_running_loop().call_later(delay, self._expire_waiters)

    def _expire_waiters(self) -> None:
        now = time.monotonic()
        while self._waiters and self._waiters[0][0] <= now:
            _deadline, waiter = self._waiters.popleft()
            if waiter.done():
                continue
            waiter.set_exception(
                TooManyConnections(
                    f"no server connection became free within {self.settings.max_client_wait:g} s",
                    hint="the pool is saturated; try again shortly",
                )
            )
        self._arm_expiry()

    def try_acquire(self) -> C | None:
        """An idle connection without waiting, if nobody is in line for one (no task, no await)."""
        if self._closing or self._waiters:
            return None
        return self._take_idle()

    def release(self, connection: C, *, reusable: bool) -> None:
        """Take a connection back; it is reset off the caller's path before anyone else gets it."""
        if not reusable or not connection.usable or self._closing:
            connection.close()
            return
        if time.monotonic() - connection.created_at > self.settings.lifetime:
            connection.close()
            return
        self._resetting.add(connection)
        self._spawn(self._reset_and_return(connection))

    def give_back(self, connection: C) -> None:
        """Return a connection that needs no reset (transaction pooling hands them back clean)."""
        if self._closing or not connection.usable:
            connection.close()
            return
        self._hand_over(connection)

    async def _reset_and_return(self, connection: C) -> None:
        try:
            clean = await self._reset(connection)
        except Exception as exc:  # a failed reset must never leak a dirty connection
            log.warning("server_reset_failed", pool=self.name, error=str(exc))
            clean = False
        except BaseException:  # cancelled (the pool is closing): the connection is in an unknown state
            self._resetting.discard(connection)
            connection.close()
            raise
        self._resetting.discard(connection)
        if clean and connection.usable and not self._closing:
            self._hand_over(connection)
        else:
            connection.close()

    def _hand_over(self, connection: C) -> None:
        while self._waiters:
            _deadline, waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(connection)
                return
        self._idle.append(connection)

    def _take_idle(self) -> C | None:
        now = time.monotonic()
        while self._idle:
            connection = self._idle.pop()
            if connection.usable and now - connection.created_at <= self.settings.lifetime:
                return connection
            connection.close()
        return None

    async def _open_connection(self) -> C:
        """Open one connection; the caller has already counted it in ``_opening``."""
        try:
            async with asyncio.timeout(self.settings.connect_timeout * 2):
                connection = await self._connect(self._connection_closed)
        except Exception as exc:
            self._connect_failures += 1
            log.warning("server_connect_failed", pool=self.name, error=str(exc) or type(exc).__name__)
            raise UpstreamUnavailable("could not connect to the database server") from exc
        finally:
            self._opening -= 1
        self._members.add(connection)
        self._opened_total += 1
        return connection

    def _serve_waiters(self) -> None:
        """Open connections for waiters that have none coming, while there is room in the pool."""
        if self._closing:
            return
        room = self.settings.size - len(self._members) - self._opening
        self._start_opens_for_waiters(min(len(self._waiters) - self._opening_for_waiters, room))

    def _start_opens_for_waiters(self, count: int) -> None:
        for _ in range(max(0, count)):
            self._opening += 1
            self._opening_for_waiters += 1
            self._spawn(self._open_for_waiter())

    async def _open_for_waiter(self) -> None:
        """Open one connection for the first waiter (or the idle list); counted by the caller."""
        try:
            try:
                connection = await self._open_connection()
            finally:
                self._opening_for_waiters -= 1
        except UpstreamUnavailable as exc:
            self._fail_first_waiter(exc)
            # The waiters behind the failed one get an attempt of their own rather than sitting out
            # max_client_wait in a pool that has room (the server may well be back).
            self._serve_waiters()
            return
        self._hand_over(connection)

    def _fail_first_waiter(self, error: Exception) -> None:
        while self._waiters:
            _deadline, waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_exception(error)
                return

    def _connection_closed(self, connection: C) -> None:
        if connection not in self._members:
            return
        self._members.discard(connection)
        with contextlib.suppress(ValueError):
            self._idle.remove(connection)
        self._serve_waiters()

    # --- maintenance ---

    def recycle(self) -> None:
        """Close idle connections past their idle timeout or lifetime; top up to min_idle."""
        now = time.monotonic()
        for connection in list(self._idle):
            expired = now - connection.created_at > self.settings.lifetime
            stale = now - connection.idle_since > self.settings.idle_timeout
            if expired or (stale and len(self._idle) > self.settings.min_idle):
                connection.close()
        missing = min(
            self.settings.min_idle - len(self._idle) - self._opening,
            self.settings.size - len(self._members) - self._opening,
        )
        if not self._closing:
            self._start_opens_for_waiters(missing)

    def stats(self) -> PoolStats:
        return PoolStats(
            name=self.name,
            size=self.settings.size,
            active=len(self._members) - len(self._idle),
            idle=len(self._idle),
            opening=self._opening,
            waiting=len(self._waiters),
            opened_total=self._opened_total,
            connect_failures_total=self._connect_failures,
        )

    async def close(self) -> None:
        self._closing = True
        if self._expiry is not None:
            self._expiry.cancel()
        while self._waiters:
            _deadline, waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_exception(UpstreamUnavailable("the proxy is shutting down"))
        while self._idle:
            self._idle.pop().close()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        # Reset tasks cancelled before they ran left their connections here.
        while self._resetting:
            self._resetting.pop().close()

    def _spawn(self, coroutine: Awaitable[None]) -> None:
        task: asyncio.Task[None] = asyncio.ensure_future(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
