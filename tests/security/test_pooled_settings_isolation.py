"""A terminal's settings never reach the next terminal on the same server connection.

An attacker holds a valid certificate. Through startup parameters, SET of the settings the server
reports, set_config or RESET/DISCARD ALL it leaves settings on its server connection, and the next
terminal served by that connection must find the route's values, or the ones it asked for itself:
never what the previous one left (a search_path reaching a schema of shadow tables above all). A
role with a policy may not choose at startup what it may not SET. The proxy reads a search_path
value as the server does. Real PostgreSQL 15 through the real proxy, pool of one server
connection so that every terminal lands on the same one.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import psycopg
import pytest
from psycopg import sql

from proxy.protocols.postgres.parameters import (
    SESSION_PARAMETERS,
    SearchPathSyntaxError,
    search_path_entries,
)
from proxy.protocols.postgres.sessionstate import CARRIED_SETTINGS
from tests.integration.proxyproc import ProxyProcess, Terminal, TerminalPKI

StartProxy = Callable[..., ProxyProcess]

# A value other than the route's for every setting a terminal may give at startup.
# standard_conforming_strings is left out: the proxy accepts only "on" (tested below).
STARTUP_VALUES = {
    "application_name": "till-evil",
    "DateStyle": "SQL, DMY",
    "TimeZone": "Pacific/Chatham",
    "IntervalStyle": "iso_8601",
    "extra_float_digits": "-3",
    "search_path": "evil, public",
    "statement_timeout": "4321",
    "lock_timeout": "4321",
    "idle_in_transaction_session_timeout": "654321",
    "default_transaction_isolation": "serializable",
    "default_transaction_read_only": "on",
    "bytea_output": "escape",
    "client_min_messages": "error",
    "jit": "off",
    "work_mem": "77MB",
    "maintenance_work_mem": "99MB",
    "plan_cache_mode": "force_generic_plan",
    "random_page_cost": "1.5",
    "effective_cache_size": "3GB",
    "max_parallel_workers_per_gather": "0",
    "default_transaction_deferrable": "on",
}
# What SHOW says for them (the server's own spelling).
SHOWN = {
    "statement_timeout": "4321ms",
    "lock_timeout": "4321ms",
    "idle_in_transaction_session_timeout": "654321ms",
}
# The settings the server reports with ParameterStatus: a SET of them does not pin a client to its
# server connection under transaction pooling, so the proxy must undo them itself.
# standard_conforming_strings is left out: turning it off is refused for every role
# (tests/security/test_client_encodings_review.py).
REPORTED_SET = {
    "DateStyle": "SQL, DMY",
    "TimeZone": "Pacific/Chatham",
    "IntervalStyle": "postgres_verbose",
    "application_name": "till-evil",
    "client_encoding": "LATIN1",
}
TRACKED = sorted({*SESSION_PARAMETERS.values()})
CASHIER_POLICY = (
    "mode: enforce\nsearch_path: [public]\nallow:\n  kinds: [SELECT, SHOW]\n  read: [price_list]\n"
)


def test_every_startup_setting_is_attacked() -> None:
    # A setting added to SESSION_PARAMETERS must get an attack value here (or a reason it has none).
    assert set(STARTUP_VALUES) | {"client_encoding", "standard_conforming_strings"} == set(TRACKED)


# --- helpers ---


def _superuser(cluster: Any) -> psycopg.Connection:
    return psycopg.connect(**cluster.connect_kwargs(user="postgres", dbname="pos"), autocommit=True)


@pytest.fixture(scope="module")
def shadow_schema(pg_cluster: Any) -> Iterator[None]:
    """public.price_list and a schema "evil" with a shadow price_list table, as an attacker with
    its own schema (or a role without a policy that may create one) would have."""
    with _superuser(pg_cluster) as admin:
        admin.execute("CREATE TABLE IF NOT EXISTS public.price_list (sku text PRIMARY KEY, name text)")
        admin.execute("ALTER TABLE public.price_list OWNER TO pos_proxy")
        admin.execute("INSERT INTO public.price_list VALUES ('1', 'real pen') ON CONFLICT DO NOTHING")
        admin.execute("CREATE SCHEMA IF NOT EXISTS evil AUTHORIZATION pos_proxy")
        admin.execute("CREATE TABLE IF NOT EXISTS evil.price_list (sku text PRIMARY KEY, name text)")
        admin.execute("ALTER TABLE evil.price_list OWNER TO pos_proxy")
        admin.execute("INSERT INTO evil.price_list VALUES ('1', 'shadow pen') ON CONFLICT DO NOTHING")
    yield


def _proxy(
    start_proxy: StartProxy, mode: str, tmp_path: Path, *, cashier_policy: bool = False
) -> ProxyProcess:
    overrides: dict[str, Any] = {"routes": {"pos": {"pool": {"mode": mode, "size": 1}}}}
    if cashier_policy:
        policy = tmp_path / "cashier.yaml"
        policy.write_text(CASHIER_POLICY, encoding="utf-8")
        overrides["roles"] = {"cashier": {"policy": str(policy)}}
    return start_proxy(**overrides)


def _psycopg(proxy: ProxyProcess, pki: TerminalPKI, terminal: Terminal, **extra: str) -> psycopg.Connection:
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


def _show_all(connection: psycopg.Connection) -> dict[str, str]:
    shown = {}
    for name in TRACKED:
        row = connection.execute(sql.SQL("SHOW {}").format(sql.Identifier(name.lower()))).fetchone()
        assert row is not None
        shown[name] = row[0]
    return shown


def _backend_pid(connection: psycopg.Connection) -> int:
    row = connection.execute("SELECT pg_backend_pid()").fetchone()
    assert row is not None
    return int(row[0])


# --- startup parameters ---


@pytest.mark.parametrize("mode", ["transaction", "session"])
async def test_startup_settings_of_one_terminal_do_not_reach_the_next(
    start_proxy: StartProxy, terminal_pki: TerminalPKI, tmp_path: Path, shadow_schema: None, mode: str
) -> None:
    proxy = _proxy(start_proxy, mode, tmp_path)
    with _psycopg(proxy, terminal_pki, terminal_pki.cashier) as before:
        route_values = _show_all(before)
        pid = _backend_pid(before)
    for name, value in STARTUP_VALUES.items():
        assert route_values[name] != SHOWN.get(name, value), name
        async with _asyncpg(proxy, terminal_pki, terminal_pki.manager, **{name: value}) as attacker:
            # The attacker's own session has it (so the test shows something).
            assert await attacker.fetchval(f"SHOW {name}") == SHOWN.get(name, value), name
            assert await attacker.fetchval("SELECT pg_backend_pid()") == pid
            if name == "search_path":
                assert await attacker.fetchval("SELECT name FROM price_list") == "shadow pen"
            if mode == "transaction":
                # The next terminal takes the connection while the attacker is still connected.
                with _psycopg(proxy, terminal_pki, terminal_pki.cashier) as victim:
                    assert _backend_pid(victim) == pid
                    assert _show_all(victim) == route_values, name
                # And the attacker keeps its own setting on its next transaction.
                assert await attacker.fetchval(f"SHOW {name}") == SHOWN.get(name, value), name
        with _psycopg(proxy, terminal_pki, terminal_pki.cashier) as victim:
            assert _backend_pid(victim) == pid
            assert _show_all(victim) == route_values, name
            assert victim.execute("SELECT name FROM price_list").fetchone() == ("real pen",)


async def test_all_startup_settings_at_once_do_not_reach_the_next(
    start_proxy: StartProxy, terminal_pki: TerminalPKI, tmp_path: Path, shadow_schema: None
) -> None:
    proxy = _proxy(start_proxy, "transaction", tmp_path)
    with _psycopg(proxy, terminal_pki, terminal_pki.cashier) as before:
        route_values = _show_all(before)
    async with _asyncpg(proxy, terminal_pki, terminal_pki.manager, **STARTUP_VALUES) as attacker:
        assert await attacker.fetchval("SHOW search_path") == "evil, public"
        with _psycopg(proxy, terminal_pki, terminal_pki.cashier) as victim:
            assert _show_all(victim) == route_values
        # A terminal asking for some of the same settings gets exactly its own set.
        async with _asyncpg(proxy, terminal_pki, terminal_pki.cashier, TimeZone="Pacific/Chatham") as other:
            assert await other.fetchval("SHOW TimeZone") == "Pacific/Chatham"
            assert await other.fetchval("SHOW search_path") == route_values["search_path"]
            assert await other.fetchval("SHOW DateStyle") == route_values["DateStyle"]
            assert await other.fetchval("SHOW statement_timeout") == route_values["statement_timeout"]
        assert await attacker.fetchval("SHOW DateStyle") == "SQL, DMY"
        assert await attacker.fetchval("SHOW default_transaction_read_only") == "on"


# --- SET of the settings the server reports ---


def test_set_of_reported_settings_does_not_reach_the_next_terminal(
    start_proxy: StartProxy, terminal_pki: TerminalPKI, tmp_path: Path
) -> None:
    proxy = _proxy(start_proxy, "transaction", tmp_path)
    with _psycopg(proxy, terminal_pki, terminal_pki.cashier) as before:
        route_values = _show_all(before)
        pid = _backend_pid(before)
    with _psycopg(proxy, terminal_pki, terminal_pki.manager) as attacker:
        for name, value in REPORTED_SET.items():
            assert route_values[name] != value, name
            attacker.execute(sql.SQL("SET {} = {}").format(sql.Identifier(name.lower()), sql.Literal(value)))
        # Not pinned: the settings are reported, and the connection goes back to the pool.
        with _psycopg(proxy, terminal_pki, terminal_pki.cashier) as victim:
            assert _backend_pid(victim) == pid
            assert _show_all(victim) == route_values
        for name, value in REPORTED_SET.items():
            shown = attacker.execute(sql.SQL("SHOW {}").format(sql.Identifier(name.lower()))).fetchone()
            assert shown is not None and shown[0].lower() == value.lower(), name


# The startup settings the server does not report: a SET, RESET or set_config of them is carried
# (transaction pooling goes on), so the proxy itself must keep them from the next terminal.
CARRIED_SET = {name: value for name, value in STARTUP_VALUES.items() if name.lower() in CARRIED_SETTINGS}


def test_every_carried_setting_is_attacked() -> None:
    assert {name.lower() for name in CARRIED_SET} == set(CARRIED_SETTINGS)


@pytest.mark.parametrize(
    "statement",
    [
        "SET {name} = {value}",
        "SELECT set_config('{name}', {value}, false)",
        "BEGIN; SET {name} = {value}; COMMIT",
        "SELECT set_config('{name}', {value}, false)::text || pg_sleep(0.05)::text",
    ],
)
def test_carried_settings_of_one_terminal_do_not_reach_the_next(
    start_proxy: StartProxy, terminal_pki: TerminalPKI, tmp_path: Path, shadow_schema: None, statement: str
) -> None:
    proxy = _proxy(start_proxy, "transaction", tmp_path)
    with _psycopg(proxy, terminal_pki, terminal_pki.cashier) as before:
        route_values = _show_all(before)
        pid = _backend_pid(before)
    with _psycopg(proxy, terminal_pki, terminal_pki.manager) as attacker:
        for name, value in CARRIED_SET.items():
            # SET reads a list setting's items as separate values, set_config reads one string.
            as_sql = value if name == "search_path" and "set_config" not in statement else None
            literal = as_sql or sql.Literal(value).as_string(attacker)
            attacker.execute(statement.format(name=name, value=literal))
        assert attacker.execute("SELECT name FROM price_list").fetchone() == ("shadow pen",)
        # Not pinned: the next terminal takes the same server connection between the attacker's
        # transactions, and finds the route's values.
        with _psycopg(proxy, terminal_pki, terminal_pki.cashier) as victim:
            assert _backend_pid(victim) == pid
            assert _show_all(victim) == route_values
            assert victim.execute("SELECT name FROM price_list").fetchone() == ("real pen",)
        # The attacker keeps what it set, on whichever connection it is lent next.
        shown = _show_all(attacker)
        assert {name: shown[name] for name in CARRIED_SET} == {
            name: SHOWN.get(name, value) for name, value in CARRIED_SET.items()
        }
        assert _backend_pid(attacker) == pid
    assert not [record for record in proxy.log_events() if record.get("event") == "session_pinned"]


@pytest.mark.usefixtures("shadow_schema")
@pytest.mark.parametrize("placeholder", ["%s", "%b"])  # text, binary
@pytest.mark.parametrize("mode", ["transaction", "session"])
def test_bound_set_config_of_one_terminal_does_not_reach_the_next(
    start_proxy: StartProxy, terminal_pki: TerminalPKI, tmp_path: Path, mode: str, placeholder: str
) -> None:
    """psycopg's set_config(%s, %s, false) sends the setting's name and value as parameters: read
    at each Bind, carried like the constant (psycopg's own test_set_transaction_param_reset)."""
    proxy = _proxy(start_proxy, mode, tmp_path)
    with _psycopg(proxy, terminal_pki, terminal_pki.cashier) as before:
        route_values = _show_all(before)
    statement = f"SELECT set_config({placeholder}, {placeholder}, false)"
    with _psycopg(proxy, terminal_pki, terminal_pki.manager) as attacker:
        for name, value in CARRIED_SET.items():
            # prepare=True: a named statement, bound again below with other values.
            attacker.execute(statement, (name, value), prepare=True)
        assert attacker.execute("SELECT name FROM price_list").fetchone() == ("shadow pen",)
        if mode == "transaction":
            with _psycopg(proxy, terminal_pki, terminal_pki.cashier) as victim:
                assert _show_all(victim) == route_values
                assert victim.execute("SELECT name FROM price_list").fetchone() == ("real pen",)
        shown = _show_all(attacker)
        assert {name: shown[name] for name in CARRIED_SET} == {
            name: SHOWN.get(name, value) for name, value in CARRIED_SET.items()
        }
        attacker.execute(statement, ("search_path", "public"), prepare=True)
        assert attacker.execute("SELECT name FROM price_list").fetchone() == ("real pen",)
        attacker.execute(statement, ("search_path", "evil, public"), prepare=True)
    with _psycopg(proxy, terminal_pki, terminal_pki.cashier) as victim:
        assert _show_all(victim) == route_values
        assert victim.execute("SELECT name FROM price_list").fetchone() == ("real pen",)
    assert not [record for record in proxy.log_events() if record.get("event") == "session_pinned"]


@pytest.mark.parametrize("mode", ["transaction", "session"])
async def test_a_bound_set_config_is_decided_on_its_values(
    start_proxy: StartProxy, terminal_pki: TerminalPKI, tmp_path: Path, shadow_schema: None, mode: str
) -> None:
    """asyncpg binds text in binary format. A bound client_encoding the proxy cannot read is
    refused as the constant is, whatever the spelling; a policy role may not set by a bound name
    what it may not set by a constant one."""
    proxy = _proxy(start_proxy, mode, tmp_path, cashier_policy=True)
    async with _asyncpg(proxy, terminal_pki, terminal_pki.manager) as manager:
        by_name = await manager.prepare("SELECT set_config($1, $2, false)")
        by_value = await manager.prepare("SELECT set_config('client_encoding', $1::text, false)")
        for spelling in ("SJIS", "sjis", "Shift_JIS", "shift-jis", "MSKANJI", "win 932"):
            with pytest.raises(asyncpg.FeatureNotSupportedError) as constant:
                await manager.execute(f"SELECT set_config('client_encoding', '{spelling}', false)")
            for bound in (by_name.fetchval("client_encoding", spelling), by_value.fetchval(spelling)):
                with pytest.raises(asyncpg.FeatureNotSupportedError) as refused:
                    await bound
                assert refused.value.args == constant.value.args, spelling
                assert await manager.fetchval("SHOW client_encoding") == "UTF8"
        # Settings other than these are read and carried: the statement is usable.
        assert await by_name.fetchval("work_mem", "77MB") == "77MB"
        assert await by_name.fetchval("CLIENT_ENCODING", "utf-8") == "UTF8"
        with pytest.raises(asyncpg.FeatureNotSupportedError, match="constant setting name"):
            await manager.fetchval("SELECT set_config($1, $2, false)", None, "SJIS")
        # SQL EXECUTE of the statement: its values are in the text, where the proxy does not read them.
        with pytest.raises(asyncpg.FeatureNotSupportedError, match="constant setting name"):
            await manager.execute(f"EXECUTE \"{by_name.get_name()}\"('client_encoding', 'SJIS')")
        assert await manager.fetchval("SHOW client_encoding") == "UTF8"
    async with _asyncpg(proxy, terminal_pki, terminal_pki.cashier) as cashier:
        refused_names = (("search_path", "evil, public"), ("client_encoding", "SJIS"), ("role", "postgres"))
        for name, value in refused_names:
            with pytest.raises(asyncpg.InsufficientPrivilegeError) as constant:
                await cashier.execute(f"SELECT set_config('{name}', '{value}', false)")
            with pytest.raises(asyncpg.InsufficientPrivilegeError) as refused:
                await cashier.fetchval("SELECT set_config($1, $2, false)", name, value)
            assert refused.value.args == constant.value.args, name
        assert await cashier.fetchval("SELECT name FROM price_list WHERE sku = '1'") == "real pen"


async def test_a_prepared_statement_that_changes_a_carried_setting_is_followed_at_every_execution(
    start_proxy: StartProxy, terminal_pki: TerminalPKI, tmp_path: Path, shadow_schema: None
) -> None:
    """Parsed once, bound many times (asyncpg caches its statements): each Bind changes the setting
    again, with no Parse for the proxy to read."""
    proxy = _proxy(start_proxy, "transaction", tmp_path)
    with _psycopg(proxy, terminal_pki, terminal_pki.cashier) as before:
        route_values = _show_all(before)
    async with _asyncpg(proxy, terminal_pki, terminal_pki.manager) as attacker:
        statement = await attacker.prepare("SELECT set_config('search_path', $1, false)")
        for path in ("public", "evil, public", "public", "evil, public"):
            await statement.fetchval(path)
            with _psycopg(proxy, terminal_pki, terminal_pki.cashier) as victim:
                assert _show_all(victim) == route_values, path
                assert victim.execute("SELECT name FROM price_list").fetchone() == ("real pen",)
            assert await attacker.fetchval("SHOW search_path") == path
    assert not [record for record in proxy.log_events() if record.get("event") == "session_pinned"]


async def test_sql_execute_of_a_protocol_prepared_setting_change_is_followed(
    start_proxy: StartProxy, terminal_pki: TerminalPKI, tmp_path: Path
) -> None:
    """Prepared through the protocol, run by SQL EXECUTE (no Bind for the proxy to follow): each
    EXECUTE changes the setting again on whichever server connection runs it."""
    proxy = _proxy(start_proxy, "transaction", tmp_path)
    with _psycopg(proxy, terminal_pki, terminal_pki.cashier) as before:
        route_values = _show_all(before)
    async with _asyncpg(proxy, terminal_pki, terminal_pki.manager) as attacker:
        statement = await attacker.prepare("SET work_mem = '77MB'")
        await attacker.execute("RESET work_mem")
        for round_ in range(3):
            await attacker.execute(f'EXECUTE "{statement.get_name()}"')
            with _psycopg(proxy, terminal_pki, terminal_pki.cashier) as victim:
                assert _show_all(victim) == route_values, round_
            assert await attacker.fetchval("SHOW work_mem") == "77MB"
    assert not [record for record in proxy.log_events() if record.get("event") == "session_pinned"]


async def test_a_carried_setting_left_by_a_terminal_that_hangs_up_at_once_does_not_reach_the_next(
    start_proxy: StartProxy, terminal_pki: TerminalPKI, tmp_path: Path, shadow_schema: None
) -> None:
    proxy = _proxy(start_proxy, "transaction", tmp_path)
    with _psycopg(proxy, terminal_pki, terminal_pki.cashier) as before:
        route_values = _show_all(before)
    for round_ in range(5):
        # Gone before the proxy can read the settings back, or while it does.
        async with _asyncpg(proxy, terminal_pki, terminal_pki.manager) as attacker:
            await attacker.execute("SET search_path = evil, public; SET work_mem = '77MB'; SET jit = off")
        with _psycopg(proxy, terminal_pki, terminal_pki.cashier) as victim:
            assert _show_all(victim) == route_values, round_


def test_statements_sent_while_settings_are_read_back_keep_their_order(
    start_proxy: StartProxy, terminal_pki: TerminalPKI, tmp_path: Path
) -> None:
    proxy = _proxy(start_proxy, "transaction", tmp_path)
    with _psycopg(proxy, terminal_pki, terminal_pki.manager) as client:
        # One write: the SHOWs reach the proxy while it reads back what each SET left.
        with client.pipeline():
            cursors = []
            for megabytes in range(10, 15):
                client.execute(f"SET work_mem = '{megabytes}MB'")
                cursors.append(client.execute("SHOW work_mem"))
        assert [cursor.fetchone() for cursor in cursors] == [(f"{mb}MB",) for mb in range(10, 15)]
        with _psycopg(proxy, terminal_pki, terminal_pki.cashier) as victim:
            assert victim.execute("SHOW work_mem").fetchone() == ("4MB",)
        assert client.execute("SHOW work_mem").fetchone() == ("14MB",)


@pytest.mark.parametrize("mode", ["transaction", "session"])
def test_set_and_set_config_are_undone_before_the_next_terminal(
    start_proxy: StartProxy, terminal_pki: TerminalPKI, tmp_path: Path, shadow_schema: None, mode: str
) -> None:
    proxy = _proxy(start_proxy, mode, tmp_path)
    with _psycopg(proxy, terminal_pki, terminal_pki.cashier) as before:
        route_values = _show_all(before)
    for attack in (
        "SET search_path = evil, public",
        "SELECT set_config('search_path', 'evil, public', false)",
        "SET statement_timeout = 4321",
        "SET SESSION CHARACTERISTICS AS TRANSACTION READ ONLY",
        "SET DateStyle = 'SQL, DMY'",
    ):
        with _psycopg(proxy, terminal_pki, terminal_pki.manager) as attacker:
            attacker.execute(attack)
            assert _show_all(attacker) != route_values, attack
        # Transaction pooling pinned the attacker to its connection (or followed the reported
        # setting); session pooling reset the connection (DISCARD ALL) when the attacker left.
        with _psycopg(proxy, terminal_pki, terminal_pki.cashier) as victim:
            assert _show_all(victim) == route_values, attack
            assert victim.execute("SELECT name FROM price_list").fetchone() == ("real pen",)


async def test_discard_all_by_one_terminal_does_not_drop_the_next_terminals_settings(
    start_proxy: StartProxy, terminal_pki: TerminalPKI, tmp_path: Path
) -> None:
    proxy = _proxy(start_proxy, "transaction", tmp_path)
    async with _asyncpg(proxy, terminal_pki, terminal_pki.manager, statement_timeout="4321") as first:
        assert await first.fetchval("SHOW statement_timeout") == "4321ms"
        await first.execute("DISCARD ALL")  # the server forgets what the proxy set
        async with _asyncpg(proxy, terminal_pki, terminal_pki.cashier, statement_timeout="4321") as second:
            assert await second.fetchval("SHOW statement_timeout") == "4321ms"
        # DISCARD ALL dropped asyncpg's prepared "SHOW statement_timeout" too, as on the server
        # (InvalidSQLStatementNameError): ask with a statement prepared since.
        assert await first.fetchval("SELECT current_setting('statement_timeout')") == "4321ms"


async def test_reset_all_by_one_terminal_does_not_drop_the_next_terminals_settings(
    start_proxy: StartProxy, terminal_pki: TerminalPKI, tmp_path: Path
) -> None:
    proxy = _proxy(start_proxy, "transaction", tmp_path)
    async with _asyncpg(proxy, terminal_pki, terminal_pki.cashier, statement_timeout="4321") as victim:
        assert await victim.fetchval("SHOW statement_timeout") == "4321ms"
        with _psycopg(proxy, terminal_pki, terminal_pki.manager) as attacker:
            attacker.execute("RESET ALL")  # the server forgets what the proxy set for the victim
        assert await victim.fetchval("SHOW statement_timeout") == "4321ms"


# --- the shadow table attack ---


async def test_search_path_of_one_terminal_does_not_redirect_the_next_terminals_policy(
    start_proxy: StartProxy, terminal_pki: TerminalPKI, tmp_path: Path, shadow_schema: None
) -> None:
    """The cashier's policy decides on public.price_list; the server must read public.price_list."""
    proxy = _proxy(start_proxy, "transaction", tmp_path, cashier_policy=True)
    async with _asyncpg(proxy, terminal_pki, terminal_pki.manager, search_path="evil, public") as attacker:
        assert await attacker.fetchval("SELECT name FROM price_list") == "shadow pen"
        async with _asyncpg(proxy, terminal_pki, terminal_pki.cashier) as cashier:
            assert await cashier.fetchval("SELECT name FROM price_list WHERE sku = '1'") == "real pen"
            with pytest.raises(asyncpg.InsufficientPrivilegeError):
                await cashier.fetchval("SELECT name FROM evil.price_list")
            assert await cashier.fetchval("SELECT name FROM price_list WHERE sku = '1'") == "real pen"
        assert await attacker.fetchval("SELECT name FROM price_list") == "shadow pen"


async def test_a_schema_named_after_the_route_user_does_not_shadow_the_policys_tables(
    start_proxy: StartProxy, terminal_pki: TerminalPKI, tmp_path: Path, shadow_schema: None, pg_cluster: Any
) -> None:
    """The route's search_path starts with "$user": a schema named after the route's user (which
    the route's user may create in its database) would shadow public.price_list for the server."""
    proxy = _proxy(start_proxy, "transaction", tmp_path, cashier_policy=True)
    with _superuser(pg_cluster) as admin:
        admin.execute(f"CREATE SCHEMA {pg_cluster.user} AUTHORIZATION {pg_cluster.user}")
    try:
        with _superuser(pg_cluster) as admin:
            admin.execute(f"CREATE TABLE {pg_cluster.user}.price_list (sku text PRIMARY KEY, name text)")
            admin.execute(f"INSERT INTO {pg_cluster.user}.price_list VALUES ('1', 'user schema pen')")
            admin.execute(f"ALTER TABLE {pg_cluster.user}.price_list OWNER TO {pg_cluster.user}")
        with _psycopg(proxy, terminal_pki, terminal_pki.manager) as without_policy:
            assert without_policy.execute("SELECT name FROM price_list").fetchone() == ("user schema pen",)
        async with _asyncpg(proxy, terminal_pki, terminal_pki.cashier) as cashier:
            assert await cashier.fetchval("SELECT name FROM price_list WHERE sku = '1'") == "real pen"
        with _psycopg(proxy, terminal_pki, terminal_pki.manager) as without_policy:
            assert without_policy.execute("SELECT name FROM price_list").fetchone() == ("user schema pen",)
    finally:
        with _superuser(pg_cluster) as admin:
            admin.execute(f"DROP SCHEMA {pg_cluster.user} CASCADE")


# --- startup settings a role with a policy may not choose ---


@pytest.mark.parametrize(
    "setting",
    [
        ("search_path", "evil, public"),
        ("search_path", "evil"),
        ("search_path", "public\u00a0"),  # a no-break space is part of the name: another schema
        ("search_path", '"Public"'),
        ("search_path", "public,"),  # the server refuses it; the proxy must not read it as public
        ("default_transaction_read_only", "on"),
        ("default_transaction_read_only", "off"),
        ("statement_timeout", "1"),  # SET is not among the cashier's statement kinds
        ("default_transaction_isolation", "serializable"),
        ("work_mem", "1GB"),  # SET is not among the cashier's statement kinds
        ("options", "-c work_mem=1GB"),
        ("options", "-c search_path=evil,public"),
        ("client_min_messages", "debug5"),
    ],
)
async def test_startup_setting_the_policy_refuses_as_set_is_refused(
    start_proxy: StartProxy,
    terminal_pki: TerminalPKI,
    tmp_path: Path,
    shadow_schema: None,
    setting: tuple[str, str],
) -> None:
    name, value = setting
    refused = value.partition(" ")[2].partition("=")[0] if name == "options" else name
    proxy = _proxy(start_proxy, "transaction", tmp_path, cashier_policy=True)
    with pytest.raises(
        asyncpg.InsufficientPrivilegeError, match=f'permission denied to set parameter "{refused}"'
    ):
        async with _asyncpg(proxy, terminal_pki, terminal_pki.cashier, **{name: value}):
            pass
    proxy.wait_for_event("session_refused", sqlstate="42501")
    # The terminal may connect again without it.
    async with _asyncpg(proxy, terminal_pki, terminal_pki.cashier) as cashier:
        assert await cashier.fetchval("SELECT name FROM price_list WHERE sku = '1'") == "real pen"


@pytest.mark.parametrize(
    "settings",
    [
        {"search_path": "public"},
        {"search_path": ' "public" '},
        {"search_path": "PUBLIC"},
        {"application_name": "till 7", "DateStyle": "ISO, DMY", "TimeZone": "Europe/Berlin"},
        {"extra_float_digits": "3", "IntervalStyle": "iso_8601", "client_encoding": "UTF8"},
    ],
)
async def test_startup_settings_drivers_send_are_accepted_under_a_policy(
    start_proxy: StartProxy,
    terminal_pki: TerminalPKI,
    tmp_path: Path,
    shadow_schema: None,
    settings: dict[str, str],
) -> None:
    proxy = _proxy(start_proxy, "transaction", tmp_path, cashier_policy=True)
    async with _asyncpg(proxy, terminal_pki, terminal_pki.cashier, **settings) as cashier:
        assert await cashier.fetchval("SELECT name FROM price_list WHERE sku = '1'") == "real pen"
        for name, value in settings.items():
            if name not in ("search_path", "client_encoding"):
                assert await cashier.fetchval(f"SHOW {name}") == value


# --- search_path as the server reads it ---

TRICKY_SEARCH_PATHS = [
    "a, b",
    " a ,\tb\n,\rc\f",
    '"a,b", c',
    '"Mixed", Mixed',
    '"a""b"',
    '"$user", public',
    "$user, public",
    "a\u00a0b, c",  # U+00A0 is not a separator for PostgreSQL
    "\u00a0a",
    "a\vb",  # nor is a vertical tab (PostgreSQL 15)
    "\u00c4BC, \u00e4bc",  # only ASCII letters are downcased
    '"", d',
    "x" * 70,  # cut to 63 bytes
    "é" * 40,  # cut to 63 bytes at a character boundary
    '"' + "Q" * 64 + '"',
]
INVALID_SEARCH_PATHS = ["a,,b", "a,", ",a", '"a"b', '"a', "a b", '"a" "b"']


@pytest.mark.parametrize("value", TRICKY_SEARCH_PATHS)
def test_search_path_is_split_as_the_server_splits_it(pg_cluster: Any, value: str) -> None:
    entries = search_path_entries(value)
    with _superuser(pg_cluster) as admin:
        for schema in entries:
            if schema and schema != "$user":
                admin.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(schema)))
        admin.execute("SELECT set_config('search_path', %s, false)", (value,))
        row = admin.execute("SELECT current_schemas(false)").fetchone()
    assert row is not None
    # current_schemas leaves out names without a schema ("", and "$user" for a role without one).
    assert row[0] == [schema for schema in entries if schema and schema != "$user"]


@pytest.mark.parametrize("value", INVALID_SEARCH_PATHS)
def test_search_path_the_server_refuses_is_refused(pg_cluster: Any, value: str) -> None:
    with pytest.raises(SearchPathSyntaxError):
        search_path_entries(value)
    with _superuser(pg_cluster) as admin, pytest.raises(psycopg.errors.InvalidParameterValue):
        admin.execute("SELECT set_config('search_path', %s, false)", (value,))
