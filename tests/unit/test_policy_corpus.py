"""The shipped role policies against a corpus of POS statements and injection attempts.

The corpus (policy_corpus.yaml) is data: role, SQL, expected decision and rule. The policies are
the real files in proxy/data/policies/, loaded through proxy.config as a deployment loads them.
Cases marked with a `bug` are known wrong today and run as strict xfails with the CORRECT
expectation, so a fix makes them fail until the marker goes.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from pglast import parse_sql
from pglast.stream import RawStream

from proxy.config.load import parse_config
from proxy.policy.engine import INSUFFICIENT_PRIVILEGE, SYNTAX_ERROR, Decision, judge
from proxy.policy.model import RolePolicy
from proxy.policy.postgres import analyze

HERE = Path(__file__).resolve().parent
CORPUS_FILE = HERE / "policy_corpus.yaml"
POLICY_DIR = Path(__file__).resolve().parents[2] / "proxy" / "data" / "policies"
ROLES = ("cashier", "manager")
REFUSING_RULES = frozenset(
    {
        "denylist",
        "function",
        "sequence",
        "statement kind",
        "table read",
        "table write",
        "row lock",
        "unbounded write",
        "stacked queries",
        "parse error",
    }
)
ALLOWING_RULES = frozenset({"housekeeping", "structural", "empty"})
CASE_KEYS = frozenset({"id", "role", "sql", "expect", "rule", "message", "note"})


@dataclass(frozen=True, slots=True)
class Case:
    id: str
    role: str
    sql: str
    expect: str
    rule: str
    message: str | None


def _load_corpus() -> list[Case]:
    data = yaml.safe_load(CORPUS_FILE.read_text(encoding="utf-8"))
    cases = []
    for raw in data["cases"]:
        unknown = set(raw) - CASE_KEYS
        assert not unknown, f"{raw.get('id')}: unknown keys {sorted(unknown)}"
        cases.append(
            Case(
                id=raw["id"],
                role=raw["role"],
                sql=raw["sql"],
                expect=raw["expect"],
                rule=raw["rule"],
                message=raw.get("message"),
            )
        )
    return cases


CASES = _load_corpus()
CORPUS_PARAMS = [pytest.param(case, id=case.id) for case in CASES]
CORRECT_CASES = CASES


def write_tls_files(directory: Path) -> dict[str, str]:
    """Placeholder TLS files: the config parser only checks that they exist."""
    for name in ("proxy.crt", "proxy.key", "terminal-ca.crt"):
        (directory / name).write_text("-----BEGIN PLACEHOLDER-----\n")
    return {"cert": "proxy.crt", "key": "proxy.key", "client_ca": "terminal-ca.crt"}


def load_policies(directory: Path, policy_files: Mapping[str, Path | None]) -> dict[str, RolePolicy | None]:
    """Role policies as a deployment gets them: through proxy.config.load.parse_config."""
    data = {
        "tls": write_tls_files(directory),
        "roles": {
            role: None if path is None else {"policy": str(path)} for role, path in policy_files.items()
        },
        "routes": {"pos": {"host": "db.example.internal", "user": "pos_proxy", "sslmode": "disable"}},
    }
    config = parse_config(data, base_dir=directory, environ={})
    return {role: config.roles[role].policy for role in policy_files}


@pytest.fixture(scope="module")
def policies(tmp_path_factory: pytest.TempPathFactory) -> dict[str, RolePolicy]:
    loaded = load_policies(
        tmp_path_factory.mktemp("policy-corpus"), {role: POLICY_DIR / f"{role}.yaml" for role in ROLES}
    )
    result = {}
    for role, policy in loaded.items():
        assert policy is not None
        result[role] = policy
    return result


def decide(policies: Mapping[str, RolePolicy], case: Case) -> Decision:
    return judge(policies[case.role], case.role, case.sql)


# --- the corpus itself ------------------------------------------------------------------------------------


def test_corpus_is_well_formed() -> None:
    assert len(CASES) >= 170
    ids = [case.id for case in CASES]
    assert len(ids) == len(set(ids)), "duplicate ids"
    for case in CASES:
        assert re.fullmatch(r"[a-z0-9]+(-[a-z0-9]+)*", case.id), case.id
        assert case.role in ROLES, case.id
        assert case.expect in ("allow", "refuse"), case.id
        assert case.rule in (REFUSING_RULES if case.expect == "refuse" else ALLOWING_RULES), case.id
        assert case.message is None or case.expect == "refuse", case.id


def test_corpus_covers_every_refusing_rule_and_both_roles() -> None:
    covered = {case.rule for case in CORRECT_CASES if case.expect == "refuse"}
    assert covered == REFUSING_RULES
    for role in ROLES:
        assert {case.expect for case in CORRECT_CASES if case.role == role} == {"allow", "refuse"}


def test_corpus_policies_are_the_shipped_files(policies: Mapping[str, RolePolicy]) -> None:
    cashier, manager = policies["cashier"], policies["manager"]
    assert cashier.kinds == {"SELECT", "INSERT", "UPDATE"}
    assert cashier.read_tables == {"public.products", "public.stock"}
    assert cashier.write_tables == {"public.sales", "public.sale_items", "public.stock"}
    assert "DELETE" in manager.kinds and "COPY TO STDOUT" in manager.kinds
    assert "public.products" in manager.write_tables
    assert cashier.sequences == manager.sequences == {"public.sales_id_seq"}
    assert not cashier.functions and not manager.functions
    for policy in (cashier, manager):
        assert not policy.stacked_queries and not policy.update_without_where
        assert policy.housekeeping and not policy.denylist_exceptions and not policy.fingerprints


@pytest.mark.parametrize("case", CORPUS_PARAMS)
def test_corpus(policies: Mapping[str, RolePolicy], case: Case) -> None:
    decision = decide(policies, case)
    assert (decision.allowed, decision.rule) == (case.expect == "allow", case.rule), decision.message
    if decision.allowed:
        assert decision.message == ""
        return
    if case.message is not None:
        assert case.message in decision.message
    expected_state = SYNTAX_ERROR if case.rule == "parse error" else INSUFFICIENT_PRIVILEGE
    assert decision.sqlstate == expected_state


# --- refusal messages: the role and the rule, nothing from the proxy's insides ----------------------------

_NAMED = re.compile(r"\b(?:table|function|sequence) (\S+) is not allowed")


def _as_postgres_reads_it(sql: str) -> str:
    """The statement text with identifiers decoded (U&"..." spelled out), lower case."""
    return " ".join(RawStream()(statement) for statement in parse_sql(sql)).lower()


@pytest.mark.parametrize(
    "case", [pytest.param(case, id=case.id) for case in CORRECT_CASES if case.expect == "refuse"]
)
def test_refusal_message_names_role_and_only_names_from_the_statement(
    policies: Mapping[str, RolePolicy], case: Case
) -> None:
    decision = decide(policies, case)
    assert not decision.allowed
    message = decision.message
    assert message
    for internal in ("Stmt", "pglast", "Traceback", "RangeVar", "FuncCall", "\n"):
        assert internal not in message
    assert len(message) < 120
    if case.rule == "parse error":
        # A syntax error does not depend on the role: the client gets what the server would say.
        assert message == "the statement could not be parsed"
        return
    assert message.endswith(f"is not allowed for role {case.role}") or message.endswith(
        f"are not allowed for role {case.role}"
    )
    policy = policies[case.role]
    seen = _as_postgres_reads_it(case.sql)
    facts = analyze(case.sql, policy.search_path)
    parsed_names = set().union(
        *(f.reads | f.writes | f.locks | f.denied | f.sequences | set(map(str, f.functions)) for f in facts)
    )
    for name in _NAMED.findall(message):
        assert name in parsed_names, f"{name} is not something the statement uses"
        schema, _, relation = name.rpartition(".")
        assert relation.lower() in seen, f"{relation} does not appear in the statement"
        assert not schema or schema == policy.search_path[0] or schema.lower() in seen


# --- fingerprints and normalized text ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "variants",
    [
        pytest.param(
            [
                "SELECT name, price_cents FROM products WHERE sku = '4006381333931'",
                "SELECT name, price_cents FROM products WHERE sku = '5000159484695'",
                "select name,  price_cents\n  from products where sku=$1",
                "SELECT name, price_cents FROM products WHERE sku = E'x''y' -- a comment",
            ],
            id="lookup",
        ),
        pytest.param(
            [
                "INSERT INTO sales (store_id, terminal_id, total_cents) VALUES ('store-001', 'till-3', 1028)",
                "INSERT INTO sales (store_id, terminal_id, total_cents) VALUES ('store-002', 'kiosk', 5)",
                "INSERT INTO sales (store_id, terminal_id, total_cents) VALUES ($1, $2, $3)",
            ],
            id="sale-insert",
        ),
        pytest.param(
            [
                "UPDATE stock SET quantity = quantity - 2 WHERE sku = '4006381333931'",
                "UPDATE stock SET quantity = quantity - 17 WHERE sku = $$8710398500120$$",
            ],
            id="stock-update",
        ),
        pytest.param(
            ["DELETE FROM sales WHERE id = 42", "DELETE FROM sales WHERE id = 7"],
            id="refused-delete",
        ),
    ],
)
def test_fingerprint_ignores_literals(policies: Mapping[str, RolePolicy], variants: list[str]) -> None:
    fingerprints = set()
    for sql in variants:
        (statement,) = judge(policies["cashier"], "cashier", sql).statements
        fingerprints.add(statement[0])
    assert len(fingerprints) == 1
    assert re.fullmatch(r"[0-9a-f]{16}", fingerprints.pop())


def test_fingerprint_differs_for_different_statements(policies: Mapping[str, RolePolicy]) -> None:
    texts = [
        "SELECT name FROM products WHERE sku = $1",
        "SELECT name FROM products WHERE sku = $1 OR true",
        "SELECT name FROM stock WHERE sku = $1",
        "DELETE FROM sales WHERE id = $1",
        "DELETE FROM sales",
    ]
    fingerprints = {judge(policies["manager"], "manager", sql).statements[0][0] for sql in texts}
    assert len(fingerprints) == len(texts)


CARD = "4111111111111111"


@pytest.mark.parametrize(
    "sql",
    [
        f"SELECT * FROM customers WHERE card = '{CARD}'",  # refused: table read
        f"INSERT INTO sales (store_id, terminal_id, total_cents) VALUES ('s', '{CARD}', {CARD})",
        f"UPDATE sales SET terminal_id = E'{CARD}' WHERE id = {CARD}",
        f"DELETE FROM sales WHERE terminal_id = $${CARD}$$",  # refused: statement kind
        f"SELECT '{CARD}'; SELECT {CARD}",  # refused: stacked queries
        f"SELECT pg_sleep({CARD})",  # refused: deny list
        f"SELECT '{CARD[:8]}' || '{CARD[8:]}'",
        pytest.param(
            f"SELECT name FROM customers WHERE name = 'Café' AND card = '{CARD}';",
            id="non-ascii-then-semicolon",
        ),
    ],
)
def test_normalized_text_keeps_no_literals(policies: Mapping[str, RolePolicy], sql: str) -> None:
    decision = judge(policies["cashier"], "cashier", sql)
    assert decision.statements
    for _fingerprint, normalized in decision.statements:
        assert CARD not in normalized
        assert re.search(r"\d{4}", normalized) is None, normalized
        assert "$1" in normalized
    assert CARD not in decision.message and CARD[:8] not in decision.message


def test_statements_are_reported_for_each_part_of_a_stacked_query(policies: Mapping[str, RolePolicy]) -> None:
    decision = judge(policies["cashier"], "cashier", "SELECT 'é'; DELETE FROM sales WHERE id = 1")
    assert decision.rule == "stacked queries"
    assert [normalized for _fp, normalized in decision.statements] == [
        "SELECT $1",
        "DELETE FROM sales WHERE id = $1",
    ]


def test_parse_error_reports_only_the_size_and_a_digest(policies: Mapping[str, RolePolicy]) -> None:
    decision = judge(policies["cashier"], "cashier", f"SELEC '{CARD}'")
    assert (decision.allowed, decision.rule, decision.message, decision.sqlstate) == (
        False,
        "parse error",
        "the statement could not be parsed",
        SYNTAX_ERROR,
    )
    [(fingerprint, text)] = decision.statements
    assert fingerprint == ""
    assert re.fullmatch(r"\(not parsable: \d+ bytes, digest [0-9a-f]{16}\)", text), text


def test_empty_query_is_allowed_with_no_statements(policies: Mapping[str, RolePolicy]) -> None:
    for sql in ("", ";", " ;; ", "-- comment only"):
        assert judge(policies["cashier"], "cashier", sql) == Decision(True, "empty")
