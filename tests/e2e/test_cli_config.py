"""``pos-proxy check-config`` and ``pos-proxy run --config`` run as a user would."""

from __future__ import annotations

import contextlib
import re
import shutil
import signal
import subprocess
from datetime import timedelta
from pathlib import Path

import pytest

from proxy import certs
from tests.e2e.conftest import (
    DB_PASSWORD,
    PASSWORD_ENV,
    REPO_ROOT,
    Cli,
    Pki,
    StartCli,
    ValidConfig,
    free_port,
    stop_process,
    valid_config_text,
    wait_for_port,
)

pytestmark = pytest.mark.e2e

EXAMPLE_CONFIG = REPO_ROOT / "config" / "pos-proxy.example.yaml"
PROBLEM_COUNT = re.compile(r": (\d+) problem\(s\)$")


def problems(stderr: str) -> list[str]:
    """The problem lines of check-config's report, checking the count in its first line."""
    header, *lines = stderr.splitlines()
    match = PROBLEM_COUNT.search(header)
    assert match, stderr
    assert all(line.startswith("  ") for line in lines), stderr
    assert len(lines) == int(match[1]), stderr
    return [line.strip() for line in lines]


def problem_paths(stderr: str) -> list[str]:
    return [line.split(":", 1)[0] for line in problems(stderr)]


# --- check-config -----------------------------------------------------------------------------------------


def test_check_config_accepts_a_valid_config(cli: Cli, valid_config: ValidConfig, tmp_path: Path) -> None:
    # From another directory: relative paths in the file resolve against the file, not the cwd.
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    result = cli.ok("check-config", valid_config.path, env=valid_config.env, cwd=elsewhere)

    assert "OK" in result.stdout
    assert "(1 route(s), 2 role(s))" in result.stdout
    assert result.stderr == ""
    assert DB_PASSWORD not in result.output


def test_check_config_needs_the_password_variable(cli: Cli, valid_config: ValidConfig) -> None:
    result = cli.fails("check-config", valid_config.path)
    assert problems(result.stderr) == [f"routes.pos.password: environment variable {PASSWORD_ENV} is not set"]


def test_check_config_reports_every_mistake_by_key_path(cli: Cli, pki: Pki, tmp_path: Path) -> None:
    config = tmp_path / "broken.yaml"
    config.write_text(
        f"""\
listen:
  port: 99999
  colour: blue
tls:
  cert: pki/missing.pem
  key: pki/server.key
  client_ca: pki/ca.pem
roles:
  cashier:
routes:
  pos:
    host: db.example.internal
    user: pos_proxy
    password: {DB_PASSWORD}
    passwd: {DB_PASSWORD}
    sslrootcert: pki/ca.pem
""",
        encoding="utf-8",
    )

    result = cli.fails("check-config", "broken.yaml")

    assert result.stdout == ""
    assert sorted(problem_paths(result.stderr)) == sorted(
        ["listen.port", "listen.colour", "tls.cert", "routes.pos.password", "routes.pos.passwd"]
    )
    report = "\n".join(problems(result.stderr))
    assert "listen.port: expected a port number between 1 and 65535" in report
    assert "listen.colour: unknown key" in report
    assert f"tls.cert: file not found: {tmp_path / 'pki' / 'missing.pem'}" in report
    assert "routes.pos.password: put secrets in {env: NAME}" in report
    assert "routes.pos.passwd: unknown key" in report
    assert DB_PASSWORD not in result.output


@pytest.mark.parametrize(
    ("text", "line", "message"),
    [
        ("listen:\n  port: 6432\n  host: a: b\ntls:\n", 3, "mapping values are not allowed here"),
        ("listen:\n  port: 6432\n  host: 0.0.0.0\n  port: 6433\n", 4, "duplicate key 'port'"),
        ("listen:\n\tport: 6432\n", 2, "found character '\\t'"),
    ],
    ids=["syntax", "duplicate-key", "tab"],
)
def test_yaml_errors_report_the_line(cli: Cli, tmp_path: Path, text: str, line: int, message: str) -> None:
    (tmp_path / "bad.yaml").write_text(text, encoding="utf-8")
    result = cli.fails("check-config", "bad.yaml")
    (problem,) = problems(result.stderr)
    assert problem.startswith(f"{tmp_path / 'bad.yaml'}:{line}:"), problem
    assert "invalid YAML" in problem
    assert message in problem


def test_check_config_of_a_missing_file(cli: Cli, tmp_path: Path) -> None:
    result = cli.fails("check-config", "nope.yaml")
    assert f"file not found: {tmp_path / 'nope.yaml'}" in result.stderr


def test_check_config_loads_the_certificates(cli: Cli, valid_config: ValidConfig, tmp_path: Path) -> None:
    cli.ok("certs", "init-ca", "--dir", "other")
    cli.ok("certs", "issue-server", "--dir", "other", "--dns", "localhost")
    text = valid_config.path.read_text(encoding="utf-8")
    valid_config.path.write_text(text.replace("../pki/server.key", "../other/server.key"), encoding="utf-8")

    result = cli.fails("check-config", valid_config.path, env=valid_config.env)

    assert "tls: cannot load the certificates" in result.stderr
    assert "KEY_VALUES_MISMATCH" in result.stderr


@pytest.mark.parametrize("crl", ["../other/crl.pem", "../pki/ca.pem"], ids=["other-ca-crl", "not-a-crl"])
def test_check_config_rejects_a_crl_that_does_not_belong_to_the_client_ca(
    cli: Cli, valid_config: ValidConfig, crl: str
) -> None:
    cli.ok("certs", "init-ca", "--dir", "other")
    text = valid_config.path.read_text(encoding="utf-8")
    valid_config.path.write_text(text.replace("crl: ../pki/crl.pem", f"crl: {crl}"), encoding="utf-8")

    result = cli(  # not cli.fails: that would pass on any traceback-free exit 1
        "check-config", valid_config.path, env=valid_config.env
    )

    assert result.returncode == 1, result.describe()
    assert "crl" in result.stderr


@pytest.mark.parametrize(
    ("expired_crl", "outcome"),
    [("keep-last", (0, "warning: tls.crl has expired")), ("refuse", (1, "expired at"))],
)
def test_check_config_on_an_expired_crl_follows_tls_expired_crl(
    cli: Cli,
    valid_config: ValidConfig,
    monkeypatch: pytest.MonkeyPatch,
    expired_crl: str,
    outcome: tuple[int, str],
) -> None:
    returncode, message = outcome
    monkeypatch.setattr(certs, "_CRL_VALIDITY", timedelta(seconds=-1))  # signed already past nextUpdate
    certs.write_crl(valid_config.path.parent.parent / "pki")
    text = valid_config.path.read_text(encoding="utf-8")
    valid_config.path.write_text(
        text.replace("crl: ../pki/crl.pem", f"crl: ../pki/crl.pem\n  expired_crl: {expired_crl}"),
        encoding="utf-8",
    )

    result = cli("check-config", valid_config.path, env=valid_config.env)

    assert result.returncode == returncode, result.describe()
    assert message in result.stderr


# --- the shipped example ----------------------------------------------------------------------------------


def test_example_config_only_lacks_its_files_and_credentials(cli: Cli, tmp_path: Path) -> None:
    shutil.copy(EXAMPLE_CONFIG, tmp_path / "example.yaml")
    shutil.copytree(EXAMPLE_CONFIG.parent / "policies", tmp_path / "policies")

    result = cli.fails("check-config", "example.yaml")

    lines = problems(result.stderr)
    assert lines
    for line in lines:
        assert "unknown key" not in line
        assert re.fullmatch(
            r"(tls\.(cert|key|client_ca|crl)|routes\.\w+\.sslrootcert): file not found: /etc/pos-proxy/\S+"
            r"|(routes\.\w+\.password|admin\.token): credential [\w-]+ needs CREDENTIALS_DIRECTORY.*"
            r"|audit\.key_file: file not found: /etc/pos-proxy/audit\.key"
            r"|audit\.(file|witness_file): directory not found: /var/(log|lib)/pos-proxy",
            line,
        ), line


def test_example_config_passes_with_real_files_and_credentials(cli: Cli, pki: Pki, tmp_path: Path) -> None:
    cli.ok("certs", "init-ca", "--dir", "db-pki")
    tls = tmp_path / "tls"
    tls.mkdir()
    for source, name in [
        (pki.server_cert, "proxy.crt"),
        (pki.server_key, "proxy.key"),
        (pki.ca, "terminal-ca.crt"),
        (pki.crl, "terminal-ca.crl"),
        (tmp_path / "db-pki" / "ca.pem", "db-ca.crt"),
    ]:
        shutil.copy(source, tls / name)
    credentials = tmp_path / "credentials"
    credentials.mkdir()
    (credentials / "pos-db-password").write_text(DB_PASSWORD + "\n", encoding="utf-8")
    (credentials / "reports-db-password").write_text(DB_PASSWORD + "-reports\n", encoding="utf-8")
    (credentials / "admin-token").write_text("admin-token-for-the-test\n", encoding="utf-8")
    shutil.copytree(EXAMPLE_CONFIG.parent / "policies", tmp_path / "policies")

    key = tmp_path / "audit.key"
    key.write_bytes(b"k" * 32)
    key.chmod(0o600)
    for directory in ("log", "lib"):
        (tmp_path / directory).mkdir()

    text = EXAMPLE_CONFIG.read_text(encoding="utf-8")
    assert text.count("/etc/pos-proxy/tls/") >= 5
    text = (
        text.replace("/etc/pos-proxy/tls/", f"{tls}/")
        .replace("/etc/pos-proxy/audit.key", str(key))
        .replace("/var/log/pos-proxy/", f"{tmp_path}/log/")
        .replace("/var/lib/pos-proxy/", f"{tmp_path}/lib/")
    )
    (tmp_path / "example.yaml").write_text(text, encoding="utf-8")

    result = cli.ok("check-config", "example.yaml", env={"CREDENTIALS_DIRECTORY": str(credentials)})

    assert "example.yaml: OK (2 route(s), 2 role(s))" in result.stdout
    assert DB_PASSWORD not in result.output


# --- run --config -----------------------------------------------------------------------------------------


def test_run_with_a_broken_config_exits_1_with_the_problems(cli: Cli, pki: Pki, tmp_path: Path) -> None:
    (tmp_path / "broken.yaml").write_text(
        f"""\
listen:
  port: 0
tls:
  cert: pki/server.pem
  key: pki/nope.key
  client_ca: pki/ca.pem
roles:
  cashier:
routes:
  pos:
    host: db.example.internal
    user: pos_proxy
    password: {DB_PASSWORD}
    sslmode: verify-full
""",
        encoding="utf-8",
    )

    result = cli.fails("run", "--config", "broken.yaml", timeout=30)

    assert "invalid configuration broken.yaml" in result.stderr
    for path in ("listen.port", "tls.key", "routes.pos.password", "routes.pos.sslrootcert"):
        assert f"{path}: " in result.stderr, path
    assert DB_PASSWORD not in result.output


def test_run_with_a_missing_config_file(cli: Cli, tmp_path: Path) -> None:
    result = cli.fails("run", "--config", "missing.yaml", timeout=30)
    assert f"file not found: {tmp_path / 'missing.yaml'}" in result.stderr


def test_run_serves_and_stops_cleanly_on_sigterm(
    start_cli: StartCli, valid_config: ValidConfig, tmp_path: Path
) -> None:
    port = free_port()
    valid_config.path.write_text(valid_config_text(port), encoding="utf-8")
    proc = start_cli("run", "--config", valid_config.path, env=valid_config.env)

    wait_for_port(port, proc)

    assert stop_process(proc, signal.SIGTERM) == 0
    assert proc.stdout is not None
    log = proc.stdout.read() + (tmp_path / "stderr.txt").read_text(encoding="utf-8")
    assert '"event": "listening"' in log
    assert DB_PASSWORD not in log


def test_sighup_as_advised_by_certs_revoke_does_not_kill_the_proxy(
    cli: Cli, start_cli: StartCli, valid_config: ValidConfig
) -> None:
    port = free_port()
    valid_config.path.write_text(valid_config_text(port), encoding="utf-8")
    issued = cli.ok(
        "certs", "issue-terminal", "--dir", "pki", "--store", "s1", "--terminal", "t1", "--role", "cashier"
    )
    proc = start_cli("run", "--config", valid_config.path, env=valid_config.env)
    wait_for_port(port, proc)

    revoked = cli.ok("certs", "revoke", "--dir", "pki", "--serial", issued.stdout.strip())
    assert "SIGHUP" in revoked.stderr
    proc.send_signal(signal.SIGHUP)

    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=3)
    assert proc.poll() is None, f"the proxy died on SIGHUP (exit {proc.returncode})"
    wait_for_port(port, proc)
    assert stop_process(proc, signal.SIGTERM) == 0
