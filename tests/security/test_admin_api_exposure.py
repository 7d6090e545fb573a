"""The admin API (pools, clients, terminal cut-off, reload) is never open to a network without a token."""

from __future__ import annotations

import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from proxy.localpg import free_port
from tests.integration.proxyproc import ProxyProcess

StartProxy = Callable[..., ProxyProcess]
TOKEN = "admin-exposure-test-token-0123456789"
NON_LOOPBACK = ["0.0.0.0", "::", "10.20.30.40", "pos-proxy.example.internal"]
LOOPBACK = ["127.0.0.1", "127.0.0.2", "::1", "localhost"]


def _check_config(config: dict[str, Any], directory: Path) -> subprocess.CompletedProcess[str]:
    path = directory / "pos-proxy.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return subprocess.run(
        [sys.executable, "-m", "proxy", "check-config", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.mark.parametrize("host", NON_LOOPBACK)
def test_check_config_refuses_a_non_loopback_admin_listener_without_token(
    host: str, base_config: dict[str, Any], tmp_path: Path
) -> None:
    result = _check_config({**base_config, "admin": {"host": host, "port": free_port()}}, tmp_path)
    assert result.returncode == 1, result
    assert "admin.token: required when admin.host is not a loopback address" in result.stderr, result.stderr


@pytest.mark.parametrize("host", LOOPBACK)
def test_check_config_accepts_a_loopback_admin_listener_without_token(
    host: str, base_config: dict[str, Any], tmp_path: Path
) -> None:
    result = _check_config({**base_config, "admin": {"host": host, "port": free_port()}}, tmp_path)
    assert result.returncode == 0, result.stderr


def test_proxy_does_not_start_with_an_open_admin_listener(start_proxy: StartProxy) -> None:
    with pytest.raises(RuntimeError) as failed:
        start_proxy(admin={"host": "0.0.0.0", "port": free_port()})
    assert "admin.token: required when admin.host is not a loopback address" in str(failed.value)


def _status(url: str, token: str | None) -> int:
    request = urllib.request.Request(url)
    if token is not None:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return exc.code


def test_admin_listener_on_all_addresses_serves_only_with_the_token(
    start_proxy: StartProxy, tmp_path: Path
) -> None:
    token_file = tmp_path / "admin-token"
    token_file.write_text(TOKEN + "\n", encoding="utf-8")
    port = free_port()
    proxy = start_proxy(admin={"host": "0.0.0.0", "port": port, "token": {"file": str(token_file)}})
    proxy.wait_for_event("admin_listening")
    for path in ("/metrics", "/v1/pools", "/v1/clients"):
        assert _status(f"http://127.0.0.1:{port}{path}", None) == 401
        assert _status(f"http://127.0.0.1:{port}{path}", "guess") == 401
        assert _status(f"http://127.0.0.1:{port}{path}", TOKEN) == 200
