"""The shipped systemd unit passes systemd's own checks (systemd-analyze, no running systemd needed)."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

UNIT = Path(__file__).resolve().parents[2] / "systemd" / "pos-proxy.service"

pytestmark = pytest.mark.skipif(
    shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed"
)


@pytest.fixture
def unit(tmp_path: Path) -> Path:
    """The unit with ExecStart pointing at this environment's pos-proxy, which verify requires to exist."""
    executable = Path(sys.executable).with_name("pos-proxy")
    copy = tmp_path / "pos-proxy.service"
    copy.write_text(UNIT.read_text(encoding="utf-8").replace("/usr/local/bin/pos-proxy", str(executable)))
    return copy


def test_unit_verifies_clean(unit: Path) -> None:
    result = subprocess.run(
        ["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr.strip() == "", result.stderr


def test_unit_exposure_is_ok(unit: Path) -> None:
    result = subprocess.run(
        ["systemd-analyze", "security", "--offline=true", str(unit)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    found = re.search(r"Overall exposure level for pos-proxy\.service: ([0-9.]+) (\w+)", result.stdout)
    assert found is not None, result.stdout + result.stderr
    assert float(found.group(1)) <= 1.5, found.group(0)
    assert found.group(2) == "OK"


def test_unit_runs_the_proxy_as_a_notify_service_with_reload_and_credentials() -> None:
    text = UNIT.read_text(encoding="utf-8")
    for line in (
        "Type=notify",
        "ExecReload=/bin/kill -HUP $MAINPID",
        "WatchdogSec=",
        "LoadCredential=pos-db-password:",
        "User=pos-proxy",
        "CapabilityBoundingSet=\n",
        "RestrictAddressFamilies=AF_INET AF_INET6 AF_UNIX",
        "SystemCallFilter=@system-service",
        "MemoryDenyWriteExecute=yes",
        "ProtectSystem=strict",
    ):
        assert line in text, line
