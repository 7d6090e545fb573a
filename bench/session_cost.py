"""CPU cost of the proxy's own Python per transaction, without sockets or TLS: the whole data
path (client session, transaction pooling hand-over, server connection, codec, metrics) as
the proxy runs it, driven by pgbench's `-S -M extended` messages.

    .venv/bin/python bench/session_cost.py               # median of 7 runs, in microseconds
    .venv/bin/python bench/session_cost.py --profile     # plus where the time goes (cProfile)

Two terminals share one server connection, as when 64 pgbench clients share 20: the first
borrows the idle connection, the second waits in line and gets it handed over when the first's
ReadyForQuery comes back. Transports are stand-ins that keep what is written; the rest is the
real ProxyServer, ClientSession, UpstreamPool and ServerConnection. What bench/run.py measures
on top of this is the event loop, TLS and the kernel (bench/lean_pooler.py shows that floor).
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import pstats
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml
from codec_cost import CLIENT, SERVER  # bench/ is on sys.path when this runs as a script
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from proxy import certs
from proxy.config import load_config
from proxy.oplog import configure_logging
from proxy.protocols.postgres import messages as m
from proxy.protocols.postgres.session import ClientSession
from proxy.protocols.postgres.upstream import ServerConnection
from proxy.server import ProxyServer

SERVER_PARAMETERS = {"server_version": "15.0", "client_encoding": "UTF8", "DateStyle": "ISO, MDY"}
TERMINALS = 2
ROUNDS = 5_000  # each round is one transaction per terminal
RUNS = 7


class SSLObjectStandIn:
    def __init__(self, certificate: bytes) -> None:
        self._certificate = certificate

    def getpeercert(self, binary_form: bool = False) -> bytes:
        return self._certificate

    def selected_alpn_protocol(self) -> str | None:
        return None

    def version(self) -> str:
        return "TLSv1.3"

    def cipher(self) -> tuple[str, str, int]:
        return ("TLS_AES_256_GCM_SHA384", "TLSv1.3", 256)


class TransportStandIn:
    """Keeps what is written; no more of an asyncio transport than the data path uses."""

    def __init__(self, ssl_object: SSLObjectStandIn | None = None) -> None:
        self.written: list[bytes] = []
        self._extra = {"ssl_object": ssl_object, "peername": ("127.0.0.1", 40000)}

    def write(self, data: bytes) -> None:
        self.written.append(data)

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self._extra.get(name, default)

    def is_closing(self) -> bool:
        return False

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def close(self) -> None:
        raise AssertionError("the data path closed a transport: the simulated session broke")

    abort = close


def write_config(directory: Path) -> Path:
    certs.init_ca(directory)
    certs.issue_server(directory, dns_names=["localhost"], ip_addresses=["127.0.0.1"])
    config = {
        "listen": {"host": "127.0.0.1", "port": 6432},  # never opened here
        "tls": {
            "cert": str(directory / "server.pem"),
            "key": str(directory / "server.key"),
            "client_ca": str(directory / "ca.pem"),
        },
        "roles": {"cashier": {"description": "tills"}},
        "routes": {
            "pos": {
                "host": "127.0.0.1",
                "port": 5432,
                "user": "bench",
                "sslmode": "disable",
                "pool": {"mode": "transaction", "size": 1},
            }
        },
    }
    path = directory / "pos-proxy.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return path


async def build(directory: Path) -> tuple[list[ClientSession], list[TransportStandIn], ServerConnection]:
    proxy = ProxyServer(load_config(write_config(directory)))
    route = proxy.routes["pos"]
    route.server_parameters.update(SERVER_PARAMETERS)
    server = ServerConnection(route.config, on_closed=lambda _connection: None)
    server.connection_made(TransportStandIn())  # type: ignore[arg-type]
    server.reported.update(SERVER_PARAMETERS)
    # A connection opened without a socket joins the pool the way _attempt adds one.
    route.pool._members.add(server)
    route.pool._idle.append(server)
    terminal = certs.issue_terminal(directory, store="bench", terminal="till-01", role="cashier")
    pem = terminal.cert_path.read_bytes()
    certificate = x509.load_pem_x509_certificate(pem).public_bytes(serialization.Encoding.DER)
    sessions, transports = [], []
    for index in range(TERMINALS):
        session = ClientSession(proxy._environment, f"127.0.0.1:{40000 + index}")
        transport = TransportStandIn(SSLObjectStandIn(certificate))
        session.connection_made(transport)  # type: ignore[arg-type]
        session.data_received(m.build_startup_message({"user": "bench-till-01", "database": "pos"}))
        if not transport.written or transport.written[-1][-6:] != m.build_ready_for_query(b"I"):
            raise AssertionError(f"terminal {index} was not let in: {transport.written!r}")
        sessions.append(session)
        transports.append(transport)
    return sessions, transports, server


def run_rounds(sessions: list[ClientSession], server: ServerConnection, rounds: int) -> None:
    for _ in range(rounds):
        for session in sessions:
            session.data_received(CLIENT)  # the first borrows the connection, the rest wait
        for _ in sessions:
            server.data_received(SERVER)  # each reply lends the connection to the next in line


def check(transports: list[TransportStandIn], server: ServerConnection, rounds: int) -> None:
    for transport in transports:
        answers = sum(1 for data in transport.written if data.endswith(m.build_ready_for_query(b"I")))
        if answers < rounds:
            raise AssertionError(f"a terminal got {answers} answers for {rounds} transactions")
        transport.written.clear()
    server_transport = server._transport
    assert isinstance(server_transport, TransportStandIn)
    server_transport.written.clear()


async def measure(profile: bool) -> None:
    with tempfile.TemporaryDirectory(prefix="pos-session-cost-") as work:
        sessions, transports, server = await build(Path(work))
        run_rounds(sessions, server, 500)  # warm caches (policy decisions, statement classes)
        check(transports, server, 500)
        costs = []
        for _ in range(RUNS):
            started = time.perf_counter()
            run_rounds(sessions, server, ROUNDS)
            costs.append((time.perf_counter() - started) / (ROUNDS * TERMINALS) * 1e6)
            check(transports, server, ROUNDS)
        print(
            f"proxy Python per select-extended transaction: {statistics.median(costs):.2f} us "
            f"(median of {RUNS} runs of {ROUNDS * TERMINALS:,})"
        )
        if profile:
            profiler = cProfile.Profile()
            profiler.runcall(run_rounds, sessions, server, ROUNDS)
            pstats.Stats(profiler).sort_stats("tottime").print_stats(25)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--profile", action="store_true", help="also print a cProfile of one run")
    configure_logging(json=False, level="error")  # session_start lines would only get in the way
    asyncio.run(measure(parser.parse_args().profile))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
