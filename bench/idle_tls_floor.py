"""What an idle TLS connection costs a bare uvloop server, without any proxy code: the floor
under the proxy's per-connection memory (bench/run.py's idle test measures the proxy itself).

    .venv/bin/python bench/idle_tls_floor.py            # 1000 connections, with and without client certs

A throwaway CA, server and terminal certificate are made with proxy.certs; the clients run in a
separate process so only the server's RSS is measured. Loopback only.
"""

from __future__ import annotations

import argparse
import asyncio
import resource
import ssl
import subprocess
import sys
import tempfile
from pathlib import Path

import uvloop

from proxy import certs

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


async def measure(pki: Path, count: int, client_certs: bool) -> float:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(pki / "server.pem", pki / "server.key")
    context.load_verify_locations(cafile=str(pki / "ca.pem"))
    context.verify_mode = ssl.CERT_OPTIONAL if client_certs else ssl.CERT_NONE
    loop = asyncio.get_running_loop()
    server = await loop.create_server(Idle, "127.0.0.1", 0, ssl=context)
    port = server.sockets[0].getsockname()[1]
    terminal = next((pki / "terminals").glob("*.pem"))
    cert, key = (str(terminal), str(terminal.with_suffix(".key"))) if client_certs else ("-", "-")
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
    server.close()
    return per_connection


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--connections", type=int, default=1000)
    args = parser.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, max(soft, 4 * args.connections)), hard))
    with tempfile.TemporaryDirectory(prefix="pos-idle-floor-") as work:
        pki = Path(work)
        certs.init_ca(pki)
        certs.issue_server(pki, dns_names=["localhost"], ip_addresses=["127.0.0.1"])
        certs.issue_terminal(pki, store="bench", terminal="till-01", role="cashier")
        for client_certs in (False, True):
            kib = uvloop.run(measure(pki, args.connections, client_certs))
            label = "with client certificates verified" if client_certs else "without client certificates"
            print(f"bare uvloop TLS server, {label}: {kib:.1f} KiB per idle connection")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
