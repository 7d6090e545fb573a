"""Record what real drivers write to the proxy inside TLS, at test time.

A recording shim on loopback stands where the proxy would: it answers the driver's SSLRequest,
terminates its TLS with the proxy's own server certificate (which the driver verifies as usual),
opens a TLS session of its own to the real proxy with the terminal's certificate, and relays
plaintext both ways, keeping a copy of every byte the driver sent. Nothing is written to disk:
the recordings hold no secrets (the proxy authenticates terminals by certificate, so there is no
password exchange in them), but they are made fresh for each test session anyway.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import psycopg

from proxy.protocols.postgres import messages as m
from tests.integration.pgjdbc import TIMEOUTS, PosTill, write_properties
from tests.integration.proxyproc import ProxyProcess, Terminal, TerminalPKI

IO_TIMEOUT = 10.0
GSSENC_REQUEST = m.GSSENC_REQUEST_CODE.to_bytes(4, "big")


@dataclass(frozen=True, slots=True)
class Capture:
    """The bytes one driver session wrote after its TLS handshake (startup packet first)."""

    driver: str
    stream: bytes


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, copy: bytearray | None) -> None:
    try:
        while chunk := await reader.read(65536):
            if copy is not None:
                copy += chunk
            writer.write(chunk)
            await writer.drain()
    except (ConnectionError, ssl.SSLError):
        pass
    finally:
        writer.close()


async def open_tls(
    proxy: ProxyProcess, pki: TerminalPKI, terminal: Terminal, *, local_host: str = "127.0.0.1"
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """An SSLRequest, then a TLS session with the proxy as ``terminal`` (a driver's way in)."""
    reader, writer = await asyncio.wait_for(
        asyncio.open_connection("127.0.0.1", proxy.port, local_addr=(local_host, 0)), IO_TIMEOUT
    )
    writer.write(m.build_ssl_request())
    answer = await asyncio.wait_for(reader.readexactly(1), IO_TIMEOUT)
    if answer != b"S":
        writer.close()
        raise AssertionError(f"the proxy answered {answer!r} to an SSLRequest")
    await asyncio.wait_for(
        writer.start_tls(proxy.ssl_context(terminal, pki.ca), server_hostname="127.0.0.1"), IO_TIMEOUT
    )
    return reader, writer


@asynccontextmanager
async def recording_shim(
    proxy: ProxyProcess, pki: TerminalPKI, terminal: Terminal, recorded: list[bytearray]
) -> AsyncIterator[int]:
    """A relay on a free loopback port; each connection's client-to-proxy plaintext is appended to
    ``recorded``. Yields the port."""
    server_side = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_side.load_cert_chain(pki.directory / "server.pem", pki.directory / "server.key")
    handlers: set[asyncio.Task[Any]] = set()

    async def relay(client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        handlers.add(task)
        request = await asyncio.wait_for(client_reader.readexactly(8), IO_TIMEOUT)
        if request[4:] == GSSENC_REQUEST:
            client_writer.write(b"N")
            request = await asyncio.wait_for(client_reader.readexactly(8), IO_TIMEOUT)
        assert request == m.build_ssl_request(), f"the driver began with {request!r}"
        client_writer.write(b"S")
        await client_writer.drain()
        await asyncio.wait_for(client_writer.start_tls(server_side), IO_TIMEOUT)
        proxy_reader, proxy_writer = await open_tls(proxy, pki, terminal)
        copy = bytearray()
        recorded.append(copy)
        await asyncio.gather(
            _pipe(client_reader, proxy_writer, copy), _pipe(proxy_reader, client_writer, None)
        )

    server = await asyncio.start_server(relay, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()
        # The driver has closed its connection: each relay ends by itself once both pipes are done.
        if handlers:
            _done, pending = await asyncio.wait(handlers, timeout=IO_TIMEOUT)
            for handler in pending:
                handler.cancel()
        await asyncio.wait_for(server.wait_closed(), IO_TIMEOUT)


# What the recorded sessions do: a sale's worth of statements plus the session state (settings,
# temporary tables, cursors, prepared statements, COPY) a pooled server connection must not carry
# to the next terminal.
PSQL_SCRIPT = """\\set ON_ERROR_STOP 1
SELECT current_user, 'psql' AS driver;
SET search_path TO pg_catalog, public;
CREATE TEMP TABLE fuzz_sale (id int, note text);
COPY fuzz_sale FROM STDIN;
1\tcoffee
2\tcroissant
\\.
BEGIN;
DECLARE sale_cursor CURSOR FOR SELECT * FROM fuzz_sale ORDER BY id;
FETCH 1 FROM sale_cursor;
COMMIT;
PREPARE lookup(int) AS SELECT note FROM fuzz_sale WHERE id = $1;
EXECUTE lookup(2);
SELECT 'crème brûlée' AS dessert;
\\q
"""


async def _psql(port: int, conninfo: dict[str, Any]) -> None:
    psql = shutil.which("psql")
    assert psql is not None
    dsn = " ".join(
        f"{key}={value}" for key, value in {**conninfo, "port": port, "gssencmode": "disable"}.items()
    )
    process = await asyncio.create_subprocess_exec(
        psql,
        "--no-psqlrc",
        "--quiet",
        "--file=-",
        dsn,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "PGCONNECT_TIMEOUT": "10"},
    )
    stdout, stderr = await asyncio.wait_for(process.communicate(PSQL_SCRIPT.encode()), 30)
    assert process.returncode == 0, (stdout, stderr)


async def _psycopg(port: int, conninfo: dict[str, Any]) -> None:
    async with await psycopg.AsyncConnection.connect(**{**conninfo, "port": port}) as connection:
        await connection.execute("SET statement_timeout = '20s'")
        cursor = await connection.execute("SELECT %s::int + 1, %s::text", (41, "naïve café"))
        assert await cursor.fetchone() == (42, "naïve café")
        for number in range(3):  # prepared by psycopg after a few runs: Parse with a name, Bind, Execute
            await connection.execute("SELECT %s::bigint * 2", (number,), prepare=True)
        await connection.execute("CREATE TEMP TABLE fuzz_sale (id int, amount numeric)")
        async with connection.cursor() as rows:
            await rows.executemany("INSERT INTO fuzz_sale VALUES (%s, %s)", [(1, 9.5), (2, 3.25)])
        async with connection.cursor(binary=True) as binary:
            await binary.execute("SELECT sum(amount), count(*) FROM fuzz_sale WHERE id > %s", (0,))
            await binary.fetchone()
        async with connection.cursor().copy("COPY fuzz_sale FROM STDIN") as copy:
            await copy.write_row((3, 1.75))
        async with connection.cursor(name="sale_rows") as named:  # DECLARE ... CURSOR, FETCH
            await named.execute("SELECT id FROM fuzz_sale ORDER BY id")
            await named.fetchall()
        await connection.commit()


async def _asyncpg(port: int, conninfo: dict[str, Any], context: ssl.SSLContext) -> None:
    connection = await asyncpg.connect(
        host="127.0.0.1",
        port=port,
        user=conninfo["user"],
        database=conninfo["dbname"],
        ssl=context,
        timeout=IO_TIMEOUT,
        statement_cache_size=10,
    )
    try:
        assert await connection.fetchval("SELECT $1::int + 1", 41) == 42
        await connection.execute("CREATE TEMP TABLE fuzz_sale (id int, note text)")
        await connection.executemany("INSERT INTO fuzz_sale VALUES ($1, $2)", [(1, "tea"), (2, "bun")])
        await connection.copy_records_to_table("fuzz_sale", records=[(3, "jam")])
        async with connection.transaction():
            async for _row in connection.cursor("SELECT * FROM fuzz_sale", prefetch=1):
                pass
        statement = await connection.prepare("SELECT note FROM fuzz_sale WHERE id = $1")
        assert await statement.fetchval(2) == "bun"
        await connection.execute("SET application_name = 'till-asyncpg'")
    finally:
        await connection.close(timeout=IO_TIMEOUT)


async def _jdbc(port: int, conninfo: dict[str, Any], pos_till: PosTill, directory: Path) -> None:
    """tests/integration/jdbc/PosTill.java with temporary tables: prepared statements past
    pgjdbc's prepareThreshold, batches, savepoints, SET TIME ZONE, binary values, and the
    re-prepare after `cached plan must not change result type`."""
    properties = write_properties(
        directory / "jdbc-capture.properties",
        f"jdbc:postgresql://127.0.0.1:{port}/{conninfo['dbname']}",
        {
            "user": conninfo["user"],
            "sslmode": "verify-full",
            "sslrootcert": conninfo["sslrootcert"],
            **TIMEOUTS,
        },
    )
    process = await asyncio.create_subprocess_exec(
        *pos_till.command(properties, temporary=True),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:  # bounded by the caller's wait
        stdout, stderr = await process.communicate()
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert process.returncode == 0, (stdout, stderr)


async def record_driver_sessions(
    proxy: ProxyProcess, pki: TerminalPKI, pos_till: PosTill | None, directory: Path
) -> list[Capture]:
    """One recorded session of each driver: psql, psycopg, asyncpg and, with ``pos_till``, pgjdbc
    (all as the cashier's till). ``directory`` holds pgjdbc's properties file."""
    terminal = pki.cashier
    conninfo = proxy.conninfo(None, pki.ca, user=terminal.terminal)
    conninfo.pop("port")
    driver_context = ssl.create_default_context(cafile=str(pki.ca))
    drivers: dict[str, Callable[[int], Awaitable[None]]] = {
        "psql": lambda port: _psql(port, conninfo),
        "psycopg": lambda port: _psycopg(port, conninfo),
        "asyncpg": lambda port: _asyncpg(port, conninfo, driver_context),
    }
    if pos_till is not None:
        drivers["jdbc"] = lambda port: _jdbc(port, conninfo, pos_till, directory)
    captures: list[Capture] = []
    for driver, run in drivers.items():
        recorded: list[bytearray] = []
        async with recording_shim(proxy, pki, terminal, recorded) as port:
            await asyncio.wait_for(run(port), 60)
            # The relay copies what the driver wrote before it hands it on; give it the last turn.
            for _ in range(100):
                if recorded and recorded[-1].endswith(m.build_terminate()):
                    break
                await asyncio.sleep(0.02)
        assert len(recorded) == 1, f"{driver} opened {len(recorded)} connections"
        captures.append(Capture(driver, bytes(recorded[0])))
    return captures
