"""The pre-authentication phase: connections accepted but not through startup yet (TLS, startup
packet, identity). Caps on how many there may be, globally and per source address, with the oldest
dropped first; one deadline for the whole phase; and a throttle on the log and audit records such
connections cause, which a flood would otherwise turn into a flood of records. Pure bookkeeping."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Final


def _nothing() -> None:
    return None


class PendingStartup:
    """One connection in the pre-authentication phase. ``drop`` ends it (whoever owns it at the
    moment sets it); ``finish`` takes it off the books once it is through or gone."""

    __slots__ = ("_book", "drop", "source", "startup_deadline")

    def __init__(self, book: PendingStartups, source: str | None, startup_deadline: float) -> None:
        self._book = book
        self.source = source
        # Loop time by which the startup packet must be in (listen.startup_timeout from accept).
        self.startup_deadline = startup_deadline
        self.drop: Callable[[], object] = _nothing

    def finish(self) -> None:
        self._book.finish(self)


class PendingStartups:
    """The connections in the pre-authentication phase, oldest first, overall and per source.

    A connection whose source is not known yet (a balancer's, before its PROXY header is read)
    counts only towards the global cap until ``move`` gives it its source.
    """

    def __init__(self, max_total: int, max_per_source: int) -> None:
        self.max_total = max_total
        self.max_per_source = max_per_source
        # Dicts as ordered sets: insertion order is age.
        self._all: dict[PendingStartup, None] = {}
        self._by_source: dict[str, dict[PendingStartup, None]] = {}

    def __len__(self) -> int:
        return len(self._all)

    def from_source(self, source: str) -> int:
        return len(self._by_source.get(source, ()))

    def admit(
        self, source: str | None, startup_deadline: float
    ) -> tuple[PendingStartup, list[PendingStartup]]:
        """Book a new connection; returns it and the older ones to drop (already off the books)
        to keep within the caps."""
        dropped = self._room_at(source) if source is not None else []
        while len(self._all) >= self.max_total:
            dropped.append(self._drop_oldest(self._all))
        pending = PendingStartup(self, source, startup_deadline)
        self._all[pending] = None
        if source is not None:
            self._by_source.setdefault(source, {})[pending] = None
        return pending, dropped

    def move(self, pending: PendingStartup, source: str) -> list[PendingStartup]:
        """``pending``'s source is now known (a PROXY header): count it there; returns what to drop."""
        if pending not in self._all:
            return []
        self._forget_source(pending)
        dropped = self._room_at(source)
        pending.source = source
        self._by_source.setdefault(source, {})[pending] = None
        return dropped

    def finish(self, pending: PendingStartup) -> None:
        if pending in self._all:
            del self._all[pending]
            self._forget_source(pending)

    def _room_at(self, source: str) -> list[PendingStartup]:
        dropped: list[PendingStartup] = []
        while len(same_source := self._by_source.get(source, {})) >= self.max_per_source:
            dropped.append(self._drop_oldest(same_source))
        return dropped

    def _drop_oldest(self, books: dict[PendingStartup, None]) -> PendingStartup:
        oldest = next(iter(books))
        self.finish(oldest)
        return oldest

    def _forget_source(self, pending: PendingStartup) -> None:
        if pending.source is None:
            return
        same_source = self._by_source.get(pending.source)
        if same_source is not None:
            same_source.pop(pending, None)
            if not same_source:
                del self._by_source[pending.source]


# How often the counts of suppressed records are reported.
SUPPRESSED_REPORT_INTERVAL: Final = 1.0


class RecordThrottle:
    """At most ``per_second`` records of each kind per second; the rest are counted, and the counts
    are taken (and reported by the caller) with ``take_suppressed``. The first records of every
    second always pass, so no new kind of event is ever hidden."""

    def __init__(self, per_second: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.per_second = per_second
        self._clock = clock
        self._second = -1
        self._counts: dict[str, int] = {}
        self._suppressed: dict[str, int] = {}

    def allow(self, kind: str) -> bool:
        second = int(self._clock())
        if second != self._second:
            self._second = second
            self._counts.clear()
        count = self._counts.get(kind, 0)
        if count < self.per_second:
            self._counts[kind] = count + 1
            return True
        self._suppressed[kind] = self._suppressed.get(kind, 0) + 1
        return False

    def take_suppressed(self) -> dict[str, int]:
        """How many records of each kind were suppressed since the last call (and reset)."""
        suppressed, self._suppressed = self._suppressed, {}
        return suppressed


# Wrong cancel keys a source address may send in a window before its cancels are no longer looked
# up until the window ends. A CancelRequest is answered by nothing (55.2.9), so a guesser is blind and
# needs about 2**30 tries for a 31-bit key once it knows a pid (session mode gives clients their
# backend's real pid, which pg_stat_activity shows): some 2,000 a second from one address would find
# it in about a week, 20 a minute take about a century. A driver's cancel that lands just after its
# session ended is the one honest wrong key, and that is rare.
WRONG_CANCEL_KEYS: Final = 20
WRONG_CANCEL_WINDOW_S: Final = 60.0
# Addresses followed at once; past this, the expired windows go, then (a flood from that many
# addresses, each of which could guess on its own anyway) all of them.
_WRONG_CANCEL_SOURCES: Final = 10_000


class WrongCancelKeys:
    """Wrong cancel keys by source address, counted in a fixed window from the first of them."""

    def __init__(
        self,
        limit: int = WRONG_CANCEL_KEYS,
        window: float = WRONG_CANCEL_WINDOW_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.limit = limit
        self.window = window
        self._clock = clock
        self._by_source: dict[str, tuple[float, int]] = {}

    def refused(self, source: str) -> bool:
        """Whether ``source`` sent ``limit`` wrong keys in its current window: its cancels wait."""
        entry = self._by_source.get(source)
        if entry is None:
            return False
        started, count = entry
        if self._clock() - started >= self.window:
            del self._by_source[source]
            return False
        return count >= self.limit

    def wrong(self, source: str) -> bool:
        """Count a wrong key from ``source``; True when this one reached the limit."""
        now = self._clock()
        started, count = self._by_source.get(source, (now, 0))
        if now - started >= self.window:
            started, count = now, 0
        if source not in self._by_source and len(self._by_source) >= _WRONG_CANCEL_SOURCES:
            self._by_source = {
                kept: entry for kept, entry in self._by_source.items() if now - entry[0] < self.window
            }
            if len(self._by_source) >= _WRONG_CANCEL_SOURCES:
                self._by_source.clear()
        self._by_source[source] = (started, count + 1)
        return count + 1 == self.limit
