"""A terminal's share of a pool (ServerShares) and the statement_timeout ceiling."""

from __future__ import annotations

import pytest

from proxy.protocols.postgres.timeouts import (
    UNBOUNDED,
    StatementTimeoutChanges,
    capped_statement_timeout,
    milliseconds,
)
from proxy.shares import ServerShares, default_share_cap


class _Waiter:
    def __init__(self) -> None:
        self.granted = 0

    def share_granted(self) -> None:
        self.granted += 1


def test_a_terminal_at_its_cap_waits_and_a_share_given_back_goes_to_its_first_waiter() -> None:
    shares = ServerShares()
    till, other = shares.account("s/till-01"), shares.account("s/till-02")
    assert shares.account("s/till-01") is till  # all sessions of a terminal count on one account
    waiters = [_Waiter() for _ in range(4)]
    assert till.take(2, waiters[0]) and till.take(2, waiters[1])
    assert not till.take(2, waiters[2])
    assert not till.take(2, waiters[3])
    assert other.take(2, _Waiter())  # another terminal is not held up
    assert (shares.held("s/till-01"), shares.waiting("s/till-01")) == (2, 2)
    till.give_back()
    assert (waiters[2].granted, waiters[3].granted) == (1, 0)  # first come, first served
    assert (shares.held("s/till-01"), shares.waiting("s/till-01")) == (2, 1)
    till.withdraw(waiters[3])  # its client went away
    till.give_back()
    till.give_back()
    assert waiters[3].granted == 0
    assert (shares.held("s/till-01"), shares.waiting("s/till-01")) == (0, 0)
    del till  # its last session is gone: the pool keeps nothing of the terminal
    assert list(shares._accounts) == ["s/till-02"] and shares.held("s/till-02") == 1


def test_while_others_wait_a_newcomer_joins_the_line_instead_of_jumping_it() -> None:
    account = ServerShares().account("t")
    assert account.take(1, _Waiter())
    waiting, newcomer = _Waiter(), _Waiter()
    assert not account.take(1, waiting)
    assert not account.take(2, newcomer)  # even under a larger cap after a reload
    account.give_back()
    assert (waiting.granted, newcomer.granted) == (1, 0)


@pytest.mark.parametrize(("size", "cap"), [(1, 1), (2, 1), (3, 1), (5, 2), (20, 10)])
def test_by_default_a_terminal_never_holds_the_whole_pool(size: int, cap: int) -> None:
    assert default_share_cap(size) == cap
    assert size == 1 or default_share_cap(size) < size


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("1000", 1000),
        ("5s", 5000),
        (" 1.5 s ", 1500),
        ("2min", 120_000),
        ("400us", 0),
        ("0", 0),
        ("1h", 3_600_000),
    ],
)
def test_milliseconds_reads_time_settings_as_the_server_does(value: str, expected: int) -> None:
    assert milliseconds(value) == expected


@pytest.mark.parametrize("value", ["0x10", "1e3", "5 S", "-1", "inf", "", "5 weeks"])
def test_milliseconds_does_not_guess(value: str) -> None:
    assert milliseconds(value) is None


@pytest.mark.parametrize(
    ("asked", "expected"),
    [
        (None, "700"),
        ("0", "700"),
        ("400us", "700"),
        ("1h", "700"),
        ("0x1", "700"),
        ("200ms", "200ms"),
        ("700", "700"),
    ],
)
def test_a_client_may_lower_the_roles_statement_timeout_never_raise_or_disable_it(
    asked: str | None, expected: str
) -> None:
    assert capped_statement_timeout(asked, 0.7) == expected


@pytest.mark.parametrize(
    ("sql", "longest"),
    [
        ("SELECT 1", None),
        ("SET lock_timeout = 0", None),
        ("SET LOCAL statement_timeout TO '5s'", 5000),
        ("SET statement_timeout = 1.5", 2),
        ('SET "STATEMENT_TIMEOUT" = 100', 100),
        ('SET U&"statement\\005ftimeout" = 0', UNBOUNDED),
        ("SET statement_timeout = -1", UNBOUNDED),
        ("SET statement_timeout TO DEFAULT", UNBOUNDED),
        ("RESET statement_timeout", UNBOUNDED),
        ("RESET ALL", UNBOUNDED),
        ("DISCARD ALL", UNBOUNDED),
        ("SELECT set_config('statement_timeout', '0'::text, true)", UNBOUNDED),
        ("SELECT set_config(E'statement\\137timeout', '100', true)", 100),
        ("SELECT set_config(lower('STATEMENT_TIMEOUT'), '100', true)", 100),  # whatever it names
        ("SELECT set_config('statement_timeout', current_setting('x.y'), true)", UNBOUNDED),
        ("SELECT set_config('application_name', 'x', false)", None),
        ("SET statement_timeout = '100'; SET LOCAL statement_timeout = '1min'", 60_000),
        ("ALTER ROLE x SET statement_timeout = 0", None),
    ],
)
def test_what_a_statement_does_to_statement_timeout_is_read_off_the_parse_tree(
    sql: str, longest: int | None
) -> None:
    assert StatementTimeoutChanges().longest(sql.encode(), "UTF8") == longest
