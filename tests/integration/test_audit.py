"""The audit log a real proxy writes: required fields, every execution, rotation, SIGTERM, tampering."""

from __future__ import annotations

import asyncio
import json
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import asyncpg
import psycopg
import pytest
import yaml

from tests.integration.proxyproc import ProxyProcess, TerminalPKI

StartProxy = Callable[..., ProxyProcess]


def _audit_files(directory: Path) -> list[Path]:
    return [*sorted(directory.glob("audit.log.*")), directory / "audit.log"]


def _records(directory: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for path in _audit_files(directory) for line in path.read_text().splitlines()]


def _verify(key: Path, files: list[Path]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "proxy", "audit", "verify", "--key", str(key), *map(str, files)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.fixture
def audited(start_proxy: StartProxy, tmp_path: Path) -> tuple[ProxyProcess, Path, Path]:
    directory = tmp_path / "audit"
    directory.mkdir()
    key = tmp_path / "audit.key"
    key.touch(mode=0o600)
    key.write_bytes(secrets.token_bytes(32))
    proxy = start_proxy(
        audit={"file": str(directory / "audit.log"), "key_file": str(key), "rotate_bytes": "64KiB"},
        routes={"pos": {"pool": {"mode": "transaction", "size": 3, "max_client_wait": "30s"}}},
    )
    return proxy, directory, key


async def test_every_execution_is_audited_across_rotation_and_sigterm(
    audited: tuple[ProxyProcess, Path, Path], terminal_pki: TerminalPKI
) -> None:
    proxy, directory, key = audited
    clients, rounds = 10, 30

    async def till(number: int) -> None:
        connection = await asyncpg.connect(
            host="127.0.0.1",
            port=proxy.port,
            user="till-01",
            database="pos",
            ssl=proxy.ssl_context(terminal_pki.cashier, terminal_pki.ca),
            timeout=15,
        )
        try:
            for value in range(rounds):
                # asyncpg prepares once and then only binds and executes: each run is audited.
                assert await connection.fetchval("SELECT $1::int + 0", value) == value
        finally:
            await connection.close()

    await asyncio.wait_for(asyncio.gather(*(till(n) for n in range(clients))), 120)
    assert proxy.stop() == 0
    statements = [r for r in _records(directory) if r["event"] == "statement"]
    assert len(statements) == clients * rounds
    assert len(_audit_files(directory)) > 1, "rotation happened"
    sample = statements[0]
    for key_name in (
        "timestamp",
        "seq",
        "prev",
        "hmac",
        "component",
        "host",
        "outcome",
        "source",
        "store",
        "terminal",
        "role",
        "serial",
        "route",
        "decision",
        "fingerprints",
        "statement",
    ):
        assert key_name in sample, key_name
    assert sample["statement"] == "SELECT $1::int + $2"  # literals normalized away
    result = _verify(key, _audit_files(directory))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "OK:" in result.stdout


def test_connection_events_carry_pci_fields_and_tampering_is_detected(
    audited: tuple[ProxyProcess, Path, Path], terminal_pki: TerminalPKI
) -> None:
    proxy, directory, key = audited
    with psycopg.connect(
        **proxy.conninfo(terminal_pki.manager, terminal_pki.ca), autocommit=True
    ) as connection:
        connection.execute("SELECT 4111111111111111 AS card")
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(**proxy.conninfo(terminal_pki.unmapped_role, terminal_pki.ca)).close()
    assert proxy.stop() == 0
    records = _records(directory)
    accepted = next(r for r in records if r["event"] == "connection_accepted")
    assert accepted["outcome"] == "success"
    assert accepted["tls_version"] in ("TLSv1.2", "TLSv1.3")
    assert accepted["cipher"] and len(accepted["fingerprint_sha256"]) == 64
    assert accepted["terminal"] == "office-01" and accepted["role"] == "manager"
    refused = next(r for r in records if r["event"] == "connection_refused")
    assert refused["outcome"] == "failure" and "auditor" in refused["reason"]
    ended = next(r for r in records if r["event"] == "session_end")
    assert ended["statements"] == 1 and ended["bytes_to_terminal"] > 0
    assert "4111111111111111" not in (directory / "audit.log").read_text()  # literals never reach the log

    live = directory / "audit.log"
    lines = live.read_text().splitlines(keepends=True)
    assert _verify(key, [live]).returncode == 0
    altered = [line.replace('"success"', '"failure"', 1) if i == 2 else line for i, line in enumerate(lines)]
    live.write_text("".join(altered))
    result = _verify(key, [live])
    assert result.returncode == 1 and "altered" in result.stdout
    live.write_text("".join(lines[:2] + lines[3:]))
    result = _verify(key, [live])
    assert result.returncode == 1 and "removed" in result.stdout
    live.write_text("".join(lines)[:-10])
    result = _verify(key, [live])
    assert result.returncode == 1 and "truncated" in result.stdout


def test_a_statement_the_proxy_refuses_outside_any_policy_is_audited_as_refused(
    audited: tuple[ProxyProcess, Path, Path], terminal_pki: TerminalPKI
) -> None:
    """A switch to a client encoding the proxy cannot read is refused for every role, also one
    without a policy: its statement records say refused (with the rule), not allowed, also those
    of the Execute that follows a refused Parse (prepared, or unnamed in the same batch)."""
    proxy, directory, _key = audited
    with psycopg.connect(
        **proxy.conninfo(terminal_pki.manager, terminal_pki.ca), autocommit=True
    ) as connection:
        for options in ({}, {"prepare": True}, {"binary": True}):
            with pytest.raises(psycopg.errors.FeatureNotSupported):
                connection.execute("SET client_encoding TO 'SJIS'", **options)  # type: ignore[arg-type]
            assert connection.execute("SELECT 1").fetchone() == (1,)
    assert proxy.stop() == 0
    records = _records(directory)
    statements = [r for r in records if r["event"] == "statement"]
    switches = [r for r in statements if r["statement"] == "SET client_encoding TO $1"]
    assert len(switches) >= 3, switches
    for switch in switches:
        assert (switch["decision"], switch["outcome"], switch["rule"]) == (
            "refused",
            "failure",
            "client encoding",
        )
    assert {r["decision"] for r in statements if r["statement"] == "SELECT $1"} == {"allowed"}
    assert sum(r["event"] == "unsupported_client_encoding" and "SJIS" in r["reason"] for r in records) == 3


def test_a_bound_switch_refused_at_bind_is_audited_as_refused(
    audited: tuple[ProxyProcess, Path, Path], terminal_pki: TerminalPKI
) -> None:
    """set_config with its values bound is decided at Bind: the refusal is audited there, and
    the Execute behind the refused Bind is recorded as refused too."""
    proxy, directory, _key = audited
    with psycopg.connect(
        **proxy.conninfo(terminal_pki.manager, terminal_pki.ca), autocommit=True
    ) as connection:
        for options in ({}, {"prepare": True}, {"binary": True}):
            with pytest.raises(psycopg.errors.FeatureNotSupported):
                connection.execute(  # type: ignore[call-overload]
                    "SELECT set_config(%s, %s, false)", ("client_encoding", "SJIS"), **options
                )
            assert connection.execute("SELECT 1").fetchone() == (1,)
    assert proxy.stop() == 0
    records = _records(directory)
    switches = [r for r in records if r["event"] == "statement" and "set_config" in r["statement"]]
    assert {(r["decision"], r["rule"]) for r in switches} == {("refused", "client encoding")}, switches
    assert sum(r.get("on") == "bind" for r in switches) == 3, switches
    assert sum(r["event"] == "unsupported_client_encoding" and "SJIS" in r["reason"] for r in records) == 3


async def test_executions_are_audited_with_their_text_after_many_statements_were_closed(
    audited: tuple[ProxyProcess, Path, Path], terminal_pki: TerminalPKI
) -> None:
    """asyncpg with a small statement cache closes statements as it goes: once more texts are kept
    than the client holds statements (session.py _STALE_TEXTS), the stale ones are dropped, never
    the one just parsed, so every execution's record still names its statement."""
    proxy, directory, _key = audited
    connection = await asyncpg.connect(
        host="127.0.0.1",
        port=proxy.port,
        user="till-01",
        database="pos",
        ssl=proxy.ssl_context(terminal_pki.cashier, terminal_pki.ca),
        timeout=15,
        statement_cache_size=2,
    )
    try:
        for number in range(30):
            assert await connection.fetchval(f"SELECT {number}::int AS column_{number}") == number
    finally:
        await connection.close()
    assert proxy.stop() == 0
    audited_texts = [r["statement"] for r in _records(directory) if r["event"] == "statement"]
    for number in range(30):
        assert f"SELECT $1::int AS column_{number}" in audited_texts, number


def test_a_reload_that_moves_the_audit_file_keeps_the_running_log_and_says_so(
    audited: tuple[ProxyProcess, Path, Path], terminal_pki: TerminalPKI, tmp_path: Path
) -> None:
    """The file (like the key, witness and writer settings) stays as started until a restart, the
    reload log line and its audit record name what was not applied, and the chain stays whole; the
    sampling share of allowed statements follows the reload."""
    proxy, directory, key = audited
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    config = yaml.safe_load(proxy.config_path.read_text(encoding="utf-8"))
    config["audit"].update(file=str(elsewhere / "audit.log"), allowed_statements=0.0)
    proxy.config_path.write_text(yaml.safe_dump(config), encoding="utf-8")

    for reloads in (1, 2):  # every reload of that file says so again, not only the first
        proxy.signal(signal.SIGHUP)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            applied = [r for r in proxy.log_events() if r.get("event") == "reload_applied"]
            if len(applied) == reloads:
                break
            time.sleep(0.05)
        assert len(applied) == reloads, proxy.log_text()[-3000:]
        assert applied[-1]["not_applied"] == ["audit.file"]
        assert ("audit.allowed_statements" in applied[-1]["changed"]) is (reloads == 1)
    warning = proxy.wait_for_event("reload_audit_unchanged")
    assert warning["keys"] == ["audit.file"] and warning["file"] == str(directory / "audit.log")

    with psycopg.connect(
        **proxy.conninfo(terminal_pki.manager, terminal_pki.ca), autocommit=True
    ) as connection:
        connection.execute("SELECT 1")
    assert proxy.stop() == 0
    assert not (elsewhere / "audit.log").exists()
    records = _records(directory)
    reloaded = [r for r in records if r["event"] == "config_reload"]
    assert [r["not_applied"] for r in reloaded] == [["audit.file"], ["audit.file"]]
    assert any(r["event"] == "connection_accepted" for r in records)
    assert not any(r["event"] == "statement" for r in records)  # allowed_statements: 0.0 applied
    result = _verify(key, _audit_files(directory))
    assert result.returncode == 0, result.stdout + result.stderr
