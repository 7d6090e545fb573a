"""The store-to-cloud links under faults, with a write ledger (issue 17): the proxy runs in a
network namespace of the test's own, the tills reach it over one veth link and it reaches the
database over another (tests/integration/netns.py, relay.py). Each link in turn is slowed and made
lossy, partitioned for 10 s, or dropped in the middle of a result, in both pool modes; after each:
no committed sale lost, none doubled, every unknown one settled by reading it back, every error a
clean one within its bound, the proxy recovered without a restart (new sessions, a refilled pool
holding only clean connections, /readyz). docs/reliability.md has the figures.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
import pytest

from proxy.localpg import free_port
from tests.integration.conftest import OwnCluster, own_cluster_running
from tests.integration.ledger import (
    CREATE_SALES_TABLE,
    SALES_TABLE,
    Fleet,
    Ledger,
    Target,
    is_clean_error,
    stored_sales,
)
from tests.integration.netns import Link, StoreNetwork, store_network
from tests.integration.proxyproc import ProxyProcess, TerminalPKI, deep_merge, stop_all
from tests.integration.relay import Relay, relays
from tests.integration.test_admin import TOKEN, _call
from tests.integration.test_database_faults import _assert_pool_holds_only_clean_connections, _proxy_backends
from tests.integration.test_upstream_resilience import _wait_for

USER_TIMEOUT = 3.0
# Probes from a second of silence on: a connection with nothing in flight is found dead by them,
# one with unacknowledged data by the user timeout; either within about 3 s.
KEEPALIVE = {"idle": "1s", "interval": "1s", "count": 2}
NOTICE_BOUND = 1.0 + USER_TIMEOUT
MAX_CLIENT_WAIT = 4.0
CONNECT_TIMEOUT = 1.0
POOL_SIZE = 6  # five tills and the reader of a long result
PARTITION = 10.0
DELAY = 0.1  # each way, per link: 200 ms more round trip on each
LOSS_PERCENT = 5
DEGRADED_FOR = 6.0
# A till stalled behind a partition of its own link: the proxy ends its session within
# NOTICE_BOUND, but the till (its relay end) learns so only from its first keepalive probe or
# retransmission after the link is back; a till behind a dead database link waits its turn, then
# one connect. Slack for a loaded two-core machine.
OPERATION_BOUND = PARTITION + MAX_CLIENT_WAIT + 2 * CONNECT_TIMEOUT + 4.0
TILL_CONNECT_TIMEOUT = MAX_CLIENT_WAIT + 2 * CONNECT_TIMEOUT + 1.0
SLACK = 3.0
# The long result: the server makes it slowly (about 2,000 rows a second), so the cut lands in its
# middle and little of it waits in buffers on the way: the reader hears of a dead link as soon as
# the proxy does, not after it has read what was already sent.
RESULT_ROWS = 100_000
LONG_RESULT = (
    "SELECT g, repeat('x', 200), CASE WHEN g % 100 = 0 THEN pg_sleep(0.05) END"
    f" FROM generate_series(1, {RESULT_ROWS}) AS g"
)
CUT_AFTER_ROWS = 2_000


@dataclass
class Store:
    """The proxy in its namespace, the relays at this end of its links, and a fleet of tills."""

    network: StoreNetwork
    proxy: ProxyProcess
    admin_port: int
    terminal_relay: Relay
    database_relay: Relay
    cluster: OwnCluster
    target: Target
    fleet: Fleet
    figures: dict[str, str] = field(default_factory=dict)

    def admin(self, path: str) -> tuple[int, bytes]:
        return _call(self.admin_port, path, host=self.network.terminal_link.there)

    def clients(self) -> list[dict[str, Any]]:
        listed = json.loads(self.admin("/v1/clients")[1])["clients"]
        assert isinstance(listed, list)
        return listed

    def pool(self) -> dict[str, Any]:
        (pos,) = json.loads(self.admin("/v1/pools")[1])["pools"]
        assert isinstance(pos, dict)
        return pos

    def ready(self) -> bool:
        return self.admin("/readyz")[0] == 200

    def port_of(self, link: Link) -> int:
        """The one TCP port the link carries for the test (tills to proxy, proxy to database)."""
        return self.proxy.port if link is self.network.terminal_link else self.database_relay.port

    def measure(self, name: str, started: float) -> None:
        self.figures[name] = f"{time.monotonic() - started:.2f}s"


def _round_trip(target: Target) -> float:
    """One statement's round trip through the links, on a fresh session."""
    with psycopg.connect(**target.psycopg_conninfo(), autocommit=True) as probe:
        probe.execute("SELECT 1")
        started = time.monotonic()
        probe.execute("SELECT 1")
        return time.monotonic() - started


def _delay_and_loss(store: Store) -> None:
    """200 ms more round trip on each link and 5 % of the packets lost each way, for a while:
    every till slows down and goes on selling."""
    links = (store.network.terminal_link, store.network.database_link)
    before = _round_trip(store.target)
    degraded = time.monotonic()
    for relay in (store.terminal_relay, store.database_relay):
        relay.delay = DELAY
    for link in links:
        store.network.lose(link, store.port_of(link), LOSS_PERCENT)
    during = _round_trip(store.target)
    # Two links, each 100 ms each way: a round trip through both takes at least 400 ms more.
    assert during >= before + 4 * DELAY, (before, during)
    store.figures["round trip"] = f"{before * 1000:.0f} ms before, {during * 1000:.0f} ms degraded"
    time.sleep(DEGRADED_FOR)
    store.fleet.wait_all_selling_since(degraded, OPERATION_BOUND, "every till selling on the degraded links")
    lost = {link.name: store.network.dropped(link) for link in links}
    assert all(lost.values()), f"no packet lost: {lost}"
    store.figures["packets lost"] = str(lost)
    store.figures["sales committed while degraded"] = str(
        sum(1 for till in store.fleet.tills for at in till.committed_at if at > degraded)
    )
    for relay in (store.terminal_relay, store.database_relay):
        relay.delay = 0.0
    for link in links:
        store.network.mend(link)


def _partition(link_of: Callable[[StoreNetwork], Link]) -> Callable[[Store], None]:
    def partition(store: Store) -> None:
        link = link_of(store.network)
        store.network.cut(link, store.port_of(link))
        cut_at = time.monotonic()
        if link is store.network.terminal_link:
            # The tills vanished from the proxy's view: keepalives and the user timeout notice,
            # and the sessions' server connections go back to the pool or are closed.
            _wait_for(
                lambda: not store.clients() and store.pool()["active"] == 0,
                NOTICE_BOUND + SLACK,
                "the proxy noticing the vanished tills",
            )
            store.measure("vanished tills noticed after", cut_at)
            assert store.ready(), "the database link is fine: /readyz must say so"
        else:
            _wait_for(lambda: not store.ready(), NOTICE_BOUND + MAX_CLIENT_WAIT + SLACK, "/readyz failing")
            store.measure("/readyz failing after", cut_at)
        time.sleep(max(0.0, PARTITION - (time.monotonic() - cut_at)))
        store.network.mend(link)

    return partition


@dataclass
class _Reader:
    """A client reading a long result through the proxy, in a thread of its own."""

    target: Target
    rows: int = 0
    error: psycopg.Error | None = None
    ended_at: float = 0.0
    mid_result: threading.Event = field(default_factory=threading.Event)
    done: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        try:
            with psycopg.connect(**self.target.psycopg_conninfo(), autocommit=True) as connection:
                for _row in connection.cursor().stream(LONG_RESULT):
                    self.rows += 1
                    if self.rows == CUT_AFTER_ROWS:
                        self.mid_result.set()
        except psycopg.Error as exc:
            self.error = exc
        finally:
            self.ended_at = time.monotonic()
            self.done.set()


def _drop_mid_result(link_of: Callable[[StoreNetwork], Link]) -> Callable[[Store], None]:
    def drop(store: Store) -> None:
        link = link_of(store.network)
        reader = _Reader(store.target)
        thread = threading.Thread(target=reader.run, name="reader", daemon=True)
        thread.start()
        assert reader.mid_result.wait(15), f"the result never got going ({reader.rows} rows)"
        store.network.cut(link, store.port_of(link))
        cut_at = time.monotonic()
        if link is store.network.database_link:
            # The proxy finds its server connection dead and tells the reader, over a link that works.
            assert reader.done.wait(NOTICE_BOUND + SLACK), f"the reader still waits ({reader.rows} rows)"
            store.measure("reader told after", cut_at)
        else:
            # The proxy cannot reach the reader: it ends the session (its reply unacknowledged) and
            # frees the server connection, which was in the middle of sending the result.
            _wait_for(
                lambda: not store.clients() and store.pool()["active"] == 0,
                NOTICE_BOUND + SLACK,
                "the proxy ending the unreachable reader's session",
            )
            store.measure("session ended after", cut_at)
        store.network.mend(link)
        # Only now can the reader's end learn it, from its next keepalive probe or retransmission.
        assert reader.done.wait(OPERATION_BOUND), f"the reader still waits ({reader.rows} rows)"
        thread.join(5)
        assert reader.error is not None, f"a result cut off after {reader.rows} rows ended as whole"
        assert reader.rows < RESULT_ROWS
        assert is_clean_error(reader.error.sqlstate, str(reader.error)), repr(reader.error)
        store.figures["reader"] = f"{reader.rows} rows, then {type(reader.error).__name__}: {reader.error}"

    return drop


@dataclass(frozen=True, slots=True)
class Fault:
    name: str
    inject: Callable[[Store], None]


def _terminal(network: StoreNetwork) -> Link:
    return network.terminal_link


def _database(network: StoreNetwork) -> Link:
    return network.database_link


FAULTS = [
    Fault("delay-200ms-loss-5pc", _delay_and_loss),
    Fault("partition-10s-terminal-link", _partition(_terminal)),
    Fault("partition-10s-database-link", _partition(_database)),
    Fault("drop-mid-result-terminal-link", _drop_mid_result(_terminal)),
    Fault("drop-mid-result-database-link", _drop_mid_result(_database)),
]


@pytest.fixture(scope="module")
def link_cluster(pg_cluster: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[OwnCluster]:
    with own_cluster_running(pg_cluster, tmp_path_factory.mktemp("links")) as cluster:
        cluster.server.execute_script(CREATE_SALES_TABLE, dbname="pos")
        yield cluster


@pytest.fixture
def network() -> Iterator[StoreNetwork]:
    with store_network() as made:
        yield made


@pytest.fixture
def open_store(
    network: StoreNetwork,
    link_cluster: OwnCluster,
    base_config: dict[str, Any],
    terminal_pki: TerminalPKI,
    tmp_path: Path,
) -> Iterator[Callable[[str], Store]]:
    """Opens the store for a pool mode: relays, the proxy in its namespace, a ledger fleet."""
    started: list[ProxyProcess] = []
    fleets: list[Fleet] = []
    with relays() as running:

        def open_for(mode: str) -> Store:
            link_cluster.server.execute_script(f"TRUNCATE {SALES_TABLE}", dbname="pos")
            database_relay = running.add(network.database_link.here, ("127.0.0.1", link_cluster.server.port))
            token_file = tmp_path / "admin-token"
            token_file.write_text(TOKEN + "\n", encoding="utf-8")
            admin_port = free_port()
            timeouts = {"tcp_user_timeout": f"{USER_TIMEOUT:g}s", "tcp_keepalive": KEEPALIVE}
            route = link_cluster.route(
                mode=mode,
                size=POOL_SIZE,
                max_client_wait=f"{MAX_CLIENT_WAIT:g}s",
                connect_timeout=f"{CONNECT_TIMEOUT:g}s",
                connect_retry_delay="100ms",
                connect_retry_max_delay="1s",
                **timeouts,
            )
            # "localhost" in the namespace is this end of the database link (netns.py).
            route.update(host="localhost", port=database_relay.port)
            config = deep_merge(
                base_config,
                {
                    "listen": timeouts,
                    "routes": {"pos": route},
                    "admin": {
                        "host": network.terminal_link.there,
                        "port": admin_port,
                        "token": {"file": str(token_file)},
                    },
                    "roles": {"cashier": {"limits": {"max_server_connections_per_terminal": POOL_SIZE}}},
                },
            )
            proxy = ProxyProcess(
                tmp_path / "proxy",
                config,
                host=network.terminal_link.there,
                command_prefix=network.exec_prefix(),
            )
            started.append(proxy)
            proxy.start()
            proxy.wait_for_event("admin_listening")
            terminal_relay = running.add("127.0.0.1", (network.terminal_link.there, proxy.port))
            target = Target(proxy, terminal_pki, TILL_CONNECT_TIMEOUT, relay_port=terminal_relay.port)
            fleet = Fleet(Ledger(), target, OPERATION_BOUND)
            fleets.append(fleet)
            return Store(
                network, proxy, admin_port, terminal_relay, database_relay, link_cluster, target, fleet
            )

        try:
            yield open_for
        finally:
            for fleet in fleets:
                fleet.stop()
            stop_all(started)


@pytest.mark.parametrize(
    ("fault", "mode"),
    [
        pytest.param(fault, mode, id=f"{fault.name}-{mode}")
        for fault in FAULTS
        for mode in ("session", "transaction")
    ],
)
def test_a_store_link_fault_loses_no_sale_and_the_proxy_recovers(
    fault: Fault, mode: str, open_store: Callable[[str], Store]
) -> None:
    store = open_store(mode)
    ledger, fleet = store.fleet.ledger, store.fleet
    fleet.start()
    try:
        fleet.wait_all_selling_since(time.monotonic(), 15, "every till selling")
        fault.inject(store)
        back = time.monotonic()
        # Without a restart: /readyz says so, every till sells again, the pool serves them.
        _wait_for(store.ready, 10, "/readyz ready")
        store.measure("/readyz ready after", back)
        fleet.wait_all_selling_since(back, OPERATION_BOUND + 5, "every till selling again")
        store.measure("every till selling again after", back)
    finally:
        hung = fleet.stop()
    assert not hung, f"tills hung: {hung}"

    server = store.cluster.server
    report = ledger.check(stored_sales(server))
    slowest = max(till.slowest for till in fleet.tills)
    print(
        f"\n{fault.name} / {mode}: {report.summary()}; {len(ledger.failures)} errors;"
        f" slowest sale {slowest:.2f}s; {store.figures}"
    )
    for failure in ledger.failures:
        print(f"  {failure}")
    report.assert_sound()
    unclean = [failure for failure in ledger.failures if not failure.clean]
    assert not unclean, unclean
    for till in fleet.tills:
        assert till.slowest < OPERATION_BOUND, f"{till.name} waited {till.slowest:.1f}s"
    # A backend whose proxy end died in the partition ends once its relay end hears the reset.
    _wait_for(
        lambda: len(_proxy_backends(server, "pid")) == (pool := store.pool())["idle"] and pool["active"] == 0,
        10,
        "only the pool's own connections on the server",
    )
    _assert_pool_holds_only_clean_connections(
        store.admin_port, server, store.target, admin_host=store.network.terminal_link.there
    )
