"""Errors a till receives through the real proxy: the proxy's own (a policy refusal, a statement
rate limit, a result-size limit) read as the proxy's, not as errors of a PL/pgSQL function, and
every error sent is counted by who raised it and its SQLSTATE.

A refusal runs on the server as a DO block that raises the proxy's SQLSTATE (refusal.py), so the
server's error carries PL/pgSQL's CONTEXT ("PL/pgSQL function inline_code_block line 1 at
RAISE") and the source location of RAISE: the client must see neither.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import asyncpg
import psycopg
import pytest
import yaml

from proxy.localpg import free_port
from tests.integration.proxyproc import ProxyProcess, TerminalPKI
from tests.integration.test_admin import TOKEN
from tests.integration.test_upstream_resilience import _metric

StartProxy = Callable[..., ProxyProcess]

POLICY: dict[str, Any] = {"mode": "enforce", "search_path": ["public"], "allow": {"kinds": ["SELECT"]}}
REFUSED = "DROP TABLE sales"
REFUSED_MESSAGE = "statement kind DROP is not allowed for role cashier"
# Three rows, no table or function for the policy to refuse; the limit lets two through.
TOO_MANY_ROWS = "SELECT n FROM (VALUES (1), (2), (3)) AS v(n)"
SERVER_ERROR = "SELECT 1 / 0"  # 22012 division_by_zero, the server's own
# Statements a client may send before the rate limit refuses one: enough for the three above and a
# driver's own (asyncpg's type introspection), few enough that a loop of SELECT 1 reaches it fast.
BURST = 12
MAX_TRIES = 40


def _start(start_proxy: StartProxy, tmp_path: Path, mode: str) -> tuple[ProxyProcess, int]:
    policy_file = tmp_path / "cashier.yaml"
    policy_file.write_text(yaml.safe_dump(POLICY), encoding="utf-8")
    token_file = tmp_path / "admin-token"
    token_file.write_text(TOKEN + "\n", encoding="utf-8")
    admin_port = free_port()
    limits = {"max_rows_per_statement": 2, "statements": {"per_second": 0.01, "burst": BURST}}
    proxy = start_proxy(
        roles={"cashier": {"policy": str(policy_file), "limits": limits}},
        routes={"pos": {"pool": {"mode": mode}}},
        admin={"host": "127.0.0.1", "port": admin_port, "token": {"file": str(token_file)}},
    )
    proxy.wait_for_event("admin_listening")
    return proxy, admin_port


def _errors(admin_port: int, source: str, sqlstate: str) -> float | None:
    return _metric(admin_port, f'pos_proxy_client_errors_total{{source="{source}",sqlstate="{sqlstate}"}}')


def _assert_counted(admin_port: int, rate_limited: int = 1) -> None:
    """The refusal and both limits as the proxy's, the division by zero as the server's."""
    assert _errors(admin_port, "proxy", "42501") == 1
    assert _errors(admin_port, "proxy", "53400") == 1 + rate_limited  # result size, then statement rate
    assert _errors(admin_port, "server", "22012") == 1
    assert _errors(admin_port, "server", "42501") is None  # the refusal is not the server's
    assert _errors(admin_port, "server", "other") == 0


MODES = pytest.mark.parametrize("mode", ["session", "transaction"])


@MODES
@pytest.mark.skipif(shutil.which("psql") is None, reason="psql is not installed")
def test_psql_shows_the_proxys_errors_without_a_plpgsql_context(
    start_proxy: StartProxy, terminal_pki: TerminalPKI, tmp_path: Path, mode: str
) -> None:
    proxy, admin_port = _start(start_proxy, tmp_path, mode)
    script = "\n".join([f"{REFUSED};", f"{TOO_MANY_ROWS};", f"{SERVER_ERROR};", *["SELECT 1;"] * MAX_TRIES])
    conninfo = " ".join(
        f"{key}={value}" for key, value in proxy.conninfo(terminal_pki.cashier, terminal_pki.ca).items()
    )
    # VERBOSITY verbose: SQLSTATEs and the LOCATION (file, line, routine) of each error too;
    # SHOW_CONTEXT always: any CONTEXT the server sent is printed.
    result = subprocess.run(
        [
            "psql",
            conninfo,
            "-X",
            "-q",
            "-A",
            "-t",
            "-v",
            "VERBOSITY=verbose",
            "-v",
            "SHOW_CONTEXT=always",
            "-f",
            "-",
        ],
        input=script + "\n",
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    errors = [line.split("ERROR:  ", 1)[1] for line in result.stderr.splitlines() if "ERROR:  " in line]
    assert errors[:3] == [
        f"42501: {REFUSED_MESSAGE}",
        "53400: " + errors[1].removeprefix("53400: "),
        "22012: division by zero",
    ], result.stderr
    assert "rows per statement" in errors[1] or "row" in errors[1]
    # psql goes on after an error: every SELECT 1 past the burst is refused.
    rate_limited = errors[3:]
    assert rate_limited, result.stderr
    assert all(error.startswith("53400: statement rate limit") for error in rate_limited), result.stderr
    assert "CONTEXT" not in result.stderr
    assert "PL/pgSQL" not in result.stderr
    # Only the server's own error has a location in the server's source.
    locations = [line for line in result.stderr.splitlines() if "LOCATION:" in line]
    assert len(locations) == 1 and "int4div" in locations[0], result.stderr
    _assert_counted(admin_port, rate_limited=len(rate_limited))


@MODES
def test_psycopg_sees_the_proxys_fields_only(
    start_proxy: StartProxy, terminal_pki: TerminalPKI, tmp_path: Path, mode: str
) -> None:
    proxy, admin_port = _start(start_proxy, tmp_path, mode)
    with psycopg.connect(**proxy.conninfo(terminal_pki.cashier, terminal_pki.ca), autocommit=True) as till:
        with pytest.raises(psycopg.errors.InsufficientPrivilege) as refused:
            till.execute(REFUSED)
        with pytest.raises(psycopg.errors.ConfigurationLimitExceeded) as too_big:
            till.execute(TOO_MANY_ROWS).fetchall()
        with pytest.raises(psycopg.errors.DivisionByZero) as servers_own:
            till.execute(SERVER_ERROR)
        rate_limited = None
        for _ in range(MAX_TRIES):
            try:
                till.execute("SELECT 1")
            except psycopg.errors.ConfigurationLimitExceeded as exc:
                rate_limited = exc
                break
        assert rate_limited is not None, "the statement rate limit never refused"
    for raised, sqlstate in ((refused.value, "42501"), (too_big.value, "53400"), (rate_limited, "53400")):
        diag = raised.diag
        assert diag.sqlstate == sqlstate
        assert diag.context is None, diag.context
        assert (diag.source_file, diag.source_line, diag.source_function) == (None, None, None)
        assert diag.schema_name is None  # the proxy's mark does not reach the client
        assert diag.severity == "ERROR"
    assert refused.value.diag.message_primary == REFUSED_MESSAGE
    assert "rate limit" in str(rate_limited)
    # The server's own error keeps what the server said.
    assert servers_own.value.diag.source_function == "int4div"
    _assert_counted(admin_port)


@MODES
async def test_asyncpg_sees_the_proxys_fields_only(
    start_proxy: StartProxy, terminal_pki: TerminalPKI, tmp_path: Path, mode: str
) -> None:
    proxy, admin_port = _start(start_proxy, tmp_path, mode)
    till = await asyncpg.connect(
        host="127.0.0.1",
        port=proxy.port,
        user=terminal_pki.cashier.terminal,
        database="pos",
        ssl=proxy.ssl_context(terminal_pki.cashier, terminal_pki.ca),
        timeout=15,
        # Transaction pooling: no statement cache across server connections is needed for this.
        statement_cache_size=0 if mode == "transaction" else 100,
    )
    try:
        with pytest.raises(asyncpg.InsufficientPrivilegeError) as refused:
            await till.execute(REFUSED)
        with pytest.raises(asyncpg.ConfigurationLimitExceededError) as too_big:
            await till.fetch(TOO_MANY_ROWS)
        with pytest.raises(asyncpg.DivisionByZeroError) as servers_own:
            await till.fetchval(SERVER_ERROR)
        rate_limited = None
        for _ in range(MAX_TRIES):
            try:
                await till.fetchval("SELECT 1")
            except asyncpg.ConfigurationLimitExceededError as exc:
                rate_limited = exc
                break
        assert rate_limited is not None, "the statement rate limit never refused"
    finally:
        await till.close()
    for raised, sqlstate in ((refused.value, "42501"), (too_big.value, "53400"), (rate_limited, "53400")):
        assert raised.sqlstate == sqlstate
        assert raised.context is None, raised.context
        assert raised.schema_name is None
        assert (raised.server_source_filename, raised.server_source_function) == (None, None)
    assert refused.value.args[0] == REFUSED_MESSAGE
    assert servers_own.value.server_source_function == "int4div"
    _assert_counted(admin_port)
