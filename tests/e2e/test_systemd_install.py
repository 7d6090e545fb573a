"""The shipped unit, the shipped example config and the install steps of docs/operations.md start a
proxy that serves and audits, checked without systemd: the test lays out what the install steps lay
out (in a temp dir standing for /), fills the credentials directory as LoadCredential= would, and runs the
unit's own ExecStartPre and ExecStart command lines with the environment systemd gives them."""

from __future__ import annotations

import json
import os
import re
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import pytest
import yaml

from proxy import certs
from proxy.localpg import free_port
from tests.conftest import PgCluster
from tests.integration.proxyproc import receive_notifications
from tests.logcheck import assert_no_unhandled_errors

REPO_ROOT = Path(__file__).resolve().parents[2]
UNIT = REPO_ROOT / "systemd" / "pos-proxy.service"
EXAMPLE_CONFIG = REPO_ROOT / "config" / "pos-proxy.example.yaml"
OPERATIONS_GUIDE = REPO_ROOT / "docs" / "operations.md"

# Where the operations guide tells the user to put things (and the unit's directories), and the one installed
# program; the test substitutes these, and nothing else, with places in its temp dir.
INSTALLED_PROGRAM = "/usr/local/bin/pos-proxy"
INSTALL_ROOTS = ("/etc/pos-proxy", "/var/log/pos-proxy", "/var/lib/pos-proxy", "/run/pos-proxy")
# The guide's install steps this layout mirrors: if the guide changes them, so must the test.
MIRRORED_STEPS = (
    "install -d -m 0750 -o root -g pos-proxy /etc/pos-proxy /etc/pos-proxy/tls /etc/pos-proxy/policies",
    "install -d -m 0700 /etc/pos-proxy/secrets",
    "cp config/pos-proxy.example.yaml /etc/pos-proxy/pos-proxy.yaml",
    "cp config/policies/*.yaml /etc/pos-proxy/policies/",
    "proxy.crt, terminal-ca.crt, terminal-ca.crl, db-ca.crt (0644) and proxy.key",
    "head -c 32 /dev/urandom > /etc/pos-proxy/audit.key",
)
START_TIMEOUT = 30.0


def documented_install_steps() -> str:
    """The shell block of the operations guide's "Running under systemd" section."""
    text = OPERATIONS_GUIDE.read_text(encoding="utf-8")
    section = text[text.index("## Running under systemd") :]
    block = re.search(r"```sh\n(.*?)```", section, re.DOTALL)
    assert block is not None, "no install steps in docs/operations.md's systemd section"
    return block.group(1)


def service_directives(unit_text: str) -> list[tuple[str, str]]:
    """The [Service] section's KEY=VALUE lines, in order (comments and other sections left out)."""
    directives: list[tuple[str, str]] = []
    section = ""
    for raw in unit_text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line
            continue
        if section == "[Service]":
            key, _, value = line.partition("=")
            directives.append((key, value))
    return directives


def command_line(value: str) -> list[str]:
    """An Exec*= value as argv (systemd's "-", "@", "+", "!" prefixes are not used by this unit)."""
    argv = shlex.split(value)
    assert argv and argv[0].startswith("/"), f"unexpected command line {value!r}"
    return argv


@dataclass(frozen=True, slots=True)
class Installation:
    """What the guide's install steps and systemd lay out, under ``root`` instead of ``/``."""

    root: Path
    credentials: Path  # $CREDENTIALS_DIRECTORY as LoadCredential= fills it
    directives: Sequence[tuple[str, str]]

    def path(self, installed: str) -> str:
        """An installed path as the test lays it out: only the guide's places are moved."""
        if installed == INSTALLED_PROGRAM:
            # ln -s /opt/pos-proxy/bin/pos-proxy /usr/local/bin/pos-proxy: this environment's.
            return str(Path(sys.executable).with_name("pos-proxy"))
        for prefix in INSTALL_ROOTS:
            if installed == prefix or installed.startswith(prefix + "/"):
                return str(self.root) + installed
        return installed

    def relocate(self, text: str) -> str:
        for prefix in INSTALL_ROOTS:
            text = text.replace(prefix, str(self.root) + prefix)
        return text

    def exec_line(self, key: str) -> list[str]:
        values = [value for name, value in self.directives if name == key]
        assert len(values) == 1, f"{key}= appears {len(values)} times in the unit"
        return [self.path(arg) for arg in command_line(values[0])]

    def environment(self, notify_socket: Path) -> dict[str, str]:
        """What systemd puts in the service's environment for this unit (and nothing of the test's)."""
        env = {
            key: value
            for key, value in os.environ.items()
            if key not in ("CREDENTIALS_DIRECTORY", "NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")
        }
        # The proxy under test is this tree's (the compiled tree in the compiled run).
        env["PYTHONPATH"] = str(REPO_ROOT)
        env["PYTHONUNBUFFERED"] = "1"
        env["CREDENTIALS_DIRECTORY"] = str(self.credentials)
        env["NOTIFY_SOCKET"] = str(notify_socket)
        for key, variable, base in (
            ("RuntimeDirectory", "RUNTIME_DIRECTORY", "/run"),
            ("StateDirectory", "STATE_DIRECTORY", "/var/lib"),
            ("LogsDirectory", "LOGS_DIRECTORY", "/var/log"),
            ("ConfigurationDirectory", "CONFIGURATION_DIRECTORY", "/etc"),
        ):
            for name, value in self.directives:
                if name == key:
                    env[variable] = self.path(f"{base}/{value}")
        return env


def _umask(directives: Sequence[tuple[str, str]]) -> int:
    return next((int(value, 8) for key, value in directives if key == "UMask"), 0o022)


def install(root: Path, cluster: PgCluster, pki: Path, listen_port: int, admin_port: int) -> Installation:
    """Follow the guide's install steps under ``root``; then do what systemd does at start."""
    steps = documented_install_steps()
    for step in MIRRORED_STEPS:
        assert step in steps, f"docs/operations.md's install steps no longer say {step!r}: update this test"
    directives = service_directives(UNIT.read_text(encoding="utf-8"))
    layout = Installation(root, root / "run" / "credentials" / "pos-proxy.service", directives)
    etc = Path(layout.path("/etc/pos-proxy"))
    for directory in (etc, etc / "tls", etc / "policies"):
        directory.mkdir(mode=0o750, parents=True, exist_ok=True)
    (etc / "secrets").mkdir(mode=0o700)

    # cp config/pos-proxy.example.yaml /etc/pos-proxy/pos-proxy.yaml   # then edit it:
    # where the database is and which ports to use (loopback and free ones here), nothing more.
    config = yaml.safe_load(layout.relocate(EXAMPLE_CONFIG.read_text(encoding="utf-8")))
    config["listen"].update(host="127.0.0.1", port=listen_port)
    config["admin"]["port"] = admin_port
    for route in config["routes"].values():
        route.update(host="localhost", port=cluster.port)
    (etc / "pos-proxy.yaml").write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    for policy in (REPO_ROOT / "config" / "policies").glob("*.yaml"):
        shutil.copy(policy, etc / "policies" / policy.name)

    # TLS files under the names the example config gives them.
    for source, name, mode in (
        (pki / "server.pem", "proxy.crt", 0o644),
        (pki / "server.key", "proxy.key", 0o640),
        (pki / "ca.pem", "terminal-ca.crt", 0o644),
        (pki / "crl.pem", "terminal-ca.crl", 0o644),
        (cluster.ca, "db-ca.crt", 0o644),
    ):
        shutil.copy(source, etc / "tls" / name)
        (etc / "tls" / name).chmod(mode)

    # install -m 0600 /dev/null /etc/pos-proxy/secrets/NAME   # fill in
    values = {"pos-db-password": cluster.password}
    for installed in re.findall(r"install -m 0600 /dev/null (/etc/pos-proxy/secrets/[\w.-]+)", steps):
        secret = Path(layout.path(installed))
        secret.touch(mode=0o600)
        secret.write_text(values.get(secret.name, secrets.token_urlsafe(24)) + "\n", encoding="utf-8")

    key = etc / "audit.key"
    key.write_bytes(secrets.token_bytes(32))
    key.chmod(0o640)

    # systemd at start: the unit's directories, and LoadCredential= copies each file it names.
    for key_name, base in (
        ("LogsDirectory", "/var/log"),
        ("StateDirectory", "/var/lib"),
        ("RuntimeDirectory", "/run"),
    ):
        for name, value in directives:
            if name == key_name:
                Path(layout.path(f"{base}/{value}")).mkdir(mode=0o700, parents=True, exist_ok=True)
    layout.credentials.mkdir(mode=0o700, parents=True)
    for name, value in directives:
        if name != "LoadCredential":
            continue
        credential, _, source = value.partition(":")
        source_path = Path(layout.path(source))
        # systemd refuses to start a unit whose credential file is missing.
        assert source_path.is_file(), f"LoadCredential={value}: the guide's steps do not create {source}"
        target = layout.credentials / credential
        shutil.copy(source_path, target)
        target.chmod(0o400)
    return layout


@pytest.fixture
def pki(tmp_path: Path) -> Path:
    directory = tmp_path / "pki"
    certs.init_ca(directory)
    certs.issue_server(directory, dns_names=["localhost"], ip_addresses=["127.0.0.1"])
    certs.write_crl(directory)
    return directory


@pytest.fixture
def notify_socket(tmp_path: Path) -> Iterator[tuple[socket.socket, Path]]:
    path = tmp_path / "notify.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(path))
        yield sock, path


def _get(url: str, token: str) -> tuple[int, Any]:
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"null")


def _wait_ready(url: str, token: str, proc: subprocess.Popen[bytes]) -> Mapping[str, Any]:
    deadline = time.monotonic() + START_TIMEOUT
    body: Any = None
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"the proxy exited with {proc.returncode}"
        try:
            status, body = _get(url, token)
        except OSError:
            status = 0
        if status == 200:
            ready: Mapping[str, Any] = body
            return ready
        time.sleep(0.2)
    raise AssertionError(f"/readyz did not become ready: {body}")


def _audit_events(path: Path) -> list[str]:
    if not path.exists():
        return []
    return [json.loads(line)["event"] for line in path.read_text(encoding="utf-8").splitlines() if line]


def test_the_unit_and_example_config_start_as_the_operations_guide_installs_them(
    pg_cluster: PgCluster, pki: Path, tmp_path: Path, notify_socket: tuple[socket.socket, Path]
) -> None:
    layout = install(tmp_path / "root", pg_cluster, pki, free_port(), free_port())
    config = yaml.safe_load(Path(layout.path("/etc/pos-proxy/pos-proxy.yaml")).read_text(encoding="utf-8"))
    env = layout.environment(notify_socket[1])
    umask = _umask(layout.directives)

    check = subprocess.run(
        layout.exec_line("ExecStartPre"),
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        umask=umask,
    )
    assert check.returncode == 0, check.stdout + check.stderr

    log_path = tmp_path / "journal.log"
    with log_path.open("wb") as journal:
        proc = subprocess.Popen(
            layout.exec_line("ExecStart"),
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=journal,
            stderr=subprocess.STDOUT,
            umask=umask,
        )
    try:
        receive_notifications(notify_socket[0], "READY=1", timeout=START_TIMEOUT)
        token = (layout.credentials / "admin-token").read_text(encoding="utf-8").strip()
        ready = _wait_ready(f"http://127.0.0.1:{config['admin']['port']}/readyz", token, proc)
        assert ready["ready"] is True, ready

        terminal = certs.issue_terminal(pki, store="store-001", terminal="till-01", role="cashier")
        with psycopg.connect(
            host="127.0.0.1",
            port=config["listen"]["port"],
            dbname="pos",
            user="till-01",
            sslmode="verify-full",
            sslrootcert=str(pki / "ca.pem"),
            sslcert=str(terminal.cert_path),
            sslkey=str(terminal.key_path),
            connect_timeout=10,
            autocommit=True,
        ) as till:
            assert till.execute("SELECT 1").fetchone() == (1,)

        audit_log = Path(config["audit"]["file"])
        assert audit_log.parent == Path(layout.path("/var/log/pos-proxy"))
        deadline = time.monotonic() + 10
        while "statement" not in _audit_events(audit_log) and time.monotonic() < deadline:
            time.sleep(0.1)
        events = _audit_events(audit_log)
        assert {"audit_started", "connection_accepted", "statement"} <= set(events), events

        proc.send_signal(signal.SIGTERM)  # systemctl stop (KillMode=mixed: the main process)
        assert proc.wait(timeout=45) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
    assert_no_unhandled_errors(log_path.read_text(encoding="utf-8", errors="replace"), "the installed proxy")
    # The log written under the unit's UMask is the service user's alone.
    assert audit_log.stat().st_mode & 0o077 == 0
    verified = subprocess.run(
        [
            *layout.exec_line("ExecStart")[:1],
            "audit",
            "verify",
            "--key",
            config["audit"]["key_file"],
            "--witness",
            config["audit"]["witness_file"],
            str(audit_log),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert verified.returncode == 0, verified.stdout + verified.stderr
