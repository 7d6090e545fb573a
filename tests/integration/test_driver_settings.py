"""Drivers' settings and reported parameters through the proxy, as against PostgreSQL itself."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import psycopg
import pytest

from proxy.localpg import free_port
from tests.integration.proxyproc import ProxyProcess, Terminal, TerminalPKI
from tests.integration.test_admin import TOKEN, _call

StartProxy = Callable[..., ProxyProcess]


def _proxy(start_proxy: StartProxy, mode: str, size: int = 1, **overrides: Any) -> ProxyProcess:
    return start_proxy(routes={"pos": {"pool": {"mode": mode, "size": size}}}, **overrides)


def _proxy_with_admin(start_proxy: StartProxy, tmp_path: Path, mode: str) -> tuple[ProxyProcess, int]:
    token_file = tmp_path / "admin-token"
    token_file.write_text(TOKEN + "\n", encoding="utf-8")
    port = free_port()
    proxy = _proxy(
        start_proxy, mode, admin={"host": "127.0.0.1", "port": port, "token": {"file": str(token_file)}}
    )
    proxy.wait_for_event("admin_listening")
    return proxy, port


def _pinned_clients(admin_port: int) -> list[str | None]:
    clients = json.loads(_call(admin_port, "/v1/clients")[1])["clients"]
    return [client["pinned_by"] for client in clients if client["pinned_by"] is not None]


def _psycopg(proxy: ProxyProcess, pki: TerminalPKI, terminal: Terminal, **extra: Any) -> psycopg.Connection:
    return psycopg.connect(**proxy.conninfo(terminal, pki.ca, **extra), autocommit=True)


@contextlib.asynccontextmanager
async def _asyncpg(
    proxy: ProxyProcess, pki: TerminalPKI, terminal: Terminal, **settings: str
) -> AsyncIterator[asyncpg.Connection]:
    connection = await proxy.asyncpg_connect(terminal, pki.ca, **settings)
    try:
        yield connection
    finally:
        await connection.close()


# --- client_encoding ---


@pytest.mark.parametrize("mode", ["transaction", "session"])
@pytest.mark.parametrize(
    ("asked", "reported"), [("iso-8859-1", "LATIN1"), ("UTF-8", "UTF8"), ("latin1", "LATIN1")]
)
def test_client_encoding_is_reported_in_the_servers_spelling(
    start_proxy: StartProxy, terminal_pki: TerminalPKI, mode: str, asked: str, reported: str
) -> None:
    proxy = _proxy(start_proxy, mode)
    with _psycopg(proxy, terminal_pki, terminal_pki.manager, client_encoding=asked) as connection:
        assert connection.info.parameter_status("client_encoding") == reported
        assert connection.execute("SHOW client_encoding").fetchone() == (reported,)
        assert connection.execute("SELECT 'Grüße'").fetchone() == ("Grüße",)


@pytest.mark.parametrize("mode", ["transaction", "session"])
async def test_startup_settings_are_reported_in_the_servers_spelling(
    start_proxy: StartProxy, terminal_pki: TerminalPKI, pg_cluster: Any, mode: str
) -> None:
    """libpq decides how to escape strings by standard_conforming_strings == "on", psycopg how to
    read dates by DateStyle starting with "ISO": what the client is told is what the server says."""
    settings = {
        "DateStyle": "iso",
        "TimeZone": "europe/berlin",
        "IntervalStyle": "ISO_8601",
        "standard_conforming_strings": "true",
    }
    options = " ".join(f"-c {name}={value}" for name, value in settings.items())
    with psycopg.connect(**pg_cluster.connect_kwargs(dbname="pos", options=options)) as direct:
        expected = {name: direct.info.parameter_status(name) for name in settings}
    assert expected["DateStyle"] == "ISO, MDY"
    proxy = _proxy(start_proxy, mode)
    for _ in range(2):  # the second time from what the proxy learned the first time
        async with _asyncpg(proxy, terminal_pki, terminal_pki.manager, **settings) as connection:
            assert {name: getattr(connection.get_settings(), name) for name in settings} == expected
            for name, value in expected.items():
                assert await connection.fetchval(f"SHOW {name}") == value
    if mode == "transaction":
        # Answered without a server connection once the proxy knows how the server spells them.
        proxy.wait_for_event("session_start", server_connection=None)
    with _psycopg(proxy, terminal_pki, terminal_pki.manager, options="-c DateStyle=iso") as connection:
        assert connection.info.parameter_status("DateStyle") == "ISO, MDY"
        assert connection.execute("SELECT DATE '2026-12-07'").fetchone() is not None


# --- NotificationResponse ---


@pytest.mark.parametrize("mode", ["session", "transaction"])
def test_own_notifications_carry_the_pid_the_client_was_given_psycopg(
    start_proxy: StartProxy, terminal_pki: TerminalPKI, mode: str
) -> None:
    proxy = _proxy(start_proxy, mode, size=2)
    with (
        _psycopg(proxy, terminal_pki, terminal_pki.manager) as listener,
        _psycopg(proxy, terminal_pki, terminal_pki.cashier) as other,
    ):
        listener.execute("LISTEN price_change")
        listener.execute("NOTIFY price_change, 'own'")
        other.execute("NOTIFY price_change, 'other'")
        received = list(listener.notifies(timeout=5, stop_after=2))
        own_pid, other_pid = listener.info.backend_pid, other.info.backend_pid
        own_backend = listener.execute("SELECT pg_backend_pid()").fetchone()
    assert {note.payload: note.pid == own_pid for note in received} == {
        "own": True,
        "other": False,
    }
    if mode == "session":
        # Driver pids are the backends' own: the other's notification names the other's too.
        assert own_backend == (own_pid,)
        assert {note.payload: note.pid for note in received} == {"own": own_pid, "other": other_pid}


@pytest.mark.parametrize("mode", ["session", "transaction"])
async def test_own_notifications_carry_the_pid_the_client_was_given_asyncpg(
    start_proxy: StartProxy, terminal_pki: TerminalPKI, mode: str
) -> None:
    proxy = _proxy(start_proxy, mode)
    received: asyncio.Queue[tuple[int, str]] = asyncio.Queue()
    async with _asyncpg(proxy, terminal_pki, terminal_pki.manager) as connection:
        await connection.add_listener(
            "price_change", lambda _c, pid, _ch, payload: received.put_nowait((pid, payload))
        )
        await connection.execute("NOTIFY price_change, 'own'")
        pid, payload = await asyncio.wait_for(received.get(), 5)
        assert (pid, payload) == (connection.get_server_pid(), "own")
        if mode == "session":
            # As direct (asyncpg's test_listen_02 compares them).
            assert pid == await connection.fetchval("SELECT pg_backend_pid()")


# --- startup settings drivers send ---


@pytest.mark.parametrize("mode", ["transaction", "session"])
async def test_startup_settings_drivers_send_are_accepted_and_kept(
    start_proxy: StartProxy, terminal_pki: TerminalPKI, mode: str
) -> None:
    proxy = _proxy(start_proxy, mode, size=1 if mode == "transaction" else 2)
    settings = {"client_min_messages": "warning", "jit": "off", "work_mem": "64MB"}
    async with _asyncpg(proxy, terminal_pki, terminal_pki.manager, **settings) as connection:
        with _psycopg(
            proxy,
            terminal_pki,
            terminal_pki.cashier,
            options="-c client_min_messages=error --work-mem=32MB -c plan_cache_mode=force_custom_plan",
        ) as other:
            # One server connection for both (transaction mode): each has its own set every time.
            for _ in range(2):
                for name, value in settings.items():
                    assert await connection.fetchval(f"SHOW {name}") == value
                assert other.execute("SHOW client_min_messages").fetchone() == ("error",)
                assert other.execute("SHOW work_mem").fetchone() == ("32MB",)
                assert other.execute("SHOW plan_cache_mode").fetchone() == ("force_custom_plan",)
                assert other.execute("SHOW jit").fetchone() == ("on",)
            notices: list[str] = []
            other.add_notice_handler(lambda diagnostic: notices.append(diagnostic.message_primary or ""))
            other.execute("DO $$ BEGIN RAISE WARNING 'not shown at error'; END $$")
            assert notices == []


@pytest.mark.parametrize("mode", ["transaction", "session"])
async def test_a_startup_setting_the_server_refuses_fails_with_the_servers_error(
    start_proxy: StartProxy, terminal_pki: TerminalPKI, mode: str
) -> None:
    proxy = _proxy(start_proxy, mode)
    with pytest.raises(asyncpg.InvalidParameterValueError, match="work_mem"):
        async with _asyncpg(proxy, terminal_pki, terminal_pki.manager, work_mem="plenty") as connection:
            await connection.fetchval("SELECT 1")
    async with _asyncpg(proxy, terminal_pki, terminal_pki.manager) as connection:
        assert await connection.fetchval("SHOW work_mem") == "4MB"


async def test_startup_settings_outside_the_allow_set_are_refused(
    start_proxy: StartProxy, terminal_pki: TerminalPKI
) -> None:
    proxy = _proxy(start_proxy, "transaction")
    for settings in ({"idle_session_timeout": "1"}, {"options": "-c role=postgres"}, {"options": "-B 100"}):
        with pytest.raises(asyncpg.FeatureNotSupportedError):
            async with _asyncpg(proxy, terminal_pki, terminal_pki.manager, **settings):
                pass


# --- set_config and SET of carried settings ---


@pytest.fixture(scope="module")
def custom_types(pg_cluster: Any) -> Iterator[None]:
    with psycopg.connect(
        **pg_cluster.connect_kwargs(user="postgres", dbname="pos"), autocommit=True
    ) as admin:
        admin.execute("DROP TYPE IF EXISTS till_line, till_state")
        admin.execute("CREATE TYPE till_state AS ENUM ('open', 'closed')")
        admin.execute("CREATE TYPE till_line AS (sku text, state till_state)")
    yield


async def test_asyncpg_with_custom_types_keeps_transaction_pooling(
    start_proxy: StartProxy, terminal_pki: TerminalPKI, tmp_path: Path, custom_types: None
) -> None:
    """asyncpg's type introspection runs set_config('jit', 'off', false), then sets it back with a
    bound value: carried, not pinned, and never left to the next terminal."""
    proxy, admin_port = _proxy_with_admin(start_proxy, tmp_path, "transaction")
    with _psycopg(proxy, terminal_pki, terminal_pki.cashier) as before:
        pid = before.execute("SELECT pg_backend_pid()").fetchone()
    async with _asyncpg(proxy, terminal_pki, terminal_pki.manager) as connection:
        assert await connection.fetchval("SELECT 'open'::till_state") == "open"
        line = await connection.fetchval("SELECT ROW('4006381333931', 'closed')::till_line")
        assert tuple(line) == ("4006381333931", "closed")
        assert await connection.fetchval("SHOW jit") == "on"  # as asyncpg set it back
        assert _pinned_clients(admin_port) == []
        # asyncpg turns jit off for its introspection only; a client that turns it off keeps it off.
        await connection.execute("SELECT set_config('jit', 'off', false)")
        with _psycopg(proxy, terminal_pki, terminal_pki.cashier) as victim:
            assert victim.execute("SELECT pg_backend_pid()").fetchone() == pid
            assert victim.execute("SHOW jit").fetchone() == ("on",)
        assert await connection.fetchval("SHOW jit") == "off"
        assert await connection.fetchval("SELECT pg_backend_pid()") == pid[0] if pid else None
        assert _pinned_clients(admin_port) == []
    assert not [record for record in proxy.log_events() if record.get("event") == "session_pinned"]


@pytest.mark.parametrize(
    ("change", "shown"),
    [
        ("SET work_mem = '77MB'", "77MB"),
        ("SELECT set_config('work_mem', '77MB', false)", "77MB"),
        ("BEGIN; SET work_mem = '77MB'; COMMIT", "77MB"),
        ("BEGIN; SET work_mem = '77MB'; ROLLBACK", "5MB"),  # undone, as on the server
        ("SET work_mem = '77MB'; SELECT 1 / 0", "5MB"),  # one implicit transaction: undone
        # The route's value, not the client's startup value (docs/compatibility.md, Driver settings).
        ("RESET work_mem", "4MB"),
    ],
)
def test_a_carried_setting_follows_its_client_across_server_connections(
    start_proxy: StartProxy, terminal_pki: TerminalPKI, change: str, shown: str
) -> None:
    proxy = _proxy(start_proxy, "transaction")
    with (
        _psycopg(proxy, terminal_pki, terminal_pki.manager, options="-c work_mem=5MB") as client,
        _psycopg(proxy, terminal_pki, terminal_pki.cashier) as other,
    ):
        with contextlib.suppress(psycopg.errors.DivisionByZero):
            client.execute(change)
        for _ in range(2):
            # The other terminal takes the one server connection in between.
            assert other.execute("SHOW work_mem").fetchone() == ("4MB",)
            assert client.execute("SHOW work_mem").fetchone() == (shown,)
    assert not [record for record in proxy.log_events() if record.get("event") == "session_pinned"]
