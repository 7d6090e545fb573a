"""Per-store and per-role limits shared by several proxies through a real redis-server (limits.shared)."""

from __future__ import annotations

import asyncio
import math
import random
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import psycopg
import pytest
from redis.asyncio import Redis

from proxy.config.model import SharedLimitsConfig
from proxy.limits import Limiter, LimitSettings, Rate, SharedLimitFallback
from proxy.metrics import Metrics
from proxy.sharedlimits import TAKE_SCRIPT, RedisSharedLimits
from tests.integration.proxyproc import ProxyProcess, TerminalPKI
from tests.integration.redisproc import RedisServer

STORE = "store-001"
StartProxy = Callable[..., ProxyProcess]


def shared_settings(redis: RedisServer, **overrides: Any) -> SharedLimitsConfig:
    # A short TTL keeps the crash and outage tests quick: heartbeats every 0.5 s.
    values: dict[str, Any] = {"key_prefix": "test", "timeout": 0.2, "instance_ttl": 1.5} | overrides
    return SharedLimitsConfig(redis_url=redis.url, **values)


@asynccontextmanager
async def proxy_limits(
    settings: SharedLimitsConfig, instance: str
) -> AsyncIterator[tuple[Limiter, RedisSharedLimits, Metrics]]:
    """What one proxy process holds: its Limiter and its link to the shared store."""
    metrics = Metrics()
    shared = RedisSharedLimits(settings, metrics, instance=instance)
    await shared.start()
    try:
        yield Limiter(shared=shared), shared, metrics
    finally:
        await shared.close()


async def eventually(check: Callable[[], Awaitable[bool]], timeout: float = 5.0) -> float:
    """Seconds until ``check`` holds; fails after ``timeout``."""
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if await check():
            return time.monotonic() - started
        await asyncio.sleep(0.02)
    raise AssertionError(f"not within {timeout} s")


async def connect(limiter: Limiter, terminal: str, policy: LimitSettings, store: str = STORE) -> bool:
    """A connection's startup as the session does it: local count, then the shared claim."""
    if limiter.open_connection(store, terminal, "cashier", policy) is not None:
        return False
    admission = limiter.shared_admission(store, "cashier", policy)
    assert admission is not None
    if await admission is not None:
        limiter.close_connection(store, terminal, "cashier")
        return False
    return True


# Per scope: the policy shape, and the store each of two proxies' terminals belong to (a role's
# limit spans stores; a store's spans its terminals, whichever proxy they reach).
SCOPES = {"store": (STORE, STORE), "role": (STORE, "store-002")}


async def test_the_take_script_never_overdraws_under_concurrent_takers(redis_server: RedisServer) -> None:
    clients = [Redis.from_url(redis_server.url) for _ in range(8)]
    amounts = [random.Random(6).randint(1, 7) for _ in range(400)]

    async def take(client: Redis, amount: int) -> int:
        # A bucket that refills too slowly to matter here: exactly its burst can be taken.
        granted, _wait = await client.eval(TAKE_SCRIPT, 1, "test:bucket", 0.001, 150, amount)
        assert 0 <= int(granted) <= amount
        return int(granted)

    try:
        granted = await asyncio.gather(*(take(clients[i % 8], amount) for i, amount in enumerate(amounts)))
        assert sum(granted) == 150
        # Tokens given back are there again, and no more.
        await clients[0].eval(TAKE_SCRIPT, 1, "test:bucket", 0.001, 150, -10)
        granted = await asyncio.gather(*(take(clients[i % 8], 3) for i in range(20)))
        assert sum(granted) == 10
    finally:
        await asyncio.gather(*(client.aclose() for client in clients))


@pytest.mark.parametrize("scope", SCOPES)
async def test_two_proxies_enforce_one_statement_budget(redis_server: RedisServer, scope: str) -> None:
    # Alone, each proxy's local bucket would admit 100 at once: 200 together.
    policy = LimitSettings(**{f"{scope}_statements": Rate(2, 100)})
    lease_size = 10
    settings = shared_settings(redis_server, lease_size=lease_size)

    async def run(limiter: Limiter, store: str, until: float) -> int:
        admitted = 0
        while time.monotonic() < until:
            for _ in range(20):
                admitted += limiter.statement(store, "till-01", "cashier", policy) is None
            await asyncio.sleep(0.002)
        return admitted

    stores = SCOPES[scope]
    async with proxy_limits(settings, "a") as (one, _, metrics), proxy_limits(settings, "b") as (two, _, _):
        started = time.monotonic()
        admitted = await asyncio.gather(
            run(one, stores[0], started + 1.5), run(two, stores[1], started + 1.5)
        )
        elapsed = time.monotonic() - started
    # One bucket: its burst plus what it refilled, give or take one lease per proxy (TokenLease).
    assert min(admitted) > 0
    assert 100 - 2 * lease_size <= sum(admitted) <= 100 + 2 * elapsed + 2 * lease_size, admitted
    assert metrics.registry.get_sample_value(
        "pos_proxy_shared_limit_lease_refills_total", {"result": "short"}
    )


async def test_unused_leased_tokens_go_back_to_the_shared_bucket(redis_server: RedisServer) -> None:
    policy = LimitSettings(store_statements=Rate(0.001, 20))

    async def tokens_in_redis() -> float:
        async with Redis.from_url(redis_server.url) as check:
            value = await check.hget("test:statements:store:store-001:0.001:20", "tokens")
            return float(value) if value is not None else math.nan

    async with proxy_limits(shared_settings(redis_server, lease_size=10), "a") as (limiter, _, _):
        assert limiter.statement(STORE, "till-01", "cashier", policy) is None

        async def leased() -> bool:
            return await tokens_in_redis() == pytest.approx(10, abs=0.01)

        # One statement on credit made the proxy lease a full batch: 10 of 20 are away...
        await eventually(leased)

        async def returned() -> bool:
            return await tokens_in_redis() == pytest.approx(19, abs=0.01)

        # ...and the 9 it did not spend go back after a second unused.
        waited = await eventually(returned, timeout=4.0)
        assert waited > 0.5


@pytest.mark.parametrize("scope", SCOPES)
async def test_connection_limits_hold_across_two_proxies(redis_server: RedisServer, scope: str) -> None:
    policy = LimitSettings(**{f"connections_per_{scope}": 3})
    settings = shared_settings(redis_server)
    async with proxy_limits(settings, "a") as (one, _, _), proxy_limits(settings, "b") as (two, _, _):
        # Proxy one serves the odd attempts (with the first store), proxy two the even ones.
        proxies = {one: SCOPES[scope][0], two: SCOPES[scope][1]}
        admitted = await asyncio.gather(
            *(
                connect(proxy, f"till-{n:02}", policy, proxies[proxy])
                for n in range(10)
                for proxy in [one if n % 2 else two]
            )
        )
        assert sum(admitted) == 3
        # Probe from the proxy holding fewer of the three (the race may give all three to one):
        # its local count admits, the shared one refuses.
        probe = one if sum(admitted[1::2]) < sum(admitted[0::2]) else two
        assert probe.open_connection(proxies[probe], "till-99", "cashier", policy) is None
        admission = probe.shared_admission(proxies[probe], "cashier", policy)
        assert admission is not None
        hit = await admission
        assert hit is not None and hit.limit == f"connections per {scope}"
        assert "(3 open over all proxies)" in hit.message
        probe.close_connection(proxies[probe], "till-99", "cashier")

        # One closes on its proxy: the other proxy may open one, once the close is published.
        holder, other = (one, two) if any(admitted[1::2]) else (two, one)
        terminal = next(f"till-{n:02}" for n in range(10) if admitted[n] and (n % 2 == 1) == (holder is one))
        holder.close_connection(proxies[holder], terminal, "cashier")

        async def other_connects() -> bool:
            return await connect(other, "till-new", policy, proxies[other])

        await eventually(other_connects, timeout=3.0)
        assert not await connect(other, "till-newer", policy, proxies[other])

    # A proxy that stops cleanly withdraws its counts at once: a fresh one may use all three.
    async with proxy_limits(settings, "c") as (three, _, _):
        assert [await connect(three, f"till-{n}", policy) for n in range(4)] == [True] * 3 + [False]


_DOOMED_PROXY = """
import asyncio, sys
from proxy.config.model import SharedLimitsConfig
from proxy.limits import Limiter, LimitSettings
from proxy.metrics import Metrics
from proxy.sharedlimits import RedisSharedLimits

async def main() -> None:
    settings = SharedLimitsConfig(redis_url=sys.argv[1], key_prefix="test", timeout=0.2, instance_ttl=1.5)
    shared = RedisSharedLimits(settings, Metrics(), instance="doomed")
    await shared.start()
    limiter = Limiter(shared=shared)
    policy = LimitSettings(connections_per_store=3)
    for n in range(3):
        assert limiter.open_connection("store-001", f"till-{n}", "cashier", policy) is None
        assert await limiter.shared_admission("store-001", "cashier", policy) is None
    print("holding", flush=True)
    await asyncio.sleep(60)

asyncio.run(main())
"""


async def test_a_crashed_proxys_connections_stop_counting_after_its_ttl(redis_server: RedisServer) -> None:
    policy = LimitSettings(connections_per_store=3)
    doomed = await asyncio.create_subprocess_exec(
        sys.executable, "-c", _DOOMED_PROXY, redis_server.url, stdout=asyncio.subprocess.PIPE
    )
    try:
        assert doomed.stdout is not None
        # Its log lines come first.
        lines = [await asyncio.wait_for(doomed.stdout.readline(), 20) for _ in range(2)]
        assert lines[-1] == b"holding\n", lines
        async with proxy_limits(shared_settings(redis_server), "survivor") as (limiter, _, _):
            assert not await connect(limiter, "till-09", policy)
            doomed.kill()  # SIGKILL: no clean withdrawal, as in a crash
            await asyncio.wait_for(doomed.wait(), 10)
            assert not await connect(limiter, "till-09", policy)

            async def survivor_connects() -> bool:
                return await connect(limiter, "till-09", policy)

            # Its heartbeat key (TTL 1.5 s, renewed every 0.5 s) expires, and its counts with it.
            waited = await eventually(survivor_connects, timeout=5.0)
            assert 0.5 < waited < 2.5
    finally:
        if doomed.returncode is None:
            doomed.kill()
            await doomed.wait()


def available(metrics: Metrics, fallback: SharedLimitFallback) -> float | None:
    return metrics.registry.get_sample_value(
        "pos_proxy_shared_limits_available", {"fallback": fallback.value}
    )


@pytest.mark.parametrize("fallback", list(SharedLimitFallback), ids=lambda fallback: fallback.value)
async def test_redis_outage_applies_the_fallback_and_sharing_resumes_after_it(
    redis_server: RedisServer, fallback: SharedLimitFallback
) -> None:
    policy = LimitSettings(store_statements=Rate(0.001, 5), connections_per_store=10)

    async def bucket_in_redis() -> bool:
        async with Redis.from_url(redis_server.url) as check:
            return bool(await check.exists("test:statements:store:store-001:0.001:5"))

    async with proxy_limits(shared_settings(redis_server, on_unavailable=fallback), "a") as (
        limiter,
        _,
        metrics,
    ):
        assert limiter.statement(STORE, "till-01", "cashier", policy) is None
        assert await connect(limiter, "till-01", policy)
        await eventually(bucket_in_redis)
        assert available(metrics, fallback) == 1

        redis_server.stop()
        connected = await connect(limiter, "till-02", policy)
        assert available(metrics, fallback) == 0
        assert metrics.registry.get_sample_value(
            "pos_proxy_shared_limit_store_failures_total", {"operation": "connection"}
        )
        hits = [limiter.statement(STORE, "till-01", "cashier", policy) for _ in range(8)]
        if fallback is SharedLimitFallback.FAIL_OPEN:
            # This proxy's own bucket of the same shape: 5 at once, then refused as usual.
            assert connected
            assert hits[:5] == [None] * 5
            assert all(hit is not None and hit.limit == "statements per store" for hit in hits[5:])
        else:
            assert not connected
            assert all(
                hit is not None
                and hit.limit == "statements per store (shared store unavailable)"
                and "the shared limit store is unavailable" in hit.message
                for hit in hits
            )
            admission = limiter.shared_admission(STORE, "cashier", policy)
            assert admission is not None
            hit = await admission
            assert hit is not None and hit.limit == "connections per store (shared store unavailable)"

        # A fresh Redis (no data) on the same port: the heartbeat notices, and sharing resumes.
        redis_server.start()

        async def recovered() -> bool:
            return available(metrics, fallback) == 1

        await eventually(recovered)
        assert await connect(limiter, "till-03", policy)
        assert limiter.statement(STORE, "till-01", "cashier", policy) is None
        await eventually(bucket_in_redis)


# --- through real proxy processes -------------------------------------------------------------------------


def test_two_proxy_processes_share_the_store_limits(
    start_proxy: StartProxy, terminal_pki: TerminalPKI, redis_server: RedisServer
) -> None:
    lease_size = 4
    shared = {"redis_url": redis_server.url, "key_prefix": "fleet", "lease_size": lease_size}
    limits = {"store_statements": {"per_second": 2, "burst": 30}, "connections_per_store": 2}
    config: dict[str, Any] = {
        "roles": {"cashier": {"limits": limits}, "manager": {"limits": limits}},
        "limits": {"shared": shared},
    }
    proxies = [start_proxy(**config), start_proxy(**config)]
    # No automatic prepare: the statement limits count Query and Parse messages, and psycopg
    # would otherwise run "SELECT 1" as Bind/Execute of a prepared statement from the 6th time on.
    connections = [
        psycopg.connect(
            **proxy.conninfo(terminal_pki.cashier, terminal_pki.ca), autocommit=True, prepare_threshold=None
        )
        for proxy in proxies
    ]
    try:
        # A third connection of the store, to either proxy, passes the store's limit over both.
        with pytest.raises(psycopg.OperationalError, match=r"store store-001 reached \(2 open over all"):
            psycopg.connect(**proxies[0].conninfo(terminal_pki.manager, terminal_pki.ca))
        refusal = proxies[0].wait_for_event("session_refused", terminal="office-01")
        assert refusal["sqlstate"] == "53300"

        admitted = 0
        hit: psycopg.errors.ConfigurationLimitExceeded | None = None
        for round_ in range(200):
            try:
                connections[round_ % 2].execute("SELECT 1")
                admitted += 1
            except psycopg.errors.ConfigurationLimitExceeded as exc:
                hit = exc
                break
        # One budget of 30 for the store (each proxy alone would have allowed 30), within the leases.
        assert hit is not None, "the shared store limit was never hit"
        assert "statement rate limit for store store-001" in str(hit)
        assert 30 - 2 * lease_size <= admitted <= 30 + 2 * lease_size + 10, admitted
        # The refused statement cost the session nothing: after the retry hint it carries on.
        time.sleep(1.5)
        assert connections[0].execute("SELECT 'still usable'").fetchone() == ("still usable",)
        assert connections[1].execute("SELECT 'both'").fetchone() == ("both",)
    finally:
        for connection in connections:
            connection.close()


def test_fail_closed_refuses_with_the_sqlstates_while_redis_is_down(
    start_proxy: StartProxy, terminal_pki: TerminalPKI, redis_server: RedisServer
) -> None:
    shared = {"redis_url": redis_server.url, "on_unavailable": "fail_closed", "timeout": "200ms",
              "instance_ttl": "1500ms"}  # fmt: skip
    limits = {"store_statements": {"per_second": 100, "burst": 100}, "connections_per_store": 5}
    proxy = start_proxy(roles={"cashier": {"limits": limits}}, limits={"shared": shared})
    with psycopg.connect(
        **proxy.conninfo(terminal_pki.cashier, terminal_pki.ca), autocommit=True
    ) as connection:
        assert connection.execute("SELECT 1").fetchone() == (1,)
        redis_server.stop()
        with pytest.raises(psycopg.OperationalError, match="the shared limit store is unavailable"):
            psycopg.connect(**proxy.conninfo(terminal_pki.cashier, terminal_pki.ca))
        assert proxy.wait_for_event("session_refused", sqlstate="53300")
        proxy.wait_for_event("shared_limits_unavailable", fallback="fail_closed")
        with pytest.raises(psycopg.errors.ConfigurationLimitExceeded) as limited:
            connection.execute("SELECT 1")
        assert "the shared limit store is unavailable" in str(limited.value)

        redis_server.start()
        proxy.wait_for_event("shared_limits_available_again")
        assert connection.execute("SELECT 'back'").fetchone() == ("back",)
    with psycopg.connect(**proxy.conninfo(terminal_pki.cashier, terminal_pki.ca)) as again:
        assert again.execute("SELECT 2").fetchone() == (2,)


async def test_a_proxy_starts_while_redis_is_down_and_joins_when_it_is_up(redis_server: RedisServer) -> None:
    redis_server.stop()
    policy = LimitSettings(store_statements=Rate(0.001, 2))
    settings = shared_settings(redis_server, on_unavailable=SharedLimitFallback.FAIL_OPEN)
    async with proxy_limits(settings, "early") as (limiter, shared, metrics):
        assert not shared.leases.available
        assert available(metrics, SharedLimitFallback.FAIL_OPEN) == 0
        # Local limits meanwhile.
        hits = [limiter.statement(STORE, "till-01", "cashier", policy) for _ in range(3)]
        assert hits[:2] == [None, None] and hits[2] is not None

        redis_server.start()

        async def joined() -> bool:
            return available(metrics, SharedLimitFallback.FAIL_OPEN) == 1

        await eventually(joined)
        assert limiter.statement(STORE, "till-01", "cashier", policy) is None


async def test_a_redis_restart_between_calls_is_not_an_outage(redis_server: RedisServer) -> None:
    policy = LimitSettings(connections_per_store=10)
    # A long TTL keeps the heartbeat out of the way: only the claims meet the restarted Redis.
    settings = shared_settings(redis_server, instance_ttl=30.0)
    async with proxy_limits(settings, "a") as (limiter, _, metrics):
        assert await connect(limiter, "till-01", policy)
        redis_server.stop()
        redis_server.start()
        # The pooled connection died with the old server; the claim retries on a fresh one.
        assert await connect(limiter, "till-02", policy)
        assert available(metrics, SharedLimitFallback.FAIL_OPEN) == 1
        assert not metrics.registry.get_sample_value(
            "pos_proxy_shared_limit_store_failures_total", {"operation": "connection"}
        )
