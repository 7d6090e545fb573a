"""A write ledger for fault tests: tills insert sales with ids of their own through the proxy, note
what they believe became of each one (committed, failed, unknown), and the ledger then holds that
against the table, read straight from the database: no committed sale lost, none written twice,
none that failed written after all, and every unknown one settled by the read-back.

The tills are real drivers (asyncpg, psycopg) doing what a till does: a transaction of a few
inserts, a COPY of a batch, single autocommit inserts with think time between them; each runs in
a thread of its own until told to stop, and says what it is doing, so that a hang names itself.
A fault test starts a fleet, breaks something, repairs it, and asks `FaultRun.assert_sound()`.
"""

from __future__ import annotations

import asyncio
import enum
import threading
import time
import uuid
from collections import defaultdict
from collections.abc import Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import asyncpg
import psycopg

from proxy.localpg import LocalPostgres
from tests.integration.proxyproc import ProxyProcess, Terminal, TerminalPKI
from tests.integration.test_upstream_resilience import (
    CLEAN_CONNECT_MESSAGES,
    CLEAN_SQLSTATES,
    IDLE_IN_TRANSACTION_LOSS,
)

SALES_TABLE = "public.ledger_sales"
# No unique constraint on sale_id: a sale written twice must show as two rows, not as an error
# that a till could take for a failure.
CREATE_SALES_TABLE = (
    f"CREATE TABLE {SALES_TABLE} (sale_id text NOT NULL, till text NOT NULL, amount int NOT NULL);"
    f"ALTER TABLE {SALES_TABLE} OWNER TO pos_proxy;"
)
INSERT_SALE = f"INSERT INTO {SALES_TABLE} (sale_id, till, amount) VALUES ($1, $2, $3)"
INSERT_SALE_PSYCOPG = f"INSERT INTO {SALES_TABLE} (sale_id, till, amount) VALUES (%s, %s, %s)"
COPY_SALES = f"COPY {SALES_TABLE} (sale_id, till, amount) FROM STDIN"
# What a transaction till leaves behind in each new session (with a SET): it must never reach
# another terminal through the pool.
CREATE_SCRATCH_TABLE = "CREATE TEMP TABLE ledger_scratch (n int)"

# Clean ends of a till's work while its database fails, beyond those of a restart
# (test_upstream_resilience): asyncpg's own word for a connection lost under it.
CLEAN_LEDGER_SQLSTATES = CLEAN_SQLSTATES | {"08003"}
CONNECTION_LOSS_MESSAGES = (
    *CLEAN_CONNECT_MESSAGES,
    IDLE_IN_TRANSACTION_LOSS,
    "server closed the connection unexpectedly",
    "connection was closed in the middle of operation",
    "consuming input failed",
    "sending query failed",
    "the connection is lost",
    "the connection is closed",
    "connection is closed",
)

# The windows a fault can hit: inside a transaction, inside a COPY, between two sales.
IN_TRANSACTION_PAUSE = 0.08
COPY_ROW_PAUSE = 0.03
THINK_TIME = 0.15
RETRY_PAUSE = 0.1
# How soon after a FATAL the connection must be seen closed: the proxy ends it right behind.
CLOSE_AFTER_FATAL = 1.0


class Outcome(enum.Enum):
    COMMITTED = "committed"  # the server acknowledged the commit
    FAILED = "failed"  # an error before the commit was asked for: the server cannot have kept it
    UNKNOWN = "unknown"  # the commit was asked for and its answer never came


@dataclass(frozen=True, slots=True)
class Sale:
    sale_id: str
    till: str
    amount: int


@dataclass(frozen=True, slots=True)
class Failure:
    """One error a till saw: what it was doing, what it got, how long it waited for it."""

    till: str
    doing: str
    sqlstate: str | None
    error: str
    took: float
    clean: bool


@dataclass(frozen=True, slots=True)
class LedgerReport:
    committed: int
    failed: int
    unknown: int
    lost: tuple[str, ...]  # committed, not in the table
    doubled: tuple[str, ...]  # in the table more than once
    failed_but_stored: tuple[str, ...]  # failed before its commit, yet in the table
    altered: tuple[str, ...]  # in the table with another till or amount than sent
    strangers: tuple[str, ...]  # in the table, never sent by a till
    unknown_stored: int  # unknown, settled by the read-back: committed
    unknown_absent: int  # unknown, settled by the read-back: not committed

    def assert_sound(self) -> None:
        problems = {
            "lost commits": self.lost,
            "doubled writes": self.doubled,
            "failed sales stored": self.failed_but_stored,
            "altered sales": self.altered,
            "sales nobody sent": self.strangers,
        }
        found = {name: ids[:5] for name, ids in problems.items() if ids}
        assert not found, f"{found} ({self})"

    def summary(self) -> str:
        return (
            f"{self.committed} committed, {self.failed} failed, {self.unknown} unknown "
            f"({self.unknown_stored} stored, {self.unknown_absent} absent); "
            f"lost {len(self.lost)}, doubled {len(self.doubled)}"
        )


class Ledger:
    """What the tills believe; thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._sent: dict[str, Sale] = {}
        self._outcomes: dict[str, Outcome] = {}
        self.failures: list[Failure] = []

    def new_sale(self, till: str) -> Sale:
        with self._lock:
            sale = Sale(f"{till}-{uuid.uuid4().hex}", till, len(self._sent) + 1)
            self._sent[sale.sale_id] = sale
        return sale

    def note(self, sales: Sequence[Sale], outcome: Outcome) -> None:
        with self._lock:
            for sale in sales:
                assert sale.sale_id not in self._outcomes, f"{sale} noted twice"
                self._outcomes[sale.sale_id] = outcome

    def note_failure(self, failure: Failure) -> None:
        with self._lock:
            self.failures.append(failure)

    def count(self, outcome: Outcome) -> int:
        with self._lock:
            return sum(1 for noted in self._outcomes.values() if noted is outcome)

    def check(self, stored: Mapping[str, Sequence[tuple[str, int]]]) -> LedgerReport:
        """Hold the ledger against the table's rows (sale_id -> [(till, amount)] per row)."""
        with self._lock:
            outcomes = dict(self._outcomes)
            sent = dict(self._sent)
        unnoted = [sale_id for sale_id in sent if sale_id not in outcomes]
        assert not unnoted, f"sales sent but never noted (a till did not finish?): {unnoted[:5]}"

        def stored_as(wanted: Outcome) -> list[str]:
            return [sale_id for sale_id, noted in outcomes.items() if noted is wanted]

        unknown = stored_as(Outcome.UNKNOWN)
        return LedgerReport(
            committed=len(stored_as(Outcome.COMMITTED)),
            failed=len(stored_as(Outcome.FAILED)),
            unknown=len(unknown),
            lost=tuple(sale_id for sale_id in stored_as(Outcome.COMMITTED) if sale_id not in stored),
            doubled=tuple(sale_id for sale_id, rows in stored.items() if len(rows) > 1),
            failed_but_stored=tuple(sale_id for sale_id in stored_as(Outcome.FAILED) if sale_id in stored),
            altered=tuple(
                sale_id
                for sale_id, rows in stored.items()
                if sale_id in sent and any(row != (sent[sale_id].till, sent[sale_id].amount) for row in rows)
            ),
            strangers=tuple(sale_id for sale_id in stored if sale_id not in sent),
            unknown_stored=sum(1 for sale_id in unknown if sale_id in stored),
            unknown_absent=sum(1 for sale_id in unknown if sale_id not in stored),
        )


def stored_sales(server: LocalPostgres) -> dict[str, list[tuple[str, int]]]:
    """The read-back: every row of the sales table, straight from the database (not the proxy)."""
    rows: dict[str, list[tuple[str, int]]] = defaultdict(list)
    for line in server.psql(f"SELECT sale_id, till, amount FROM {SALES_TABLE}", dbname="pos").splitlines():
        if line:
            sale_id, till, amount = line.split("|")
            rows[sale_id].append((till, int(amount)))
    return dict(rows)


def is_clean_error(sqlstate: str | None, message: str) -> bool:
    """A clean failure: an error PostgreSQL or the proxy means for a lost or unavailable server,
    or the driver's own word for a connection that went away. Anything else (a protocol
    desync, an aborted or leftover transaction, an internal error, a timeout) is not."""
    if sqlstate is not None:
        return sqlstate in CLEAN_LEDGER_SQLSTATES
    return any(phrase in message for phrase in CONNECTION_LOSS_MESSAGES)


@dataclass(frozen=True, slots=True)
class Target:
    """Where the tills connect: the proxy, as one terminal (mutual TLS), the PKI's cashier unless
    ``terminal`` names another."""

    proxy: ProxyProcess
    pki: TerminalPKI
    connect_timeout: float
    terminal: Terminal | None = None
    # A relay's loopback port in front of the proxy (tests/integration/relay.py), if not the proxy's.
    relay_port: int | None = None

    @property
    def identity(self) -> Terminal:
        return self.terminal or self.pki.cashier

    @property
    def address(self) -> tuple[str, int]:
        if self.relay_port is not None:
            return "127.0.0.1", self.relay_port
        return self.proxy.host, self.proxy.port

    def psycopg_conninfo(self) -> dict[str, Any]:
        host, port = self.address
        return self.proxy.conninfo(
            self.identity,
            self.pki.ca,
            connect_timeout=str(max(1, round(self.connect_timeout))),
            host=host,
            port=str(port),
        )

    def asyncpg_kwargs(self) -> dict[str, Any]:
        host, port = self.address
        return {
            "host": host,
            "port": port,
            "user": self.identity.terminal,
            "database": "pos",
            "ssl": self.proxy.ssl_context(self.identity, self.pki.ca),
            "timeout": self.connect_timeout,
        }


@dataclass
class Till:
    """One client of the fleet; its thread updates the fields, the test reads them."""

    name: str
    kind: str
    committed_at: list[float] = field(default_factory=list)
    slowest: float = 0.0
    doing: str = "starting"
    since: float = field(default_factory=time.monotonic)

    def step(self, doing: str) -> None:
        self.doing, self.since = doing, time.monotonic()


@dataclass
class _Attempt:
    """One sale attempt: which sales it carries and how far it got."""

    till: Till
    ledger: Ledger
    sales: list[Sale]
    started: float = field(default_factory=time.monotonic)
    stage: str = "connecting"
    # From this stage on an error leaves the outcome unknown: the commit may have happened.
    committing: bool = False

    def at(self, stage: str, *, committing: bool = False) -> None:
        self.stage, self.committing = stage, committing
        self.till.step(stage)

    def committed(self) -> None:
        self.ledger.note(self.sales, Outcome.COMMITTED)
        self.till.committed_at.append(time.monotonic())
        self._finish()

    def failed(self, sqlstate: str | None, message: str, *, clean: bool | None = None) -> None:
        self.ledger.note(self.sales, Outcome.UNKNOWN if self.committing else Outcome.FAILED)
        took = time.monotonic() - self.started
        if clean is None:
            clean = is_clean_error(sqlstate, message)
        self.ledger.note_failure(Failure(self.till.name, self.stage, sqlstate, message, took, clean))
        self._finish()

    def _finish(self) -> None:
        self.till.slowest = max(self.till.slowest, time.monotonic() - self.started)
        self.till.step("between sales")


def _psycopg_failure(attempt: _Attempt, exc: psycopg.Error) -> None:
    attempt.failed(exc.sqlstate, f"{type(exc).__name__}: {exc}")


# One attempt on an open connection: it raises psycopg.Error when the connection broke under it.
PsycopgSale = Callable[[psycopg.Connection[Any], _Attempt], None]


def _psycopg_till(
    till: Till,
    ledger: Ledger,
    target: Target,
    stop: threading.Event,
    *,
    sales: int,
    sell: PsycopgSale,
    on_connect: Callable[[psycopg.Connection[Any]], None] | None = None,
) -> None:
    """A psycopg till: ``sell`` attempts of ``sales`` sales each until ``stop``, on one autocommit
    connection, opened again (then ``on_connect``) after whatever broke the last one."""
    connection: psycopg.Connection[Any] | None = None
    while not stop.is_set():
        attempt = _Attempt(till, ledger, [ledger.new_sale(till.name) for _ in range(sales)])
        try:
            if connection is None or connection.closed:
                connection = psycopg.connect(**target.psycopg_conninfo(), autocommit=True)
                if on_connect is not None:
                    on_connect(connection)
            sell(connection, attempt)
        except psycopg.Error as exc:
            _psycopg_failure(attempt, exc)
            if connection is not None:
                connection.close()
            connection = None
            time.sleep(RETRY_PAUSE)
    if connection is not None:
        connection.close()


def _psycopg_transactions(till: Till, ledger: Ledger, target: Target, stop: threading.Event) -> None:
    """BEGIN, two inserts with a pause between, COMMIT. Each new session also leaves state behind
    (a setting, a temporary table) that must never reach another terminal."""

    def leave_state(connection: psycopg.Connection[Any]) -> None:
        connection.execute(f"SET ledger.till = '{till.name}'")
        connection.execute(CREATE_SCRATCH_TABLE)

    def sell(connection: psycopg.Connection[Any], attempt: _Attempt) -> None:
        attempt.at("in transaction")
        connection.execute("BEGIN")
        for sale in attempt.sales:
            connection.execute(INSERT_SALE_PSYCOPG, (sale.sale_id, sale.till, sale.amount))
            time.sleep(IN_TRANSACTION_PAUSE)
        attempt.at("committing", committing=True)
        status = connection.execute("COMMIT").statusmessage
        if status != "COMMIT":  # a transaction that failed unseen answers COMMIT with ROLLBACK
            attempt.committing = False
            attempt.failed(None, f"COMMIT answered {status}", clean=False)
            return
        attempt.committed()

    _psycopg_till(till, ledger, target, stop, sales=2, sell=sell, on_connect=leave_state)


def _psycopg_copies(till: Till, ledger: Ledger, target: Target, stop: threading.Event) -> None:
    """COPY a batch of five sales, one row at a time with a pause: a fault can land mid-COPY."""

    def sell(connection: psycopg.Connection[Any], attempt: _Attempt) -> None:
        attempt.at("copying")
        with connection.cursor() as cursor:
            with cursor.copy(COPY_SALES) as copy:
                for sale in attempt.sales:
                    copy.write_row((sale.sale_id, sale.till, sale.amount))
                    time.sleep(COPY_ROW_PAUSE)
                # Leaving the block sends CopyDone and waits for the server's answer.
                attempt.at("ending the copy", committing=True)
            copied = cursor.rowcount
        if copied != len(attempt.sales):
            attempt.failed(None, f"COPY answered {copied} rows", clean=False)
            return
        attempt.committed()
        time.sleep(THINK_TIME / 3)

    _psycopg_till(till, ledger, target, stop, sales=5, sell=sell)


def _psycopg_single_inserts(till: Till, ledger: Ledger, target: Target, stop: threading.Event) -> None:
    """One autocommit insert, then think time: mostly caught between transactions."""

    def sell(connection: psycopg.Connection[Any], attempt: _Attempt) -> None:
        (sale,) = attempt.sales
        attempt.at("inserting", committing=True)  # autocommit: the insert is its own commit
        connection.execute(INSERT_SALE_PSYCOPG, (sale.sale_id, sale.till, sale.amount))
        attempt.committed()
        time.sleep(THINK_TIME)

    _psycopg_till(till, ledger, target, stop, sales=1, sell=sell)


def _asyncpg_transactions(
    till: Till, ledger: Ledger, target: Target, stop: threading.Event, operation_bound: float
) -> None:
    """asyncpg's transaction API with prepared inserts (named statements through the proxy)."""

    async def bounded(operation: Coroutine[Any, Any, Any]) -> Any:
        return await asyncio.wait_for(operation, operation_bound)

    async def sell() -> None:
        connection: asyncpg.Connection | None = None
        while not stop.is_set():
            attempt = _Attempt(till, ledger, [ledger.new_sale(till.name) for _ in range(2)])
            try:
                if connection is None or connection.is_closed():
                    connection = await bounded(asyncpg.connect(**target.asyncpg_kwargs()))
                transaction = connection.transaction()
                attempt.at("in transaction")
                await bounded(transaction.start())
                for sale in attempt.sales:
                    await bounded(connection.execute(INSERT_SALE, sale.sale_id, sale.till, sale.amount))
                    await asyncio.sleep(IN_TRANSACTION_PAUSE)
                attempt.at("committing", committing=True)
                await bounded(transaction.commit())
                attempt.committed()
            except asyncpg.InternalClientError as exc:
                # A FATAL that reaches asyncpg between two calls puts its protocol in an error
                # state until the close behind it arrives (direct to PostgreSQL too); a call in
                # that gap gets this, before anything is sent. Clean only if the close follows.
                closed = connection is not None and await _closes(connection, CLOSE_AFTER_FATAL)
                attempt.committing = False
                attempt.failed(None, f"InternalClientError: {exc} (closed after: {closed})", clean=closed)
                if connection is not None:
                    connection.terminate()
                connection = None
                await asyncio.sleep(RETRY_PAUSE)
            except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError, TimeoutError) as exc:
                sqlstate = getattr(exc, "sqlstate", None)
                if isinstance(exc, asyncpg.InterfaceError) and "connection is closed" in str(exc):
                    # asyncpg learnt of the loss before it sent anything: COMMIT never left.
                    attempt.committing = False
                if isinstance(exc, TimeoutError):  # the driver's or our bound: a hang, never clean
                    attempt.failed(None, f"TimeoutError: no answer while {attempt.stage}", clean=False)
                else:
                    attempt.failed(sqlstate, f"{type(exc).__name__}: {exc}")
                if connection is not None:
                    connection.terminate()
                connection = None
                await asyncio.sleep(RETRY_PAUSE)
        if connection is not None:
            await bounded(connection.close())

    asyncio.run(sell())


async def _closes(connection: asyncpg.Connection, within: float) -> bool:
    """Does asyncpg see this connection closed within ``within`` seconds?"""
    deadline = time.monotonic() + within
    while not connection.is_closed():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.02)
    return True


TillWork = Callable[[Till, Ledger, Target, threading.Event], None]


def _reporting_crashes(work: TillWork) -> TillWork:
    """A till that dies of an error nobody expected says so, instead of looking hung."""

    def run(till: Till, ledger: Ledger, target: Target, stop: threading.Event) -> None:
        try:
            work(till, ledger, target, stop)
        except BaseException as exc:
            till.step(f"crashed while {till.doing}: {type(exc).__name__}: {exc}")
            raise

    return run


@dataclass
class Fleet:
    """A handful of tills of every kind working through the proxy until stopped."""

    ledger: Ledger
    target: Target
    operation_bound: float
    tills: list[Till] = field(default_factory=list)
    _threads: list[threading.Thread] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)

    def start(self, *, asyncpg_tills: int = 2, name: str = "till") -> None:
        """Start a till of each psycopg kind and ``asyncpg_tills`` asyncpg ones, named ``name0``..."""
        kinds: list[tuple[str, TillWork]] = [
            ("psycopg-transaction", _psycopg_transactions),
            ("psycopg-copy", _psycopg_copies),
            ("psycopg-autocommit", _psycopg_single_inserts),
        ]
        kinds += [
            (
                "asyncpg-transaction",
                lambda till, ledger, target, stop: _asyncpg_transactions(
                    till, ledger, target, stop, self.operation_bound
                ),
            )
        ] * asyncpg_tills
        for number, (kind, work) in enumerate(kinds):
            till = Till(f"{name}{number}", kind)
            thread = threading.Thread(
                target=_reporting_crashes(work),
                args=(till, self.ledger, self.target, self._stop),
                name=till.name,
                daemon=True,
            )
            self.tills.append(till)
            self._threads.append(thread)
            thread.start()

    def committed_since(self, moment: float) -> bool:
        """Has every till committed a sale after this moment (the pool serves them all again)?"""
        return all(any(at > moment for at in till.committed_at) for till in self.tills)

    def wait_all_selling_since(self, moment: float, timeout: float, what: str) -> None:
        """Until every till has committed a sale after this moment; fails naming the ones that
        have not and what they are doing."""
        deadline = time.monotonic() + timeout
        while not self.committed_since(moment):
            if time.monotonic() > deadline:
                stuck = [
                    f"{till.name} ({till.kind}): {till.doing} for {time.monotonic() - till.since:.1f}s"
                    for till in self.tills
                    if not any(at > moment for at in till.committed_at)
                ]
                raise AssertionError(f"{what} not reached within {timeout:g}s: {stuck}")
            time.sleep(0.1)

    def stop(self) -> list[str]:
        """Stop and join every till within the operation bound; the hung or crashed ones, with
        what they were doing."""
        self._stop.set()
        deadline = time.monotonic() + self.operation_bound + 2
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        return [
            f"{till.name} ({till.kind}): {till.doing} for {time.monotonic() - till.since:.1f}s"
            for till, thread in zip(self.tills, self._threads, strict=True)
            if thread.is_alive() or till.doing.startswith("crashed")
        ]
