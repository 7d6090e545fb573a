"""Protocol-agnostic upstream pool: acquire, release, FIFO wait queue, reset, idle and lifetime recycling,
and a small circuit breaker that retries an unreachable server with backoff while clients wait."""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar

import structlog

from proxy.errors import ProxyError, TooManyConnections, UpstreamUnavailable, caused_by

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
C_contra = TypeVar("C_contra", contravariant=True)


class Waiter(Protocol[C_contra]):
    """One place in the line: an asyncio.Future, or an object of a client session's that acts on
    the answer at once, so a connection given back goes straight on to the next client."""

    def done(self) -> bool: ...

    def set_result(self, result: C_contra, /) -> None: ...

    def set_exception(self, exception: BaseException, /) -> None: ...

    def cancel(self) -> bool: ...


# The pool hands its "this connection has closed" callback to the connector, so a connection
# that dies on its own (server restart, network loss) frees its slot exactly once.
Connector = Callable[[Callable[[C], None]], Awaitable[C]]
Resetter = Callable[[C], Awaitable[bool]]
# A cheap look at the server (a TCP connect, say) for a pool with no connection to vouch for it:
# returns when the server can be reached, raises ServerUnreachable when it cannot.
Probe = Callable[[], Awaitable[None]]
# How often an idle pool with no server connection probes its server (and how long a probe's
# answer stands for readiness checks).
DEFAULT_PROBE_INTERVAL = 5.0


class ServerUnreachable(Exception):
    """The connector could not reach the server for a reason that may pass (refused, timed out, reset,
    unreachable, starting up): the pool retries with backoff while clients wait. Any other exception
    from the connector (a wrong password, a failed certificate check) fails the waiting client at once.
    The text is for the operator's log only."""


@dataclass(frozen=True, slots=True)
class PoolSettings:
    size: int
    min_idle: int
    max_client_wait: float
    idle_timeout: float
    lifetime: float
    connect_timeout: float
    # Backoff between attempts while the server is unreachable: doubles from retry_delay up to
    # retry_max_delay, with jitter.
    retry_delay: float = 0.25
    retry_max_delay: float = 5.0


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
    upstream_up: bool = True


class UpstreamPool(Generic[C]):
    """Server connections for one route. Waiting clients are served strictly first come, first served."""

    def __init__(
        self,
        name: str,
        settings: PoolSettings,
        connect: Connector[C],
        reset: Resetter[C],
        on_upstream_change: Callable[[bool], None] | None = None,
        *,
        probe: Probe | None = None,
        probe_interval: float = DEFAULT_PROBE_INTERVAL,
    ) -> None:
        self.name = name
        self.settings = settings
        self._connect = connect
        self._reset = reset
        # Most recently used last: reusing the warmest connection lets cold ones reach idle_timeout.
        self._idle: deque[C] = deque()
        # Clients in line for a connection, with their deadlines; only live waiters are kept.
        self._waiters: deque[tuple[float, Waiter[C]]] = deque()
        self._expiry: asyncio.TimerHandle | None = None
        self._expiry_at = 0.0  # the loop time _expiry fires at, while it is set
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
        # The breaker: up, or down since a monotonic time. While down, one open at a time probes the
        # server (a single retrying task while clients wait, else the maintenance tick) after a backoff.
        self._down_since: float | None = None
        self._failed_attempts = 0
        self._next_attempt_at = 0.0
        self._probing = False
        self._on_upstream_change = on_upstream_change
        # Without a connection or a connect under way nothing tells the pool that its server went
        # away: the maintenance tick (and a readiness check) probe it, so that the breaker, and the
        # metric and readiness that follow the breaker, see a quiet outage too.
        self._probe = probe
        self._probe_interval = probe_interval
        self._probed_at = -probe_interval
        self._probing_idle: asyncio.Task[None] | None = None

    @property
    def upstream_up(self) -> bool:
        """False from a failed connect (or probe) for a transient reason until a connect succeeds again."""
        return self._down_since is None

    async def check_upstream(self) -> bool:
        """Whether the server is reachable, as the breaker says; a pool with no connection to vouch
        for it probes first, unless it did within the probe interval (one probe at a time)."""
        self._probe_if_idle()
        probing = self._probing_idle
        if probing is not None:
            await asyncio.shield(probing)
        return self.upstream_up

    def _probe_if_idle(self) -> None:
        if (
            self._probe is None
            or self._closing
            or self._probing_idle is not None
            or self._down_since is not None  # the breaker probes with real connects meanwhile
            or self._members
            or self._opening
            or time.monotonic() - self._probed_at < self._probe_interval
        ):
            return
        self._probed_at = time.monotonic()
        task = asyncio.ensure_future(self._probe_idle(self._probe))
        self._probing_idle = task
        self._tasks.add(task)
        task.add_done_callback(self._idle_probe_done)

    async def _probe_idle(self, probe: Probe) -> None:
        try:
            async with asyncio.timeout(self.settings.connect_timeout * 2):
                await probe()
        except (ServerUnreachable, TimeoutError) as exc:
            # A connection opened meanwhile has the better word on it.
            if not self._members and not self._closing:
                self._note_unreachable(str(exc) or "probe timed out", probe=False)

    def _idle_probe_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if self._probing_idle is task:
            self._probing_idle = None

    # --- acquire / release ---

    async def acquire(self) -> C:
        """A clean server connection, waiting up to max_client_wait behind earlier clients."""
        waiter: asyncio.Future[C] = asyncio.get_running_loop().create_future()
        self.request(waiter)
        try:
            return await waiter
        except asyncio.CancelledError:
            self.withdraw(waiter)
            raise

    def request(self, waiter: Waiter[C], waiting_since: float | None = None) -> None:
        """Join the line for a connection: ``waiter`` gets one, or max_client_wait after
        ``waiting_since`` (its client may have waited already, for its terminal's share of the
        pool; default now) TooManyConnections (08001 UpstreamUnavailable while the server is
        down). The data path passes a waiter that acts at once: no task, no extra turn of the
        event loop."""
        if self._closing:
            waiter.set_exception(UpstreamUnavailable("the proxy is shutting down"))
            return
        connection = self.try_acquire()
        if connection is not None:
            waiter.set_result(connection)
            return
        since = time.monotonic() if waiting_since is None else waiting_since
        deadline = since + self.settings.max_client_wait
        self._waiters.append((deadline, waiter))
        if self._expiry is None or deadline < self._expiry_at:
            self._arm_expiry()
        self._serve_waiters()

    def withdraw(self, waiter: Waiter[C]) -> None:
        """The client behind ``waiter`` is gone: leave the line, passing on a connection a future
        was handed but nobody took (a waiter that acts at once has already taken its own)."""
        if isinstance(waiter, asyncio.Future) and waiter.done() and not waiter.cancelled():
            if waiter.exception() is None:
                self._hand_over(waiter.result())
            return
        waiter.cancel()
        for index, (_deadline, queued) in enumerate(self._waiters):
            if queued is waiter:
                del self._waiters[index]
                break

    def _arm_expiry(self) -> None:
        """One timer per pool, at the earliest deadline in the line: mostly the head's, but a
        client that waited for its share first joins with less of max_client_wait left."""
        if self._expiry is not None:
            self._expiry.cancel()
        self._expiry = None
        if self._waiters:
            self._expiry_at = min(deadline for deadline, _waiter in self._waiters)
            delay = max(0.0, self._expiry_at - time.monotonic())
            self._expiry = asyncio.get_running_loop().call_later(delay, self._expire_waiters)

    def _expire_waiters(self) -> None:
        now = time.monotonic()
        expired = [entry for entry in self._waiters if entry[0] <= now]
        if expired:
            # Rebuilt rather than popped from the head: deadlines are not in line order.
            self._waiters = deque(entry for entry in self._waiters if entry[0] > now)
        for _deadline, waiter in expired:
            if not waiter.done():
                waiter.set_exception(self._wait_over())
        self._expiry = None
        self._arm_expiry()

    def _wait_over(self) -> ProxyError:
        if self._down_since is not None:
            # The wait was for a server that did not come back in time, not for a busy pool.
            return UpstreamUnavailable(
                "could not connect to the database server",
                hint="the database server is unreachable; try again shortly",
            )
        return TooManyConnections(
            f"no server connection became free within {self.settings.max_client_wait:g} s",
            hint="the pool is saturated; try again shortly",
        )

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
        waiter = self._next_waiter()
        if waiter is None:
            self._idle.append(connection)
        else:
            waiter.set_result(connection)

    def _next_waiter(self) -> Waiter[C] | None:
        """Take the first client in line that still waits (a cancelled future may linger)."""
        while self._waiters:
            _deadline, waiter = self._waiters.popleft()
            if not waiter.done():
                return waiter
        return None

    def _take_idle(self) -> C | None:
        now = time.monotonic()
        while self._idle:
            connection = self._idle.pop()
            if connection.usable and now - connection.created_at <= self.settings.lifetime:
                return connection
            connection.close()
        return None

    def _serve_waiters(self) -> None:
        """Open connections for waiters that have none coming, while there is room in the pool."""
        if self._closing:
            return
        self._start_opens(min(self._live_waiters() - self._opening_for_waiters, self._room()))

    def _live_waiters(self) -> int:
        return len(self._waiters)  # only live waiters are kept

    def _room(self) -> int:
        room = self.settings.size - len(self._members) - self._opening
        if self._down_since is not None:
            # No thundering herd on a server that is down: one attempt at a time probes it.
            room = min(room, 1 - self._opening)
        return room

    def _start_opens(self, count: int) -> None:
        for _ in range(max(0, count)):
            self._opening += 1
            self._opening_for_waiters += 1
            self._spawn(self._open_for_waiter())

    async def _open_for_waiter(self) -> None:
        """Open one connection for the first waiter (or the idle list); counted by the caller."""
        try:
            outcome = await self._open_retrying()
        finally:
            self._opening -= 1
            self._opening_for_waiters -= 1
        if isinstance(outcome, UpstreamUnavailable):
            self._fail_first_waiter(outcome)
        elif outcome is not None:
            self._members.add(outcome)
            self._opened_total += 1
            self._hand_over(outcome)
        # After a failure the waiters behind get an attempt of their own rather than sitting out
        # max_client_wait in a pool that has room; after a recovery every waiter gets one.
        self._serve_waiters()

    async def _open_retrying(self) -> C | UpstreamUnavailable | None:
        """A connection, or the error for the first waiter; transient failures are retried with backoff
        while a client still waits and no other task already probes. None: given up (the waiters stay
        in line: the probing task or a connection coming back serves them)."""
        probing = False
        try:
            while True:
                delay = self._next_attempt_at - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
                    if probing and not self._live_waiters():
                        return None
                try:
                    return await self._attempt()
                except ServerUnreachable:
                    pass
                except UpstreamUnavailable as exc:
                    return exc
                if self._closing or (self._probing and not probing) or not self._live_waiters():
                    return None
                probing = self._probing = True
        finally:
            if probing:
                self._probing = False

    async def _attempt(self) -> C:
        """One connect; a transient failure raises ServerUnreachable, any other UpstreamUnavailable."""
        probe = self._down_since is not None
        try:
            async with asyncio.timeout(self.settings.connect_timeout * 2):
                connection = await self._connect(self._connection_closed)
        except (ServerUnreachable, TimeoutError) as exc:
            self._connect_failures += 1
            self._note_unreachable(str(exc) or "connect timed out", probe=probe)
            raise caused_by(ServerUnreachable(str(exc)), exc) from exc
        except Exception as exc:
            self._connect_failures += 1
            log.warning("server_connect_failed", pool=self.name, error=str(exc) or type(exc).__name__)
            # The server answered (it refused us): it is up, only this route cannot use it.
            self._note_reachable()
            raise caused_by(UpstreamUnavailable("could not connect to the database server"), exc) from exc
        self._note_reachable()
        return connection

    def _note_unreachable(self, error: str, *, probe: bool) -> None:
        """A transient failure. ``probe``: the attempt began while the server was known down, so it
        lengthens the backoff; attempts that were in flight when it went away count once together."""
        now = time.monotonic()
        if self._down_since is None:
            self._down_since = now
            self._failed_attempts = 0
            log.error("upstream_down", pool=self.name, error=error)
            if self._on_upstream_change is not None:
                self._on_upstream_change(False)
        elif not probe:
            return
        else:
            log.info("server_connect_failed", pool=self.name, error=error, attempts=self._failed_attempts + 1)
        self._failed_attempts += 1
        delay = min(
            self.settings.retry_max_delay, self.settings.retry_delay * 2 ** min(self._failed_attempts - 1, 30)
        )
        # Equal jitter: never sooner than half the delay, and the proxies of a fleet that lost the same
        # server do not knock on it in step when it comes back.
        self._next_attempt_at = now + delay / 2 + random.uniform(0, delay / 2)

    def _note_reachable(self) -> None:
        self._failed_attempts = 0
        self._next_attempt_at = 0.0
        if self._down_since is not None:
            log.warning("upstream_up", pool=self.name, down_s=round(time.monotonic() - self._down_since, 3))
            self._down_since = None
            if self._on_upstream_change is not None:
                self._on_upstream_change(True)

    def _fail_first_waiter(self, error: Exception) -> None:
        waiter = self._next_waiter()
        if waiter is not None:
            waiter.set_exception(error)

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
        missing = self.settings.min_idle - len(self._idle) - self._opening
        if self._down_since is not None and time.monotonic() >= self._next_attempt_at:
            # Perhaps nobody is asking for a connection: probe anyway, so the pool (and readyz) see the
            # server come back; the connection then waits in the idle list.
            missing = max(missing, 1)
        if not self._closing:
            self._start_opens(min(missing, self._room()))
        self._probe_if_idle()

    def close_idle(self) -> int:
        """Close the idle connections now (an operator's DROP DATABASE would wait for them); returns
        how many. Lent ones go on; min_idle and waiting clients open new ones as usual."""
        idle = list(self._idle)
        for connection in idle:
            connection.close()
        return len(idle)

    def stats(self) -> PoolStats:
        return PoolStats(
            name=self.name,
            size=self.settings.size,
            active=len(self._members) - len(self._idle),
            idle=len(self._idle),
            opening=self._opening,
            waiting=self._live_waiters(),
            opened_total=self._opened_total,
            connect_failures_total=self._connect_failures,
            upstream_up=self._down_since is None,
        )

    async def close(self) -> None:
        self._closing = True
        if self._expiry is not None:
            self._expiry.cancel()
        while (waiter := self._next_waiter()) is not None:
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
