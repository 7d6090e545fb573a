"""Per-store and per-role limits counted together by several proxies in Redis (the I/O around LeaseBook).

Statements: each proxy leases small batches of tokens from one token bucket per store or role, kept in
Redis and taken by an atomic Lua script (TAKE_SCRIPT); the Limiter spends them without a round trip.
Connections: one Redis hash per store or role holds each live proxy's open connections; a new one is
admitted by an atomic script (CLAIM_SCRIPT) that sums the proxies whose heartbeat key has not expired,
so a crashed proxy's connections stop counting ``instance_ttl`` after its last heartbeat.

Keys use Lua with keys it computes (the heartbeats), so Redis Cluster is not supported: use one
Redis server (with replicas or Sentinel if wanted).
"""

from __future__ import annotations

import asyncio
import math
import os
import secrets
import socket
import time
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, Final

import structlog
from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError

from proxy.config.model import SharedLimitsConfig
from proxy.limits import (
    LEASE_RETURN_AFTER,
    BucketKey,
    LeaseBook,
    LimitHit,
    SharedLimitFallback,
    unavailable_hit,
)
from proxy.metrics import Metrics

__all__ = ["CLAIM_SCRIPT", "TAKE_SCRIPT", "RedisSharedLimits"]

log = structlog.get_logger("pos_proxy.sharedlimits")

# Take ARGV[3] tokens (as many as there are, whole) from the bucket at KEYS[1], refilled at ARGV[1]
# per second up to ARGV[2]; a negative amount gives tokens back. Redis's own clock times the refill,
# so the proxies' clocks need not agree. Returns {granted, seconds until the next whole token}.
TAKE_SCRIPT: Final = """
local rate = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local amount = tonumber(ARGV[3])
local clock = redis.call('TIME')
local now = tonumber(clock[1]) + tonumber(clock[2]) / 1000000
local state = redis.call('HMGET', KEYS[1], 'tokens', 'at')
local tokens = tonumber(state[1]) or burst
local at = tonumber(state[2]) or now
if now > at then
  tokens = math.min(burst, tokens + (now - at) * rate)
  at = now
end
local granted = amount
if amount > 0 then
  granted = math.max(0, math.min(amount, math.floor(tokens + 1e-9)))
end
tokens = math.min(burst, tokens - granted)
redis.call('HSET', KEYS[1], 'tokens', string.format('%.17g', tokens), 'at', string.format('%.17g', at))
-- Once full again the key may go: a missing bucket is a full one.
redis.call('PEXPIRE', KEYS[1], math.ceil((burst - tokens) / rate * 1000) + 1000)
local wait = 0
if tokens < 1 then
  wait = (1 - tokens) / rate
end
return {granted, string.format('%.17g', wait)}
"""

# KEYS[1]: hash of proxy instance -> its open connections of one store or role. Count one more
# for instance ARGV[2] unless, with the live proxies' (heartbeat key ARGV[1]..instance exists),
# that would pass the limit ARGV[3]; a dead proxy's entry is deleted. Returns {admitted, open}.
CLAIM_SCRIPT: Final = """
local open = 0
local entries = redis.call('HGETALL', KEYS[1])
for i = 1, #entries, 2 do
  local instance = entries[i]
  if instance == ARGV[2] or redis.call('EXISTS', ARGV[1] .. instance) == 1 then
    open = open + tonumber(entries[i + 1])
  else
    redis.call('HDEL', KEYS[1], instance)
  end
end
if open + 1 > tonumber(ARGV[3]) then
  return {0, open}
end
redis.call('HINCRBY', KEYS[1], ARGV[2], 1)
redis.call('PEXPIRE', KEYS[1], ARGV[4])
return {1, open}
"""

# Failures a Redis call can end in: the server is down, slow, or answers with an error.
_FAILURES: Final = (RedisError, OSError, TimeoutError)


def _instance_name() -> str:
    """Readable for an operator looking at Redis, unique even for a restarted process with the same pid."""
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"


class RedisSharedLimits:
    """One proxy's link to the shared limit store: leases refilled, connections published, a heartbeat.

    Owns two background tasks (start() to close()). Every Redis call is bounded by ``timeout``;
    a failure marks the store unavailable (the Limiter then applies ``on_unavailable``) until the
    next heartbeat gets through.
    """

    def __init__(
        self,
        settings: SharedLimitsConfig,
        metrics: Metrics,
        *,
        instance: str | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.settings = settings
        self.instance = instance or _instance_name()
        self._metrics = metrics
        self._available = metrics.shared_limits_available.labels(settings.on_unavailable.value)
        self._clock = clock
        self._refills_wanted = asyncio.Event()
        self._sync_wanted = asyncio.Event()
        self.leases = LeaseBook(settings.lease_size, settings.on_unavailable, self._refills_wanted.set)
        password = settings.password.reveal() if settings.password is not None else None
        self._redis: Redis = Redis.from_url(
            settings.redis_url,
            password=password,
            socket_timeout=settings.timeout,
            socket_connect_timeout=settings.timeout,
            # One retry, on a fresh connection, for a pooled one that a Redis restart left dead. A
            # call that did reach Redis may so run twice: a take then wastes tokens and a claim
            # counts one too many until the next sync, both on the safe side. Timeouts are not
            # retried: the heartbeat is the retry.
            retry=Retry(NoBackoff(), 1, supported_errors=(RedisConnectionError,)),
            decode_responses=True,
        )
        self._take = self._redis.register_script(TAKE_SCRIPT)
        self._claim = self._redis.register_script(CLAIM_SCRIPT)
        self._ttl_ms = math.ceil(settings.instance_ttl * 1000)
        # This proxy's open connections per (scope, name), those whose count changed since it was
        # last published, and the claims on their way (each adds one in Redis when admitted).
        self._counts: dict[tuple[str, str], int] = {}
        self._dirty: set[tuple[str, str]] = set()
        self._claiming: dict[tuple[str, str], int] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        # Checked by the loops too: on Python 3.11 a cancel that meets an expiring asyncio.timeout
        # can come out as the TimeoutError the loops handle, and be lost.
        self._closed = False

    @property
    def _heartbeat_key(self) -> str:
        return f"{self.settings.key_prefix}:instance:{self.instance}"

    def _bucket_key(self, key: BucketKey) -> str:
        scope, name, rate = key
        # The rate is part of the name, as in the Limiter: proxies share a bucket only if they agree on it.
        return f"{self.settings.key_prefix}:statements:{scope}:{name}:{rate.per_second:g}:{rate.burst}"

    def _connections_key(self, scope: str, name: str) -> str:
        return f"{self.settings.key_prefix}:connections:{scope}:{name}"

    async def start(self) -> None:
        """Announce this proxy (a store that does not answer is logged, not fatal), then keep at it."""
        self._available.set(1)
        await self._sync(heartbeat=True)
        if self.leases.available:
            log.info("shared_limits_connected", instance=self.instance, fallback=self._fallback)
        self._spawn(self._refill_loop())
        self._spawn(self._sync_loop())

    async def close(self) -> None:
        """Stop; withdraw this proxy's connections and unused tokens: the others need not wait the TTL."""
        self._closed = True
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=2 * self.settings.timeout)
        if self.leases.available:
            try:
                async with asyncio.timeout(self.settings.timeout):
                    await self._give_back(self.leases.surplus(math.inf))
                    async with self._redis.pipeline(transaction=False) as pipe:
                        pipe.delete(self._heartbeat_key)
                        for scope, name in self._counts:
                            pipe.hdel(self._connections_key(scope, name), self.instance)
                        await pipe.execute()
            except _FAILURES as exc:
                log.warning("shared_limits_withdraw_failed", instance=self.instance, error=str(exc))
        await self._redis.aclose()

    # --- what the Limiter calls ---

    def connections_changed(self, scope: str, name: str, count: int) -> None:
        self._counts[(scope, name)] = count
        self._dirty.add((scope, name))
        self._sync_wanted.set()

    def claim_connections(self, claims: list[tuple[str, str, int]]) -> Awaitable[LimitHit | None]:
        # Marked as on their way at once: until each claim is settled, no sync may publish a count
        # that already includes the new connection (the claim adds it in Redis).
        for scope, name, _limit in claims:
            self._claiming[(scope, name)] = self._claiming.get((scope, name), 0) + 1
        # Owned here, not by the session: a client that goes away mid-claim must not leave the
        # bookkeeping half done.
        task = asyncio.get_running_loop().create_task(self._claim_all(claims))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return asyncio.shield(task)

    async def _claim_all(self, claims: list[tuple[str, str, int]]) -> LimitHit | None:
        hit = None
        for scope, name, limit in claims:
            try:
                if hit is None:
                    hit = await self._claim_one(scope, name, limit)
            finally:
                key = (scope, name)
                self._claiming[key] -= 1
                if not self._claiming[key]:
                    del self._claiming[key]
                # A refused claim changed nothing in Redis; any other outcome (even a cancel after
                # Redis counted it) is corrected by publishing the true count.
                if hit is None or hit.limit != f"connections per {scope}":
                    self.connections_changed(scope, name, self._counts.get(key, 0))
        return hit

    async def _claim_one(self, scope: str, name: str, limit: int) -> LimitHit | None:
        what = f"connections per {scope}"
        if not self.leases.available:
            return self._fallback_hit(what, None)
        try:
            async with asyncio.timeout(self.settings.timeout):
                admitted, _open = await self._claim(
                    keys=[self._connections_key(scope, name)],
                    args=[f"{self.settings.key_prefix}:instance:", self.instance, limit, self._ttl_ms],
                )
        except _FAILURES as exc:
            self._failed("connection", exc)
            return self._fallback_hit(what, None)
        if admitted:
            return None
        return LimitHit(
            what,
            None,
            f"connection limit for {scope} {name} reached ({limit} open over all proxies); "
            "retry when one of its connections has closed",
        )

    # --- background ---

    @property
    def _fallback(self) -> str:
        return self.settings.on_unavailable.value

    def _fallback_hit(self, what: str, retry_after: float | None) -> LimitHit | None:
        if self.settings.on_unavailable is SharedLimitFallback.FAIL_OPEN:
            return None
        return unavailable_hit(what, retry_after)

    def _spawn(self, coroutine: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _refill_loop(self) -> None:
        """Send the refills the leases ask for, all at once, as soon as they ask."""
        while not self._closed:
            await self._refills_wanted.wait()
            self._refills_wanted.clear()
            refills = self.leases.refills()
            if not refills:
                continue
            try:
                async with asyncio.timeout(self.settings.timeout):
                    answers = await asyncio.gather(
                        *(
                            self._take(
                                keys=[self._bucket_key(key)],
                                args=[key[2].per_second, key[2].burst, wanted],
                            )
                            for key, _lease, wanted in refills
                        )
                    )
            except _FAILURES as exc:
                # The leases are dropped with the availability; they start afresh when it returns.
                self._failed("lease", exc)
                continue
            now = self._clock()
            for (_key, lease, wanted), (granted, wait) in zip(refills, answers, strict=True):
                lease.refilled(int(granted), wanted, float(wait), now)
                result = "granted" if int(granted) == wanted else "short"
                self._metrics.shared_limit_lease_refills_total.labels(result).inc()

    async def _sync_loop(self) -> None:
        """Publish connection counts when they change, and unused leased tokens; heartbeat and full
        republish every ttl/3."""
        loop = asyncio.get_running_loop()
        interval = self.settings.instance_ttl / 3
        next_heartbeat = self._clock() + interval
        while not self._closed:
            wake_at = next_heartbeat
            if self.leases.size():
                # Unused leased tokens go back within about LEASE_RETURN_AFTER of their last use.
                wake_at = min(wake_at, self._clock() + LEASE_RETURN_AFTER)
            alarm = loop.call_later(max(0.0, wake_at - self._clock()), self._sync_wanted.set)
            try:
                await self._sync_wanted.wait()
            finally:
                alarm.cancel()
            self._sync_wanted.clear()
            heartbeat = self._clock() >= next_heartbeat
            if heartbeat:
                next_heartbeat = self._clock() + interval
            # While the store is down only the heartbeat tries it, and republishes everything when it is back.
            if heartbeat or self.leases.available:
                await self._sync(heartbeat=heartbeat)

    async def _sync(self, *, heartbeat: bool) -> None:
        # A count is published whole only while no claim of its scope is on its way: a claim adds
        # one in Redis, which the count (that already includes its connection) must not overwrite.
        candidates = set(self._counts) if heartbeat else self._dirty
        scopes = {scope for scope in candidates if scope not in self._claiming}
        self._dirty -= scopes
        surplus = self.leases.surplus(self._clock()) if self.leases.available else []
        try:
            async with asyncio.timeout(self.settings.timeout):
                if not self.leases.available:
                    # Connections from before the outage are most likely dead: start afresh.
                    await self._redis.connection_pool.disconnect()
                async with self._redis.pipeline(transaction=False) as pipe:
                    if heartbeat:
                        pipe.set(self._heartbeat_key, "1", px=self._ttl_ms)
                    for scope, name in scopes:
                        key, count = self._connections_key(scope, name), self._counts.get((scope, name), 0)
                        if count:
                            pipe.hset(key, self.instance, count)
                            pipe.pexpire(key, self._ttl_ms)
                        else:
                            pipe.hdel(key, self.instance)
                    await pipe.execute()
                await self._give_back(surplus)
        except _FAILURES as exc:
            self._dirty |= scopes
            self._failed("sync", exc)
            return
        for published in scopes:
            if not self._counts.get(published):
                self._counts.pop(published, None)
        if self.leases.set_available(True):
            self._available.set(1)
            log.info("shared_limits_available_again", instance=self.instance)

    async def _give_back(self, surplus: list[tuple[BucketKey, int]]) -> None:
        await asyncio.gather(
            *(
                self._take(keys=[self._bucket_key(key)], args=[key[2].per_second, key[2].burst, -amount])
                for key, amount in surplus
            )
        )

    def _failed(self, operation: str, exc: BaseException) -> None:
        self._metrics.shared_limit_store_failures_total.labels(operation).inc()
        if self.leases.set_available(False):
            self._available.set(0)
            log.error(
                "shared_limits_unavailable",
                instance=self.instance,
                operation=operation,
                error=str(exc) or type(exc).__name__,
                fallback=self._fallback,
            )
