"""The proxy's real session objects on stand-in transports: no sockets, no TLS, no event loop I/O.

For unit tests of the data path and for bench/session_cost.py: a ProxyServer built from a
config (never listening), server connections put straight into a route's pool, and terminals
whose "TLS" transport presents a real terminal certificate.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from proxy import certs
from proxy.config.load import load_config
from proxy.protocols.postgres import messages as m
from proxy.protocols.postgres.session import ClientSession, Route
from proxy.protocols.postgres.upstream import ServerConnection
from proxy.server import ProxyServer

if TYPE_CHECKING:  # the benchmark imports this module without pytest
    import pytest

READY = m.build_ready_for_query(b"I")


class PeerCertificate:
    """What the session asks of the TLS object: the terminal's certificate, and no ALPN."""

    def __init__(self, der: bytes) -> None:
        self._der = der

    def getpeercert(self, binary_form: bool = False) -> bytes:
        return self._der

    def selected_alpn_protocol(self) -> None:
        return None

    def version(self) -> str:
        return "TLSv1.3"

    def cipher(self) -> tuple[str, str, int]:
        return ("TLS_AES_256_GCM_SHA384", "TLSv1.3", 256)


class RecordingTransport:
    """Keeps what is written; no more of an asyncio transport than the data path uses."""

    def __init__(self, certificate: PeerCertificate | None = None) -> None:
        self.written: list[bytes] = []
        self._certificate = certificate

    def write(self, data: bytes) -> None:
        self.written.append(bytes(data))

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"ssl_object": self._certificate}.get(name, default)

    def is_closing(self) -> bool:
        return False

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def close(self) -> None:
        raise AssertionError(f"the data path closed a transport; it had written {self.written!r}")

    abort = close


def record_closed_transports(monkeypatch: pytest.MonkeyPatch) -> list[RecordingTransport]:
    """Let the data path close transports (a test that expects it), keeping which it closed."""
    closed: list[RecordingTransport] = []

    def record_close(transport: RecordingTransport) -> None:
        closed.append(transport)

    monkeypatch.setattr(RecordingTransport, "close", record_close)
    return closed


def proxy_without_listener(
    directory: Path, *, pool_size: int = 1, policy: str | None = None, audit: bool = False
) -> ProxyServer:
    """A proxy with route "pos" in transaction mode and role "cashier" (without a policy unless
    ``policy``, the text of its policy file, is given; with an audit log in ``directory`` if ``audit``)."""
    certs.init_ca(directory)
    certs.issue_server(directory, dns_names=["localhost"], ip_addresses=["127.0.0.1"])
    cashier: dict[str, str] = {"description": "tills"}
    if policy is not None:
        (directory / "cashier.yaml").write_text(policy, encoding="utf-8")
        cashier["policy"] = str(directory / "cashier.yaml")
    config = {
        "listen": {"host": "127.0.0.1", "port": 6432},  # never opened
        "tls": {
            "cert": str(directory / "server.pem"),
            "key": str(directory / "server.key"),
            "client_ca": str(directory / "ca.pem"),
        },
        "roles": {"cashier": cashier},
        "routes": {
            "pos": {
                "host": "127.0.0.1",
                "port": 5432,
                "user": "pos_proxy",
                "sslmode": "disable",
                "pool": {"mode": "transaction", "size": pool_size},
            }
        },
    }
    if audit:
        key = directory / "audit.key"
        key.write_bytes(os.urandom(32))
        key.chmod(0o600)
        config["audit"] = {"file": str(directory / "audit.log"), "key_file": str(key)}
    path = directory / "pos-proxy.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return ProxyServer(load_config(path))


def add_server(route: Route, parameters: Mapping[str, str]) -> tuple[ServerConnection, RecordingTransport]:
    """A server connection that reported ``parameters``, idle in the route's pool."""
    route.server_parameters.update(parameters)
    server = ServerConnection(route.config, on_closed=lambda _connection: None)
    transport = RecordingTransport()
    server.connection_made(transport)  # type: ignore[arg-type]
    server.note_startup_parameters(parameters)
    # What the pool's _attempt does with a connection once the server is ready.
    route.pool._members.add(server)
    route.pool._idle.append(server)
    return server, transport


def terminal_certificate(directory: Path, *, terminal: str = "till-01") -> PeerCertificate:
    issued = certs.issue_terminal(directory, store="store-001", terminal=terminal, role="cashier")
    pem = issued.cert_path.read_bytes()
    return PeerCertificate(x509.load_pem_x509_certificate(pem).public_bytes(serialization.Encoding.DER))


def open_session(
    proxy: ProxyServer, certificate: PeerCertificate, port: int, **parameters: str
) -> tuple[ClientSession, RecordingTransport]:
    """A terminal that sent its startup packet for "pos" and got ReadyForQuery."""
    session = ClientSession(proxy._environment, f"127.0.0.1:{port}")
    transport = RecordingTransport(certificate)
    session.connection_made(transport)  # type: ignore[arg-type]
    session.data_received(m.build_startup_message({"user": "till-01", "database": "pos", **parameters}))
    if not transport.written or not transport.written[-1].endswith(READY):
        raise AssertionError(f"the terminal was not let in: {transport.written!r}")
    return session, transport
