"""What the bare TLS benchmarks share: a throwaway PKI, the server context, and a loopback server on
either TLS layer the proxy has known: uvloop's (``create_server(ssl=)``, still used upstream) or its
own for terminals (proxy.tlstransport). The proxy's layer is imported from the tree the script
runs in only with PYTHONPATH set to it (``PYTHONPATH=. .venv/bin/python bench/...``): otherwise from
wherever the virtualenv has the package installed.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
from collections.abc import Callable
from pathlib import Path

from proxy import certs
from proxy.tlstransport import accept_tls

LAYERS = ("uvloop", "proxy")


def make_pki(directory: Path) -> Path:
    """A CA, a server certificate for 127.0.0.1 and one terminal certificate in ``directory``."""
    certs.init_ca(directory)
    certs.issue_server(directory, dns_names=["localhost"], ip_addresses=["127.0.0.1"])
    certs.issue_terminal(directory, store="bench", terminal="till-01", role="cashier")
    return directory


def terminal_files(pki: Path) -> tuple[Path, Path]:
    """The terminal's certificate and key."""
    terminal = next((pki / "terminals").glob("*.pem"))
    return terminal, terminal.with_suffix(".key")


def server_context(pki: Path, verify_mode: ssl.VerifyMode) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(pki / "server.pem", pki / "server.key")
    context.load_verify_locations(cafile=str(pki / "ca.pem"))
    context.verify_mode = verify_mode
    context.num_tickets = 0  # as the proxy's terminal context (proxy/tlsconfig.py)
    return context


async def listen(
    layer: str, protocol_factory: Callable[[], asyncio.Protocol], context: ssl.SSLContext
) -> tuple[int, Callable[[], None]]:
    """A loopback TLS server on ``layer``; returns its port and what stops it."""
    loop = asyncio.get_running_loop()
    if layer == "uvloop":
        server = await loop.create_server(protocol_factory, "127.0.0.1", 0, ssl=context)
        return int(server.sockets[0].getsockname()[1]), server.close
    listener = socket.create_server(("127.0.0.1", 0))
    listener.setblocking(False)
    handshakes: set[asyncio.Task[object]] = set()

    def handshake_done(task: asyncio.Task[object]) -> None:
        handshakes.discard(task)
        if not task.cancelled():
            task.exception()  # a client that went away: nothing to report in a benchmark

    async def accept_loop() -> None:
        while True:
            sock, _ = await loop.sock_accept(listener)
            handshake = asyncio.ensure_future(
                accept_tls(sock, protocol_factory(), context, handshake_timeout=30, shutdown_timeout=2)
            )
            handshakes.add(handshake)
            handshake.add_done_callback(handshake_done)

    accepting = asyncio.ensure_future(accept_loop())

    def stop() -> None:
        accepting.cancel()
        listener.close()

    return int(listener.getsockname()[1]), stop
