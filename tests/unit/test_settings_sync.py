"""Which settings a server connection carries from one client to the next, and what the proxy does
about them, without sockets; search_path read as the server reads it; startup settings a policy
refuses. The same guarantees against the real server: tests/security/test_pooled_settings_isolation.py.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from proxy.config.model import PoolConfig, RouteConfig, SSLMode
from proxy.policy.engine import PolicyEngine
from proxy.policy.model import PolicyMode, RolePolicy
from proxy.protocols.postgres import messages as m
from proxy.protocols.postgres.parameters import SearchPathSyntaxError, SessionParameters, search_path_entries
from proxy.protocols.postgres.upstream import ServerConnection
from tests.unit.test_server_connection import Transport

STARTUP = {
    "DateStyle": "ISO, MDY",
    "TimeZone": "UTC",
    "client_encoding": "UTF8",
    "application_name": "pos-db-proxy",
}
READY = m.build_ready_for_query(b"I")


def _server() -> tuple[ServerConnection, Transport]:
    route = RouteConfig(
        database="pos", host="127.0.0.1", port=5432, dbname="pos", user="pos_proxy",
        sslmode=SSLMode.DISABLE, pool=PoolConfig(),
    )  # fmt: skip
    server = ServerConnection(route, on_closed=lambda _connection: None)
    transport: Any = Transport()
    server.connection_made(transport)
    server.note_startup_parameters(STARTUP)
    return server, transport


async def _apply(client: SessionParameters, server: ServerConnection, reply: bytes = b"") -> None:
    """Run ``apply`` with the server answering ``reply`` (ParameterStatus messages) and ReadyForQuery."""
    running = asyncio.ensure_future(client.apply(server, 1.0))
    await asyncio.sleep(0)
    server.data_received(reply + READY)
    await running


def _last_query(transport: Transport) -> str:
    return transport.written[-1][5:-1].decode()


async def test_an_untouched_connection_serves_a_client_without_settings_for_free() -> None:
    server, transport = _server()
    assert not SessionParameters({}).needs_sync(server)
    # Asked for what the route has already, in the server's own spelling: nothing to do either.
    assert not SessionParameters({"TimeZone": "UTC"}).needs_sync(server)
    assert transport.written == []


async def test_what_one_client_set_is_reset_before_a_client_that_did_not_ask_for_it() -> None:
    server, transport = _server()
    first = SessionParameters({"statement_timeout": "5", "TimeZone": "Asia/Tokyo"})
    assert first.needs_sync(server)
    await _apply(first, server, m.build_parameter_status("TimeZone", "Asia/Tokyo"))
    assert "set_config(E'statement_timeout', E'5', false)" in _last_query(transport)
    assert server.changed_settings == {"statement_timeout": "5", "TimeZone": "Asia/Tokyo"}
    assert not first.needs_sync(server)
    assert not SessionParameters({"statement_timeout": "5", "TimeZone": "Asia/Tokyo"}).needs_sync(server)

    second = SessionParameters({})
    assert second.needs_sync(server)
    await _apply(second, server, m.build_parameter_status("TimeZone", "UTC"))
    query = _last_query(transport)
    assert "set_config(E'statement_timeout', NULL, false)" in query
    assert "set_config(E'TimeZone', NULL, false)" in query
    assert server.changed_settings == {}
    assert not second.needs_sync(server)


async def test_a_setting_wanted_differently_starts_from_the_routes_value() -> None:
    # DateStyle 'ISO' keeps the previous order: 'SQL, DMY' left behind would make it 'ISO, DMY'.
    server, transport = _server()
    server.data_received(m.build_parameter_status("DateStyle", "SQL, DMY"))
    assert server.changed_settings == {"DateStyle": "SQL, DMY"}
    client = SessionParameters({"DateStyle": "ISO"})
    await _apply(client, server)
    reset, setting = _last_query(transport).split("; ")
    assert reset == "SELECT pg_catalog.set_config(E'DateStyle', NULL, false)"
    assert setting == "SELECT pg_catalog.set_config(E'DateStyle', E'ISO', false)"


async def test_a_value_spelled_otherwise_is_carried_as_the_server_reports_it() -> None:
    server, _transport = _server()
    client = SessionParameters({"client_encoding": "utf-8"})
    assert client.needs_sync(server)
    await _apply(client, server)  # the same encoding: the server reports nothing new
    assert client.wanted == {"client_encoding": "UTF8"}
    assert server.changed_settings == {}


async def test_a_reported_change_and_its_undoing_are_followed() -> None:
    server, _transport = _server()
    server.data_received(m.build_parameter_status("application_name", "till 7"))
    assert server.changed_settings == {"application_name": "till 7"}
    assert SessionParameters({}).needs_sync(server)
    server.data_received(m.build_parameter_status("application_name", "pos-db-proxy"))
    assert server.changed_settings == {}
    server.data_received(m.build_parameter_status("server_version", "15.99"))  # not a client's setting
    assert server.changed_settings == {}


async def test_after_discard_all_the_settings_the_proxy_set_are_set_again() -> None:
    server, transport = _server()
    client = SessionParameters({"search_path": "public"})
    await _apply(client, server)
    assert not client.needs_sync(server)
    server.note_settings_may_have_reset()
    assert client.needs_sync(server)
    await _apply(client, server)
    assert "set_config(E'search_path', E'public', false)" in _last_query(transport)
    assert not client.needs_sync(server)


async def test_a_connection_found_in_sync_is_checked_again_after_any_change() -> None:
    # needs_sync remembers what the last client found; every change on either side forgets it.
    server, _transport = _server()
    client = SessionParameters({"TimeZone": "UTC"})
    assert not client.needs_sync(server)
    assert not client.needs_sync(server)  # the remembered answer
    assert SessionParameters({"TimeZone": "Asia/Tokyo"}).needs_sync(server)  # another client's wish
    client.note_reported("TimeZone", "Europe/Paris")  # this client's own wish changed
    assert client.needs_sync(server)
    client.note_reported("TimeZone", "UTC")
    assert not client.needs_sync(server)
    server.data_received(m.build_parameter_status("application_name", "till 7"))
    assert client.needs_sync(server)
    server.data_received(m.build_parameter_status("application_name", "pos-db-proxy"))
    assert not client.needs_sync(server)
    server.note_settings_unknown(["statement_timeout"])  # a client's SET of it may have run
    assert client.needs_sync(server)


async def test_settings_a_discard_all_cleared_are_set_again_for_the_client_that_found_them() -> None:
    server, _transport = _server()
    client = SessionParameters({"statement_timeout": "5"})
    await _apply(client, server)
    assert not client.needs_sync(server)  # found, and remembered
    server.forget_session()  # the pool's DISCARD ALL: changed_settings cleared where it is kept
    assert client.needs_sync(server)


async def test_a_failed_set_changes_nothing_the_proxy_knows() -> None:
    server, _transport = _server()
    client = SessionParameters({"statement_timeout": "soon"})
    running = asyncio.ensure_future(client.apply(server, 1.0))
    await asyncio.sleep(0)
    server.data_received(m.build_error_response("ERROR", "22023", "invalid value") + READY)
    with pytest.raises(Exception, match="invalid value"):
        await running
    assert server.changed_settings == {}


# --- search_path ---


@pytest.mark.parametrize(
    ("value", "entries"),
    [
        ("", ()),
        (" \t", ()),
        ("public", ("public",)),
        ('Public , "Mixed"', ("public", "Mixed")),
        ('"a,b",c', ("a,b", "c")),
        ('"a""b"', ('a"b',)),
        ('"$user", public', ("$user", "public")),
        ("a\u00a0b", ("a\u00a0b",)),
        ("\u00c4BC", ("\u00c4bc",)),
        ("x" * 64, ("x" * 63,)),
        ("é" * 32, ("é" * 31,)),
    ],
)
def test_search_path_entries(value: str, entries: tuple[str, ...]) -> None:
    assert search_path_entries(value) == entries


@pytest.mark.parametrize("value", ["a,,b", "a,", ",", '"a', '"a"b', "a b"])
def test_search_path_syntax_errors(value: str) -> None:
    with pytest.raises(SearchPathSyntaxError):
        search_path_entries(value)


@given(st.text(alphabet=st.sampled_from(list('aB"," \t\u00a0é$\n')), max_size=30))
def test_any_search_path_is_read_or_refused(value: str) -> None:
    try:
        entries = search_path_entries(value)
    except SearchPathSyntaxError:
        return
    assert all(len(entry.encode()) <= 63 for entry in entries)


# --- startup settings under a policy ---


def _engine(**policy: Any) -> PolicyEngine:
    return PolicyEngine({"cashier": RolePolicy(**policy), "manager": None})


@pytest.mark.parametrize(
    ("wanted", "refused"),
    [
        (
            {"application_name": "till", "DateStyle": "ISO", "TimeZone": "UTC", "extra_float_digits": "3"},
            None,
        ),
        ({"search_path": "PUBLIC"}, None),
        ({"search_path": "evil, public"}, "search_path"),
        ({"search_path": "public,"}, "search_path"),
        ({"default_transaction_read_only": "on"}, "default_transaction_read_only"),
        ({"statement_timeout": "1"}, "statement_timeout"),
    ],
)
def test_a_policy_refuses_at_startup_what_it_refuses_as_set(
    wanted: dict[str, str], refused: str | None
) -> None:
    engine = _engine(kinds=frozenset({"SELECT"}))
    refusal = SessionParameters(wanted).refusal_for("cashier", engine)
    if refused is None:
        assert refusal is None
    else:
        assert refusal is not None and refusal.startswith(f'permission denied to set parameter "{refused}"')
    assert SessionParameters(wanted).refusal_for("manager", engine) is None


def test_a_set_the_policy_allows_may_be_a_startup_setting() -> None:
    engine = _engine(kinds=frozenset({"SELECT", "SET"}))
    assert SessionParameters({"statement_timeout": "1"}).refusal_for("cashier", engine) is None
    assert (
        SessionParameters({"default_transaction_read_only": "on"}).refusal_for("cashier", engine) is not None
    )


def test_monitor_mode_still_refuses_settings_that_change_what_the_policy_decides() -> None:
    engine = _engine(mode=PolicyMode.MONITOR, kinds=frozenset({"SELECT"}))
    assert SessionParameters({"statement_timeout": "1"}).refusal_for("cashier", engine) is None
    assert (
        SessionParameters({"default_transaction_read_only": "on"}).refusal_for("cashier", engine) is not None
    )
    assert SessionParameters({"search_path": "evil"}).refusal_for("cashier", engine) is not None


def test_a_role_with_a_policy_runs_with_the_policys_search_path() -> None:
    engine = _engine(search_path=("pos", 'we"ird'))
    client = SessionParameters({"TimeZone": "UTC"})
    client.follow_policy("cashier", engine)
    assert client.wanted == {"TimeZone": "UTC", "search_path": '"pos", "we""ird"'}
    assert search_path_entries(client.wanted["search_path"]) == ("pos", 'we"ird')
    unrestricted = SessionParameters({})
    unrestricted.follow_policy("manager", engine)
    assert unrestricted.wanted == {}
