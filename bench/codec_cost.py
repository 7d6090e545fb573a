"""CPU cost of the PostgreSQL codec on the data path, without sockets: one pgbench -S -M extended
cycle (Parse/Bind/Describe/Execute/Sync out, the six reply messages back) through framing,
statement rewriting and reply filtering, as transaction pooling runs it.

    .venv/bin/python bench/codec_cost.py        # median of 7 runs of 20,000 cycles, in microseconds
"""

from __future__ import annotations

import statistics
import timeit

from proxy.protocols.postgres import messages as m
from proxy.protocols.postgres.prepared import (
    ClientStatements,
    ServerState,
    ServerStatements,
    StatementStats,
    filter_server_messages,
    take_ready_synthetics,
)

CLIENT = (
    m.build_message(b"P", b"\x00SELECT abalance FROM pgbench_accounts WHERE aid = $1;\x00\x00\x00")
    + m.build_message(b"B", b"\x00\x00\x00\x00\x00\x01\x00\x00\x00\x0512345\x00\x00")
    + m.build_message(b"D", b"P\x00")
    + m.build_message(b"E", b"\x00\x00\x00\x00\x00")
    + m.build_message(b"S", b"")
)
SERVER = (
    m.build_message(b"1", b"")
    + m.build_message(b"2", b"")
    + m.build_message(b"T", b"\x00\x01abalance\x00" + b"\x00" * 18)
    + m.build_message(b"D", b"\x00\x01\x00\x00\x00\x010")
    + m.build_message(b"C", b"SELECT 1\x00")
    + m.build_message(b"Z", b"I")
)
CYCLES = 20_000
RUNS = 7


def main() -> int:
    statements = ClientStatements(StatementStats())
    state = ServerState(ServerStatements(100))

    def cycle() -> None:
        frames, _ = m.scan_frames(CLIENT, 1 << 24)
        statements.rewrite(CLIENT, frames, state, {}, [])
        take_ready_synthetics(state)
        frames, _ = m.scan_frames(SERVER, 1 << 30)
        _out, status, _parameters = filter_server_messages(SERVER, frames, state)
        if status != b"I" or state.pending:
            raise AssertionError("the reply queue did not drain: the codec is broken")

    runs = [timeit.timeit(cycle, number=CYCLES) / CYCLES * 1e6 for _ in range(RUNS)]
    print(f"codec cost of one select-extended cycle: {statistics.median(runs):.2f} us (median of {RUNS})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
