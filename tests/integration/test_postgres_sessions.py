"""Terminals reach PostgreSQL through the proxy with their certificates; everyone else is refused."""

from __future__ import annotations

import asyncio
import shutil
import socket
import struct
import subprocess
from typing import Any

import asyncpg
import psycopg
import pytest

from tests.integration.proxyproc import ProxyProcess, Terminal, TerminalPKI


def _connect(
    proxy: ProxyProcess, pki: TerminalPKI, terminal: Terminal | None, **extra: Any
) -> psycopg.Connection:
    return psycopg.connect(**proxy.conninfo(terminal, pki.ca, **extra), autocommit=True)


def _refusal(proxy: ProxyProcess, pki: TerminalPKI, terminal: Terminal | None, **extra: Any) -> str:
    with pytest.raises(psycopg.OperationalError) as raised:
        _connect(proxy, pki, terminal, **extra).close()
    return str(raised.value)


def test_cashier_runs_statements_as_the_proxy_database_user(
    proxy: ProxyProcess, terminal_pki: TerminalPKI
) -> None:
    with _connect(proxy, terminal_pki, terminal_pki.cashier) as connection:
        row = connection.execute("SELECT current_user, current_database(), 40 + 2").fetchone()
    assert row == ("pos_proxy", "pos", 42)
    started = proxy.wait_for_event("session_start", terminal="till-01")
    assert started["store"] == "store-001"
    assert started["role"] == "cashier"
    assert started["serial"] == terminal_pki.cashier.serial_hex


async def test_manager_uses_the_extended_protocol_with_asyncpg(
    proxy: ProxyProcess, terminal_pki: TerminalPKI
) -> None:
    connection = await asyncpg.connect(
        host="127.0.0.1",
        port=proxy.port,
        user=terminal_pki.manager.terminal,
        database="pos",
        ssl=proxy.ssl_context(terminal_pki.manager, terminal_pki.ca),
        timeout=10,
    )
    try:
        statement = await connection.prepare("SELECT $1::int * 2, $2::text")
        assert list(await statement.fetchrow(21, "sale")) == [42, "sale"]
        rows = await connection.fetch("SELECT g FROM generate_series(1, 500) AS g")
        assert [row["g"] for row in rows] == list(range(1, 501))
    finally:
        await connection.close()


@pytest.mark.skipif(shutil.which("psql") is None, reason="psql is not installed")
def test_psql_connects_with_a_terminal_certificate(proxy: ProxyProcess, terminal_pki: TerminalPKI) -> None:
    conninfo = " ".join(
        f"{key}={value}" for key, value in proxy.conninfo(terminal_pki.cashier, terminal_pki.ca).items()
    )
    result = subprocess.run(
        ["psql", conninfo, "-X", "-A", "-t", "-c", "SELECT 'till ok'", "-c", "SHOW server_version"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[0] == "till ok"
    assert result.stdout.splitlines()[1].startswith("15")


def test_plaintext_startup_is_refused_with_advice(proxy: ProxyProcess, terminal_pki: TerminalPKI) -> None:
    message = _refusal(proxy, terminal_pki, terminal_pki.cashier, sslmode="disable")
    assert "sslmode=verify-full" in message
    proxy.wait_for_event("session_refused", reason="plaintext startup", sqlstate="28000")


def test_connection_without_a_certificate_is_refused(proxy: ProxyProcess, terminal_pki: TerminalPKI) -> None:
    message = _refusal(proxy, terminal_pki, None)
    assert "terminal certificate is required" in message
    proxy.wait_for_event("session_refused", reason="no client certificate presented", sqlstate="28000")


@pytest.mark.parametrize(
    ("which", "logged_reason"),
    [
        ("expired", "certificate has expired"),
        ("not_yet_valid", "certificate is not yet valid"),
        ("revoked", "certificate revoked"),
        ("foreign", "unable to get local issuer certificate"),
    ],
)
def test_invalid_certificates_are_refused(
    proxy: ProxyProcess, terminal_pki: TerminalPKI, which: str, logged_reason: str
) -> None:
    terminal: Terminal = getattr(terminal_pki, which)
    _refusal(proxy, terminal_pki, terminal)
    proxy.wait_for_event("tls_handshake_failed", reason=logged_reason)


def test_certificate_with_an_unconfigured_role_is_refused(
    proxy: ProxyProcess, terminal_pki: TerminalPKI
) -> None:
    message = _refusal(proxy, terminal_pki, terminal_pki.unmapped_role)
    assert "not accepted" in message
    assert "auditor" not in message  # the reason stays in the log
    refused = proxy.wait_for_event(
        "session_refused", sqlstate="28000", source=refused_source(proxy, "auditor")
    )
    assert "auditor" in refused["reason"]


def refused_source(proxy: ProxyProcess, needle: str) -> str:
    for record in proxy.log_events():
        if record.get("event") == "session_refused" and needle in str(record.get("reason")):
            return str(record["source"])
    raise AssertionError(f"no refusal mentioning {needle}")


def test_unknown_database_is_refused_with_3d000(proxy: ProxyProcess, terminal_pki: TerminalPKI) -> None:
    message = _refusal(proxy, terminal_pki, terminal_pki.cashier, dbname="payroll")
    assert 'database "payroll" does not exist' in message


def test_unsupported_startup_parameter_is_refused(proxy: ProxyProcess, terminal_pki: TerminalPKI) -> None:
    # Settings outside the allow set the proxy carries (tests/unit/test_startup_settings.py), and
    # switches other than -c of the options string.
    message = _refusal(proxy, terminal_pki, terminal_pki.cashier, options="-c idle_session_timeout=1")
    assert "unsupported startup parameter: idle_session_timeout" in message
    message = _refusal(proxy, terminal_pki, terminal_pki.cashier, options="-B 100")
    assert "unsupported startup option" in message


def test_startup_settings_reach_the_server(proxy: ProxyProcess, terminal_pki: TerminalPKI) -> None:
    with _connect(
        proxy, terminal_pki, terminal_pki.cashier, application_name="till-app", options=""
    ) as connection:
        connection.execute("SELECT 1")
        assert connection.info.parameter_status("application_name") == "till-app"
        assert connection.execute("SHOW application_name").fetchone() == ("till-app",)


def test_invalid_startup_setting_gets_the_servers_error(
    proxy: ProxyProcess, terminal_pki: TerminalPKI
) -> None:
    with pytest.raises(psycopg.OperationalError) as raised:
        psycopg.connect(
            **proxy.conninfo(terminal_pki.cashier, terminal_pki.ca),
            autocommit=True,
            client_encoding="klingon",
        )
    assert "klingon" in str(raised.value)


def test_copy_in_and_out_round_trip(proxy: ProxyProcess, terminal_pki: TerminalPKI) -> None:
    rows = [(index, f"item {index}\twith tab") for index in range(2000)]
    with _connect(proxy, terminal_pki, terminal_pki.manager) as connection:
        connection.execute("CREATE TEMP TABLE copy_rt (id int, label text)")
        with connection.cursor() as cursor:
            with cursor.copy("COPY copy_rt (id, label) FROM STDIN") as copy:
                for row in rows:
                    copy.write_row(row)
            copied: list[tuple[int, str]] = []
            with cursor.copy("COPY (SELECT id, label FROM copy_rt ORDER BY id) TO STDOUT") as copy:
                copied.extend((int(a), str(b)) for a, b in copy.rows())
    assert copied == rows


def test_notices_and_notifications_pass_through(proxy: ProxyProcess, terminal_pki: TerminalPKI) -> None:
    notices: list[str] = []
    with _connect(proxy, terminal_pki, terminal_pki.manager) as connection:
        connection.add_notice_handler(lambda diagnostic: notices.append(diagnostic.message_primary or ""))
        connection.execute("DO $$ BEGIN RAISE NOTICE 'stock low for %', 'pens'; END $$")
        connection.execute("LISTEN price_change")
        connection.execute("NOTIFY price_change, 'sku 4006381333931'")
        received = list(connection.notifies(timeout=5, stop_after=1))
    assert notices == ["stock low for pens"]
    assert [(note.channel, note.payload) for note in received] == [("price_change", "sku 4006381333931")]


def test_errors_leave_the_session_usable(proxy: ProxyProcess, terminal_pki: TerminalPKI) -> None:
    with _connect(proxy, terminal_pki, terminal_pki.cashier) as connection:
        with pytest.raises(psycopg.errors.DivisionByZero):
            connection.execute("SELECT 1 / 0")
        assert connection.execute("SELECT 'still here'").fetchone() == ("still here",)


async def test_cancel_stops_a_running_query(proxy: ProxyProcess, terminal_pki: TerminalPKI) -> None:
    connection = await asyncpg.connect(
        host="127.0.0.1",
        port=proxy.port,
        user=terminal_pki.cashier.terminal,
        database="pos",
        ssl=proxy.ssl_context(terminal_pki.cashier, terminal_pki.ca),
        timeout=10,
    )
    try:
        started = asyncio.get_running_loop().time()
        # asyncpg sends a CancelRequest when the timeout expires.
        with pytest.raises(asyncio.TimeoutError):
            await connection.execute("SELECT pg_sleep(30)", timeout=0.5)
        assert asyncio.get_running_loop().time() - started < 10
        assert await connection.fetchval("SELECT 'after cancel'") == "after cancel"
    finally:
        await connection.close()
    proxy.wait_for_event("cancel_forwarded", terminal="till-01")


def test_cancel_with_unknown_keys_does_nothing(proxy: ProxyProcess, terminal_pki: TerminalPKI) -> None:
    with _connect(proxy, terminal_pki, terminal_pki.cashier) as connection:
        with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as raw:
            raw.sendall(struct.pack("!iiii", 16, 80877102, 12345, 67890))
            assert raw.recv(1) == b""  # the proxy just closes, as PostgreSQL does
        assert connection.execute("SELECT 1").fetchone() == (1,)
    proxy.wait_for_event("cancel_ignored", reason="unknown backend key")
