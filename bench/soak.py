"""Soak: thousands of TLS terminals on one proxy for minutes, as a store chain's morning looks.

Most terminals sit idle on an open, authenticated session (as tills between customers do); a
share of them sell in a loop (bench/pos_sale.sql's statements through asyncpg, with think time
between sales) through the route's 20 server connections; some terminals hang up and come back
all the time (churn), and once a store network blip drops a thousand idle terminals, which all
reconnect at once. The proxy runs as deployed: enforce policy, every statement audited, metrics
and admin API on (bench/run.py's proxy-full). Every second it samples TPS, latency, errors, the
proxy's RSS and open descriptors, and the server connections PostgreSQL sees; at the end it
checks that the audit log holds one record per statement the terminals ran.

    .venv/bin/python bench/soak.py --smoke            # 1 minute, 1,000 terminals
    .venv/bin/python bench/soak.py                    # 10 minutes, 5,000 terminals
    .venv/bin/python bench/soak.py --duration 1800 --png docs/soak.png

Not a test: it prints what it saw and exits non-zero when a bound is broken (errors, server
connections over the pool size, RSS or descriptor growth, audit records missing), so a run can
gate a release. Loopback only; every loop is bounded by the duration.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import ssl
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import asyncpg

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run import (  # bench/ is on sys.path when this runs as a script
    DB_NAME,
    DB_ROLE,
    PKI,
    POS_PRODUCTS,
    POS_STORES,
    TERMINAL_CN,
    BenchError,
    Target,
    audit_files,
    close_terminals,
    log,
    make_db_password,
    make_pki,
    open_terminal,
    pos_schema_sql,
    raise_nofile_limit,
    rss_kib,
    scan_log,
    start_postgres,
    start_proxy,
    workspace,
)

DEFAULT_OUTPUT = Path(__file__).resolve().parent / "results" / "soak.json"
STATEMENTS_PER_SALE = 6  # BEGIN, SELECT, INSERT, INSERT, UPDATE, COMMIT: one audit record each
HANDSHAKES_AT_ONCE = 64  # opening the idle terminals at the start; the blip opens all at once
# Terminals come from their store's address, as through each store's NAT: 127.1.0.1, 127.1.0.2, ...
# (all of 127.0.0.0/8 is this machine's loopback), so per-source caps see stores, not one host.
TILLS_PER_STORE = 20
SELLING_START_SPREAD_S = 5.0  # tills do not all open the shop in the same millisecond
RECONNECT_TIMEOUT = 120.0
SALE_TIMEOUT = 60.0
# Bounds a run must stay within (what the README and docs/performance.md state).
RSS_GROWTH_BOUND_MIB = 64.0
FD_GROWTH_BOUND = 64


@dataclass(slots=True)
class Second:
    """What one second of the run looked like."""

    at: float
    sales: int
    errors: int
    p50_ms: float | None
    p99_ms: float | None
    rss_mib: float
    fds: int
    server_connections: int
    terminals: int


@dataclass(slots=True)
class Tally:
    """Counters the terminals add to; the sampler takes each second's share."""

    sales: int = 0
    statements: int = 0
    errors: int = 0
    latencies_ms: list[float] = field(default_factory=list)
    first_errors: list[str] = field(default_factory=list)

    def error(self, exc: BaseException) -> None:
        self.errors += 1
        if len(self.first_errors) < 5:
            self.first_errors.append(repr(exc)[:300])


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--duration", type=int, default=600, help="seconds of load (default 600)")
    parser.add_argument("--terminals", type=int, default=5000, help="concurrent TLS terminals (default 5000)")
    parser.add_argument("--selling", type=int, default=200, help="of them, terminals that sell (default 200)")
    parser.add_argument(
        "--think", type=float, default=1.0, help="mean seconds between a till's sales (default 1)"
    )
    parser.add_argument(
        "--churn", type=float, default=5.0, help="idle terminals replaced per second (default 5)"
    )
    parser.add_argument(
        "--blip", type=int, default=1000, help="idle terminals dropped at once mid-run (default 1000)"
    )
    parser.add_argument(
        "--pool-size", type=int, default=20, help="the route's server connections (default 20)"
    )
    parser.add_argument(
        "--smoke", action="store_true", help="1 minute, 1,000 terminals, 50 selling, blip 300"
    )
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT, help="JSON results file")
    parser.add_argument(
        "--png", type=Path, help="plot TPS, latency, RSS and server connections (needs matplotlib)"
    )
    args = parser.parse_args(argv)
    if args.smoke:
        args.duration, args.terminals, args.selling, args.blip = 60, 1000, 50, 300
    if args.selling > args.terminals or args.blip > args.terminals - args.selling:
        parser.error("--selling and --blip must fit in --terminals (the blip drops idle terminals)")
    if min(args.duration, args.terminals, args.pool_size) < 1 or args.think <= 0 or args.churn < 0:
        parser.error("--duration, --terminals and --pool-size must be positive, --think too")
    return args


def terminal_context(pki: PKI) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(pki.terminal_ca))
    context.load_cert_chain(pki.terminal_cert, pki.terminal_key)
    return context


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


async def sell(
    target: Target, context: ssl.SSLContext, index: int, *, think: float, until: float, tally: Tally
) -> None:
    """One till: connect, then sell until ``until``, reconnecting after a failure."""
    rng = random.Random(index)
    store = f"store-{1 + index % POS_STORES:03d}"
    connection: asyncpg.Connection | None = None
    await asyncio.sleep(rng.uniform(0, SELLING_START_SPREAD_S))
    while time.monotonic() < until:
        try:
            if connection is None or connection.is_closed():
                connection = await asyncpg.connect(
                    host="127.0.0.1",
                    port=target.port,
                    user=TERMINAL_CN,
                    database=DB_NAME,
                    ssl=context,
                    timeout=RECONNECT_TIMEOUT,
                )
            await asyncio.sleep(min(rng.expovariate(1 / think), max(0.0, until - time.monotonic())))
            if time.monotonic() >= until:
                break
            started = time.perf_counter()
            await asyncio.wait_for(sale(connection, rng, store, index), SALE_TIMEOUT)
            tally.latencies_ms.append((time.perf_counter() - started) * 1000)
            tally.sales += 1
            tally.statements += STATEMENTS_PER_SALE
        except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            tally.error(exc)
            if connection is not None:
                connection.terminate()
                connection = None
            await asyncio.sleep(0.5)
    if connection is not None:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(connection.close(), 10)


async def sale(connection: asyncpg.Connection, rng: random.Random, store: str, index: int) -> None:
    """bench/pos_sale.sql's statements, as a till's application sends them."""
    sku = f"{rng.randint(1, POS_PRODUCTS):013d}"
    quantity = rng.randint(1, 5)
    async with connection.transaction():
        row = await connection.fetchrow(
            "SELECT sku AS item_sku, price_cents AS price FROM products WHERE sku = $1", sku
        )
        if row is None:
            raise BenchError(f"product {sku} is missing")
        sale_id = await connection.fetchval(
            "INSERT INTO sales (store_id, terminal_id, total_cents) VALUES ($1, $2, $3) RETURNING id",
            store,
            f"soak-{index}",
            row["price"] * quantity,
        )
        await connection.execute(
            "INSERT INTO sale_items (sale_id, sku, quantity, price_cents) VALUES ($1, $2, $3, $4)",
            sale_id,
            sku,
            quantity,
            row["price"],
        )
        await connection.execute(
            "UPDATE stock SET quantity = quantity - $1 WHERE store_id = $2 AND sku = $3", quantity, store, sku
        )


class IdleTerminals:
    """The terminals that only hold a session open, replaced now and then, dropped in a blip."""

    def __init__(self, target: Target, context: ssl.SSLContext, tally: Tally) -> None:
        self._target, self._context, self._tally = target, context, tally
        self.writers: list[asyncio.StreamWriter] = []
        self._opened = 0

    def _store_address(self) -> str:
        store = self._opened // TILLS_PER_STORE
        self._opened += 1
        return f"127.1.{store // 250}.{1 + store % 250}"

    async def open(self, count: int, at_once: int) -> float:
        gate = asyncio.Semaphore(at_once)
        started = time.monotonic()
        port, context = self._target.port, self._context
        outcomes = await asyncio.gather(
            *(
                asyncio.wait_for(
                    open_terminal(port, context, TERMINAL_CN, gate, self._store_address()), RECONNECT_TIMEOUT
                )
                for _ in range(count)
            ),
            return_exceptions=True,
        )
        for outcome in outcomes:
            if isinstance(outcome, asyncio.StreamWriter):
                self.writers.append(outcome)
            elif isinstance(outcome, BaseException):
                self._tally.error(outcome)
        return time.monotonic() - started

    async def churn(self, per_second: float, until: float) -> None:
        if per_second <= 0:
            return
        while time.monotonic() < until:
            await asyncio.sleep(1 / per_second)
            if self.writers:
                await close_terminals([self.writers.pop(random.randrange(len(self.writers)))])
            await self.open(1, 1)

    def drop(self, count: int) -> None:
        """A store's link goes away: the terminals' connections vanish without a goodbye."""
        dropped, self.writers = self.writers[:count], self.writers[count:]
        for writer in dropped:
            writer.transport.abort()


async def server_connections(pg_port: int, password: str, pki: PKI) -> asyncpg.Connection:
    context = ssl.create_default_context(cafile=str(pki.db_ca))
    return await asyncpg.connect(
        host="127.0.0.1", port=pg_port, user=DB_ROLE, password=password, database=DB_NAME, ssl=context
    )


async def sample(
    watcher: asyncpg.Connection,
    target: Target,
    tally: Tally,
    idle: IdleTerminals,
    *,
    selling: int,
    started: float,
) -> Second:
    assert target.pid is not None
    latencies, tally.latencies_ms = tally.latencies_ms, []
    cuts = statistics.quantiles(latencies, n=100) if len(latencies) >= 2 else None
    count = await watcher.fetchval(
        "SELECT count(*) FROM pg_stat_activity WHERE usename = $1 AND pid <> pg_backend_pid()", DB_ROLE
    )
    return Second(
        at=round(time.monotonic() - started, 1),
        sales=tally.sales,
        errors=tally.errors,
        p50_ms=round(cuts[49], 2) if cuts else None,
        p99_ms=round(cuts[98], 2) if cuts else None,
        rss_mib=round(rss_kib(target.pid) / 1024, 1),
        fds=open_fds(target.pid),
        server_connections=int(count),
        terminals=len(idle.writers) + selling,
    )


async def soak(
    args: argparse.Namespace, target: Target, pki: PKI, pg_port: int, password: str
) -> dict[str, Any]:
    assert target.pid is not None
    tally = Tally()
    context = terminal_context(pki)
    idle = IdleTerminals(target, context, tally)
    watcher = await server_connections(pg_port, password, pki)
    baseline = {"rss_mib": rss_kib(target.pid) / 1024, "fds": open_fds(target.pid)}
    log(f"opening {args.terminals - args.selling} idle terminals")
    opened_in = await idle.open(args.terminals - args.selling, HANDSHAKES_AT_ONCE)
    log(f"  opened in {opened_in:.1f} s; {args.selling} tills start selling for {args.duration} s")
    started = time.monotonic()
    until = started + args.duration
    tills = [
        asyncio.ensure_future(sell(target, context, index, think=args.think, until=until, tally=tally))
        for index in range(args.selling)
    ]
    churn = asyncio.ensure_future(idle.churn(args.churn, until))
    seconds: list[Second] = []
    blip: dict[str, Any] = {}
    blip_at = started + args.duration / 2
    previous_sales = 0
    try:
        while time.monotonic() < until:
            await asyncio.sleep(1.0)
            second = await sample(watcher, target, tally, idle, selling=args.selling, started=started)
            second.sales, previous_sales = second.sales - previous_sales, second.sales
            seconds.append(second)
            if not blip and time.monotonic() >= blip_at and args.blip:
                log(f"network blip: {args.blip} idle terminals drop and reconnect at once")
                idle.drop(args.blip)
                blip_task = asyncio.ensure_future(idle.open(args.blip, args.blip))
                blip = {"terminals": args.blip, "at": second.at, "task": blip_task}
        await asyncio.wait_for(asyncio.gather(*tills, churn), SALE_TIMEOUT + RECONNECT_TIMEOUT)
        if blip:
            blip["reconnected_in_s"] = round(await asyncio.wait_for(blip.pop("task"), RECONNECT_TIMEOUT), 2)
        # The last second under the full load: the tills hang up right after it.
        end = {"rss_mib": seconds[-1].rss_mib, "fds": seconds[-1].fds}
        loaded = {"rss_mib": max(s.rss_mib for s in seconds), "fds": max(s.fds for s in seconds)}
    finally:
        for task in tills:
            task.cancel()
        await close_terminals(idle.writers)
    await asyncio.sleep(2)
    after_close = {"rss_mib": rss_kib(target.pid) / 1024, "fds": open_fds(target.pid)}
    settled = seconds[min(len(seconds) - 1, int(SELLING_START_SPREAD_S) + 2)]  # every till connected
    await watcher.close()
    return {
        "baseline": baseline,
        "loaded_start": {"rss_mib": settled.rss_mib, "fds": settled.fds},
        "loaded_peak": loaded,
        "end": end,
        "after_close": after_close,
        "first_minute": _window(seconds[:60]),
        "last_minute": _window(seconds[-60:]),
        "whole_run": _window(seconds),
        "opened_idle_in_s": round(opened_in, 1),
        "blip": blip,
        "sales": sum(s.sales for s in seconds),
        "statements": tally.statements,
        "errors": tally.errors,
        "first_errors": tally.first_errors,
        "max_server_connections": max(s.server_connections for s in seconds),
        "seconds": [asdict(s) for s in seconds],
    }


def _window(seconds: Sequence[Second]) -> dict[str, Any]:
    p50s = [s.p50_ms for s in seconds if s.p50_ms is not None]
    p99s = [s.p99_ms for s in seconds if s.p99_ms is not None]
    return {
        "seconds": len(seconds),
        "tps_median": statistics.median(s.sales for s in seconds) if seconds else None,
        "p50_ms_median": statistics.median(p50s) if p50s else None,
        "p99_ms_median": statistics.median(p99s) if p99s else None,
        "rss_mib_last": seconds[-1].rss_mib if seconds else None,
    }


def audit_statements(target: Target) -> int:
    assert target.audit_file is not None
    count = 0
    for path in audit_files(target.audit_file):
        with path.open(encoding="utf-8") as lines:
            count += sum(1 for line in lines if '"event":"statement"' in line)
    return count


def verdicts(result: dict[str, Any], pool_size: int) -> list[str]:
    """Each bound the run broke, in words; empty when it kept them all."""
    broken = []
    if result["errors"]:
        broken.append(f"{result['errors']} errors (first: {result['first_errors'][:2]})")
    if result["max_server_connections"] > pool_size:
        broken.append(f"{result['max_server_connections']} server connections, over the pool's {pool_size}")
    start, end, before, after = (result[k] for k in ("loaded_start", "end", "baseline", "after_close"))
    growth = end["rss_mib"] - start["rss_mib"]
    if growth > RSS_GROWTH_BOUND_MIB:
        broken.append(f"RSS grew {growth:.1f} MiB under load (bound {RSS_GROWTH_BOUND_MIB:g})")
    if abs(end["fds"] - start["fds"]) > FD_GROWTH_BOUND:
        broken.append(f"open descriptors went from {start['fds']} to {end['fds']} under the same load")
    if after["fds"] > before["fds"] + pool_size + FD_GROWTH_BOUND:
        broken.append(f"{after['fds']} descriptors open once every terminal left ({before['fds']} before)")
    failures = {
        event: n for event, n in result["proxy_log"].items() if not event.startswith(("info", "warning"))
    }
    if failures:
        broken.append(f"the proxy logged {failures}")
    if result["audit_statements"] != result["statements"] and not result["errors"]:
        broken.append(
            f"{result['audit_statements']} audit records for {result['statements']} statements the tills ran"
        )
    return broken


def plot(result: dict[str, Any], path: Path) -> None:
    try:
        import matplotlib  # noqa: PLC0415 -- optional (pip install '.[bench]'): only --png needs it

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # noqa: PLC0415
    except ImportError:
        log("no matplotlib: pip install matplotlib for --png")
        return
    seconds = result["seconds"]
    at = [s["at"] for s in seconds]
    figure, (tps, latency, memory) = plt.subplots(3, 1, figsize=(9, 8), sharex=True)
    tps.plot(at, [s["sales"] for s in seconds], color="tab:blue")
    tps.set_ylabel("sales per second")
    latency.plot(at, [s["p50_ms"] for s in seconds], label="p50")
    latency.plot(at, [s["p99_ms"] for s in seconds], label="p99")
    latency.set_ylabel("sale latency (ms)")
    latency.legend(loc="upper right")
    memory.plot(at, [s["rss_mib"] for s in seconds], color="tab:green", label="proxy RSS (MiB)")
    memory.set_ylabel("RSS (MiB)")
    connections = memory.twinx()
    connections.plot(
        at, [s["server_connections"] for s in seconds], color="tab:red", label="server connections"
    )
    connections.set_ylabel("server connections")
    connections.set_ylim(0, result["pool_size"] * 1.25)
    memory.legend(
        [*memory.get_lines(), *connections.get_lines()],
        ["proxy RSS (MiB)", "server connections"],
        loc="center right",
    )
    memory.set_xlabel("seconds")
    if result["blip"]:
        for axis in (tps, latency, memory):
            axis.axvline(result["blip"]["at"], color="grey", linestyle="--")
    figure.suptitle(
        f"pos-db-proxy soak: {result['terminals']} TLS terminals, {result['selling']} selling, "
        f"pool {result['pool_size']}, blip of {result['blip'].get('terminals', 0)}"
    )
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=90)
    log(f"plot: {path}")


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    nofile = raise_nofile_limit()
    if nofile < args.terminals + 512:
        print(
            f"soak: the open-files limit is {nofile}, too low for {args.terminals} terminals", file=sys.stderr
        )
        return 1
    with workspace() as work, contextlib.ExitStack() as stack:
        logs = work / "logs"
        logs.mkdir()
        pki = make_pki(work)
        password, password_file = make_db_password(work)
        log("starting PostgreSQL 15 and the POS tables")
        pg = start_postgres(work, pki, password, stack)
        pg.execute_script(pos_schema_sql(), dbname=DB_NAME)
        log(
            "starting the proxy as deployed (proxy-full: enforce policy, audit, metrics), "
            f"pool {args.pool_size}"
        )
        target = start_proxy(
            work,
            logs,
            variant="proxy-full",
            pki=pki,
            pg=pg,
            password_file=password_file,
            pool_size=args.pool_size,
            stack=stack,
        )
        result = asyncio.run(soak(args, target, pki, pg.port, password))
        result.update(
            terminals=args.terminals,
            selling=args.selling,
            pool_size=args.pool_size,
            duration_s=args.duration,
            think_s=args.think,
            churn_per_s=args.churn,
            audit_statements=audit_statements(target),
        )
        result["proxy_log"] = scan_log(target.log_path)
    broken = verdicts(result, args.pool_size)
    result["broken"] = broken
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    if args.png:
        plot(result, args.png)
    summary = {
        k: result[k] for k in ("sales", "statements", "audit_statements", "errors", "max_server_connections")
    }
    print(
        json.dumps(
            {
                **summary,
                "whole_run": result["whole_run"],
                "baseline": result["baseline"],
                "loaded_start": result["loaded_start"],
                "loaded_peak": result["loaded_peak"],
                "end": result["end"],
                "after_close": result["after_close"],
                "blip": result["blip"],
                "opened_idle_in_s": result["opened_idle_in_s"],
            },
            indent=2,
        )
    )
    print("bounds kept" if not broken else "BROKEN: " + "; ".join(broken))
    print(f"JSON: {args.output}")
    return 1 if broken else 0


if __name__ == "__main__":
    raise SystemExit(main())
