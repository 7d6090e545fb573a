"""PolicyEngine (cache, roles, FunctionCall) and the policy options, parsed from policy files."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pglast.parser import fingerprint

from proxy.config.load import parse_config
from proxy.policy.engine import INSUFFICIENT_PRIVILEGE, SYNTAX_ERROR, Decision, PolicyEngine
from proxy.policy.model import STATEMENT_KINDS, PolicyMode, RolePolicy
from proxy.policy.postgres import analyze
from proxy.yamlreader import ConfigError

CASHIER_ALLOW = """\
allow:
  kinds: [SELECT, INSERT, UPDATE]
  read: [products, stock]
  write: [sales, sale_items, stock]
"""


def _config_data(base: Path, policies: dict[str, str | None]) -> dict[str, object]:
    for name in ("proxy.crt", "proxy.key", "terminal-ca.crt"):
        (base / name).write_text("-----BEGIN PLACEHOLDER-----\n")
    roles: dict[str, object] = {}
    for role, text in policies.items():
        if text is None:
            roles[role] = None
            continue
        path = base / f"{role}.yaml"
        path.write_text(textwrap.dedent(text))
        roles[role] = {"policy": str(path)}
    return {
        "tls": {"cert": "proxy.crt", "key": "proxy.key", "client_ca": "terminal-ca.crt"},
        "roles": roles,
        "routes": {"pos": {"host": "db.example.internal", "user": "pos_proxy", "sslmode": "disable"}},
    }


def load(base: Path, **policies: str | None) -> dict[str, RolePolicy | None]:
    """Policies as proxy.config parses them from policy files (None: a role without a policy)."""
    config = parse_config(_config_data(base, policies), base_dir=base, environ={})
    return {role: config.roles[role].policy for role in policies}


def problems(base: Path, **policies: str | None) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        parse_config(_config_data(base, policies), base_dir=base, environ={})
    return [str(problem) for problem in caught.value.problems]


def engine(base: Path, cache_size: int = 10_000, **policies: str | None) -> PolicyEngine:
    return PolicyEngine(load(base, **policies), cache_size=cache_size)


def fingerprint_entry(sql: str) -> str:
    return f"  - {{fingerprint: '{fingerprint(sql)}', text: {sql!r}}}\n"


CASHIER = RolePolicy(
    kinds=frozenset({"SELECT", "INSERT", "UPDATE"}),
    read_tables=frozenset({"public.products", "public.stock"}),
    write_tables=frozenset({"public.sales", "public.sale_items", "public.stock"}),
)
MANAGER = RolePolicy(
    kinds=frozenset({"SELECT", "INSERT", "UPDATE", "DELETE"}),
    read_tables=frozenset({"public.products", "public.stock", "public.sales", "public.sale_items"}),
    write_tables=frozenset({"public.sales", "public.sale_items", "public.stock", "public.products"}),
)


# --- the decision cache -----------------------------------------------------------------------------------


def test_cache_counts_misses_then_hits_and_returns_the_same_decision() -> None:
    policies = PolicyEngine({"cashier": CASHIER})
    first = policies.decide("cashier", b"SELECT name FROM products WHERE sku = $1")
    assert (policies.misses, policies.hits) == (1, 0)
    again = policies.decide("cashier", b"SELECT name FROM products WHERE sku = $1")
    assert again is first
    assert (policies.misses, policies.hits) == (1, 1)
    # The key is the exact text: another spelling is parsed (and cached) on its own.
    policies.decide("cashier", b"select name from products where sku = $1")
    assert (policies.misses, policies.hits) == (2, 1)


def test_cache_is_a_bounded_lru() -> None:
    policies = PolicyEngine({"cashier": CASHIER}, cache_size=2)
    a, b, c = b"SELECT 1", b"SELECT * FROM products", b"DELETE FROM sales WHERE id = 1"
    decisions = {sql: policies.decide("cashier", sql) for sql in (a, b)}  # misses: a, b
    policies.decide("cashier", a)  # hit: a becomes the most recently used
    decisions[c] = policies.decide("cashier", c)  # miss: evicts b, the least recently used
    assert (policies.misses, policies.hits) == (3, 1)
    assert policies.decide("cashier", a) is decisions[a]  # still cached
    assert policies.decide("cashier", c) is decisions[c]  # still cached
    assert (policies.misses, policies.hits) == (3, 3)
    again = policies.decide("cashier", b)  # evicted: parsed again, same answer
    assert (policies.misses, policies.hits) == (4, 3)
    assert again == decisions[b] and again is not decisions[b]
    assert len(policies._cache) == 2


def test_cache_size_one_still_decides_correctly() -> None:
    policies = PolicyEngine({"cashier": CASHIER}, cache_size=1)
    for _ in range(3):
        assert policies.decide("cashier", b"SELECT 1").allowed
        assert not policies.decide("cashier", b"DROP TABLE sales").allowed
    assert (policies.misses, policies.hits) == (6, 0)


def test_cache_keeps_roles_apart() -> None:
    policies = PolicyEngine({"cashier": CASHIER, "manager": MANAGER})
    sql = b"DELETE FROM sales WHERE id = 42"
    for _ in range(2):
        cashier, manager = policies.decide("cashier", sql), policies.decide("manager", sql)
        assert (cashier.allowed, cashier.rule) == (False, "statement kind")
        assert "for role cashier" in cashier.message
        assert (manager.allowed, manager.rule) == (True, "structural")
    assert (policies.misses, policies.hits) == (2, 2)


def test_decide_reads_utf8_from_the_wire() -> None:
    policies = PolicyEngine({"cashier": CASHIER})
    decision = policies.decide("cashier", "SELECT sku FROM products WHERE name = 'Café ☕'".encode())
    assert (decision.allowed, decision.rule) == (True, "structural")
    assert decision.statements[0][1] == "SELECT sku FROM products WHERE name = $1"


def test_bytes_that_are_not_utf8_are_refused() -> None:
    policies = PolicyEngine({"cashier": CASHIER})
    decision = policies.decide("cashier", b"SELECT E'\x95\\'; DROP TABLE sales; --'")
    assert not decision.allowed


# --- roles without policies and the FunctionCall message ----------------------------------------------------


def test_role_without_policy_is_not_filtered(tmp_path: Path) -> None:
    policies = engine(tmp_path, kiosk=None, cashier=CASHIER_ALLOW)
    assert policies.policy("kiosk") is None
    assert policies.mode("kiosk") is None
    decision = policies.decide("kiosk", b"DROP TABLE sales")
    assert decision == Decision(True, "no policy")
    assert policies.decide_function_call("kiosk").allowed
    assert not policies.decide("cashier", b"DROP TABLE sales").allowed


def test_function_call_message_refused_by_default(tmp_path: Path) -> None:
    policies = engine(tmp_path, cashier=CASHIER_ALLOW)
    decision = policies.decide_function_call("cashier")
    assert not decision.allowed
    assert decision.rule == "function call message"
    assert decision.sqlstate == INSUFFICIENT_PRIVILEGE
    assert decision.message == "the function call protocol message is not allowed for role cashier"


def test_function_call_message_allowed_when_the_policy_says_so(tmp_path: Path) -> None:
    policies = engine(tmp_path, cashier="function_call_message: true\n" + CASHIER_ALLOW)
    assert policies.decide_function_call("cashier") == Decision(True, "function call message")


# --- policy options -----------------------------------------------------------------------------------------


def test_allow_functions_lets_a_named_function_through_for_that_role_only(tmp_path: Path) -> None:
    policies = engine(
        tmp_path,
        cashier=CASHIER_ALLOW,
        loadtest=CASHIER_ALLOW + "  functions: [pg_sleep]\n",
    )
    sleep = b"SELECT pg_sleep(0.1)"
    loadtest = policies.decide("loadtest", sleep)
    assert (loadtest.allowed, loadtest.rule) == (True, "structural")
    cashier = policies.decide("cashier", sleep)
    assert (cashier.allowed, cashier.rule, cashier.message) == (
        False,
        "function",
        "function pg_sleep is not allowed for role cashier",
    )
    # Only the named function: every other one and the structural rules still apply.
    other = policies.decide("loadtest", b"SELECT pg_sleep(1), pg_read_file('/etc/passwd')")
    assert (other.allowed, other.rule) == (False, "function")
    assert "pg_read_file" in other.message
    unreadable = policies.decide("loadtest", b"SELECT pg_sleep(1) FROM customers")
    assert (unreadable.allowed, unreadable.rule) == (False, "table read")


def test_an_unqualified_function_entry_covers_pg_catalog_and_the_search_path_only(tmp_path: Path) -> None:
    policies = engine(
        tmp_path,
        cashier="search_path: [pos, public]\n"
        + CASHIER_ALLOW
        + "  functions: [uuid_generate_v4, ext.digest]\n",
    )
    for sql in (
        "SELECT uuid_generate_v4()",
        "SELECT pos.uuid_generate_v4()",
        "SELECT public.uuid_generate_v4()",
        "SELECT pg_catalog.uuid_generate_v4()",
        "SELECT ext.digest('x', 'sha256')",
    ):
        assert policies.decide("cashier", sql.encode()).allowed, sql
    for sql, named in (
        ("SELECT evil.uuid_generate_v4()", "evil.uuid_generate_v4"),
        ("SELECT digest('x', 'sha256')", "digest"),  # the entry names ext's digest only
        ("SELECT public.digest('x', 'sha256')", "public.digest"),
    ):
        decision = policies.decide("cashier", sql.encode())
        assert (decision.allowed, decision.message) == (
            False,
            f"function {named} is not allowed for role cashier",
        ), sql


def test_setval_needs_the_function_and_the_sequence(tmp_path: Path) -> None:
    policies = engine(
        tmp_path,
        sequences_only=CASHIER_ALLOW + "  sequences: [sales_id_seq]\n",
        both=CASHIER_ALLOW + "  sequences: [sales_id_seq]\n  functions: [setval]\n",
    )
    rewind = b"SELECT setval('sales_id_seq', 1)"
    assert policies.decide("sequences_only", rewind).rule == "function"
    assert policies.decide("both", rewind).allowed
    other = policies.decide("both", b"SELECT setval('public.other_seq', 1)")
    assert (other.allowed, other.rule, other.message) == (
        False,
        "sequence",
        "using sequence public.other_seq is not allowed for role both",
    )


def test_set_config_on_a_sensitive_setting_is_still_a_deny_list_entry(tmp_path: Path) -> None:
    policies = engine(
        tmp_path, cashier=CASHIER_ALLOW, tuner=CASHIER_ALLOW + "  denylist_exceptions: [set_config]\n"
    )
    sql = b"SELECT set_config('row_security', 'off', false)"
    assert policies.decide("cashier", sql).rule == "denylist"
    assert policies.decide("tuner", sql).allowed


@given(st.text(alphabet=st.sampled_from("ab_Z9$.\" \t'\\é;"), max_size=24))
def test_any_sequence_name_text_is_read_or_refused(name: str) -> None:
    literal = "'" + name.replace("'", "''") + "'"
    (facts,) = analyze(f"SELECT nextval({literal})", ("public",))
    # Exactly one outcome: a qualified sequence the policy must list, or a refusal.
    assert len(facts.sequences) + len(facts.unnamed_sequence_calls) == 1
    for sequence in facts.sequences:
        schema, _, relation = sequence.partition(".")
        assert schema and relation


def test_a_function_in_denylist_exceptions_points_to_allow_functions(tmp_path: Path) -> None:
    (problem,) = problems(tmp_path, cashier=CASHIER_ALLOW + "  denylist_exceptions: [DDL, pg_sleep]\n")
    assert problem.startswith("roles.cashier.policy.allow.denylist_exceptions: item 1: expected one of: ")
    assert problem.endswith("got 'pg_sleep' (a function the role may call goes in allow.functions)")


def test_pg_catalog_may_only_come_first_in_a_policy_search_path(tmp_path: Path) -> None:
    assert load(tmp_path, first="search_path: [pg_catalog, public]\n")["first"] is not None
    assert problems(tmp_path, later="search_path: [public, pg_catalog]\n") == [
        "roles.later.policy.search_path: pg_catalog may only be listed first"
    ]


def test_ddl_exception_alone_does_not_allow_ddl(tmp_path: Path) -> None:
    # DDL is not a statement kind a policy can list: it needs an approved fingerprint as well.
    drop = "DROP TABLE sales_archive"
    policies = engine(
        tmp_path,
        plain=CASHIER_ALLOW + "  denylist_exceptions: [DDL]\n",
        migrations=CASHIER_ALLOW + "  denylist_exceptions: [DDL]\nfingerprints:\n" + fingerprint_entry(drop),
    )
    plain = policies.decide("plain", drop.encode())
    assert (plain.allowed, plain.rule) == (False, "statement kind")
    assert policies.decide("migrations", drop.encode()) == Decision(
        True, "fingerprint", statements=((fingerprint(drop), drop),)
    )


def test_fingerprint_allowlist_allows_what_structural_rules_refuse(tmp_path: Path) -> None:
    policies = engine(
        tmp_path,
        cashier=CASHIER_ALLOW
        + "fingerprints:\n"
        + fingerprint_entry("DELETE FROM sale_items WHERE sale_id = 42"),
    )
    void = policies.decide("cashier", b"DELETE FROM sale_items WHERE sale_id = 7")
    assert (void.allowed, void.rule) == (True, "fingerprint")
    assert void.statements == (
        (
            fingerprint("DELETE FROM sale_items WHERE sale_id = 42"),
            "DELETE FROM sale_items WHERE sale_id = $1",
        ),
    )
    assert policies.decide("cashier", b"delete from sale_items where sale_id = $1").rule == "fingerprint"
    # Anything structurally different is another fingerprint and meets the structural rules.
    for sql, rule in [
        (b"DELETE FROM sale_items", "statement kind"),
        (b"DELETE FROM sale_items WHERE sale_id = 7 OR true", "statement kind"),
        (b"DELETE FROM sales WHERE id = 7", "statement kind"),
        (
            b"DELETE FROM sale_items WHERE sale_id = 7; DELETE FROM sale_items WHERE sale_id = 8",
            "stacked queries",
        ),
    ]:
        decision = policies.decide("cashier", sql)
        assert (decision.allowed, decision.rule) == (False, rule), sql


def test_fingerprint_allowlist_does_not_override_the_deny_list_or_the_functions(tmp_path: Path) -> None:
    policies = engine(
        tmp_path,
        cashier=CASHIER_ALLOW
        + "fingerprints:\n"
        + fingerprint_entry("SELECT pg_sleep(1)")
        + fingerprint_entry("TRUNCATE sales"),
    )
    for sql, rule, message in [
        (b"SELECT pg_sleep(30)", "function", "function pg_sleep is not allowed for role cashier"),
        (b"TRUNCATE sales", "denylist", "statement kind TRUNCATE is not allowed for role cashier"),
    ]:
        decision = policies.decide("cashier", sql)
        assert (decision.allowed, decision.rule, decision.message) == (False, rule, message)


@pytest.mark.parametrize(
    "sql",
    [
        pytest.param("DELETE FROM sale_items WHERE sale_id = 7 /*éééééééé*/ OR true;", id="one-statement"),
        pytest.param(
            "SELECT 'éééééééé';        DELETE FROM sale_items WHERE sale_id = 7 OR true; SELECT 1",
            id="stacked",
        ),
    ],
)
def test_fingerprint_is_taken_of_the_whole_statement(tmp_path: Path, sql: str) -> None:
    policies = engine(
        tmp_path,
        cashier="stacked_queries: true\n"
        + CASHIER_ALLOW
        + "fingerprints:\n"
        + fingerprint_entry("DELETE FROM sale_items WHERE sale_id = 42"),
    )
    decision = policies.decide("cashier", sql.encode())
    assert (decision.allowed, decision.rule) == (False, "statement kind")


def test_housekeeping_false_turns_the_builtin_rule_off(tmp_path: Path) -> None:
    policies = engine(tmp_path, on=CASHIER_ALLOW, off="housekeeping: false\n" + CASHIER_ALLOW)
    for sql in (b"BEGIN", b"COMMIT", b"SHOW TimeZone", b"SET application_name = 'till-3'", b"DISCARD ALL"):
        on, off = policies.decide("on", sql), policies.decide("off", sql)
        assert (on.allowed, on.rule) == (True, "housekeeping"), sql
        assert (off.allowed, off.rule) == (False, "statement kind"), sql
        assert off.message.endswith("is not allowed for role off")
    # SELECT 1 is still a SELECT, which this policy allows on its own terms.
    assert policies.decide("off", b"SELECT 1").rule == "structural"


def test_housekeeping_kinds_can_be_allowed_explicitly(tmp_path: Path) -> None:
    policies = engine(
        tmp_path,
        cashier="housekeeping: false\nallow:\n  kinds: [SELECT, TRANSACTION, SHOW]\n  read: [products]\n",
    )
    for sql in (b"BEGIN", b"SHOW TimeZone", b"SELECT * FROM products", b"COMMIT"):
        assert policies.decide("cashier", sql).rule == "structural", sql
    assert policies.decide("cashier", b"PREPARE TRANSACTION 'x'").rule == "denylist"


def test_stacked_queries_true_checks_every_part(tmp_path: Path) -> None:
    policies = engine(tmp_path, cashier="stacked_queries: true\n" + CASHIER_ALLOW)
    both = policies.decide("cashier", b"SELECT name FROM products WHERE sku = '1'; SELECT 1")
    assert (both.allowed, both.rule) == (True, "housekeeping, structural")
    assert [normalized for _fp, normalized in both.statements] == [
        "SELECT name FROM products WHERE sku = $1",
        "SELECT $1",
    ]
    for sql, rule in [
        (b"SELECT 1; DROP TABLE sales", "denylist"),
        (b"SELECT 1; DELETE FROM sales WHERE id = 1", "statement kind"),
        (b"SELECT * FROM products; SELECT * FROM customers", "table read"),
        (b"BEGIN; UPDATE stock SET quantity = 0; COMMIT", "unbounded write"),
        (b"SELECT 1; SELEC 2", "parse error"),
    ]:
        decision = policies.decide("cashier", sql)
        assert (decision.allowed, decision.rule) == (False, rule), sql
    sale = (
        b"BEGIN; INSERT INTO sales (store_id) VALUES ('s');"
        b" UPDATE stock SET quantity = 1 WHERE sku = 'x'; COMMIT"
    )
    assert policies.decide("cashier", sale).allowed


def test_stacked_queries_false_refuses_before_looking_at_the_parts(tmp_path: Path) -> None:
    policies = engine(tmp_path, cashier=CASHIER_ALLOW)
    decision = policies.decide("cashier", b"SELECT 1; SELECT 2")
    assert decision.rule == "stacked queries"
    assert decision.message == "stacked queries are not allowed for role cashier"
    assert len(decision.statements) == 2


def test_update_without_where_can_be_allowed(tmp_path: Path) -> None:
    policies = engine(tmp_path, cashier=CASHIER_ALLOW + "  update_without_where: true\n")
    assert policies.decide("cashier", b"UPDATE stock SET quantity = 0").allowed


@pytest.mark.parametrize("mode", list(PolicyMode))
def test_mode_is_reported(tmp_path: Path, mode: PolicyMode) -> None:
    policies = engine(tmp_path, cashier=f"mode: {mode.value}\n" + CASHIER_ALLOW)
    assert policies.mode("cashier") is mode
    # decide() always answers as enforce would: the session applies the mode (log, learn, refuse).
    decision = policies.decide("cashier", b"DROP TABLE sales")
    assert (decision.allowed, decision.rule) == (False, "denylist")


def test_defaults_of_a_minimal_policy_file(tmp_path: Path) -> None:
    (policy,) = load(tmp_path, cashier="allow: {kinds: [SELECT]}\n").values()
    assert policy == RolePolicy(kinds=frozenset({"SELECT"}))
    assert policy.mode is PolicyMode.ENFORCE and policy.housekeeping and not policy.stacked_queries


def test_search_path_qualifies_policy_tables(tmp_path: Path) -> None:
    policies = engine(
        tmp_path, cashier="search_path: [pos]\nallow:\n  kinds: [SELECT]\n  read: [products, public.stock]\n"
    )
    policy = policies.policy("cashier")
    assert policy is not None and policy.read_tables == {"pos.products", "public.stock"}
    assert policies.decide("cashier", b"SELECT * FROM products").allowed
    assert policies.decide("cashier", b"SELECT * FROM pos.products").allowed
    assert not policies.decide("cashier", b"SELECT * FROM public.products").allowed
    assert policies.decide("cashier", b"SELECT * FROM public.stock").allowed


def test_parse_errors_use_the_syntax_error_sqlstate(tmp_path: Path) -> None:
    policies = engine(tmp_path, cashier=CASHIER_ALLOW)
    decision = policies.decide("cashier", b"\\d sales")
    assert (decision.allowed, decision.rule, decision.message, decision.sqlstate) == (
        False,
        "parse error",
        "the statement could not be parsed",
        SYNTAX_ERROR,
    )


# --- policy files in the configuration ---------------------------------------------------------------------


def test_bad_statement_kind_names_the_key_path_and_item(tmp_path: Path) -> None:
    found = problems(tmp_path, cashier="allow:\n  kinds: [SELECT, DROP]\n")
    kinds = ", ".join(sorted(STATEMENT_KINDS))
    expected = f"roles.cashier.policy.allow.kinds: item 1: expected one of: {kinds}; got 'DROP'"
    assert found == [expected]


def test_every_policy_problem_is_reported_with_its_path(tmp_path: Path) -> None:
    found = problems(
        tmp_path,
        cashier="""\
            mode: strict
            stacked_queries: "no"
            max_violations: 0
            allowed: {}
            allow:
              read: [products, "evil; DROP TABLE x"]
              denylist_exceptions: [DDL, rm_rf]
              functions: [pg_sleep, "evil; DROP"]
              update_without_where: 1
            fingerprints:
              - {fingerprint: NOT-A-FINGERPRINT, text: x}
              - {text: no fingerprint}
            """,
        manager="search_path: public\n",
    )
    assert found[0] == (
        "roles.cashier.policy.allowed: unknown key (expected one of: mode, search_path, "
        "stacked_queries, function_call_message, housekeeping, max_violations, allow, fingerprints)"
    )
    by_path = {line.split(": ", 1)[0]: line.split(": ", 1)[1] for line in found}
    assert by_path["roles.cashier.policy.mode"] == "expected one of: enforce, learn, monitor; got 'strict'"
    assert by_path["roles.cashier.policy.stacked_queries"] == "expected true or false, got 'no'"
    assert by_path["roles.cashier.policy.max_violations"] == "expected an integer of at least 1, got 0"
    assert by_path["roles.cashier.policy.allow.read"].startswith("item 1: expected a name matching ^")
    assert by_path["roles.cashier.policy.allow.denylist_exceptions"].startswith("item 1: expected one of: ")
    assert by_path["roles.cashier.policy.allow.denylist_exceptions"].endswith(
        "; got 'rm_rf' (a function the role may call goes in allow.functions)"
    )
    assert by_path["roles.cashier.policy.allow.functions"].startswith("item 1: expected a name matching ^")
    assert by_path["roles.cashier.policy.allow.update_without_where"] == "expected true or false, got 1"
    assert by_path["roles.cashier.policy.fingerprints[0].fingerprint"].startswith("expected a name matching")
    assert by_path["roles.cashier.policy.fingerprints[1].fingerprint"] == "required"
    assert by_path["roles.manager.policy.search_path"] == "expected a list, got 'public'"
    assert len(found) == len(by_path) == 11


def test_yaml_syntax_error_in_a_policy_file_names_role_file_and_line(tmp_path: Path) -> None:
    found = problems(tmp_path, cashier="mode: enforce\nallow:\n  kinds: [SELECT\n  read: [products]\n")
    (problem,) = found
    prefix = f"roles.cashier.policy: {tmp_path / 'cashier.yaml'}:"
    assert problem.startswith(prefix)
    line = int(problem.removeprefix(prefix).split(":", 1)[0])
    assert line in (3, 4)
    assert "invalid YAML" in problem


def test_duplicate_key_in_a_policy_file_is_an_error(tmp_path: Path) -> None:
    (problem,) = problems(tmp_path, cashier="mode: enforce\nmode: learn\n")
    assert problem.startswith(f"roles.cashier.policy: {tmp_path / 'cashier.yaml'}:2:")
    assert "duplicate key 'mode'" in problem


def test_missing_policy_file(tmp_path: Path) -> None:
    data = _config_data(tmp_path, {})
    data["roles"] = {"cashier": {"policy": "policies/cashier.yaml"}}
    with pytest.raises(ConfigError) as caught:
        parse_config(data, base_dir=tmp_path, environ={})
    assert [str(problem) for problem in caught.value.problems] == [
        f"roles.cashier.policy: file not found: {tmp_path / 'policies' / 'cashier.yaml'}"
    ]


def test_policy_file_must_be_a_mapping(tmp_path: Path) -> None:
    assert problems(tmp_path, cashier="- SELECT\n") == [
        "roles.cashier.policy: expected a mapping, got a list"
    ]


# --- SQL prepared statements: what a session must follow ---------------------------------------------------

PREPARING = RolePolicy(
    kinds=frozenset({"SELECT", "PREPARE", "EXECUTE", "DEALLOCATE", "EXPLAIN", "DISCARD"}),
    read_tables=frozenset({"public.products"}),
    stacked_queries=True,
)


@pytest.mark.parametrize(
    ("sql", "names"),
    [
        ("SELECT name FROM products", []),
        ("PREPARE q (text) AS SELECT name FROM products WHERE sku = $1", [("PREPARE", "q")]),
        ("EXECUTE q ('x')", [("EXECUTE", "q")]),
        ('EXECUTE "Q"', [("EXECUTE", "Q")]),
        ("EXPLAIN ANALYZE EXECUTE Q", [("EXECUTE", "q")]),
        ("DEALLOCATE q", [("DEALLOCATE", "q")]),
        ("DEALLOCATE ALL", [("DEALLOCATE", None)]),
        ("DISCARD ALL", [("DEALLOCATE", None)]),
        (
            "PREPARE a AS SELECT 1; EXECUTE a; DEALLOCATE a",
            [("PREPARE", "a"), ("EXECUTE", "a"), ("DEALLOCATE", "a")],
        ),
    ],
)
def test_decisions_name_the_sql_prepared_statements_they_use(
    sql: str, names: list[tuple[str, str | None]]
) -> None:
    decision = PolicyEngine({"cashier": PREPARING}).decide("cashier", sql.encode())
    assert decision.allowed, decision
    assert [(use.action, use.name) for use in decision.prepared_names] == names


def test_a_prepare_carries_its_whole_text_to_decide_again() -> None:
    sql = "PREPARE q (text) AS SELECT name FROM products WHERE sku = $1"
    (use,) = PolicyEngine({"cashier": PREPARING}).decide("cashier", sql.encode()).prepared_names
    assert use.text == sql
    # What the session decides for each EXECUTE of q: here refused, the table is not readable.
    forbidding = RolePolicy(kinds=PREPARING.kinds, read_tables=frozenset({"public.stock"}))
    assert not PolicyEngine({"cashier": forbidding}).decide("cashier", use.text.encode()).allowed
