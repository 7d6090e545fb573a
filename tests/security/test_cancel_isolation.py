"""A terminal's cancel stops only its own statement, never another terminal's (issue 16, Cancel).

Under transaction pooling a server connection goes back to the pool once a cancelled statement has
ended, and on to the next terminal. A cashier holding a valid certificate cancels its own
statements at random moments around their end, over and over, while a manager runs statements on
the same single server connection: none of the manager's may be cancelled. (Keys that are not the
cashier's own do nothing at all: test_postgres_sessions.py::test_cancel_with_unknown_keys_does_nothing.)
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable

import psycopg

from proxy.preauth import WRONG_CANCEL_KEYS
from tests.integration.proxyproc import ProxyProcess, TerminalPKI
from tests.integration.test_cancel import raw_client, send_cancel, sleep_outcome

_ROUNDS = 150
_BUDGET_S = 30.0


def test_cancels_racing_the_hand_back_never_reach_another_terminal(
    start_proxy: Callable[..., ProxyProcess], terminal_pki: TerminalPKI
) -> None:
    proxy = start_proxy(routes={"pos": {"pool": {"mode": "transaction", "size": 1}}})
    stop = threading.Event()
    victim = {"rounds": 0, "cancelled": 0}

    def run_victim() -> None:
        with psycopg.connect(
            **proxy.conninfo(terminal_pki.manager, terminal_pki.ca), autocommit=True
        ) as connection:
            while not stop.is_set():
                victim["rounds"] += 1
                try:
                    connection.execute("SELECT 'manager' FROM pg_sleep(0.003)")
                except psycopg.errors.QueryCanceled:
                    victim["cancelled"] += 1

    victim_thread = threading.Thread(target=run_victim)
    victim_thread.start()
    rounds = cancelled = 0
    randomness = random.Random(16)
    deadline = time.monotonic() + _BUDGET_S
    try:
        with psycopg.connect(
            **proxy.conninfo(terminal_pki.cashier, terminal_pki.ca), autocommit=True
        ) as attacker:
            while rounds < _ROUNDS and time.monotonic() < deadline:
                rounds += 1
                canceller = threading.Timer(randomness.uniform(0.0, 0.01), attacker.cancel)
                canceller.start()
                try:
                    attacker.execute("SELECT pg_sleep(0.003)")
                except psycopg.errors.QueryCanceled:
                    cancelled += 1
                canceller.join()
    finally:
        stop.set()
        victim_thread.join(30)
    print(f"attacker: {rounds} rounds, {cancelled} cancelled; victim: {victim}")
    assert cancelled > 0, "no cancel of the attacker's own statements landed: the race was not run"
    assert victim["rounds"] > 0
    assert victim["cancelled"] == 0, (
        f"{victim['cancelled']} of the other terminal's statements were cancelled"
    )


def test_guessing_a_cancel_key_from_one_address_is_cut_off_after_a_few_wrong_keys(
    start_proxy: Callable[..., ProxyProcess], terminal_pki: TerminalPKI
) -> None:
    """Session mode gives a terminal its backend's real pid, which pg_stat_activity shows: only the
    31-bit key is left to guess, blind (a CancelRequest gets no answer), about 2,000 tries a second
    from one address with nothing in the way. After WRONG_CANCEL_KEYS wrong keys the guesser's
    cancels are not looked up for the window, the right key included; the terminal's own cancel,
    from its own address, still works."""
    proxy = start_proxy(routes={"pos": {"pool": {"mode": "session", "size": 2}}})
    guesser = "127.0.0.2"
    with raw_client(proxy, terminal_pki) as (client, (pid, key)):
        for guess in range(1, WRONG_CANCEL_KEYS + 1):
            send_cancel(proxy, pid, key ^ guess, guesser)
        assert sleep_outcome(client, proxy, (pid, key), guesser) is None
        assert sleep_outcome(client, proxy, (pid, key)) == "57014"
    refused = proxy.wait_for_event("cancel_keys_refused", source=guesser)
    assert refused["wrong_keys"] == WRONG_CANCEL_KEYS
    ignored = [r for r in proxy.log_events() if r.get("event") == "cancel_ignored"]
    assert len(ignored) == WRONG_CANCEL_KEYS  # the refused one is not even looked up
