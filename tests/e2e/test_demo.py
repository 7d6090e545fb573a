"""``pos-proxy demo`` run as a user would: the sample session, the psql lines, cleanup, packaging."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import queue
import re
import shlex
import shutil
import signal
import site
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import pytest
from psycopg.conninfo import conninfo_to_dict

from tests.e2e.conftest import (
    REPO_ROOT,
    Cli,
    CliResult,
    StartCli,
    cli_env,
    free_port,
    stop_process,
)

pytestmark = pytest.mark.e2e

DEMO_TIMEOUT = 120.0
ROLES = {"cashier": "till-01", "manager": "office-01"}
WORKDIR_LINE = re.compile(r"pos-db-proxy demo, working in (?P<dir>/.+) \(removed on exit\)")
DATABASE_LINE = re.compile(r"started a throwaway PostgreSQL on (?P<host>[\d.]+):(?P<port>\d+) ")
PROXY_LINE = re.compile(r"proxy listening on (?P<host>[\d.]+):(?P<port>\d+) ")
ROLE_LINE = re.compile(r"  (?P<role>[a-z_]+) \((?P<store>[\w-]+)/(?P<terminal>[\w-]+)\):")


@dataclass(frozen=True, slots=True)
class DemoOutput:
    lines: list[str]

    @property
    def workdir(self) -> Path:
        match = WORKDIR_LINE.fullmatch(self.lines[0])
        assert match, f"first line should name the working directory: {self.lines[0]!r}"
        return Path(match["dir"])

    def port_of(self, pattern: re.Pattern[str]) -> int:
        matches = [m for m in map(pattern.match, self.lines) if m]
        assert len(matches) == 1, self.text
        return int(matches[0]["port"])

    @property
    def psql_lines(self) -> list[str]:
        return [line for line in self.lines if line.startswith("psql '")]

    def conninfo_by_role(self) -> dict[str, dict[str, str]]:
        """{role: libpq conninfo} from the "  role (store/terminal):" + "psql '...'" line pairs."""
        found: dict[str, dict[str, str]] = {}
        for previous, line in zip(self.lines, self.lines[1:], strict=False):
            if not line.startswith("psql '"):
                continue
            role = ROLE_LINE.fullmatch(previous)
            assert role, f"a psql line must follow its role line: {previous!r}"
            argv = shlex.split(line)
            assert len(argv) == 2, f"expected psql and one conninfo argument: {line!r}"
            assert argv[0] == "psql"
            assert role["role"] not in found, f"two psql lines for role {role['role']}"
            conninfo = conninfo_to_dict(argv[1])  # libpq's own syntax, as psql will read it
            assert conninfo["user"] == role["terminal"]
            found[role["role"]] = {k: str(v) for k, v in conninfo.items()}
        return found

    @property
    def text(self) -> str:
        return "\n".join(self.lines)


def check_sample_session_and_psql_lines(output: DemoOutput) -> dict[str, dict[str, str]]:
    text = output.text
    assert re.search(r"^  recorded sale \d+: 2 x ", text, re.MULTILINE), text
    # The database stopped and started again under a waiting till: the sale went through.
    outage = r"^outage: .* the waiting sale went through as sale \d+, no error"
    assert re.search(outage, text, re.MULTILINE), text
    assert re.search(r"^  read back: sale \d+ total ", text, re.MULTILINE), text

    proxy_port = output.port_of(PROXY_LINE)
    assert len(output.psql_lines) == len(ROLES), text
    by_role = output.conninfo_by_role()
    assert set(by_role) == set(ROLES)
    for role, conninfo in by_role.items():
        assert conninfo["host"] == "127.0.0.1"
        assert conninfo["port"] == str(proxy_port)
        assert conninfo["dbname"] == "pos"
        assert conninfo["sslmode"] == "verify-full"
        assert conninfo["user"] == ROLES[role]
        for key in ("sslrootcert", "sslcert", "sslkey"):
            path = Path(conninfo[key])
            assert path.is_absolute(), (key, path)
            assert path.is_relative_to(output.workdir), (key, path)
    return by_role


# --- /proc inspection -------------------------------------------------------------------------------------


def _read_proc(pid: str, name: str) -> bytes | None:
    try:
        return Path(f"/proc/{pid}/{name}").read_bytes()
    except OSError:  # gone, or not ours to read
        return None


def is_alive(pid: int) -> bool:
    """Running and not a zombie (a container's PID 1 may never reap orphans)."""
    stat = _read_proc(str(pid), "stat")
    if stat is None:
        return False
    return stat.rsplit(b")", 1)[1].split()[0] != b"Z"


def pids_mentioning(text: str) -> list[int]:
    """Live processes whose command line contains ``text``."""
    needle = text.encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        cmdline = _read_proc(entry.name, "cmdline")
        if cmdline and needle in cmdline.replace(b"\0", b" ") and is_alive(int(entry.name)):
            found.append(int(entry.name))
    return found


def find_postmaster(port: int) -> tuple[int, Path] | None:
    """(pid, data directory) of the postmaster listening on ``port``, from its postmaster.pid."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        cmdline = _read_proc(entry.name, "cmdline")
        if not cmdline:
            continue
        argv = cmdline.split(b"\0")
        if not argv[0].endswith(b"postgres") or b"-D" not in argv[:-1]:
            continue
        datadir = Path(os.fsdecode(argv[argv.index(b"-D") + 1]))
        try:
            pidfile = (datadir / "postmaster.pid").read_text().splitlines()
        except OSError:
            continue
        if len(pidfile) > 3 and pidfile[0] == entry.name and pidfile[3].strip() == str(port):
            return int(entry.name), datadir
    return None


def wait_until(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"still waiting after {timeout:.0f}s: {what}")
        time.sleep(0.2)


class LineReader:
    """Reads a pipe on a thread so the test can wait for lines with a deadline."""

    def __init__(self, stream: IO[str]) -> None:
        self.lines: list[str] = []
        self._queue: queue.Queue[str | None] = queue.Queue()
        self._thread = threading.Thread(target=self._pump, args=(stream,), daemon=True)
        self._thread.start()

    def _pump(self, stream: IO[str]) -> None:
        for line in stream:
            self._queue.put(line.rstrip("\n"))
        self._queue.put(None)

    def until(self, predicate: Callable[[list[str]], bool], timeout: float) -> list[str]:
        deadline = time.monotonic() + timeout
        while not predicate(self.lines):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                pytest.fail("timed out waiting for the demo; it printed:\n" + "\n".join(self.lines))
            try:
                line = self._queue.get(timeout=remaining)
            except queue.Empty:
                continue
            if line is None:
                pytest.fail("the demo closed its output early; it printed:\n" + "\n".join(self.lines))
            self.lines.append(line)
        return self.lines

    def rest(self, timeout: float) -> list[str]:
        self._thread.join(timeout)
        while True:
            try:
                line = self._queue.get_nowait()
            except queue.Empty:
                return self.lines
            if line is not None:
                self.lines.append(line)


# --- tests ------------------------------------------------------------------------------------------------


def run_demo_no_wait(cli: Cli, env: dict[str, str] | None = None) -> CliResult:
    result = cli.ok("demo", "--port", "0", "--no-wait", env=env, timeout=DEMO_TIMEOUT)
    assert result.stderr == "", result.describe()
    return result


@pytest.mark.timeout(DEMO_TIMEOUT + 30)
def test_demo_no_wait_runs_the_sample_session_and_prints_psql_lines(cli: Cli, pg_bindir: Path) -> None:
    started = time.monotonic()
    result = run_demo_no_wait(cli)
    assert time.monotonic() - started < DEMO_TIMEOUT

    output = DemoOutput(result.stdout.splitlines())
    check_sample_session_and_psql_lines(output)
    assert output.lines[-1] == "stopping the proxy and the demo database"
    assert not output.workdir.exists(), "the demo must remove its working directory"
    assert pids_mentioning(str(output.workdir)) == []


@pytest.mark.timeout(DEMO_TIMEOUT + 30)
def test_demo_psql_lines_survive_a_tmpdir_with_a_space(cli: Cli, pg_bindir: Path, tmp_path: Path) -> None:
    tmpdir = tmp_path / "temp dir"
    tmpdir.mkdir()
    result = run_demo_no_wait(cli, env={"TMPDIR": str(tmpdir)})

    output = DemoOutput(result.stdout.splitlines())
    assert output.workdir.is_relative_to(tmpdir)
    by_role = check_sample_session_and_psql_lines(output)
    assert by_role["cashier"]["sslrootcert"] == str(output.workdir / "pki" / "ca.pem")


@pytest.mark.timeout(DEMO_TIMEOUT + 60)
def test_demo_serves_psql_until_sigterm_then_cleans_up(start_cli: StartCli, pg_bindir: Path) -> None:
    psql = shutil.which("psql")
    if psql is None:
        pytest.skip("psql (PostgreSQL client) is not installed")
    proc = start_cli("demo", "--port", str(free_port()))
    assert proc.stdout is not None
    reader = LineReader(proc.stdout)

    lines = reader.until(
        lambda lines: any(line.startswith("press Ctrl-C") for line in lines), timeout=DEMO_TIMEOUT
    )
    output = DemoOutput(lines)
    by_role = check_sample_session_and_psql_lines(output)
    workdir = output.workdir
    assert workdir.is_dir()
    postmaster = find_postmaster(output.port_of(DATABASE_LINE))
    assert postmaster is not None, "cannot find the demo's PostgreSQL among the running processes"
    postmaster_pid, datadir = postmaster

    # The cashier line, exactly as printed, with the user's own psql.
    cashier_line = next(line for line in output.psql_lines if "user=till-01 " in line)
    _, conninfo = shlex.split(cashier_line)
    assert by_role["cashier"] == {k: str(v) for k, v in conninfo_to_dict(conninfo).items()}
    env = {k: v for k, v in cli_env().items() if not k.startswith("PG")}
    env["PGCONNECT_TIMEOUT"] = "10"
    query = subprocess.run(
        [psql, conninfo, "-X", "-A", "-t", "-c", "SELECT count(*) FROM products"],
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert query.returncode == 0, query.stderr
    assert query.stdout.strip() == "5"

    assert stop_process(proc, signal.SIGTERM) == 0
    rest = reader.rest(timeout=10)
    assert rest[-1] == "stopping the proxy and the demo database"
    assert not workdir.exists(), f"{workdir} was left behind"
    wait_until(lambda: not is_alive(postmaster_pid), 15, f"the demo's postmaster {postmaster_pid} to exit")
    wait_until(lambda: not datadir.exists(), 15, f"{datadir} to be removed")
    wait_until(
        lambda: pids_mentioning(str(workdir)) == [] and pids_mentioning(str(datadir)) == [],
        15,
        "processes started by the demo to exit",
    )


def _printed(lines: list[str], prefix: str) -> str:
    matches = [line.removeprefix(prefix) for line in lines if line.startswith(prefix)]
    assert len(matches) == 1, f"expected one line starting {prefix!r}:\n" + "\n".join(lines)
    return matches[0]


@pytest.mark.timeout(DEMO_TIMEOUT + 60)
def test_demo_prints_a_verify_command_that_fails_once_the_newest_audit_records_are_cut(
    start_cli: StartCli, pg_bindir: Path
) -> None:
    proc = start_cli("demo", "--port", str(free_port()))
    assert proc.stdout is not None
    reader = LineReader(proc.stdout)
    lines = reader.until(
        lambda lines: any(line.startswith("press Ctrl-C") for line in lines), timeout=DEMO_TIMEOUT
    )
    # The verify command as printed, run the way the installed pos-proxy script would run it.
    command = shlex.split(_printed(lines, "check the audit log: "))
    assert command[:3] == ["pos-proxy", "audit", "verify"] and "--witness" in command
    argv = [sys.executable, "-m", "proxy", *command[1:]]
    log = Path(command[-1])

    def verify() -> subprocess.CompletedProcess[str]:
        return subprocess.run(argv, env=cli_env(), capture_output=True, text=True, timeout=60, check=False)

    # The demo's records are all written and checkpointed within a flush interval or two.
    wait_until(lambda: verify().returncode == 0, 10, "the demo's audit log to verify")
    assert "reaches the witness's seq" in verify().stdout
    kept = log.read_bytes().splitlines(keepends=True)[:-2]
    with log.open("r+b") as file:  # the newest two records removed in place
        file.truncate(sum(map(len, kept)))
    cut = verify()
    assert cut.returncode == 1, cut.stdout + cut.stderr
    assert "cut tail: the log ends at seq " in cut.stdout
    assert "2 newest record(s) missing" in cut.stdout

    # The admin API line, as printed, with the user's own curl: the token goes along.
    curl = _printed(lines, "call the admin API: ")
    if shutil.which("curl") is not None:
        called = subprocess.run(
            ["bash", "-c", curl], env=cli_env(), capture_output=True, text=True, timeout=30, check=False
        )
        assert called.returncode == 0, called.stderr
        assert [pool["name"] for pool in json.loads(called.stdout)["pools"]] == ["pos"], called.stdout
    url = shlex.split(curl)[-1]
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(url, timeout=10)  # without the token
    assert refused.value.code == 401
    assert stop_process(proc, signal.SIGTERM) == 0
    reader.rest(timeout=10)


@pytest.mark.timeout(DEMO_TIMEOUT + 30)
def test_demo_on_a_busy_port_fails_cleanly(cli: Cli, pg_bindir: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = cli.fails("demo", "--port", str(port), "--no-wait", timeout=DEMO_TIMEOUT)

    assert f"is port {port} free? pick another with --port N" in result.stderr
    output = DemoOutput(result.stdout.splitlines())
    assert not output.workdir.exists()
    database_port = output.port_of(DATABASE_LINE)
    wait_until(lambda: find_postmaster(database_port) is None, 15, "the demo's PostgreSQL to stop")


# --- packaging --------------------------------------------------------------------------------------------


def _copy_source_tree(destination: Path) -> Path:
    """The repository as a user would download it: no venv, VCS data, caches or build output."""
    ignore = shutil.ignore_patterns(
        ".git", ".venv", "venv", "build", "dist", "*.egg-info", "__pycache__", ".*_cache", ".hypothesis"
    )
    shutil.copytree(REPO_ROOT, destination, ignore=ignore, symlinks=True)
    return destination


def _build_requirements_installed() -> bool:
    """Whether pyproject's build backend (setuptools>=68 and wheel support) is importable here."""
    try:
        version_text = importlib.metadata.version("setuptools")
    except importlib.metadata.PackageNotFoundError:
        return False
    version = tuple(int(part) for part in re.findall(r"\d+", version_text)[:2])
    if version < (68, 0):
        return False
    # bdist_wheel moved into setuptools in 70.1; before that it came from the wheel package.
    return version >= (70, 1) or importlib.util.find_spec("wheel") is not None


@pytest.mark.timeout(300)
def test_pip_install_from_a_source_copy_ships_the_demo(pg_bindir: Path, tmp_path: Path) -> None:
    source = _copy_source_tree(tmp_path / "pos-db-proxy")
    venv = tmp_path / "venv"
    subprocess.run(
        [sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(venv)],
        check=True,
        timeout=120,
        cwd=tmp_path,
    )
    # The runtime dependencies (and pip) are installed in the environment running this test, which
    # need not be the system site: reuse it by path. A plain path line in a .pth file does not run
    # that site's own .pth files, so the editable install of this repo stays out of the new venv.
    (site_packages,) = (venv / "lib").glob("python3*/site-packages")
    (site_packages / "_e2e_reuse_test_env.pth").write_text(
        "\n".join(site.getsitepackages()) + "\n", encoding="utf-8"
    )
    python = venv / "bin" / "python"
    env = cli_env({"PIP_NO_INPUT": "1", "PIP_DISABLE_PIP_VERSION_CHECK": "1"})
    # Offline when the build backend is at hand; otherwise pip fetches it (build isolation).
    isolation = ["--no-build-isolation"] if _build_requirements_installed() else []
    install = subprocess.run(
        [str(python), "-m", "pip", "install", "--no-deps", *isolation, str(source)],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert install.returncode == 0, install.stdout + install.stderr

    assert installed_build(venv, env, site_packages) == "pure"
    run_installed_demo(venv, env)


@pytest.mark.timeout(600)
def test_compiled_pip_install_in_a_fresh_venv_runs_the_demo(pg_bindir: Path, tmp_path: Path) -> None:
    """What an operator runs: ``POS_PROXY_COMPILE=1 pip install .`` into an empty venv.  pip builds
    in isolation before it installs any dependency, so mypy must get them as build requirements."""
    source = _copy_source_tree(tmp_path / "pos-db-proxy")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120, cwd=tmp_path)
    (site_packages,) = (venv / "lib").glob("python3*/site-packages")
    env = cli_env({"PIP_NO_INPUT": "1", "PIP_DISABLE_PIP_VERSION_CHECK": "1", "POS_PROXY_COMPILE": "1"})
    install = subprocess.run(
        [str(venv / "bin" / "python"), "-m", "pip", "install", str(source)],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=540,
        check=False,
    )
    assert install.returncode == 0, install.stdout[-3000:] + install.stderr[-6000:]

    assert installed_build(venv, env, site_packages) == "mypyc"
    run_installed_demo(venv, env)


def installed_build(venv: Path, env: Mapping[str, str], site_packages: Path) -> str:
    """The build label of the proxy ``venv`` imports, after checking it is the installed copy."""
    where = subprocess.run(
        [
            str(venv / "bin" / "python"),
            "-c",
            "import proxy, proxy.metrics as m; print(proxy.__file__); print(m.build_labels()['build'])",
        ],
        env=env,
        cwd=venv.parent,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    location, build = where.stdout.split()
    assert Path(location).is_relative_to(site_packages), "must run the installed copy"
    return build


def run_installed_demo(venv: Path, env: Mapping[str, str]) -> None:
    demo = subprocess.run(
        [str(venv / "bin" / "pos-proxy"), "demo", "--port", "0", "--no-wait"],
        env=env,
        cwd=venv.parent,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=DEMO_TIMEOUT,
        check=False,
    )
    assert demo.returncode == 0, demo.stdout + demo.stderr
    check_sample_session_and_psql_lines(DemoOutput(demo.stdout.splitlines()))
