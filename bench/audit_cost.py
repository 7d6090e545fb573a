"""What the audit log costs the data path, measured without PostgreSQL or a network.

    .venv/bin/python bench/audit_cost.py                    # 5 rounds, about 40 s
    .venv/bin/python bench/audit_cost.py --rounds 3 --rate 4000
    git show main:proxy/auditwriter.py > /tmp/audit_main.py  # against another version, interleaved:
    .venv/bin/python bench/audit_cost.py --compare /tmp/audit_main.py
    (a version from before the writer process: git show fee2754:proxy/audit.py > /tmp/audit_old.py)

Four figures, medians of rounds (with --compare, the two versions alternate within each round):

* ``record``: time per statement record on the calling thread (the event loop), made the way
  PostgreSQL sessions make it: ``record_with`` and the session's identity fields built once, or,
  for a version without ``record_with``, ``record`` with those fields built for every call. The
  writer is idle meanwhile.
* ``render``: time per record for ``close()`` to write a backlog (ship, render, chain, HMAC,
  write), with nothing else running.
* ``kept``: a CPU-bound pure-Python loop on the main thread that also makes ``--rate`` statement
  records a second, against the same loop without them: the share of its throughput it keeps
  while the log ships and writes them (GIL contention with its threads). Stretches with and
  without records alternate; an audited stretch runs on until the writer has written its
  records, so all of the writer's work for them is counted, whenever it ran.
* ``kept-io``: the same with a round trip through a ``cat`` child process in every work unit:
  the main thread gives up the GIL in system calls, as the proxy's event loop does, and has to
  get it back from the writer each time.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import secrets
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import proxy.audit
import proxy.auditwriter

# What PostgresSession._audit_statement records for one allowed statement.
IDENTITY = {
    "source": "127.0.0.1:51724",
    "store": "store-0042",
    "terminal": "till-07",
    "role": "cashier",
    "serial": "5f1c0e8a9b3d27c4e6f80a1b2c3d4e5f60718293",
    "route": "pos",
}
STATEMENT = {
    "decision": "allowed",
    "rule": "product-lookup",
    "policy_mode": "enforce",
    "fingerprints": ["a3f0c2d19b8e7f64"],
    "statement": "SELECT id, name, price_cents FROM products WHERE store_id = $1 AND sku = $2",
    "server_connection": 17,
}
WORK_UNIT = 200  # iterations of the pure-Python loop between two checks of the clock
STRETCHES = 8  # alternations of no audit and audit within one measurement


def load_version(path: Path) -> ModuleType:
    """Another version of the module with AuditLog and AuditSettings (proxy/auditwriter.py, or
    proxy/audit.py from before the writer process)."""
    spec = importlib.util.spec_from_file_location(f"audit_{path.stem}", path)
    assert spec is not None and spec.loader is not None, path
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def statement_recorder(audit: Any) -> Callable[[], None]:
    """One statement record, made as a session makes it with this version's API."""
    if hasattr(audit, "record_with"):
        shared = dict(IDENTITY)
        return lambda: audit.record_with(shared, "statement", outcome="success", **STATEMENT)
    return lambda: audit.record("statement", outcome="success", **dict(IDENTITY), **STATEMENT)


def new_log(version: ModuleType, directory: Path, flush_interval: float) -> Any:
    key = directory / "audit.key"
    if not key.exists():
        key.write_bytes(secrets.token_bytes(32))
        key.chmod(0o600)
    log = directory / f"audit-{time.monotonic_ns()}.log"
    settings = version.AuditSettings(file=log, key_file=key, flush_interval=flush_interval)
    return version.AuditLog(settings, host="bench-host")


def measure_record_and_render(version: ModuleType, directory: Path, count: int) -> tuple[float, float]:
    """Microseconds per statement record on the calling thread, and per record rendered by close()."""
    audit = new_log(version, directory, flush_interval=3600.0)  # the writer sleeps until close()
    audit.start()
    record_statement = statement_recorder(audit)
    started = time.perf_counter()
    for _ in range(count):
        record_statement()
    recorded = time.perf_counter()
    audit.close(timeout=120)
    closed = time.perf_counter()
    return (recorded - started) / count * 1e6, (closed - recorded) / count * 1e6


class Echo:
    """A `cat` child process: one round trip through it blocks in read(), with the GIL released."""

    def __init__(self) -> None:
        self._process = subprocess.Popen(["cat"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, bufsize=0)
        assert self._process.stdin is not None and self._process.stdout is not None
        self._to, self._from = self._process.stdin.fileno(), self._process.stdout.fileno()

    def round_trip(self) -> None:
        os.write(self._to, b"x")
        os.read(self._from, 16)

    def close(self) -> None:
        assert self._process.stdin is not None
        self._process.stdin.close()
        self._process.wait(5)


def busy_loop(
    done: Callable[[], bool], rate: float, on_tick: Callable[[], None] | None, echo: Echo | None
) -> tuple[int, float]:
    """Work units done until done(), and the seconds that took; on_tick is called `rate` times a second."""
    units = 0
    interval = 1.0 / rate
    started = next_tick = time.perf_counter()
    while not done():
        total = 0
        for i in range(WORK_UNIT):
            total += i * i
        if echo is not None:
            echo.round_trip()
        units += 1
        now = time.perf_counter()
        while on_tick is not None and now >= next_tick:
            on_tick()
            next_tick += interval
    return units, time.perf_counter() - started


def measure_contention(
    version: ModuleType, directory: Path, seconds: float, rate: float, *, io: bool
) -> float:
    """The main thread's work rate with the audit log on, as a share of its rate with it off.

    Stretches with and without records alternate, so a change in the machine's load hits both
    alike. An audited stretch goes on, without new records, until the writer has written all of
    its records: the writer's work for them falls inside the stretch, however it was scheduled.
    """
    echo = Echo() if io else None
    audit = new_log(version, directory, flush_interval=0.2)
    audit.start()
    record_statement = statement_recorder(audit)
    recorded = 0

    def tick() -> None:
        nonlocal recorded
        record_statement()
        recorded += 1

    def for_seconds(length: float) -> Callable[[], bool]:
        end = time.perf_counter() + length
        return lambda: time.perf_counter() >= end

    deadline = 0.0

    def caught_up() -> bool:
        # The log's opening records (audit_file_start, audit_started) come before the statements.
        if time.monotonic() > deadline:
            raise RuntimeError("the audit writer did not catch up within 60 s")
        return bool(audit.written >= recorded + 2)

    plain_units = audited_units = 0
    plain_seconds = audited_seconds = 0.0
    try:
        stretch = seconds / STRETCHES
        for _ in range(STRETCHES):
            units, elapsed = busy_loop(for_seconds(stretch), rate, None, echo)
            plain_units, plain_seconds = plain_units + units, plain_seconds + elapsed
            units, elapsed = busy_loop(for_seconds(stretch), rate, tick, echo)
            audited_units, audited_seconds = audited_units + units, audited_seconds + elapsed
            deadline = time.monotonic() + 60
            units, elapsed = busy_loop(caught_up, rate, None, echo)
            audited_units, audited_seconds = audited_units + units, audited_seconds + elapsed
    finally:
        audit.close(timeout=120)
        if echo is not None:
            echo.close()
    return (audited_units / audited_seconds) / (plain_units / plain_seconds)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--records", type=int, default=50_000, help="records for record/render")
    parser.add_argument("--rate", type=float, default=10_000.0, help="records per second in the loop")
    parser.add_argument("--seconds", type=float, default=2.0, help="length of each loop measurement")
    parser.add_argument("--compare", type=Path, help="another version of the audit log to measure too")
    args = parser.parse_args(argv)

    versions: dict[str, ModuleType] = {"current": proxy.auditwriter}
    if args.compare is not None:
        versions[str(args.compare)] = load_version(args.compare)
    figures = ("record", "render", "kept", "kept-io")
    results = {name: {figure: [] for figure in figures} for name in versions}
    with tempfile.TemporaryDirectory(prefix="audit-cost-") as tmp:
        directory = Path(tmp)
        for round_number in range(1, args.rounds + 1):
            # Each round starts with the other version, so a trend in the machine's load favours neither.
            order = list(versions.items())
            for name, version in order if round_number % 2 else reversed(order):
                got = results[name]
                record_us, render_us = measure_record_and_render(version, directory, args.records)
                got["record"].append(record_us)
                got["render"].append(render_us)
                for figure, io in (("kept", False), ("kept-io", True)):
                    got[figure].append(measure_contention(version, directory, args.seconds, args.rate, io=io))
                print(
                    f"round {round_number} {name}: record {record_us:.2f} us, render {render_us:.2f} us, "
                    f"kept {got['kept'][-1]:.3f}, kept-io {got['kept-io'][-1]:.3f}",
                    file=sys.stderr,
                )
        key = (directory / "audit.key").read_bytes()
        logs = sorted(directory.glob("audit-*.log"))
        bad = [path for path in logs if not proxy.audit.verify([path], key).ok]
        if bad:
            print(f"audit verify FAILED for {bad}", file=sys.stderr)
            return 1
    print(f"medians of {args.rounds} rounds, {args.rate:.0f} records/s in the loops; every log verifies")
    print(f"{'version':40s} {'record us':>10s} {'render us':>10s} {'kept':>7s} {'kept-io':>8s}")
    for name, got in results.items():
        record_us, render_us, kept, kept_io = (statistics.median(got[figure]) for figure in figures)
        print(f"{name:40s} {record_us:10.2f} {render_us:10.2f} {kept:7.3f} {kept_io:8.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
