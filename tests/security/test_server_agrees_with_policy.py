"""Differential test: what the server executed is exactly what the proxy's policy allowed.

A PostgreSQL 15 cluster of this module's own logs every statement it executes (``log_statement =
all``, JSON log). The corpus (crosscheck_corpus.yaml plus the cashier cases of
tests/unit/policy_corpus.yaml) goes through the real proxy with psql, psycopg (simple and
extended, prepared statements re-used), asyncpg (simple and extended) and a raw protocol client,
in every client encoding the proxy accepts (and, for encoding attacks, in client-only encodings
it should refuse), as a cashier whose policy is in enforce mode, under session and transaction
pooling; a monitor-mode and a learn-mode pass send the corpus again, so that statements the policy
refuses reach the server too and the two readings can be compared.

Every statement the server logged as executed on the proxy's server connections is read as
PostgreSQL read it (the log is in the server encoding, after conversion from the client's) and
fingerprinted with libpg_query; each fingerprint must be among those the proxy audited as allowed
(audit log ``statement`` records) for the same corpus entry, and in enforce mode the cashier's
policy must allow the text as the server read it (fingerprints ignore constants). The proxy's own
statements are recognised by their exact text and place, never by loose matching: parameter syncs
(to the byte the proxy's own ``sync_query`` renders them, resetting only settings the clients
have, setting only those they asked for and their policy's search_path), ``DISCARD ALL`` closing a lease,
and the ``DO`` blocks that raise a refusal on the server, which must be, to the byte, the block the
proxy's own ``Refusal`` builds for one of the entry's audited refusal reasons (the policy's in enforce
mode; a refused client-encoding switch in every mode) and never count as allowed. Re-prepared
statements are Parse messages, which the server does not log as executed; the proxy runs no health
checks. Where the proxy's decision depends on the client encoding (RESET ALL and DISCARD ALL), the
corpus says so per encoding. Each client sends a marker (``SELECT 1 AS xcheck_<run>_<item>``)
before each entry, so both logs can be cut per entry.
"""

from __future__ import annotations

import asyncio
import codecs
import json
import re
import secrets
import shutil
import subprocess
import time
from collections import defaultdict
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import psycopg
import pytest
import yaml
from pglast import split
from pglast.parser import ParseError, fingerprint

from proxy import certs
from proxy.config.load import load_config
from proxy.localpg import LocalPostgres, LocalPostgresTLS, find_pg_bindir
from proxy.policy import encodings
from proxy.policy.engine import PolicyEngine, judge
from proxy.policy.model import RolePolicy
from proxy.protocols.postgres import messages as m
from proxy.protocols.postgres.parameters import SessionParameters, quote_literal, sync_query
from proxy.protocols.postgres.refusal import PROXY_ERROR_MARK, Refusal
from tests.integration.proxyproc import ProxyProcess, Terminal, TerminalPKI, proxy_config
from tests.integration.test_postgres_robustness import PeerClosed, RawClient, tls_client

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
CORPUS_FILE = HERE / "crosscheck_corpus.yaml"
POLICY_CORPUS_FILE = ROOT / "tests" / "unit" / "policy_corpus.yaml"
SHIPPED_CASHIER_POLICY = ROOT / "proxy" / "data" / "policies" / "cashier.yaml"
DEMO_SCHEMA = ROOT / "proxy" / "data" / "demo_schema.sql"

# The client encodings the proxy accepts, with the Python codec that writes the corpus in each.
# SQL_ASCII: the server does not convert, it only checks the bytes are valid in its own
# encoding (UTF-8), so UTF-8 bytes are what such a client sends. Extend here.
ENCODINGS: Mapping[str, str] = {
    "UTF8": "utf-8",
    "SQL_ASCII": "utf-8",
    "LATIN1": "latin-1",
    "WIN1252": "cp1252",
    "EUC_KR": "euc_kr",
    "EUC_CN": "gb2312",
    "EUC_JP": "euc_jp",
    "EUC_JIS_2004": "euc_jis_2004",
    "KOI8R": "koi8_r",
}
# The other accepted encodings: single-byte ones of the same family as LATIN1, WIN1252 and KOI8R
# (every byte one character, ASCII below 0x80). The corpus goes through them with one driver,
# which is enough to show the proxy reads them as the server does (the drivers differ in how
# they frame a statement, not in how they encode it); each byte is also compared with the
# server's own conversion in tests/security/test_client_encodings.py.
ONE_DRIVER_ENCODINGS: Mapping[str, str] = {
    name: encodings.python_codec(name)
    for name in (
        *("LATIN2", "LATIN3", "LATIN4", "LATIN5", "LATIN6", "LATIN7", "LATIN8", "LATIN9", "LATIN10"),
        *("ISO_8859_5", "ISO_8859_6", "ISO_8859_7", "ISO_8859_8", "KOI8U", "WIN866", "WIN874"),
        *("WIN1250", "WIN1251", "WIN1253", "WIN1254", "WIN1255", "WIN1256", "WIN1257", "WIN1258"),
    )
}
ONE_DRIVER = "psycopg-extended"
ALL_ENCODINGS: Mapping[str, str] = {**ENCODINGS, **ONE_DRIVER_ENCODINGS}
DRIVERS = ("psql", "psycopg", "psycopg-extended", "asyncpg", "asyncpg-extended", "raw")
DEFAULT_DRIVERS = ("psql", "psycopg", "psycopg-extended", "asyncpg", "asyncpg-extended")
# Cases of the unit policy corpus go through fewer drivers and encodings (one single-byte, one
# multibyte besides UTF-8): they test the policy more than the wire.
POLICY_CORPUS_DRIVERS = ("psycopg", "psycopg-extended")
POLICY_CORPUS_ENCODINGS = ("UTF8", "LATIN1", "EUC_KR")
# Monitor and learn passes: the statements really run there, as a server role with no privileges.
MONITOR_RUNS = (
    ("monitor", "psycopg", "UTF8"),
    ("monitor", "psycopg", "LATIN1"),
    ("monitor", "psycopg-extended", "UTF8"),
    ("learn", "psql", "LATIN1"),
)
# Under transaction pooling a client's statements land on whichever server connection is free,
# after the proxy synced its settings there: the cashier again, on a route of its own.
TRANSACTION_RUNS = (
    ("enforce", "psycopg-extended", "UTF8", "transaction"),
    ("enforce", "asyncpg-extended", "LATIN1", "transaction"),
    ("enforce", "psql", "EUC_KR", "transaction"),
    ("enforce", "raw", "KOI8R", "transaction"),
)

# Within the route's pool of 3 server connections (tests/integration/proxyproc.py proxy_config).
CONCURRENT_RUNS = 3

SERVER_USER = "pos_proxy"
MONITOR_SERVER_USER = "xcheck_monitor"
MONITOR_DATABASE = "pos_monitor"
TRANSACTION_SERVER_USER = "xcheck_transaction"
TRANSACTION_DATABASE = "pos_transaction"
# The tables the policy names besides the demo schema's (see the corpus header).
LONG_ALLOWED = "long_allowed_" + "x" * 50
LONG_SECRET = "long_secret_" + "x" * 51
MULTIBYTE_TABLE = "é" * 31
EXTRA_SCHEMA = f"""
CREATE TABLE customers (id int PRIMARY KEY, card text);
CREATE TABLE "SALES" (id int);
CREATE TABLE {LONG_ALLOWED} (id int);
CREATE TABLE {LONG_SECRET} (id int);
CREATE TABLE "catégories" (id int);
CREATE TABLE "catÃ©gories" (secret text);
CREATE TABLE "{MULTIBYTE_TABLE}" (id int);
INSERT INTO "catÃ©gories" VALUES ('the secret twin');
CREATE SEQUENCE payroll_id_seq;
CREATE SCHEMA dba;
CREATE FUNCTION dba.lower(text) RETURNS text LANGUAGE sql AS 'SELECT $1';
GRANT ALL ON ALL TABLES IN SCHEMA public TO {SERVER_USER}, {TRANSACTION_SERVER_USER};
GRANT ALL ON ALL SEQUENCES IN SCHEMA public TO {SERVER_USER}, {TRANSACTION_SERVER_USER};
ALTER ROLE {MONITOR_SERVER_USER} SET statement_timeout = '2s';
"""
# log_statement = all, one JSON object per record in <datadir>/log/server.json.
SERVER_LOG_SETTINGS = {
    "log_statement": "all",
    "logging_collector": "on",
    "log_destination": "jsonlog",
    "log_directory": "log",
    "log_filename": "server.log",
    "log_rotation_age": "0",
    "log_rotation_size": "0",
    "log_file_mode": "0640",
}

# Statements a driver sends on its own that the cashier's policy refuses: psycopg 3 sends
# DEALLOCATE ALL after a ROLLBACK (or DISCARD ALL, DROP, ALTER) while it has prepared statements.
DRIVER_STATEMENTS: Mapping[str, frozenset[str]] = {"psycopg-extended": frozenset({"DEALLOCATE ALL"})}

MARKER = "SELECT 1 AS xcheck_{run}_{item}"
APPLICATION_NAME = "xcheck-{run}"
_APPLICATION_NAME = re.compile(r"xcheck-\d+")
_MARKER_TEXT = re.compile(r"SELECT (?:1|\$1) AS xcheck_(\d+)_(\d+)")
# What quote_literal (proxy/protocols/postgres/parameters.py) produces: E'...' with \\ and ''.
_E_LITERAL = r"E'((?:[^'\\]|''|\\\\)*)'"
# A set_config call of the proxy's parameter sync: a setting's name, and its value or NULL (a reset).
_SET_CONFIG_CALL = re.compile(rf"pg_catalog\.set_config\({_E_LITERAL}, (NULL|{_E_LITERAL}), false\)")
# The settings the proxy syncs for this test's clients: what they ask for at startup, and the
# search_path of their role's policy (SessionParameters.follow_policy).
SYNCED_SETTINGS = frozenset({"application_name", "client_encoding", "search_path"})
# proxy/protocols/postgres/refusal.py: Refusal.raising_block, a raising body between random dollar
# quotes; the body itself is compared with Refusal.raising_body of one of the entry's refusal reasons.
_REFUSAL_BLOCK = re.compile(r"DO (\$refused_[0-9a-f]{12}\$)(.*)\1", re.S)
_PROXY_MARK = re.compile(r"SCHEMA = E'pos_proxy_[0-9a-f]{16}'")
_REFUSAL_SQLSTATE = re.compile(r"BEGIN RAISE EXCEPTION USING ERRCODE = E'([0-9A-Z]{5})'")
# Audit events that give the reason of a refusal the proxy makes the server raise: the policy's
# (enforce mode), the client-encoding switch refused in every mode and without a policy, and a
# malformed Query (a NUL inside its text).
REFUSAL_EVENTS = frozenset({"policy_violation", "unsupported_client_encoding", "malformed_message"})
_EXECUTE_MESSAGE = re.compile(r"execute(?: fetch from)? ([^:]*): (.*)", re.S)


def _unquote(literal: str) -> str:
    return literal.replace("''", "'").replace("\\\\", "\\")


# --- the corpus --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Entry:
    id: str
    texts: tuple[str | bytes, ...]  # str: encoded per run; bytes: sent as they are
    expect: str
    params: tuple[object, ...] | None
    drivers: tuple[str, ...]
    encodings: tuple[str, ...]
    isolate: bool
    monitor: bool
    xfail_reason: str | None
    startup: Mapping[str, str] = field(default_factory=dict)  # extra startup parameters (raw driver)
    expect_in: Mapping[str, str] = field(default_factory=dict)  # per client encoding, over expect

    def expected(self, encoding: str) -> str:
        return self.expect_in.get(encoding, self.expect)

    def payloads(self, codec: str) -> tuple[bytes, ...] | None:
        """The entry's statements in this codec, or None where one cannot be written in it."""
        try:
            return tuple(text if isinstance(text, bytes) else text.encode(codec) for text in self.texts)
        except UnicodeEncodeError:
            return None


_ENTRY_KEYS = frozenset(
    {"id", "sql", "sql_escaped", "expect", "params", "drivers", "encodings", "isolate", "monitor", "note"}
    | {"xfail_reason", "startup", "expect_in"}
)
_POLICY_CASE_KEYS = frozenset({"id", "expect_in", "note"})


def _expect_in(raw: Mapping[str, Any]) -> dict[str, str]:
    expect_in = {str(encoding): str(expect) for encoding, expect in raw.get("expect_in", {}).items()}
    assert set(expect_in.values()) <= {"allowed", "refused"}, raw
    return expect_in


def _entry(raw: Mapping[str, Any]) -> Entry:
    unknown = set(raw) - _ENTRY_KEYS
    assert not unknown, f"{raw.get('id')}: unknown keys {sorted(unknown)}"
    assert raw["expect"] in ("allowed", "refused"), raw
    texts: tuple[str | bytes, ...]
    if "sql_escaped" in raw:
        escaped = raw["sql_escaped"]
        texts = tuple(
            codecs.escape_decode(text.encode("utf-8"))[0]
            for text in (escaped if isinstance(escaped, list) else [escaped])
        )
        drivers = tuple(raw.get("drivers", ("raw",)))
    else:
        sql = raw["sql"]
        texts = tuple(sql) if isinstance(sql, list) else (sql,)
        drivers = tuple(raw.get("drivers", DEFAULT_DRIVERS))
    assert set(drivers) <= set(DRIVERS), raw
    assert not ("sql_escaped" in raw and any(d.startswith("asyncpg") for d in drivers)), (
        f"{raw['id']}: asyncpg cannot send chosen bytes (it writes every query in UTF-8)"
    )
    assert "startup" not in raw or set(drivers) == {"raw"}, (
        f"{raw['id']}: startup parameters need the raw driver"
    )
    return Entry(
        id=raw["id"],
        texts=texts,
        expect=raw["expect"],
        params=tuple(raw["params"]) if "params" in raw else None,
        drivers=drivers,
        encodings=tuple(raw.get("encodings", ALL_ENCODINGS)),
        isolate=bool(raw.get("isolate", "startup" in raw)),
        monitor=bool(raw.get("monitor", True)),
        xfail_reason=raw.get("xfail_reason"),
        startup={str(name): str(value) for name, value in raw.get("startup", {}).items()},
        expect_in=_expect_in(raw),
    )


def _load_entries() -> list[Entry]:
    corpus = yaml.safe_load(CORPUS_FILE.read_text(encoding="utf-8"))
    entries = [_entry(raw) for raw in corpus["entries"]]
    policy_cases = {raw["id"]: raw for raw in corpus.get("policy_cases", [])}
    for raw in policy_cases.values():
        assert set(raw) <= _POLICY_CASE_KEYS, f"policy_cases {raw['id']}: unknown keys"
    cashier_cases = set()
    for case in yaml.safe_load(POLICY_CORPUS_FILE.read_text(encoding="utf-8"))["cases"]:
        if case["role"] != "cashier":
            continue
        cashier_cases.add(case["id"])
        entries.append(
            Entry(
                id=f"policy/{case['id']}",
                texts=(case["sql"],),
                expect="allowed" if case["expect"] == "allow" else "refused",
                params=None,
                drivers=POLICY_CORPUS_DRIVERS,
                encodings=POLICY_CORPUS_ENCODINGS,
                # Session-level SETs would change how the rest of the run is read.
                isolate=bool(re.match(r"\s*(SET|RESET|DISCARD)\b|.*set_config", case["sql"], re.I | re.S)),
                monitor=False,
                xfail_reason=None,
                expect_in=_expect_in(policy_cases.get(case["id"], {})),
            )
        )
    assert set(policy_cases) <= cashier_cases, sorted(set(policy_cases) - cashier_cases)
    ids = [entry.id for entry in entries]
    assert len(ids) == len(set(ids)), "corpus ids must be unique"
    return entries


ENTRIES = _load_entries()


# --- what the clients did ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Run:
    """One client session pattern: a policy mode, a driver and a client encoding."""

    number: int
    mode: str  # enforce | monitor | learn
    driver: str
    encoding: str
    pooling: str = "session"  # or "transaction"

    @property
    def label(self) -> str:
        pooling = "" if self.pooling == "session" else f"/{self.pooling} pooling"
        return f"{self.mode}/{self.driver}/{self.encoding}{pooling}"


@dataclass(frozen=True, slots=True)
class Item:
    """One corpus entry as one run sends it."""

    number: int
    entry: Entry
    payloads: tuple[bytes, ...]


@dataclass(slots=True)
class Sent:
    """What the client side saw for one item: errors per statement, or why nothing was sent."""

    errors: list[str] = field(default_factory=list)
    connection_refused: str | None = None


# --- drivers: each sends the marker, the entry's statements and a ROLLBACK when needed ---------------


@dataclass(frozen=True, slots=True)
class Target:
    proxy: ProxyProcess
    pki: TerminalPKI
    terminal: Terminal
    database: str

    def conninfo(self, encoding: str, run: Run) -> dict[str, Any]:
        return self.proxy.conninfo(
            self.terminal,
            self.pki.ca,
            dbname=self.database,
            client_encoding=encoding,
            application_name=APPLICATION_NAME.format(run=run.number),
        )


def _chunks(items: Sequence[Item]) -> Iterator[list[Item]]:
    """Consecutive items that share one connection; an isolated item gets one of its own."""
    chunk: list[Item] = []
    for item in items:
        if item.entry.isolate:
            if chunk:
                yield chunk
            yield [item]
            chunk = []
        else:
            chunk.append(item)
    if chunk:
        yield chunk


def _marker(run: Run, item: Item) -> str:
    return MARKER.format(run=run.number, item=item.number)


def run_psql(target: Target, run: Run, items: Sequence[Item]) -> dict[int, Sent]:
    sent: dict[int, Sent] = {}
    info = target.conninfo(run.encoding, run)
    conninfo = " ".join(f"{key}='{value}'" for key, value in info.items() if key != "client_encoding")
    for chunk in _chunks(items):
        if any(b"\x00" in payload for item in chunk for payload in item.payloads):
            for item in chunk:
                sent[item.number] = Sent(connection_refused="psql cannot send NUL bytes")
            continue
        argv: list[str | bytes] = [
            shutil.which("psql") or str(find_pg_bindir() / "psql"),
            "-X",
            "-q",
            "-v",
            "ON_ERROR_STOP=0",
            "-d",
            conninfo,
        ]
        for item in chunk:
            argv += ["-c", _marker(run, item)]
            for payload in item.payloads:
                argv += ["-c", payload]
            argv += ["-c", "ROLLBACK"]
        result = subprocess.run(
            argv,
            env={"PGCLIENTENCODING": run.encoding, "PATH": "/usr/bin:/bin", "PGCONNECT_TIMEOUT": "10"},
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=120,
            check=False,
        )
        stderr = result.stderr.decode("utf-8", "replace")
        refused = stderr if result.returncode == 2 and "connection to server" in stderr else None
        for item in chunk:
            sent[item.number] = Sent(errors=[stderr[-2000:]] if stderr else [], connection_refused=refused)
    return sent


def _psycopg_connect(target: Target, run: Run) -> psycopg.Connection[Any]:
    connection = psycopg.connect(**target.conninfo(run.encoding, run), autocommit=True)
    # Never evict: psycopg would DEALLOCATE by SQL, which the cashier's policy refuses.
    connection.prepared_max = 100_000
    return connection


def run_psycopg(target: Target, run: Run, items: Sequence[Item]) -> dict[int, Sent]:
    extended = run.driver == "psycopg-extended"
    sent: dict[int, Sent] = {}
    for chunk in _chunks(items):
        try:
            connection = _psycopg_connect(target, run)
        except psycopg.OperationalError as exc:
            for item in chunk:
                sent[item.number] = Sent(connection_refused=str(exc))
            continue
        try:
            for item in chunk:
                outcome = sent[item.number] = Sent()
                if connection.closed:
                    connection = _psycopg_connect(target, run)
                # A refused DEALLOCATE ALL psycopg had queued fails the first try, not the marker.
                for _attempt in range(2):
                    try:
                        connection.execute(_marker(run, item).encode())
                        break
                    except psycopg.errors.InsufficientPrivilege as exc:
                        outcome.errors.append(f"before the marker: {exc}")
                cursor = psycopg.RawCursor(connection)
                for payload in item.payloads:
                    params = list(item.entry.params or ())
                    # Extended: the unnamed statement once, then a named one prepared and re-used.
                    attempts = (
                        [{"binary": True}, {"prepare": True}, {"prepare": True}]
                        if extended
                        else [{"prepare": False}]
                    )
                    for options in attempts:
                        try:
                            cursor.execute(payload, params if extended else None, **options)  # type: ignore[arg-type]
                        except (psycopg.Error, ValueError) as exc:
                            outcome.errors.append(f"{type(exc).__name__}: {exc}")
                            if connection.closed:
                                break
                if (
                    not connection.closed
                    and connection.info.transaction_status != psycopg.pq.TransactionStatus.IDLE
                ):
                    connection.pgconn.exec_(b"ROLLBACK")  # past psycopg's queued statement maintenance
        finally:
            connection.close()
    return sent


def run_asyncpg(target: Target, run: Run, items: Sequence[Item]) -> dict[int, Sent]:
    return asyncio.run(_run_asyncpg(target, run, items))


async def _run_asyncpg(target: Target, run: Run, items: Sequence[Item]) -> dict[int, Sent]:
    extended = run.driver == "asyncpg-extended"
    sent: dict[int, Sent] = {}
    context = target.proxy.ssl_context(target.terminal, target.pki.ca)

    async def connect() -> asyncpg.Connection:
        return await asyncpg.connect(
            host="127.0.0.1",
            port=target.proxy.port,
            user=target.terminal.terminal,
            database=target.database,
            ssl=context,
            timeout=10,
            command_timeout=30,
            server_settings={
                "client_encoding": run.encoding,
                "application_name": APPLICATION_NAME.format(run=run.number),
            },
        )

    for chunk in _chunks(items):
        try:
            connection = await connect()
        except (OSError, asyncpg.PostgresError) as exc:
            for item in chunk:
                sent[item.number] = Sent(connection_refused=str(exc))
            continue
        try:
            for item in chunk:
                outcome = sent[item.number] = Sent()
                if connection.is_closed():
                    connection = await connect()
                await connection.execute(_marker(run, item))
                for text in item.entry.texts:
                    assert isinstance(text, str)
                    # asyncpg re-uses its cached prepared statement on the second fetch.
                    for _ in range(2 if extended else 1):
                        try:
                            if extended:
                                await connection.fetch(text, *(item.entry.params or ()))
                            else:
                                await connection.execute(text)
                        except (asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
                            outcome.errors.append(f"{type(exc).__name__}: {exc}")
                        except AttributeError as exc:  # asyncpg 0.32 on an empty query: start afresh
                            outcome.errors.append(f"asyncpg failed: {exc!r}")
                            connection.terminate()
                        if connection.is_closed():
                            break
                if not connection.is_closed() and connection.is_in_transaction():
                    await connection.execute("ROLLBACK")
        finally:
            await connection.close(timeout=5)
    return sent


def _raw_query(client: RawClient, payload: bytes) -> tuple[list[str], bytes]:
    """One Query with exactly these bytes; (error messages, transaction status)."""
    client.send(m.build_message(b"Q", payload + b"\x00"))
    errors: list[str] = []
    while True:
        kind, body = client.read_message()
        if kind == b"G":  # CopyInResponse: no data to give
            client.send(m.build_message(b"f", b"no data\x00"))
        elif kind == b"E":
            fields = m.parse_error_fields(body)
            errors.append(f"{fields.get('C')} {fields.get('M')}")
            if fields.get("S") == "FATAL":
                raise PeerClosed("; ".join(errors))
        elif kind == b"Z":
            return errors, body


def run_raw(target: Target, run: Run, items: Sequence[Item]) -> dict[int, Sent]:
    sent: dict[int, Sent] = {}

    def connect(extra: Mapping[str, str]) -> RawClient:
        client = tls_client(target.proxy, target.pki, target.terminal)
        startup = {
            "user": target.terminal.terminal,
            "database": target.database,
            "client_encoding": run.encoding,
            "application_name": APPLICATION_NAME.format(run=run.number),
            **extra,
        }
        client.send(m.build_startup_message(startup))
        received = client.read_until_ready()
        if received[-1][0] != b"Z":
            client.close()
            raise PeerClosed(str(m.parse_error_fields(received[-1][1])))
        return client

    for chunk in _chunks(items):
        try:
            client: RawClient | None = connect(chunk[0].entry.startup)
        except (OSError, PeerClosed) as exc:
            for item in chunk:
                sent[item.number] = Sent(connection_refused=str(exc))
            continue
        try:
            for item in chunk:
                outcome = sent[item.number] = Sent()
                if client is None:
                    client = connect(item.entry.startup)
                try:
                    _raw_query(client, _marker(run, item).encode())
                    status = b"I"
                    for payload in item.payloads:
                        errors, status = _raw_query(client, payload)
                        outcome.errors += errors
                    if status != b"I":
                        _raw_query(client, b"ROLLBACK")
                except (PeerClosed, OSError, TimeoutError) as exc:
                    outcome.errors.append(f"connection ended: {exc}")
                    client.close()
                    client = None
        finally:
            if client is not None:
                client.close()
    return sent


RUNNERS: Mapping[str, Callable[[Target, Run, Sequence[Item]], dict[int, Sent]]] = {
    "psql": run_psql,
    "psycopg": run_psycopg,
    "psycopg-extended": run_psycopg,
    "asyncpg": run_asyncpg,
    "asyncpg-extended": run_asyncpg,
    "raw": run_raw,
}


def items_for(run: Run, entries: Iterable[Entry]) -> list[Item]:
    """The entries this run sends, written in its client encoding."""
    codec = ALL_ENCODINGS.get(run.encoding, "utf-8")
    items = []
    for entry in entries:
        if run.driver not in entry.drivers or run.encoding not in entry.encodings:
            continue
        if run.mode != "enforce" and not entry.monitor:
            continue
        if run.pooling == "transaction" and entry.isolate:
            continue  # session-level changes: pinned under transaction pooling, covered by session runs
        payloads = entry.payloads(codec)
        if payloads is None:
            continue
        # asyncpg writes every query in UTF-8 whatever the client encoding: only where that is
        # also the text in the client encoding does it send the entry.
        if run.driver.startswith("asyncpg") and payloads != entry.payloads("utf-8"):
            continue
        items.append(Item(len(items), entry, payloads))
    return items


# --- what the server and the proxy logged ------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ServerStatement:
    session: str
    text: str
    how: str  # "statement" (simple query) or "execute <name>"


@dataclass(slots=True)
class Window:
    """Everything logged on both sides between one item's marker and the next."""

    server: list[ServerStatement] = field(default_factory=list)
    allowed: set[str] = field(default_factory=set)  # fingerprints the proxy audited as allowed
    refused: int = 0
    driver_refusals: int = 0  # the driver's own statements, refused (see DRIVER_STATEMENTS)
    refusal_reasons: set[str] = field(default_factory=set)
    audited: list[str] = field(default_factory=list)  # normalized texts, for the report


def server_statements(log_file: Path) -> Iterator[ServerStatement]:
    """Executed statements of the proxy's server connections, in log order, each with the key of the
    client stream it belongs to: the server session under session pooling; under transaction pooling
    the application_name the proxy synced for its client (each run names itself), since one client's
    transactions move between server sessions (a sequential client's statements are logged in order)."""
    for line in log_file.read_text(encoding="utf-8").splitlines():
        record = json.loads(line)
        user = record.get("user")
        if user not in (SERVER_USER, MONITOR_SERVER_USER, TRANSACTION_SERVER_USER):
            continue
        if record.get("error_severity") != "LOG":
            continue
        message = record.get("message", "")
        if user == TRANSACTION_SERVER_USER:
            session = f"application {record.get('application_name')}"
        else:
            session = f"session {record.get('session_id')}"
        if message.startswith("statement: "):
            yield ServerStatement(session, message.removeprefix("statement: "), "statement")
        elif executed := _EXECUTE_MESSAGE.fullmatch(message):
            yield ServerStatement(session, executed.group(2), f"execute {executed.group(1)}")


def _fingerprints(text: str) -> list[str] | None:
    """PostgreSQL's own reading of a logged text: one fingerprint per statement; None if unparsable."""
    try:
        return [str(fingerprint(statement)) for statement in split(text, with_parser=True)]
    except ParseError:
        return None


@dataclass(frozen=True, slots=True)
class Problem:
    run: str
    what: str


class Crosscheck:
    """Both logs, cut into windows per (run, item), and the problems found in them."""

    def __init__(
        self,
        runs: Sequence[Run],
        items: Mapping[int, list[Item]],
        sent: Mapping[int, dict[int, Sent]],
        cashier_policy: RolePolicy | None,
        client_encodings: Collection[str],
    ):
        self.cashier_policy = cashier_policy
        # The search_path the proxy gives every role with a policy: the monitor and learn roles'
        # policies are the cashier's in another mode (see _policy).
        self.policy_search_path = _policy_search_path(cashier_policy)
        # Every spelling of the runs' client encodings the proxy may sync: as the clients named
        # them and as the server reports them.
        self.client_encodings = client_encodings
        self.runs = {run.number: run for run in runs}
        self.items = items
        self.sent = sent
        self.windows: dict[tuple[int, int], Window] = defaultdict(Window)
        self.markers_logged: set[tuple[int, int]] = set()  # by the server
        self.unattributed: list[str] = []
        self.problems: dict[str, list[Problem]] = defaultdict(list)

    def read_audit(self, records: Iterable[Mapping[str, Any]]) -> None:
        current: dict[str, tuple[int, int]] = {}
        for record in records:
            source = str(record.get("source"))
            if record.get("event") in REFUSAL_EVENTS and source in current:
                self.windows[current[source]].refusal_reasons.add(str(record.get("reason")))
            if record.get("event") != "statement":
                continue
            text = str(record.get("statement", ""))
            marker = _MARKER_TEXT.fullmatch(text)
            if marker is not None:
                current[source] = (int(marker.group(1)), int(marker.group(2)))
                continue
            if source not in current:
                continue  # before the first marker: connection set-up of no entry
            window = self.windows[current[source]]
            window.audited.append(f"{record.get('decision')}: {text}")
            if self._drivers_own(current[source], text):
                window.driver_refusals += record.get("decision") == "refused"
            elif record.get("decision") == "allowed":
                window.allowed.update(record.get("fingerprints") or ())
            else:
                window.refused += 1

    def _drivers_own(self, where: tuple[int, int], text: str) -> bool:
        """A statement the run's driver sent by itself, not one of the entry's."""
        run, item = where
        entry = self.items[run][item].entry
        return text in DRIVER_STATEMENTS.get(self.runs[run].driver, ()) and text.encode() not in [
            t if isinstance(t, bytes) else t.encode() for t in entry.texts
        ]

    def read_server(self, statements: Iterable[ServerStatement]) -> None:
        current: dict[str, tuple[int, int]] = {}
        for statement in statements:
            marker = _MARKER_TEXT.fullmatch(statement.text)
            if marker is not None:
                current[statement.session] = (int(marker.group(1)), int(marker.group(2)))
                self.markers_logged.add(current[statement.session])
                continue
            where = current.get(statement.session)
            if where is None:
                if not self._is_proxy_sync(statement.text):
                    self.unattributed.append(f"{statement.session}: {statement.how}: {statement.text!r}")
                continue
            self.windows[where].server.append(statement)

    def _is_proxy_sync(self, text: str) -> bool:
        """The proxy's parameter sync, to the byte the query proxy/protocols/postgres/parameters.py
        sync_query renders, resetting only settings this test's clients have and setting only what
        they asked for at startup (their application_name and client encoding) and their policy's
        search_path."""
        resets: list[str] = []
        changes: dict[str, str] = {}
        for quoted_name, value, quoted_value in _SET_CONFIG_CALL.findall(text):
            name = _unquote(quoted_name)
            if name not in SYNCED_SETTINGS:
                return False
            if value == "NULL":
                resets.append(name)
                continue
            changes[name] = _unquote(quoted_value)
            if name == "application_name":
                if _APPLICATION_NAME.fullmatch(changes[name]) is None:
                    return False
            elif name == "client_encoding":
                if changes[name] not in self.client_encodings:
                    return False
            elif changes[name] != self.policy_search_path:
                return False
        # Whatever the calls, the text must be the proxy's own rendering of them: nothing around them.
        return bool(resets or changes) and text == sync_query(resets, changes)

    def check(self) -> None:
        for run_number, items in self.items.items():
            run = self.runs[run_number]
            for item in items:
                window = self.windows.get((run_number, item.number), Window())
                sent = self.sent[run_number].get(item.number, Sent(connection_refused="never sent"))
                for problem in self._check_window(run, item, window, sent):
                    self.problems[item.entry.id].append(Problem(run.label, problem))

    def _check_window(self, run: Run, item: Item, window: Window, sent: Sent) -> Iterator[str]:
        context = f"sent {[payload for payload in item.payloads]!r}; client saw {sent.errors or 'no error'}"
        if sent.connection_refused is not None:
            if item.entry.expected(run.encoding) == "allowed" and run.encoding in ALL_ENCODINGS:
                yield f"no session to send it on: {sent.connection_refused}"
            return
        if (run.number, item.number) not in self.markers_logged:
            yield f"the server never logged this item's marker; {context}"
            return
        statements = window.server
        if run.pooling == "transaction":
            # Before any transaction, on whichever server connection it lands (logged under that
            # connection's previous application_name: possibly in another run's window).
            statements = [statement for statement in statements if not self._is_proxy_sync(statement.text)]
        else:
            # The proxy's own statements close a lease: DISCARD ALL, then the syncs for the next.
            tail = len(statements)
            while tail > 0 and self._is_proxy_sync(statements[tail - 1].text):
                tail -= 1
            if tail > 0 and statements[tail - 1].text == "DISCARD ALL":
                statements = statements[: tail - 1]
        refusals = 0
        for statement in statements:
            block = _REFUSAL_BLOCK.fullmatch(statement.text)
            if block is not None:
                refusals += 1
                if statement.text.count(block.group(1)) != 2:
                    yield f"a refusal block whose tag appears inside it: {statement.text!r}"
                elif not _raises_a_reason(block.group(2), window.refusal_reasons):
                    yield f"a refusal block {block.group(2)!r}, raising no refusal reason of this entry"
                continue
            prints = _fingerprints(statement.text)
            if prints is None:
                yield (
                    f"the server ran a text libpg_query cannot parse: {statement.how}: {statement.text!r}; "
                    f"{context}"
                )
                continue
            unallowed = [print_ for print_ in prints if print_ not in window.allowed]
            if unallowed:
                yield (
                    f"the server ran what the proxy did not allow: {statement.how}: {statement.text!r} "
                    f"(fingerprints {unallowed}); the proxy audited {window.audited}; {context}"
                )
            # Fingerprints ignore constants (set_config('search_path', ...) prints as any other
            # set_config): the cashier's policy must also allow the text as the server read it.
            if run.mode == "enforce" and self.cashier_policy is not None:
                decision = judge(self.cashier_policy, "cashier", statement.text)
                if not decision.allowed:
                    yield (
                        f"the cashier's policy refuses the server's reading ({decision.message}): "
                        f"{statement.how}: {statement.text!r}; {context}"
                    )
        if refusals > window.refused + window.driver_refusals:
            yield f"{refusals} refusal blocks ran but the proxy refused {window.refused} statements"
        if run.mode != "enforce":
            return
        if not window.audited:
            return  # nothing reached the policy (a driver or the server refused it first), nothing ran
        decided = "refused" if window.refused else "allowed"
        if decided != item.entry.expected(run.encoding):
            yield (
                f"the proxy decided {decided}, the corpus expects {item.entry.expected(run.encoding)}: "
                f"{window.audited}; {context}"
            )


def _policy_search_path(policy: RolePolicy | None) -> str | None:
    """The search_path the proxy syncs for a role with this policy, as SessionParameters renders it."""
    if policy is None:
        return None
    parameters = SessionParameters({})
    parameters.follow_policy("cashier", PolicyEngine({"cashier": policy}))
    return parameters.wanted["search_path"]


def _raises_a_reason(body: str, reasons: Collection[str]) -> bool:
    """The refusal block's body is, to the byte, the one the proxy's Refusal builds for one of the
    entry's refusal reasons (and the SQLSTATE the block names)."""
    sqlstate = _REFUSAL_SQLSTATE.match(body)
    # The block marks its error with the proxy process's own secret (refusal.PROXY_ERROR_MARK):
    # this process has another, of the same form.
    body = _PROXY_MARK.sub(f"SCHEMA = {quote_literal(PROXY_ERROR_MARK)}", body)
    return sqlstate is not None and any(
        body == Refusal(sqlstate.group(1), reason).raising_body() for reason in reasons
    )


# --- fixtures ---------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class LoggedCluster:
    """What proxy_config needs of a cluster (port, user, ca), and the monitor role's password."""

    server: LocalPostgres
    ca: Path
    password: str
    monitor_password: str
    user: str = SERVER_USER

    @property
    def port(self) -> int:
        return self.server.port


@pytest.fixture(scope="module")
def logged_cluster(
    terminal_pki: TerminalPKI, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LoggedCluster]:
    """A cluster of this module's own with statement logging, holding the demo schema and more."""
    directory = tmp_path_factory.mktemp("xcheck-pg")
    ca = certs.init_ca(directory / "pki", common_name="cross-check database CA")
    issued = certs.issue_server(directory / "pki", dns_names=["localhost"], ip_addresses=["127.0.0.1"])
    password, monitor_password = secrets.token_urlsafe(18), secrets.token_urlsafe(18)
    server = LocalPostgres(
        directory / "cluster",
        tls=LocalPostgresTLS(cert=issued.cert_path, key=issued.key_path, ca=ca),
        superuser_password=password,
        settings=SERVER_LOG_SETTINGS,
    )
    server.start()
    try:
        server.create_role(SERVER_USER, password)
        server.create_role(MONITOR_SERVER_USER, monitor_password)
        server.create_role(TRANSACTION_SERVER_USER, password)
        server.create_database("pos", owner="postgres")
        server.execute_script(DEMO_SCHEMA.read_text(encoding="utf-8") + EXTRA_SCHEMA, dbname="pos")
        yield LoggedCluster(server, ca, password, monitor_password)
    finally:
        server.stop()


def _policy(mode: str) -> dict[str, Any]:
    policy = yaml.safe_load(SHIPPED_CASHIER_POLICY.read_text(encoding="utf-8"))
    policy["mode"] = mode
    policy.pop("max_violations", None)  # the corpus refuses far more than ten statements a session
    policy["allow"]["read"].append(LONG_ALLOWED)
    return policy


@pytest.fixture(scope="module")
def crosscheck(
    logged_cluster: LoggedCluster, terminal_pki: TerminalPKI, tmp_path_factory: pytest.TempPathFactory
) -> Crosscheck:
    directory = tmp_path_factory.mktemp("xcheck-proxy")
    password_file = directory / "db-password"
    password_file.write_text(logged_cluster.password, encoding="utf-8")
    monitor_password_file = directory / "monitor-password"
    monitor_password_file.write_text(logged_cluster.monitor_password, encoding="utf-8")
    audit_key = directory / "audit.key"
    audit_key.touch(mode=0o600)
    audit_key.write_bytes(secrets.token_bytes(32))
    policies = {}
    for role, mode in (("cashier", "enforce"), ("manager", "monitor"), ("auditor", "learn")):
        policies[role] = directory / f"{role}.yaml"
        policies[role].write_text(yaml.safe_dump(_policy(mode), allow_unicode=True), encoding="utf-8")
    config = proxy_config(terminal_pki, logged_cluster, password_file)
    config["routes"][MONITOR_DATABASE] = {
        **config["routes"]["pos"],
        "dbname": "pos",
        "user": MONITOR_SERVER_USER,
        "password": {"file": str(monitor_password_file)},
    }
    config["routes"][TRANSACTION_DATABASE] = {
        **config["routes"]["pos"],
        "dbname": "pos",
        "user": TRANSACTION_SERVER_USER,
        "pool": {**config["routes"]["pos"]["pool"], "mode": "transaction"},
    }
    config["roles"] = {role: {"policy": str(path)} for role, path in policies.items()}
    config["policy"] = {"review_file": str(directory / "review.json")}
    config["audit"] = {
        "file": str(directory / "audit.log"),
        "key_file": str(audit_key),
        "allowed_statements": 1.0,
    }
    proxy = ProxyProcess(directory / "proxy", config).start()

    targets = {
        ("enforce", "session"): Target(proxy, terminal_pki, terminal_pki.cashier, "pos"),
        ("enforce", "transaction"): Target(proxy, terminal_pki, terminal_pki.cashier, TRANSACTION_DATABASE),
        ("monitor", "session"): Target(proxy, terminal_pki, terminal_pki.manager, MONITOR_DATABASE),
        ("learn", "session"): Target(proxy, terminal_pki, terminal_pki.unmapped_role, MONITOR_DATABASE),
    }
    extra_encodings = sorted(
        {encoding for entry in ENTRIES for encoding in entry.encodings} - set(ALL_ENCODINGS)
    )
    patterns = [
        ("enforce", driver, encoding) for encoding in (*ENCODINGS, *extra_encodings) for driver in DRIVERS
    ]
    patterns += [("enforce", ONE_DRIVER, encoding) for encoding in ONE_DRIVER_ENCODINGS]
    runs = [
        Run(number, *pattern) for number, pattern in enumerate([*patterns, *MONITOR_RUNS, *TRANSACTION_RUNS])
    ]
    items = {run.number: items_for(run, ENTRIES) for run in runs}
    # Runs are independent sessions (both logs are cut per client and per server session), so a
    # few at once: most of the time is round trips, not CPU.
    try:
        with ThreadPoolExecutor(CONCURRENT_RUNS) as executor:
            futures = {
                run.number: executor.submit(
                    RUNNERS[run.driver], targets[run.mode, run.pooling], run, items[run.number]
                )
                for run in runs
                if items[run.number]
            }
            sent = {number: future.result() for number, future in futures.items()}
    finally:
        proxy.stop()
    cashier_policy = load_config(proxy.config_path).roles["cashier"].policy
    assert cashier_policy is not None
    result = Crosscheck(runs, items, sent, cashier_policy, _encoding_spellings(logged_cluster, runs))
    result.read_audit(json.loads(line) for line in (directory / "audit.log").read_text().splitlines())
    result.read_server(server_statements(_server_log(logged_cluster)))
    result.check()
    return result


def _encoding_spellings(cluster: LoggedCluster, runs: Iterable[Run]) -> set[str]:
    """The runs' client encodings as named, and as the server reports each (its canonical name)."""
    names = sorted({run.encoding for run in runs})
    query = " UNION ALL ".join(f"SELECT pg_encoding_to_char(pg_char_to_encoding('{name}'))" for name in names)
    return set(names) | set(cluster.server.psql(query + ";").split())


def _server_log(cluster: LoggedCluster) -> Path:
    """The JSON log, once the collector has written everything up to a sentinel logged now."""
    sentinel = f"xcheck sentinel {secrets.token_hex(8)}"
    cluster.server.psql(f"SELECT '{sentinel}';")
    log_file = cluster.server.datadir / "log" / "server.json"
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        if log_file.exists() and sentinel in log_file.read_text(encoding="utf-8"):
            return log_file
        time.sleep(0.1)
    raise AssertionError(f"the server log {log_file} never showed the sentinel")


# --- tests --------------------------------------------------------------------------------------------


def _report(problems: Sequence[Problem]) -> str:
    return "\n".join(f"[{problem.run}] {problem.what}" for problem in problems)


@pytest.mark.parametrize(
    "entry",
    [
        pytest.param(
            entry,
            id=entry.id,
            marks=[pytest.mark.xfail(strict=True, reason=entry.xfail_reason)] if entry.xfail_reason else [],
        )
        for entry in ENTRIES
    ],
)
def test_server_ran_only_what_the_proxy_allowed(entry: Entry, crosscheck: Crosscheck) -> None:
    problems = crosscheck.problems.get(entry.id, [])
    assert not problems, f"{entry.id}: {len(problems)} disagreements\n{_report(problems)}"


def test_the_corpus_runs_in_every_encoding_the_proxy_accepts_and_only_those() -> None:
    """The encodings sent may not drift from proxy.policy.encodings: an encoding the proxy accepts
    and the corpus never sends would be accepted untested."""
    assert set(ALL_ENCODINGS) == encodings.ACCEPTED
    ascii_bytes = bytes(range(128))
    for name, codec in ONE_DRIVER_ENCODINGS.items():
        # Single-byte, and ASCII below 0x80: what makes one driver enough (see ONE_DRIVER_ENCODINGS).
        assert ascii_bytes.decode(codec) == ascii_bytes.decode("ascii"), name
        assert all(len(chr(char).encode(codec, "ignore")) <= 1 for char in range(0x80, 0x2200)), name


def test_every_statement_the_server_ran_belongs_to_a_corpus_entry(crosscheck: Crosscheck) -> None:
    assert not crosscheck.unattributed, "\n".join(crosscheck.unattributed)


def test_every_run_reached_the_server(crosscheck: Crosscheck) -> None:
    """A run that sent nothing (a driver that could not connect) would make the test vacuous."""
    ran = {run for run, _item in crosscheck.windows}
    missing = [
        crosscheck.runs[number].label
        for number, items in crosscheck.items.items()
        if items and number not in ran and crosscheck.runs[number].encoding in ALL_ENCODINGS
    ]
    assert not missing, f"runs with no marker in the server log: {missing}"


def test_the_check_reports_what_the_proxy_did_not_allow() -> None:
    """The check itself can fail: a statement the server ran beyond what the proxy audited as allowed,
    a parameter sync the proxy would not send (a search_path other than the policy's, a statement
    stacked after the proxy's own sync), a forged refusal block, one that differs from the proxy's
    own by its quoting, and more refusal blocks than refusals are each reported; the proxy's own
    block for an audited reason, DISCARD ALL closing the lease and the next client's sync are not."""
    entry = _entry({"id": "probe", "sql": "SELECT 1", "expect": "allowed"})
    run = Run(0, "enforce", "psql", "UTF8")
    item = Item(0, entry, (b"SELECT 1",))
    check = Crosscheck([run], {0: [item]}, {0: {0: Sent()}}, RolePolicy(search_path=("public",)), ["UTF8"])
    check.read_audit(
        [
            {
                "event": "statement",
                "source": "s",
                "statement": "SELECT $1 AS xcheck_0_0",
                "decision": "allowed",
            },
            {
                "event": "statement",
                "source": "s",
                "statement": "SELECT $1",
                "decision": "allowed",
                "fingerprints": [str(fingerprint("SELECT 1"))],
            },
            {"event": "policy_violation", "source": "s", "reason": "reading table public.café is refused"},
        ]
    )
    tag = "$refused_0123456789ab$"
    forged = f"DO {tag}BEGIN RAISE EXCEPTION USING ERRCODE = E'42501', MESSAGE = E'x'; END{tag}"
    proxys_own = Refusal("42501", "reading table public.café is refused").raising_block()
    unescaped = forged.replace("E'x'", "E'reading table public.café is refused'")
    own_sync = sync_query(["client_encoding"], {"application_name": "xcheck-0", "search_path": '"public"'})
    forged_sync = sync_query([], {"search_path": "pg_temp, public"})
    check.read_server(
        ServerStatement("b", text, "statement")
        for text in (
            "SELECT 1 AS xcheck_0_0",
            "SELECT 1",
            "SELECT 1; DELETE FROM sales",
            forged_sync,
            own_sync + "; DELETE FROM sales",
            forged,
            proxys_own,
            unescaped,
            "DISCARD ALL",
            own_sync,
        )
    )
    check.check()
    problems = [problem.what for problem in check.problems["probe"]]
    assert len(problems) == 9, problems
    for number, (what, text) in enumerate(
        [
            ("did not allow", "DELETE FROM sales"),
            ("policy refuses", "DELETE FROM sales"),
            ("did not allow", "pg_temp"),
            ("policy refuses", "pg_temp"),
            ("did not allow", "DELETE FROM sales"),
            ("policy refuses", "DELETE FROM sales"),
            ("raising no refusal reason", "E'x'"),
            ("raising no refusal reason", "café"),
            ("3 refusal blocks ran", ""),
        ]
    ):
        assert what in problems[number] and text in problems[number], (number, problems[number])
    assert "xcheck-0" in problems[4]
