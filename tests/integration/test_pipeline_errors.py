"""psycopg's pipeline after a failed statement ends the same way through the proxy as against
PostgreSQL, message for message, whichever of the client's steps the server's error overtakes.

psycopg's own ``test_pipeline.py::test_errors_raised_on_commit`` sometimes ends with
``PipelineAborted`` on ``rollback()``, through the proxy and (more rarely) direct: when the
ErrorResponse of ``select 1 from nosuchtable`` reaches psycopg before it queues COMMIT, ``commit()``
queues COMMIT and a Sync and raises the error as soon as both are sent, unless the Sync's
ReadyForQuery came back within those few steps; the COMMIT's aborted result it left unread is what
``rollback()`` then meets. So the outcome is the client's timing against the round trip: the
proxy's hop makes it likelier, and a link's latency makes it certain against PostgreSQL itself.
Here both timings are forced, over a relay that delays each chunk, and the proxy must give the
client the very messages the server gives it.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg import pq

from tests.integration.proxyproc import ProxyProcess, TerminalPKI
from tests.integration.relay import relays

# The error reaches the client before it queues COMMIT (PostgreSQL sends an ErrorResponse at once,
# pipeline or not, and the client pauses), or only after COMMIT and its Sync went out.
EARLY_ERROR = "select 1 from nosuchtable"
LATE_ERROR = "select 1 / (select 0 from pg_sleep(0.5))"
PAUSE = 0.3
LINK_DELAY = 0.02  # each way: a store link's latency, far above the client's few loop steps


async def _errors_raised_on_commit(
    conninfo: dict[str, Any], failing: str, trace: Path
) -> tuple[str, list[str]]:
    """psycopg's test, with a pause after the failing statement: how ``rollback()`` ended, and
    libpq's trace of the messages after the startup."""
    async with await psycopg.AsyncConnection.connect(**conninfo) as connection:
        with trace.open("w") as sink:
            connection.pgconn.trace(sink.fileno())
            connection.pgconn.set_trace_flags(pq.Trace.SUPPRESS_TIMESTAMPS | pq.Trace.REGRESS_MODE)
            try:
                async with connection.pipeline():
                    await connection.execute(failing)
                    await asyncio.sleep(PAUSE)
                    with pytest.raises((psycopg.errors.UndefinedTable, psycopg.errors.DivisionByZero)):
                        await connection.commit()
                    await connection.rollback()
                    first = await connection.execute("select 1")
                second = await connection.execute("select 2")
                assert await first.fetchone() == (1,)
                assert await second.fetchone() == (2,)
                outcome = "passed"
            except psycopg.errors.PipelineAborted:
                outcome = "PipelineAborted"
            await connection.rollback()
            connection.pgconn.untrace()
    return outcome, (await asyncio.to_thread(trace.read_text, encoding="utf-8")).splitlines()


@pytest.mark.parametrize(("failing", "expected"), [(EARLY_ERROR, "PipelineAborted"), (LATE_ERROR, "passed")])
async def test_errors_raised_on_commit_end_as_they_do_direct(
    *,
    proxy: ProxyProcess,
    terminal_pki: TerminalPKI,
    pg_cluster: Any,
    tmp_path: Path,
    failing: str,
    expected: str,
) -> None:
    with relays() as running:
        to_server = running.add("127.0.0.1", (pg_cluster.host, pg_cluster.port))
        to_proxy = running.add("127.0.0.1", (proxy.host, proxy.port))
        to_server.delay = to_proxy.delay = LINK_DELAY
        direct = await _errors_raised_on_commit(
            pg_cluster.connect_kwargs(dbname="pos", host="127.0.0.1", port=to_server.port),
            failing,
            tmp_path / "direct",
        )
        proxied = await _errors_raised_on_commit(
            proxy.conninfo(terminal_pki.cashier, terminal_pki.ca, host="127.0.0.1", port=str(to_proxy.port)),
            failing,
            tmp_path / "proxied",
        )
    # psycopg's own outcome against PostgreSQL, so that the comparison covers both timings.
    assert direct[0] == expected, direct[1]
    assert proxied == direct
