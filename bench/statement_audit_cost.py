"""Issue 20's three figures for one audited statement, in counts a loaded machine does not move.

    .venv/bin/python bench/statement_audit_cost.py                       # about 30 s
    .venv/bin/python bench/statement_audit_cost.py --workload select-extended

Built on bench/session_cost.py's sockless proxy as deployed (enforce policy for the cashier, every
statement audited): the workload runs until the caches are warm and the session knows its route, then

* ``policy hit``: ``PolicyEngine.decide`` for a statement text it has decided before, and its parts
  (``statement_key``, the cache's lookup);
* ``audit on the data path``: ``ClientSession._audit_statement`` for an allowed statement, as the
  session calls it per statement, and its parts (``record_with`` alone), plus what the shipping
  thread of the same process does per record (``_pickled``), which takes the GIL from the event loop;
* ``record size``: the workload's statement records written through a real ``AuditLog`` and read
  back, in bytes per record and per field, split into fields that repeat in every statement record
  of a session and fields that change per record.

Each cost is given as bytecodes executed (sys.settrace opcode events, exact and load-proof) and as
the minimum over batches of the thread's CPU time per call (``time.thread_time_ns``; a minimum is
what a loaded machine moves least). Use ``valgrind --tool=callgrind`` on this script for
instruction counts.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from session_cost import WORKLOADS, build, count_bytecodes  # bench/ is on sys.path as a script

import proxy.audit
from proxy.auditwriter import AuditLog, _pickled
from proxy.policy.engine import statement_key

BATCH = 2_000  # calls per CPU-time sample
SAMPLES = 40  # samples per figure; the minimum is reported
TRACED = 200  # calls under sys.settrace for the bytecode count


def cost(call: Callable[[], object], after_batch: Callable[[], object] | None = None) -> tuple[float, float]:
    """(bytecodes per call, minimum thread CPU microseconds per call)."""
    best = float("inf")
    for _ in range(SAMPLES):
        started = time.thread_time_ns()
        for _ in range(BATCH):
            call()
        best = min(best, (time.thread_time_ns() - started) / BATCH / 1e3)
        if after_batch is not None:
            after_batch()

    def traced() -> None:
        for _ in range(TRACED):
            call()

    bytecodes = count_bytecodes(traced) / TRACED
    if after_batch is not None:
        after_batch()
    return bytecodes, best


def line(name: str, figures: tuple[float, float]) -> None:
    print(f"  {name:52s} {figures[0]:8.0f} bytecodes  {figures[1]:7.2f} us CPU (min)")


# What each field of a statement record is: the groups a session record or a shorter encoding acts on.
FIELD_GROUPS = {
    "session: one value per session (PCI 10.2.2 who, where, what)": {
        "source",
        "store",
        "terminal",
        "role",
        "serial",
        "route",
        "policy_mode",
    },
    "process: the same in every record of the log": {"component", "host"},
    "chain: seq, prev, hmac, timestamp": {"seq", "prev", "hmac", "timestamp"},
    "statement: what ran and what became of it": {
        "event",
        "statement",
        "fingerprints",
        "rule",
        "decision",
        "outcome",
        "server_connection",
        "on",
    },
}


def field_bytes(record: dict[str, Any], key: str) -> int:
    """Bytes ``"key":value,`` takes in the canonical line (keys sorted, no spaces, ASCII)."""
    return len(json.dumps({key: record[key]}, separators=(",", ":"), ensure_ascii=True)) - 2 + 1


async def measure(workload: str) -> None:
    run = WORKLOADS[workload]
    with tempfile.TemporaryDirectory(prefix="statement-audit-cost-") as work:
        sessions, _transports, server = await build(Path(work), full=True)
        session = sessions[0]
        env = session._env
        audit, policies = env.audit, env.policies
        assert audit is not None
        audit._queue.clear()
        run(sessions, server, 50)  # warm caches; the session knows its route from here on
        records = list(audit._queue)
        audit._queue.clear()
        statements = [record for record in records if record[1] == "statement"]
        assert statements, "the workload audited no statement"
        # The longest statement the workload runs (its normalised text, which the engine decides too).
        _t, _event, _shared, fields = max(statements, key=lambda record: len(record[3]["statement"]))
        text = fields["statement"].encode()
        role, encoding = session._role, session._encoding
        mode = session._statement_checks.mode
        decision = policies.decide(role, text, encoding)
        assert decision.allowed, decision

        print(f"workload {workload}; {len(statements)} statement records of {len(records)} in 50 rounds")
        print(f"policy decision, cache hit ({len(text)}-byte text):")
        line("PolicyEngine.decide", cost(lambda: policies.decide(role, text, encoding)))
        line("  statement_key", cost(lambda: statement_key(text)))
        cache_key = (role, encoding, text)
        line("  _LRU.get (dict get + move_to_end)", cost(lambda: policies._cache.get(cache_key)))
        long_text = text + b" " * (600 - len(text))
        policies.decide(role, long_text, encoding)
        line(
            "PolicyEngine.decide, 600-byte text (blake2b key)",
            cost(lambda: policies.decide(role, long_text, encoding)),
        )

        print("audited statement on the data path:")
        line(
            "ClientSession._audit_statement",
            cost(lambda: session._audit_statement(decision, mode, text, None), audit._queue.clear),
        )
        identity = session._audit_identity()
        line(
            "  AuditLog.record_with alone",
            cost(lambda: audit.record_with(identity, "statement", **fields), audit._queue.clear),
        )
        line("  ClientSession._audit_identity (cached)", cost(session._audit_identity))
        line("  config.statement_share", cost(lambda: env.config.audit.statement_share(role)))
        # Distinct records (pickle would memoise one record repeated), sharing the session's identity.
        batch = [
            (t_ns + index, event, shared, dict(fields))
            for index, (t_ns, event, shared, fields) in enumerate(statements[:500])
        ]
        pickled = cost(lambda: _pickled(batch))
        per_batch = len(batch)
        line(
            f"shipping thread: _pickled, per record ({per_batch}/batch)",
            (pickled[0] / per_batch, pickled[1] / per_batch),
        )

        report_size(work, statements)


def write_log(directory: Path, statements: list[Any], repeat: int) -> tuple[list[bytes], float]:
    """The lines a real AuditLog writes for ``statements`` recorded ``repeat`` times, and the CPU
    seconds its writer process took (rendering, chaining, HMAC, writing; its start included)."""
    directory.mkdir()
    key = directory / "audit.key"
    key.write_bytes(bytes(range(32)))
    key.chmod(0o600)
    settings = proxy.audit.AuditSettings(file=directory / "audit.log", key_file=key, flush_interval=3600.0)
    log = AuditLog(settings, host="store-0042-proxy")
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    log.start()
    for _ in range(repeat):
        for _t, event, shared, fields in statements:
            log.record_with(shared, event, **fields)
    log.close(timeout=120)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    assert proxy.audit.verify([settings.file], key.read_bytes()).ok
    used = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    return settings.file.read_bytes().splitlines(keepends=True), used


def report_size(work: str, statements: list[Any]) -> None:
    repeat, runs = 40, 3
    per_record = []
    for run in range(runs):  # the writer's start, measured alone, is taken off; the least of the runs
        _, idle = write_log(Path(work) / f"empty-{run}", statements, 0)
        lines, busy = write_log(Path(work) / f"size-{run}", statements, repeat)
        per_record.append((busy - idle) / (len(statements) * repeat) * 1e6)
    print(
        f"  writer process CPU per record (render, chain, HMAC, write): {min(per_record):.2f} us "
        f"(least of {runs} runs of {len(statements) * repeat} records; {max(per_record):.2f} the most)"
    )
    parsed = [json.loads(raw) for raw in lines]
    sizes = [len(raw) for raw, record in zip(lines, parsed, strict=True) if record["event"] == "statement"]
    by_field: dict[str, list[int]] = defaultdict(list)
    for record in parsed:
        if record["event"] == "statement":
            for name in record:
                by_field[name].append(field_bytes(record, name))
    print(f"statement record on disk: {statistics.mean(sizes):.0f} bytes mean, {min(sizes)}-{max(sizes)}")
    totals: dict[str, float] = defaultdict(float)
    for name, got in sorted(by_field.items(), key=lambda item: -statistics.mean(item[1])):
        group = next((group for group, names in FIELD_GROUPS.items() if name in names), "other")
        totals[group] += statistics.mean(got)
        print(f"  {name:18s} {statistics.mean(got):6.1f} bytes  {group.split(':')[0]}")
    for group, total in totals.items():
        print(f"  {total:6.1f} bytes  {group}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workload", choices=sorted(WORKLOADS), default="pos-sale")
    args = parser.parse_args()
    asyncio.run(measure(args.workload))
    return 0


if __name__ == "__main__":
    sys.exit(main())
