"""Benchmark pos-db-proxy against PgBouncer and a direct connection, from nothing, in one command.

Starts a throwaway PostgreSQL 15 (TLS), PgBouncer (transaction pooling, client certificates,
verified upstream TLS) and pos-db-proxy (the same), runs pgbench workloads against all three in
interleaved rounds, measures the memory an idle terminal connection costs the proxy and PgBouncer,
prints a table, writes JSON, and stops everything it started -- also on Ctrl-C.

    .venv/bin/python bench/run.py --quick           # smoke run, about 2 min (45 s: building proxy-mypyc)
    .venv/bin/python bench/run.py --duration 8 --rounds 3

See bench/README.md for what is measured and how to read it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import pwd
import re
import resource
import secrets
import shutil
import signal
import socket
import ssl
import statistics
import struct
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from importlib import resources
from pathlib import Path
from types import FrameType
from typing import Any, Final

import yaml

from proxy import certs
from proxy.localpg import LocalPostgres, LocalPostgresError, LocalPostgresTLS, find_pg_bindir, free_port

BENCH_DIR: Final = Path(__file__).resolve().parent
REPO_ROOT: Final = BENCH_DIR.parent
POS_SCRIPT: Final = BENCH_DIR / "pos_sale.sql"
DEFAULT_OUTPUT: Final = BENCH_DIR / "results" / "latest.json"
LOGS_ROOT: Final = BENCH_DIR / "results" / "logs"

ALL_CONFIGS: Final = (
    "direct",
    "pgbouncer",
    "lean",
    "proxy",
    "proxy-mypyc",
    "proxy-workers",
    "proxy-enforce",
    "proxy-full",
    "baseline-full",
)
DEFAULT_CONFIGS: Final = ("direct", "pgbouncer", "proxy", "proxy-mypyc")
# pos-db-proxy variants: plain; plain from the mypyc-compiled build (POS_PROXY_COMPILE=1, built
# by scripts/compiled-tree.sh); plain with --proxy-workers worker processes; + the cashier SQL
# policy in enforce mode; + audit log and admin/metrics; proxy-full run from the --baseline tree
# (an earlier commit's checkout), so a change's cost is measured in one interleaved run.
PROXY_VARIANTS: Final = (
    "proxy",
    "proxy-mypyc",
    "proxy-workers",
    "proxy-enforce",
    "proxy-full",
    "baseline-full",
)
FULL_VARIANTS: Final = ("proxy-full", "baseline-full")
# (column label, JSON key, numerator config, denominator config): ratios of median TPS.
RATIOS: Final = (
    ("proxy/pgb", "proxy_vs_pgbouncer", "proxy", "pgbouncer"),
    ("proxy/lean", "proxy_vs_lean", "proxy", "lean"),
    ("proxy/direct", "proxy_vs_direct", "proxy", "direct"),
    ("mypyc/pgb", "mypyc_vs_pgbouncer", "proxy-mypyc", "pgbouncer"),
    ("mypyc/proxy", "mypyc_vs_proxy", "proxy-mypyc", "proxy"),
    ("workers/proxy", "workers_vs_proxy", "proxy-workers", "proxy"),
    ("enforce/proxy", "enforce_vs_proxy", "proxy-enforce", "proxy"),
    ("full/proxy", "full_vs_proxy", "proxy-full", "proxy"),
    ("full/baseline", "full_vs_baseline", "proxy-full", "baseline-full"),
)
DB_NAME: Final = "pos"
DB_ROLE: Final = "bench"
STORE: Final = "bench"
TERMINAL: Final = "till-01"
TERMINAL_CN: Final = f"{STORE}-{TERMINAL}"  # what certs.issue_terminal puts in the subject CN
TERMINAL_ROLE: Final = "cashier"
PGBOUNCER_CANDIDATES: Final = ("/usr/sbin/pgbouncer", "/usr/bin/pgbouncer")
SERVICE_OS_USER: Final = "postgres"
CHURN_CLIENTS: Final = 16
POS_PRODUCTS: Final = 1000
POS_STORES: Final = 10
NOFILE_WANTED: Final = 8192
START_TIMEOUT: Final = 20.0
STOP_TIMEOUT: Final = 15.0
PGBENCH_GRACE: Final = 120.0  # on top of -T: connection set-up, churn, a stuck server
IDLE_HANDSHAKE_CONCURRENCY: Final = 32
IDLE_CONNECT_TIMEOUT: Final = 30.0
IDLE_TOTAL_TIMEOUT: Final = 300.0
IDLE_SETTLE_SECONDS: Final = 2.0
AUDIT_KEY_BYTES: Final = 32
UNSHARED_TERMINAL_CAP: Final = 100_000  # more than pgbench's clients: pgbench's terminal is every till
AUDIT_VERIFY_TIMEOUT: Final = 600.0
METRICS_TIMEOUT: Final = 10.0
# The tables the workloads touch: pgbench's (pgbench -S reads pgbench_accounts) and the POS demo's.
PGBENCH_TABLES: Final = ("pgbench_accounts", "pgbench_branches", "pgbench_tellers", "pgbench_history")
POS_READ_TABLES: Final = ("products",)
POS_WRITE_TABLES: Final = ("sales", "sale_items", "stock")
PGBOUNCER_PREPARED_NA: Final = "PgBouncer 1.18 has no protocol-level prepared statements in transaction mode"
LEAN_PREPARED_NA: Final = "bench/lean_pooler.py does not track prepared statements"


class BenchError(Exception):
    """Set-up failed in a way the benchmark cannot work around."""


# --------------------------------------------------------------------------- workloads


@dataclass(frozen=True, slots=True)
class Workload:
    name: str
    description: str
    args: tuple[str, ...]
    fixed_clients: tuple[int, ...] | None = None
    unsupported: Mapping[str, str] = field(default_factory=dict)

    def client_counts(self, requested: Sequence[int]) -> tuple[int, ...]:
        return self.fixed_clients if self.fixed_clients is not None else tuple(requested)


WORKLOADS: Final = {
    w.name: w
    for w in (
        Workload("select-extended", "pgbench -S, extended protocol", ("-S", "-M", "extended")),
        Workload(
            "select-prepared",
            "pgbench -S, named prepared statements",
            ("-S", "-M", "prepared"),
            unsupported={"pgbouncer": PGBOUNCER_PREPARED_NA, "lean": LEAN_PREPARED_NA},
        ),
        Workload(
            "pos-sale",
            "bench/pos_sale.sql: BEGIN; lookup; INSERT sale RETURNING; INSERT item; UPDATE stock; COMMIT",
            ("-M", "extended", "-f", str(POS_SCRIPT)),
        ),
        Workload(
            "churn",
            "pgbench -C -S: a new TLS connection per transaction",
            ("-C", "-S", "-M", "extended"),
            fixed_clients=(CHURN_CLIENTS,),
        ),
    )
}


# --------------------------------------------------------------------------- small helpers


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def raise_nofile_limit() -> int:
    """Raise the soft open-files limit towards NOFILE_WANTED (as far as the hard limit allows)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = NOFILE_WANTED if hard == resource.RLIM_INFINITY else min(NOFILE_WANTED, hard)
    if soft == resource.RLIM_INFINITY or soft >= wanted:
        return soft
    resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
    return wanted


_CLOCK_TICKS: Final = os.sysconf("SC_CLK_TCK")


def process_tree_cpu_seconds(pid: int) -> float:
    """User + system CPU time of ``pid`` and its live descendants (a supervisor's workers too)."""
    total, pending, seen = 0.0, [pid], set()
    while pending:
        current = pending.pop()
        if current in seen:
            continue
        seen.add(current)
        try:
            stat = Path(f"/proc/{current}/stat").read_text()
            tasks = list(Path(f"/proc/{current}/task").iterdir())
        except OSError:
            continue  # exited meanwhile
        # Fields after the command name, which may itself hold spaces: utime and stime are 14 and 15.
        fields = stat[stat.rindex(")") + 2 :].split()
        total += (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS
        for task in tasks:
            with contextlib.suppress(OSError):
                pending.extend(int(child) for child in (task / "children").read_text().split())
    return total


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise BenchError(f"no VmRSS for pid {pid}")


def client_env(extra: Mapping[str, str]) -> dict[str, str]:
    """The bench's environment without inherited PG* variables, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env["PGCONNECT_TIMEOUT"] = "10"
    env.update(extra)
    return env


def wait_for_port(port: int, process: subprocess.Popen[bytes], what: str, log_path: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise BenchError(f"{what} exited with {process.returncode}; see {log_path}:\n{tail(log_path)}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.05)
    raise BenchError(f"{what} did not listen on 127.0.0.1:{port} within {START_TIMEOUT:.0f}s; see {log_path}")


def stop_process(process: subprocess.Popen[bytes], what: str, sig: signal.Signals = signal.SIGTERM) -> None:
    if process.poll() is not None:
        return
    process.send_signal(sig)
    try:
        process.wait(STOP_TIMEOUT)
    except subprocess.TimeoutExpired:
        log(f"{what} (pid {process.pid}) ignored {sig.name} for {STOP_TIMEOUT:.0f}s: killing it")
        process.kill()
        process.wait(5)


def tail(path: Path, lines: int = 15) -> str:
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return "(no log)"
    return "\n".join(text.splitlines()[-lines:])


def command_version(argv: Sequence[str]) -> str:
    try:
        result = subprocess.run(list(argv), capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    text = (result.stdout or result.stderr).strip()
    return text.splitlines()[0] if text else "?"


def git_revision() -> str:
    """Read-only: the commit and whether the tree had local changes."""
    try:
        head = subprocess.run(
            ["git", "-C", str(REPO_ROOT), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(REPO_ROOT), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return f"{head}{'+local-changes' if dirty else ''}" if head else "unknown"


@dataclass(frozen=True, slots=True)
class ServiceUser:
    """Who PgBouncer runs as: the postgres OS user when we are root (it refuses root), else us."""

    uid: int
    gid: int
    switch: bool

    @classmethod
    def detect(cls) -> ServiceUser:
        if os.geteuid() != 0:
            return cls(os.geteuid(), os.getegid(), switch=False)
        try:
            entry = pwd.getpwnam(SERVICE_OS_USER)
        except KeyError:
            raise BenchError(f"running as root but there is no {SERVICE_OS_USER!r} OS user") from None
        return cls(entry.pw_uid, entry.pw_gid, switch=True)

    def own(self, path: Path, mode: int) -> None:
        os.chmod(path, mode)
        if self.switch:
            os.chown(path, self.uid, self.gid)


# --------------------------------------------------------------------------- set-up


@dataclass(frozen=True, slots=True)
class PKI:
    db_ca: Path
    db_cert: Path
    db_key: Path
    terminal_ca: Path
    terminal_crl: Path
    front_cert: Path  # server certificate of the proxy and of PgBouncer (issued by the terminal CA)
    front_key: Path
    terminal_cert: Path
    terminal_key: Path


def make_pki(directory: Path) -> PKI:
    db_dir = directory / "db-pki"
    db_ca = certs.init_ca(db_dir, common_name="pos-db-proxy bench database CA")
    db_server = certs.issue_server(db_dir, dns_names=["localhost"], ip_addresses=["127.0.0.1"])
    term_dir = directory / "terminal-pki"
    terminal_ca = certs.init_ca(term_dir, common_name="pos-db-proxy bench terminal CA")
    front = certs.issue_server(term_dir, dns_names=["localhost"], ip_addresses=["127.0.0.1"])
    terminal = certs.issue_terminal(term_dir, store=STORE, terminal=TERMINAL, role=TERMINAL_ROLE)
    return PKI(
        db_ca=db_ca,
        db_cert=db_server.cert_path,
        db_key=db_server.key_path,
        terminal_ca=terminal_ca,
        terminal_crl=term_dir / "crl.pem",
        front_cert=front.cert_path,
        front_key=front.key_path,
        terminal_cert=terminal.cert_path,
        terminal_key=terminal.key_path,
    )


def make_db_password(directory: Path) -> tuple[str, Path]:
    """A fresh password for the database role, and the file (mode 0600) the proxies read it from."""
    password = secrets.token_hex(16)
    path = directory / "db-password"
    path.write_text(password + "\n", encoding="utf-8")
    os.chmod(path, 0o600)
    return password, path


def pos_schema_sql() -> str:
    """The demo's POS schema (proxy/data/demo_schema.sql) plus enough rows to spread the writes."""
    schema = resources.files("proxy").joinpath("data/demo_schema.sql").read_text(encoding="utf-8")
    return f"""
SET ROLE {DB_ROLE};
{schema}
INSERT INTO products (sku, name, price_cents)
SELECT lpad(i::text, 13, '0'), 'Product ' || i, 50 + (i * 37) % 2000
FROM generate_series(1, {POS_PRODUCTS}) AS i;
INSERT INTO stock (store_id, sku, quantity)
SELECT 'store-' || lpad(s::text, 3, '0'), p.sku, 1000000
FROM products AS p CROSS JOIN generate_series(1, {POS_STORES}) AS s
ON CONFLICT DO NOTHING;
RESET ROLE;
VACUUM ANALYZE products, stock, sales, sale_items;
"""


def start_postgres(work: Path, pki: PKI, password: str, stack: contextlib.ExitStack) -> LocalPostgres:
    server = LocalPostgres(
        work / "pg",
        tls=LocalPostgresTLS(cert=pki.db_cert, key=pki.db_key),
        settings={"max_connections": "300"},
    )
    stack.callback(server.stop)
    server.start()
    server.create_role(DB_ROLE, password, method="scram-sha-256")
    server.create_database(DB_NAME, owner=DB_ROLE)
    return server


@dataclass(slots=True)
class Target:
    """One way for pgbench to reach the database."""

    name: str
    port: int
    env: dict[str, str]
    pid: int | None = None  # the process whose RSS the idle test measures
    log_path: Path | None = None
    unavailable: str | None = None
    admin_port: int | None = None  # proxy-full: the admin listener (/metrics)
    audit_file: Path | None = None  # proxy-full: the live audit log (rotated ones sit next to it)
    audit_key: Path | None = None


def direct_target(pg: LocalPostgres, pki: PKI, password: str) -> Target:
    env = {
        "PGHOST": "127.0.0.1",
        "PGPORT": str(pg.port),
        "PGDATABASE": DB_NAME,
        "PGUSER": DB_ROLE,
        "PGPASSWORD": password,
        "PGSSLMODE": "verify-full",
        "PGSSLROOTCERT": str(pki.db_ca),
    }
    return Target("direct", pg.port, env)


def terminal_env(port: int, pki: PKI) -> dict[str, str]:
    return {
        "PGHOST": "127.0.0.1",
        "PGPORT": str(port),
        "PGDATABASE": DB_NAME,
        # PgBouncer's auth_type=cert wants the certificate's CN; the proxy ignores the name.
        "PGUSER": TERMINAL_CN,
        "PGSSLMODE": "verify-full",
        "PGSSLROOTCERT": str(pki.terminal_ca),
        "PGSSLCERT": str(pki.terminal_cert),
        "PGSSLKEY": str(pki.terminal_key),
    }


def _proxy_preexec() -> None:
    # Runs in the child between fork and exec: only async-signal-safe-ish work here.
    raise_nofile_limit()


def spawn_python_service(
    argv: Sequence[str],
    name: str,
    log_path: Path,
    stack: contextlib.ExitStack,
    *,
    extra_env: Mapping[str, str] | None = None,
    cwd: Path = REPO_ROOT,
) -> subprocess.Popen[bytes]:
    """A Python process of the bench (a proxy, the lean pooler) logging to ``log_path``, stopped
    when ``stack`` unwinds.  ``python -m`` imports from ``cwd`` first."""
    with log_path.open("ab") as log_file:
        process = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            cwd=str(cwd),
            env={**client_env(extra_env or {}), "PYTHONUNBUFFERED": "1"},
            start_new_session=True,  # Ctrl-C reaches us, and we stop the process in order
            preexec_fn=_proxy_preexec,  # noqa: PLW1509 -- no threads exist yet
        )
    stack.callback(stop_process, process, name)
    return process


def bench_policy() -> dict[str, Any]:
    """The cashier policy for proxy-enforce and proxy-full: exactly what the workloads run.

    Statement kinds SELECT, INSERT and UPDATE; BEGIN and COMMIT are housekeeping (allowed by
    default). pgbench's tables are read-only (the workloads only read pgbench_accounts); the POS
    script reads products and writes sales, sale_items and stock (writable tables are readable).
    """
    return {
        "mode": "enforce",
        "search_path": ["public"],
        "stacked_queries": False,
        "allow": {
            "kinds": ["SELECT", "INSERT", "UPDATE"],
            "read": [*PGBENCH_TABLES, *POS_READ_TABLES],
            "write": list(POS_WRITE_TABLES),
            "update_without_where": False,
        },
        "fingerprints": [],
    }


def start_proxy(
    work: Path,
    logs: Path,
    *,
    variant: str,
    pki: PKI,
    pg: LocalPostgres,
    password_file: Path,
    pool_size: int,
    stack: contextlib.ExitStack,
    workers: int = 1,
    tree: Path = REPO_ROOT,
) -> Target:
    """One pos-db-proxy process (a supervisor and ``workers`` processes when more than 1) for
    ``variant`` (one of PROXY_VARIANTS), with its own config and log, run from ``tree`` (the
    sources, or a compiled tree)."""
    if variant not in PROXY_VARIANTS:
        raise BenchError(f"unknown proxy variant {variant!r}")
    port = free_port()
    directory = work / variant
    directory.mkdir(mode=0o700)
    # pgbench's clients all present the one terminal certificate, standing for as many tills, each
    # of which would have a share of the pool of its own: the one terminal's share (default half
    # the pool, places in the pool's line included) would hold them all in one line of their own.
    role: dict[str, Any] = {"description": "benchmark tills"}
    # proxy/config.py became proxy/config/model.py; a baseline tree may have either.
    settings = [tree / "proxy" / "config.py", tree / "proxy" / "config" / "model.py"]
    source = "".join(path.read_text(encoding="utf-8") for path in settings if path.is_file())
    if "max_server_connections_per_terminal" in source:
        # A --baseline tree may predate the share.
        role["limits"] = {"max_server_connections_per_terminal": UNSHARED_TERMINAL_CAP}
    if variant in ("proxy-enforce", *FULL_VARIANTS):
        policy_path = directory / "cashier-policy.yaml"
        policy_path.write_text(yaml.safe_dump(bench_policy(), sort_keys=False), encoding="utf-8")
        role["policy"] = str(policy_path)
    config: dict[str, Any] = {
        "listen": {"host": "127.0.0.1", "port": port, "handshake_timeout": "10s", "startup_timeout": "15s"},
        "tls": {
            "cert": str(pki.front_cert),
            "key": str(pki.front_key),
            "client_ca": str(pki.terminal_ca),
            "crl": str(pki.terminal_crl),
        },
        "roles": {TERMINAL_ROLE: role},
        "routes": {
            DB_NAME: {
                "host": "127.0.0.1",
                "port": pg.port,
                "user": DB_ROLE,
                "password": {"file": str(password_file)},
                "sslmode": "verify-full",
                "sslrootcert": str(pki.db_ca),
                "pool": {
                    "mode": "transaction",
                    "size": pool_size,
                    "max_client_wait": "60s",
                    "connect_timeout": "5s",
                },
            }
        },
    }
    target = Target(variant, port, terminal_env(port, pki))
    if variant in FULL_VARIANTS:
        audit_dir = directory / "audit"
        audit_dir.mkdir(mode=0o700)
        key_path = directory / "audit.key"
        fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as key_file:
            key_file.write(secrets.token_bytes(AUDIT_KEY_BYTES))
        target.audit_file, target.audit_key = audit_dir / "audit.log", key_path
        # allowed_statements 1.0 (the default, spelled out): every allowed statement is audited.
        config["audit"] = {
            "file": str(target.audit_file),
            "key_file": str(key_path),
            "allowed_statements": 1.0,
        }
        target.admin_port = free_port()
        config["admin"] = {"host": "127.0.0.1", "port": target.admin_port}
    if workers > 1:
        # The supervisor opens its admin listener once every worker is up: waiting for it below
        # means all of them listen before the first round.
        target.admin_port = free_port()
        config["admin"] = {"host": "127.0.0.1", "port": target.admin_port}
    config_path = directory / "pos-proxy.yaml"
    config_path.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    log_path = logs / f"{variant}.log"
    process = spawn_python_service(
        [
            *(sys.executable, "-m", "proxy", "run", "--config", str(config_path)),
            *("--log-level", "warning", "--workers", str(workers)),
        ],
        variant,
        log_path,
        stack,
        extra_env={"PYTHONPATH": str(tree)},  # not an inherited one: the tree's proxy is measured
        cwd=tree,
    )
    wait_for_port(port, process, variant, log_path)
    if target.admin_port is not None:
        wait_for_port(target.admin_port, process, f"{variant} admin listener", log_path)
    target.pid, target.log_path = process.pid, log_path
    return target


def build_compiled_tree(work: Path, logs: Path) -> Path:
    """The mypyc-compiled build laid out by scripts/compiled-tree.sh (about 45 s); it checks
    that every module setup.py compiles imports from its extension there."""
    tree = work / "compiled"
    log_path = logs / "compiled-build.log"
    log("building the mypyc-compiled proxy (scripts/compiled-tree.sh)")
    with log_path.open("wb") as build_log:
        built = subprocess.run(
            ["bash", str(REPO_ROOT / "scripts" / "compiled-tree.sh"), str(tree)],
            stdin=subprocess.DEVNULL,
            stdout=build_log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHON": sys.executable},
            timeout=900,
            check=False,
        )
    if built.returncode != 0:
        raise BenchError(f"the mypyc build failed (exit {built.returncode}):\n{tail(log_path)}")
    return tree


def start_lean_pooler(
    logs: Path,
    *,
    pki: PKI,
    pg: LocalPostgres,
    password_file: Path,
    pool_size: int,
    stack: contextlib.ExitStack,
) -> Target:
    """bench/lean_pooler.py with the proxy's TLS set-up: the floor of a Python data path."""
    port = free_port()
    log_path = logs / "lean.log"
    process = spawn_python_service(
        [
            *(sys.executable, str(BENCH_DIR / "lean_pooler.py"), "--port", str(port)),
            *("--upstream-port", str(pg.port), "--database", DB_NAME, "--user", DB_ROLE),
            *("--password-file", str(password_file), "--pool-size", str(pool_size)),
            *("--cert", str(pki.front_cert), "--key", str(pki.front_key)),
            *("--client-ca", str(pki.terminal_ca), "--upstream-ca", str(pki.db_ca)),
        ],
        "lean",
        log_path,
        stack,
        extra_env={"PYTHONPATH": str(REPO_ROOT)},  # it imports the proxy's codec from the checkout
    )
    wait_for_port(port, process, "lean", log_path)
    target = Target("lean", port, terminal_env(port, pki))
    target.pid, target.log_path = process.pid, log_path
    return target


def find_pgbouncer(override: str | None = None) -> Path | None:
    """``override``: a path, or "none" to leave PgBouncer out; else the Debian location or PATH."""
    if override is not None:
        return Path(override) if override != "none" and os.access(override, os.X_OK) else None
    for candidate in PGBOUNCER_CANDIDATES:
        if os.access(candidate, os.X_OK):
            return Path(candidate)
    found = shutil.which("pgbouncer")
    return Path(found) if found else None


def start_pgbouncer(
    work: Path,
    logs: Path,
    *,
    pki: PKI,
    pg: LocalPostgres,
    password: str,
    pool_size: int,
    stack: contextlib.ExitStack,
    binary_override: str | None,
) -> Target:
    port = free_port()
    target = Target("pgbouncer", port, terminal_env(port, pki))
    binary = find_pgbouncer(binary_override)
    if binary is None:
        target.unavailable = (
            "left out (--pgbouncer none)"
            if binary_override == "none"
            else f"pgbouncer not found ({binary_override or 'apt-get install pgbouncer'})"
        )
        return target
    user = ServiceUser.detect()
    directory = work / "pgbouncer"
    directory.mkdir(mode=0o700)
    user.own(directory, 0o700)
    files: dict[str, Path] = {}
    for name, source, mode in (
        ("ca.pem", pki.terminal_ca, 0o644),
        ("server.pem", pki.front_cert, 0o644),
        ("server.key", pki.front_key, 0o600),
        ("db-ca.pem", pki.db_ca, 0o644),
    ):
        files[name] = directory / name
        shutil.copyfile(source, files[name])
        user.own(files[name], mode)
    userlist = directory / "userlist.txt"
    userlist.write_text(f'"{TERMINAL_CN}" ""\n', encoding="utf-8")
    user.own(userlist, 0o600)
    ini = directory / "pgbouncer.ini"
    ini.write_text(
        f"""[databases]
{DB_NAME} = host=127.0.0.1 port={pg.port} dbname={DB_NAME} user={DB_ROLE} password={password}

[pgbouncer]
listen_addr = 127.0.0.1
listen_port = {port}
unix_socket_dir =
auth_type = cert
auth_file = {userlist}
pool_mode = transaction
default_pool_size = {pool_size}
min_pool_size = 0
reserve_pool_size = 0
max_client_conn = 2000
max_db_connections = 0
client_tls_sslmode = verify-full
client_tls_ca_file = {files["ca.pem"]}
client_tls_cert_file = {files["server.pem"]}
client_tls_key_file = {files["server.key"]}
server_tls_sslmode = verify-full
server_tls_ca_file = {files["db-ca.pem"]}
ignore_startup_parameters = extra_float_digits
log_connections = 0
log_disconnections = 0
log_pooler_errors = 1
stats_period = 600
""",
        encoding="utf-8",
    )
    user.own(ini, 0o600)
    log_path = logs / "pgbouncer.log"
    target.log_path = log_path
    with log_path.open("ab") as log_file:
        try:
            process = subprocess.Popen(
                [str(binary), str(ini)],
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                cwd=str(directory),
                env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LC_ALL": "C"},
                user=user.uid if user.switch else None,
                group=user.gid if user.switch else None,
                extra_groups=[] if user.switch else None,
                start_new_session=True,
            )
        except OSError as exc:
            target.unavailable = f"pgbouncer could not be started: {exc}"
            return target
    # SIGTERM is PgBouncer's immediate shutdown (SIGINT would wait for clients).
    stack.callback(stop_process, process, "pgbouncer")
    try:
        wait_for_port(port, process, "pgbouncer", log_path)
    except BenchError as exc:
        target.unavailable = str(exc)
        return target
    target.pid = process.pid
    return target


# --------------------------------------------------------------------------- pgbench


@dataclass(slots=True)
class RunResult:
    round: int
    workload: str
    clients: int
    config: str
    tps: float | None = None
    latency_ms: float | None = None
    transactions: int | None = None
    failed: int | None = None
    error: str | None = None
    seconds: float = 0.0
    # CPU time the pooler process (proxy or PgBouncer) spent per transaction: robust to machine noise.
    cpu_us_per_txn: float | None = None


_TPS_RE: Final = re.compile(r"^tps = ([0-9.]+)", re.MULTILINE)
_LATENCY_RE: Final = re.compile(r"^latency average = ([0-9.]+) ms", re.MULTILINE)
_PROCESSED_RE: Final = re.compile(r"^number of transactions actually processed: (\d+)", re.MULTILINE)
_FAILED_RE: Final = re.compile(r"^number of failed transactions: (\d+)", re.MULTILINE)


def parse_pgbench(output: str, result: RunResult) -> None:
    if match := _TPS_RE.search(output):
        result.tps = float(match.group(1))
    if match := _LATENCY_RE.search(output):
        result.latency_ms = float(match.group(1))
    if match := _PROCESSED_RE.search(output):
        result.transactions = int(match.group(1))
    if match := _FAILED_RE.search(output):
        result.failed = int(match.group(1))


class Pgbench:
    def __init__(self, binary: Path, logs: Path) -> None:
        self.binary = binary
        self.logs = logs
        self.failure_log = logs / "pgbench-failures.log"

    def run(self, target: Target, args: Sequence[str], timeout: float) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(self.binary), *args],
            capture_output=True,
            text=True,
            env=client_env(target.env),
            cwd=str(REPO_ROOT),
            timeout=timeout,
            check=False,
        )

    def measure(
        self, target: Target, workload: Workload, clients: int, duration: int, round_no: int
    ) -> RunResult:
        result = RunResult(round=round_no, workload=workload.name, clients=clients, config=target.name)
        args = ["-n", "-j", str(min(2, clients)), "-c", str(clients), "-T", str(duration), *workload.args]
        started = time.monotonic()
        cpu_before = process_tree_cpu_seconds(target.pid) if target.pid is not None else None
        try:
            done = self.run(target, args, timeout=duration + PGBENCH_GRACE)
        except subprocess.TimeoutExpired:
            result.error = f"pgbench did not finish within {duration + PGBENCH_GRACE:.0f}s"
            done = None
        result.seconds = round(time.monotonic() - started, 2)
        if done is not None:
            parse_pgbench(done.stdout, result)
            if cpu_before is not None and target.pid is not None and result.transactions:
                cpu = process_tree_cpu_seconds(target.pid) - cpu_before
                result.cpu_us_per_txn = round(cpu * 1e6 / result.transactions, 1)
            if done.returncode != 0 or result.tps is None:
                last = (done.stderr.strip().splitlines() or ["(no stderr)"])[-1]
                result.error = f"pgbench exit {done.returncode}: {last}"
            if result.error or (result.failed or 0) > 0:
                with self.failure_log.open("a", encoding="utf-8") as fh:
                    fh.write(f"=== round {round_no} {workload.name} c={clients} {target.name}: {args}\n")
                    fh.write(done.stdout + "\n--- stderr ---\n" + done.stderr + "\n")
        return result


# --------------------------------------------------------------------------- idle connections


def _startup_packet(user: str, database: str) -> bytes:
    body = struct.pack("!i", 196608)
    for key, value in (("user", user), ("database", database), ("application_name", "bench-idle")):
        body += key.encode() + b"\0" + value.encode() + b"\0"
    body += b"\0"
    return struct.pack("!i", len(body) + 4) + body


async def open_terminal(
    port: int, context: ssl.SSLContext, user: str, gate: asyncio.Semaphore, source: str | None = None
) -> asyncio.StreamWriter:
    """A terminal through TLS and startup, from loopback address ``source`` if given (a store's)."""
    async with gate:
        local = (source, 0) if source is not None else None
        reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=local)
        try:
            writer.write(struct.pack("!ii", 8, 80877103))  # SSLRequest
            await writer.drain()
            if await reader.readexactly(1) != b"S":
                raise BenchError("server refused TLS")
            await writer.start_tls(context, server_hostname="localhost")
            writer.write(_startup_packet(user, DB_NAME))
            await writer.drain()
            while True:
                kind = await reader.readexactly(1)
                (length,) = struct.unpack("!i", await reader.readexactly(4))
                payload = await reader.readexactly(length - 4)
                if kind == b"Z":
                    return writer
                if kind == b"E":
                    fields = dict(
                        (part[:1].decode(), part[1:].decode("utf-8", "replace"))
                        for part in payload.split(b"\0")
                        if part
                    )
                    raise BenchError(f"server error: {fields.get('M', payload[:200])}")
                if kind == b"R" and struct.unpack("!i", payload[:4])[0] != 0:
                    raise BenchError("server asked for a password: expected certificate authentication")
        except BaseException:
            writer.close()
            raise


async def close_terminals(writers: Sequence[asyncio.StreamWriter]) -> None:
    for writer in writers:
        with contextlib.suppress(Exception):
            writer.write(b"X\0\0\0\4")  # Terminate
            writer.close()
    await asyncio.wait_for(
        asyncio.gather(*(w.wait_closed() for w in writers), return_exceptions=True), timeout=30
    )


@dataclass(slots=True)
class IdleResult:
    config: str
    requested: int
    opened: int = 0
    rss_before_kib: int | None = None
    rss_after_kib: int | None = None
    rss_after_close_kib: int | None = None
    kib_per_connection: float | None = None
    open_seconds: float | None = None
    error: str | None = None


async def _idle_test(target: Target, pki: PKI, count: int) -> IdleResult:
    assert target.pid is not None
    result = IdleResult(target.name, count)
    context = ssl.create_default_context(cafile=str(pki.terminal_ca))
    context.load_cert_chain(pki.terminal_cert, pki.terminal_key)
    await asyncio.sleep(IDLE_SETTLE_SECONDS)
    result.rss_before_kib = rss_kib(target.pid)
    gate = asyncio.Semaphore(IDLE_HANDSHAKE_CONCURRENCY)
    started = time.monotonic()
    attempts = [
        asyncio.ensure_future(asyncio.wait_for(open_terminal(target.port, context, TERMINAL_CN, gate), 60))
        for _ in range(count)
    ]
    outcomes = await asyncio.gather(*attempts, return_exceptions=True)
    result.open_seconds = round(time.monotonic() - started, 2)
    writers = [o for o in outcomes if isinstance(o, asyncio.StreamWriter)]
    errors = [o for o in outcomes if isinstance(o, BaseException)]
    result.opened = len(writers)
    if errors:
        result.error = f"{len(errors)} of {count} connections failed, first: {errors[0]!r}"
    try:
        await asyncio.sleep(IDLE_SETTLE_SECONDS)
        result.rss_after_kib = rss_kib(target.pid)
        if writers:
            result.kib_per_connection = round(
                (result.rss_after_kib - result.rss_before_kib) / len(writers), 2
            )
    finally:
        await close_terminals(writers)
    await asyncio.sleep(IDLE_SETTLE_SECONDS)
    result.rss_after_close_kib = rss_kib(target.pid)
    return result


def idle_test(target: Target, pki: PKI, count: int) -> IdleResult:
    if target.unavailable or target.pid is None:
        return IdleResult(target.name, count, error=target.unavailable or "not running")
    try:
        return asyncio.run(asyncio.wait_for(_idle_test(target, pki, count), IDLE_TOTAL_TIMEOUT))
    except (TimeoutError, OSError, BenchError) as exc:
        return IdleResult(target.name, count, error=repr(exc))


# --------------------------------------------------------------------------- audit, metrics, logs


def audit_files(live: Path) -> list[Path]:
    """The audit log files oldest first: rotated ``audit.log.<UTC stamp>`` by name, then ``audit.log``."""
    rotated = sorted(p for p in live.parent.glob(f"{live.name}.*") if p.is_file())
    return [*rotated, *([live] if live.is_file() else [])]


def verify_audit(target: Target, into: dict[str, Any]) -> None:
    """``python -m proxy audit verify`` over the variant's audit files; the verdict goes into ``into``.

    Runs after the proxy has stopped (so the log is closed), before the workspace is removed.
    """
    if target.audit_file is None or target.audit_key is None:
        return
    files = audit_files(target.audit_file)
    into.update(
        config=target.name,
        files=[p.name for p in files],
        bytes=sum(p.stat().st_size for p in files),
        lines=sum(_count_lines(p) for p in files),
    )
    if not files:
        into.update(ok=False, verdict="no audit log file was written")
        return
    argv = [sys.executable, "-m", "proxy", "audit", "verify", "--key", str(target.audit_key)]
    try:
        done = subprocess.run(
            [*argv, *map(str, files)],
            capture_output=True,
            text=True,
            cwd=str(REPO_ROOT),
            env=client_env({}),
            timeout=AUDIT_VERIFY_TIMEOUT,
            check=False,
        )
    except subprocess.TimeoutExpired:
        into.update(ok=False, verdict=f"audit verify did not finish within {AUDIT_VERIFY_TIMEOUT:.0f}s")
        return
    output = (done.stdout.strip() or done.stderr.strip() or "(no output)").splitlines()[-1]
    into.update(ok=done.returncode == 0, returncode=done.returncode, verdict=output)


def verify_audit_of(targets: Mapping[str, Target], name: str, into: dict[str, Any]) -> None:
    """A clean-up callback: verify_audit when ``name`` was started; a failure is recorded, not raised."""
    target = targets.get(name)
    if target is None:
        return
    try:
        verify_audit(target, into)
    except OSError as exc:
        into.update(config=name, ok=False, verdict=f"could not verify: {exc!r}")


def _count_lines(path: Path) -> int:
    count = 0
    with path.open("rb") as fh:
        while chunk := fh.read(1 << 20):
            count += chunk.count(b"\n")
    return count


_METRICS_WANTED: Final = (
    "pos_proxy_policy_decisions_total",
    "pos_proxy_audit_records_total",
    "pos_proxy_audit_write_errors_total",
    "pos_proxy_statements_total",
)


def scrape_metrics(target: Target) -> dict[str, float] | str:
    """The proxy-full counters the bench reports (summed per metric and label set), or an error."""
    if target.admin_port is None or target.unavailable:
        return "no admin listener"
    url = f"http://127.0.0.1:{target.admin_port}/metrics"
    try:
        with urllib.request.urlopen(url, timeout=METRICS_TIMEOUT) as response:
            text = response.read().decode("utf-8", "replace")
    except OSError as exc:
        return f"GET {url} failed: {exc!r}"
    found: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("#") or not line.startswith(_METRICS_WANTED):
            continue
        name, _, value = line.rpartition(" ")
        with contextlib.suppress(ValueError):
            found[name] = float(value)
    return found


def scan_log(path: Path | None) -> dict[str, int]:
    """``level event`` -> count for the JSON lines of a proxy log; non-JSON lines count as ``raw``."""
    counts: dict[str, int] = {}
    if path is None or not path.is_file():
        return counts
    with path.open(encoding="utf-8", errors="replace") as fh:
        for line in fh:
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
                key = f"{entry.get('level', '?')} {entry.get('event', '?')}"
            except (ValueError, AttributeError):
                key = f"raw {line.strip()[:120]}"
            counts[key] = counts.get(key, 0) + 1
    return counts


# --------------------------------------------------------------------------- reporting


@dataclass(slots=True)
class Cell:
    tps: float | None = None
    latency_ms: float | None = None
    cpu_us_per_txn: float | None = None
    runs: int = 0
    errors: int = 0
    note: str | None = None


def active_ratios(configs: Sequence[str]) -> list[tuple[str, str, str, str]]:
    """The RATIOS whose two configurations are both being run."""
    return [r for r in RATIOS if r[2] in configs and r[3] in configs]


def summarize(
    results: Sequence[RunResult],
    cases: Sequence[tuple[Workload, int]],
    targets: Mapping[str, Target],
    configs: Sequence[str],
) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for workload, clients in cases:
        row: dict[str, Any] = {"workload": workload.name, "clients": clients}
        for config in configs:
            cell = Cell()
            target = targets[config]
            if target.unavailable:
                cell.note = target.unavailable
            elif config in workload.unsupported:
                cell.note = workload.unsupported[config]
            runs = [
                r for r in results if (r.workload, r.clients, r.config) == (workload.name, clients, config)
            ]
            good = [r for r in runs if r.error is None and r.tps is not None]
            cell.runs, cell.errors = len(runs), len(runs) - len(good)
            if good:
                cell.tps = round(statistics.median(r.tps for r in good if r.tps is not None), 1)
                lat = [r.latency_ms for r in good if r.latency_ms is not None]
                cell.latency_ms = round(statistics.median(lat), 3) if lat else None
                cpu = [r.cpu_us_per_txn for r in good if r.cpu_us_per_txn is not None]
                cell.cpu_us_per_txn = round(statistics.median(cpu), 1) if cpu else None
            row[config] = asdict(cell)
        for _label, key, numerator, denominator in active_ratios(configs):
            top, bottom = row[numerator]["tps"], row[denominator]["tps"]
            row[key] = round(top / bottom, 3) if top and bottom else None
        rows.append(row)
    return rows


def _fmt_cell(cell: Mapping[str, Any]) -> tuple[str, str]:
    if cell["tps"] is None:
        if cell["runs"] and cell["errors"]:
            return "ERR", "ERR"
        return "n/a", "n/a"
    tps = f"{cell['tps']:.0f}"
    if cell["errors"]:
        tps += f" ({cell['errors']} err)"
    lat = f"{cell['latency_ms']:.2f}" if cell["latency_ms"] is not None else "?"
    return tps, lat


def format_table(rows: Sequence[Mapping[str, Any]], configs: Sequence[str]) -> str:
    ratios = active_ratios(configs)
    header = ["workload", "clients"]
    for config in configs:
        header += [f"{config} tps", f"{config} ms"]
    header += [label for label, *_ in ratios]
    body: list[list[str]] = []
    for row in rows:
        line = [row["workload"], str(row["clients"])]
        for config in configs:
            line += list(_fmt_cell(row[config]))
        for _label, key, *_ in ratios:
            line.append(f"{row[key]:.2f}x" if row[key] is not None else "n/a")
        body.append(line)
    return render_table(header, body)


def render_table(header: Sequence[str], body: Sequence[Sequence[str]]) -> str:
    """Columns padded to their widest cell: the first two (workload, clients) left, the rest right."""
    widths = [max(len(r[i]) for r in [header, *body]) for i in range(len(header))]
    return "\n".join(
        "  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True)))
        for r in [header, ["-" * w for w in widths], *body]
    )


def format_cpu_table(rows: Sequence[Mapping[str, Any]], configs: Sequence[str]) -> str:
    """CPU microseconds the pooler process spent per transaction (median of rounds): unlike TPS,
    barely moved by other jobs on the machine, so it shows the data path's own cost."""
    poolers = [c for c in configs if c != "direct"]
    # (numerator, denominator) pairs of configs, as "num/den cpu" columns.
    pairs = [
        (c, "pgbouncer")
        for c in ("proxy", "proxy-mypyc", "proxy-full")
        if c in poolers and "pgbouncer" in poolers
    ]
    if "baseline-full" in poolers:
        pairs.append(("proxy-full", "baseline-full"))
    header = ["workload", "clients", *(f"{c} us/txn" for c in poolers)]
    header += [f"{num}/{den.removesuffix('-full').replace('pgbouncer', 'pgb')} cpu" for num, den in pairs]
    body: list[list[str]] = []
    for row in rows:
        cells = {c: row[c]["cpu_us_per_txn"] for c in poolers}
        line = [row["workload"], str(row["clients"])]
        line += [f"{cells[c]:.1f}" if cells[c] is not None else "n/a" for c in poolers]
        for num, den in pairs:
            mine, theirs = cells[num], cells[den]
            line.append(f"{mine / theirs:.2f}x" if mine and theirs else "n/a")
        body.append(line)
    return render_table(header, body)


def format_idle(results: Sequence[IdleResult]) -> str:
    lines = []
    for r in results:
        if r.kib_per_connection is None:
            lines.append(f"  {r.config:<10} n/a ({r.error})")
            continue
        lines.append(
            f"  {r.config:<10} {r.kib_per_connection:7.1f} KiB per idle TLS connection "
            f"({r.opened} open: RSS {r.rss_before_kib} -> {r.rss_after_kib} KiB, "
            f"{r.rss_after_close_kib} KiB after closing; opened in {r.open_seconds}s)"
            + (f"  [{r.error}]" if r.error else "")
        )
    return "\n".join(lines)


# --------------------------------------------------------------------------- main


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Benchmark pos-db-proxy vs PgBouncer vs direct PostgreSQL (all over TLS).",
    )
    parser.add_argument("--duration", type=int, default=10, help="seconds per pgbench run (default 10)")
    parser.add_argument(
        "--rounds", type=int, default=3, help="interleaved rounds; medians reported (default 3)"
    )
    parser.add_argument(
        "--clients", type=int, nargs="+", default=[16, 64], help="client counts (default 16 64; churn: 16)"
    )
    parser.add_argument(
        "--workloads", nargs="+", choices=list(WORKLOADS), default=list(WORKLOADS), help="subset to run"
    )
    parser.add_argument(
        "--configs",
        nargs="+",
        choices=list(ALL_CONFIGS),
        default=list(DEFAULT_CONFIGS),
        help="configurations to run (default: direct pgbouncer proxy proxy-mypyc)",
    )
    parser.add_argument(
        "--pool-size", type=int, default=20, help="proxy and PgBouncer pool size (default 20)"
    )
    parser.add_argument(
        "--proxy-workers",
        type=int,
        default=2,
        metavar="N",
        help="worker processes of the proxy-workers configuration (default 2; its pool size is shared)",
    )
    parser.add_argument("--scale", type=int, default=10, help="pgbench -i scale (default 10)")
    parser.add_argument("--warmup", type=int, default=2, help="seconds of warm-up per config (default 2)")
    parser.add_argument("--idle", type=int, default=1000, help="idle connections for the RSS test (0: skip)")
    parser.add_argument(
        "--pgbouncer", metavar="PATH", help="PgBouncer binary, or 'none' to leave it out (default: find it)"
    )
    parser.add_argument(
        "--baseline",
        type=Path,
        metavar="TREE",
        help="also run proxy-full from TREE (e.g. `git worktree add --detach /tmp/before <commit>`) "
        "as baseline-full, interleaved with this tree's proxy-full",
    )
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT, help="JSON results file")
    parser.add_argument(
        "--quick", action="store_true", help="smoke run: --duration 3 --rounds 1 --clients 16"
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.duration, args.rounds, args.clients, args.warmup = 3, 1, [16], 1
    if args.duration < 1 or args.rounds < 1 or args.pool_size < 1 or args.scale < 1:
        parser.error("--duration, --rounds, --pool-size and --scale must be at least 1")
    if args.proxy_workers < 2:
        parser.error("--proxy-workers must be at least 2 (the proxy configuration is the 1-worker one)")
    if any(c < 1 for c in args.clients) or args.idle < 0 or args.warmup < 0:
        parser.error("--clients must be positive; --idle and --warmup must not be negative")
    if args.baseline is not None:
        if not (args.baseline / "proxy" / "__main__.py").is_file():
            parser.error(f"--baseline {args.baseline}: not a pos-db-proxy checkout")
        args.baseline = args.baseline.resolve()
        args.configs = [*args.configs, "proxy-full", "baseline-full"]
    elif "baseline-full" in args.configs:
        parser.error("baseline-full needs --baseline TREE")
    # Table order, whatever order they were given in; each configuration once.
    args.configs = [c for c in ALL_CONFIGS if c in args.configs]
    return args


def _sigterm_to_interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


@contextlib.contextmanager
def workspace() -> Iterator[Path]:
    work = Path(tempfile.mkdtemp(prefix="pos-bench-"))
    os.chmod(work, 0o711)  # the postgres OS user must reach its own sub-directories
    try:
        yield work
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    # Explicitly: a shell without job control starts background jobs with SIGINT ignored.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, _sigterm_to_interrupt)
    signal.signal(signal.SIGHUP, _sigterm_to_interrupt)
    nofile = raise_nofile_limit()
    if args.idle and nofile < args.idle + 256:
        log(f"open-files limit is {nofile}: lowering --idle to {max(nofile - 256, 0)}")
        args.idle = max(nofile - 256, 0)
    revision = git_revision()  # at start: other people may commit while the bench runs
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    logs = LOGS_ROOT / stamp
    logs.mkdir(parents=True, exist_ok=True)
    try:
        bindir = find_pg_bindir()
    except LocalPostgresError as exc:
        print(f"bench: {exc}", file=sys.stderr)
        return 1
    pgbench = Pgbench(bindir / "pgbench", logs)
    workloads = [WORKLOADS[name] for name in args.workloads]
    cases = [(w, c) for w in workloads for c in w.client_counts(args.clients)]
    results: list[RunResult] = []
    idle: list[IdleResult] = []
    targets: dict[str, Target] = {}
    configs: list[str] = args.configs
    audit_verdict: dict[str, Any] = {}
    metrics: dict[str, float] | str | None = None
    interrupted = False
    with workspace() as work, contextlib.ExitStack() as stack:
        try:
            log(f"workspace {work}; logs in {logs}")
            pki = make_pki(work)
            password, password_file = make_db_password(work)
            log("starting PostgreSQL 15 (TLS, max_connections 300)")
            pg = start_postgres(work, pki, password, stack)
            stack.callback(_save_pg_log, pg, logs)
            direct = direct_target(pg, pki, password)
            if "direct" in configs:
                targets["direct"] = direct
            log(f"pgbench -i -s {args.scale} directly against PostgreSQL; POS tables")
            init = pgbench.run(direct, ["-i", "-s", str(args.scale), "-q"], timeout=900)
            if init.returncode != 0:
                raise BenchError(f"pgbench -i failed:\n{init.stderr[-2000:]}")
            branches = pg.psql("SELECT count(*) FROM pgbench_branches", dbname=DB_NAME).strip()
            if branches != str(args.scale):
                raise BenchError(f"pgbench -i left {branches!r} branches, expected {args.scale}")
            pg.execute_script(pos_schema_sql(), dbname=DB_NAME)
            if "pgbouncer" in configs:
                log(f"starting PgBouncer (transaction pooling, pool {args.pool_size})")
                targets["pgbouncer"] = start_pgbouncer(
                    work,
                    logs,
                    pki=pki,
                    pg=pg,
                    password=password,
                    pool_size=args.pool_size,
                    stack=stack,
                    binary_override=args.pgbouncer,
                )
                if targets["pgbouncer"].unavailable:
                    log(f"PgBouncer n/a: {targets['pgbouncer'].unavailable}")
            if "lean" in configs:
                log(f"starting bench/lean_pooler.py (pool {args.pool_size})")
                targets["lean"] = start_lean_pooler(
                    logs, pki=pki, pg=pg, password_file=password_file, pool_size=args.pool_size, stack=stack
                )
            compiled_tree = build_compiled_tree(work, logs) if "proxy-mypyc" in configs else None
            for variant in (v for v in PROXY_VARIANTS if v in configs):
                workers = args.proxy_workers if variant == "proxy-workers" else 1
                tree = compiled_tree if variant == "proxy-mypyc" and compiled_tree else REPO_ROOT
                if variant == "baseline-full":
                    tree = args.baseline
                log(
                    f"starting pos-db-proxy as {variant} (transaction pooling, pool {args.pool_size}, "
                    f"{workers} worker process(es))"
                )
                if variant == "proxy-full":
                    # Registered before the proxy's stop, so it runs after it: the log is closed then.
                    stack.callback(verify_audit_of, targets, "proxy-full", audit_verdict)
                targets[variant] = start_proxy(
                    work,
                    logs,
                    variant=variant,
                    pki=pki,
                    pg=pg,
                    password_file=password_file,
                    pool_size=args.pool_size,
                    stack=stack,
                    workers=workers,
                    tree=tree,
                )
            warm_up(pgbench, targets, args.warmup)
            run_rounds(pgbench, targets, cases, args, results)
            if "proxy-full" in targets:
                metrics = scrape_metrics(targets["proxy-full"])
            if args.idle:
                for name in ("proxy", "proxy-mypyc", "pgbouncer", "lean"):
                    if name not in targets:
                        continue
                    if not targets[name].unavailable:
                        log(f"idle test: {args.idle} TLS connections through {name}")
                    idle.append(idle_test(targets[name], pki, args.idle))
        except KeyboardInterrupt:
            interrupted = True
            log("interrupted: stopping everything")
        finally:
            signal.signal(signal.SIGINT, signal.SIG_IGN)  # let the clean-up finish
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            signal.signal(signal.SIGHUP, signal.SIG_IGN)
            log("stopping the proxies, PgBouncer and PostgreSQL (then verifying the audit log)")
    signal.signal(signal.SIGINT, signal.default_int_handler)
    if not targets:
        return 130 if interrupted else 1
    rows = summarize(results, cases, _complete_targets(targets, configs), configs)
    log_scan = {name: scan_log(t.log_path) for name, t in targets.items() if name in PROXY_VARIANTS}
    report = build_report(
        args,
        revision=revision,
        rows=rows,
        results=results,
        idle=idle,
        targets=targets,
        logs=logs,
        interrupted=interrupted,
    )
    report.update(audit_verify=audit_verdict or None, proxy_full_metrics=metrics, proxy_logs=log_scan)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print()
    if interrupted:
        print("INTERRUPTED: partial results below")
    print(
        f"pgbench -j 2 -T {args.duration} -n, {args.rounds} round(s), median of rounds; "
        f"pool size {args.pool_size}; tps and avg latency (ms)"
    )
    print(format_table(rows, configs))
    if any(c != "direct" for c in configs):
        print()
        print("Pooler process CPU per transaction (us, median of rounds; lower is better):")
        print(format_cpu_table(rows, configs))
    overall = overall_ratios(rows, configs)
    if overall:
        print()
        print("Median TPS ratios over all rows: " + ", ".join(f"{k} {v:.2f}x" for k, v in overall.items()))
    if audit_verdict:
        print()
        files = audit_verdict.get("files", [])
        print(
            f"Audit log ({audit_verdict.get('config')}): {len(files)} file(s) {' '.join(files)}, "
            f"{audit_verdict.get('lines', '?')} lines, {audit_verdict.get('bytes', 0) / 1e6:.1f} MB"
        )
        print(f"  python -m proxy audit verify: {audit_verdict.get('verdict', '(not run)')}")
    if metrics is not None:
        print()
        print("proxy-full /metrics at the end of the rounds:")
        if isinstance(metrics, str):
            print(f"  {metrics}")
        else:
            print("\n".join(f"  {name} {value:g}" for name, value in sorted(metrics.items())))
    if log_scan:
        print()
        print("Proxy logs (level event: count):")
        for name, counts in log_scan.items():
            summary = ", ".join(f"{k}: {n}" for k, n in sorted(counts.items())) or "empty"
            print(f"  {name}: {summary}")
    if idle:
        print()
        print("Idle TLS terminal connections (process RSS from /proc/PID/status):")
        print(format_idle(idle))
    notes = _notes(rows, configs)
    if notes:
        print()
        print("\n".join(notes))
    print()
    print(f"JSON: {args.output}")
    print(f"logs: {logs} (proxy*.log, pgbouncer.log, postgresql.log, pgbench-failures.log)")
    return 130 if interrupted else 0


def _complete_targets(targets: Mapping[str, Target], configs: Sequence[str]) -> dict[str, Target]:
    """Every selected config, with never-started ones marked unavailable (after an early interrupt)."""
    return {name: targets.get(name) or Target(name, 0, {}, unavailable="not started") for name in configs}


def overall_ratios(rows: Sequence[Mapping[str, Any]], configs: Sequence[str]) -> dict[str, float]:
    """Per ratio column: the median of the per-row ratios (rows where both medians exist)."""
    overall: dict[str, float] = {}
    for label, key, *_ in active_ratios(configs):
        values = [row[key] for row in rows if row.get(key) is not None]
        if values:
            overall[label] = round(statistics.median(values), 3)
    return overall


def _save_pg_log(pg: LocalPostgres, logs: Path) -> None:
    with contextlib.suppress(OSError, LocalPostgresError):
        shutil.copyfile(pg.log_path, logs / "postgresql.log")


def warm_up(pgbench: Pgbench, targets: dict[str, Target], seconds: int) -> None:
    """A short -S run per config: fills the pools, and marks a config that cannot work as n/a."""
    for target in targets.values():
        if target.unavailable:
            continue
        args = ["-n", "-j", "2", "-c", "16", "-T", str(max(seconds, 1)), "-S", "-M", "extended"]
        try:
            done = pgbench.run(target, args, timeout=seconds + PGBENCH_GRACE)
        except subprocess.TimeoutExpired:
            target.unavailable = "warm-up timed out"
            continue
        if done.returncode != 0:
            last = (done.stderr.strip().splitlines() or ["?"])[-1]
            target.unavailable = f"warm-up failed: {last}"
            log(f"{target.name} n/a: {target.unavailable}")


def run_rounds(
    pgbench: Pgbench,
    targets: Mapping[str, Target],
    cases: Sequence[tuple[Workload, int]],
    args: argparse.Namespace,
    results: list[RunResult],
) -> None:
    """Run every case against every config, round by round, appending to ``results`` as it goes."""
    for round_no in range(1, args.rounds + 1):
        # Rotate the config order each round so no config always runs right after another.
        configs = list(targets)
        shift = (round_no - 1) % len(configs)
        order = configs[shift:] + configs[:shift]
        for workload, clients in cases:
            for config in order:
                target = targets[config]
                if target.unavailable or config in workload.unsupported:
                    continue
                result = pgbench.measure(target, workload, clients, args.duration, round_no)
                results.append(result)
                outcome = (
                    f"{result.tps:.0f} tps, {result.latency_ms} ms"
                    if result.error is None and result.tps is not None
                    else f"ERROR {result.error}"
                )
                if result.failed:
                    outcome += f" ({result.failed} failed transactions)"
                log(f"round {round_no}/{args.rounds} {workload.name} c={clients} {config}: {outcome}")


def _notes(rows: Sequence[Mapping[str, Any]], configs: Sequence[str]) -> list[str]:
    notes: list[str] = []
    seen: set[str] = set()
    for row in rows:
        for config in configs:
            note = row[config]["note"]
            if note and note not in seen:
                seen.add(note)
                notes.append(f"n/a {config}: {note}")
    if any(row[c]["errors"] for row in rows for c in configs):
        notes.append("ERR: pgbench failed in some runs; see pgbench-failures.log")
    return notes


def build_report(
    args: argparse.Namespace,
    *,
    revision: str,
    rows: Sequence[Mapping[str, Any]],
    results: Sequence[RunResult],
    idle: Sequence[IdleResult],
    targets: Mapping[str, Target],
    logs: Path,
    interrupted: bool,
) -> dict[str, Any]:
    bindir = find_pg_bindir()
    pgbouncer = find_pgbouncer(args.pgbouncer)
    return {
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "interrupted": interrupted,
        "settings": {
            "duration": args.duration,
            "rounds": args.rounds,
            "clients": args.clients,
            "workloads": args.workloads,
            "configs": args.configs,
            "pool_size": args.pool_size,
            "scale": args.scale,
            "warmup": args.warmup,
            "idle_connections": args.idle,
            "pgbench_threads": 2,
        },
        "environment": {
            "revision": revision,
            "python": platform.python_version(),
            "cpus": os.cpu_count(),
            "kernel": platform.release(),
            "postgres": command_version([str(bindir / "postgres"), "--version"]),
            "pgbench": command_version([str(bindir / "pgbench"), "--version"]),
            "pgbouncer": command_version([str(pgbouncer), "--version"]) if pgbouncer else None,
        },
        "configs": {
            name: {"unavailable": t.unavailable, "log": str(t.log_path) if t.log_path else None}
            for name, t in targets.items()
        },
        "policy": bench_policy() if {"proxy-enforce", "proxy-full"} & set(targets) else None,
        "summary": list(rows),
        "runs": [asdict(r) for r in results],
        "idle_memory": [asdict(r) for r in idle],
        "logs": str(logs),
    }


def run_main(entry: Callable[[Sequence[str] | None], int]) -> None:
    try:
        sys.exit(entry(None))
    except BenchError as exc:
        print(f"bench: {exc}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    run_main(main)
