"""UPDATE or DELETE of every row is refused however the "every row" is spelled.

The attacker holds a manager certificate (DELETE and UPDATE allowed, `update_without_where:
false`) and tries to wipe or rewrite a whole table with a WHERE clause that is true for every
row. The database is checked from a superuser connection: nothing refused ran.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import psycopg
import pytest
import yaml

from tests.integration.proxyproc import ProxyProcess, TerminalPKI

TABLE = "public.till_sales"
ROWS = 5
POLICY = {
    "mode": "enforce",
    "search_path": ["public"],
    "allow": {
        "kinds": ["SELECT", "UPDATE", "DELETE"],
        "write": ["till_sales"],
        "update_without_where": False,
    },
}
EVERY_ROW = [
    "WHERE true",
    "WHERE 1=1",
    "WHERE 'a'='a'",
    "WHERE NOT false",
    "WHERE 1=1 OR id = 5",
    "WHERE id = id",
    "WHERE t.id = t.id",
    "WHERE true AND true",
    "WHERE 2 > 1",
    "WHERE '1'::int = 1",
    "WHERE 'yes'",
    "WHERE NOT (id = 5 AND false)",
    "WHERE id IS NOT DISTINCT FROM id",
    "WHERE now() > '2000-01-01'",
    "WHERE (SELECT true)",
    "WHERE EXISTS (SELECT 1)",
    "",
]


def _superuser(cluster: Any) -> psycopg.Connection:
    return psycopg.connect(**cluster.connect_kwargs(user="postgres", dbname="pos"), autocommit=True)


@pytest.fixture
def till_sales(pg_cluster: Any) -> Iterator[None]:
    with _superuser(pg_cluster) as admin:
        admin.execute(f"DROP TABLE IF EXISTS {TABLE}")
        admin.execute(f"CREATE TABLE {TABLE} (id int PRIMARY KEY, total_cents int NOT NULL)")
        admin.execute(f"ALTER TABLE {TABLE} OWNER TO pos_proxy")
        admin.execute(f"INSERT INTO {TABLE} SELECT g, 100 FROM generate_series(1, {ROWS}) AS g")
    yield
    with _superuser(pg_cluster) as admin:
        admin.execute(f"DROP TABLE {TABLE}")


@pytest.fixture
def manager_proxy(start_proxy: Callable[..., ProxyProcess], tmp_path: Path, till_sales: None) -> ProxyProcess:
    policy = tmp_path / "manager.yaml"
    policy.write_text(yaml.safe_dump(POLICY), encoding="utf-8")
    return start_proxy(roles={"manager": {"policy": str(policy)}})


def _table(cluster: Any) -> list[tuple[int, int]]:
    with _superuser(cluster) as admin:
        return [(row[0], row[1]) for row in admin.execute(f"SELECT id, total_cents FROM {TABLE} ORDER BY id")]


def _connect(proxy: ProxyProcess, pki: TerminalPKI) -> psycopg.Connection:
    return psycopg.connect(**proxy.conninfo(pki.manager, pki.ca), autocommit=True)


def test_writes_to_every_row_are_refused_and_nothing_changes(
    manager_proxy: ProxyProcess, terminal_pki: TerminalPKI, pg_cluster: Any
) -> None:
    before = _table(pg_cluster)
    assert len(before) == ROWS
    with _connect(manager_proxy, terminal_pki) as connection:
        for where in EVERY_ROW:
            for statement in (
                f"DELETE FROM {TABLE} t {where}",
                f"UPDATE {TABLE} t SET total_cents = 0 {where}",
            ):
                for prepare in (False, True):  # simple and extended protocol
                    with pytest.raises(psycopg.errors.InsufficientPrivilege) as raised:
                        connection.execute(statement, prepare=prepare)
                    assert raised.value.diag.message_primary == (
                        "UPDATE or DELETE without a WHERE that restricts rows is not allowed for role manager"
                    ), statement
        # The session stays usable, and a write that restricts rows runs.
        assert connection.execute(f"DELETE FROM {TABLE} t WHERE 1=1 AND t.id = 5").rowcount == 1
        assert connection.execute(f"UPDATE {TABLE} SET total_cents = 7 WHERE NOT (id <> 4)").rowcount == 1
    assert _table(pg_cluster) == [*before[:3], (4, 7)]


async def test_a_boolean_parameter_does_not_bound_a_write(
    manager_proxy: ProxyProcess, terminal_pki: TerminalPKI, pg_cluster: Any
) -> None:
    connection = await asyncpg.connect(
        host="127.0.0.1",
        port=manager_proxy.port,
        user=terminal_pki.manager.terminal,
        database="pos",
        ssl=manager_proxy.ssl_context(terminal_pki.manager, terminal_pki.ca),
        timeout=10,
    )
    try:
        with pytest.raises(
            asyncpg.InsufficientPrivilegeError, match="without a WHERE that restricts rows is not allowed"
        ):
            await connection.execute(f"DELETE FROM {TABLE} WHERE $1", True)
        assert await connection.execute(f"DELETE FROM {TABLE} WHERE id = $1", 2) == "DELETE 1"
    finally:
        await connection.close()
    assert [row[0] for row in _table(pg_cluster)] == [1, 3, 4, 5]
