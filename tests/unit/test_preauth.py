"""The pre-authentication books (caps, oldest dropped first), the record throttle and the count of
wrong cancel keys."""

from __future__ import annotations

from typing import Any

from proxy import preauth
from proxy.preauth import PendingStartups, RecordThrottle, WrongCancelKeys


def test_the_oldest_of_a_source_is_dropped_when_the_source_is_at_its_cap() -> None:
    books = PendingStartups(max_total=100, max_per_source=2)
    first, dropped = books.admit("10.0.0.1", 0.0)
    second, _ = books.admit("10.0.0.1", 0.0)
    books.admit("10.0.0.2", 0.0)
    assert dropped == []
    _third, dropped = books.admit("10.0.0.1", 0.0)
    assert dropped == [first]
    assert books.from_source("10.0.0.1") == 2 and len(books) == 3
    first.finish()  # dropping ends it, and it finishes: no double count
    assert len(books) == 3
    second.finish()
    assert books.from_source("10.0.0.1") == 1 and len(books) == 2


def test_the_oldest_overall_is_dropped_at_the_global_cap_whatever_its_source() -> None:
    books = PendingStartups(max_total=3, max_per_source=10)
    admitted = [books.admit(f"10.0.0.{number}", 0.0)[0] for number in range(3)]
    _newest, dropped = books.admit("10.0.0.9", 0.0)
    assert dropped == [admitted[0]]
    assert len(books) == 3 and books.from_source("10.0.0.0") == 0
    admitted[1].finish()
    _, dropped = books.admit("10.0.0.9", 0.0)
    assert dropped == []
    assert books.from_source("10.0.0.9") == 2


def test_a_balancer_connection_counts_for_its_terminals_source_once_known() -> None:
    books = PendingStartups(max_total=10, max_per_source=1)
    direct, _ = books.admit("10.0.0.1", 0.0)
    proxied, dropped = books.admit(None, 0.0)  # header not read yet: only the global cap applies
    assert dropped == [] and books.from_source("10.0.0.1") == 1
    assert books.move(proxied, "10.0.0.1") == [direct]
    assert books.from_source("10.0.0.1") == 1 and len(books) == 1
    proxied.finish()
    assert len(books) == 0 and books.from_source("10.0.0.1") == 0
    assert books.move(proxied, "10.0.0.2") == []  # finished already: nothing to count


class _Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_the_throttle_passes_the_first_records_of_each_second_and_counts_the_rest() -> None:
    clock = _Clock()
    throttle = RecordThrottle(2, clock)
    assert [throttle.allow("tls_handshake_failed") for _ in range(5)] == [True, True, False, False, False]
    assert throttle.allow("session_refused")  # another kind has its own budget
    assert throttle.take_suppressed() == {"tls_handshake_failed": 3}
    assert throttle.take_suppressed() == {}
    clock.now += 1.0
    assert throttle.allow("tls_handshake_failed")  # a new second: the first one is never hidden


def test_wrong_cancel_keys_refuse_their_source_until_its_window_ends() -> None:
    now = [0.0]
    keys = WrongCancelKeys(limit=3, window=60.0, clock=lambda: now[0])
    assert [keys.wrong("10.0.0.1") for _ in range(3)] == [False, False, True]
    assert keys.refused("10.0.0.1") and not keys.refused("10.0.0.2")
    now[0] = 59.9
    assert keys.refused("10.0.0.1")
    now[0] = 60.0  # the window counts from the first wrong key, not the last
    assert not keys.refused("10.0.0.1")
    assert not keys.wrong("10.0.0.1") and not keys.refused("10.0.0.1")


def test_wrong_cancel_keys_from_too_many_sources_forget_the_expired_first(monkeypatch: Any) -> None:
    monkeypatch.setattr(preauth, "_WRONG_CANCEL_SOURCES", 3)
    now = [0.0]
    keys = WrongCancelKeys(limit=1, window=60.0, clock=lambda: now[0])
    keys.wrong("old")
    now[0] = 30.0
    keys.wrong("a")
    keys.wrong("b")
    now[0] = 61.0
    keys.wrong("c")  # a fourth source: "old" has expired and goes, the others stay
    assert keys.refused("a") and keys.refused("b") and keys.refused("c")
    keys.wrong("d")  # none expired: all are forgotten rather than the books growing
    assert keys.refused("d") and not keys.refused("a")
