"""Run the drivers' own test suites against PostgreSQL directly and through the proxy.

For each selected suite and endpoint (direct, session, transaction), one run at a time: starts a
fresh throwaway PostgreSQL 15 (TLS only, SCRAM) and, for session and transaction, a proxy in
that pool mode in front of it (one terminal certificate whose role has no SQL policy), runs the
suite against it, and at the end prints a table of passed / failed / skipped with every test
whose outcome differs from direct.

    .venv/bin/python bench/compat/run.py                                 # all suites, all endpoints
    .venv/bin/python bench/compat/run.py --suites pg8000 --endpoints direct session
    .venv/bin/python bench/compat/run.py --source asyncpg=/path/to/asyncpg-checkout

Not part of `make test`: the suites take minutes and need their own test dependencies, which
live in a separate virtualenv (--suite-python, see bench/compat/README.md).  The suites' code is
never copied into this repository: each is read from a checkout (--source NAME=DIR or the env
var COMPAT_<NAME>_SRC) or exported with `git archive <pinned tag>` from a git directory
(--git-dir NAME=DIR, or a mirror under --mirrors / COMPAT_MIRRORS laid out as owner+name/repo).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Final

COMPAT_DIR: Final = Path(__file__).resolve().parent
REPO_ROOT: Final = COMPAT_DIR.parents[1]
PLUGINS_DIR: Final = COMPAT_DIR / "plugins"
sys.path.insert(0, str(REPO_ROOT))
# The proxies are started with `python -m proxy`: they must import this tree's package.
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))

from proxy import certs  # noqa: E402
from proxy.localpg import LocalPostgres, LocalPostgresError, LocalPostgresTLS  # noqa: E402
from tests.integration.proxyproc import ProxyProcess, TerminalPKI, proxy_config  # noqa: E402

ENDPOINTS: Final = ("direct", "session", "transaction")
DATABASE: Final = "postgres"  # what the suites connect to by default
# The databases the suites create and then connect to (asyncpg's test_cache_invalidation and
# test_introspection, pg8000's scram tests): the proxy gets a route for each, with the same
# upstream, as a deployment routes every database its terminals use.  A route to a database that
# does not exist yet costs nothing until a client connects (then the server's 3D000 is passed
# on).  Names the suites expect not to exist (`nosuchdb`, `missing-db`) have no route: the
# proxy answers 3D000 itself.  The suites drop these databases right after their clients
# disconnect; the server waits 5 s for other sessions before DROP DATABASE fails with 55006, so
# these routes close idle server connections after 1 s (what an operator does with `pos-proxy
# admin close-idle ROUTE` before dropping a routed database).
SCRATCH_DATABASES: Final = ("testdb", "asyncpg_intro_test", "pg8000_scram_sha_256")
SCRATCH_IDLE_TIMEOUT: Final = "1s"
DB_USER: Final = "postgres"  # the suites create roles, databases and extensions: a superuser
DEFAULT_SUITE_PYTHON: Final = Path("/work/compat-venv/bin/python")
DEFAULT_MIRRORS: Final = Path("/work/.mirror")


@dataclass(frozen=True, slots=True)
class Suite:
    """One driver's test suite at a pinned tag, and how to run it."""

    name: str
    repo: str  # owner/name on GitHub
    tag: str
    distribution: str  # the installed package the tag should match
    paths: tuple[str, ...]  # what to export from the tag: the tests and the pytest config only,
    # never the driver's own source, so the tests run against the installed (compiled) driver
    pytest_args: tuple[str, ...]
    timeout: float  # seconds for one whole run


SUITES: Final = {
    suite.name: suite
    for suite in (
        Suite(
            name="asyncpg",
            repo="MagicStack/asyncpg",
            tag="v0.31.0",
            distribution="asyncpg",
            paths=("tests", "pyproject.toml"),
            # tests that manage their own clusters skip themselves when PGHOST is set
            pytest_args=("-p", "no:cacheprovider", "-p", "no:asyncio", "tests"),
            timeout=1500,
        ),
        Suite(
            name="psycopg",
            repo="psycopg/psycopg",
            tag="3.3.4",
            distribution="psycopg",
            paths=("tests", "pyproject.toml", "tools/pproxy_fix.py"),  # its proxy tests run the last
            # its conftest stores a segfault marker in pytest's cache: keep the cache provider,
            # but in the run's own directory; it uses anyio, not pytest-asyncio.  Left out to fit
            # three runs in half an hour on two shared cores: tests marked slow or timing, the
            # pool package's tests, CockroachDB's, mypy's, and the largest value-adaptation
            # modules (dumpers and loaders of psycopg's own, one query each, no protocol path
            # the other tests do not take)
            pytest_args=(
                "-p",
                "no:asyncio",
                "-p",
                "no:randomly",
                "-m",
                "not slow and not timing",
                *(
                    f"--ignore=tests/{path}"
                    for path in (
                        "pool",
                        "crdb",
                        "test_typing.py",
                        "types/test_datetime.py",
                        "types/test_numeric.py",
                        "types/test_range.py",
                        "types/test_multirange.py",
                        "types/test_json.py",
                        "types/test_enum.py",
                    )
                ),
                "tests",
            ),
            timeout=1200,
        ),
        Suite(
            name="pg8000",
            repo="tlocke/pg8000",
            tag="1.31.4",
            distribution="pg8000",
            paths=("test", "README.md"),
            # compat_pg8000 gives its connections TLS and the database (its conftest has no env
            # var for either); benchmarks are skipped as the project's own CI does not time them
            pytest_args=("-p", "no:cacheprovider", "-p", "compat_pg8000", "--benchmark-disable", "test"),
            timeout=900,
        ),
    )
}


@dataclass(frozen=True, slots=True)
class Endpoint:
    """Where a suite connects, in libpq's terms."""

    name: str
    port: int
    ca: Path
    cert: Path | None
    key: Path | None
    password: str

    def libpq(self) -> dict[str, str]:
        values = {
            "host": "127.0.0.1",
            "port": str(self.port),
            "dbname": DATABASE,
            "user": DB_USER,
            "password": self.password,
            "sslmode": "verify-full",
            "sslrootcert": str(self.ca),
        }
        if self.cert is not None and self.key is not None:
            values.update(sslcert=str(self.cert), sslkey=str(self.key))
        return values

    def environment(self) -> dict[str, str]:
        """The PG* variables libpq, asyncpg and the pg8000 plugin read, plus psycopg's test DSN."""
        libpq = self.libpq()
        names = {
            "host": "PGHOST",
            "port": "PGPORT",
            "dbname": "PGDATABASE",
            "user": "PGUSER",
            "password": "PGPASSWORD",
            "sslmode": "PGSSLMODE",
            "sslrootcert": "PGSSLROOTCERT",
            "sslcert": "PGSSLCERT",
            "sslkey": "PGSSLKEY",
        }
        env = {names[key]: value for key, value in libpq.items()}
        env["PSYCOPG_TEST_DSN"] = " ".join(f"{key}={value}" for key, value in libpq.items())
        return env


@dataclass(slots=True)
class TestOutcome:
    outcome: str  # passed, failed, skipped
    message: str = ""


@dataclass(slots=True)
class RunResult:
    suite: str
    endpoint: str
    seconds: float
    returncode: int | None
    timed_out: bool
    passed: int = 0
    failed: int = 0
    skipped: int = 0
    tests: dict[str, TestOutcome] = field(default_factory=dict)


# ----------------------------------------------------------------------------- sources


def parse_pairs(values: Sequence[str], option: str) -> dict[str, Path]:
    pairs: dict[str, Path] = {}
    for value in values:
        name, sep, path = value.partition("=")
        if not sep or name not in SUITES:
            raise SystemExit(f"{option} wants NAME=PATH with NAME one of {sorted(SUITES)}: {value!r}")
        pairs[name] = Path(path).expanduser().resolve()
    return pairs


def locate_source(
    suite: Suite, checkouts: Mapping[str, Path], git_dirs: Mapping[str, Path], mirrors: Path, scratch: Path
) -> Path:
    """A directory holding the suite's tests at its pinned tag (a checkout is used as it is)."""
    checkout = checkouts.get(suite.name) or os.environ.get(f"COMPAT_{suite.name.upper()}_SRC")
    if checkout:
        return Path(checkout)
    git_dir = git_dirs.get(suite.name) or mirrors / suite.repo.replace("/", "+") / "repo"
    if not git_dir.is_dir():
        raise SystemExit(
            f"no source for {suite.name}: pass --source {suite.name}=CHECKOUT or --git-dir "
            f"{suite.name}=GIT_DIR (a clone of https://github.com/{suite.repo})"
        )
    target = scratch / f"{suite.name}-{suite.tag}"
    target.mkdir(parents=True)
    archive = subprocess.run(
        ["git", f"--git-dir={git_dir}", "archive", "--format=tar", suite.tag, *suite.paths],
        check=True,
        capture_output=True,
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(target)], input=archive, check=True)
    return target


def installed_version(python: Path, distribution: str) -> str:
    result = subprocess.run(
        [str(python), "-c", f"import importlib.metadata as m; print(m.version({distribution!r}))"],
        capture_output=True,
        text=True,
        check=False,
    )
    return result.stdout.strip() or "not installed"


# ----------------------------------------------------------------------------- servers


@dataclass(frozen=True, slots=True)
class DatabaseFacts:
    """What proxy_config reads from a test cluster."""

    port: int
    ca: Path
    user: str = DB_USER


@contextlib.contextmanager
def running_endpoint(work: Path, endpoint: str, pool_size: int, logs: Path) -> Iterator[Endpoint]:
    """A fresh PostgreSQL 15 and, unless ``endpoint`` is direct, a proxy in that pool mode in front
    of it; their logs are copied into ``logs`` when they stop.  Fresh for every run, so that what
    one suite or endpoint leaves behind (tables, databases, prepared transactions) cannot change
    the next one's outcome."""
    work.mkdir(parents=True)
    db_pki = work / "db-pki"
    db_ca = certs.init_ca(db_pki, common_name="pos-db-proxy compat database CA")
    db_cert = certs.issue_server(db_pki, dns_names=["localhost"], ip_addresses=["127.0.0.1", "::1"])
    password = secrets.token_urlsafe(18)
    password_file = work / "db-password"
    password_file.touch(mode=0o600)
    password_file.write_text(password + "\n", encoding="utf-8")
    server = LocalPostgres(
        work / "pg",
        tls=LocalPostgresTLS(cert=db_cert.cert_path, key=db_cert.key_path, ca=db_ca),
        superuser_password=password,
        # the suites' pools and the proxy's; prepared transactions for the two-phase-commit
        # tests (psycopg's tpc, asyncpg's); jit off as asyncpg's own test cluster has it
        settings={"max_connections": "400", "max_prepared_transactions": "10", "jit": "off"},
    )
    proxy: ProxyProcess | None = None
    server.start()
    try:
        if endpoint == "direct":
            yield Endpoint("direct", server.port, db_ca, None, None, password)
            return
        pki = TerminalPKI.create(work / "terminal-pki")
        config = proxy_config(pki, DatabaseFacts(server.port, db_ca), password_file)
        route = config["routes"].pop("pos")
        route["pool"] = {
            **route["pool"],
            "mode": endpoint,
            "size": pool_size,
            "min_idle": 0,
            "max_client_wait": "30s",
            "idle_transaction_timeout": "10m",
        }
        scratch_pool = {**route["pool"], "server_idle_timeout": SCRATCH_IDLE_TIMEOUT}
        config["routes"] = {
            DATABASE: route,
            **{name: {**route, "dbname": name, "pool": scratch_pool} for name in SCRATCH_DATABASES},
        }
        config["listen"]["max_message_size"] = "256MiB"
        proxy = ProxyProcess(work / "proxy", config, ["--log-level", "warning"])
        proxy.start()
        yield Endpoint(endpoint, proxy.port, pki.ca, pki.cashier.cert, pki.cashier.key, password)
    finally:
        if proxy is not None:
            proxy.stop(check=False)
            shutil.copyfile(proxy.log_path, logs / "proxy.log")
            try:
                proxy.check_log()
            except AssertionError as problem:  # a finding to report, not a reason to stop
                print(f"warning: {problem}", file=sys.stderr)
        with contextlib.suppress(OSError, LocalPostgresError):
            shutil.copyfile(server.log_path, logs / "postgres.log")
        server.stop()


# ----------------------------------------------------------------------------- runs


def run_suite(
    suite: Suite,
    source: Path,
    endpoint: Endpoint,
    *,
    python: Path,
    out: Path,
    test_timeout: int,
    extra: Sequence[str] = (),
) -> RunResult:
    out.mkdir(parents=True, exist_ok=True)
    junit = out / "junit.xml"
    junit.unlink(missing_ok=True)
    command = [
        str(python),
        "-m",
        "pytest",
        f"--junitxml={junit}",
        "-o",
        "junit_family=xunit1",
        f"--timeout={test_timeout}",
        "-q",
        "-rN",
        *extra,
        *suite.pytest_args,
    ]
    if "no:cacheprovider" not in suite.pytest_args:
        cache = ["-o", f"cache_dir={out / 'pytest-cache'}"]
        command[-len(suite.pytest_args) : -len(suite.pytest_args)] = cache
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("PG", "PSYCOPG"))},
        **endpoint.environment(),
        "PYTHONPATH": str(PLUGINS_DIR),
        "PYTHONDONTWRITEBYTECODE": "1",
    }
    started = time.monotonic()
    timed_out = False
    with (out / "pytest.log").open("wb") as log:
        process = subprocess.Popen(
            command, cwd=source, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            process.wait(suite.timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
            # SIGINT first: pytest then still writes the junit file for what ran
            os.killpg(process.pid, signal.SIGINT)
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
    result = RunResult(suite.name, endpoint.name, time.monotonic() - started, process.returncode, timed_out)
    if junit.exists():
        result.tests = read_junit(junit)
    for outcome in result.tests.values():
        setattr(result, outcome.outcome, getattr(result, outcome.outcome) + 1)
    return result


def read_junit(path: Path) -> dict[str, TestOutcome]:
    tests: dict[str, TestOutcome] = {}
    for case in ET.parse(path).getroot().iter("testcase"):
        test_id = f"{case.get('classname', '')}::{case.get('name', '')}"
        outcome = TestOutcome("passed")
        for child in case:
            if child.tag in ("failure", "error"):
                # an error in teardown after a pass still counts as a failure, as pytest does
                text = child.get("message") or (child.text or "").strip().splitlines()[-1:] or [""]
                message = text if isinstance(text, str) else text[0]
                outcome = TestOutcome("failed", " ".join(message.split())[:400])
                break
            if child.tag == "skipped":
                outcome = TestOutcome("skipped", " ".join((child.get("message") or "").split())[:200])
        tests[test_id] = outcome
    return tests


def differences(direct: RunResult, other: RunResult) -> list[tuple[str, str, str, str]]:
    """(test id, outcome direct, outcome here, message here) for every test that did not end as it
    did against the database."""
    found = []
    for test_id, outcome in sorted(other.tests.items()):
        expected = direct.tests.get(test_id)
        expected_outcome = expected.outcome if expected else "absent"
        if outcome.outcome != expected_outcome:
            found.append((test_id, expected_outcome, outcome.outcome, outcome.message))
    if not (direct.timed_out or other.timed_out):  # else only the tests both runs reached count
        missing = sorted(set(direct.tests) - set(other.tests))
        found += [(test_id, direct.tests[test_id].outcome, "absent", "") for test_id in missing]
    elif direct.timed_out:
        found = [entry for entry in found if entry[1] != "absent"]
    return found


def render(results: Sequence[RunResult], versions: Mapping[str, str]) -> str:
    lines = [
        "| suite | endpoint | passed | failed | skipped | seconds |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for result in results:
        note = " (timed out)" if result.timed_out else ""
        lines.append(
            f"| {result.suite} {versions.get(result.suite, '')} | {result.endpoint}{note} | {result.passed} "
            f"| {result.failed} | {result.skipped} | {result.seconds:.0f} |"
        )
    by_key = {(r.suite, r.endpoint): r for r in results}
    for result in results:
        direct = by_key.get((result.suite, "direct"))
        if result.endpoint == "direct" or direct is None:
            continue
        diff = differences(direct, result)
        title = f"{result.suite}, {result.endpoint}: {len(diff)} tests end otherwise than direct"
        lines += ["", f"### {title}", ""]
        lines += [f"- `{t}`: {was} -> {now}: {msg}" for t, was, now, msg in diff]
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--suites", nargs="+", choices=sorted(SUITES), default=list(SUITES))
    parser.add_argument("--endpoints", nargs="+", choices=ENDPOINTS, default=list(ENDPOINTS))
    parser.add_argument("--source", action="append", default=[], metavar="NAME=DIR", help="a checkout")
    parser.add_argument(
        "--git-dir", action="append", default=[], metavar="NAME=DIR", help="a clone to git-archive"
    )
    parser.add_argument(
        "--mirrors", type=Path, default=Path(os.environ.get("COMPAT_MIRRORS", DEFAULT_MIRRORS))
    )
    parser.add_argument(
        "--suite-python",
        type=Path,
        default=Path(os.environ.get("COMPAT_PYTHON", DEFAULT_SUITE_PYTHON)),
        help="python of the virtualenv holding the drivers and their test dependencies",
    )
    parser.add_argument("--output", type=Path, default=COMPAT_DIR / "results" / "latest")
    parser.add_argument(
        "--pytest-arg",
        action="append",
        default=[],
        metavar="ARG",
        help="passed on to every suite's pytest, e.g. --pytest-arg=-k --pytest-arg=notify",
    )
    parser.add_argument("--pool-size", type=int, default=80)
    parser.add_argument("--test-timeout", type=int, default=60, help="seconds for one test (pytest-timeout)")
    args = parser.parse_args(argv)

    checkouts = parse_pairs(args.source, "--source")
    git_dirs = parse_pairs(args.git_dir, "--git-dir")
    suites = [SUITES[name] for name in args.suites]
    endpoints = [name for name in ENDPOINTS if name in args.endpoints or name == "direct"]
    args.output.mkdir(parents=True, exist_ok=True)
    versions: dict[str, str] = {}
    for suite in suites:
        installed = installed_version(args.suite_python, suite.distribution)
        versions[suite.name] = installed
        if installed != suite.tag.lstrip("v"):
            print(f"warning: {suite.name} {installed} installed, tests from tag {suite.tag}", file=sys.stderr)

    results: list[RunResult] = []
    with tempfile.TemporaryDirectory(prefix="pos-compat-") as scratch:
        work = Path(scratch)
        os.chmod(work, 0o755)  # the server runs as the postgres OS user when we are root
        sources = {s.name: locate_source(s, checkouts, git_dirs, args.mirrors, work / "src") for s in suites}
        for suite in suites:
            for name in endpoints:
                print(f"{datetime.now(UTC):%H:%M:%S} {suite.name} -> {name}", file=sys.stderr, flush=True)
                out = args.output / f"{suite.name}-{name}"
                out.mkdir(parents=True, exist_ok=True)
                with running_endpoint(
                    work / f"servers-{suite.name}-{name}", name, args.pool_size, out
                ) as endpoint:
                    result = run_suite(
                        suite,
                        sources[suite.name],
                        endpoint,
                        python=args.suite_python,
                        out=out,
                        test_timeout=args.test_timeout,
                        extra=args.pytest_arg,
                    )
                results.append(result)
                print(
                    f"  passed {result.passed} failed {result.failed} skipped {result.skipped}"
                    f" in {result.seconds:.0f}s{' (timed out)' if result.timed_out else ''}",
                    file=sys.stderr,
                    flush=True,
                )
                (args.output / "results.json").write_text(
                    json.dumps({"versions": versions, "runs": [asdict(r) for r in results]}, indent=1),
                    encoding="utf-8",
                )
                (args.output / "summary.md").write_text(render(results, versions), encoding="utf-8")
    print(render(results, versions))
    return 0


if __name__ == "__main__":
    sys.exit(main())
