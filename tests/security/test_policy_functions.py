"""Functions are default-deny for a role with a policy: only the built-in safe set and what the
policy lists in `allow.functions` run, and sequence functions only on listed sequences.

The attacker holds a cashier certificate (SELECT/INSERT/UPDATE on its tables) and calls
functions that a deny list never named: setval to stop every till's sales, pg_stat_get_activity
to read other terminals' SQL, pg_notify to act outside its statement kinds, and functions the DBA
created in other schemas, some named like built-ins. Each attack is first run by the superuser to
show the function is real (a refusal is the proxy's 42501, not the server's 42883), and the
database is checked afterwards: nothing refused ran.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import psycopg
import pytest
import yaml

from proxy.policy.model import BUILTIN_FUNCTIONS
from proxy.policy.postgres import analyze
from tests.integration.proxyproc import ProxyProcess, TerminalPKI

SETUP = """
DROP SCHEMA IF EXISTS fn_evil CASCADE;
DROP FUNCTION IF EXISTS public.upper(text);
DROP TABLE IF EXISTS public.fn_sales;
DROP SEQUENCE IF EXISTS public.fn_payroll_seq;
CREATE TABLE public.fn_sales (id bigserial PRIMARY KEY, total_cents int NOT NULL);
CREATE SEQUENCE public.fn_payroll_seq;
ALTER TABLE public.fn_sales OWNER TO pos_proxy;
ALTER SEQUENCE public.fn_payroll_seq OWNER TO pos_proxy;
INSERT INTO public.fn_sales (total_cents) SELECT 100 FROM generate_series(1, 3);
CREATE SCHEMA fn_evil AUTHORIZATION pos_proxy;
-- A DBA's functions: one named like a built-in in another schema, one procedure.
CREATE FUNCTION fn_evil.lower(text) RETURNS text LANGUAGE sql
    AS $$ DELETE FROM public.fn_sales RETURNING 'deleted' $$;
CREATE PROCEDURE fn_evil.wipe() LANGUAGE sql AS $$ DELETE FROM public.fn_sales $$;
ALTER FUNCTION fn_evil.lower(text) OWNER TO pos_proxy;
-- A built-in's exact signature in public: pg_catalog comes first, so upper('x') is the built-in.
CREATE FUNCTION public.upper(text) RETURNS text LANGUAGE sql
    AS $$ DELETE FROM public.fn_sales RETURNING 'deleted' $$;
ALTER PROCEDURE fn_evil.wipe() OWNER TO pos_proxy;
"""
TEARDOWN = """
DROP SCHEMA fn_evil CASCADE;
DROP FUNCTION public.upper(text);
DROP TABLE public.fn_sales;
DROP SEQUENCE public.fn_payroll_seq;
"""
CASHIER = {
    "mode": "enforce",
    "search_path": ["public"],
    "allow": {
        "kinds": ["SELECT", "INSERT", "UPDATE"],
        "write": ["fn_sales"],
        "sequences": ["fn_sales_id_seq"],
    },
}
# The same role's rights plus two functions it needs.
KIOSK = {**CASHIER, "allow": {**CASHIER["allow"], "functions": ["pg_notify", "fn_evil.lower"]}}

# (statement, the function the refusal names) for attacks that a superuser shows are real.
ATTACKS = [
    ("SELECT setval('fn_sales_id_seq', 1)", "setval"),
    ("SELECT pg_catalog.setval('public.fn_sales_id_seq'::regclass, 1, false)", "pg_catalog.setval"),
    ("SELECT query FROM pg_stat_get_activity(NULL)", "pg_stat_get_activity"),
    ("SELECT * FROM pg_prepared_statement()", "pg_prepared_statement"),
    ("SELECT name, setting FROM pg_show_all_settings()", "pg_show_all_settings"),
    ("SELECT current_setting('data_directory')", "current_setting"),
    ("SELECT pg_notify('tills', 'closing time')", "pg_notify"),
    ("SELECT pg_advisory_lock(15)", "pg_advisory_lock"),
    ("SELECT * FROM pg_ls_dir('.')", "pg_ls_dir"),
    ("SELECT fn_evil.lower('A')", "fn_evil.lower"),
    ("SELECT total_cents FROM fn_sales WHERE fn_evil.lower('x') IS NOT NULL", "fn_evil.lower"),
    ("SELECT pos.fn_evil.lower('A')", "fn_evil.lower"),
    ("CALL fn_evil.wipe()", "fn_evil.wipe"),
    ("SELECT public.upper('a')", "public.upper"),
]


def _superuser(cluster: Any) -> psycopg.Connection:
    return psycopg.connect(**cluster.connect_kwargs(user="postgres", dbname="pos"), autocommit=True)


@pytest.fixture
def schema(pg_cluster: Any) -> Iterator[None]:
    with _superuser(pg_cluster) as admin:
        admin.execute(SETUP)
    yield
    with _superuser(pg_cluster) as admin:
        admin.execute(TEARDOWN)


@pytest.fixture
def policy_proxy(start_proxy: Callable[..., ProxyProcess], tmp_path: Path, schema: None) -> ProxyProcess:
    roles = {}
    for role, policy in (("cashier", CASHIER), ("manager", KIOSK)):
        path = tmp_path / f"{role}.yaml"
        path.write_text(yaml.safe_dump(policy), encoding="utf-8")
        roles[role] = {"policy": str(path)}
    return start_proxy(roles=roles)


def _connect(proxy: ProxyProcess, pki: TerminalPKI, manager: bool = False) -> psycopg.Connection:
    terminal = pki.manager if manager else pki.cashier
    return psycopg.connect(**proxy.conninfo(terminal, pki.ca), autocommit=True)


def _sequence_state(cluster: Any) -> tuple[int, int, int]:
    with _superuser(cluster) as admin:
        row = admin.execute(
            "SELECT (SELECT last_value FROM public.fn_sales_id_seq), (SELECT count(*) FROM public.fn_sales),"
            " (SELECT last_value FROM public.fn_payroll_seq)"
        ).fetchone()
    assert row is not None
    return (int(row[0]), int(row[1]), int(row[2]))


def test_the_attacks_are_real_functions(pg_cluster: Any, schema: None) -> None:
    # Run by the superuser in a transaction that is rolled back: each one exists and runs.
    with _superuser(pg_cluster) as admin:
        for statement, _ in ATTACKS:
            with pytest.raises(psycopg.errors.RaiseException), admin.transaction():
                admin.execute(statement)
                admin.execute("DO $$BEGIN RAISE EXCEPTION 'roll back'; END$$")


def test_functions_outside_the_safe_set_are_refused_and_nothing_runs(
    policy_proxy: ProxyProcess, terminal_pki: TerminalPKI, pg_cluster: Any
) -> None:
    before = _sequence_state(pg_cluster)
    with _connect(policy_proxy, terminal_pki) as connection:
        for statement, function in ATTACKS:
            for prepare in (False, True):  # simple and extended protocol
                with pytest.raises(psycopg.errors.InsufficientPrivilege) as raised:
                    connection.execute(statement, prepare=prepare)
                assert raised.value.diag.message_primary == (
                    f"function {function} is not allowed for role cashier"
                ), statement
        # The session goes on, with the built-ins a till uses; an unqualified upper() is the
        # built-in, not public.upper (the server searches pg_catalog first).
        row = connection.execute(
            "SELECT lower('A'), upper('b'), pg_catalog.upper('c'), coalesce(NULL, 2), round(2.5),"
            " now() IS NOT NULL"
        ).fetchone()
        assert row == ("a", "B", "C", 2, 3, True)
    assert _sequence_state(pg_cluster) == before
    policy_proxy.wait_for_event("policy_violation", rule="function", role="cashier")


def test_sequences_only_listed_and_only_by_a_constant_name(
    policy_proxy: ProxyProcess, terminal_pki: TerminalPKI, pg_cluster: Any
) -> None:
    sales_seq, rows, payroll_seq = _sequence_state(pg_cluster)
    with _connect(policy_proxy, terminal_pki) as connection:
        # The sale's own sequence: nextval and currval work, also inside the INSERT.
        assert connection.execute("SELECT nextval('fn_sales_id_seq')").fetchone() == (sales_seq + 1,)
        inserted = connection.execute(
            "INSERT INTO fn_sales (id, total_cents) VALUES (nextval('public.fn_sales_id_seq'::regclass), 5)"
            " RETURNING id, currval('fn_sales_id_seq')"
        ).fetchone()
        assert inserted == (sales_seq + 2, sales_seq + 2)
        for statement, message in [
            (
                "SELECT nextval('fn_payroll_seq')",
                "using sequence public.fn_payroll_seq is not allowed for role cashier",
            ),
            (
                "SELECT nextval('fn_' || 'payroll_seq')",
                "nextval of a sequence named at run time is not allowed for role cashier",
            ),
            (
                "SELECT nextval('fn_payroll_seq'::regclass::oid::int)",
                "nextval of a sequence named at run time",
            ),
            ("SELECT currval('\"fn_payroll_seq\"')", "using sequence public.fn_payroll_seq"),
        ]:
            with pytest.raises(psycopg.errors.InsufficientPrivilege) as raised:
                connection.execute(statement)
            assert raised.value.diag.message_primary.startswith(message), statement
        # A parameter names the sequence only at Bind: refused at Parse.
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match="named at run time"):
            connection.execute("SELECT nextval(%s)", ["fn_payroll_seq"])
    assert _sequence_state(pg_cluster) == (sales_seq + 2, rows + 1, payroll_seq)


def test_allow_functions_lets_a_role_call_what_its_policy_lists(
    policy_proxy: ProxyProcess, terminal_pki: TerminalPKI, pg_cluster: Any
) -> None:
    with _connect(policy_proxy, terminal_pki, manager=True) as connection:
        assert connection.execute("SELECT pg_notify('tills', 'closing time')").fetchone() == ("",)
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match="function setval is not allowed"):
            connection.execute("SELECT setval('fn_sales_id_seq', 1)")
        # The listed function is the one in fn_evil; the DBA's decision, and it does what it does.
        assert connection.execute("SELECT fn_evil.lower('A')").fetchone() == ("deleted",)
    assert _sequence_state(pg_cluster)[1] == 0


async def test_drivers_housekeeping_and_a_sale_still_work(
    policy_proxy: ProxyProcess, terminal_pki: TerminalPKI
) -> None:
    connection = await asyncpg.connect(
        host="127.0.0.1",
        port=policy_proxy.port,
        user=terminal_pki.cashier.terminal,
        database="pos",
        ssl=policy_proxy.ssl_context(terminal_pki.cashier, terminal_pki.ca),
        timeout=10,
    )
    try:
        row = await connection.fetchrow(
            "SELECT version(), current_database(), current_schema(), pg_backend_pid() > 0, current_user"
        )
        assert row is not None and row[1] == "pos" and row[2] == "public" and row[3] is True
        async with connection.transaction():
            sale = await connection.fetchval(
                "INSERT INTO fn_sales (total_cents) VALUES ($1) RETURNING id", 129
            )
            total = await connection.fetchval(
                "SELECT sum(total_cents) FILTER (WHERE id = $1) FROM fn_sales WHERE id >= $1", sale
            )
        assert total == 129
        with pytest.raises(asyncpg.InsufficientPrivilegeError, match="function pg_sleep is not allowed"):
            await connection.fetchval("SELECT pg_sleep($1)", 0.1)
    finally:
        await connection.close()


def test_every_built_in_of_the_safe_set_is_in_pg_catalog(pg_cluster: Any) -> None:
    # A name missing from pg_catalog would resolve through the search_path, to whatever function
    # of that name someone created there: the safe set must name only real built-ins.
    with _superuser(pg_cluster) as admin:
        rows = admin.execute(
            "SELECT DISTINCT proname FROM pg_proc WHERE pronamespace = 'pg_catalog'::regnamespace"
        ).fetchall()
    catalog = {row[0] for row in rows}
    assert sorted(BUILTIN_FUNCTIONS - catalog) == []


SEQUENCE_SPELLINGS = [
    "fn_sales_id_seq",
    "FN_SALES_ID_SEQ",
    " public . fn_sales_id_seq\t",
    'public."fn_sales_id_seq"',
    '"Fn_Sales"',
    "fn_sales",
    '"fn_odd.name"',
    '"fn_odd""quote"',
    "fn_odd.name",
    "pg_catalog.pg_class",
    "fn_sales_id_seq;fn_payroll_seq",
    "fn_sales_id_seq fn_payroll_seq",
    "pos.public.fn_sales_id_seq",
    "16400",
    "",
    '""',
    '"fn_sales_id_seq',
    "fn_sales_id_seq.",
]


def test_the_proxy_reads_a_sequence_name_as_the_server_does(pg_cluster: Any, schema: None) -> None:
    # Wherever the proxy reads a name at all (it refuses what it does not read), it must be the
    # relation the server's regclass input finds for the same text.
    with _superuser(pg_cluster) as admin:
        admin.execute('CREATE SEQUENCE public."Fn_Sales"; CREATE SEQUENCE public."fn_odd.name"')
        admin.execute('CREATE SEQUENCE public."fn_odd""quote"')
        agreed = 0
        try:
            for spelling in SEQUENCE_SPELLINGS:
                try:
                    row = admin.execute(
                        "SELECT n.nspname || '.' || c.relname FROM pg_class c"
                        " JOIN pg_namespace n ON n.oid = c.relnamespace WHERE c.oid = %s::regclass",
                        [spelling],
                    ).fetchone()
                    server = None if row is None else row[0]
                except psycopg.Error:
                    server = None
                (facts,) = analyze(f"SELECT nextval({_literal(spelling)})", ("public",))
                ours = next(iter(facts.sequences), None)
                assert (ours is None) == bool(facts.unnamed_sequence_calls), spelling
                if server is not None:  # (a name the server does not find fails there)
                    assert ours in (None, server), spelling
                    agreed += ours == server
        finally:
            admin.execute('DROP SEQUENCE public."Fn_Sales", public."fn_odd.name", public."fn_odd""quote"')
    assert agreed == 9  # every spelling the server finds, but the three-part one


def _literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def test_set_config_is_a_set_and_needs_the_set_kind(
    policy_proxy: ProxyProcess, terminal_pki: TerminalPKI, pg_cluster: Any
) -> None:
    """set_config is SET by other means: a role whose policy has no SET kind cannot raise work_mem
    or drop its statement_timeout with it, in any place of a statement; jit, application_name and
    extra_float_digits stay as housekeeping (asyncpg turns jit off)."""
    with _connect(policy_proxy, terminal_pki) as connection:
        before = connection.execute("SHOW work_mem").fetchone()
        for statement in (
            "SELECT set_config('work_mem', '64GB', false)",
            "SELECT total_cents FROM fn_sales WHERE set_config('statement_timeout', '0', false) IS NOT NULL",
            "SELECT pg_catalog.set_config('work_mem'::text, '64GB', true)",
        ):
            for prepare in (False, True):
                with pytest.raises(psycopg.errors.InsufficientPrivilege) as raised:
                    connection.execute(statement, prepare=prepare)
                assert raised.value.diag.message_primary == (
                    "statement kind SET is not allowed for role cashier"
                ), statement
        assert connection.execute("SHOW work_mem").fetchone() == before
        assert connection.execute("SELECT set_config('jit', 'off', false)").fetchone() == ("off",)
