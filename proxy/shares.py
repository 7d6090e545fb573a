"""Each terminal's share of a pool's server connections (limits.max_server_connections_per_terminal).

Its own module, left out of the mypyc build (setup.py): the accounts sit in a weak map, and a
class mypyc compiles cannot be weakly referenced.
"""

from __future__ import annotations

import contextlib
import weakref
from collections import deque
from typing import Protocol


class ShareWaiter(Protocol):
    """A client session in its terminal's line for a share of a pool (see ServerShares)."""

    def share_granted(self) -> None: ...


class ShareAccount:
    """One owner's (a terminal's) share of a pool: the server connections it holds, capped, and its
    line of waiters. A session keeps its terminal's account, so taking and giving back a share is a
    count, with no look-up by name. Pure bookkeeping: no clock, no I/O."""

    __slots__ = ("__weakref__", "held", "line")

    def __init__(self) -> None:
        self.held = 0
        self.line: deque[ShareWaiter] = deque()

    def take(self, cap: int, waiter: ShareWaiter) -> bool:
        """Take a share now (True), or put ``waiter`` in the owner's line (False): while others
        wait, a newcomer joins the line instead of jumping it, even under a larger cap."""
        if self.held < cap and not self.line:
            self.held += 1
            return True
        self.line.append(waiter)
        return False

    def give_back(self) -> None:
        """A share comes back: to the owner's first waiter if it has one, else to the free stock."""
        if self.line:
            self.line.popleft().share_granted()
        else:
            self.held -= 1

    def withdraw(self, waiter: ShareWaiter) -> None:
        """``waiter`` leaves its owner's line without a share (its client is gone)."""
        with contextlib.suppress(ValueError):
            self.line.remove(waiter)


class ServerShares:
    """How many of one pool's server connections each owner (a terminal) holds, capped, so that one
    terminal cannot take the pool from the rest of its store.

    A share is taken before a client asks the pool for a connection and given back when the
    connection goes back, so a place in the pool's line counts as well as a connection held. An
    owner at its cap waits in a line of its own; a share given back goes straight to the owner's
    first waiter (see ShareAccount).
    """

    __slots__ = ("_accounts",)

    def __init__(self) -> None:
        # Weak: an account lives while a session of its owner keeps it (one holding or waiting for
        # a share always does), so the map holds only terminals with sessions on this pool.
        self._accounts: weakref.WeakValueDictionary[str, ShareAccount] = weakref.WeakValueDictionary()

    def account(self, owner: str) -> ShareAccount:
        """The owner's account, the same one for all its sessions while any of them keeps it."""
        account = self._accounts.get(owner)
        if account is None:
            account = self._accounts[owner] = ShareAccount()
        return account

    def held(self, owner: str) -> int:
        account = self._accounts.get(owner)
        return 0 if account is None else account.held

    def waiting(self, owner: str) -> int:
        account = self._accounts.get(owner)
        return 0 if account is None else len(account.line)


def default_share_cap(pool_size: int) -> int:
    """Server connections one terminal may hold when its limits do not say: half the pool (at least
    one), so a single terminal never holds the whole pool."""
    return max(1, pool_size // 2)
