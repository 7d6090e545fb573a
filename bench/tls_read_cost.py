"""What a TLS round trip costs a bare uvloop server with glibc's default allocator thresholds and
with proxy.allocator's: the reason the proxy sets them (see proxy/allocator.py).

    .venv/bin/python bench/tls_read_cost.py               # 3 interleaved rounds of 6 s, 32 clients

Each round starts a fresh echo server process per mode (glibc's thresholds move with a process's
history, so only a new process shows the defaults) and one client process that keeps 32 TLS
connections (client certificates verified) echoing 128-byte messages. Printed: the server's CPU
time per round trip, median of the rounds, and the ratio. Loopback only.
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

from proxy import allocator, certs

MODES = ("default", "tuned")
MESSAGE_SIZE = 128

CLIENT = """
import asyncio, ssl, sys, time
ca, cert, key, port, clients, seconds = sys.argv[1:7]  # and the message size
context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
context.load_verify_locations(ca)
context.load_cert_chain(cert, key)
async def echo(stop):
    reader, writer = await asyncio.open_connection(
        "127.0.0.1", int(port), ssl=context, server_hostname="localhost"
    )
    message = bytes(int(sys.argv[7]))
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
    round_trips = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        Echo.round_trips += len(data) // MESSAGE_SIZE
        self.transport.write(data)  # type: ignore[attr-defined]


async def serve(pki: Path) -> None:
    """Echo until stdin closes, then print CPU seconds used since listening and round trips."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(pki / "server.pem", pki / "server.key")
    context.load_verify_locations(cafile=str(pki / "ca.pem"))
    context.verify_mode = ssl.CERT_REQUIRED
    loop = asyncio.get_running_loop()
    server = await loop.create_server(Echo, "127.0.0.1", 0, ssl=context)
    started = os.times()
    print(server.sockets[0].getsockname()[1], flush=True)
    await loop.run_in_executor(None, sys.stdin.read)
    used = os.times()
    cpu = used.user + used.system - started.user - started.system
    print(f"{cpu} {Echo.round_trips}", flush=True)
    server.close()


def measure(pki: Path, mode: str, clients: int, seconds: float) -> float:
    """Server CPU microseconds per round trip for one fresh server process in ``mode``."""
    with subprocess.Popen(
        [sys.executable, __file__, "--serve", mode, str(pki)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    ) as server:
        assert server.stdin is not None and server.stdout is not None
        port = server.stdout.readline().strip()
        terminal = next((pki / "terminals").glob("*.pem"))
        subprocess.run(
            [
                *(sys.executable, "-c", CLIENT, str(pki / "ca.pem"), str(terminal)),
                *(str(terminal.with_suffix(".key")), port, str(clients), str(seconds), str(MESSAGE_SIZE)),
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
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=6.0)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--serve", nargs=2, metavar=("MODE", "PKI"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        mode, pki = args.serve
        if mode == "tuned":
            allocator.keep_read_buffers_on_heap()
        uvloop.run(serve(Path(pki)))
        return 0
    costs: dict[str, list[float]] = {mode: [] for mode in MODES}
    with tempfile.TemporaryDirectory(prefix="pos-tls-read-") as work:
        pki = Path(work)
        certs.init_ca(pki)
        certs.issue_server(pki, dns_names=["localhost"], ip_addresses=["127.0.0.1"])
        certs.issue_terminal(pki, store="bench", terminal="till-01", role="cashier")
        for round_number in range(args.rounds):
            # Alternating the order spreads a noisy neighbour over both modes.
            for mode in MODES if round_number % 2 == 0 else reversed(MODES):
                cost = measure(pki, mode, args.clients, args.seconds)
                costs[mode].append(cost)
                print(f"round {round_number + 1}/{args.rounds} {mode}: {cost:.1f} us server CPU a round trip")
    default, tuned = (statistics.median(costs[mode]) for mode in MODES)
    print(f"median: default thresholds {default:.1f} us, proxy.allocator's {tuned:.1f} us")
    print(f"ratio tuned/default: {tuned / default:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
