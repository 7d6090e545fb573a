"""JDBC unchanged through the proxy: pgjdbc (Debian's libpostgresql-jdbc-java) runs a till's session
(tests/integration/jdbc/PosTill.java: a sale with prepared statements past prepareThreshold, batches,
rollbacks, SET TIME ZONE, typed values, schema changes between executions, a refused DELETE)
against PostgreSQL directly and through the proxy in each pool mode, and prints the same.

Directly, the refused DELETE comes from the database (a login with SELECT on the price list only);
through the proxy from the manager role's policy (the proxy's own login owns the tables). Compiled
at test time; without Java or the jar the tests skip (under CI, fail).
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import PgCluster
from tests.integration.pgjdbc import PosTill, compile_pos_till, direct_properties, proxy_properties
from tests.integration.proxyproc import ProxyProcess, TerminalPKI

CLERK = "jdbc_clerk"  # directly: the login that may only read jdbc_products
# The manager terminal's role through the proxy: reads the price list, nothing else.
CLERK_POLICY: dict[str, Any] = {
    "mode": "enforce",
    "search_path": ["public"],
    "allow": {"kinds": ["SELECT"], "read": ["jdbc_products"]},
    "fingerprints": [],
}
# pgjdbc's prepareThreshold: its default (server-side statements from the fifth execution on), and
# -1 (server-side from the first, results in binary).
VARIANTS: dict[str, dict[str, str]] = {"default": {}, "binary": {"prepareThreshold": "-1"}}


@pytest.fixture(scope="module")
def pos_till(tmp_path_factory: pytest.TempPathFactory) -> PosTill:
    return compile_pos_till(tmp_path_factory.mktemp("jdbc-classes"))


@pytest.fixture(scope="module")
def clerk_password(pg_cluster: PgCluster) -> Iterator[str]:
    password = secrets.token_urlsafe(12)
    pg_cluster.server.create_role(CLERK, password)
    yield password
    pg_cluster.server.execute_script(
        f"DROP TABLE IF EXISTS jdbc_items, jdbc_sales, jdbc_products;\nDROP ROLE {CLERK};\n", dbname="pos"
    )


STALE_PLAN = "cached plan must not change result type"


def run_counting_stale_plans(
    pos_till: PosTill, cluster: PgCluster, *properties: Path
) -> tuple[list[dict[str, Any]], int]:
    """The program's lines, and how often the database answered it (or the proxy on its behalf)
    with 0A000 STALE_PLAN meanwhile: pgjdbc prepares again after each, so each schema change
    between executions of its server-side SELECT * shows there once."""
    log = cluster.server.log_path
    offset = log.stat().st_size
    lines = pos_till.run(*properties)
    with log.open("rb") as text:
        text.seek(offset)
        return lines, text.read().decode(errors="replace").count(STALE_PLAN)


@pytest.fixture(scope="module")
def direct_outputs(
    pos_till: PosTill, pg_cluster: PgCluster, clerk_password: str, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, list[dict[str, Any]]]:
    """What the program prints against the database itself, in each variant."""
    outputs = {}
    for variant, settings in VARIANTS.items():
        directory = tmp_path_factory.mktemp(f"jdbc-direct-{variant}")
        till = direct_properties(pg_cluster, pg_cluster.user, pg_cluster.password, directory, **settings)
        clerk = direct_properties(pg_cluster, CLERK, clerk_password, directory, **settings)
        outputs[variant], stale_plans = run_counting_stale_plans(pos_till, pg_cluster, till, clerk)
        check_till_session(outputs[variant])
        assert stale_plans == 2, f"{stale_plans} times {STALE_PLAN!r} directly ({variant})"
    return outputs


def check_till_session(lines: list[dict[str, Any]]) -> None:
    """What a till's session must show wherever it ran (so that equal outputs mean working ones)."""
    steps: dict[str, list[dict[str, Any]]] = {}
    for line in lines:
        steps.setdefault(line["step"], []).append(line)
    assert [sale["server_prepared"] for sale in steps["sale"]] == [True, True], steps["sale"]
    assert [row["lines"] for row in steps["sale_row"]] == [7, 7], steps["sale_row"]
    assert [batch["rows"] for batch in steps["batch"]] == [25, 25], steps["batch"]
    assert steps["savepoint_rollback"] == [
        {"step": "savepoint_rollback", "duplicate": "23505", "lines_inside": 1, "left_after_rollback": 0}
    ]
    assert steps["failed_transaction"][0]["next"] == "25P02", steps["failed_transaction"]
    (zone,) = steps["time_zone"]
    assert (zone["reported"], zone["show"]) == ("America/New_York", "America/New_York"), zone
    assert zone["literal"] == "2024-01-15 07:00:00-05", zone
    assert steps["typed_values"][-1]["server_prepared"] is True, steps["typed_values"][-1]
    before, added, retyped, after = steps["schema"]
    assert before["server_prepared"] and after["server_prepared"], (before, after)
    assert "note:text" not in before["columns"] and "note:text" in added["columns"], added
    assert "qty:int4" in added["columns"] and "qty:int8" in retyped["columns"], retyped
    assert added["columns"][-1] == retyped["columns"][-1] == "first=none", retyped
    (refused,) = steps["refused"]
    assert refused["states"] == ["42501"] * 6, refused
    assert (refused["refused_in_transaction"], refused["next"]) == ("42501", "25P02"), refused
    assert refused["products"] == refused["in_transaction"] == refused["after_rollback"] == 3, refused
    assert refused["sales_before"] == refused["sales_after"] == 2, refused


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("mode", ["session", "transaction"])
def test_a_till_session_prints_through_the_proxy_what_it_prints_directly(
    mode: str,
    variant: str,
    *,
    pos_till: PosTill,
    direct_outputs: dict[str, list[dict[str, Any]]],
    start_proxy: Callable[..., ProxyProcess],
    terminal_pki: TerminalPKI,
    pg_cluster: PgCluster,
    tmp_path: Path,
) -> None:
    policy = tmp_path / "clerk-policy.yaml"
    policy.write_text(yaml.safe_dump(CLERK_POLICY), encoding="utf-8")
    proxy = start_proxy(routes={"pos": {"pool": {"mode": mode}}}, roles={"manager": {"policy": str(policy)}})
    settings = VARIANTS[variant]
    till = proxy_properties(proxy, terminal_pki.cashier, terminal_pki.ca, tmp_path, **settings)
    clerk = proxy_properties(proxy, terminal_pki.manager, terminal_pki.ca, tmp_path, **settings)

    through_proxy, stale_plans = run_counting_stale_plans(pos_till, pg_cluster, till, clerk)

    assert through_proxy == direct_outputs[variant]
    # pgjdbc's retry reached the server, as directly (the proxy may meet the stale plan once more
    # on a copy of the statement another pooled connection holds).
    assert stale_plans >= 2, f"{stale_plans} times {STALE_PLAN!r}"
    # The refusals were the proxy's: its login owns the tables, the database would have deleted.
    violation = proxy.wait_for_event("policy_violation", role="manager", rule="statement kind")
    assert violation["statements"] == ["DELETE FROM jdbc_sales WHERE id = $1"], violation
