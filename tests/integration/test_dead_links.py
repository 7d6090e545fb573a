"""Links that die without a word: the upstream link black-holed under a statement, a till that
vanished. Each fails within its configured bound, and the proxy recovers without a restart.

The black holes are nftables rules on loopback (tests/integration/blackhole.py): this machine's
kernel has no netem. They match only the ports of the one connection a test cuts.
"""

from __future__ import annotations

import json
import os
import socket
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import psycopg
import pytest

from proxy.localpg import free_port
from tests.integration.blackhole import BlackHoles, black_holes
from tests.integration.proxyproc import ProxyProcess, TerminalPKI
from tests.integration.test_admin import TOKEN, _call

StartProxy = Callable[..., ProxyProcess]

USER_TIMEOUT = 2.0
# Scheduling and the kernel's timer granularity on a loaded two-core machine.
SLACK = 3.0
# Without TCP_USER_TIMEOUT the kernel retransmits into a dead link for about 15 minutes, and with
# keepalives alone gives up only after idle + interval * count: far above any of these bounds.
LONG_KEEPALIVE = {"idle": "60s", "interval": "10s", "count": 6}
# Probes from 1 s of silence on, so the user timeout can end a connection that has nothing in
# flight; 30 unanswered ones would take 30 s alone.
PROBING_KEEPALIVE = {"idle": "1s", "interval": "1s", "count": 30}


@pytest.fixture
def holes() -> Iterator[BlackHoles]:
    with black_holes() as made:
        yield made


def _server_connection_port(till: psycopg.Connection[Any]) -> int:
    """The proxy's end of the server connection this session holds, as PostgreSQL sees it."""
    row = till.execute("SELECT inet_client_port()").fetchone()
    assert row is not None and isinstance(row[0], int)
    return row[0]


def _local_port(till: psycopg.Connection[Any]) -> int:
    with socket.socket(fileno=os.dup(till.pgconn.socket)) as view:
        port = view.getsockname()[1]
    assert isinstance(port, int)
    return port


def _error_within(
    statement: Callable[[], object], holes: BlackHoles, bound: float, cut: Callable[[], None]
) -> tuple[psycopg.Error, float]:
    """Run ``statement`` in a thread (so a hang fails the test instead of stalling it), ``cut`` the
    link (if not cut already), and return the error the statement ended with and how long after the
    cut it came."""
    with ThreadPoolExecutor(max_workers=1) as runner:
        future = runner.submit(statement)
        cut()
        cut_at = time.monotonic()
        try:
            future.result(timeout=bound)
        except psycopg.Error as exc:
            return exc, time.monotonic() - cut_at
        except TimeoutError:
            # Mend the link so the hung statement ends and the executor can be shut down.
            holes.mend()
            pytest.fail(f"the statement still hung {bound:g}s after the link died")
    pytest.fail("the statement went through a black-holed link")


def _assert_connection_lost(error: psycopg.Error) -> None:
    assert isinstance(error, psycopg.OperationalError), repr(error)
    assert error.sqlstate == "08006", repr(error)
    assert "lost the connection to the database server" in str(error), str(error)


# One server connection: had the dead one gone back to the pool, the next statement would get it;
# in transaction mode the statement into the dead link gets the very connection just measured.
pool_modes = pytest.mark.parametrize("mode", ["session", "transaction"])


def _start(start_proxy: StartProxy, keepalive: dict[str, Any], mode: str) -> ProxyProcess:
    pool = {
        "mode": mode,
        "size": 1,
        "tcp_user_timeout": f"{USER_TIMEOUT:g}s",
        "tcp_keepalive": keepalive,
    }
    return start_proxy(routes={"pos": {"pool": pool}})


def _assert_recovers(
    proxy: ProxyProcess, terminal_pki: TerminalPKI, holes: BlackHoles, dead_port: int
) -> None:
    holes.mend()
    with psycopg.connect(**proxy.conninfo(terminal_pki.cashier, terminal_pki.ca), autocommit=True) as till:
        assert _server_connection_port(till) != dead_port
        assert till.execute("SELECT 'sold'").fetchone() == ("sold",)


@pool_modes
def test_a_statement_sent_into_a_dead_upstream_link_fails_within_the_user_timeout(
    start_proxy: StartProxy, terminal_pki: TerminalPKI, holes: BlackHoles, pg_cluster: Any, mode: str
) -> None:
    # Long keepalives: the kernel probes only while nothing is in flight, so only the user timeout
    # can end a connection whose statement waits unacknowledged.
    proxy = _start(start_proxy, LONG_KEEPALIVE, mode)
    with psycopg.connect(**proxy.conninfo(terminal_pki.cashier, terminal_pki.ca), autocommit=True) as till:
        dead_port = _server_connection_port(till)
        holes.cut(dead_port, pg_cluster.port)
        error, elapsed = _error_within(
            lambda: till.execute("SELECT 'into the void'"),
            holes,
            USER_TIMEOUT + SLACK,
            # Cut before the statement leaves the proxy: the executor thread needs a moment to send it.
            cut=lambda: holes.cut(dead_port, pg_cluster.port),
        )
    _assert_connection_lost(error)
    assert elapsed >= USER_TIMEOUT - 0.5, f"failed after {elapsed:.2f}s, before the user timeout"
    _assert_recovers(proxy, terminal_pki, holes, dead_port)


@pool_modes
def test_an_upstream_link_black_holed_mid_statement_fails_within_the_user_timeout(
    start_proxy: StartProxy, terminal_pki: TerminalPKI, holes: BlackHoles, pg_cluster: Any, mode: str
) -> None:
    proxy = _start(start_proxy, PROBING_KEEPALIVE, mode)
    with psycopg.connect(**proxy.conninfo(terminal_pki.cashier, terminal_pki.ca), autocommit=True) as till:
        dead_port = _server_connection_port(till)

        def cut_once_the_statement_runs() -> None:
            time.sleep(0.5)  # the statement is on the server and acknowledged
            holes.cut(dead_port, pg_cluster.port)

        # Probes start after a second of silence; the user timeout ends the connection once they stay
        # unanswered that long: well before the 3 s statement would have ended plus 30 probes.
        error, elapsed = _error_within(
            lambda: till.execute("SELECT pg_sleep(3)"),
            holes,
            1.0 + USER_TIMEOUT + SLACK,
            cut=cut_once_the_statement_runs,
        )
    _assert_connection_lost(error)
    # Not at once: the link went silent, nobody reset it.
    assert elapsed >= 1.0, f"failed {elapsed:.2f}s after the cut"
    _assert_recovers(proxy, terminal_pki, holes, dead_port)


def test_a_vanished_till_is_noticed_and_its_server_connection_freed(
    start_proxy: StartProxy, terminal_pki: TerminalPKI, holes: BlackHoles, tmp_path: Path
) -> None:
    token_file = tmp_path / "admin-token"
    token_file.write_text(TOKEN + "\n", encoding="utf-8")
    admin_port = free_port()
    proxy = start_proxy(
        listen={"tcp_keepalive": {"idle": "1s", "interval": "1s", "count": 2}, "tcp_user_timeout": "2s"},
        routes={"pos": {"pool": {"mode": "session", "size": 1}}},
        admin={"host": "127.0.0.1", "port": admin_port, "token": {"file": str(token_file)}},
    )
    proxy.wait_for_event("admin_listening")

    def clients() -> list[dict[str, Any]]:
        listed = json.loads(_call(admin_port, "/v1/clients")[1])["clients"]
        assert isinstance(listed, list)
        return listed

    def pool() -> dict[str, Any]:
        (pos,) = json.loads(_call(admin_port, "/v1/pools")[1])["pools"]
        assert isinstance(pos, dict)
        return pos

    till = psycopg.connect(**proxy.conninfo(terminal_pki.cashier, terminal_pki.ca), autocommit=True)
    try:
        till.execute("SELECT 1")
        assert len(clients()) == 1 and pool()["active"] == 1
        holes.cut(_local_port(till), proxy.port)
        cut_at = time.monotonic()
        # About 3 s either way: keepalive probes from 1 s of silence on, every second, two of them;
        # or, if anything the proxy sent is still unacknowledged, the 2 s user timeout (seen here:
        # 88 bytes in flight, likely the reply's last record with its delayed ACK caught by the cut;
        # the kernel then sends no probes at all, and without the user timeout, nothing in 40 s).
        bound = 3.0 + SLACK
        while clients() or pool()["active"]:
            assert time.monotonic() - cut_at < bound, (clients(), pool())
            time.sleep(0.1)
    finally:
        holes.mend()
        till.close()
    # The session's server connection is free for the next till.
    with psycopg.connect(
        **proxy.conninfo(terminal_pki.cashier, terminal_pki.ca), autocommit=True
    ) as next_till:
        assert next_till.execute("SELECT 'next sale'").fetchone() == ("next sale",)
