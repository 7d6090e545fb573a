"""The fuzzed proxy: a real proxy process in front of the test PostgreSQL 15, with a session-pooling
route ("pos"), a transaction-pooling route to the same database ("pos_tx"), the admin API, and
127.0.0.2 trusted as a load balancer that sends PROXY headers."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from proxy.localpg import free_port
from tests.fuzz.cases import BALANCER
from tests.integration.conftest import *  # noqa: F403
from tests.integration.proxyproc import ProxyProcess, deep_merge

ADMIN_TOKEN = "fuzz-admin-token-0123456789"
POOL_SIZE = 4


def fuzz_config(base: dict[str, Any], admin_port: int, token_file: Path) -> dict[str, Any]:
    pool = {"size": POOL_SIZE, "max_client_wait": "10s"}
    session_route = deep_merge(base["routes"]["pos"], {"pool": pool})
    transaction_route = deep_merge(session_route, {"dbname": "pos", "pool": {"mode": "transaction"}})
    return deep_merge(
        base,
        {
            "listen": {
                "proxy_protocol": {
                    "enabled": True,
                    "trusted_sources": [f"{BALANCER}/32"],
                    "header_timeout": "1s",
                }
            },
            "admin": {"host": "127.0.0.1", "port": admin_port, "token": {"file": str(token_file)}},
            "routes": {"pos": session_route, "pos_tx": transaction_route},
        },
    )


@dataclass(frozen=True, slots=True)
class FuzzedProxy:
    process: ProxyProcess
    admin_port: int


@pytest.fixture(scope="module")
def fuzz_proxy(
    base_config: dict[str, Any], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[FuzzedProxy]:
    directory = tmp_path_factory.mktemp("fuzz-proxy")
    token_file = directory / "admin-token"
    token_file.write_text(ADMIN_TOKEN + "\n", encoding="utf-8")
    admin_port = free_port()
    process = ProxyProcess(directory, fuzz_config(base_config, admin_port, token_file))
    process.start()
    process.wait_for_event("admin_listening")
    yield FuzzedProxy(process, admin_port)
    process.stop()
