"""What a TLS round trip costs a bare uvloop server: on uvloop's TLS layer with glibc's default
allocator thresholds (``default``) and with proxy.allocator's (``tuned``), and on the proxy's own
TLS layer for terminals, proxy.tlstransport, with proxy.allocator's (``proxy``).

    .venv/bin/python bench/tls_read_cost.py                         # uvloop's layer vs the proxy's
    .venv/bin/python bench/tls_read_cost.py --modes default tuned   # why proxy/allocator.py exists
    .venv/bin/python bench/tls_read_cost.py --size 8192             # larger messages

Each round starts a fresh echo server process per mode (glibc's thresholds move with a process's
history, so only a new process shows the defaults) and one client process that keeps 32 TLS
connections (client certificates verified) echoing messages of ``--size`` bytes. Printed: the
server's CPU time per round trip, median of the rounds, and the ratio to the first mode. Loopback only.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import ssl
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import uvloop
from tls_layers import listen, make_pki, server_context, terminal_files

from proxy import allocator

# mode: (TLS layer, whether proxy.allocator's thresholds are set)
MODES = {"default": ("uvloop", False), "tuned": ("uvloop", True), "proxy": ("proxy", True)}

CLIENT = """
import asyncio, ssl, sys, time
ca, cert, key, port, clients, seconds, size = sys.argv[1:8]
context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
context.load_verify_locations(ca)
context.load_cert_chain(cert, key)
async def echo(stop):
    reader, writer = await asyncio.open_connection(
        "127.0.0.1", int(port), ssl=context, server_hostname="localhost"
    )
    message = bytes(int(size))
    while time.monotonic() < stop:
        writer.write(message)
        await reader.readexactly(len(message))
    writer.close()
async def main():
    stop = time.monotonic() + float(seconds)
    await asyncio.gather(*(echo(stop) for _ in range(int(clients))))
asyncio.run(main())
"""


class Echo(asyncio.Protocol):
    echoed = 0  # bytes, all connections

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        Echo.echoed += len(data)
        self.transport.write(data)  # type: ignore[attr-defined]


async def serve(pki: Path, layer: str, size: int) -> None:
    """Echo until stdin closes, then print CPU seconds used since listening and round trips."""
    port, stop = await listen(layer, Echo, server_context(pki, ssl.CERT_REQUIRED))
    started = os.times()
    print(port, flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    used = os.times()
    cpu = used.user + used.system - started.user - started.system
    print(f"{cpu} {Echo.echoed // size}", flush=True)
    stop()


def measure(pki: Path, mode: str, clients: int, seconds: float, size: int) -> float:
    """Server CPU microseconds per round trip for one fresh server process in ``mode``."""
    with subprocess.Popen(
        [sys.executable, __file__, "--serve", mode, str(pki), "--size", str(size)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    ) as server:
        assert server.stdin is not None and server.stdout is not None
        port = server.stdout.readline().strip()
        cert, key = terminal_files(pki)
        subprocess.run(
            [
                *(sys.executable, "-c", CLIENT, str(pki / "ca.pem"), str(cert), str(key)),
                *(port, str(clients), str(seconds), str(size)),
            ],
            check=True,
            timeout=seconds + 60,
        )
        server.stdin.close()
        cpu, round_trips = server.stdout.readline().split()
        server.wait(timeout=30)
    return float(cpu) * 1e6 / max(int(round_trips), 1)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--modes", nargs="+", choices=sorted(MODES), default=["tuned", "proxy"])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=6.0)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--size", type=int, default=128, help="bytes per message")
    parser.add_argument("--serve", nargs=2, metavar=("MODE", "PKI"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        mode, pki = args.serve
        layer, tuned = MODES[mode]
        if tuned:
            allocator.keep_read_buffers_on_heap()
        uvloop.run(serve(Path(pki), layer, args.size))
        return 0
    costs: dict[str, list[float]] = {mode: [] for mode in args.modes}
    with tempfile.TemporaryDirectory(prefix="pos-tls-read-") as work:
        pki = make_pki(Path(work))
        for round_number in range(args.rounds):
            # Alternating the order spreads a noisy neighbour over the modes.
            for mode in args.modes if round_number % 2 == 0 else reversed(args.modes):
                cost = measure(pki, mode, args.clients, args.seconds, args.size)
                costs[mode].append(cost)
                print(f"round {round_number + 1}/{args.rounds} {mode}: {cost:.1f} us server CPU a round trip")
    medians = {mode: statistics.median(costs[mode]) for mode in args.modes}
    first = args.modes[0]
    print("median: " + ", ".join(f"{mode} {cost:.1f} us" for mode, cost in medians.items()))
    for mode in args.modes[1:]:
        print(f"ratio {mode}/{first}: {medians[mode] / medians[first]:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
