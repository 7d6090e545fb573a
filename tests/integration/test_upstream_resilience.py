"""The upstream link failing under load: PostgreSQL stopped and started again while terminals work."""

from __future__ import annotations

import json
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import psycopg
import pytest

from proxy.localpg import free_port
from proxy.protocols.postgres import messages as m
from tests.integration.proxyproc import ProxyProcess, TerminalPKI
from tests.integration.test_admin import TOKEN, _call
from tests.integration.test_postgres_robustness import data_row_values, raw_session, run_query

if TYPE_CHECKING:
    # Only a type here: tests.integration.conftest imports the ledger, which imports this module.
    from tests.integration.conftest import OwnCluster

StartProxy = Callable[..., ProxyProcess]

# What a terminal may see while its database restarts, and why each is clean:
#   57P01 admin_shutdown: PostgreSQL's own goodbye to the backend serving it (pg_ctl stop -m fast);
#   08006 connection_failure: the proxy lost the server connection mid-transaction;
#   08001 unable_to_establish: the server stayed down for longer than max_client_wait;
#   53300 too_many_connections: the pool stayed saturated for longer than max_client_wait.
# Each one ends that session with a FATAL error, and the terminal reconnects.
CLEAN_SQLSTATES = frozenset({"57P01", "08006", "08001", "53300"})
# Errors at connect time carry no SQLSTATE in libpq: the proxy's messages for the same conditions.
CLEAN_CONNECT_MESSAGES = (
    "could not connect to the database server",
    "no server connection became free",
    "lost the connection to the database server",
    "terminating connection",
)
# Inside a transaction the terminal holds its server connection between statements. PostgreSQL's
# FATAL 57P01 can reach it there right behind the ReadyForQuery of the statement before, and
# libpq then reads it while idle, as a notice, and reports only the closed connection, without an
# SQLSTATE: it does the same connected straight to PostgreSQL. Between transactions the proxy
# holds the connection instead, so there the terminal sees nothing (or a clean error at BEGIN).
IDLE_IN_TRANSACTION_LOSS = "SSL connection has been closed unexpectedly"
MAX_CLIENT_WAIT = 6.0
CONNECT_TIMEOUT = 1.0
# Nothing a terminal does may take longer than waiting its turn plus one connect, plus slack for a
# loaded two-core test machine.
OPERATION_BOUND = MAX_CLIENT_WAIT + 2 * CONNECT_TIMEOUT + 4.0
# A pool with no connection probes its server every 5 s on a 1 s maintenance tick, and while the
# server is down retries with backoff up to connect_retry_max_delay: both directions within a few
# seconds, with slack for a loaded machine.
QUIET_OUTAGE_BOUND = 12.0


@dataclass
class Terminal:
    """One till doing small transactions in a loop, recording what happened to each."""

    number: int
    committed: list[int] = field(default_factory=list)
    succeeded_at: list[float] = field(default_factory=list)
    clean_errors: list[str] = field(default_factory=list)
    unclean_errors: list[str] = field(default_factory=list)
    slowest: float = 0.0
    doing: str = "starting"  # what it does now, and since when: what it waits for if it hangs
    since: float = field(default_factory=time.monotonic)

    def step(self, doing: str) -> None:
        self.doing, self.since = doing, time.monotonic()


def _is_clean(error: psycopg.Error, *, in_transaction: bool) -> bool:
    if error.sqlstate is not None:
        return error.sqlstate in CLEAN_SQLSTATES
    if in_transaction and IDLE_IN_TRANSACTION_LOSS in str(error):
        return True
    return any(message in str(error) for message in CLEAN_CONNECT_MESSAGES)


def _work(terminal: Terminal, conninfo: dict[str, object], until: float) -> None:
    connection: psycopg.Connection | None = None
    sequence = 0
    while time.monotonic() < until:
        sequence += 1
        started = time.monotonic()
        in_transaction = False
        try:
            if connection is None or connection.closed:
                terminal.step("connecting")
                # conninfo's connect_timeout bounds the connect; the statements, the test's join.
                connection = psycopg.connect(**conninfo, autocommit=True)
            terminal.step(f"sale {sequence}")
            with connection.transaction():
                in_transaction = True  # BEGIN answered: the terminal holds a server connection
                connection.execute(
                    "INSERT INTO public.sales (till, seq, amount) VALUES (%s, %s, %s)",
                    (terminal.number, sequence, sequence * 100 + terminal.number),
                )
            terminal.committed.append(sequence)
            terminal.succeeded_at.append(time.monotonic())
        except psycopg.Error as exc:
            terminal.step(f"after sale {sequence} failed")
            clean = _is_clean(exc, in_transaction=in_transaction)
            (terminal.clean_errors if clean else terminal.unclean_errors).append(f"{exc.sqlstate}: {exc}")
            if connection is not None:
                connection.close()
            connection = None
            time.sleep(0.05)
        terminal.slowest = max(terminal.slowest, time.monotonic() - started)
        terminal.step("between sales")
        time.sleep(0.01)
    terminal.step("closing")
    if connection is not None:
        connection.close()
    terminal.step("done")


def _start_proxy(start_proxy: StartProxy, cluster: OwnCluster, **overrides: object) -> ProxyProcess:
    return start_proxy(
        routes={
            "pos": cluster.route(
                mode="transaction",
                size=4,
                max_client_wait=f"{MAX_CLIENT_WAIT:g}s",
                connect_timeout=f"{CONNECT_TIMEOUT:g}s",
                connect_retry_delay="100ms",
                connect_retry_max_delay="1s",
            )
        },
        **overrides,
    )


def _metric(port: int, sample: str) -> float | None:
    for line in _call(port, "/metrics")[1].decode().splitlines():
        if line.startswith(sample + " "):
            return float(line.split()[-1])
    return None


def _wait_for(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"{what} not reached within {timeout}s"
        time.sleep(0.1)


def test_terminals_ride_out_a_database_restart_with_clean_errors_and_no_lost_sales(
    start_proxy: StartProxy, terminal_pki: TerminalPKI, own_cluster: OwnCluster
) -> None:
    server = own_cluster.server
    server.execute_script(
        "CREATE TABLE public.sales (till int, seq int, amount int NOT NULL, PRIMARY KEY (till, seq));"
        "ALTER TABLE public.sales OWNER TO pos_proxy;",
        dbname="pos",
    )
    proxy = _start_proxy(start_proxy, own_cluster)
    conninfo = proxy.conninfo(terminal_pki.cashier, terminal_pki.ca)
    terminals = [Terminal(number) for number in range(6)]
    load_seconds = 16.0
    until = time.monotonic() + load_seconds
    threads = [threading.Thread(target=_work, args=(t, conninfo, until), daemon=True) for t in terminals]
    for thread in threads:
        thread.start()

    time.sleep(3)
    server.stop_server_only(mode="fast")
    time.sleep(3)
    server.start_server_only()
    restarted = time.monotonic()

    # One deadline for all: a terminal may finish its last sale up to OPERATION_BOUND late.
    deadline = until + OPERATION_BOUND
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()))
    hung = [
        f"till {t.number}: {t.doing} for {time.monotonic() - t.since:.1f}s"
        for t, thread in zip(terminals, threads, strict=True)
        if thread.is_alive()
    ]
    assert not hung, f"terminals hung: {hung}"
    for terminal in terminals:
        assert not terminal.unclean_errors, terminal.unclean_errors
        assert terminal.slowest < OPERATION_BOUND, f"till {terminal.number} waited {terminal.slowest:.1f}s"
        # The pool recovered by itself: every till sold again after the restart.
        assert any(moment > restarted for moment in terminal.succeeded_at), terminal
    assert sum(len(t.committed) for t in terminals) > 6 * 10
    with psycopg.connect(**conninfo, autocommit=True) as check:
        rows = check.execute("SELECT till, seq, amount FROM public.sales").fetchall()
    stored = {(till, seq): amount for till, seq, amount in rows}
    for terminal in terminals:
        for seq in terminal.committed:
            assert stored.get((terminal.number, seq)) == seq * 100 + terminal.number
    # upstream_down and upstream_up once per transition, not once per failed attempt: they alternate,
    # and the outage is one (two if a connect squeezed in as the server began to shut down).
    transitions = [
        record["event"]
        for record in proxy.log_events()
        if record.get("event") in ("upstream_down", "upstream_up")
    ]
    assert transitions in (["upstream_down", "upstream_up"], ["upstream_down", "upstream_up"] * 2)
    failed_attempts = [r for r in proxy.log_events() if r.get("event") == "server_connect_failed"]
    assert len(failed_attempts) > len(transitions)


def test_a_terminal_connecting_while_the_database_is_down_is_served_when_it_returns(
    start_proxy: StartProxy, terminal_pki: TerminalPKI, own_cluster: OwnCluster
) -> None:
    server = own_cluster.server
    token_file = own_cluster.password_file.with_name("admin-token")
    token_file.write_text(TOKEN + "\n", encoding="utf-8")
    admin_port = free_port()
    proxy = _start_proxy(
        start_proxy,
        own_cluster,
        admin={"host": "127.0.0.1", "port": admin_port, "token": {"file": str(token_file)}},
    )
    proxy.wait_for_event("admin_listening")
    assert _call(admin_port, "/readyz")[0] == 200
    assert _metric(admin_port, 'pos_proxy_upstream_up{route="pos"}') == 1.0

    server.stop_server_only(mode="fast")
    outcome: dict[str, object] = {}

    def terminal() -> None:
        started = time.monotonic()
        try:
            with psycopg.connect(**proxy.conninfo(terminal_pki.cashier, terminal_pki.ca)) as connection:
                outcome["row"] = connection.execute("SELECT 'served'").fetchone()
        except psycopg.Error as exc:
            outcome["error"] = str(exc)
        outcome["took"] = time.monotonic() - started

    waiting = threading.Thread(target=terminal, daemon=True)
    waiting.start()
    proxy.wait_for_event("upstream_down", pool="pos")
    # readyz turns unready at once (the pool's breaker), and says which route.
    status, body = _call(admin_port, "/readyz")
    assert status == 503
    assert json.loads(body)["routes"] == {"pos": "unreachable"}
    assert _metric(admin_port, 'pos_proxy_upstream_up{route="pos"}') == 0.0
    pools = json.loads(_call(admin_port, "/v1/pools")[1])["pools"]
    assert pools[0]["upstream_up"] is False
    assert pools[0]["waiting"] == 1

    time.sleep(1.5)
    server.start_server_only()
    waiting.join(MAX_CLIENT_WAIT + 5)
    assert not waiting.is_alive()
    assert outcome.get("row") == ("served",), outcome
    assert 1.5 <= float(outcome["took"]) < MAX_CLIENT_WAIT + 2  # type: ignore[arg-type]
    _wait_for(lambda: _call(admin_port, "/readyz")[0] == 200, 5, "readyz ready again")
    assert json.loads(_call(admin_port, "/readyz")[1])["routes"] == {"pos": "reachable"}
    assert _metric(admin_port, 'pos_proxy_upstream_up{route="pos"}') == 1.0
    assert _metric(admin_port, 'pos_proxy_upstream_down_total{route="pos"}') == 1.0
    errors = _metric(admin_port, 'pos_proxy_server_connection_errors_total{route="pos"}')
    assert errors is not None and errors >= 2  # retried


@pytest.mark.parametrize("pool_has_a_connection", [True, False], ids=["after-a-sale", "untouched-pool"])
def test_a_quiet_outage_turns_readyz_and_upstream_up_together(
    start_proxy: StartProxy, terminal_pki: TerminalPKI, own_cluster: OwnCluster, pool_has_a_connection: bool
) -> None:
    # Nobody asks for a server connection while the database is down: no connect fails, so only a
    # probe of the idle pool can notice. The metric is read first and alone: reading /readyz would
    # probe by itself and hide a metric that does not follow. After a sale the pool's connection
    # goes with the server and the next tick probes; an untouched pool probes every few seconds.
    server = own_cluster.server
    token_file = own_cluster.password_file.with_name("admin-token")
    token_file.write_text(TOKEN + "\n", encoding="utf-8")
    admin_port = free_port()
    proxy = start_proxy(
        routes={
            "pos": own_cluster.route(
                mode="transaction", size=2, connect_timeout="1s", connect_retry_max_delay="1s"
            )
        },
        admin={"host": "127.0.0.1", "port": admin_port, "token": {"file": str(token_file)}},
    )
    proxy.wait_for_event("admin_listening")
    up = 'pos_proxy_upstream_up{route="pos"}'
    if pool_has_a_connection:
        with psycopg.connect(
            **proxy.conninfo(terminal_pki.cashier, terminal_pki.ca), autocommit=True
        ) as till:
            assert till.execute("SELECT 'sold'").fetchone() == ("sold",)
    assert _metric(admin_port, up) == 1.0
    assert _call(admin_port, "/readyz")[0] == 200
    assert json.loads(_call(admin_port, "/v1/pools")[1])["pools"][0]["idle"] == int(pool_has_a_connection)

    server.stop_server_only(mode="fast")
    stopped = time.monotonic()
    # The pool's connection goes with the server; then a probe each couple of seconds.
    _wait_for(lambda: _metric(admin_port, up) == 0.0, QUIET_OUTAGE_BOUND, "upstream_up 0 without a client")
    noticed = time.monotonic() - stopped
    status, body = _call(admin_port, "/readyz")
    assert status == 503
    assert json.loads(body)["routes"] == {"pos": "unreachable"}
    assert _metric(admin_port, up) == 0.0
    assert _metric(admin_port, 'pos_proxy_upstream_down_total{route="pos"}') == 1.0
    proxy.wait_for_event("upstream_down", pool="pos")

    server.start_server_only()
    started = time.monotonic()
    _wait_for(lambda: _metric(admin_port, up) == 1.0, QUIET_OUTAGE_BOUND, "upstream_up 1 again")
    recovered = time.monotonic() - started
    status, body = _call(admin_port, "/readyz")
    assert status == 200, body
    assert json.loads(body)["routes"] == {"pos": "reachable"}
    with psycopg.connect(**proxy.conninfo(terminal_pki.cashier, terminal_pki.ca), autocommit=True) as till:
        assert till.execute("SELECT 'sold again'").fetchone() == ("sold again",)
    print(f"quiet outage noticed in {noticed:.1f}s, recovery in {recovered:.1f}s")


def test_a_failed_certificate_check_is_not_retried(
    start_proxy: StartProxy, terminal_pki: TerminalPKI, own_cluster: OwnCluster
) -> None:
    # The terminal CA did not sign the database's certificate: verify-full fails; retrying cannot help.
    route = own_cluster.route(max_client_wait="10s", connect_timeout="1s")
    route["sslrootcert"] = str(terminal_pki.ca)
    proxy = start_proxy(routes={"pos": route})
    started = time.monotonic()
    with pytest.raises(psycopg.OperationalError, match="could not connect to the database server"):
        psycopg.connect(**proxy.conninfo(terminal_pki.cashier, terminal_pki.ca)).close()
    assert time.monotonic() - started < 5  # fails fast, not after max_client_wait
    events = [record["event"] for record in proxy.log_events()]
    assert "upstream_down" not in events


@dataclass(frozen=True, slots=True)
class TcpSocket:
    """One established IPv4 socket as /proc/net/tcp shows it."""

    local_port: int
    remote_port: int
    unread: int  # bytes received that the owner has not read yet (rx_queue)
    timer: tuple[int, int]  # (kind, USER_HZ ticks until it fires: 100 a second)


def _established_sockets(*, local_port: int | None = None, remote_port: int | None = None) -> list[TcpSocket]:
    """The established IPv4 sockets on these ports, from /proc/net/tcp."""
    found: list[TcpSocket] = []
    for line in Path("/proc/net/tcp").read_text(encoding="ascii").splitlines()[1:]:
        fields = line.split()
        local, remote, state, queues, timer = fields[1], fields[2], fields[3], fields[4], fields[5]
        if state != "01":  # ESTABLISHED
            continue
        found_local, found_remote = int(local.split(":")[1], 16), int(remote.split(":")[1], 16)
        if local_port is not None and found_local != local_port:
            continue
        if remote_port is not None and found_remote != remote_port:
            continue
        kind, when = timer.split(":")
        unread = int(queues.split(":")[1], 16)
        found.append(TcpSocket(found_local, found_remote, unread, (int(kind, 16), int(when, 16))))
    return found


def _keepalive_timers(*, local_port: int | None = None, remote_port: int | None = None) -> list[float]:
    """Seconds until the next keepalive probe of each established IPv4 socket on these ports
    (timer kind 2 is keepalive)."""
    return [
        sock.timer[1] / 100
        for sock in _established_sockets(local_port=local_port, remote_port=remote_port)
        if sock.timer[0] == 2
    ]


@pytest.mark.skipif(not Path("/proc/net/tcp").exists(), reason="needs Linux /proc/net/tcp")
def test_terminal_and_server_connections_use_the_configured_keepalive_intervals(
    start_proxy: StartProxy, terminal_pki: TerminalPKI, own_cluster: OwnCluster
) -> None:
    route = own_cluster.route(tcp_keepalive={"idle": "50s", "interval": "5s", "count": 3})
    proxy = start_proxy(listen={"tcp_keepalive": {"idle": "40s"}}, routes={"pos": route})
    with psycopg.connect(**proxy.conninfo(terminal_pki.cashier, terminal_pki.ca), autocommit=True) as till:
        till.execute("SELECT 1")
        # Until the client acknowledges the reply, the socket shows a retransmit timer instead.
        _wait_for(
            lambda: bool(
                _keepalive_timers(local_port=proxy.port)
                and _keepalive_timers(remote_port=own_cluster.server.port)
            ),
            5,
            "idle sockets on both sides",
        )
        # The kernel's default would be 7200 s; ours count down from 40 s and 50 s.
        terminal_side = _keepalive_timers(local_port=proxy.port)
        server_side = _keepalive_timers(remote_port=own_cluster.server.port)
    assert terminal_side and all(30 < seconds <= 40 for seconds in terminal_side), terminal_side
    assert server_side and all(40 < seconds <= 50 for seconds in server_side), server_side


def test_a_server_fatal_reaches_the_terminal_once_and_alone(
    start_proxy: StartProxy, terminal_pki: TerminalPKI, pg_cluster: Any
) -> None:
    # PostgreSQL ends a backend with FATAL 57P01 (pg_terminate_backend, or every backend on a fast
    # shutdown). The terminal must see that error and then the end of the connection: a second FATAL
    # from the proxy after it reads to libpq as "received 2 results from command 'BEGIN'".
    proxy = start_proxy(routes={"pos": {"pool": {"mode": "session"}}})
    with raw_session(proxy, terminal_pki, terminal_pki.cashier) as client:
        rows = [payload for kind, payload in run_query(client, "SELECT pg_backend_pid()") if kind == b"D"]
        backend_pid = int(data_row_values(rows[0])[0] or b"0")
        with psycopg.connect(
            **pg_cluster.connect_kwargs(user="postgres", dbname="pos"), autocommit=True
        ) as admin:
            admin.execute("SELECT pg_terminate_backend(%s)", (backend_pid,))
        fields = client.expect_fatal("57P01")
    assert "terminating connection" in fields["M"]
    proxy.wait_for_event("session_error", sqlstate="08006")


@pytest.mark.skipif(not Path("/proc/net/tcp").exists(), reason="needs Linux /proc/net/tcp")
def test_a_server_fatal_with_a_reset_right_behind_it_still_ends_the_terminals_session(
    start_proxy: StartProxy, terminal_pki: TerminalPKI, pg_cluster: Any
) -> None:
    # A backend that ends (pg_terminate_backend, a fast shutdown) while the terminal's next message
    # waits unread in its socket closes with a reset right behind its FATAL. When both are there
    # before the proxy looks (its event loop busy; stopped here), uvloop reports the reset to the
    # TLS layer once, and then no more: a reader that stopped after the FATAL never learnt that the
    # connection was gone, and the terminal waited for its end for ever, holding a pool slot.
    proxy = start_proxy(routes={"pos": {"pool": {"mode": "session", "size": 1, "max_client_wait": "3s"}}})
    with raw_session(proxy, terminal_pki, terminal_pki.cashier) as client:
        rows = [payload for kind, payload in run_query(client, "SELECT pg_backend_pid()") if kind == b"D"]
        backend_pid = int(data_row_values(rows[0])[0] or b"0")
        with psycopg.connect(
            **pg_cluster.connect_kwargs(user="postgres", dbname="pos"), autocommit=True
        ) as admin:
            client.send(m.build_query("SELECT pg_sleep(60)"))
            _wait_for(
                lambda: (
                    admin.execute(
                        "SELECT wait_event FROM pg_stat_activity WHERE pid = %s", (backend_pid,)
                    ).fetchone()
                    == ("PgSleep",)
                ),
                10,
                "the backend asleep",
            )
            # Sent apart, so that the backend has not read it into its own buffer with the first.
            client.send(m.build_query("SELECT 'next sale'"))
            _wait_for(
                lambda: any(sock.unread for sock in _established_sockets(local_port=pg_cluster.port)),
                10,
                "the next query unread in the backend's socket",
            )
            (backend_socket,) = [
                sock for sock in _established_sockets(local_port=pg_cluster.port) if sock.unread
            ]
            proxy.signal(signal.SIGSTOP)
            try:
                admin.execute("SELECT pg_terminate_backend(%s)", (backend_pid,))
                _wait_for(
                    lambda: (
                        not _established_sockets(
                            local_port=pg_cluster.port, remote_port=backend_socket.remote_port
                        )
                    ),
                    10,
                    "the backend's socket closed",
                )
            finally:
                proxy.signal(signal.SIGCONT)
        assert client.read_message()[0] == b"T"  # pg_sleep's RowDescription, flushed with the FATAL
        fields = client.expect_fatal("57P01")  # and then the end of the connection, within IO_TIMEOUT
    assert "terminating connection" in fields["M"]
    proxy.wait_for_event("session_error", sqlstate="08006")
    # The server connection was dropped, not kept: the pool's only slot serves the next terminal.
    with raw_session(proxy, terminal_pki, terminal_pki.cashier) as client:
        rows = [payload for kind, payload in run_query(client, "SELECT 'served'") if kind == b"D"]
        assert data_row_values(rows[0]) == [b"served"]


def test_a_backend_ended_between_transactions_costs_the_terminal_nothing(
    start_proxy: StartProxy, terminal_pki: TerminalPKI, pg_cluster: Any
) -> None:
    # Under transaction pooling the terminal holds no server connection between transactions: a
    # backend that ends then (pg_terminate_backend here, a fast shutdown in production) is the
    # pool's loss, and the terminal's next statement runs on another connection without an error.
    proxy = start_proxy(routes={"pos": {"pool": {"mode": "transaction", "size": 1}}})
    with psycopg.connect(**proxy.conninfo(terminal_pki.cashier, terminal_pki.ca), autocommit=True) as till:
        first = till.execute("SELECT pg_backend_pid()").fetchone()
        assert first is not None
        with psycopg.connect(
            **pg_cluster.connect_kwargs(user="postgres", dbname="pos"), autocommit=True
        ) as admin:
            admin.execute("SELECT pg_terminate_backend(%s)", first)
            _wait_for(
                lambda: (
                    admin.execute("SELECT count(*) FROM pg_stat_activity WHERE pid = %s", first).fetchone()
                    == (0,)
                ),
                10,
                "the terminated backend gone",
            )
        second = till.execute("SELECT pg_backend_pid()").fetchone()
    assert second is not None and second != first
