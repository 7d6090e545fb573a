"""A cashier sends card data in every place a statement can carry it -- string constants in every quoting,
numbers, comments, PREPARE bodies, DDL, DO blocks, text that does not parse, bound parameters, a value
the server repeats in its error -- allowed and refused, in every policy mode. Not one copy of it may
reach the audit log, the operational log or the learn-mode review file: they are grepped whole."""

from __future__ import annotations

import contextlib
import json
import secrets
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import psycopg
import pytest
import yaml

from tests.integration.proxyproc import ProxyProcess, TerminalPKI

StartProxy = Callable[..., ProxyProcess]
PAN = "4111111111111111"
CVV = "cvv-737"
TABLE = "audit_cards"
SECRETS = (PAN, CVV)

# Statements a cashier may run, each carrying the card data somewhere.
ALLOWED = [
    f"SELECT * FROM {TABLE} WHERE pan = '{PAN}'",
    f"SELECT * FROM {TABLE} WHERE pan = E'{PAN}' AND note = '{CVV}'",
    f"SELECT * FROM {TABLE} WHERE pan = $${PAN}$$ OR pan = $tag${CVV}$tag$",
    f"SELECT * FROM {TABLE} WHERE pan = U&'{PAN}' OR note = U&'\\0063vv-737'",
    f"SELECT {PAN} AS pan, {PAN}.5 AS amount, {PAN}e3 AS big",
    f"SELECT 1 /* {PAN} {CVV} */",
    f"SELECT 1 -- {PAN} {CVV}\n",
    f"/* {PAN} */ SELECT * FROM {TABLE} WHERE id = 1 -- {CVV}",
    f"SELECT * FROM {TABLE} WHERE pan = '{PAN}' /* nested /* {CVV} */ {PAN} */",
]
# Statements the cashier's policy refuses (or that do not parse), each carrying the card data.
REFUSED = [
    f"DELETE FROM {TABLE} WHERE pan = '{PAN}'",
    f"CREATE TABLE stolen (pan text DEFAULT '{PAN}', note text DEFAULT '{CVV}')",
    f"PREPARE steal AS SELECT * FROM {TABLE} WHERE pan = $${PAN}$$ AND note = '{CVV}'",
    f"DO $$ BEGIN PERFORM '{PAN}', '{CVV}'; END $$",
    f"COPY {TABLE} TO '/tmp/{PAN}-{CVV}'",
    f"SELECT * FROM {TABLE} WHERE pan = '{PAN}'; DELETE FROM {TABLE} WHERE note = '{CVV}'",
    f"SELEC '{PAN}' /* {CVV} */",
    f"SELECT '{PAN} {CVV}",  # an unterminated string: not even the lexer can read it
    f"SELECT 1 /* {PAN} {CVV}",  # an unterminated comment
]


@pytest.fixture(scope="module")
def cards_table(pg_cluster: Any) -> Iterator[None]:
    with psycopg.connect(**pg_cluster.connect_kwargs(), autocommit=True) as connection:
        connection.execute(f"DROP TABLE IF EXISTS {TABLE}")
        connection.execute(f"CREATE TABLE {TABLE} (id int PRIMARY KEY, pan text UNIQUE, note text)")
    yield
    with psycopg.connect(**pg_cluster.connect_kwargs(), autocommit=True) as connection:
        # Monitor and learn mode let the refused statements run: one of them made a table.
        connection.execute(f"DROP TABLE IF EXISTS {TABLE}, stolen")


def _audited_proxy(start_proxy: StartProxy, directory: Path, mode: str) -> tuple[ProxyProcess, Path, Path]:
    policy = directory / "cashier.yaml"
    policy.write_text(
        yaml.safe_dump(
            {
                "mode": mode,
                "search_path": ["public"],
                "allow": {"kinds": ["SELECT", "INSERT"], "read": [TABLE], "write": [TABLE]},
            }
        ),
        encoding="utf-8",
    )
    key = directory / "audit.key"
    key.touch(mode=0o600)
    key.write_bytes(secrets.token_bytes(32))
    audit_log, review = directory / "audit.log", directory / "review.json"
    proxy = start_proxy(
        roles={"cashier": {"policy": str(policy)}},  # the manager has no policy: summaries only
        policy={"review_file": str(review)},
        audit={"file": str(audit_log), "key_file": str(key)},
    )
    return proxy, audit_log, review


def _run_everything(proxy: ProxyProcess, pki: TerminalPKI) -> None:
    for terminal in (pki.cashier, pki.manager):
        conninfo = proxy.conninfo(terminal, pki.ca, application_name=f"till {CVV}")
        with psycopg.connect(**conninfo, autocommit=True) as connection:
            simple = psycopg.ClientCursor(connection)  # the simple query protocol
            for sql in [*ALLOWED, *REFUSED]:
                for run in (simple.execute, connection.execute):
                    # Refused by the proxy or failed on the server: both must be logged clean.
                    with contextlib.suppress(psycopg.Error):
                        run(sql)
            # A value the server repeats in its error (DETAIL: Key (pan)=(...) already exists).
            insert = f"INSERT INTO {TABLE} (id, pan, note) VALUES (%s, %s, %s)"
            for attempt in (1, 2):
                try:
                    connection.execute(insert, (attempt, PAN, CVV))
                except psycopg.errors.UniqueViolation as exc:
                    assert PAN in str(exc.diag.message_detail)  # the client does see it


async def _run_prepared(proxy: ProxyProcess, pki: TerminalPKI) -> None:
    connection = await asyncpg.connect(
        host="127.0.0.1",
        port=proxy.port,
        user=pki.cashier.terminal,
        database="pos",
        ssl=proxy.ssl_context(pki.cashier, pki.ca),
        timeout=15,
    )
    try:
        # Named prepared statements: each execution is audited by its text, parameters never.
        for sql in ALLOWED[:3]:
            await connection.fetch(sql)
        await connection.fetch(f"SELECT * FROM {TABLE} WHERE pan = $1 AND note = $2", PAN, CVV)
        for sql in REFUSED[:3]:
            with contextlib.suppress(asyncpg.PostgresError):  # refused in enforce mode only
                await connection.fetch(sql)
    finally:
        await connection.close()


def _found(path: Path) -> list[str]:
    text = path.read_text(encoding="utf-8", errors="replace") if path.exists() else ""
    return [line for line in text.splitlines() if any(secret in line for secret in SECRETS)]


@pytest.mark.parametrize("mode", ["enforce", "monitor", "learn"])
async def test_no_literal_reaches_the_audit_log_the_operational_log_or_the_review_file(
    mode: str, start_proxy: StartProxy, terminal_pki: TerminalPKI, tmp_path: Path, cards_table: None
) -> None:
    proxy, audit_log, review = _audited_proxy(start_proxy, tmp_path, mode)
    _run_everything(proxy, terminal_pki)
    await _run_prepared(proxy, terminal_pki)
    proxy.stop()  # writes out the audit log and the review file

    records = [json.loads(line) for line in audit_log.read_text(encoding="utf-8").splitlines()]
    statements = [record for record in records if record["event"] == "statement"]
    # Everything was audited (so the grep below looks at the statements, not at an empty log).
    assert len(statements) >= 2 * 2 * (len(ALLOWED) + len(REFUSED)), len(statements)
    texts = {record["statement"] for record in statements}
    assert any(text.startswith("(not parsable: ") for text in texts), texts
    assert f"SELECT * FROM {TABLE} WHERE pan = $1" in texts
    assert "CREATE TABLE stolen (pan text DEFAULT $1, note text DEFAULT $2)" in texts
    if mode == "enforce":
        assert any(record["event"] == "policy_violation" for record in records)
    if mode == "learn":
        assert review.exists() and json.loads(review.read_text(encoding="utf-8"))

    leaks = {str(path): _found(path) for path in (audit_log, proxy.log_path, review)}
    assert leaks == {str(audit_log): [], str(proxy.log_path): [], str(review): []}


def test_quoted_identifiers_are_kept_because_they_name_what_was_touched(
    start_proxy: StartProxy, terminal_pki: TerminalPKI, tmp_path: Path, cards_table: None
) -> None:
    """Identifiers are not values: the log must name the tables a statement touched (PCI DSS 10.2.2)."""
    proxy, audit_log, _review = _audited_proxy(start_proxy, tmp_path, "enforce")
    conninfo = proxy.conninfo(terminal_pki.cashier, terminal_pki.ca)
    with (
        psycopg.connect(**conninfo, autocommit=True) as connection,
        pytest.raises(psycopg.errors.InsufficientPrivilege),
    ):
        connection.execute("SELECT * FROM \"till_secrets\" WHERE note = 'x'")
    proxy.stop()
    records = [json.loads(line) for line in audit_log.read_text(encoding="utf-8").splitlines()]
    logged = [record["statement"] for record in records if record["event"] == "statement"]
    assert logged == ['SELECT * FROM "till_secrets" WHERE note = $1']
