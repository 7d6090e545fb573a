"""``pos-proxy policy check|review|approve`` run as a user would."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from proxy.policy.learn import ReviewEntry, read_review, write_review
from tests.e2e.conftest import REPO_ROOT, Cli

pytestmark = pytest.mark.e2e

SHIPPED_POLICIES = REPO_ROOT / "proxy" / "data" / "policies"
SEEN = "2024-05-01T10:00:00+00:00"

SELECT_FP = "9fbb2b2d15937341"  # SELECT name FROM products WHERE sku = $1
SELECT_TEXT = "SELECT name FROM products WHERE sku = $1"
INSERT_FP = "02ebad5861c8854f"  # INSERT INTO sales (store_id, terminal_id, total_cents) VALUES ($1, $2, $3)
INSERT_TEXT = "INSERT INTO sales (store_id, terminal_id, total_cents) VALUES ($1, $2, $3)"
UNKNOWN_FP = "0123456789abcdef"


def write_config(directory: Path, roles: str | None = None) -> Path:
    """A proxy config in directory/conf whose roles use the shipped demo policies (copied).

    ``policy check`` never opens the TLS files, so placeholders do for them.
    """
    conf = directory / "conf"
    policies = directory / "policies"
    conf.mkdir(parents=True, exist_ok=True)
    policies.mkdir(parents=True, exist_ok=True)
    for name in ("cashier.yaml", "manager.yaml"):
        shutil.copy(SHIPPED_POLICIES / name, policies / name)
    for name in ("server.pem", "server.key", "ca.pem"):
        (conf / name).write_text("placeholder\n", encoding="utf-8")
    roles = roles or (
        "  cashier:\n    policy: ../policies/cashier.yaml\n  manager:\n    policy: ../policies/manager.yaml\n"
    )
    path = conf / "pos-proxy.yaml"
    path.write_text(
        "listen:\n  host: 127.0.0.1\n  port: 6432\n"
        "tls:\n  cert: server.pem\n  key: server.key\n  client_ca: ca.pem\n"
        f"roles:\n{roles}"
        "routes:\n  pos:\n    host: db.example.internal\n    user: pos_proxy\n"
        "    sslmode: verify-full\n    sslrootcert: ca.pem\n",
        encoding="utf-8",
    )
    return path


def entry(
    role: str, fingerprint: str, text: str, count: int = 1, policy_file: Path | None = None
) -> ReviewEntry:
    return ReviewEntry(role, fingerprint, text, count, SEEN, SEEN, str(policy_file) if policy_file else None)


# --- policy check -----------------------------------------------------------------------------------------


def test_check_allowed_statement(cli: Cli, tmp_path: Path) -> None:
    config = write_config(tmp_path)
    result = cli.ok(
        "policy",
        "check",
        "--config",
        config,
        "--role",
        "cashier",
        "SELECT name FROM products WHERE sku = '1'",
    )
    assert result.stdout.splitlines() == [
        f"statement {SELECT_FP}: {SELECT_TEXT}",
        "allowed by rule: structural",
    ]
    assert result.stderr == ""


@pytest.mark.parametrize(
    ("role", "sql", "verdict"),
    [
        (
            "cashier",
            "DROP TABLE sales",
            "refused (42501, rule: denylist): statement kind DROP is not allowed for role cashier",
        ),
        (
            "cashier",
            "DELETE FROM sales WHERE id = 1",
            "refused (42501, rule: statement kind): statement kind DELETE is not allowed for role cashier",
        ),
        ("cashier", "SELEC 1", "refused (42601, rule: parse error): the statement could not be parsed"),
    ],
)
def test_check_refused_statement(cli: Cli, tmp_path: Path, role: str, sql: str, verdict: str) -> None:
    config = write_config(tmp_path)
    result = cli("policy", "check", "--config", config, "--role", role, sql)
    assert result.returncode == 1, result.describe()
    assert "Traceback" not in result.output, result.describe()
    assert result.stdout.splitlines()[-1] == verdict, result.describe()


def test_check_explains_a_refused_function(cli: Cli, tmp_path: Path) -> None:
    config = write_config(tmp_path)
    result = cli(
        "policy", "check", "--config", config, "--role", "cashier", "SELECT setval('sales_id_seq', 1)"
    )
    assert result.returncode == 1, result.describe()
    verdict, hint = result.stdout.splitlines()[-2:]
    assert verdict == "refused (42501, rule: function): function setval is not allowed for role cashier"
    assert hint.startswith("hint: functions outside the built-in safe set")
    assert "allow.functions" in hint


def test_check_manager_may_delete_what_a_cashier_may_not(cli: Cli, tmp_path: Path) -> None:
    config = write_config(tmp_path)
    sql = "DELETE FROM sales WHERE id = 1"  # refused for the cashier above
    allowed = cli.ok("policy", "check", "--config", config, "--role", "manager", sql)
    assert allowed.stdout.splitlines()[-1] == "allowed by rule: structural"


def test_check_unknown_role(cli: Cli, tmp_path: Path) -> None:
    config = write_config(tmp_path)
    result = cli.fails("policy", "check", "--config", config, "--role", "auditor", "SELECT 1")
    assert "no role 'auditor'" in result.stderr
    assert str(config) in result.stderr
    assert result.stdout == ""


def test_check_role_without_policy(cli: Cli, tmp_path: Path) -> None:
    config = write_config(tmp_path, roles="  cashier:\n    description: tills\n")
    result = cli.ok("policy", "check", "--config", config, "--role", "cashier", "DROP TABLE sales")
    assert "role cashier has no policy" in result.stdout


def test_check_with_a_broken_policy_file_names_it(cli: Cli, tmp_path: Path) -> None:
    config = write_config(tmp_path)
    (tmp_path / "policies" / "cashier.yaml").write_text("mode: block\n", encoding="utf-8")
    result = cli.fails("policy", "check", "--config", config, "--role", "cashier", "SELECT 1")
    assert "roles.cashier.policy" in result.stderr


# --- policy review ----------------------------------------------------------------------------------------


def test_review_of_a_missing_file(cli: Cli, tmp_path: Path) -> None:
    result = cli.ok("policy", "review", tmp_path / "nothing-here.json")
    assert "nothing learned yet" in result.stdout


def test_review_of_a_file_without_statements(cli: Cli, tmp_path: Path) -> None:
    review = tmp_path / "review.json"
    write_review(review, [])
    assert json.loads(review.read_text(encoding="utf-8")) == {"version": 1, "statements": []}
    result = cli.ok("policy", "review", review)
    assert "nothing learned yet" in result.stdout


def test_review_of_an_empty_file(cli: Cli, tmp_path: Path) -> None:
    review = tmp_path / "review.json"
    review.touch()
    result = cli("policy", "review", review)
    assert "Traceback" not in result.output, result.describe()
    assert result.returncode in (0, 1), result.describe()


def test_review_groups_by_role_most_frequent_first(cli: Cli, tmp_path: Path) -> None:
    review = tmp_path / "review.json"
    policy = tmp_path / "cashier.yaml"
    write_review(
        review,
        [
            entry("cashier", SELECT_FP, SELECT_TEXT, 3, policy),
            entry("cashier", INSERT_FP, INSERT_TEXT, 9, policy),
            entry("manager", SELECT_FP, SELECT_TEXT, 1),
        ],
    )
    lines = cli.ok("policy", "review", review).stdout.splitlines()
    assert lines[0] == f"role cashier (policy {policy}): 2 statement(s) to review"
    assert lines[1].split()[:3] == [INSERT_FP, "seen", "9x"]
    assert lines[1].endswith(INSERT_TEXT)
    assert lines[2].split()[:3] == [SELECT_FP, "seen", "3x"]
    assert lines[3] == "role manager (policy -): 1 statement(s) to review"
    assert len(lines) == 5


# --- policy approve ---------------------------------------------------------------------------------------


def _learned(tmp_path: Path) -> tuple[Path, Path]:
    """A review file with two cashier statements and one manager statement, and the cashier's policy."""
    policy = tmp_path / "cashier.yaml"
    policy.write_text("# comment\nmode: learn\nallow: {}\nfingerprints: []\n", encoding="utf-8")
    review = tmp_path / "review.json"
    write_review(
        review,
        [
            entry("cashier", SELECT_FP, SELECT_TEXT, 4, policy),
            entry("cashier", INSERT_FP, INSERT_TEXT, 2, policy),
            entry("manager", SELECT_FP, SELECT_TEXT, 1),
        ],
    )
    return review, policy


def test_approve_one_fingerprint_merges_only_it(cli: Cli, tmp_path: Path) -> None:
    review, policy = _learned(tmp_path)
    result = cli.ok("policy", "approve", review, "--role", "cashier", "--fingerprint", SELECT_FP)
    assert f"approved 1 statement(s) for role cashier into {policy}" in result.stdout
    assert "SIGHUP" in result.stderr

    document = yaml.safe_load(policy.read_text(encoding="utf-8"))
    assert document["fingerprints"] == [{"fingerprint": SELECT_FP, "text": SELECT_TEXT}]
    assert document["mode"] == "learn"
    remaining = {(e.role, e.fingerprint) for e in read_review(review)}
    assert remaining == {("cashier", INSERT_FP), ("manager", SELECT_FP)}

    # The approved statement is allowed by its fingerprint, whatever its literals.
    config = write_config(tmp_path / "proxy", roles=f"  cashier:\n    policy: {policy}\n")
    allowed = cli.ok(
        "policy",
        "check",
        "--config",
        config,
        "--role",
        "cashier",
        "SELECT name FROM products WHERE sku = 'x'",
    )
    assert allowed.stdout.splitlines()[-1] == "allowed by rule: fingerprint"

    # Approving the rest adds to the list without repeating.
    cli.ok("policy", "approve", review, "--role", "cashier", "--all")
    document = yaml.safe_load(policy.read_text(encoding="utf-8"))
    assert [item["fingerprint"] for item in document["fingerprints"]] == [SELECT_FP, INSERT_FP]
    assert [(e.role, e.fingerprint) for e in read_review(review)] == [("manager", SELECT_FP)]


def test_approve_unknown_fingerprint_changes_nothing(cli: Cli, tmp_path: Path) -> None:
    review, policy = _learned(tmp_path)
    review_before, policy_before = review.read_bytes(), policy.read_bytes()

    alone = cli.fails("policy", "approve", review, "--role", "cashier", "--fingerprint", UNKNOWN_FP)
    assert "no learned statement of role cashier matches" in alone.stderr
    mixed = cli.fails(
        "policy", "approve", review, "--role", "cashier", "--fingerprint", SELECT_FP, UNKNOWN_FP
    )
    assert f"role cashier learned no statement {UNKNOWN_FP}" in mixed.stderr
    assert review.read_bytes() == review_before
    assert policy.read_bytes() == policy_before


def test_approve_needs_a_policy_file(cli: Cli, tmp_path: Path) -> None:
    review, _ = _learned(tmp_path)
    result = cli.fails("policy", "approve", review, "--role", "manager", "--all")
    assert "pass --policy" in result.stderr
    assert len(read_review(review)) == 3

    manager_policy = tmp_path / "manager.yaml"
    shutil.copy(SHIPPED_POLICIES / "manager.yaml", manager_policy)
    cli.ok("policy", "approve", review, "--role", "manager", "--all", "--policy", manager_policy)
    document = yaml.safe_load(manager_policy.read_text(encoding="utf-8"))
    assert document["fingerprints"] == [{"fingerprint": SELECT_FP, "text": SELECT_TEXT}]
    assert document["allow"]["kinds"][0] == "SELECT"  # the rest of the policy is kept
    assert {e.role for e in read_review(review)} == {"cashier"}


def test_approve_from_a_missing_review_file(cli: Cli, tmp_path: Path) -> None:
    result = cli.fails("policy", "approve", tmp_path / "missing.json", "--role", "cashier", "--all")
    assert "no learned statement of role cashier" in result.stderr


def test_approve_into_a_broken_policy_file(cli: Cli, tmp_path: Path) -> None:
    review, policy = _learned(tmp_path)
    policy.write_text("mode: [learn\n", encoding="utf-8")
    result = cli.fails("policy", "approve", review, "--role", "cashier", "--all")
    assert str(policy) in result.stderr
    assert len(read_review(review)) == 3
