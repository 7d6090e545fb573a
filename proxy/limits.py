"""Rate, connection and result-size limits per terminal, role and store (pure logic, clock injected)."""

from __future__ import annotations

import enum
import math
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, fields
from typing import Any, Final, Protocol

__all__ = [
    "IDLE_STATE_SECONDS",
    "LEASE_REFILL_RETRY_AFTER",
    "LEASE_RETURN_AFTER",
    "PRUNE_EVERY_OPERATIONS",
    "UNAVAILABLE_RETRY_AFTER",
    "WINDOW_SECONDS",
    "LeaseBook",
    "LimitHit",
    "LimitSettings",
    "Limiter",
    "Rate",
    "ResultGuard",
    "SharedLimitFallback",
    "SharedLimitStore",
    "SourceRateLimiter",
    "TokenBucket",
    "TokenLease",
    "resolve",
    "unavailable_hit",
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
    # Server connections one terminal may hold at once under transaction pooling (open transactions,
    # pinned sessions, places in the pool's line); unset: half the pool (see UpstreamPool.share_cap).
    max_server_connections_per_terminal: int | None = None
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


# --- Shared limits: several proxies, one budget per store and per role ---------------------------------


class SharedLimitFallback(enum.Enum):
    """What the shared per-store and per-role limits do while the shared store (Redis) is unreachable."""

    FAIL_OPEN = "fail_open"  # each proxy enforces the same limits on its own (N proxies: up to N times)
    FAIL_CLOSED = "fail_closed"  # refuse what the shared limits would have counted


# A statement that finds its lease's credit used up while a refill is on its way is told to retry
# after this long: about one round trip to the shared store, rounded up to what a client is told.
LEASE_REFILL_RETRY_AFTER: Final = 0.1
# Leased tokens unused this long go back to the shared bucket, where other proxies can use them.
LEASE_RETURN_AFTER: Final = 1.0
# What a client refused under fail_closed is told to wait: about how soon an outage is noticed to end.
UNAVAILABLE_RETRY_AFTER: Final = 1.0

# (scope, name, rate): a shared bucket, keyed as the Limiter keys its local ones.
BucketKey = tuple[str, str, Rate]


class TokenLease:
    """Tokens one proxy took ahead of need from a token bucket shared with other proxies.

    Statements spend leased tokens without a round trip. When the lease runs low a refill tops it up
    to ``size`` in the background; until the shared bucket has said it is empty, a statement that
    finds the lease empty is let through on credit (down to ``-size``), repaid by the next refill.
    So, against one global bucket, a proxy admits at most ``size`` statements too early (on credit)
    and holds back at most ``size`` (leased, not yet spent), and tokens are never created.
    """

    __slots__ = ("exhausted_until", "rate", "refilling", "size", "tokens", "used_at")

    def __init__(self, rate: Rate, size: int, now: float) -> None:
        self.rate = rate
        self.size = size
        self.tokens = 0
        # Until then the shared bucket is known to be empty: no credit, no refill.
        self.exhausted_until = -math.inf
        self.refilling = False
        self.used_at = now

    def wait(self, now: float) -> float:
        """Seconds until a statement may spend a token (0.0: now), taking nothing."""
        if self.tokens >= 1:
            return 0.0
        if now < self.exhausted_until:
            return self.exhausted_until - now
        if self.tokens > -self.size:
            return 0.0
        return LEASE_REFILL_RETRY_AFTER

    def take(self, now: float) -> float:
        """Spend one token and return 0.0, or spend nothing and return the retry-after in seconds."""
        retry_after = self.wait(now)
        if retry_after == 0.0:
            self.tokens -= 1
            self.used_at = now
        return retry_after

    def refill_wanted(self, now: float) -> int:
        """How many tokens to ask the shared bucket for now (0: none); marks the refill as started."""
        if self.refilling or now < self.exhausted_until or self.tokens > self.size // 2:
            return 0
        self.refilling = True
        return self.size - self.tokens

    def refilled(self, granted: int, wanted: int, retry_after: float, now: float) -> None:
        """The shared bucket gave ``granted`` of ``wanted``; if fewer, it is empty for ``retry_after`` s."""
        self.refilling = False
        self.tokens += granted
        if granted < wanted:
            self.exhausted_until = now + retry_after

    def surplus(self, now: float) -> int:
        """Leased tokens unused for LEASE_RETURN_AFTER, handed over to go back to the shared bucket."""
        if self.tokens <= 0 or self.refilling or now - self.used_at < LEASE_RETURN_AFTER:
            return 0
        unused, self.tokens = self.tokens, 0
        return unused

    def idle(self, now: float) -> bool:
        """Unused for IDLE_STATE_SECONDS, nothing leased or owed, no refill on its way: forgettable."""
        return now - self.used_at > IDLE_STATE_SECONDS and self.tokens == 0 and not self.refilling


class LeaseBook:
    """One proxy's leases on the shared per-role and per-store buckets (pure bookkeeping).

    The shared store's client drains ``refills()`` and answers with ``TokenLease.refilled``; it says
    whether the store answers with ``set_available``: while it does not, the Limiter applies
    ``fallback`` and the leases are dropped (a lease taken before an outage starts afresh after it).
    """

    def __init__(
        self, lease_size: int, fallback: SharedLimitFallback, wake: Callable[[], None] = lambda: None
    ) -> None:
        self.lease_size = lease_size
        self.fallback = fallback
        self.available = True
        self.wake = wake
        self._leases: dict[BucketKey, TokenLease] = {}
        self._refills: list[tuple[BucketKey, TokenLease, int]] = []

    def lease(self, key: BucketKey, now: float) -> TokenLease:
        lease = self._leases.get(key)
        if lease is None:
            # A lease never holds more than the bucket itself can.
            lease = self._leases[key] = TokenLease(key[2], min(self.lease_size, key[2].burst), now)
        return lease

    def replenish(self, key: BucketKey, lease: TokenLease, now: float) -> None:
        """Queue a refill of ``lease`` if it runs low, and wake the client that sends it."""
        wanted = lease.refill_wanted(now)
        if wanted:
            self._refills.append((key, lease, wanted))
            self.wake()

    def refills(self) -> list[tuple[BucketKey, TokenLease, int]]:
        """The refills to send now: (bucket, lease, tokens wanted)."""
        refills, self._refills = self._refills, []
        return refills

    def surplus(self, now: float) -> list[tuple[BucketKey, int]]:
        """Unused leased tokens to give back: (bucket, tokens)."""
        return [(key, amount) for key, lease in self._leases.items() if (amount := lease.surplus(now))]

    def set_available(self, available: bool) -> bool:
        """Record whether the shared store answers; True if that changed."""
        if available == self.available:
            return False
        self.available = available
        self._leases.clear()
        self._refills.clear()
        return True

    def prune(self, now: float) -> None:
        for key in [key for key, lease in self._leases.items() if lease.idle(now)]:
            del self._leases[key]

    def size(self) -> int:
        return len(self._leases)


class SharedLimitStore(Protocol):
    """Where several proxies count per-store and per-role limits together (proxy.sharedlimits: Redis)."""

    leases: LeaseBook

    def connections_changed(self, scope: str, name: str, count: int) -> None:
        """This proxy's open connections of a store or role are now ``count``: publish that soon."""

    def claim_connections(self, claims: list[tuple[str, str, int]]) -> Awaitable[LimitHit | None]:
        """Count a new connection for each (scope, name, limit) unless all proxies' together would
        pass the limit; stops at the first refusal. Started at once, settled even if not awaited."""


def unavailable_hit(what: str, retry_after: float | None) -> LimitHit:
    """The refusal while the shared limit store is unreachable and the fallback is fail_closed."""
    wait = f"; retry in {_seconds(retry_after)}" if retry_after is not None else "; retry later"
    return LimitHit(
        f"{what} (shared store unavailable)",
        retry_after,
        f"the shared limit store is unavailable, so the {what} limit cannot be checked{wait}",
    )


class Limiter:
    """All limit state for one proxy process.

    Every method is synchronous, so within one event loop each check-and-count is atomic.
    """

    def __init__(
        self, clock: Callable[[], float] = time.monotonic, shared: SharedLimitStore | None = None
    ) -> None:
        self._clock = clock
        # Per-store and per-role limits counted together with other proxies, when configured.
        self._shared = shared
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
            self._count_connection(scope, name, +1)
        return None

    def close_connection(self, store: str, terminal: str, role: str) -> None:
        """Uncount a connection that open_connection() let in."""
        for scope, name in (("terminal", f"{store}/{terminal}"), ("store", store), ("role", role)):
            self._count_connection(scope, name, -1)

    def shared_admission(
        self, store: str, role: str, policy: LimitSettings
    ) -> Awaitable[LimitHit | None] | None:
        """Right after open_connection() let a connection in: its claim on the store's and role's
        connection limits over all proxies, or None if none applies.

        The claim starts at once; the connection waits for its answer before it starts. A refused
        connection is uncounted by close_connection() as usual.
        """
        claims = [
            (scope, name, limit)
            for scope, name, limit in (
                ("store", store, policy.connections_per_store),
                ("role", role, policy.connections_per_role),
            )
            if limit is not None
        ]
        if self._shared is None or not claims:
            return None
        return self._shared.claim_connections(claims)

    def _count_connection(self, scope: str, name: str, change: int) -> None:
        key = f"{scope}:{name}"
        count = self._connections.get(key, 0) + change
        if count > 0:
            self._connections[key] = count
        else:
            self._connections.pop(key, None)
        if self._shared is not None and scope != "terminal":
            self._shared.connections_changed(scope, name, max(count, 0))

    def connections(self) -> dict[str, int]:
        """Open connections by "terminal:<store>/<terminal>", "store:<store>" and "role:<role>"."""
        return dict(self._connections)

    def statement(self, store: str, terminal: str, role: str, policy: LimitSettings) -> LimitHit | None:
        """Take a token from each applicable bucket, or from none if any of them is empty."""
        now = self._tick()
        leases = self._shared.leases if self._shared is not None else None
        checks: list[tuple[str, str, Rate, TokenBucket | TokenLease]] = []
        for scope, name, rate in (
            ("terminal", f"{store}/{terminal}", policy.statements),
            ("role", role, policy.role_statements),
            ("store", store, policy.store_statements),
        ):
            if rate is None:
                continue
            # A terminal sticks to one connection, so to one proxy: its bucket is always local.
            if leases is None or scope == "terminal":
                checks.append((scope, name, rate, self._bucket(scope, name, rate, now)))
            elif leases.available:
                key = (scope, name, rate)
                lease = leases.lease(key, now)
                leases.replenish(key, lease, now)
                checks.append((scope, name, rate, lease))
            elif leases.fallback is SharedLimitFallback.FAIL_OPEN:
                checks.append((scope, name, rate, self._bucket(scope, name, rate, now)))
            else:
                return unavailable_hit(f"statements per {scope}", UNAVAILABLE_RETRY_AFTER)
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
        leases = self._shared.leases.size() if self._shared is not None else 0
        return len(self._buckets) + self._minute.size() + leases

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
            if self._shared is not None:
                self._shared.leases.prune(now)
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
