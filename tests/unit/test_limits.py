"""proxy.limits: buckets, policy resolution, connection, statement and result limits, pruning (fake clock)."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from proxy.limits import (
    IDLE_STATE_SECONDS,
    LEASE_REFILL_RETRY_AFTER,
    LEASE_RETURN_AFTER,
    PRUNE_EVERY_OPERATIONS,
    UNAVAILABLE_RETRY_AFTER,
    LeaseBook,
    Limiter,
    LimitHit,
    LimitSettings,
    Rate,
    SharedLimitFallback,
    SourceRateLimiter,
    TokenBucket,
    TokenLease,
    resolve,
)

STORE = "store-001"
TILL = "till-01"


class FakeClock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


# --- Rate and TokenBucket ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("per_second", "burst"), [(0.0, 1), (-1.0, 1), (math.inf, 1), (math.nan, 1), (1.0, 0)]
)
def test_rate_rejects_nonsense(per_second: float, burst: int) -> None:
    with pytest.raises(ValueError):
        Rate(per_second, burst)


def test_bucket_starts_full_and_allows_a_burst() -> None:
    bucket = TokenBucket(Rate(per_second=5, burst=10), now=0.0)
    assert [bucket.take(0.0) for _ in range(10)] == [0.0] * 10
    assert bucket.take(0.0) == pytest.approx(0.2)


def test_bucket_refills_at_the_rate_and_no_further_than_burst() -> None:
    bucket = TokenBucket(Rate(per_second=2, burst=3), now=0.0)
    for _ in range(3):
        bucket.take(0.0)
    # Half a second buys one token; a quarter more is half of the next.
    assert bucket.take(0.5) == 0.0
    assert bucket.take(0.75) == pytest.approx(0.25)
    # A long pause fills the bucket to burst, not beyond.
    assert [bucket.take(100.0) for _ in range(4)][-1] == pytest.approx(0.5)


def test_refused_take_takes_nothing_and_waiting_the_retry_after_is_enough() -> None:
    bucket = TokenBucket(Rate(per_second=3, burst=1), now=1000.1)
    assert bucket.take(1000.1) == 0.0
    retry_after = bucket.take(1000.2)
    assert retry_after == pytest.approx(1 / 3 - 0.1)
    assert bucket.take(1000.2) == pytest.approx(retry_after)
    assert bucket.take(1000.2 + retry_after) == 0.0


def test_fractional_amounts_and_amounts_beyond_burst() -> None:
    bucket = TokenBucket(Rate(per_second=1, burst=2), now=0.0)
    assert bucket.take(0.0, 1.5) == 0.0
    assert bucket.take(0.0, 1.0) == pytest.approx(0.5)
    assert bucket.take(0.0, 3.0) == math.inf


def test_clock_stepping_back_does_not_drain_or_fill() -> None:
    bucket = TokenBucket(Rate(per_second=1, burst=1), now=10.0)
    assert bucket.take(10.0) == 0.0
    assert bucket.take(5.0) == pytest.approx(1.0)


@given(
    per_second=st.floats(min_value=0.01, max_value=1000),
    burst=st.integers(min_value=1, max_value=50),
    # Zero gaps often: bursts at one instant are where a bucket would overspend.
    gaps=st.lists(st.just(0.0) | st.floats(min_value=0, max_value=5), min_size=1, max_size=300),
)
def test_allowed_takes_in_any_interval_never_exceed_burst_plus_rate_times_its_length(
    per_second: float, burst: int, gaps: list[float]
) -> None:
    now = 1000.0
    bucket = TokenBucket(Rate(per_second, burst), now)
    # For takes i..j (at t_i..t_j): allowed(i..j) <= burst + rate * (t_j - t_i), i.e. with A the running
    # count of allowed takes, A_j - rate*t_j <= burst + min over i <= j of (A_(i-1) - rate*t_i).
    allowed = 0
    lowest_start = math.inf
    for gap in gaps:
        now += gap
        lowest_start = min(lowest_start, allowed - per_second * now)
        allowed += bucket.take(now) == 0.0
        assert allowed - per_second * now <= burst + lowest_start + 1e-6


@given(
    per_second=st.floats(min_value=0.01, max_value=1000),
    burst=st.integers(min_value=1, max_value=50),
    amounts=st.lists(st.floats(min_value=0.01, max_value=1), min_size=1, max_size=100),
)
def test_waiting_the_announced_retry_after_always_succeeds(
    per_second: float, burst: int, amounts: list[float]
) -> None:
    now = 1000.0
    bucket = TokenBucket(Rate(per_second, burst), now)
    for amount in amounts:
        retry_after = bucket.take(now, amount)
        if retry_after:
            now += retry_after
            assert bucket.take(now, amount) == 0.0


# --- resolve ------------------------------------------------------------------------------------


def test_negative_limits_are_rejected() -> None:
    with pytest.raises(ValueError, match="connections_per_store"):
        LimitSettings(connections_per_store=-1)


def test_resolve_takes_role_defaults_without_overrides() -> None:
    role = LimitSettings(statements=Rate(5, 10), connections_per_terminal=2)
    assert resolve(role, None, None) == LimitSettings(statements=Rate(5, 10), connections_per_terminal=2)


def test_resolve_terminal_beats_store_beats_role_field_by_field() -> None:
    role = LimitSettings(
        statements=Rate(5, 10),
        connections_per_terminal=2,
        connections_per_store=20,
        max_rows_per_statement=100,
    )
    store = LimitSettings(statements=Rate(10, 20), connections_per_store=40)
    terminal = LimitSettings(statements=Rate(1, 1), max_bytes_per_minute=1_000_000)
    assert resolve(role, store, terminal) == LimitSettings(
        statements=Rate(1, 1),
        connections_per_terminal=2,
        connections_per_store=40,
        max_rows_per_statement=100,
        max_bytes_per_minute=1_000_000,
    )
    assert resolve(role, None, terminal).connections_per_store == 20
    assert resolve(role, store, None).statements == Rate(10, 20)


# --- connections ----------------------------------------------------------------------------------


def test_connections_per_terminal_counted_refused_and_freed() -> None:
    limiter = Limiter(FakeClock())
    policy = LimitSettings(connections_per_terminal=2)
    assert limiter.open_connection(STORE, TILL, "cashier", policy) is None
    assert limiter.open_connection(STORE, TILL, "cashier", policy) is None
    hit = limiter.open_connection(STORE, TILL, "cashier", policy)
    assert hit is not None
    assert hit.limit == "connections per terminal"
    assert hit.retry_after is None
    assert hit.message == (
        "connection limit for terminal store-001/till-01 reached (2 open); "
        "retry when one of its connections has closed"
    )
    # Other terminals are not affected, and the refusal was not counted.
    assert limiter.open_connection(STORE, "till-02", "cashier", policy) is None
    assert limiter.connections() == {
        "terminal:store-001/till-01": 2,
        "terminal:store-001/till-02": 1,
        "store:store-001": 3,
        "role:cashier": 3,
    }
    limiter.close_connection(STORE, TILL, "cashier")
    assert limiter.open_connection(STORE, TILL, "cashier", policy) is None


def test_connections_per_store_across_terminals() -> None:
    limiter = Limiter(FakeClock())
    policy = LimitSettings(connections_per_store=2)
    assert limiter.open_connection(STORE, "till-01", "cashier", policy) is None
    assert limiter.open_connection(STORE, "till-02", "manager", policy) is None
    hit = limiter.open_connection(STORE, "till-03", "cashier", policy)
    assert hit is not None
    assert hit.limit == "connections per store"
    assert "store store-001" in hit.message
    assert limiter.open_connection("store-002", "till-03", "cashier", policy) is None
    limiter.close_connection(STORE, "till-02", "manager")
    assert limiter.open_connection(STORE, "till-03", "cashier", policy) is None


def test_connections_per_role_across_stores() -> None:
    limiter = Limiter(FakeClock())
    policy = LimitSettings(connections_per_role=1)
    assert limiter.open_connection("store-001", TILL, "cashier", policy) is None
    hit = limiter.open_connection("store-002", TILL, "cashier", policy)
    assert hit is not None
    assert hit.limit == "connections per role"
    assert "role cashier" in hit.message
    assert limiter.open_connection("store-002", TILL, "manager", policy) is None


def test_closing_everything_leaves_no_entries() -> None:
    limiter = Limiter(FakeClock())
    for terminal in ("till-01", "till-02", "till-01"):
        assert limiter.open_connection(STORE, terminal, "cashier", LimitSettings()) is None
    for terminal in ("till-01", "till-02", "till-01"):
        limiter.close_connection(STORE, terminal, "cashier")
    assert limiter.connections() == {}
    # A stray close does not go negative (and does not eat a later connection's count).
    limiter.close_connection(STORE, TILL, "cashier")
    assert limiter.connections() == {}


# --- statements -------------------------------------------------------------------------------------


def test_statement_rate_per_terminal_and_its_message() -> None:
    clock = FakeClock()
    limiter = Limiter(clock)
    policy = LimitSettings(statements=Rate(5, 10))
    assert all(limiter.statement(STORE, TILL, "cashier", policy) is None for _ in range(10))
    hit = limiter.statement(STORE, TILL, "cashier", policy)
    assert hit is not None
    assert hit.limit == "statements per terminal"
    assert hit.retry_after == pytest.approx(0.2)
    assert hit.message == (
        "statement rate limit for terminal store-001/till-01 exceeded (5/s, burst 10); retry in 0.2 s"
    )
    assert limiter.statement(STORE, "till-02", "cashier", policy) is None
    clock.advance(0.2)
    assert limiter.statement(STORE, TILL, "cashier", policy) is None


def test_statement_rate_per_role_is_shared_by_all_its_terminals() -> None:
    limiter = Limiter(FakeClock())
    policy = LimitSettings(role_statements=Rate(1, 3))
    for store, terminal in (("store-001", "till-01"), ("store-002", "till-01"), ("store-003", "till-09")):
        assert limiter.statement(store, terminal, "cashier", policy) is None
    hit = limiter.statement("store-004", "till-01", "cashier", policy)
    assert hit is not None
    assert hit.limit == "statements per role"
    assert hit.message == "statement rate limit for role cashier exceeded (1/s, burst 3); retry in 1.0 s"
    assert limiter.statement("store-004", "till-01", "manager", policy) is None


def test_statement_rate_per_store_is_shared_by_its_terminals() -> None:
    limiter = Limiter(FakeClock())
    policy = LimitSettings(store_statements=Rate(0.5, 2))
    assert limiter.statement(STORE, "till-01", "cashier", policy) is None
    assert limiter.statement(STORE, "till-02", "manager", policy) is None
    hit = limiter.statement(STORE, "till-03", "cashier", policy)
    assert hit is not None
    assert hit.limit == "statements per store"
    assert hit.retry_after == pytest.approx(2.0)
    assert "store store-001" in hit.message
    assert "retry in 2.0 s" in hit.message
    assert limiter.statement("store-002", "till-03", "cashier", policy) is None


def test_a_refused_statement_spends_no_token_anywhere() -> None:
    clock = FakeClock()
    limiter = Limiter(clock)
    # Each terminal may send two statements in the test's time; the store refills once a second.
    policy = LimitSettings(statements=Rate(0.001, 2), store_statements=Rate(1, 1))
    assert limiter.statement(STORE, "till-01", "cashier", policy) is None
    # till-02's own bucket has tokens but the store's is empty: nothing is taken from till-02.
    assert limiter.statement(STORE, "till-02", "cashier", policy) is not None
    assert limiter.statement(STORE, "till-02", "cashier", policy) is not None
    clock.advance(1.0)
    assert limiter.statement(STORE, "till-02", "cashier", policy) is None
    clock.advance(1.0)
    assert limiter.statement(STORE, "till-02", "cashier", policy) is None


def test_the_longest_wait_is_reported() -> None:
    limiter = Limiter(FakeClock())
    policy = LimitSettings(statements=Rate(10, 1), role_statements=Rate(0.25, 1))
    assert limiter.statement(STORE, TILL, "cashier", policy) is None
    hit = limiter.statement(STORE, TILL, "cashier", policy)
    assert hit is not None
    assert hit.limit == "statements per role"
    assert hit.retry_after == pytest.approx(4.0)


def test_no_rates_means_no_limit_and_no_state() -> None:
    limiter = Limiter(FakeClock())
    assert all(limiter.statement(STORE, TILL, "cashier", LimitSettings()) is None for _ in range(1000))
    assert limiter.state_size() == 0


def test_a_changed_rate_gets_a_fresh_bucket() -> None:
    limiter = Limiter(FakeClock())
    assert limiter.statement(STORE, TILL, "cashier", LimitSettings(statements=Rate(1, 1))) is None
    assert limiter.statement(STORE, TILL, "cashier", LimitSettings(statements=Rate(1, 1))) is not None
    assert limiter.statement(STORE, TILL, "cashier", LimitSettings(statements=Rate(2, 1))) is None


# --- results ----------------------------------------------------------------------------------------


def test_rows_per_statement() -> None:
    limiter = Limiter(FakeClock())
    guard = limiter.result_guard(STORE, TILL, LimitSettings(max_rows_per_statement=100))
    assert guard.add(60, 6000) is None
    assert guard.add(40, 4000) is None
    hit = guard.add(1, 100)
    assert hit is not None
    assert hit.limit == "rows per statement"
    assert hit.retry_after is None
    assert hit.message == (
        "result exceeds the limit for terminal store-001/till-01 (100 rows per statement); "
        "retrying will not help: fetch less per statement"
    )
    # The hit sticks, and the refused batch was not counted.
    assert guard.add(0, 0) is hit
    assert (guard.rows, guard.nbytes) == (100, 10_000)
    # The next statement starts from zero.
    assert limiter.result_guard(STORE, TILL, LimitSettings(max_rows_per_statement=100)).add(100, 0) is None


def test_bytes_per_statement() -> None:
    limiter = Limiter(FakeClock())
    guard = limiter.result_guard(STORE, TILL, LimitSettings(max_bytes_per_statement=1024))
    assert guard.add(1000, 1024) is None
    hit = guard.add(1, 1)
    assert hit is not None
    assert hit.limit == "bytes per statement"
    assert "(1024 bytes per statement)" in hit.message


def test_rows_per_minute_across_statements_with_a_sliding_window() -> None:
    clock = FakeClock(1000.0)
    limiter = Limiter(clock)
    policy = LimitSettings(max_rows_per_minute=100)
    assert limiter.result_guard(STORE, TILL, policy).add(80, 0) is None
    clock.advance(10)
    second = limiter.result_guard(STORE, TILL, policy)
    assert second.add(20, 0) is None
    hit = second.add(1, 0)
    assert hit is not None
    assert hit.limit == "rows per minute"
    # The 80 rows of second 1000 leave the window at 1061: 51 s from now.
    assert hit.retry_after == pytest.approx(51.0)
    assert hit.message == (
        "row rate limit for terminal store-001/till-01 exceeded (100 rows per minute); retry in 51.0 s"
    )
    # Other terminals have their own window.
    assert limiter.result_guard(STORE, "till-02", policy).add(100, 0) is None
    clock.now = 1060.9
    assert limiter.result_guard(STORE, TILL, policy).add(1, 0) is not None
    clock.now = 1061.0
    # The 80 rows have slid out; the 20 rows of second 1010 have not.
    assert limiter.result_guard(STORE, TILL, policy).add(80, 0) is None
    assert limiter.result_guard(STORE, TILL, policy).add(1, 0) is not None


def test_retry_after_waits_only_for_as_much_as_is_needed() -> None:
    clock = FakeClock(1000.0)
    limiter = Limiter(clock)
    policy = LimitSettings(max_bytes_per_minute=1000)
    for _ in range(4):
        assert limiter.result_guard(STORE, TILL, policy).add(1, 250) is None
        clock.advance(10)
    # 1000 bytes recorded at 1000, 1010, 1020, 1030; now 1040. 300 more need two slots gone: 1011 + 60.
    hit = limiter.result_guard(STORE, TILL, policy).add(1, 300)
    assert hit is not None
    assert hit.limit == "bytes per minute"
    assert hit.retry_after == pytest.approx(31.0)
    assert "(1000 bytes per minute); retry in 31.0 s" in hit.message


def test_a_batch_bigger_than_the_minute_limit_is_not_retryable() -> None:
    limiter = Limiter(FakeClock())
    hit = limiter.result_guard(STORE, TILL, LimitSettings(max_bytes_per_minute=100)).add(1, 101)
    assert hit is not None
    assert hit.retry_after is None
    assert "by a single batch; retrying will not help" in hit.message


def test_refused_minute_batches_are_not_counted() -> None:
    limiter = Limiter(FakeClock())
    policy = LimitSettings(max_rows_per_minute=10, max_bytes_per_minute=100)
    # Within the row limit, over the byte limit: neither is recorded.
    assert limiter.result_guard(STORE, TILL, policy).add(5, 101) is not None
    assert limiter.result_guard(STORE, TILL, policy).add(10, 100) is None


def test_statement_limits_are_checked_before_minute_limits() -> None:
    limiter = Limiter(FakeClock())
    policy = LimitSettings(max_rows_per_statement=5, max_rows_per_minute=5)
    hit = limiter.result_guard(STORE, TILL, policy).add(6, 0)
    assert hit is not None
    assert hit.limit == "rows per statement"


# --- pruning ----------------------------------------------------------------------------------------


def test_pruning_drops_idle_full_buckets_of_ten_thousand_terminals() -> None:
    clock = FakeClock()
    limiter = Limiter(clock)
    policy = LimitSettings(statements=Rate(5, 10), store_statements=Rate(100, 100), max_rows_per_minute=1000)
    for number in range(10_000):
        terminal = f"till-{number:05}"
        assert limiter.statement(STORE, terminal, "cashier", policy) is None
        assert limiter.result_guard(STORE, terminal, policy).add(1, 0) is None
        clock.advance(0.01)
    assert limiter.state_size() > 10_000
    clock.advance(IDLE_STATE_SECONDS + 1)
    for _ in range(PRUNE_EVERY_OPERATIONS):
        limiter.statement(STORE, TILL, "cashier", LimitSettings(statements=Rate(1000, 1000)))
    # Only the bucket in use is left.
    assert limiter.state_size() == 1


def test_pruning_keeps_buckets_that_are_still_refilling() -> None:
    clock = FakeClock()
    limiter = Limiter(clock)
    slow = LimitSettings(statements=Rate(0.001, 1))
    assert limiter.statement(STORE, TILL, "cashier", slow) is None
    clock.advance(IDLE_STATE_SECONDS + 1)
    for _ in range(PRUNE_EVERY_OPERATIONS):
        limiter.result_guard(STORE, TILL, LimitSettings())
    # Dropping it would hand out a token early.
    assert limiter.state_size() == 1
    assert limiter.statement(STORE, TILL, "cashier", slow) is not None


def test_pruning_keeps_recently_used_buckets() -> None:
    clock = FakeClock()
    limiter = Limiter(clock)
    policy = LimitSettings(statements=Rate(1, 1))
    assert limiter.statement(STORE, TILL, "cashier", policy) is None
    for _ in range(PRUNE_EVERY_OPERATIONS):
        limiter.result_guard(STORE, TILL, LimitSettings())
    assert limiter.statement(STORE, TILL, "cashier", policy) is not None


# --- source addresses ---------------------------------------------------------------------------


def test_source_rate_limit_per_address() -> None:
    clock = FakeClock()
    limiter = SourceRateLimiter(Rate(2, 3), clock)
    assert [limiter.allow("10.0.0.1") for _ in range(3)] == [0.0] * 3
    assert limiter.allow("10.0.0.1") == pytest.approx(0.5)
    assert limiter.allow("10.0.0.2") == 0.0
    clock.advance(0.5)
    assert limiter.allow("10.0.0.1") == 0.0


def test_source_rate_limit_off() -> None:
    limiter = SourceRateLimiter(None, FakeClock())
    assert all(limiter.allow("10.0.0.1") == 0.0 for _ in range(10_000))
    assert limiter.state_size() == 0


def test_source_addresses_are_pruned() -> None:
    clock = FakeClock()
    limiter = SourceRateLimiter(Rate(10, 10), clock)
    for number in range(5000):
        limiter.allow(f"10.0.{number // 256}.{number % 256}")
    clock.advance(IDLE_STATE_SECONDS + 1)
    for _ in range(PRUNE_EVERY_OPERATIONS):
        limiter.allow("192.0.2.1")
    assert limiter.state_size() == 1


def test_source_addresses_are_capped_forgetting_the_least_recently_seen() -> None:
    limiter = SourceRateLimiter(Rate(1, 1), FakeClock(), max_addresses=3)
    for address in ("a", "b", "c"):
        assert limiter.allow(address) == 0.0
    assert limiter.allow("a") > 0.0  # "a" is now the most recently seen
    assert limiter.allow("d") == 0.0  # forgets "b"
    assert limiter.state_size() == 3
    assert limiter.allow("a") > 0.0
    assert limiter.allow("c") > 0.0
    assert limiter.allow("b") == 0.0


# --- shared limits: token leases (pure logic; tests/integration/test_shared_limits.py uses Redis) ----------


def test_an_empty_lease_lends_on_credit_until_the_shared_bucket_says_it_is_empty() -> None:
    lease = TokenLease(Rate(10, 100), size=4, now=0.0)
    # Nothing leased yet: up to `size` statements pass on credit while the first refill is on its way.
    assert lease.refill_wanted(0.0) == 4
    assert [lease.take(0.0) for _ in range(4)] == [0.0] * 4
    assert lease.take(0.0) == LEASE_REFILL_RETRY_AFTER
    # A refill in flight is not asked for twice.
    assert lease.refill_wanted(0.0) == 0
    lease.refilled(4, 4, 0.0, now=0.05)
    # The grant repaid the credit: still empty, and the next refill asks for the debt and a full lease.
    assert lease.tokens == 0
    assert lease.refill_wanted(0.05) == 4
    lease.refilled(4, 4, 0.0, now=0.06)
    assert [lease.take(0.06) for _ in range(4)] == [0.0] * 4


def test_a_short_refill_means_the_shared_bucket_is_empty_until_its_retry_after() -> None:
    lease = TokenLease(Rate(2, 10), size=4, now=0.0)
    assert lease.refill_wanted(0.0) == 4
    lease.refilled(1, 4, retry_after=0.5, now=0.0)
    assert lease.take(0.0) == 0.0
    # No credit now that the shared bucket is known to be empty, and no refill before it has a token.
    assert lease.take(0.1) == pytest.approx(0.4)
    assert lease.refill_wanted(0.1) == 0
    assert lease.tokens == 0
    assert lease.refill_wanted(0.5) == 4
    assert lease.take(0.5) == 0.0


def test_refills_are_asked_for_when_the_lease_runs_low() -> None:
    lease = TokenLease(Rate(100, 100), size=10, now=0.0)
    lease.refill_wanted(0.0)
    lease.refilled(10, 10, 0.0, now=0.0)
    for _ in range(4):
        lease.take(0.0)
    assert lease.refill_wanted(0.0) == 0
    lease.take(0.0)
    # Down to half: top it up to full, ahead of need.
    assert lease.refill_wanted(0.0) == 5


def test_unused_leased_tokens_go_back_after_a_while() -> None:
    lease = TokenLease(Rate(100, 100), size=10, now=0.0)
    lease.refill_wanted(0.0)
    lease.refilled(10, 10, 0.0, now=0.0)
    lease.take(0.0)
    assert lease.surplus(LEASE_RETURN_AFTER / 2) == 0
    assert lease.surplus(LEASE_RETURN_AFTER) == 9
    assert lease.tokens == 0
    assert lease.surplus(10 * LEASE_RETURN_AFTER) == 0
    assert not lease.idle(IDLE_STATE_SECONDS)
    assert lease.idle(IDLE_STATE_SECONDS + 1)


@given(
    st.lists(
        st.one_of(
            st.tuples(st.just("take"), st.floats(0, 5)),
            st.tuples(st.just("refill"), st.floats(0, 1)),
        ),
        max_size=200,
    ),
    st.integers(1, 20),
)
def test_a_lease_never_spends_more_than_it_was_granted_plus_its_size(
    operations: list[tuple[str, float]], size: int
) -> None:
    lease = TokenLease(Rate(1, 1000), size=size, now=0.0)
    now, spent, granted_total = 0.0, 0, 0
    pending = 0
    for operation, value in operations:
        if operation == "take":
            now += value / 10
            spent += lease.take(now) == 0.0
            wanted = lease.refill_wanted(now)
            pending = wanted or pending
        elif pending:
            # The shared bucket grants some share of what was asked for.
            granted = int(pending * value)
            lease.refilled(granted, pending, 0.5, now)
            granted_total += granted
            pending = 0
        assert spent <= granted_total + size
        assert lease.tokens >= -size


def test_lease_book_caps_leases_at_the_burst_and_queues_each_refill_once() -> None:
    woken: list[bool] = []
    book = LeaseBook(50, SharedLimitFallback.FAIL_OPEN, wake=lambda: woken.append(True))
    key = ("store", STORE, Rate(1, 8))
    lease = book.lease(key, 0.0)
    assert lease.size == 8
    book.replenish(key, lease, 0.0)
    book.replenish(key, lease, 0.0)
    assert book.refills() == [(key, lease, 8)]
    assert book.refills() == []
    assert woken == [True]
    # An outage drops the leases: afterwards they start afresh.
    assert book.set_available(False)
    assert not book.set_available(False)
    assert book.set_available(True)
    assert book.lease(key, 0.0) is not lease


class InMemorySharedStore:
    """The SharedLimitStore protocol over one process's memory: the Limiter's side of it, without Redis."""

    def __init__(self, fallback: SharedLimitFallback = SharedLimitFallback.FAIL_OPEN) -> None:
        self.leases = LeaseBook(4, fallback)
        self.published: dict[tuple[str, str], int] = {}
        self.claims: list[tuple[str, str, int]] = []

    def connections_changed(self, scope: str, name: str, count: int) -> None:
        self.published[(scope, name)] = count

    async def claim_connections(self, claims: list[tuple[str, str, int]]) -> LimitHit | None:
        self.claims += claims
        for scope, name, limit in claims:
            if self.published[(scope, name)] > limit:
                return LimitHit(f"connections per {scope}", None, "full")
        return None


def test_shared_store_and_role_statements_spend_leases_and_terminal_ones_stay_local() -> None:
    clock = FakeClock()
    shared = InMemorySharedStore()
    limiter = Limiter(clock, shared=shared)
    policy = LimitSettings(statements=Rate(1, 2), store_statements=Rate(100, 100))
    assert limiter.statement(STORE, TILL, "cashier", policy) is None
    assert limiter.statement(STORE, TILL, "cashier", policy) is None
    # The terminal's own bucket (local) is empty; the store's lease was not touched by the refusal.
    hit = limiter.statement(STORE, TILL, "cashier", policy)
    assert hit is not None and hit.limit == "statements per terminal"
    ((key, lease, wanted),) = shared.leases.refills()
    assert key == ("store", STORE, Rate(100, 100))
    assert (lease.tokens, wanted) == (-2, 4)
    lease.refilled(0, wanted, retry_after=0.25, now=clock.now)
    hit = limiter.statement(STORE, "till-02", "cashier", policy)
    assert hit is not None and hit.limit == "statements per store"
    assert hit.retry_after == pytest.approx(0.25)


def test_shared_statements_fall_back_to_local_buckets_when_failing_open() -> None:
    shared = InMemorySharedStore(SharedLimitFallback.FAIL_OPEN)
    limiter = Limiter(FakeClock(), shared=shared)
    shared.leases.set_available(False)
    policy = LimitSettings(role_statements=Rate(0.001, 2))
    assert limiter.statement(STORE, TILL, "cashier", policy) is None
    assert limiter.statement(STORE, TILL, "cashier", policy) is None
    hit = limiter.statement(STORE, TILL, "cashier", policy)
    assert hit is not None and hit.limit == "statements per role"
    assert shared.leases.refills() == []


def test_shared_statements_are_refused_when_failing_closed() -> None:
    shared = InMemorySharedStore(SharedLimitFallback.FAIL_CLOSED)
    limiter = Limiter(FakeClock(), shared=shared)
    shared.leases.set_available(False)
    hit = limiter.statement(STORE, TILL, "cashier", LimitSettings(store_statements=Rate(100, 100)))
    assert hit is not None
    assert hit.limit == "statements per store (shared store unavailable)"
    assert hit.retry_after == UNAVAILABLE_RETRY_AFTER
    assert hit.message == (
        "the shared limit store is unavailable, so the statements per store limit cannot be checked; "
        "retry in 1.0 s"
    )
    # Limits that are not shared still work as usual.
    assert limiter.statement(STORE, TILL, "cashier", LimitSettings(statements=Rate(1, 1))) is None


async def test_connections_are_published_per_store_and_role_and_claimed_where_limited() -> None:
    shared = InMemorySharedStore()
    limiter = Limiter(FakeClock(), shared=shared)
    policy = LimitSettings(connections_per_store=1, connections_per_role=5)
    assert limiter.shared_admission(STORE, "cashier", LimitSettings(connections_per_terminal=1)) is None
    assert Limiter(FakeClock()).shared_admission(STORE, "cashier", policy) is None
    assert limiter.open_connection(STORE, TILL, "cashier", LimitSettings()) is None
    assert shared.published == {("store", STORE): 1, ("role", "cashier"): 1}
    admission = limiter.shared_admission(STORE, "cashier", policy)
    assert admission is not None and await admission is None
    assert limiter.open_connection(STORE, "till-02", "cashier", LimitSettings()) is None
    admission = limiter.shared_admission(STORE, "cashier", policy)
    assert admission is not None
    hit = await admission
    assert hit is not None and hit.limit == "connections per store"
    assert shared.claims == [("store", STORE, 1), ("role", "cashier", 5)] * 2
    limiter.close_connection(STORE, "till-02", "cashier")
    limiter.close_connection(STORE, TILL, "cashier")
    assert shared.published == {("store", STORE): 0, ("role", "cashier"): 0}
