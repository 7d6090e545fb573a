"""No single statement can stall the proxy, and a stream of large ones cannot grow it without bound.

A terminal with a valid cashier certificate sends statements built to be slow for the proxy's
parser (a huge IN list, deeply nested subqueries, a left-deep chain of additions that overflows
the C stack while pglast builds its tree) or too long to parse at all, while another terminal
measures how long its ``SELECT 1`` takes through the same proxy.
"""

from __future__ import annotations

import statistics
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psycopg
import pytest

from tests.integration.proxyproc import ProxyProcess, TerminalPKI

StartProxy = Callable[..., ProxyProcess]

LIMIT = 64 * 1024  # the default policy.max_statement_bytes
CASHIER_POLICY = """\
mode: enforce
allow:
  kinds: [SELECT]
"""


@pytest.fixture
def policy_proxy(start_proxy: StartProxy, tmp_path: Path) -> Callable[..., ProxyProcess]:
    def start(**policy: Any) -> ProxyProcess:
        path = tmp_path / "cashier.yaml"
        path.write_text(CASHIER_POLICY)
        return start_proxy(
            roles={"cashier": {"policy": str(path)}},
            listen={"max_message_size": "4MiB"},
            policy=policy,
        )

    return start


@contextmanager
def connect(proxy: ProxyProcess, pki: TerminalPKI) -> Iterator[psycopg.Connection[Any]]:
    with psycopg.connect(**proxy.conninfo(pki.cashier, pki.ca), autocommit=True) as conn:
        yield conn


def sqlstate_of(conn: psycopg.Connection[Any], sql: str, *, simple: bool = False) -> str | None:
    """Run ``sql`` (extended protocol, or a simple Query); the SQLSTATE it failed with, or None."""
    if simple:
        result = conn.pgconn.exec_(sql.encode())
        state = result.error_field(psycopg.pq.DiagnosticField.SQLSTATE)
        return state.decode() if state else None
    try:
        conn.execute(sql).fetchall()
    except psycopg.Error as exc:
        return exc.sqlstate
    return None


def in_list(number: int, size: int) -> str:
    """An allowed SELECT of ``size`` bytes with a long IN list: slow to analyse (pglast builds and
    walks a node per item), measured on a loaded 2-core machine ~0.2 s at 10 KB, ~1 s at 64 KB."""
    head = f"SELECT {number} WHERE {number} NOT IN ("
    items = ",".join(["7"] * ((size - len(head) - 1) // 2))
    return (head + items + ")").ljust(size)


def long_literal(number: int, size: int) -> str:
    """An allowed SELECT of ``size`` bytes that is quick to analyse: one long string constant."""
    head = f"SELECT {number} WHERE '"
    return head + "x" * (size - len(head) - 7) + "' <> ''"


def subquery_chains(number: int, size: int) -> str:
    """A sum of subqueries nested 400 deep (well within the parser's stack limit): the slowest shape
    measured to analyse, ~1.4 s at 57 KB on a 2-core machine (an IN list of that size: ~0.5-1 s)."""
    chain = "(SELECT " * 400 + "1" + ")" * 400
    return (f"SELECT {number} + " + " + ".join([chain] * ((size - 20) // (len(chain) + 3)))).ljust(size)


def additions(number: int, size: int) -> str:
    """SELECT n+1+1+...: a left-deep tree that overflows the C stack while pglast builds it."""
    return (f"SELECT {number}" + "+1" * ((size - 20) // 2)).ljust(size)


def select_one_latencies(conn: psycopg.Connection[Any], until: threading.Event) -> list[float]:
    latencies = []
    while not until.is_set() or len(latencies) < 20:
        started = time.perf_counter()
        assert conn.execute("SELECT 1").fetchone() == (1,)
        latencies.append(time.perf_counter() - started)
        time.sleep(0.02)
    return latencies


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(share * len(ordered)))]


def test_large_statements_do_not_stall_other_terminals(
    policy_proxy: Callable[..., ProxyProcess], terminal_pki: TerminalPKI, capsys: pytest.CaptureFixture[str]
) -> None:
    # A budget far from what the statements take, loaded machine or not: the 2 KB IN list and the
    # string constant take a few tens of ms, the subquery chains over a second.
    proxy = policy_proxy(analysis_timeout="400ms")
    attacks = [
        ("1.5 MB, over the size bound", in_list(1, 1_500_000), "54000"),
        ("2 KB IN list, analysed in a worker", in_list(2, 2_000), None),
        ("60 KB subquery chains, analysis over time", subquery_chains(3, 60_000), "54001"),
        ("60 KB additions, worker crashes", additions(4, 60_000), "54001"),
        ("63 KB string constant, analysed in a worker", long_literal(5, 63_000), None),
    ]
    outcomes: dict[str, list[str | None]] = {}
    done = threading.Event()
    failures: list[BaseException] = []

    def attack() -> None:
        try:
            with connect(proxy, terminal_pki) as conn:
                for round_number in range(2):
                    for label, sql, _expected in attacks:
                        # A different text each round: nothing is answered from a cache.
                        text = sql.replace("SELECT ", f"SELECT {round_number} * 0 + ", 1)
                        state = sqlstate_of(conn, text, simple=bool(round_number))
                        outcomes.setdefault(label, []).append(state)
        except BaseException as exc:
            failures.append(exc)
        finally:
            done.set()

    with connect(proxy, terminal_pki) as victim:
        no_attack = threading.Event()
        no_attack.set()
        baseline = select_one_latencies(victim, no_attack)
        attacker = threading.Thread(target=attack)
        attacker.start()
        latencies = select_one_latencies(victim, done)
        attacker.join()
    assert not failures, failures
    for label, _sql, expected in attacks:
        assert outcomes[label] == [expected, expected], (label, outcomes[label])
    median, p90, worst = statistics.median(latencies), percentile(latencies, 0.9), max(latencies)
    with capsys.disabled():
        print(
            f"\nSELECT 1 during the attack: n={len(latencies)} median={median * 1000:.1f} ms "
            f"p90={p90 * 1000:.1f} ms max={worst * 1000:.1f} ms "
            f"(before it: median={statistics.median(baseline) * 1000:.1f} ms "
            f"max={max(baseline) * 1000:.1f} ms)"
        )
    # The 90th percentile, not the maximum: this 2-core machine is shared with other test runs.
    assert p90 < 0.1, latencies
    assert median < 0.05, latencies


def test_statement_over_the_size_bound_is_refused_and_the_session_goes_on(
    policy_proxy: Callable[..., ProxyProcess], terminal_pki: TerminalPKI
) -> None:
    proxy = policy_proxy()
    with connect(proxy, terminal_pki) as conn:
        with pytest.raises(psycopg.errors.ProgramLimitExceeded, match=f"limit .* is {LIMIT} bytes"):
            conn.execute(in_list(1, LIMIT + 1))
        assert conn.execute("SELECT 1").fetchone() == (1,)
        assert sqlstate_of(conn, long_literal(2, LIMIT + 1), simple=True) == "54000"
        assert conn.execute("SELECT 1").fetchone() == (1,)
        # At the bound: analysed (in a worker) and run.
        assert conn.execute(long_literal(5, LIMIT)).fetchone() == (5,)
    proxy.wait_for_event("policy_violation", rule="statement too long")


def test_analysis_that_runs_out_of_time_or_crashes_fails_closed(
    policy_proxy: Callable[..., ProxyProcess], terminal_pki: TerminalPKI
) -> None:
    proxy = policy_proxy(analysis_timeout="300ms")
    with connect(proxy, terminal_pki) as conn:
        with pytest.raises(psycopg.errors.StatementTooComplex, match="could not be analysed in time"):
            conn.execute(subquery_chains(1, 60_000))
        assert conn.execute("SELECT 1").fetchone() == (1,)
        with pytest.raises(psycopg.errors.StatementTooComplex):
            conn.execute(additions(2, 60_000))
        # The worker that died is replaced: the next long statement is analysed and allowed.
        assert conn.execute(long_literal(3, 4000)).fetchone() == (3,)
    proxy.wait_for_event("statement_analysis_failed")
    assert proxy.stop() == 0  # still running until told to stop: the crash was the worker's


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def test_stream_of_distinct_large_statements_keeps_rss_bounded(
    policy_proxy: Callable[..., ProxyProcess], terminal_pki: TerminalPKI, capsys: pytest.CaptureFixture[str]
) -> None:
    cache_bytes = 8 * 2**20
    proxy = policy_proxy(cache_bytes=cache_bytes)
    # Each text differs and keeps its 60 KB through normalisation (a comment is not a constant):
    # an entry-bounded cache would hold every one of them, twice (key and normalised text).
    comment = "/*" + "x" * 60_000 + "*/"
    count = 600
    with connect(proxy, terminal_pki) as conn:
        for number in range(20):  # warm up: workers started, allocator pools filled
            conn.execute(f"SELECT {number} {comment} AS warm{number}").fetchone()
        before = rss_bytes(proxy.pid)
        started = time.monotonic()
        for number in range(count):
            assert conn.execute(f"SELECT {number} {comment} AS c{number}").fetchone() == (number,)
        elapsed = time.monotonic() - started
        after = rss_bytes(proxy.pid)
        assert conn.execute("SELECT 1").fetchone() == (1,)
    growth = after - before
    with capsys.disabled():
        print(
            f"\n{count} distinct {len(comment) // 1000} KB statements in {elapsed:.1f}s: proxy RSS "
            f"{before / 2**20:.1f} MiB -> {after / 2**20:.1f} MiB (growth {growth / 2**20:.1f} MiB; "
            f"{count * len(comment) / 2**20:.0f} MiB of statement text sent)"
        )
    # The decision cache within cache_bytes (classifier keys are digests), plus allocator slack;
    # without the byte bound the cache would hold all 34 MiB.
    assert growth < cache_bytes + 12 * 2**20


def test_a_terminal_cannot_hold_prepared_statements_without_bound(
    start_proxy: StartProxy, terminal_pki: TerminalPKI, tmp_path: Path
) -> None:
    path = tmp_path / "cashier.yaml"
    path.write_text(CASHIER_POLICY)
    pool = {"max_client_prepared_statements": 20, "max_client_prepared_bytes": "64KiB"}
    proxy = start_proxy(roles={"cashier": {"policy": str(path)}}, routes={"pos": {"pool": pool}})
    with connect(proxy, terminal_pki) as conn:
        conn.prepared_max = None  # psycopg itself would deallocate the oldest beyond 100
        for number in range(20):
            assert conn.execute(f"SELECT {number} AS n{number}", prepare=True).fetchone() == (number,)
        with pytest.raises(psycopg.errors.ConfigurationLimitExceeded, match="limit is 20 statements"):
            conn.execute("SELECT 20 AS n20", prepare=True)
        # The session goes on, and the statements it holds still run.
        assert conn.execute("SELECT 1").fetchone() == (1,)
        assert conn.execute("SELECT 7 AS n7", prepare=True).fetchone() == (7,)
    with connect(proxy, terminal_pki) as conn:
        conn.prepared_max = None
        padding = "/*" + "x" * 10_000 + "*/"
        for number in range(6):  # 6 of ~10 KB: within 64 KiB
            conn.execute(f"SELECT {number} {padding}", prepare=True)
        with pytest.raises(psycopg.errors.ConfigurationLimitExceeded, match="65536 bytes"):
            for number in range(6, 12):
                conn.execute(f"SELECT {number} {padding}", prepare=True)
        assert conn.execute("SELECT 1").fetchone() == (1,)


def test_long_statements_of_a_role_without_policy_are_classified_off_the_loop(
    start_proxy: StartProxy, terminal_pki: TerminalPKI
) -> None:
    """Without a policy only the session-state classifier parses: the same worker analysis, and a
    statement it could not analyse keeps its server connection (fails closed) rather than run
    unclassified on a shared one."""
    proxy = start_proxy(
        routes={"pos": {"pool": {"mode": "transaction"}}}, policy={"analysis_timeout": "300ms"}
    )
    comment = " /*" + "x" * 5000 + "*/"
    manager = {**proxy.conninfo(terminal_pki.manager, terminal_pki.ca)}
    with psycopg.connect(**manager, autocommit=True) as conn:
        conn.execute("SET enable_seqscan = off" + comment)
        assert conn.execute("SHOW enable_seqscan").fetchone() == ("off",)
    pinned = proxy.wait_for_event("session_pinned", terminal=terminal_pki.manager.terminal)
    assert pinned["reason"] == "SET enable_seqscan"
    with psycopg.connect(**manager, autocommit=True) as conn:
        # The comment sends it to the parser; the parse overflows the worker's stack.
        state = sqlstate_of(conn, additions(1, 60_000) + " /* set_config */")
        # The server ran it, on the pinned connection: its own parser refuses such depth.
        assert state == "54001"
        assert conn.execute("SELECT 1").fetchone() == (1,)
    proxy.wait_for_event("session_pinned", reason="statement not analysed")


def test_messages_behind_a_statement_in_analysis_keep_their_order(
    policy_proxy: Callable[..., ProxyProcess], terminal_pki: TerminalPKI
) -> None:
    """A pipeline of long and short statements in one go: the long ones wait for their workers'
    analyses, and nothing behind them overtakes them."""
    proxy = policy_proxy(analysis_timeout="10s")  # about order, not time
    with connect(proxy, terminal_pki) as conn, conn.pipeline():
        cursors = [
            conn.execute(in_list(1, 5_000)),
            conn.execute("SELECT 2"),
            conn.execute(long_literal(3, 20_000)),
            conn.execute("SELECT 4"),
            conn.execute(in_list(5, 3_000)),
            conn.execute("SELECT 6"),
        ]
    assert [cursor.fetchone() for cursor in cursors] == [(1,), (2,), (3,), (4,), (5,), (6,)]
