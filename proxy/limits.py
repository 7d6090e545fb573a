"""Rate, connection and result-size limits per terminal, role and store (pure logic, clock injected)."""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Any, Final

__all__ = [
    "IDLE_STATE_SECONDS",
    "PRUNE_EVERY_OPERATIONS",
    "WINDOW_SECONDS",
    "LimitHit",
    "LimitSettings",
    "Limiter",
    "Rate",
    "ResultGuard",
    "SourceRateLimiter",
    "TokenBucket",
    "resolve",
]

# A bucket untouched this long and full again is dropped (a per-minute window as soon as it is empty):
# a new one would give the same answers, so pruning bounds memory as terminals come and go without
# loosening any limit.
IDLE_STATE_SECONDS: Final = 600.0
# Pruning walks every entry, so it runs only once per this many operations to spread its cost.
PRUNE_EVERY_OPERATIONS: Final = 1000
# The per-minute result limits count what was sent in the last WINDOW_SECONDS...
WINDOW_SECONDS: Final = 60.0
# ...in slots this long, so a terminal's window is at most ~61 entries however many rows it fetches.
# An amount leaves the window SLOT_SECONDS late rather than early: the limit is never exceeded.
_SLOT_SECONDS: Final = 1.0
# Refill arithmetic in floating point can leave a bucket a hair short of a whole token exactly when
# the retry-after it announced has passed; the tolerance lets that retry succeed.
_TOKEN_EPSILON: Final = 1e-9


@dataclass(frozen=True, slots=True)
class Rate:
    """A token bucket's shape: refills ``per_second``, holds at most ``burst`` (so allows bursts of it)."""

    per_second: float
    burst: int

    def __post_init__(self) -> None:
        if not (math.isfinite(self.per_second) and self.per_second > 0):
            raise ValueError(f"rate per second must be a positive number, not {self.per_second!r}")
        if self.burst < 1:
            raise ValueError(f"burst must be at least 1, not {self.burst!r}")

    def __str__(self) -> str:
        return f"{self.per_second:g}/s, burst {self.burst}"


@dataclass(frozen=True, slots=True)
class LimitSettings:
    """Limits: one level of them (a role's defaults, or a store or terminal override, None: not
    set here), or, after ``resolve``, those in force for one terminal (None: unlimited).

    ``statements`` is per terminal, ``role_statements`` the aggregate over all terminals of the role,
    ``store_statements`` the aggregate over the store's terminals; row and byte limits are per terminal.
    """

    statements: Rate | None = None
    role_statements: Rate | None = None
    store_statements: Rate | None = None
    connections_per_terminal: int | None = None
    connections_per_store: int | None = None
    connections_per_role: int | None = None
    max_rows_per_statement: int | None = None
    max_bytes_per_statement: int | None = None
    max_rows_per_minute: int | None = None
    max_bytes_per_minute: int | None = None

    def __post_init__(self) -> None:
        for item in fields(self):
            value = getattr(self, item.name)
            if isinstance(value, int) and value < 0:
                raise ValueError(f"{item.name} must not be negative, not {value}")


def resolve(
    role: LimitSettings, store: LimitSettings | None, terminal: LimitSettings | None
) -> LimitSettings:
    """Field by field, the terminal override wins over the store override, which wins over the role."""
    levels = [level for level in (terminal, store, role) if level is not None]
    values: dict[str, Any] = {}
    for item in fields(LimitSettings):
        values[item.name] = next(
            (value for level in levels if (value := getattr(level, item.name)) is not None), None
        )
    return LimitSettings(**values)


class TokenBucket:
    """Tokens refill continuously at ``rate.per_second`` up to ``rate.burst``; each event takes some."""

    __slots__ = ("_tokens", "_updated", "rate")

    def __init__(self, rate: Rate, now: float) -> None:
        self.rate = rate
        self._tokens = float(rate.burst)
        self._updated = now

    def wait(self, now: float, amount: float = 1.0) -> float:
        """Seconds until ``amount`` tokens are available (0.0: now; inf: never), taking nothing."""
        # A clock that steps back (only fakes do) must not drain the bucket.
        if now > self._updated:
            elapsed = now - self._updated
            self._tokens = min(float(self.rate.burst), self._tokens + elapsed * self.rate.per_second)
            self._updated = now
        missing = amount - self._tokens
        if missing <= _TOKEN_EPSILON:
            return 0.0
        if amount > self.rate.burst:
            return math.inf
        return missing / self.rate.per_second

    def take(self, now: float, amount: float = 1.0) -> float:
        """Take ``amount`` tokens and return 0.0, or take nothing and return the retry-after in seconds."""
        retry_after = self.wait(now, amount)
        if retry_after == 0.0:
            self._tokens = max(0.0, self._tokens - amount)
        return retry_after

    def idle(self, now: float) -> bool:
        """Unused for IDLE_STATE_SECONDS and full again: a new bucket would behave the same."""
        elapsed = now - self._updated
        refilled = self._tokens + elapsed * self.rate.per_second
        return elapsed > IDLE_STATE_SECONDS and refilled >= self.rate.burst


def _prune_idle_buckets(buckets: dict[Any, TokenBucket], now: float) -> None:
    for key in [key for key, bucket in buckets.items() if bucket.idle(now)]:
        del buckets[key]


@dataclass(frozen=True, slots=True)
class LimitHit:
    """A refused connection, statement or result: which limit, and what the client is told.

    ``limit`` is one of a fixed set of names (a safe metrics label); ``retry_after`` is None when
    waiting alone does not help (a connection must close first, or the result is too big).
    """

    limit: str
    retry_after: float | None
    message: str


def _seconds(value: float) -> str:
    # Rounded up to a tenth: a client that waits what it is told must not be refused again. The
    # tolerance keeps float noise (0.2 computed as 0.20000000000000004) from showing as 0.3 s.
    return f"{max(0.1, math.ceil(value * 10 - 1e-6) / 10):.1f} s"


class _Slot:
    """Mutable on purpose: amounts recorded within one slot are added in place."""

    __slots__ = ("amount", "start")

    def __init__(self, start: float, amount: int) -> None:
        self.start = start
        self.amount = amount


class _SlidingSum:
    """What was recorded in the last WINDOW_SECONDS (plus up to one slot)."""

    __slots__ = ("_slots", "_total")

    def __init__(self) -> None:
        self._slots: deque[_Slot] = deque()
        self._total = 0

    def total(self, now: float) -> int:
        while self._slots and self._slots[0].start + _SLOT_SECONDS + WINDOW_SECONDS <= now:
            self._total -= self._slots.popleft().amount
        return self._total

    def record(self, now: float, amount: int) -> None:
        start = math.floor(now / _SLOT_SECONDS) * _SLOT_SECONDS
        if self._slots and self._slots[-1].start >= start:
            self._slots[-1].amount += amount
        else:
            self._slots.append(_Slot(start, amount))
        self._total += amount

    def seconds_until_room(self, now: float, amount: int, limit: int) -> float:
        """How long until enough has left the window for ``amount`` more to fit under ``limit``."""
        remaining = self.total(now)
        wait = 0.0
        for slot in self._slots:
            if remaining + amount <= limit:
                break
            remaining -= slot.amount
            wait = slot.start + _SLOT_SECONDS + WINDOW_SECONDS - now
        return wait


class _MinuteWindows:
    """Per terminal, the rows and bytes sent within the sliding window, for the per-minute limits."""

    __slots__ = ("_windows",)

    def __init__(self) -> None:
        self._windows: dict[tuple[str, str], _SlidingSum] = {}

    def admit(
        self, now: float, terminal: str, policy: LimitSettings, rows: int, nbytes: int
    ) -> LimitHit | None:
        """Record the batch, or refuse it (recording nothing) if it would cross a per-minute limit."""
        checks = [
            (unit, noun, amount, limit)
            for unit, noun, amount, limit in (
                ("rows", "row", rows, policy.max_rows_per_minute),
                ("bytes", "byte", nbytes, policy.max_bytes_per_minute),
            )
            if limit is not None
        ]
        for unit, noun, amount, limit in checks:
            window = self._windows.get((terminal, unit))
            if (window.total(now) if window else 0) + amount <= limit:
                continue
            what = f"{noun} rate limit for terminal {terminal} exceeded ({limit} {unit} per minute)"
            if window is None or amount > limit:
                return LimitHit(
                    f"{unit} per minute", None, f"{what} by a single batch; retrying will not help"
                )
            retry_after = window.seconds_until_room(now, amount, limit)
            return LimitHit(f"{unit} per minute", retry_after, f"{what}; retry in {_seconds(retry_after)}")
        for unit, _noun, amount, _limit in checks:
            window = self._windows.get((terminal, unit))
            if window is None:
                window = self._windows[(terminal, unit)] = _SlidingSum()
            window.record(now, amount)
        return None

    def prune(self, now: float) -> None:
        for key in [key for key, window in self._windows.items() if window.total(now) == 0]:
            del self._windows[key]

    def size(self) -> int:
        return len(self._windows)


class Limiter:
    """All limit state for one proxy process.

    Every method is synchronous, so within one event loop each check-and-count is atomic.
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        # Keys as in connections(); entries at zero are deleted, so the dict holds open connections only.
        self._connections: dict[str, int] = {}
        # Keyed by (scope, name, rate): terminals share an aggregate bucket only if their policies agree
        # on its rate, and a reload that changes a rate starts fresh buckets rather than reshaping old ones.
        self._buckets: dict[tuple[str, str, Rate], TokenBucket] = {}
        self._minute = _MinuteWindows()
        self._operations = 0

    def open_connection(self, store: str, terminal: str, role: str, policy: LimitSettings) -> LimitHit | None:
        """Count a new client connection, or refuse it (counting nothing) if a connection limit is reached."""
        checks = (
            ("terminal", f"{store}/{terminal}", policy.connections_per_terminal),
            ("store", store, policy.connections_per_store),
            ("role", role, policy.connections_per_role),
        )
        for scope, name, limit in checks:
            if limit is not None and self._connections.get(f"{scope}:{name}", 0) >= limit:
                return LimitHit(
                    f"connections per {scope}",
                    None,
                    f"connection limit for {scope} {name} reached ({limit} open); "
                    "retry when one of its connections has closed",
                )
        for scope, name, _limit in checks:
            key = f"{scope}:{name}"
            self._connections[key] = self._connections.get(key, 0) + 1
        return None

    def close_connection(self, store: str, terminal: str, role: str) -> None:
        """Uncount a connection that open_connection() let in."""
        for key in (f"terminal:{store}/{terminal}", f"store:{store}", f"role:{role}"):
            count = self._connections.get(key, 0)
            if count > 1:
                self._connections[key] = count - 1
            else:
                self._connections.pop(key, None)

    def connections(self) -> dict[str, int]:
        """Open connections by "terminal:<store>/<terminal>", "store:<store>" and "role:<role>"."""
        return dict(self._connections)

    def statement(self, store: str, terminal: str, role: str, policy: LimitSettings) -> LimitHit | None:
        """Take a token from each applicable bucket, or from none if any of them is empty."""
        now = self._tick()
        checks = [
            (scope, name, rate, self._bucket(scope, name, rate, now))
            for scope, name, rate in (
                ("terminal", f"{store}/{terminal}", policy.statements),
                ("role", role, policy.role_statements),
                ("store", store, policy.store_statements),
            )
            if rate is not None
        ]
        # All or nothing: a statement refused by the store's bucket must not spend the terminal's token,
        # and the client is told the longest wait, after which every bucket has a token again.
        waits = [(bucket.wait(now), scope, name, rate) for scope, name, rate, bucket in checks]
        refusals = [wait for wait in waits if wait[0] > 0.0]
        if refusals:
            retry_after, scope, name, rate = max(refusals, key=lambda wait: wait[0])
            return LimitHit(
                f"statements per {scope}",
                retry_after,
                f"statement rate limit for {scope} {name} exceeded ({rate}); "
                f"retry in {_seconds(retry_after)}",
            )
        for _scope, _name, _rate, bucket in checks:
            bucket.take(now)
        return None

    def result_guard(self, store: str, terminal: str, policy: LimitSettings) -> ResultGuard:
        """A guard for one statement's result."""
        self._tick()
        return ResultGuard(self._clock, self._minute, f"{store}/{terminal}", policy)

    def state_size(self) -> int:
        """How many buckets and windows are kept: bounded by the terminals active lately."""
        return len(self._buckets) + self._minute.size()

    def _bucket(self, scope: str, name: str, rate: Rate, now: float) -> TokenBucket:
        key = (scope, name, rate)
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = self._buckets[key] = TokenBucket(rate, now)
        return bucket

    def _tick(self) -> float:
        now = self._clock()
        self._operations += 1
        if self._operations >= PRUNE_EVERY_OPERATIONS:
            self._operations = 0
            _prune_idle_buckets(self._buckets, now)
            self._minute.prune(now)
        return now


class ResultGuard:
    """Counts rows and bytes of one statement's result against the per-statement and per-minute limits.

    The per-minute limits use a sliding 60 s window per terminal, shared by all its statements. Only
    batches add() accepts are counted: the batch that crosses a limit is not sent, so it does not count.
    """

    __slots__ = ("_clock", "_hit", "_minute", "_nbytes", "_per_minute", "_policy", "_rows", "_terminal")

    def __init__(
        self, clock: Callable[[], float], minute: _MinuteWindows, terminal: str, policy: LimitSettings
    ) -> None:
        self._clock = clock
        self._minute = minute
        self._terminal = terminal
        self._policy = policy
        self._per_minute = policy.max_rows_per_minute is not None or policy.max_bytes_per_minute is not None
        self._hit: LimitHit | None = None
        self._rows = 0
        self._nbytes = 0

    @property
    def rows(self) -> int:
        """Rows accepted so far."""
        return self._rows

    @property
    def nbytes(self) -> int:
        """Bytes accepted so far."""
        return self._nbytes

    def add(self, rows: int, nbytes: int) -> LimitHit | None:
        """Count a batch of the result: None while within limits, else the first hit, from then on."""
        if self._hit is not None:
            return self._hit
        self._hit = self._statement_hit(rows, nbytes)
        if self._hit is None and self._per_minute:
            self._hit = self._minute.admit(self._clock(), self._terminal, self._policy, rows, nbytes)
        if self._hit is None:
            self._rows += rows
            self._nbytes += nbytes
        return self._hit

    def _statement_hit(self, rows: int, nbytes: int) -> LimitHit | None:
        for unit, total, limit in (
            ("rows", self._rows + rows, self._policy.max_rows_per_statement),
            ("bytes", self._nbytes + nbytes, self._policy.max_bytes_per_statement),
        ):
            if limit is not None and total > limit:
                return LimitHit(
                    f"{unit} per statement",
                    None,
                    f"result exceeds the limit for terminal {self._terminal} ({limit} {unit} per statement); "
                    "retrying will not help: fetch less per statement",
                )
        return None


class SourceRateLimiter:
    """New connections per second per source IP address, consulted before TLS.

    One token bucket per address, pruned like the Limiter's. Addresses are not authenticated yet, so
    the table is also capped: when full, the least recently seen address is forgotten (which only
    gives it a fresh burst) rather than a new one refused.
    """

    def __init__(
        self,
        rate: Rate | None,
        clock: Callable[[], float] = time.monotonic,
        *,
        max_addresses: int = 65_536,
    ) -> None:
        self.rate = rate
        self._clock = clock
        self._max_addresses = max_addresses
        # Insertion order is recency order: allow() moves an address to the end.
        self._buckets: dict[str, TokenBucket] = {}
        self._operations = 0

    def allow(self, address: str) -> float:
        """0.0 if a connection from ``address`` may proceed, else seconds until one may."""
        if self.rate is None:
            return 0.0
        now = self._clock()
        self._operations += 1
        if self._operations >= PRUNE_EVERY_OPERATIONS:
            self._operations = 0
            _prune_idle_buckets(self._buckets, now)
        bucket = self._buckets.pop(address, None)
        if bucket is None:
            if len(self._buckets) >= self._max_addresses:
                del self._buckets[next(iter(self._buckets))]
            bucket = TokenBucket(self.rate, now)
        self._buckets[address] = bucket
        return bucket.take(now)

    def state_size(self) -> int:
        """How many addresses are tracked: at most ``max_addresses``."""
        return len(self._buckets)
