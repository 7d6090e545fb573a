"""proxy.pool.UpstreamPool: pure pool logic against fake connections, connect and reset functions."""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import AsyncIterator, Callable

import pytest

from proxy.errors import TooManyConnections, UpstreamUnavailable
from proxy.pool import (
    DEFAULT_PROBE_INTERVAL,
    PoolSettings,
    PoolStats,
    Probe,
    ServerUnreachable,
    UpstreamPool,
)

pytestmark = pytest.mark.timeout(5)

_numbers = itertools.count(1)


class FakeConnection:
    """What the pool needs of a server connection; close() reports through on_closed like the real one."""

    def __init__(self, on_closed: Callable[[FakeConnection], None]) -> None:
        self.number = next(_numbers)
        self.created_at = time.monotonic()
        self.idle_since = self.created_at
        self.closed = False
        self.broken = False
        self.close_calls = 0
        self._on_closed = on_closed

    @property
    def usable(self) -> bool:
        return not self.closed and not self.broken

    def close(self) -> None:
        self.close_calls += 1
        if self.closed:
            return
        self.closed = True
        self._on_closed(self)

    def lose(self) -> None:
        """The server went away: the transport reports connection_lost, nobody called close()."""
        self.closed = True
        self._on_closed(self)

    def __repr__(self) -> str:
        return f"<FakeConnection {self.number}{' closed' if self.closed else ''}>"


class Backend:
    """Connect and reset functions with knobs: failures, a gate that holds connects, reset results."""

    def __init__(self) -> None:
        self.opened: list[FakeConnection] = []
        self.resets: list[FakeConnection] = []
        self.connect_attempts = 0
        self.fail_next = 0
        # Connects that fail as if the server were down (retried by the pool), and when they happened.
        self.unreachable_next = 0
        self.attempted_at: list[float] = []
        self.in_flight = 0
        self.most_in_flight = 0
        self.gate: asyncio.Event | None = None
        self.reset_result: bool | Exception = True
        self.break_during_reset = False

    async def connect(self, on_closed: Callable[[FakeConnection], None]) -> FakeConnection:
        self.connect_attempts += 1
        self.attempted_at.append(time.monotonic())
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        try:
            if self.gate is not None:
                await self.gate.wait()
            await asyncio.sleep(0)
        finally:
            self.in_flight -= 1
        if self.unreachable_next:
            self.unreachable_next -= 1
            raise ServerUnreachable("connect to 10.0.0.5:5432 refused")
        if self.fail_next:
            self.fail_next -= 1
            raise ConnectionRefusedError("connect to 10.0.0.5:5432 refused")
        connection = FakeConnection(on_closed)
        self.opened.append(connection)
        return connection

    async def reset(self, connection: FakeConnection) -> bool:
        self.resets.append(connection)
        await asyncio.sleep(0)
        if isinstance(self.reset_result, Exception):
            raise self.reset_result
        connection.idle_since = time.monotonic()
        if self.break_during_reset:
            connection.broken = True
        return self.reset_result


Pool = UpstreamPool[FakeConnection]
MakePool = Callable[..., Pool]


@pytest.fixture
def backend() -> Backend:
    return Backend()


@pytest.fixture
async def make_pool(backend: Backend) -> AsyncIterator[MakePool]:
    pools: list[Pool] = []

    def make(
        on_upstream_change: Callable[[bool], None] | None = None,
        probe: Probe | None = None,
        probe_interval: float = DEFAULT_PROBE_INTERVAL,
        **overrides: float,
    ) -> Pool:
        values: dict[str, float] = {
            "size": 2,
            "min_idle": 0,
            "max_client_wait": 0.5,
            "idle_timeout": 60.0,
            "lifetime": 3600.0,
            "connect_timeout": 0.25,
            "retry_delay": 0.01,
            "retry_max_delay": 0.04,
        }
        values.update(overrides)
        settings = PoolSettings(
            size=int(values["size"]),
            min_idle=int(values["min_idle"]),
            max_client_wait=values["max_client_wait"],
            idle_timeout=values["idle_timeout"],
            lifetime=values["lifetime"],
            connect_timeout=values["connect_timeout"],
            retry_delay=values["retry_delay"],
            retry_max_delay=values["retry_max_delay"],
        )
        pool: Pool = UpstreamPool(
            "pos",
            settings,
            backend.connect,
            backend.reset,
            on_upstream_change,
            probe=probe,
            probe_interval=probe_interval,
        )
        pools.append(pool)
        return pool

    yield make
    for pool in pools:
        await pool.close()


async def settle() -> None:
    """Let every ready task run (spawned resets and opens, queued waiters)."""
    for _ in range(20):
        await asyncio.sleep(0)


async def eventually(predicate: Callable[[], bool], timeout: float = 0.5) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.001)


async def release_and_wait(pool: Pool, connection: FakeConnection) -> None:
    idle_before = pool.stats().idle
    pool.release(connection, reusable=True)
    await eventually(lambda: pool.stats().idle == idle_before + 1)


def counts(pool: Pool) -> tuple[int, int, int, int, int, int]:
    """(active, idle, opening, waiting, opened_total, connect_failures_total)."""
    stats = pool.stats()
    return (
        stats.active,
        stats.idle,
        stats.opening,
        stats.waiting,
        stats.opened_total,
        stats.connect_failures_total,
    )


async def queue_waiter(pool: Pool) -> asyncio.Task[FakeConnection]:
    waiting = pool.stats().waiting
    task = asyncio.ensure_future(pool.acquire())
    await eventually(lambda: pool.stats().waiting == waiting + 1)
    return task


# --- acquire and release -----------------------------------------------------------------------------------


async def test_acquire_opens_connections_up_to_size(make_pool: MakePool, backend: Backend) -> None:
    pool = make_pool(size=2, max_client_wait=0.05)

    first = await pool.acquire()
    second = await pool.acquire()

    assert first is not second
    assert backend.opened == [first, second]
    assert pool.stats().active == 2
    with pytest.raises(TooManyConnections):
        await pool.acquire()
    assert backend.connect_attempts == 2


async def test_released_connection_is_reset_and_the_same_object_reused(
    make_pool: MakePool, backend: Backend
) -> None:
    pool = make_pool()
    first = await pool.acquire()

    await release_and_wait(pool, first)
    again = await pool.acquire()

    assert again is first
    assert backend.resets == [first]
    assert backend.opened == [first]
    assert not first.closed


async def test_most_recently_released_connection_is_reused_first(make_pool: MakePool) -> None:
    pool = make_pool(size=3)
    a, b, c = [await pool.acquire() for _ in range(3)]
    for connection in (a, b, c):
        await release_and_wait(pool, connection)

    assert [await pool.acquire() for _ in range(3)] == [c, b, a]


async def test_give_back_returns_a_connection_without_reset(make_pool: MakePool, backend: Backend) -> None:
    pool = make_pool()
    first = await pool.acquire()

    pool.give_back(first)

    assert pool.stats().idle == 1
    assert await pool.acquire() is first
    assert backend.resets == []


async def test_release_not_reusable_closes_and_frees_the_slot(make_pool: MakePool, backend: Backend) -> None:
    pool = make_pool(size=1)
    first = await pool.acquire()

    pool.release(first, reusable=False)

    assert first.closed
    assert pool.stats().active == 0
    assert pool.stats().idle == 0
    second = await pool.acquire()
    assert second is not first
    assert backend.resets == []


async def test_release_of_an_unusable_connection_closes_it(make_pool: MakePool, backend: Backend) -> None:
    pool = make_pool(size=1)
    first = await pool.acquire()
    first.broken = True

    pool.release(first, reusable=True)

    assert first.close_calls == 1
    assert backend.resets == []
    assert pool.stats().active == 0


@pytest.mark.parametrize("outcome", [False, RuntimeError("DISCARD ALL failed")], ids=["false", "raises"])
async def test_failing_reset_closes_the_connection(
    make_pool: MakePool, backend: Backend, outcome: bool | Exception
) -> None:
    pool = make_pool(size=1)
    first = await pool.acquire()
    backend.reset_result = outcome

    pool.release(first, reusable=True)
    await eventually(lambda: first.closed)

    assert backend.resets == [first]
    assert pool.stats().idle == 0
    assert pool.stats().active == 0
    backend.reset_result = True
    assert await pool.acquire() is not first


async def test_connection_dirty_by_the_end_of_its_reset_is_closed(
    make_pool: MakePool, backend: Backend
) -> None:
    pool = make_pool(size=1)
    first = await pool.acquire()
    backend.break_during_reset = True  # reset says clean, but the connection broke meanwhile

    pool.release(first, reusable=True)
    await eventually(lambda: first.closed)

    assert pool.stats().idle == 0


# --- waiting -----------------------------------------------------------------------------------------------


class RecordingWaiter:
    """A waiter that acts when answered, as a client session does under transaction pooling."""

    def __init__(self) -> None:
        self.result: FakeConnection | None = None
        self.error: BaseException | None = None
        self.cancelled = False

    def done(self) -> bool:
        return self.result is not None or self.error is not None or self.cancelled

    def set_result(self, result: FakeConnection, /) -> None:
        self.result = result

    def set_exception(self, exception: BaseException, /) -> None:
        self.error = exception

    def cancel(self) -> bool:
        self.cancelled = True
        return True


async def test_a_connection_given_back_reaches_the_next_waiter_in_the_same_call(make_pool: MakePool) -> None:
    pool = make_pool(size=1, max_client_wait=0.5)
    held = await pool.acquire()
    first, second = RecordingWaiter(), RecordingWaiter()
    pool.request(first)
    pool.request(second)
    assert pool.stats().waiting == 2

    pool.give_back(held)  # no await between giving back and the waiter holding it

    assert first.result is held and second.result is None
    assert pool.stats().waiting == 1
    pool.withdraw(second)
    assert second.cancelled and pool.stats().waiting == 0
    pool.give_back(held)
    assert pool.stats().idle == 1  # the withdrawn waiter got nothing


async def test_a_waiter_that_acts_at_once_times_out_like_a_future(make_pool: MakePool) -> None:
    pool = make_pool(size=1, max_client_wait=0.05)
    held = await pool.acquire()
    waiter = RecordingWaiter()
    pool.request(waiter)
    await eventually(waiter.done)
    assert isinstance(waiter.error, TooManyConnections)
    assert pool.stats().waiting == 0
    pool.give_back(held)
    assert pool.stats().idle == 1


async def test_a_waiter_that_waited_elsewhere_first_gives_up_at_its_own_deadline(make_pool: MakePool) -> None:
    """A client that spent most of max_client_wait in its terminal's line for a share joins the
    pool's line behind someone with a later deadline: it still fails max_client_wait after it
    started waiting, and the one ahead of it keeps its place and its deadline."""
    pool = make_pool(size=1, max_client_wait=0.5)
    held = await pool.acquire()
    ahead = RecordingWaiter()
    pool.request(ahead)
    behind = RecordingWaiter()
    started = time.monotonic() - 0.45  # it has waited 0.45 s for its share already
    pool.request(behind, started)
    await eventually(behind.done)
    assert isinstance(behind.error, TooManyConnections)
    assert time.monotonic() - started < 0.5 + 0.2
    assert not ahead.done()
    assert pool.stats().waiting == 1
    pool.give_back(held)
    assert ahead.done() and ahead.error is None


async def test_waiters_are_served_first_come_first_served(make_pool: MakePool, backend: Backend) -> None:
    pool = make_pool(size=1, max_client_wait=0.5)
    held = await pool.acquire()
    served: list[str] = []

    async def client(name: str) -> None:
        connection = await pool.acquire()
        served.append(name)
        await asyncio.sleep(0.001)
        pool.release(connection, reusable=True)

    tasks = []
    for name in ("first", "second", "third"):
        tasks.append(asyncio.ensure_future(client(name)))
        await eventually(lambda: pool.stats().waiting == len(tasks))

    pool.release(held, reusable=True)
    await asyncio.wait_for(asyncio.gather(*tasks), 2)

    assert served == ["first", "second", "third"]
    assert backend.opened == [held]


async def test_newcomer_does_not_overtake_waiters(make_pool: MakePool) -> None:
    pool = make_pool(size=1, max_client_wait=0.5)
    held = await pool.acquire()
    waiter = await queue_waiter(pool)

    pool.give_back(held)
    newcomer = asyncio.ensure_future(pool.acquire())

    assert await asyncio.wait_for(waiter, 1) is held
    assert not newcomer.done()
    pool.give_back(held)
    assert await asyncio.wait_for(newcomer, 1) is held


async def test_waiter_timeout_raises_too_many_connections_and_leaves_no_waiter(make_pool: MakePool) -> None:
    pool = make_pool(size=1, max_client_wait=0.05)
    held = await pool.acquire()

    started = time.monotonic()
    with pytest.raises(TooManyConnections) as caught:
        await pool.acquire()

    assert 0.04 <= time.monotonic() - started < 1
    assert caught.value.sqlstate == "53300"
    assert caught.value.hint
    assert pool.stats().waiting == 0
    assert not pool._waiters
    # The connection goes back to the pool, not to the waiter that gave up.
    await release_and_wait(pool, held)
    assert await pool.acquire() is held


async def test_cancelled_waiter_passes_on_a_connection_handed_to_it(make_pool: MakePool) -> None:
    pool = make_pool(size=1)
    held = await pool.acquire()
    waiter = await queue_waiter(pool)

    pool.give_back(held)  # hands it straight to the waiter's future ...
    waiter.cancel()  # ... which is cancelled before it could run
    with pytest.raises(asyncio.CancelledError):
        await waiter

    assert pool.stats().idle == 1
    assert pool.stats().waiting == 0
    assert await pool.acquire() is held


async def test_cancelled_waiter_passes_a_handed_connection_to_the_next_waiter(make_pool: MakePool) -> None:
    pool = make_pool(size=1)
    held = await pool.acquire()
    first = await queue_waiter(pool)
    second = await queue_waiter(pool)

    pool.give_back(held)
    first.cancel()

    assert await asyncio.wait_for(second, 1) is held
    assert first.cancelled()


async def test_cancelled_waiter_leaves_the_queue(make_pool: MakePool) -> None:
    pool = make_pool(size=1)
    held = await pool.acquire()
    waiter = await queue_waiter(pool)

    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter

    assert pool.stats().waiting == 0
    assert not pool._waiters
    await release_and_wait(pool, held)


# --- connect failures --------------------------------------------------------------------------------------


async def test_connect_failure_raises_upstream_unavailable_and_frees_the_slot(
    make_pool: MakePool, backend: Backend
) -> None:
    pool = make_pool(size=1)
    backend.fail_next = 1

    with pytest.raises(UpstreamUnavailable) as caught:
        await pool.acquire()

    assert caught.value.sqlstate == "08001"
    assert "10.0.0.5" not in caught.value.message  # no internals for the client
    assert isinstance(caught.value.__cause__, ConnectionRefusedError)
    stats = pool.stats()
    assert (stats.opening, stats.active, stats.opened_total, stats.connect_failures_total) == (0, 0, 0, 1)
    assert await pool.acquire() is backend.opened[0]


async def test_connect_that_hangs_fails_as_upstream_unavailable(
    make_pool: MakePool, backend: Backend
) -> None:
    pool = make_pool(size=1, connect_timeout=0.05)
    backend.gate = asyncio.Event()

    with pytest.raises(UpstreamUnavailable):
        await asyncio.wait_for(pool.acquire(), 2)

    # A hung connect counts as the server being unreachable: retried until the client's wait is over.
    assert pool.stats().connect_failures_total >= 1
    assert not pool.stats().upstream_up
    await eventually(lambda: pool.stats().opening == 0, 1)
    backend.gate.set()
    assert await pool.acquire() in backend.opened


async def test_connect_failure_for_a_waiter_fails_that_waiter(make_pool: MakePool, backend: Backend) -> None:
    pool = make_pool(size=1)
    held = await pool.acquire()
    waiter = await queue_waiter(pool)
    backend.fail_next = 1

    held.lose()

    with pytest.raises(UpstreamUnavailable):
        await asyncio.wait_for(waiter, 1)
    assert pool.stats().waiting == 0
    assert pool.stats().connect_failures_total == 1


async def test_waiter_behind_a_failed_connect_is_not_stranded(make_pool: MakePool, backend: Backend) -> None:
    pool = make_pool(size=1, max_client_wait=0.3)
    held = await pool.acquire()
    first = await queue_waiter(pool)
    second = await queue_waiter(pool)
    backend.fail_next = 1  # the server refuses once, then is back

    held.lose()

    with pytest.raises(UpstreamUnavailable):
        await asyncio.wait_for(first, 1)
    # The pool is empty, has room and the server accepts again: the second waiter must not sit out
    # its whole max_client_wait and get 53300.
    connection = await asyncio.wait_for(second, 1)
    assert connection in backend.opened


async def test_waiter_with_a_connect_in_flight_gets_no_second_connect(
    make_pool: MakePool, backend: Backend
) -> None:
    pool = make_pool(size=2)
    a, b = await pool.acquire(), await pool.acquire()
    waiter = await queue_waiter(pool)
    backend.gate = asyncio.Event()

    a.lose()  # room for one: a connect starts for the waiter and is held at the gate
    await eventually(lambda: backend.connect_attempts == 3)
    b.lose()  # more room, but the only waiter already has a connect coming
    await settle()

    assert backend.connect_attempts == 3
    assert pool.stats().opening == 1
    backend.gate.set()
    assert await asyncio.wait_for(waiter, 1) is backend.opened[-1]
    await settle()
    assert len(backend.opened) == 3
    assert counts(pool) == (1, 0, 0, 0, 3, 0)


async def test_each_waiter_without_a_connect_in_flight_gets_one(
    make_pool: MakePool, backend: Backend
) -> None:
    pool = make_pool(size=3)
    a, b, c = [await pool.acquire() for _ in range(3)]
    first = await queue_waiter(pool)
    second = await queue_waiter(pool)
    backend.gate = asyncio.Event()

    a.lose()
    await eventually(lambda: backend.connect_attempts == 4)
    b.lose()
    c.lose()
    await settle()

    assert backend.connect_attempts == 5  # one per waiter, not one per free slot
    backend.gate.set()
    served = await asyncio.wait_for(asyncio.gather(first, second), 1)
    assert set(served) == set(backend.opened[3:])
    assert counts(pool) == (2, 0, 0, 0, 5, 0)


# --- connections that end on their own ---------------------------------------------------------------------


async def test_connection_closing_on_its_own_frees_its_slot_for_a_waiter(
    make_pool: MakePool, backend: Backend
) -> None:
    pool = make_pool(size=1)
    held = await pool.acquire()
    waiter = await queue_waiter(pool)

    held.lose()
    replacement = await asyncio.wait_for(waiter, 1)

    assert replacement is not held
    assert backend.opened == [held, replacement]
    assert pool.stats().active == 1


async def test_idle_connection_closing_on_its_own_leaves_the_pool(
    make_pool: MakePool, backend: Backend
) -> None:
    pool = make_pool(size=1)
    first = await pool.acquire()
    await release_and_wait(pool, first)

    first.lose()

    assert pool.stats().idle == 0
    assert pool.stats().active == 0
    assert await pool.acquire() is not first


async def test_closing_twice_frees_the_slot_once(make_pool: MakePool) -> None:
    pool = make_pool(size=2, max_client_wait=0.05)
    first = await pool.acquire()
    await pool.acquire()

    first.lose()
    first._on_closed(first)  # a second report of the same loss must not free a second slot

    assert pool.stats().active == 1
    await pool.acquire()
    assert pool.stats().active == 2
    with pytest.raises(TooManyConnections):
        await pool.acquire()


# --- lifetime and idle recycling ---------------------------------------------------------------------------


async def test_connection_past_lifetime_is_closed_on_release(make_pool: MakePool, backend: Backend) -> None:
    pool = make_pool(size=1, lifetime=60)
    first = await pool.acquire()
    first.created_at -= 61

    pool.release(first, reusable=True)

    assert first.closed
    assert backend.resets == []
    assert pool.stats().active == 0


async def test_idle_connection_past_lifetime_is_not_handed_out(make_pool: MakePool) -> None:
    pool = make_pool(size=1, lifetime=60)
    first = await pool.acquire()
    await release_and_wait(pool, first)
    first.created_at -= 61

    second = await pool.acquire()

    assert second is not first
    assert first.closed


async def test_recycle_closes_idle_past_idle_timeout_but_keeps_min_idle(
    make_pool: MakePool, backend: Backend
) -> None:
    pool = make_pool(size=4, min_idle=1, idle_timeout=10)
    a, b, c = [await pool.acquire() for _ in range(3)]
    for connection in (a, b, c):
        await release_and_wait(pool, connection)
        connection.idle_since -= 11

    pool.recycle()
    await settle()

    assert (a.closed, b.closed, c.closed) == (True, True, False)  # the warmest one stays
    assert pool.stats().idle == 1
    assert len(backend.opened) == 3


async def test_close_idle_closes_only_idle_connections_and_frees_their_slots(make_pool: MakePool) -> None:
    pool = make_pool(size=3)
    lent, a, b = [await pool.acquire() for _ in range(3)]
    for connection in (a, b):
        await release_and_wait(pool, connection)

    assert pool.close_idle() == 2

    assert (a.closed, b.closed, lent.closed) == (True, True, False)
    assert (pool.stats().idle, pool.stats().active) == (0, 1)
    assert not (await pool.acquire()).closed  # a slot freed: a new connection
    assert pool.close_idle() == 0


async def test_recycle_keeps_connections_idle_for_less_than_idle_timeout(make_pool: MakePool) -> None:
    pool = make_pool(size=3, idle_timeout=10)
    a, b = await pool.acquire(), await pool.acquire()
    for connection in (a, b):
        await release_and_wait(pool, connection)
    a.idle_since -= 11

    pool.recycle()

    assert a.closed
    assert not b.closed
    assert pool.stats().idle == 1


async def test_recycle_tops_up_to_min_idle(make_pool: MakePool, backend: Backend) -> None:
    pool = make_pool(size=3, min_idle=2)

    pool.recycle()
    pool.recycle()  # opens in flight count: no double top-up
    await eventually(lambda: pool.stats().idle == 2)
    await settle()

    assert len(backend.opened) == 2
    assert pool.stats().opening == 0


async def test_recycle_replaces_idle_past_lifetime_even_below_min_idle(
    make_pool: MakePool, backend: Backend
) -> None:
    pool = make_pool(size=2, min_idle=1, lifetime=60)
    first = await pool.acquire()
    await release_and_wait(pool, first)
    first.created_at -= 61

    pool.recycle()
    await eventually(lambda: pool.stats().idle == 1 and len(backend.opened) == 2)

    assert first.closed
    assert await pool.acquire() is backend.opened[1]


# --- the server unreachable: retries, backoff, breaker ----------------------------------------------


async def test_client_waits_while_the_server_is_unreachable_and_is_served_when_it_returns(
    make_pool: MakePool, backend: Backend
) -> None:
    changes: list[bool] = []
    pool = make_pool(size=2, max_client_wait=2.0, on_upstream_change=changes.append)
    backend.unreachable_next = 4

    connection = await asyncio.wait_for(pool.acquire(), 3)

    assert connection is backend.opened[0]
    assert backend.connect_attempts == 5
    assert changes == [False, True]  # one transition each way, not one per attempt
    assert pool.stats().upstream_up
    assert pool.stats().connect_failures_total == 4


async def test_client_gets_08001_when_the_server_stays_unreachable_past_its_wait(
    make_pool: MakePool, backend: Backend
) -> None:
    pool = make_pool(size=2, max_client_wait=0.2)
    backend.unreachable_next = 1_000

    started = time.monotonic()
    with pytest.raises(UpstreamUnavailable) as caught:
        await pool.acquire()

    assert 0.19 <= time.monotonic() - started < 1
    assert caught.value.sqlstate == "08001"
    assert "10.0.0.5" not in caught.value.message
    assert not pool.stats().upstream_up
    assert pool.stats().waiting == 0
    # The retrying task notices nobody waits any more and stops.
    await eventually(lambda: pool.stats().opening == 0)
    attempts = backend.connect_attempts
    await asyncio.sleep(0.1)
    assert backend.connect_attempts == attempts


async def test_one_connect_at_a_time_probes_a_server_that_is_down(
    make_pool: MakePool, backend: Backend
) -> None:
    pool = make_pool(size=5, max_client_wait=2.0, retry_delay=0.005, retry_max_delay=0.01)
    backend.unreachable_next = 1
    first = await asyncio.wait_for(pool.acquire(), 1)  # the server is marked down, then back
    pool.give_back(first)
    backend.unreachable_next = 1_000
    (await pool.acquire()).lose()  # from idle; then the server goes away
    # Five clients queue; each gets a connect (the pool does not know yet), all five fail...
    waiters = [asyncio.ensure_future(pool.acquire()) for _ in range(5)]
    await eventually(lambda: not pool.stats().upstream_up)
    await settle()
    backend.most_in_flight = 0
    attempts = backend.connect_attempts
    # ... and from then on one attempt at a time probes the server.
    await eventually(lambda: backend.connect_attempts > attempts + 5)
    assert backend.most_in_flight == 1
    assert pool.stats().opening == 1
    assert not pool.stats().upstream_up
    assert pool.stats().waiting == 5

    backend.unreachable_next = 0
    connections = await asyncio.wait_for(asyncio.gather(*waiters), 2)

    # Once the probe got through, every waiter got a connect of its own.
    assert len(set(connections)) == 5
    assert pool.stats().upstream_up


async def test_retries_back_off_exponentially_up_to_the_maximum(
    make_pool: MakePool, backend: Backend
) -> None:
    pool = make_pool(size=1, max_client_wait=1.0, retry_delay=0.02, retry_max_delay=0.08)
    backend.unreachable_next = 6

    await asyncio.wait_for(pool.acquire(), 3)

    gaps = [later - earlier for earlier, later in itertools.pairwise(backend.attempted_at)]
    # Equal jitter: each gap is between half and all of 0.02, 0.04, 0.08, 0.08, ... seconds.
    for gap, delay in zip(gaps, (0.02, 0.04, 0.08, 0.08, 0.08, 0.08), strict=True):
        assert delay / 2 - 0.002 <= gap <= delay + 0.05


async def test_connects_failing_together_as_the_server_goes_away_count_as_one_for_the_backoff(
    make_pool: MakePool, backend: Backend
) -> None:
    pool = make_pool(size=5, max_client_wait=2.0, retry_delay=0.02, retry_max_delay=1.0)
    backend.unreachable_next = 7  # the five opened at once, then two retries

    connections = await asyncio.wait_for(asyncio.gather(*(pool.acquire() for _ in range(5))), 3)

    assert len(set(connections)) == 5
    first_retry, second_retry, third_retry = backend.attempted_at[5:8]
    # Two steps of backoff (20-40 ms), not six (320-640 ms).
    assert third_retry - second_retry < 0.1
    assert second_retry - first_retry < 0.1


async def test_a_refusal_that_is_not_transient_fails_at_once_without_retry(
    make_pool: MakePool, backend: Backend
) -> None:
    pool = make_pool(size=1, max_client_wait=2.0)
    backend.fail_next = 1  # like a wrong password: retrying cannot help

    started = time.monotonic()
    with pytest.raises(UpstreamUnavailable):
        await pool.acquire()

    assert time.monotonic() - started < 0.5
    assert backend.connect_attempts == 1
    assert pool.stats().upstream_up


async def test_maintenance_probes_a_down_server_that_nobody_waits_for(
    make_pool: MakePool, backend: Backend
) -> None:
    changes: list[bool] = []
    pool = make_pool(size=2, max_client_wait=0.05, on_upstream_change=changes.append)
    backend.unreachable_next = 1_000
    with pytest.raises(UpstreamUnavailable):
        await pool.acquire()
    await eventually(lambda: pool.stats().opening == 0)
    backend.unreachable_next = 0

    await asyncio.sleep(0.05)  # past the backoff
    pool.recycle()
    await eventually(lambda: pool.stats().upstream_up)

    assert changes == [False, True]
    assert pool.stats().idle == 1  # the probe's connection waits for the next client
    assert await pool.acquire() is backend.opened[0]


class FakeProbe:
    """A TCP look at the server: reachable or not, counting its calls; ``gate`` holds it."""

    def __init__(self) -> None:
        self.reachable = True
        self.calls = 0
        self.gate: asyncio.Event | None = None

    async def __call__(self) -> None:
        self.calls += 1
        if self.gate is not None:
            await self.gate.wait()
        await asyncio.sleep(0)
        if not self.reachable:
            raise ServerUnreachable("connect to 10.0.0.5:5432 refused")


async def test_a_quiet_outage_trips_the_breaker_of_a_pool_without_connections(
    make_pool: MakePool, backend: Backend
) -> None:
    # Nobody asks for a connection, so no connect fails: only the probe can see the server go away,
    # and the breaker it trips is what readiness and pos_proxy_upstream_up both read.
    changes: list[bool] = []
    probe = FakeProbe()
    pool = make_pool(on_upstream_change=changes.append, probe=probe, probe_interval=0.0)
    pool.recycle()
    await settle()
    assert probe.calls == 1 and pool.upstream_up and changes == []

    probe.reachable = False
    backend.unreachable_next = 1_000
    pool.recycle()
    await eventually(lambda: not pool.upstream_up)
    assert changes == [False]
    assert await pool.check_upstream() is False
    assert backend.connect_attempts == 0  # a probe, not a login

    # Down, the breaker probes with real connects after its backoff; the server returns.
    probe.reachable = True
    backend.unreachable_next = 0
    await asyncio.sleep(0.05)
    pool.recycle()
    await eventually(lambda: pool.upstream_up)
    assert changes == [False, True]
    assert await pool.check_upstream() is True


async def test_a_pool_with_a_connection_does_not_probe(make_pool: MakePool, backend: Backend) -> None:
    probe = FakeProbe()
    probe.reachable = False
    pool = make_pool(probe=probe, probe_interval=0.0)
    connection = await pool.acquire()
    pool.recycle()
    assert await pool.check_upstream() is True
    await release_and_wait(pool, connection)
    pool.recycle()
    assert await pool.check_upstream() is True
    assert probe.calls == 0


async def test_readiness_checks_share_one_probe_per_interval(make_pool: MakePool) -> None:
    probe = FakeProbe()
    probe.gate = asyncio.Event()
    pool = make_pool(probe=probe, probe_interval=60.0)
    checks = [asyncio.ensure_future(pool.check_upstream()) for _ in range(3)]
    await settle()
    pool.recycle()
    assert probe.calls == 1
    probe.gate.set()
    assert await asyncio.gather(*checks) == [True, True, True]
    assert await pool.check_upstream() is True
    assert probe.calls == 1  # within the interval the last answer stands


# --- stats and close ---------------------------------------------------------------------------------------


async def test_stats_reports_the_pool_state(make_pool: MakePool, backend: Backend) -> None:
    pool = make_pool(size=3, max_client_wait=0.5)
    assert pool.stats() == PoolStats("pos", 3, 0, 0, 0, 0, 0, 0)

    backend.fail_next = 1
    with pytest.raises(UpstreamUnavailable):
        await pool.acquire()
    a, b = await pool.acquire(), await pool.acquire()
    await release_and_wait(pool, b)
    assert counts(pool) == (1, 1, 0, 0, 2, 1)

    backend.gate = asyncio.Event()
    assert await pool.acquire() is b  # from idle
    opener = asyncio.ensure_future(pool.acquire())  # waits in line for the third, held at the gate
    await eventually(lambda: pool.stats().opening == 1)
    waiter = await queue_waiter(pool)

    # Both wait: the opener for the connection being opened, the other for any.
    assert counts(pool) == (2, 0, 1, 2, 2, 1)

    backend.gate.set()
    c = await asyncio.wait_for(opener, 1)
    assert pool.stats().opened_total == 3
    pool.release(a, reusable=True)
    assert await asyncio.wait_for(waiter, 1) is a
    assert counts(pool) == (3, 0, 0, 0, 3, 1)
    assert c not in (a, b)


async def test_close_fails_waiters_and_refuses_further_use(make_pool: MakePool) -> None:
    pool = make_pool(size=1)
    held = await pool.acquire()
    waiter = await queue_waiter(pool)

    await pool.close()

    with pytest.raises(UpstreamUnavailable, match="shutting down"):
        await asyncio.wait_for(waiter, 1)
    assert pool.stats().waiting == 0
    pool.release(held, reusable=True)
    assert held.closed
    with pytest.raises(UpstreamUnavailable) as caught:
        await pool.acquire()
    assert caught.value.sqlstate == "08001"


async def test_give_back_after_close_closes(make_pool: MakePool) -> None:
    pool = make_pool(size=1)
    held = await pool.acquire()

    await pool.close()
    pool.give_back(held)

    assert held.closed
    assert pool.stats().idle == 0


async def test_close_closes_idle_connections(make_pool: MakePool) -> None:
    pool = make_pool(size=2)
    a, b = await pool.acquire(), await pool.acquire()
    await release_and_wait(pool, a)
    await release_and_wait(pool, b)

    await pool.close()

    assert a.closed
    assert b.closed
    assert pool.stats().idle == 0
    assert pool.stats().active == 0


async def test_connection_being_reset_when_the_pool_closes_is_closed(make_pool: MakePool) -> None:
    pool = make_pool(size=1)
    first = await pool.acquire()
    pool.release(first, reusable=True)  # reset spawned, not yet run

    await pool.close()
    await settle()

    assert pool.stats().idle == 0
    assert first.closed
