"""The admin API and metrics of a running proxy, driven over real HTTP."""

from __future__ import annotations

import json
import secrets
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psycopg
import pytest

from proxy.localpg import free_port
from tests.integration.proxyproc import ProxyProcess, TerminalPKI

StartProxy = Callable[..., ProxyProcess]
TOKEN = "admin-test-token-0123456789"


def _call(
    port: int, path: str, *, method: str = "GET", token: str | None = TOKEN, host: str = "127.0.0.1"
) -> tuple[int, bytes]:
    request = urllib.request.Request(
        f"http://{host}:{port}{path}", method=method, data=b"" if method == "POST" else None
    )
    if token is not None:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


@pytest.fixture
def admin_proxy(start_proxy: StartProxy, tmp_path: Path) -> tuple[ProxyProcess, int]:
    token_file = tmp_path / "admin-token"
    token_file.write_text(TOKEN + "\n", encoding="utf-8")
    port = free_port()
    proxy = start_proxy(
        admin={"host": "127.0.0.1", "port": port, "token": {"file": str(token_file)}},
        routes={"pos": {"pool": {"mode": "transaction", "size": 2}}},
    )
    proxy.wait_for_event("admin_listening")
    return proxy, port


def test_health_needs_no_token_but_everything_else_does(admin_proxy: tuple[ProxyProcess, int]) -> None:
    _proxy, port = admin_proxy
    assert _call(port, "/healthz", token=None) == (200, b'{"status": "alive"}')
    assert _call(port, "/metrics", token=None)[0] == 401
    assert _call(port, "/v1/pools", token="wrong")[0] == 401
    assert _call(port, "/v1/pools")[0] == 200


def test_metrics_move_with_sessions_and_statements(
    admin_proxy: tuple[ProxyProcess, int], terminal_pki: TerminalPKI
) -> None:
    proxy, port = admin_proxy
    with psycopg.connect(
        **proxy.conninfo(terminal_pki.cashier, terminal_pki.ca), autocommit=True
    ) as connection:
        for _ in range(3):
            connection.execute("SELECT 1")
        status, body = _call(port, "/metrics")
        text = body.decode()
        assert status == 200
        assert 'pos_proxy_client_connections_active{role="cashier"} 1.0' in text
        assert 'pos_proxy_client_connections_total{role="cashier"} 1.0' in text
        assert 'pos_proxy_server_connections_opened_total{route="pos"}' in text
        assert 'pos_proxy_pool_server_connections{route="pos",state="idle"}' in text
        assert "pos_proxy_build_info" in text
        assert 'pos_proxy_statement_seconds_count{role="cashier"} 3.0' in text
        assert "till-01" not in text and "store-001" not in text  # no per-terminal series
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(**proxy.conninfo(None, terminal_pki.ca)).close()
    text = _call(port, "/metrics")[1].decode()
    assert 'pos_proxy_client_connections_active{role="cashier"} 0.0' in text
    assert 'pos_proxy_client_connections_refused_total{reason="authentication"} 1.0' in text


def test_process_memory_and_descriptors_are_the_proxys_own(admin_proxy: tuple[ProxyProcess, int]) -> None:
    proxy, port = admin_proxy
    text = _call(port, "/metrics")[1].decode()
    values = {
        line.split()[0]: float(line.split()[1]) for line in text.splitlines() if line.startswith("process_")
    }
    status = Path(f"/proc/{proxy.pid}/status").read_text(encoding="ascii")
    vm_rss = int(next(line for line in status.splitlines() if line.startswith("VmRSS:")).split()[1]) * 1024
    assert 0.5 * vm_rss < values["process_resident_memory_bytes"] < 2 * vm_rss
    # The listener, the admin listener, the event loop's own, a few log and pipe descriptors.
    open_fds = len(list(Path(f"/proc/{proxy.pid}/fd").iterdir()))
    assert 5 <= values["process_open_fds"] <= open_fds + 10
    assert values["process_max_fds"] >= values["process_open_fds"]
    assert values["process_cpu_seconds_total"] > 0


def test_statements_running_long_are_counted_while_they_run(
    start_proxy: StartProxy, terminal_pki: TerminalPKI, tmp_path: Path
) -> None:
    token_file = tmp_path / "admin-token"
    token_file.write_text(TOKEN + "\n", encoding="utf-8")
    port = free_port()
    proxy = start_proxy(
        admin={
            "host": "127.0.0.1",
            "port": port,
            "token": {"file": str(token_file)},
            "long_statement_after": "1s",
        },
        routes={"pos": {"pool": {"mode": "transaction", "size": 2}}},
    )
    proxy.wait_for_event("admin_listening")
    series = 'pos_proxy_statements_running_long{route="pos"} '

    def running_long() -> float:
        text = _call(port, "/metrics")[1].decode()
        return float(next(line for line in text.splitlines() if line.startswith(series)).split()[1])

    slow = psycopg.connect(**proxy.conninfo(terminal_pki.cashier, terminal_pki.ca), autocommit=True)
    quick = psycopg.connect(**proxy.conninfo(terminal_pki.manager, terminal_pki.ca), autocommit=True)
    with slow, quick:
        quick.execute("SELECT 1")
        assert running_long() == 0
        sleeper = threading.Thread(target=lambda: slow.execute("SELECT pg_sleep(4)"), daemon=True)
        started = time.monotonic()
        sleeper.start()
        time.sleep(0.5)
        assert running_long() == 0  # running, not yet for long
        deadline = started + 3.5
        while running_long() != 1:
            assert time.monotonic() < deadline, "the sleeping statement was never counted"
            time.sleep(0.1)
        quick.execute("SELECT 1")  # a quick statement meanwhile is not
        assert running_long() == 1
        sleeper.join(10)
        assert not sleeper.is_alive()
        assert running_long() == 0


def test_pools_and_clients_describe_live_state(
    admin_proxy: tuple[ProxyProcess, int], terminal_pki: TerminalPKI
) -> None:
    proxy, port = admin_proxy
    with psycopg.connect(
        **proxy.conninfo(terminal_pki.manager, terminal_pki.ca), autocommit=True
    ) as connection:
        connection.execute("SELECT 1")
        pools = json.loads(_call(port, "/v1/pools")[1])["pools"]
        assert [(pool["name"], pool["mode"], pool["size"]) for pool in pools] == [("pos", "transaction", 2)]
        clients = json.loads(_call(port, "/v1/clients")[1])["clients"]
        assert [(c["store"], c["terminal"], c["role"], c["state"]) for c in clients] == [
            ("store-001", "office-01", "manager", "ready")
        ]


def test_disconnect_cuts_a_terminal_off_now(
    admin_proxy: tuple[ProxyProcess, int], terminal_pki: TerminalPKI
) -> None:
    proxy, port = admin_proxy
    stolen = psycopg.connect(**proxy.conninfo(terminal_pki.cashier, terminal_pki.ca), autocommit=True)
    other = psycopg.connect(**proxy.conninfo(terminal_pki.manager, terminal_pki.ca), autocommit=True)
    try:
        stolen.execute("SELECT 1")
        status, body = _call(port, "/v1/terminals/store-001/till-01/disconnect", method="POST")
        assert status == 200
        assert json.loads(body) == {"store": "store-001", "terminal": "till-01", "disconnected": 1}
        with pytest.raises(psycopg.OperationalError):
            stolen.execute("SELECT 1")
        assert other.execute("SELECT 'still here'").fetchone() == ("still here",)
    finally:
        stolen.close()
        other.close()
    record = proxy.wait_for_event("admin_disconnect", terminal="till-01")
    assert record["sessions"] == 1


def test_reload_and_readiness(admin_proxy: tuple[ProxyProcess, int]) -> None:
    proxy, port = admin_proxy
    status, body = _call(port, "/v1/reload", method="POST")
    assert (status, json.loads(body)) == (200, {"reloaded": True})
    proxy.wait_for_event("reload_applied")
    status, body = _call(port, "/readyz")
    assert status == 200
    assert json.loads(body)["routes"] == {"pos": "reachable"}
    assert 'pos_proxy_config_reloads_total{result="ok"} 1.0' in _call(port, "/metrics")[1].decode()


def test_admin_cli_talks_to_the_api(admin_proxy: tuple[ProxyProcess, int], tmp_path: Path) -> None:
    _proxy, port = admin_proxy
    token_file = tmp_path / "cli-token"
    token_file.write_text(TOKEN, encoding="utf-8")
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "proxy",
            "admin",
            "--url",
            f"http://127.0.0.1:{port}",
            "--token-file",
            str(token_file),
            "pools",
        ],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["pools"][0]["name"] == "pos"
    denied = subprocess.run(
        [sys.executable, "-m", "proxy", "admin", "--url", f"http://127.0.0.1:{port}", "clients"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert denied.returncode == 1
    assert "HTTP 401" in denied.stderr


def test_close_idle_lets_an_operator_drop_a_routed_database(
    start_proxy: StartProxy,
    base_config: dict[str, Any],
    pg_cluster: Any,
    terminal_pki: TerminalPKI,
    tmp_path: Path,
) -> None:
    """The pool keeps idle server connections to the route's database, which DROP DATABASE waits
    for and then refuses; `pos-proxy admin close-idle ROUTE` closes them, lent ones go on."""
    database = f"scratch_{secrets.token_hex(4)}"
    superuser = psycopg.connect(
        **pg_cluster.connect_kwargs(user="postgres", dbname="postgres"), autocommit=True
    )
    token_file = tmp_path / "admin-token"
    token_file.write_text(TOKEN, encoding="utf-8")
    port = free_port()
    try:
        superuser.execute(f'CREATE DATABASE "{database}" OWNER pos_proxy')
        route = {
            **base_config["routes"]["pos"],
            "dbname": database,
            "pool": {"mode": "transaction", "size": 2},
        }
        proxy = start_proxy(
            admin={"host": "127.0.0.1", "port": port, "token": {"file": str(token_file)}},
            routes={"scratch": route},
        )
        proxy.wait_for_event("admin_listening")
        with (
            psycopg.connect(
                **proxy.conninfo(terminal_pki.cashier, terminal_pki.ca, dbname="scratch")
            ) as lent,
            psycopg.connect(
                **proxy.conninfo(terminal_pki.manager, terminal_pki.ca, dbname="scratch"), autocommit=True
            ) as finished,
        ):
            lent.execute("SELECT 1")  # psycopg's BEGIN: a transaction holds its server connection
            finished.execute("SELECT 1")  # done: its server connection is idle in the pool
            status, body = _call(port, "/v1/pools/scratch/close-idle", method="POST")
            assert (status, json.loads(body)) == (200, {"route": "scratch", "closed": 1})
            assert lent.execute("SELECT 2").fetchone() == (2,)
            lent.commit()
        # The lent one is idle in the pool now: the server waits 5 s for it to go, then refuses.
        with pytest.raises(psycopg.errors.ObjectInUse):
            superuser.execute(f'DROP DATABASE "{database}"')
        cli = subprocess.run(
            [
                *(sys.executable, "-m", "proxy", "admin", "--url", f"http://127.0.0.1:{port}"),
                *("--token-file", str(token_file), "close-idle", "scratch"),
            ],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        assert cli.returncode == 0, cli.stderr
        assert json.loads(cli.stdout) == {"route": "scratch", "closed": 1}
        superuser.execute(f'DROP DATABASE "{database}"')
        assert [r["closed"] for r in proxy.log_events() if r.get("event") == "admin_close_idle"] == [1, 1]
        assert _call(port, "/v1/pools/nope/close-idle", method="POST")[0] == 404
    finally:
        superuser.execute(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')
        superuser.close()
