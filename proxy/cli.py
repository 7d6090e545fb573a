"""The ``pos-proxy`` command line: parse arguments, call into the modules, print, return exit codes."""

from __future__ import annotations

import argparse
import json
import signal
import sys
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Coroutine, Sequence
from pathlib import Path
from typing import Any, Final

import structlog

from proxy import certs, eventloop
from proxy.audit import AuditError, load_key, verify
from proxy.config.load import load_config, parse_workers
from proxy.config.model import Config
from proxy.oplog import configure_logging
from proxy.policy.approve import PolicyFileError, approve_statements
from proxy.policy.engine import judge
from proxy.policy.learn import ReviewFileError, read_review
from proxy.server import serve
from proxy.supervisor import supervise
from proxy.tlsconfig import load_terminal_tls
from proxy.workers import WorkerSlot
from proxy.yamlreader import ConfigError

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2


def main(argv: Sequence[str] | None = None) -> int:
    parser = _build_parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "handler"):
        parser.print_help()
        return EXIT_USAGE
    try:
        code: int = args.handler(args)
    except certs.CertsError as exc:
        print(f"pos-proxy: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        return EXIT_FAILURE
    return code


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pos-proxy", description="Secure PostgreSQL proxy for point-of-sale terminals."
    )
    commands = parser.add_subparsers(title="commands", metavar="COMMAND")

    run = commands.add_parser("run", help="run the proxy with a configuration file")
    run.add_argument("--config", required=True, type=Path, help="YAML configuration file")
    run.add_argument(
        "--workers",
        type=_worker_count,
        metavar="N",
        help='worker processes sharing the port: a number, or "auto" (the cores); default: listen.workers',
    )
    _add_log_options(run)
    run.set_defaults(handler=_run)

    # Started by `run --workers N`, one per worker; not for people, so not listed.
    worker = commands.add_parser("worker")
    worker.add_argument("--config", required=True, type=Path)
    worker.add_argument("--index", required=True, type=int)
    worker.add_argument("--count", required=True, type=int)
    worker.add_argument("--runtime-dir", required=True, type=Path)
    worker.add_argument("--supervisor-pid", required=True, type=int)
    _add_log_options(worker)
    worker.set_defaults(handler=_worker)

    check = commands.add_parser("check-config", help="validate a configuration file and exit")
    check.add_argument("config", type=Path)
    check.set_defaults(handler=_check_config)

    demo = commands.add_parser("demo", help="run a self-contained demo: local database, dev certs, proxy")
    demo.add_argument("--port", type=int, default=6432, help="proxy port (default 6432; 0 picks a free one)")
    demo.add_argument("--no-wait", action="store_true", help="stop right after the sample session")
    demo.set_defaults(handler=_demo)

    _add_certs_commands(commands.add_parser("certs", help="manage the terminal PKI (CA, certs, CRL)"))
    _add_policy_commands(commands.add_parser("policy", help="review, approve and check role SQL policies"))
    _add_admin_commands(commands.add_parser("admin", help="talk to a running proxy's admin API"))
    audit = commands.add_parser("audit", help="work with the tamper-evident audit log")
    audit_commands = audit.add_subparsers(title="audit commands", metavar="COMMAND", required=True)
    verify = audit_commands.add_parser("verify", help="check the hash chain and HMACs of audit log files")
    verify.add_argument("--key", required=True, type=Path, help="the HMAC key file (audit.key_file)")
    verify.add_argument(
        "--witness",
        type=Path,
        help="the witness file (audit.witness_file): also report newest records cut off the log",
    )
    verify.add_argument(
        "files", nargs="+", type=Path, help="log files, oldest first (rotated ones, then the live one)"
    )
    verify.set_defaults(handler=_audit_verify)
    return parser


def _audit_verify(args: argparse.Namespace) -> int:
    try:
        key = load_key(args.key)
    except (OSError, AuditError) as exc:
        print(f"pos-proxy: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    report = verify(args.files, key, args.witness)
    if report.ok:
        witnessed = "" if report.witnessed is None else f"; reaches the witness's seq {report.witnessed}"
        print(f"OK: {report.records} records in {len(args.files)} file(s), chain and HMACs intact{witnessed}")
        return EXIT_OK
    where = f"{report.file}:{report.line}" if report.file is not None else "the log"
    if report.lost:
        # The log says itself what it lacks; every record it holds verified.
        intact = f"{report.records} records verified, chain and HMACs intact"
        print(f"INCOMPLETE: {where}: {report.problem} ({intact})")
        return EXIT_FAILURE
    print(f"TAMPERED: {where}: {report.problem} ({report.records} records verified before it)")
    return EXIT_FAILURE


def _add_admin_commands(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--url", default="http://127.0.0.1:9187", help="admin listener base URL")
    parser.add_argument("--token-file", type=Path, help="file holding the admin bearer token")
    commands = parser.add_subparsers(title="admin commands", metavar="COMMAND", required=True)
    commands.add_parser("pools", help="pool state per route (like SHOW POOLS)").set_defaults(
        handler=_admin_call, method="GET", path="/v1/pools"
    )
    commands.add_parser("clients", help="live terminal sessions (like SHOW CLIENTS)").set_defaults(
        handler=_admin_call, method="GET", path="/v1/clients"
    )
    commands.add_parser("reload", help="reload the configuration (like SIGHUP)").set_defaults(
        handler=_admin_call, method="POST", path="/v1/reload"
    )
    close_idle = commands.add_parser(
        "close-idle", help="close a route's idle server connections now (e.g. before DROP DATABASE)"
    )
    close_idle.add_argument("route", help="the route's name (its key under routes:)")
    close_idle.set_defaults(handler=_admin_close_idle)
    disconnect = commands.add_parser("disconnect", help="cut a terminal's live sessions now")
    disconnect.add_argument("store")
    disconnect.add_argument("terminal")
    disconnect.set_defaults(handler=_admin_disconnect)


def _add_policy_commands(parser: argparse.ArgumentParser) -> None:
    commands = parser.add_subparsers(title="policy commands", metavar="COMMAND", required=True)
    review = commands.add_parser("review", help="show statements learned per role, most frequent first")
    review.add_argument("file", type=Path, help="the review file (policy.review_file in the config)")
    review.set_defaults(handler=_policy_review)

    approve = commands.add_parser("approve", help="move learned statements into the role's policy file")
    approve.add_argument("file", type=Path)
    approve.add_argument("--role", required=True)
    chosen = approve.add_mutually_exclusive_group(required=True)
    chosen.add_argument("--all", action="store_true", help="every learned statement of the role")
    chosen.add_argument("--fingerprint", nargs="+", default=[], metavar="F")
    approve.add_argument("--policy", type=Path, help="policy file (default: the one recorded while learning)")
    approve.set_defaults(handler=_policy_approve)

    check = commands.add_parser("check", help="say what enforce mode would decide for a statement")
    check.add_argument("--config", type=Path, default=Path("/etc/pos-proxy/pos-proxy.yaml"))
    check.add_argument("--role", required=True)
    check.add_argument("sql")
    check.set_defaults(handler=_policy_check)


def _add_certs_commands(parser: argparse.ArgumentParser) -> None:
    commands = parser.add_subparsers(title="certs commands", metavar="COMMAND", required=True)

    def directory(sub: argparse.ArgumentParser) -> argparse.ArgumentParser:
        sub.add_argument("--dir", required=True, type=Path, help="PKI directory")
        return sub

    init_ca = directory(
        commands.add_parser("init-ca", help="create a CA: DIR/ca.pem, DIR/ca.key, DIR/crl.pem")
    )
    init_ca.add_argument("--name", default="pos-db-proxy dev CA", help="CA common name")
    init_ca.add_argument("--days", type=int, default=certs.DEFAULT_CA_DAYS)
    init_ca.add_argument("--force", action="store_true", help="replace an existing CA")
    init_ca.set_defaults(handler=_certs_init_ca)

    server = directory(commands.add_parser("issue-server", help="issue the proxy's server certificate"))
    server.add_argument("--dns", nargs="*", default=[], metavar="NAME")
    server.add_argument("--ip", nargs="*", default=[], metavar="ADDR")
    server.add_argument("--days", type=int, default=certs.DEFAULT_SERVER_DAYS)
    server.set_defaults(handler=_certs_issue_server)

    terminal = directory(commands.add_parser("issue-terminal", help="issue a terminal's client certificate"))
    terminal.add_argument("--store", required=True)
    terminal.add_argument("--terminal", required=True)
    terminal.add_argument("--role", required=True)
    terminal.add_argument("--days", type=int, default=certs.DEFAULT_TERMINAL_DAYS)
    terminal.set_defaults(handler=_certs_issue_terminal)

    revoke = directory(commands.add_parser("revoke", help="revoke a certificate and rewrite DIR/crl.pem"))
    revoke.add_argument("--serial", required=True, help="serial number in hex")
    revoke.set_defaults(handler=_certs_revoke)

    crl = directory(
        commands.add_parser("crl", help="re-sign DIR/crl.pem (it is valid for 7 days: run daily)")
    )
    crl.set_defaults(handler=_certs_crl)

    listing = directory(commands.add_parser("list", help="list issued certificates with their status"))
    listing.set_defaults(handler=_certs_list)


def _add_log_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--log-format", choices=("json", "console"), default="json")
    parser.add_argument("--log-level", choices=("debug", "info", "warning", "error"), default="info")


def _worker_count(text: str) -> int:
    try:
        return parse_workers(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _run(args: argparse.Namespace) -> int:
    configure_logging(json=args.log_format == "json", level=args.log_level)
    config = _load_or_report(args.config, prefix="pos-proxy: invalid configuration ")
    if config is None:
        return EXIT_FAILURE
    workers = args.workers if args.workers is not None else config.listen.workers
    if workers == 1:
        return _serve_until_stopped(serve(config))
    log_options = ["--log-format", args.log_format, "--log-level", args.log_level]
    return _serve_until_stopped(supervise(config, workers, log_options))


def _worker(args: argparse.Namespace) -> int:
    # Ctrl-C in a terminal reaches the whole process group: the supervisor turns it into SIGTERM.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # Held until the server's handler is in place: a stop during start-up then drains, not kills.
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    configure_logging(json=args.log_format == "json", level=args.log_level)
    structlog.contextvars.bind_contextvars(worker=args.index)
    config = _load_or_report(args.config, prefix="pos-proxy: invalid configuration ")
    if config is None:
        return EXIT_FAILURE
    return _serve_until_stopped(
        serve(config, WorkerSlot(args.index, args.count, args.runtime_dir, args.supervisor_pid))
    )


def _serve_until_stopped(main: Coroutine[Any, Any, int]) -> int:
    try:
        return eventloop.run(main)
    except (OSError, ValueError) as exc:
        print(f"pos-proxy: cannot start: {exc}", file=sys.stderr)
        return EXIT_FAILURE


def _load_or_report(path: Path, *, prefix: str = "") -> Config | None:
    """The configuration, or None after printing every problem with its key path."""
    try:
        return load_config(path)
    except ConfigError as exc:
        print(f"{prefix}{path}: {len(exc.problems)} problem(s)", file=sys.stderr)
        for problem in exc.problems:
            print(f"  {problem}", file=sys.stderr)
        return None


def _check_config(args: argparse.Namespace) -> int:
    config = _load_or_report(args.config)
    if config is None:
        return EXIT_FAILURE
    try:
        terminal_tls = load_terminal_tls(config.tls)
    except (OSError, ValueError) as exc:
        print(f"{args.config}: tls: cannot load the certificates: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    if terminal_tls.kept:
        print(f"{args.config}: warning: tls.crl has expired; install a fresh CRL", file=sys.stderr)
    print(f"{args.config}: OK ({len(config.routes)} route(s), {len(config.roles)} role(s))")
    return EXIT_OK


def _demo(args: argparse.Namespace) -> int:
    # Imported here: the demo brings asyncpg and the throwaway-cluster manager, which
    # `pos-proxy run` never needs.
    from proxy.demo import run_demo  # noqa: PLC0415 - only the demo needs asyncpg

    return run_demo(port=args.port, wait=not args.no_wait)


def _policy_review(args: argparse.Namespace) -> int:
    try:
        entries = read_review(args.file)
    except ReviewFileError as exc:
        print(f"pos-proxy: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    if not entries:
        print(f"{args.file}: nothing learned yet")
        return EXIT_OK
    for role in sorted({entry.role for entry in entries}):
        mine = [entry for entry in entries if entry.role == role]
        policy_file = next((entry.policy_file for entry in mine if entry.policy_file), "-")
        print(f"role {role} (policy {policy_file}): {len(mine)} statement(s) to review")
        for entry in mine:
            print(f"  {entry.fingerprint}  seen {entry.count}x  last {entry.last_seen}  {entry.text}")
    return EXIT_OK


def _policy_approve(args: argparse.Namespace) -> int:
    try:
        result = approve_statements(args.file, args.role, set(args.fingerprint) or None, args.policy)
    except PolicyFileError as exc:
        print(f"pos-proxy: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    print(f"approved {result.approved} statement(s) for role {args.role} into {result.policy_file}")
    print("reload the proxy (SIGHUP) to apply it", file=sys.stderr)
    return EXIT_OK


def _policy_check(args: argparse.Namespace) -> int:
    config = _load_or_report(args.config, prefix="pos-proxy: invalid configuration ")
    if config is None:
        return EXIT_FAILURE
    role = config.roles.get(args.role)
    if role is None:
        print(f"pos-proxy: no role {args.role!r} in {args.config}", file=sys.stderr)
        return EXIT_FAILURE
    if role.policy is None:
        print(f"allowed: role {args.role} has no policy, its statements are not filtered")
        return EXIT_OK
    decision = judge(role.policy, args.role, args.sql)
    for fingerprint, text in decision.statements:
        print(f"statement {fingerprint}: {text}")
    if decision.allowed:
        print(f"allowed by rule: {decision.rule}")
        return EXIT_OK
    print(f"refused ({decision.sqlstate}, rule: {decision.rule}): {decision.message}")
    hint = _POLICY_RULE_HINTS.get(decision.rule)
    if hint is not None:
        print(f"hint: {hint}")
    return EXIT_FAILURE


# What an operator can do about a refusal whose remedy is not obvious from the message.
_POLICY_RULE_HINTS: Final = {
    "function": (
        "functions outside the built-in safe set (docs/policies.md, Functions) run only when the role's "
        "policy lists them in allow.functions, as name (pg_catalog or the search_path) or schema.name; list "
        "only functions that read nothing the role may not read and do nothing it may not do"
    ),
    "sequence": (
        "nextval/currval/setval need the sequence in allow.sequences (those of tables in allow.write), "
        "named by a string constant such as 'sales_id_seq' or 'public.sales_id_seq'::regclass"
    ),
    "unbounded write": (
        "the WHERE clause must restrict rows by a column of the table (docs/policies.md, Structural rules); "
        "allow.update_without_where: true lifts the rule"
    ),
}


def _admin_disconnect(args: argparse.Namespace) -> int:
    store, terminal = (urllib.parse.quote(part, safe="") for part in (args.store, args.terminal))
    args.method, args.path = "POST", f"/v1/terminals/{store}/{terminal}/disconnect"
    return _admin_call(args)


def _admin_close_idle(args: argparse.Namespace) -> int:
    args.method, args.path = "POST", f"/v1/pools/{urllib.parse.quote(args.route, safe='')}/close-idle"
    return _admin_call(args)


def _admin_call(args: argparse.Namespace) -> int:
    request = urllib.request.Request(
        args.url.rstrip("/") + args.path, method=args.method, data=b"" if args.method == "POST" else None
    )
    if args.token_file is not None:
        request.add_header("Authorization", "Bearer " + args.token_file.read_text(encoding="utf-8").strip())
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            body = response.read().decode()
    except urllib.error.HTTPError as exc:
        print(
            f"pos-proxy: {args.path}: HTTP {exc.code}: {exc.read().decode(errors='replace')}", file=sys.stderr
        )
        return EXIT_FAILURE
    except OSError as exc:
        print(f"pos-proxy: cannot reach the admin API at {args.url}: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    print(json.dumps(json.loads(body), indent=2))
    return EXIT_OK


def _certs_init_ca(args: argparse.Namespace) -> int:
    path = certs.init_ca(args.dir, common_name=args.name, days=args.days, force=args.force)
    print(f"CA written to {path} (key {args.dir / 'ca.key'}, CRL {args.dir / 'crl.pem'})")
    return EXIT_OK


def _certs_issue_server(args: argparse.Namespace) -> int:
    issued = certs.issue_server(args.dir, dns_names=args.dns, ip_addresses=args.ip, days=args.days)
    print(
        f"server certificate {issued.cert_path} serial {issued.serial_hex}, "
        f"valid until {issued.not_after:%Y-%m-%d}"
    )
    return EXIT_OK


def _certs_issue_terminal(args: argparse.Namespace) -> int:
    issued = certs.issue_terminal(
        args.dir, store=args.store, terminal=args.terminal, role=args.role, days=args.days
    )
    print(issued.serial_hex)
    print(
        f"terminal {issued.store}/{issued.terminal} role {issued.role}: {issued.cert_path} "
        f"valid until {issued.not_after:%Y-%m-%d}",
        file=sys.stderr,
    )
    return EXIT_OK


def _certs_revoke(args: argparse.Namespace) -> int:
    issued = certs.revoke(args.dir, certs.parse_serial(args.serial))
    print(f"revoked serial {issued.serial_hex} ({issued.subject}); CRL rewritten: {args.dir / 'crl.pem'}")
    print("reload the proxy (SIGHUP) or restart it so the new CRL takes effect", file=sys.stderr)
    return EXIT_OK


def _certs_crl(args: argparse.Namespace) -> int:
    path = certs.write_crl(args.dir)
    print(f"CRL re-signed: {path}")
    return EXIT_OK


def _certs_list(args: argparse.Namespace) -> int:
    rows = [("KIND", "SERIAL", "STATUS", "STORE", "TERMINAL", "ROLE", "NOT AFTER", "SUBJECT")]
    for issued in certs.list_issued(args.dir):
        rows.append(
            (
                issued.kind,
                issued.serial_hex,
                issued.status(),
                issued.store or "-",
                issued.terminal or "-",
                issued.role or "-",
                f"{issued.not_after:%Y-%m-%d}",
                issued.subject,
            )
        )
    widths = [max(len(row[column]) for row in rows) for column in range(len(rows[0]) - 1)]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=False)) + "  " + row[-1])
    return EXIT_OK
