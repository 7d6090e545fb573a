"""Drivers' settings and reported parameters through the proxy, as against PostgreSQL itself."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from typing import Any

import asyncpg
import psycopg
import pytest

from tests.integration.proxyproc import ProxyProcess, Terminal, TerminalPKI

StartProxy = Callable[..., ProxyProcess]


def _proxy(start_proxy: StartProxy, mode: str, size: int = 1) -> ProxyProcess:
    return start_proxy(routes={"pos": {"pool": {"mode": mode, "size": size}}})


def _psycopg(proxy: ProxyProcess, pki: TerminalPKI, terminal: Terminal, **extra: Any) -> psycopg.Connection:
    return psycopg.connect(**proxy.conninfo(terminal, pki.ca, **extra), autocommit=True)


@contextlib.asynccontextmanager
async def _asyncpg(
    proxy: ProxyProcess, pki: TerminalPKI, terminal: Terminal, **settings: str
) -> AsyncIterator[asyncpg.Connection]:
    connection = await asyncpg.connect(
        host="127.0.0.1",
        port=proxy.port,
        user=terminal.terminal,
        database="pos",
        ssl=proxy.ssl_context(terminal, pki.ca),
        timeout=15,
        server_settings=settings,
    )
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
        own_pid = listener.info.backend_pid
    assert {note.payload: note.pid == own_pid for note in received} == {
        "own": True,
        "other": False,
    }


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
