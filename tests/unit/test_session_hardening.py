"""Holes a hostile review found in the session's checks, each fed as bytes to a real ClientSession
(tests/sockless.py): a refused Parse must not spare an old statement its re-decision after a
reload, and a Flush must not stop the idle-in-transaction clock."""

from __future__ import annotations

import asyncio
import dataclasses
import struct
from pathlib import Path

import pytest

from proxy.oplog import configure_logging
from proxy.policy.engine import PolicyEngine
from proxy.policy.model import RolePolicy
from proxy.protocols.postgres import messages as m
from proxy.protocols.postgres.prepared import Statement
from tests.sockless import (
    READY,
    add_server,
    open_session,
    proxy_without_listener,
    record_closed_transports,
    terminal_certificate,
)

# What a policy role's sessions want (follow_policy): no internal sync query is needed.
PARAMETERS = {
    "server_version": "15.0",
    "client_encoding": "UTF8",
    "standard_conforming_strings": "on",
    "search_path": '"public"',
}
SYNC = m.build_message(b"S", b"")
FLUSH = m.build_message(b"H", b"")


@pytest.fixture(autouse=True)
def _quiet_logs() -> None:
    configure_logging(json=False, level="critical")


def _parse(name: bytes, text: bytes) -> bytes:
    return m.build_message(b"P", name + b"\x00" + text + b"\x00" + b"\x00\x00")


def _bind(portal: bytes, statement: bytes) -> bytes:
    return m.build_message(b"B", portal + b"\x00" + statement + b"\x00" + b"\x00\x00" * 3)


def _execute(portal: bytes = b"") -> bytes:
    return m.build_message(b"E", portal + b"\x00" + struct.pack("!i", 0))


def _binds(data: bytes) -> list[bytes]:
    frames, _ = m.scan_frames(data, 2**26)
    return [data[start + 5 : end] for kind, start, end in frames if kind == ord("B")]


async def test_a_refused_parse_of_the_same_name_does_not_spare_the_old_statement_its_redecision(
    tmp_path: Path,
) -> None:
    proxy = proxy_without_listener(
        tmp_path, policy="mode: enforce\nallow:\n  kinds: [SELECT]\n  read: [products, payroll]\n"
    )
    server, upstream = add_server(proxy.routes["pos"], PARAMETERS)
    session, _transport = open_session(proxy, terminal_certificate(tmp_path), 40001)
    session.data_received(_parse(b"s1", b"SELECT * FROM payroll") + SYNC)
    server.data_received(m.build_message(b"1", b"") + READY)
    payroll = Statement.from_parse_body(b"SELECT * FROM payroll\x00\x00\x00").server_name
    # A reload: payroll may no longer be read.
    engine = PolicyEngine(
        {"cashier": RolePolicy(kinds=frozenset({"SELECT"}), read_tables=frozenset({"public.products"}))}
    )
    session.use_environment(dataclasses.replace(proxy._environment, policies=engine))
    # A refused Parse of the same name, its Sync, then a Bind of the name, in one read: the Parse
    # leaves the old statement in place, and the Bind of it must be decided again and refused.
    session.data_received(
        _parse(b"s1", b"DELETE FROM products") + SYNC + _bind(b"", b"s1") + _execute() + SYNC
    )
    assert not any(payroll in body for written in upstream.written for body in _binds(written))


async def test_a_flush_inside_a_transaction_does_not_stop_the_idle_transaction_clock(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    closed = record_closed_transports(monkeypatch)
    proxy = proxy_without_listener(tmp_path)
    server, _upstream = add_server(proxy.routes["pos"], PARAMETERS)
    session, transport = open_session(proxy, terminal_certificate(tmp_path), 40001)
    session._idle_transaction_timeout = 0.2
    session.data_received(m.build_query("BEGIN"))
    server.data_received(m.build_message(b"C", b"BEGIN\x00") + m.build_ready_for_query(b"T"))
    await asyncio.sleep(0.05)
    session.data_received(FLUSH)  # owes no ReadyForQuery: nothing else would re-arm the clock
    for _ in range(40):  # bounded: 2 s at most
        if transport in closed:
            break
        await asyncio.sleep(0.05)
    assert transport in closed, "the terminal still holds its transaction after the timeout"
    assert b"25P03" in b"".join(transport.written)


async def test_an_execute_of_the_unnamed_portal_a_query_destroyed_ends_the_session(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Found by tests/fuzz (psql Queries grafted between a psycopg Bind and its Execute): PostgreSQL
    15.18 dies with SIGSEGV on BEGIN; Parse; Bind of the unnamed portal; Sync; a Query failing the
    transaction; a Query DECLARE; Execute of the unnamed portal -- and restarts, ending every
    store's sessions. A simple Query destroys the unnamed portal (55.2.3), so no driver executes it
    afterwards without a new Bind: the proxy refuses that Execute (08P01) before the server sees it."""
    closed = record_closed_transports(monkeypatch)
    proxy = proxy_without_listener(tmp_path)
    _server, upstream = add_server(proxy.routes["pos"], PARAMETERS)
    session, transport = open_session(proxy, terminal_certificate(tmp_path), 40002)
    session.data_received(_parse(b"", b"SELECT 1") + _bind(b"", b"") + SYNC)
    session.data_received(m.build_query("COPY missing_table FROM STDIN"))
    session.data_received(m.build_query("DECLARE c CURSOR FOR SELECT 1") + _execute() + SYNC)
    assert transport in closed
    assert b"08P01" in b"".join(transport.written)
    assert b"DECLARE" not in b"".join(upstream.written), "the messages reached the server"


async def test_drivers_ways_with_the_unnamed_portal_pass(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """asyncpg's COPY: Parse, Describe, Flush, then a Query with no Sync; every driver's Bind again
    before executing the unnamed portal after a Query; a named portal after a Query."""
    closed = record_closed_transports(monkeypatch)
    proxy = proxy_without_listener(tmp_path)
    _server, upstream = add_server(proxy.routes["pos"], PARAMETERS)
    session, transport = open_session(proxy, terminal_certificate(tmp_path), 40003)
    sent = (
        _parse(b"", b"SELECT 1")
        + m.build_message(b"D", b"S\x00")
        + FLUSH
        + m.build_query("SELECT 2")
        + _bind(b"", b"")
        + _execute()
        + SYNC
        + m.build_query("SELECT 3")
        + _bind(b"", b"")
        + _execute()
        + SYNC
    )
    session.data_received(sent[:40])  # the series may span reads
    session.data_received(sent[40:])
    assert transport not in closed
    assert b"08P01" not in b"".join(transport.written)
    forwarded = b"".join(upstream.written)
    assert m.build_query("SELECT 3") in forwarded
    assert forwarded.endswith(_execute() + SYNC)
