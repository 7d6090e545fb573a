"""CPU cost of the proxy's own Python per transaction, without sockets or TLS: the whole data
path (client session, transaction pooling hand-over, server connection, codec, metrics) as
the proxy runs it, driven by pgbench's `-S -M extended` messages, or with `--workload pos-sale`
by the six extended-protocol cycles of bench/pos_sale.sql (BEGIN, four statements, COMMIT).

    .venv/bin/python bench/session_cost.py               # median of 7 runs, in microseconds
    .venv/bin/python bench/session_cost.py --profile     # plus where the time goes (cProfile)
    .venv/bin/python bench/session_cost.py --workload pos-sale
    .venv/bin/python bench/session_cost.py --full     # as deployed: enforce policy, audit, metrics
    .venv/bin/python bench/session_cost.py --bytecodes   # plus bytecodes per transaction (load-proof)

Two terminals share one server connection, as when 64 pgbench clients share 20: the first
borrows the idle connection, the second waits in line and gets it handed over when the first's
ReadyForQuery comes back. Transports are stand-ins that keep what is written (tests/sockless.py,
shared with the unit tests); the rest is the real ProxyServer, ClientSession, UpstreamPool and
ServerConnection. What bench/run.py measures on top of this is the event loop, TLS and the
kernel (bench/lean_pooler.py shows that floor).
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import pstats
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import Any

# This tree's proxy (not an installed one) and tests.sockless, before anything imports proxy.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import yaml
from codec_cost import CLIENT, SERVER  # bench/ is on sys.path when this runs as a script
from run import bench_policy

from proxy.metrics import build_labels
from proxy.oplog import configure_logging
from proxy.protocols.postgres import messages as m
from proxy.protocols.postgres.session import ClientSession
from proxy.protocols.postgres.upstream import ServerConnection
from tests.sockless import (
    READY,
    RecordingTransport,
    add_server,
    open_session,
    proxy_without_listener,
    terminal_certificate,
)

SERVER_PARAMETERS = {"server_version": "15.0", "client_encoding": "UTF8", "DateStyle": "ISO, MDY"}
TERMINALS = 2
ROUNDS = 5_000  # each round is one transaction per terminal
RUNS = 7


async def build(
    directory: Path, full: bool
) -> tuple[list[ClientSession], list[RecordingTransport], ServerConnection]:
    policy = yaml.safe_dump(bench_policy(), sort_keys=False) if full else None
    proxy = proxy_without_listener(directory, policy=policy, audit=full)
    # A policy role runs with the policy's search_path: as the proxy's one set_config at the first
    # hand-over leaves the connection (this stand-in server answers no query).
    parameters = {**SERVER_PARAMETERS, "search_path": '"public"'} if full else SERVER_PARAMETERS
    server, _upstream = add_server(proxy.routes["pos"], parameters)
    # Two tills, each with its own certificate: one terminal may hold only its share of the pool.
    opened = [
        open_session(proxy, terminal_certificate(directory, terminal=f"till-{index + 1:02d}"), 40000 + index)
        for index in range(TERMINALS)
    ]
    return [session for session, _ in opened], [transport for _, transport in opened], server


def extended_cycle(sql: bytes, parameters: int) -> bytes:
    """pgbench -M extended's messages for one statement: unnamed Parse, Bind, Describe, Execute, Sync."""
    values = b"".join(b"\x00\x00\x00\x0212" for _ in range(parameters))
    bind = b"\x00\x00\x00\x00" + parameters.to_bytes(2, "big") + values + b"\x00\x00"
    return (
        m.build_message(b"P", b"\x00" + sql + b"\x00\x00\x00")
        + m.build_message(b"B", bind)
        + m.build_message(b"D", b"P\x00")
        + m.build_message(b"E", b"\x00\x00\x00\x00\x00")
        + m.build_message(b"S", b"")
    )


def reply(tag: bytes, status: bytes, *, rows: bool) -> bytes:
    described = (
        m.build_message(b"T", b"\x00\x01id\x00" + b"\x00" * 18)
        + m.build_message(b"D", b"\x00\x01\x00\x00\x00\x0142")
        if rows
        else m.build_message(b"n", b"")
    )
    return (
        m.build_message(b"1", b"")
        + m.build_message(b"2", b"")
        + described
        + m.build_message(b"C", tag + b"\x00")
        + m.build_message(b"Z", status)
    )


BEGIN = extended_cycle(b"BEGIN;", 0)
COMMIT = extended_cycle(b"COMMIT;", 0)
POS_STATEMENTS = [
    extended_cycle(b"SELECT sku AS item_sku, price_cents AS price FROM products WHERE sku = $1", 1),
    extended_cycle(
        b"INSERT INTO sales (store_id, terminal_id, total_cents) VALUES ($1, $2, $3) RETURNING id", 3
    ),
    extended_cycle(
        b"INSERT INTO sale_items (sale_id, sku, quantity, price_cents) VALUES ($1, $2, $3, $4)", 4
    ),
    extended_cycle(b"UPDATE stock SET quantity = quantity - $1 WHERE store_id = $2 AND sku = $3", 3),
]
BEGUN = reply(b"BEGIN", b"T", rows=False)
IN_TRANSACTION = reply(b"SELECT 1", b"T", rows=True)
COMMITTED = reply(b"COMMIT", b"I", rows=False)


def run_rounds(sessions: list[ClientSession], server: ServerConnection, rounds: int) -> None:
    for _ in range(rounds):
        for session in sessions:
            session.data_received(CLIENT)  # the first borrows the connection, the rest wait
        for _ in sessions:
            server.data_received(SERVER)  # each reply lends the connection to the next in line


def run_pos_rounds(sessions: list[ClientSession], server: ServerConnection, rounds: int) -> None:
    for _ in range(rounds):
        for session in sessions:
            session.data_received(BEGIN)  # the first borrows the connection, the rest wait
        for session in sessions:  # in the order they get the connection
            server.data_received(BEGUN)
            for statement in POS_STATEMENTS:
                session.data_received(statement)
                server.data_received(IN_TRANSACTION)
            session.data_received(COMMIT)
            server.data_received(COMMITTED)  # lends the connection to the next in line


WORKLOADS = {"select-extended": run_rounds, "pos-sale": run_pos_rounds}


def check(transports: list[RecordingTransport], server: ServerConnection, rounds: int) -> None:
    for transport in transports:
        answers = sum(1 for data in transport.written if data.endswith(READY))
        if answers < rounds:
            raise AssertionError(f"a terminal got {answers} answers for {rounds} transactions")
        transport.written.clear()
    server_transport = server._transport
    assert isinstance(server_transport, RecordingTransport)
    server_transport.written.clear()


def count_bytecodes(run: Callable[[], None]) -> int:
    """Bytecodes the interpreter executes in ``run`` (sys.settrace opcode events): a cost that does
    not move with the load of a shared machine, to compare two trees step by step."""
    executed = 0

    def trace(frame: FrameType, _event: str, _arg: Any) -> Any:
        frame.f_trace_opcodes = True

        def count(_frame: FrameType, event: str, _arg: Any) -> Any:
            nonlocal executed
            if event == "opcode":
                executed += 1
            return count

        return count

    sys.settrace(trace)
    try:
        run()
    finally:
        sys.settrace(None)
    return executed


async def measure(workload: str, profile: bool, full: bool, bytecodes: bool) -> None:
    run = WORKLOADS[workload]
    with tempfile.TemporaryDirectory(prefix="pos-session-cost-") as work:
        sessions, transports, server = await build(Path(work), full)
        run(sessions, server, 500)  # warm caches (policy decisions, statement classes)
        check(transports, server, 500)
        costs = []
        for _ in range(RUNS):
            started = time.perf_counter()
            run(sessions, server, ROUNDS)
            costs.append((time.perf_counter() - started) / (ROUNDS * TERMINALS) * 1e6)
            check(transports, server, ROUNDS)
        print(
            f"proxy Python per {workload} transaction{' with policy and audit' if full else ''}: "
            f"{statistics.median(costs):.2f} us "
            f"(median of {RUNS} runs of {ROUNDS * TERMINALS:,}; {build_labels()['build']})"
        )
        if bytecodes:
            rounds = 200
            executed = count_bytecodes(lambda: run(sessions, server, rounds))
            print(f"bytecodes per {workload} transaction: {executed / (rounds * TERMINALS):.1f}")
        if profile:
            profiler = cProfile.Profile()
            profiler.runcall(run, sessions, server, ROUNDS)
            pstats.Stats(profiler).sort_stats("tottime").print_stats(25)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--profile", action="store_true", help="also print a cProfile of one run")
    parser.add_argument("--workload", choices=sorted(WORKLOADS), default="select-extended")
    parser.add_argument(
        "--bytecodes", action="store_true", help="also count the bytecodes executed per transaction"
    )
    parser.add_argument(
        "--full", action="store_true", help="the cashier policy in enforce mode and every statement audited"
    )
    args = parser.parse_args()
    configure_logging(json=False, level="error")  # session_start lines would only get in the way
    asyncio.run(measure(args.workload, args.profile, args.full, args.bytecodes))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
