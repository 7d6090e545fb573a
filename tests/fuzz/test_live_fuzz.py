"""A live fuzzer: mutated recordings of real driver sessions against a running proxy.

Recordings of psql, psycopg, asyncpg and pgjdbc sessions (tests/fuzz/capture.py), mutated by seed
(tests/fuzz/mutate.py, tests/fuzz/cases.py), go through TLS-authenticated sessions of a real proxy
in front of the real PostgreSQL 15, together with mutated pre-authentication traffic. After every
batch: the proxy still runs, serves a well-formed session of a real driver, has logged no internal
error or traceback, no PostgreSQL backend has died on a signal, and the proxy's resident memory is
under RSS_BOUND_MIB above what it used once warm; a session the case left open answers a probe.
At the end the pools hold no lent connection and their connections serve a clean session.

Bounded: ``POS_FUZZ_SECONDS`` of fuzzing (default 55, about 60 s for the whole module with the
recordings). ``POS_FUZZ_SEED`` fixes the run (the seed is printed on every failure and at the
end); ``POS_FUZZ_CASE=SEED:INDEX`` replays one case. See docs/testing.md.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import random
import re
import ssl
import struct
import time
import urllib.request
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import suppress
from pathlib import Path
from typing import Any

import asyncpg
import psycopg
import pytest

from proxy.protocols.postgres import messages as m
from tests.conftest import PgCluster, running_in_ci
from tests.fuzz.capture import IO_TIMEOUT, Capture, open_tls, record_driver_sessions
from tests.fuzz.cases import ROUTES, Case, build_case, replay_case
from tests.fuzz.conftest import ADMIN_TOKEN, POOL_SIZE, FuzzedProxy
from tests.integration.pgjdbc import PosTill, compile_pos_till, toolchain_missing
from tests.integration.proxyproc import ProxyProcess, TerminalPKI
from tests.logcheck import unhandled_errors

FUZZ_SECONDS = float(os.environ.get("POS_FUZZ_SECONDS", "55"))
BASE_SEED = os.environ.get("POS_FUZZ_SEED") or str(random.SystemRandom().randrange(2**32))
ONE_CASE = os.environ.get("POS_FUZZ_CASE")  # "SEED:INDEX"
CONCURRENCY = 6
BATCH = 36
# How long a case waits for more from the proxy once it has said all it will say; and at most.
QUIET = 0.3
CASE_CAP = 4.0
# Resident memory may grow this far past the warm proxy's. What may legitimately grow: the
# statement caches (policy.cache_bytes, 32 MiB by default, bounds each of the two text caches;
# mutated SQL fills them with distinct texts), up to CONCURRENCY sessions each buffering one
# partial message of up to listen.max_message_size (1 MiB here) on each side, and the allocator's
# slack. A leak per session or per case (about 2,000 cases a minute) outgrows it within minutes.
RSS_BOUND_MIB = 2 * 32 + CONCURRENCY * 2 * 1 + 40


# Whatever a well-framed stream left behind (an open transaction, a failed extended-protocol
# sequence, COPY IN, a wait for a pooled connection), this gets an answer or a close.
PROBE = m.build_message(b"S", b"") + m.build_query("SELECT 'fuzz-alive'")
# A wait for a pooled connection (max_client_wait, 10 s in the fuzz config) plus slack.
PROBE_TIMEOUT = 15.0
READY_FOR_QUERY_HEAD = b"Z\x00\x00\x00\x05"
BACKEND_KEY_DATA_HEAD = b"K\x00\x00\x00\x0c"


class CaseResult:
    __slots__ = ("closed", "hung", "probe_answer", "received")

    def __init__(self) -> None:
        self.received = bytearray()
        self.closed = False
        self.hung = False
        self.probe_answer = ""  # how the probe was answered: "value", "ready" or "closed"

    @property
    def outcome(self) -> str:
        if self.hung:
            return "hung"
        if self.probe_answer:
            return f"probe answered: {self.probe_answer}"
        return "closed by the proxy" if self.closed else "left waiting (not probed)"


async def _probe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, result: CaseResult) -> None:
    """Sync + Query after the case's stream: answered once the proxy closes, the query's value comes
    back, or a ReadyForQuery ends what came back; hung if none of that within PROBE_TIMEOUT."""
    writer.write(PROBE)
    await writer.drain()
    deadline = time.monotonic() + PROBE_TIMEOUT
    answer = bytearray()
    while (left := deadline - time.monotonic()) > 0:
        try:
            chunk = await asyncio.wait_for(reader.read(65536), min(QUIET, left))
        except TimeoutError:
            if answer[-6:-1] == READY_FOR_QUERY_HEAD:
                result.probe_answer = "ready"
                return
            continue
        if not chunk:
            result.closed = True
            result.probe_answer = "closed"
            return
        answer += chunk
        if b"fuzz-alive" in answer:
            result.probe_answer = "value"
            return
    result.hung = True


async def _read_until_quiet(
    reader: asyncio.StreamReader, result: CaseResult, deadline: float, *, until: bytes | None = None
) -> None:
    """Keep what arrives until the proxy closes, says nothing for QUIET seconds, or (with ``until``)
    sends those bytes."""
    while (left := deadline - time.monotonic()) > 0:
        if until is not None and until in result.received:
            return
        try:
            chunk = await asyncio.wait_for(reader.read(65536), min(QUIET, left))
        except TimeoutError:
            return
        if not chunk:
            result.closed = True
            return
        result.received += chunk[: max(0, 4096 - len(result.received))]


async def _cancel(case: Case, proxy: ProxyProcess, pki: TerminalPKI, received: bytes) -> None:
    """A CancelRequest with the key the case's session got (or the key with one bit off), in
    plaintext as libpq sends it or inside TLS, while the session's statements may still run."""
    at = received.find(BACKEND_KEY_DATA_HEAD)
    if at < 0 or len(received) < at + 13:
        return
    process_id, secret_key = struct.unpack_from("!ii", received, at + 5)
    request = m.build_cancel_request(process_id, secret_key ^ (1 if case.cancel.endswith("-wrong") else 0))
    if case.cancel.startswith("tls"):
        reader, writer = await open_tls(proxy, pki, pki.cashier)
    else:
        reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", proxy.port), IO_TIMEOUT)
    try:
        writer.write(request)
        await writer.drain()
        await asyncio.wait_for(reader.read(1), IO_TIMEOUT)  # the proxy closes the connection
    finally:
        writer.close()


async def run_case(case: Case, proxy: ProxyProcess, pki: TerminalPKI) -> CaseResult:
    """Send one case; read what comes back until the proxy closes or goes quiet (bounded)."""
    result = CaseResult()
    deadline = time.monotonic() + CASE_CAP + (len(case.writes) * 0.002)
    reader, writer = await asyncio.wait_for(
        asyncio.open_connection("127.0.0.1", proxy.port, local_addr=(case.local_host, 0)), IO_TIMEOUT
    )
    cancelling: asyncio.Task[None] | None = None
    try:
        if case.preamble:
            writer.write(case.preamble)
            await writer.drain()
        if case.tls == "request":
            answer = await asyncio.wait_for(reader.read(1), IO_TIMEOUT)
            if answer != b"S":
                result.received += answer
                await _read_until_quiet(reader, result, deadline)
                return result
        if case.tls != "none":
            context = proxy.ssl_context(pki.cashier, pki.ca)
            if case.tls == "direct":
                context.set_alpn_protocols(["postgresql"])
            await asyncio.wait_for(writer.start_tls(context, server_hostname="127.0.0.1"), IO_TIMEOUT)
            position = 0
            for number, size in enumerate(case.writes):
                writer.write(case.stream[position : position + size])
                position += size
                if size == 1 and number < 64:
                    await asyncio.sleep(0.001)  # each byte its own read on the proxy's side
                else:
                    await writer.drain()
            if case.cancel:
                await _read_until_quiet(reader, result, deadline, until=BACKEND_KEY_DATA_HEAD)
                cancelling = asyncio.create_task(_cancel(case, proxy, pki, bytes(result.received)))
        await _read_until_quiet(reader, result, deadline)
        if case.probe and not result.closed:
            await _probe(reader, writer, result)
    except (ConnectionError, ssl.SSLError, TimeoutError, asyncio.IncompleteReadError):
        result.closed = True
    finally:
        if cancelling is not None:
            with suppress(ConnectionError, ssl.SSLError, TimeoutError):
                await asyncio.wait_for(cancelling, IO_TIMEOUT)
        if case.abort:
            writer.transport.abort()
        else:
            writer.close()
            with suppress(ConnectionError, ssl.SSLError, TimeoutError):
                await asyncio.wait_for(writer.wait_closed(), 1.0)
    return result


async def run_batch(
    cases: Sequence[Case], proxy: ProxyProcess, pki: TerminalPKI, outcomes: Counter[str]
) -> list[Case]:
    """Run ``cases``, CONCURRENCY at a time, counting their outcomes; returns those whose session
    hung (see _probe)."""
    limit = asyncio.Semaphore(CONCURRENCY)

    async def one(case: Case) -> CaseResult:
        async with limit:
            return await run_case(case, proxy, pki)

    results = await asyncio.gather(*(one(case) for case in cases))
    outcomes.update(result.outcome for result in results)
    return [case for case, result in zip(cases, results, strict=True) if result.hung]


async def well_formed_session(proxy: ProxyProcess, pki: TerminalPKI, driver: str, route: str) -> None:
    """A real driver's session through ``route``, which must answer within IO_TIMEOUT."""
    if driver == "asyncpg":
        context = proxy.ssl_context(pki.manager, pki.ca)
        connection = await asyncpg.connect(
            host="127.0.0.1",
            port=proxy.port,
            user="office-01",
            database=route,
            ssl=context,
            timeout=IO_TIMEOUT,
        )
        try:
            value = await asyncio.wait_for(connection.fetchval("SELECT $1::text", "healthy"), IO_TIMEOUT)
        finally:
            await connection.close(timeout=IO_TIMEOUT)
    else:
        async with await psycopg.AsyncConnection.connect(
            **proxy.conninfo(pki.manager, pki.ca, dbname=route), autocommit=True
        ) as connection:
            cursor = await asyncio.wait_for(connection.execute("SELECT %s::text", ("healthy",)), IO_TIMEOUT)
            value = (await cursor.fetchone() or [None])[0]
    assert value == "healthy", value


def admin_pools(fuzzed: FuzzedProxy) -> dict[str, dict[str, Any]]:
    request = urllib.request.Request(f"http://127.0.0.1:{fuzzed.admin_port}/v1/pools")
    request.add_header("Authorization", f"Bearer {ADMIN_TOKEN}")
    with urllib.request.urlopen(request, timeout=IO_TIMEOUT) as response:
        return {pool["name"]: pool for pool in json.loads(response.read())["pools"]}


# What a pooled server connection looks like to a new terminal: no settings, statements, cursors,
# temporary tables, advisory locks or transaction left by anyone before it.
SESSION_STATE = """
SELECT current_setting('search_path'), current_setting('statement_timeout'),
       current_setting('application_name'), current_setting('client_encoding'),
       (SELECT count(*) FROM pg_prepared_statements WHERE name NOT LIKE 'pdp\\_%'),
       (SELECT count(*) FROM pg_cursors),
       (SELECT count(*) FROM pg_class WHERE relnamespace = pg_my_temp_schema()),
       (SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND pid = pg_backend_pid()),
       pg_current_xact_id_if_assigned() IS NULL,
       pg_backend_pid()
"""


# SESSION_STATE of a server connection the proxy opened (its application_name; the route's
# defaults) with nothing done on it yet.
CLEAN_STATE = ('"$user", public', "0", "pos-db-proxy", "UTF8", 0, 0, 0, 0, True)


async def pooled_states(proxy: ProxyProcess, pki: TerminalPKI, route: str) -> list[tuple[Any, ...]]:
    """SESSION_STATE from POOL_SIZE sessions at once, each inside a transaction, so that in either
    pooling mode each holds a server connection of its own: every pooled connection is seen. Two
    terminals share them: in transaction pooling one terminal may hold only half the pool."""
    connections = [
        await psycopg.AsyncConnection.connect(
            **proxy.conninfo((pki.manager, pki.cashier)[number % 2], pki.ca, dbname=route)
        )
        for number in range(POOL_SIZE)
    ]
    try:
        states = []
        for connection in connections:
            cursor = await asyncio.wait_for(connection.execute(SESSION_STATE), IO_TIMEOUT)
            states.append(tuple(await cursor.fetchone() or ()))
        return states
    finally:
        for connection in connections:
            await connection.close()


SERVER_CRASH = "was terminated by signal"


class Watch:
    """The checks after each batch, reading the proxy's log from where the last check stopped."""

    def __init__(self, fuzzed: FuzzedProxy, pki: TerminalPKI, server_log: Path) -> None:
        self.proxy = fuzzed.process
        self.pki = pki
        self.server_log = server_log
        self.server_log_offset = server_log.stat().st_size
        self.log_offset = 0
        self.warm_rss_kib = 0
        self.peak_rss_kib = 0
        self.checks = 0

    async def check(self, cases: Sequence[Case]) -> None:
        proxy = self.proxy
        listed = "\n".join(case.describe() for case in cases)
        where = f"after {len(cases)} cases (base seed {BASE_SEED}):\n{listed}"
        assert proxy.running, f"the proxy exited {where}\n{proxy.log_text()[-3000:]}"
        driver = ("psycopg", "asyncpg")[self.checks % 2]
        route = ROUTES[(self.checks // 2) % 2]
        self.checks += 1
        try:
            await asyncio.wait_for(well_formed_session(proxy, self.pki, driver, route), 2 * IO_TIMEOUT)
        except Exception as exc:
            raise AssertionError(f"a {driver} session on {route} failed ({exc!r}) {where}") from exc
        with proxy.log_path.open("rb") as log:
            log.seek(self.log_offset)
            text = log.read()
        text = text[: text.rfind(b"\n") + 1]
        self.log_offset += len(text)
        errors = unhandled_errors(text.decode("utf-8", errors="replace"))
        reports = "\n".join(errors)[-6000:]
        assert not errors, f"the proxy logged {len(errors)} unhandled error(s) {where}\n{reports}"
        with self.server_log.open("rb") as log:
            log.seek(self.server_log_offset)
            server_text = log.read()
        self.server_log_offset += len(server_text)
        # A backend that dies on a signal makes the postmaster end every session of every store
        # and restart: a terminal that can cause it takes the whole database down for a moment.
        server_lines = server_text.decode(errors="replace").splitlines()
        crashes = [line for line in server_lines if SERVER_CRASH in line]
        if crashes:
            # What the crashed backends logged before (errors and their statements), then the crash.
            pids = {f"[{pid}]" for pid in re.findall(r"server process \(PID (\d+)\)", "\n".join(crashes))}
            told = [line for line in server_lines if any(pid in line for pid in pids) or SERVER_CRASH in line]
            raise AssertionError(f"a PostgreSQL backend crashed {where}\n" + "\n".join(told))
        rss = proxy.rss_kib()
        self.peak_rss_kib = max(self.peak_rss_kib, rss)
        if not self.warm_rss_kib:
            self.warm_rss_kib = rss
        assert rss <= self.warm_rss_kib + RSS_BOUND_MIB * 1024, (
            f"RSS {rss // 1024} MiB, more than {RSS_BOUND_MIB} MiB over the warm "
            f"{self.warm_rss_kib // 1024} MiB, {where}"
        )


@pytest.fixture(scope="module")
def pos_till(tmp_path_factory: pytest.TempPathFactory) -> PosTill | None:
    """pgjdbc's till for the JDBC recording; without Java or the jar the fuzzer runs on the other
    drivers' recordings (under CI, compile_pos_till fails instead)."""
    if toolchain_missing() and not running_in_ci():
        return None
    return compile_pos_till(tmp_path_factory.mktemp("jdbc-classes"))


@pytest.fixture(scope="module")
async def captures(
    fuzz_proxy: FuzzedProxy,
    terminal_pki: TerminalPKI,
    pos_till: PosTill | None,
    tmp_path_factory: pytest.TempPathFactory,
) -> list[Capture]:
    recorded = await record_driver_sessions(
        fuzz_proxy.process, terminal_pki, pos_till, tmp_path_factory.mktemp("jdbc-capture")
    )
    for capture in recorded:
        assert len(capture.stream) > 100, capture
    return recorded


@pytest.fixture
def quiet_asyncio() -> Iterator[None]:
    """The fuzzing client's own event loop warns of every connection the proxy cut short."""
    logger = logging.getLogger("asyncio")
    level = logger.level
    logger.setLevel(logging.ERROR)
    yield
    logger.setLevel(level)


@pytest.mark.timeout(FUZZ_SECONDS + 150)
async def test_mutated_driver_sessions_leave_the_proxy_serving(
    fuzz_proxy: FuzzedProxy,
    terminal_pki: TerminalPKI,
    pg_cluster: PgCluster,
    captures: list[Capture],
    quiet_asyncio: None,
) -> None:
    proxy = fuzz_proxy.process
    watch = Watch(fuzz_proxy, terminal_pki, pg_cluster.server.log_path)
    # Warm: every recording replayed whole on both routes, so the first RSS reading is a proxy
    # that has served each kind of session once.
    replays = [replay_case(capture, route) for capture in captures for route in ROUTES]
    for replay in replays:
        answered = await run_case(replay, proxy, terminal_pki)
        assert b"Z\x00\x00\x00\x05I" in answered.received, f"{replay.describe()}\n{answered.received!r}"
    await watch.check(replays)
    if ONE_CASE is not None:
        base, index = ONE_CASE.rsplit(":", 1)
        case = build_case(base, int(index), captures)
        print(case.describe(limit=100_000))
        result = await run_case(case, proxy, terminal_pki)
        print(f"closed={result.closed} hung={result.hung} received={bytes(result.received)!r}")
        assert not result.hung, case.describe()
        await watch.check([case])
        return
    started = time.monotonic()
    index = 0
    outcomes: Counter[str] = Counter()
    while time.monotonic() - started < FUZZ_SECONDS:
        batch = [build_case(BASE_SEED, index + offset, captures) for offset in range(BATCH)]
        index += BATCH
        hung = await run_batch(batch, proxy, terminal_pki, outcomes)
        assert not hung, f"sessions left unanswered (base seed {BASE_SEED}):\n" + "\n".join(
            case.describe() for case in hung
        )
        await watch.check(batch)
    print(
        f"\nfuzz: base seed {BASE_SEED}, {index} cases in {time.monotonic() - started:.0f}s, "
        f"{watch.checks} checks, RSS warm {watch.warm_rss_kib // 1024} MiB, "
        f"peak {watch.peak_rss_kib // 1024} MiB (bound +{RSS_BOUND_MIB} MiB); {dict(outcomes)}"
    )
    await _check_pool_hygiene(fuzz_proxy, terminal_pki)


async def _check_pool_hygiene(fuzzed: FuzzedProxy, pki: TerminalPKI) -> None:
    """No server connection lent once every fuzzed terminal is gone; those pooled serve clean sessions."""
    deadline = time.monotonic() + 15
    while True:
        pools = admin_pools(fuzzed)
        busy = {name: pool for name, pool in pools.items() if pool["active"] or pool["waiting"]}
        if not busy:
            break
        assert time.monotonic() < deadline, f"server connections still lent after the fuzzing: {busy}"
        await asyncio.sleep(0.2)
    for pool in pools.values():
        assert pool["idle"] + pool["opening"] <= POOL_SIZE, pool
    for route in ROUTES:
        try:
            states = await pooled_states(fuzzed.process, pki, route)
        except TimeoutError as exc:
            raise AssertionError(
                f"no clean session on {route} in time; pools: {admin_pools(fuzzed)}"
            ) from exc
        for state in states:
            assert state[:-1] == CLEAN_STATE, f"a pooled connection on {route} carries {state[:-1]}"
        assert len({state[-1] for state in states}) == POOL_SIZE, f"fewer server connections seen: {states}"
