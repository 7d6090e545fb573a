"""What an idle TLS connection costs a bare uvloop server, without any proxy code: the floor
under the proxy's per-connection memory (bench/run.py's idle test measures the proxy itself),
on uvloop's TLS layer and on the proxy's own (proxy.tlstransport, used for terminals).

    .venv/bin/python bench/idle_tls_floor.py            # 1000 connections, 3 interleaved rounds

Every measurement is a fresh server process (memory freed by an earlier one would be reused and
hide part of the cost), with proxy.allocator's settings as the proxy runs with them. A throwaway
CA, server and terminal certificate are made with proxy.certs; the clients run in a separate
process so only the server's RSS is measured. Printed: KiB per idle connection, median of the
rounds, with and without client certificates verified. Loopback only.
"""

from __future__ import annotations

import argparse
import asyncio
import resource
import ssl
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import uvloop
from tls_layers import LAYERS, listen, make_pki, server_context, terminal_files

from proxy import allocator

CLIENT = """
import asyncio, ssl, sys
ca, cert, key, port, count = sys.argv[1:6]
context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
context.load_verify_locations(ca)
if cert != "-":
    context.load_cert_chain(cert, key)
async def main():
    held = []
    for _ in range(int(count)):
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", int(port), ssl=context, server_hostname="localhost"
        )
        writer.write(b"hello")
        await reader.readexactly(2)
        held.append(writer)
    print("open", flush=True)
    await asyncio.sleep(120)
asyncio.run(main())
"""


def rss_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


class Idle(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.transport.write(b"ok")  # type: ignore[attr-defined]


async def measure(pki: Path, layer: str, count: int, client_certs: bool) -> float:
    context = server_context(pki, ssl.CERT_OPTIONAL if client_certs else ssl.CERT_NONE)
    port, stop = await listen(layer, Idle, context)
    cert, key = (str(path) for path in terminal_files(pki)) if client_certs else ("-", "-")
    loop = asyncio.get_running_loop()
    before = rss_kib()
    # Started once per measurement, before the clients connect: nothing else on the loop to block.
    with subprocess.Popen(  # noqa: ASYNC220
        [sys.executable, "-c", CLIENT, str(pki / "ca.pem"), cert, key, str(port), str(count)],
        stdout=subprocess.PIPE,
    ) as clients:
        assert clients.stdout is not None
        ready = await asyncio.wait_for(loop.run_in_executor(None, clients.stdout.readline), 120)
        if ready.strip() != b"open":
            raise RuntimeError("the client process could not open its connections")
        await asyncio.sleep(1)
        per_connection = (rss_kib() - before) / count
        clients.kill()
    stop()
    return per_connection


def measure_in_fresh_process(pki: Path, layer: str, count: int, client_certs: bool) -> float:
    argv = [sys.executable, __file__, "--measure", layer, str(pki), "--connections", str(count)]
    if client_certs:
        argv.append("--client-certs")
    done = subprocess.run(argv, check=True, capture_output=True, text=True, timeout=300)
    return float(done.stdout)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--connections", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--measure", nargs=2, metavar=("LAYER", "PKI"), help=argparse.SUPPRESS)
    parser.add_argument("--client-certs", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, max(soft, 4 * args.connections)), hard))
    if args.measure:
        layer, pki = args.measure
        allocator.keep_read_buffers_on_heap()
        print(uvloop.run(measure(Path(pki), layer, args.connections, args.client_certs)))
        return 0
    kib: dict[tuple[bool, str], list[float]] = {}
    with tempfile.TemporaryDirectory(prefix="pos-idle-floor-") as work:
        pki = make_pki(Path(work))
        for round_number in range(args.rounds):
            # Alternating the order spreads a noisy neighbour over both layers.
            for layer in LAYERS if round_number % 2 == 0 else reversed(LAYERS):
                for client_certs in (False, True):
                    cost = measure_in_fresh_process(pki, layer, args.connections, client_certs)
                    kib.setdefault((client_certs, layer), []).append(cost)
                    print(
                        f"round {round_number + 1}/{args.rounds} {layer} TLS layer, client certs "
                        f"{'verified' if client_certs else 'none'}: {cost:.1f} KiB per idle connection"
                    )
    for client_certs in (False, True):
        label = "with client certificates verified" if client_certs else "without client certificates"
        medians = ", ".join(
            f"{layer}'s TLS layer {statistics.median(kib[client_certs, layer]):.1f}" for layer in LAYERS
        )
        print(f"median KiB per idle connection {label}: {medians}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
