"""The demo: throwaway PostgreSQL, dev certificates, the proxy in front, and a sample POS session."""

from __future__ import annotations

import asyncio
import json
import secrets
import shlex
import shutil
import signal
import ssl
import sys
import tempfile
from contextlib import AsyncExitStack
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from string import Template

import asyncpg

from proxy import certs, eventloop
from proxy.config.load import load_config
from proxy.localpg import LocalPostgres, LocalPostgresError, LocalPostgresTLS, free_port
from proxy.oplog import configure_logging
from proxy.protocols.postgres.session import Route
from proxy.server import ProxyServer

DEMO_STORE = "store-001"
DEMO_TERMINALS = (("till-01", "cashier"), ("office-01", "manager"))
# Extra tills for the rush-hour part of the demo: many terminals, few server connections.
DEMO_RUSH_TILLS = tuple(f"till-{number:02d}" for number in range(2, 13))


@dataclass(frozen=True, slots=True)
class DemoTerminal:
    name: str
    role: str
    cert: Path
    key: Path


def run_demo(*, port: int, wait: bool) -> int:
    workdir = Path(tempfile.mkdtemp(prefix="pos-proxy-demo-"))
    configure_logging(json=True, level="info", stream=(workdir / "proxy.log").open("a", encoding="utf-8"))
    try:
        code = eventloop.run(_demo(workdir, port, wait))
        return _report_internal_errors(workdir / "proxy.log") or code
    except LocalPostgresError as exc:
        print(f"pos-proxy demo: cannot start the demo database: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"pos-proxy demo: {exc} (is port {port} free? pick another with --port N)", file=sys.stderr)
        return 1
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def _report_internal_errors(log_path: Path) -> int:
    """1 after printing them if the proxy logged ``internal_error`` events (bugs), else 0: the
    log goes with the work directory, and a demo that passed over a bug would hide it."""
    errors = []
    for line in log_path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            event = json.loads(line)
        except ValueError:
            continue
        if isinstance(event, dict) and event.get("event") == "internal_error":
            errors.append(f"  {event.get('message')}: {event.get('error')}\n{event.get('traceback', '')}")
    if errors:
        print(f"pos-proxy demo: the proxy logged {len(errors)} internal error(s):", file=sys.stderr)
        print("\n".join(errors), file=sys.stderr)
        return 1
    return 0


async def _demo(workdir: Path, port: int, wait: bool) -> int:
    say(f"pos-db-proxy demo, working in {workdir} (removed on exit)")
    terminal_pki, db_pki = workdir / "pki", workdir / "db-pki"
    certs.init_ca(terminal_pki, common_name="pos-db-proxy demo terminal CA")
    certs.issue_server(terminal_pki, dns_names=["localhost"], ip_addresses=["127.0.0.1", "::1"])
    terminals = [_issue(terminal_pki, name, role) for name, role in DEMO_TERMINALS]
    # The "cloud" database has a CA of its own: the proxy verifies it (verify-full) like a real one.
    certs.init_ca(db_pki, common_name="pos-db-proxy demo database CA")
    certs.issue_server(db_pki, dns_names=["localhost"], ip_addresses=["127.0.0.1"])

    async with AsyncExitStack() as stack:
        database = LocalPostgres(
            workdir / "postgres",
            tls=LocalPostgresTLS(cert=db_pki / "server.pem", key=db_pki / "server.key"),
        )
        database.start()
        stack.callback(database.stop)
        db_password = secrets.token_urlsafe(24)
        database.create_role("pos_proxy", db_password)
        database.create_database("pos", owner="pos_proxy")
        schema = resources.files("proxy").joinpath("data/demo_schema.sql").read_text(encoding="utf-8")
        database.execute_script("SET ROLE pos_proxy;\n" + schema, dbname="pos")
        say(f"started a throwaway PostgreSQL on 127.0.0.1:{database.port} with the POS schema (TLS on)")

        password_file = workdir / "db-password"
        password_file.touch(mode=0o600)
        password_file.write_text(db_password, encoding="utf-8")
        policies = workdir / "policies"
        policies.mkdir()
        for policy in resources.files("proxy").joinpath("data/policies").iterdir():
            (policies / policy.name).write_text(policy.read_text(encoding="utf-8"), encoding="utf-8")
        audit_dir = workdir / "audit"
        audit_dir.mkdir(mode=0o700)
        audit_key = workdir / "audit.key"
        audit_key.touch(mode=0o600)
        audit_key.write_bytes(secrets.token_bytes(32))
        witness_dir = workdir / "witness"
        witness_dir.mkdir(mode=0o700)
        audit_witness = witness_dir / "audit.witness"
        admin_token_file = workdir / "admin-token"
        admin_token_file.touch(mode=0o600)
        admin_token_file.write_text(secrets.token_urlsafe(32), encoding="utf-8")
        config_path = workdir / "pos-proxy.yaml"
        template = resources.files("proxy").joinpath("data/demo-config.yaml").read_text(encoding="utf-8")
        config_path.write_text(
            Template(template).substitute(
                proxy_port=port or free_port(),
                admin_port=free_port(),
                admin_token_file=admin_token_file,
                audit_file=audit_dir / "audit.log",
                audit_key=audit_key,
                audit_witness=audit_witness,
                pki=terminal_pki,
                db_port=database.port,
                db_password_file=password_file,
                db_ca=db_pki / "ca.pem",
            ),
            encoding="utf-8",
        )
        server = ProxyServer(load_config(config_path))
        stack.push_async_callback(server.shutdown)
        await server.start()
        host, proxy_port = server.address
        say(f"proxy listening on {host}:{proxy_port} (config {config_path}, log {workdir / 'proxy.log'})")
        if server.admin is not None:
            say(f"metrics: http://127.0.0.1:{server.admin.port}/metrics (admin token in {admin_token_file})")
            # The token is read by the shell, so it stays out of the terminal's scrollback.
            token_header = f'"Authorization: Bearer $(cat {shlex.quote(str(admin_token_file))})"'
            say(
                f"call the admin API: curl -sS -H {token_header} http://127.0.0.1:{server.admin.port}/v1/pools"
            )
        say(f"audit log: {audit_dir / 'audit.log'}")
        say(f"audit key: {audit_key}")

        cashier = terminals[0]
        await _sample_session(host, proxy_port, terminal_pki / "ca.pem", cashier)
        rush = [_issue(terminal_pki, name, "cashier", announce=False) for name in DEMO_RUSH_TILLS]
        await _rush_hour(host, proxy_port, terminal_pki / "ca.pem", [cashier, *rush], server.routes["pos"])
        await _policy_tour(host, proxy_port, terminal_pki / "ca.pem", cashier, terminals[1])
        await _outage(host, proxy_port, terminal_pki / "ca.pem", cashier, database)

        verify = ["pos-proxy", "audit", "verify", "--key", str(audit_key), "--witness", str(audit_witness)]
        say(f"check the audit log: {shlex.join([*verify, str(audit_dir / 'audit.log')])}")
        say("try it by hand, one line per role:")
        for terminal in terminals:
            say(f"  {terminal.role} ({DEMO_STORE}/{terminal.name}):")
            say(_psql_line(host, proxy_port, terminal_pki / "ca.pem", terminal))
        if wait:
            say("press Ctrl-C to stop the demo and remove everything it started")
            await _wait_for_stop_signal()
        say("stopping the proxy and the demo database")
    return 0


def _issue(pki: Path, name: str, role: str, *, announce: bool = True) -> DemoTerminal:
    issued = certs.issue_terminal(pki, store=DEMO_STORE, terminal=name, role=role)
    if announce:
        say(f"issued terminal certificate {DEMO_STORE}/{name} role={role} serial={issued.serial_hex}")
    return DemoTerminal(name, role, issued.cert_path, issued.key_path)


async def _connect(host: str, port: int, ca: Path, terminal: DemoTerminal) -> asyncpg.Connection:
    context = ssl.create_default_context(cafile=str(ca))
    context.load_cert_chain(terminal.cert, terminal.key)
    return await asyncpg.connect(
        host=host, port=port, user=terminal.name, database="pos", ssl=context, timeout=15
    )


async def _rush_hour(host: str, port: int, ca: Path, tills: list[DemoTerminal], route: Route) -> None:
    """Every till rings up sales at once: transaction pooling lends them a few server connections."""
    connections = await asyncio.gather(*(_connect(host, port, ca, till) for till in tills))
    try:

        async def ring_up(connection: asyncpg.Connection, till: DemoTerminal) -> None:
            for _ in range(3):
                async with connection.transaction():
                    sale_id = await connection.fetchval(
                        "INSERT INTO sales (store_id, terminal_id, total_cents) "
                        "VALUES ($1, $2, 59) RETURNING id",
                        DEMO_STORE,
                        till.name,
                    )
                    await connection.execute(
                        "INSERT INTO sale_items (sale_id, sku, quantity, price_cents) VALUES ($1, $2, 1, 59)",
                        sale_id,
                        "4311501012345",
                    )

        await asyncio.gather(*(ring_up(c, t) for c, t in zip(connections, tills, strict=True)))
        sales = await connections[0].fetchval("SELECT count(*) FROM sales WHERE terminal_id LIKE 'till-%'")
    finally:
        await asyncio.gather(*(connection.close() for connection in connections))
    stats = route.pool.stats()
    say(
        f"rush hour: {len(tills)} tills rang up {len(tills) * 3} sales at once over "
        f"{stats.opened_total} server connection(s) (pool size {stats.size}, "
        f"{route.config.pool.mode.value} pooling); {sales} till sales on record"
    )


async def _policy_tour(host: str, port: int, ca: Path, cashier: DemoTerminal, manager: DemoTerminal) -> None:
    """The role policies at work: what a stolen till may not do, and what the office may."""
    connection = await _connect(host, port, ca, cashier)
    try:
        for statement in (
            "DROP TABLE sales",
            "SELECT pg_sleep(1)",
            "SELECT setval('sales_id_seq', 1)",
            "SELECT sku, price_cents FROM products; DELETE FROM sales",
        ):
            try:
                await connection.execute(statement)
                say(f"  cashier ran {statement!r} (unexpected)")
            except asyncpg.PostgresError as exc:
                say(f"policy: cashier refused {statement!r}: {exc.sqlstate} {exc}")
        still = await connection.fetchval("SELECT count(*) FROM products")
        say(f"policy: the cashier's session goes on ({still} products visible)")
    finally:
        await connection.close()
    connection = await _connect(host, port, ca, manager)
    try:
        report = await connection.fetch(
            "SELECT terminal_id, count(*) AS sales, sum(total_cents) AS total_cents "
            "FROM sales GROUP BY terminal_id ORDER BY total_cents DESC LIMIT 3"
        )
        top = ", ".join(
            f"{row['terminal_id']} {row['sales']} sales {row['total_cents'] / 100:.2f}" for row in report
        )
        say(f"policy: manager ran the sales report: {top}")
    finally:
        await connection.close()


async def _outage(host: str, port: int, ca: Path, till: DemoTerminal, database: LocalPostgres) -> None:
    """The cloud database goes away for a moment: a till's sale waits for it instead of failing."""
    connection = await _connect(host, port, ca, till)
    try:
        # pg_ctl blocks for a moment, and this event loop also runs the proxy.
        await asyncio.to_thread(database.stop_server_only)
        say(f"outage: the database is down; {DEMO_STORE}/{till.name} rings up a sale anyway")
        sale = asyncio.ensure_future(
            connection.fetchval(
                "INSERT INTO sales (store_id, terminal_id, total_cents) VALUES ($1, $2, 99) RETURNING id",
                DEMO_STORE,
                till.name,
            )
        )
        await asyncio.sleep(_OUTAGE_SECONDS)
        await asyncio.to_thread(database.start_server_only)
        sale_id = await asyncio.wait_for(sale, 30)
        say(
            f"outage: the database was back after {_OUTAGE_SECONDS:g} s; the waiting sale went through "
            f"as sale {sale_id}, no error (the proxy retried the connection with backoff)"
        )
    finally:
        await connection.close()


# Shorter than the demo route's max_client_wait (10 s): the till waits, it is not refused.
_OUTAGE_SECONDS = 2.0


async def _sample_session(host: str, port: int, ca: Path, terminal: DemoTerminal) -> None:
    """What a till does for one sale: look up, record the sale, decrement stock, read it back."""
    connection = await _connect(host, port, ca, terminal)
    try:
        say(f"sample POS session as {DEMO_STORE}/{terminal.name} ({terminal.role}):")
        sku = "5000159484695"
        product = await connection.fetchrow("SELECT sku, name, price_cents FROM products WHERE sku = $1", sku)
        assert product is not None
        say(f"  looked up {product['name']} at {product['price_cents'] / 100:.2f}")
        async with connection.transaction():
            sale_id = await connection.fetchval(
                "INSERT INTO sales (store_id, terminal_id, total_cents) VALUES ($1, $2, $3) RETURNING id",
                DEMO_STORE,
                terminal.name,
                product["price_cents"] * 2,
            )
            await connection.execute(
                "INSERT INTO sale_items (sale_id, sku, quantity, price_cents) VALUES ($1, $2, 2, $3)",
                sale_id,
                sku,
                product["price_cents"],
            )
            await connection.execute(
                "UPDATE stock SET quantity = quantity - 2 WHERE store_id = $1 AND sku = $2", DEMO_STORE, sku
            )
        say(f"  recorded sale {sale_id}: 2 x {product['name']}")
        quantity = await connection.fetchval(
            "SELECT quantity FROM stock WHERE store_id = $1 AND sku = $2", DEMO_STORE, sku
        )
        total = await connection.fetchval("SELECT total_cents FROM sales WHERE id = $1", sale_id)
        say(f"  read back: sale {sale_id} total {total / 100:.2f}, stock of {sku} now {quantity}")
    finally:
        await connection.close()


def _psql_line(host: str, port: int, ca: Path, terminal: DemoTerminal) -> str:
    settings = {
        "host": host,
        "port": str(port),
        "dbname": "pos",
        "user": terminal.name,
        "sslmode": "verify-full",
        "sslrootcert": str(ca.resolve()),
        "sslcert": str(terminal.cert.resolve()),
        "sslkey": str(terminal.key.resolve()),
    }
    conninfo = " ".join(f"{name}={_conninfo_value(value)}" for name, value in settings.items())
    return f"psql {shlex.quote(conninfo)}"


def _conninfo_value(value: str) -> str:
    """A libpq conninfo value, quoted when it holds spaces or quotes (a TMPDIR may)."""
    if value and not any(character in value for character in " '\\"):
        return value
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


async def _wait_for_stop_signal() -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    try:
        await stop.wait()
    finally:
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(signum)


def say(line: str) -> None:
    print(line, flush=True)
