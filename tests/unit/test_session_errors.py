"""Errors on their way from the server to a terminal, without sockets: the proxy's own (a refusal
the server raised for it) reach the terminal with the proxy's fields only, the server's own pass
as they are, and each is counted by source and SQLSTATE."""

from __future__ import annotations

from pathlib import Path

import pytest

from proxy.metrics import Metrics
from proxy.oplog import configure_logging
from proxy.protocols.postgres import messages as m
from proxy.protocols.postgres.refusal import PROXY_ERROR_MARK
from proxy.server import ProxyServer
from tests.sockless import READY, add_server, open_session, proxy_without_listener, terminal_certificate

SERVER_PARAMETERS = {
    "server_version": "15.0",
    "client_encoding": "UTF8",
    "TimeZone": "UTC",
    # As the role's policy wants it: no settings to sync before the first statement.
    "search_path": '"public"',
}
POLICY = "mode: enforce\nallow:\n  kinds: [SELECT]\n"
PLPGSQL_TRAIL = (
    b"WPL/pgSQL function inline_code_block line 1 at RAISE\x00Fpl_exec.c\x00L3907\x00Rexec_stmt_raise\x00"
)
REFUSAL_ERROR = m.build_message(
    b"E",
    b"SERROR\x00VERROR\x00C42501\x00Mstatement kind DROP is not allowed for role cashier\x00"
    + b"s"
    + PROXY_ERROR_MARK.encode()
    + b"\x00"
    + PLPGSQL_TRAIL
    + b"\x00",
)
# What the terminal gets instead: the same error as the proxy would have built it.
AS_THE_PROXYS = m.build_error_response(
    "ERROR", "42501", "statement kind DROP is not allowed for role cashier"
)
DIVISION_BY_ZERO = m.build_message(
    b"E", b"SERROR\x00VERROR\x00C22012\x00Mdivision by zero\x00Fint.c\x00L841\x00Rint4div\x00\x00"
)
ROWS = m.build_message(b"T", b"\x00\x01n\x00" + b"\x00" * 18) + m.build_message(
    b"D", b"\x00\x01\x00\x00\x00\x011"
)


@pytest.fixture(autouse=True)
def _quiet_logs() -> None:
    configure_logging(json=False, level="error")


def _errors(metrics: Metrics, source: str, sqlstate: str) -> float:
    return metrics.client_errors_total.labels(source, sqlstate)._value.get()


def _proxy(tmp_path: Path) -> ProxyServer:
    return proxy_without_listener(tmp_path, policy=POLICY)


async def test_a_refusal_reaches_the_terminal_as_the_proxys_error(tmp_path: Path) -> None:
    proxy = _proxy(tmp_path)
    server, upstream = add_server(proxy.routes["pos"], SERVER_PARAMETERS)
    till, received = open_session(proxy, terminal_certificate(tmp_path), 40001)
    till.data_received(m.build_query("DROP TABLE sales"))
    assert b"DO $refused_" in upstream.written[-1]
    assert PROXY_ERROR_MARK.encode() in upstream.written[-1]
    server.data_received(REFUSAL_ERROR + READY)
    assert received.written[-1] == AS_THE_PROXYS + READY
    assert _errors(proxy.metrics, "proxy", "42501") == 1
    assert _errors(proxy.metrics, "server", "42501") == 0


async def test_the_servers_own_error_passes_as_it_is_and_is_counted(tmp_path: Path) -> None:
    proxy = _proxy(tmp_path)
    server, upstream = add_server(proxy.routes["pos"], SERVER_PARAMETERS)
    till, received = open_session(proxy, terminal_certificate(tmp_path), 40001)
    till.data_received(m.build_query("SELECT 1 / 0"))
    assert upstream.written[-1] == m.build_query("SELECT 1 / 0")
    server.data_received(DIVISION_BY_ZERO + READY)
    assert received.written[-1] == DIVISION_BY_ZERO + READY
    assert _errors(proxy.metrics, "server", "22012") == 1
    # The next reply without an error is not looked at again, nor counted.
    till.data_received(m.build_query("SELECT 1"))
    server.data_received(ROWS + m.build_message(b"C", b"SELECT 1\x00") + READY)
    assert _errors(proxy.metrics, "server", "22012") == 1


async def test_the_proxys_error_among_other_replies_is_replaced_in_place(tmp_path: Path) -> None:
    # Three Queries sent back to back, answered in one read: only the refusal's error is replaced,
    # the server's error and the rows around it pass byte for byte.
    proxy = _proxy(tmp_path)
    server, _upstream = add_server(proxy.routes["pos"], SERVER_PARAMETERS)
    till, received = open_session(proxy, terminal_certificate(tmp_path), 40001)
    till.data_received(
        m.build_query("SELECT 1 / 0") + m.build_query("DROP TABLE sales") + m.build_query("SELECT 1")
    )
    complete = m.build_message(b"C", b"SELECT 1\x00")
    server.data_received(DIVISION_BY_ZERO + READY + REFUSAL_ERROR + READY + ROWS + complete + READY)
    assert b"".join(received.written).endswith(
        DIVISION_BY_ZERO + READY + AS_THE_PROXYS + READY + ROWS + complete + READY
    )
    assert _errors(proxy.metrics, "server", "22012") == 1
    assert _errors(proxy.metrics, "proxy", "42501") == 1
