"""Fixtures for the end-to-end tests: they run ``python -m proxy`` as a user would, in a temp dir.

* ``cli`` runs one CLI command to completion (cwd ``tmp_path``, a timeout on every call).
* ``start_cli`` starts a long-running CLI command (``run``, ``demo``) and stops it afterwards.
* ``pki`` is a terminal PKI made with the CLI itself (CA and server certificate).
* ``valid_config`` is a proxy configuration built from that PKI that passes ``check-config``.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.logcheck import assert_no_unhandled_errors

REPO_ROOT = Path(__file__).resolve().parents[2]
CLI_TIMEOUT = 60.0
STOP_TIMEOUT = 30.0

# Variables a user's shell might carry that would change what the CLI reads.
_SCRUBBED = ("CREDENTIALS_DIRECTORY", "PYTHONPATH", "POS_E2E_DB_PASSWORD")


def cli_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in _SCRUBBED}
    env["PYTHONUNBUFFERED"] = "1"
    if extra:
        env.update(extra)
    return env


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def wait_for_port(port: int, proc: subprocess.Popen[str], timeout: float = 30.0) -> None:
    """Until 127.0.0.1:port accepts a TCP connection; fails early when ``proc`` exits."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"process exited with {proc.returncode} before listening on port {port}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.1)
    pytest.fail(f"nothing listened on 127.0.0.1:{port} within {timeout:.0f}s")


@dataclass(frozen=True, slots=True)
class CliResult:
    args: tuple[str, ...]
    returncode: int
    stdout: str
    stderr: str

    @property
    def output(self) -> str:
        return self.stdout + self.stderr

    def describe(self) -> str:
        return (
            f"pos-proxy {' '.join(self.args)} -> exit {self.returncode}\n"
            f"--- stdout ---\n{self.stdout}--- stderr ---\n{self.stderr}"
        )


class Cli:
    """``python -m proxy ARGS`` in a working directory, as a user would type it."""

    def __init__(self, cwd: Path) -> None:
        self.cwd = cwd

    def __call__(
        self,
        *args: str | os.PathLike[str],
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
        timeout: float = CLI_TIMEOUT,
    ) -> CliResult:
        argv = tuple(str(a) for a in args)
        completed = subprocess.run(
            [sys.executable, "-m", "proxy", *argv],
            cwd=cwd or self.cwd,
            env=cli_env(env),
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        return CliResult(argv, completed.returncode, completed.stdout, completed.stderr)

    def ok(
        self,
        *args: str | os.PathLike[str],
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
        timeout: float = CLI_TIMEOUT,
    ) -> CliResult:
        result = self(*args, env=env, cwd=cwd, timeout=timeout)
        assert result.returncode == 0, result.describe()
        assert "Traceback" not in result.stderr, result.describe()
        return result

    def fails(
        self,
        *args: str | os.PathLike[str],
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
        timeout: float = CLI_TIMEOUT,
    ) -> CliResult:
        """Runs a command expected to exit 1 with a message, not a traceback."""
        result = self(*args, env=env, cwd=cwd, timeout=timeout)
        assert result.returncode == 1, result.describe()
        assert "Traceback" not in result.output, result.describe()
        assert result.stderr.strip(), result.describe()
        return result


@pytest.fixture
def cli(tmp_path: Path) -> Cli:
    return Cli(tmp_path)


def stop_process(proc: subprocess.Popen[str], sig: int = signal.SIGTERM) -> int:
    """Signal ``proc`` and wait; SIGKILL after STOP_TIMEOUT. Returns the exit code."""
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(timeout=STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=STOP_TIMEOUT)
    return proc.returncode


def _default_sighup() -> None:
    # The job runner may start us with SIGHUP ignored, which children would inherit; a proxy
    # under systemd or a terminal has the default disposition.
    signal.signal(signal.SIGHUP, signal.SIG_DFL)


StartCli = Callable[..., subprocess.Popen[str]]


@pytest.fixture
def start_cli(tmp_path: Path) -> Iterator[StartCli]:
    """Starts ``python -m proxy ARGS`` (stdout piped, stderr to a file); stops whatever is left."""
    started: list[tuple[subprocess.Popen[str], Path]] = []

    def start(
        *args: str | os.PathLike[str], env: Mapping[str, str] | None = None, stderr_name: str = "stderr.txt"
    ) -> subprocess.Popen[str]:
        stderr = (tmp_path / stderr_name).open("w", encoding="utf-8")
        try:
            proc = subprocess.Popen(
                [sys.executable, "-m", "proxy", *(str(a) for a in args)],
                cwd=tmp_path,
                env=cli_env(env),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=stderr,
                text=True,
                bufsize=1,
                preexec_fn=_default_sighup,  # noqa: PLW1509 -- only resets one signal disposition
            )
        finally:
            stderr.close()
        started.append((proc, tmp_path / stderr_name))
        return proc

    yield start
    for proc, _ in started:
        stop_process(proc)
        if proc.stdout is not None:
            proc.stdout.close()
    for proc, stderr_path in started:
        assert_no_unhandled_errors(stderr_path.read_text(encoding="utf-8"), f"pos-proxy {proc.args[3:]}")


@dataclass(frozen=True, slots=True)
class Pki:
    directory: Path

    @property
    def ca(self) -> Path:
        return self.directory / "ca.pem"

    @property
    def crl(self) -> Path:
        return self.directory / "crl.pem"

    @property
    def server_cert(self) -> Path:
        return self.directory / "server.pem"

    @property
    def server_key(self) -> Path:
        return self.directory / "server.key"


@pytest.fixture
def pki(cli: Cli, tmp_path: Path) -> Pki:
    """A CA and a server certificate (localhost, 127.0.0.1), made with the CLI."""
    cli.ok("certs", "init-ca", "--dir", "pki")
    cli.ok("certs", "issue-server", "--dir", "pki", "--dns", "localhost", "--ip", "127.0.0.1")
    return Pki(tmp_path / "pki")


DB_PASSWORD = "e2e-Secret-8d1f0c2b7a"  # must never show up in the CLI's output
PASSWORD_ENV = "POS_E2E_DB_PASSWORD"


@dataclass(frozen=True, slots=True)
class ValidConfig:
    path: Path
    env: Mapping[str, str]


def valid_config_text(port: int = 6432) -> str:
    # Relative paths resolve against the config file's directory (conf/), not the cwd.
    return f"""\
listen:
  host: 127.0.0.1
  port: {port}
tls:
  cert: ../pki/server.pem
  key: ../pki/server.key
  client_ca: ../pki/ca.pem
  crl: ../pki/crl.pem
roles:
  cashier:
    description: tills
  manager:
routes:
  pos:
    host: db.example.internal
    user: pos_proxy
    password: {{env: {PASSWORD_ENV}}}
    sslmode: verify-full
    sslrootcert: ../pki/ca.pem
"""


@pytest.fixture
def valid_config(pki: Pki, tmp_path: Path) -> ValidConfig:
    conf = tmp_path / "conf"
    conf.mkdir()
    path = conf / "pos-proxy.yaml"
    path.write_text(valid_config_text(free_port()), encoding="utf-8")
    return ValidConfig(path, {PASSWORD_ENV: DB_PASSWORD})
