"""The hand-over of a server connection to a waiting client whose settings differ, without sockets.

The proxy first brings the connection's settings in line (one internal query). Whatever the
client sends in the meantime must queue behind the messages already waiting, not reach the
server ahead of them or before the internal query's answer is in.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from proxy import certs
from proxy.config import load_config
from proxy.protocols.postgres import messages as m
from proxy.protocols.postgres.session import ClientSession
from proxy.protocols.postgres.upstream import ServerConnection
from proxy.server import ProxyServer

SERVER_PARAMETERS = {"server_version": "15.0", "client_encoding": "UTF8", "TimeZone": "UTC"}
READY = m.build_ready_for_query(b"I")
PARSE_BIND_EXECUTE = (
    m.build_message(b"P", b"\x00SELECT now()\x00\x00\x00")
    + m.build_message(b"B", b"\x00\x00\x00\x00\x00\x00\x00\x00")
    + m.build_message(b"E", b"\x00\x00\x00\x00\x00")
)
SYNC = m.build_message(b"S", b"")
CYCLE_REPLY = (
    m.build_message(b"1", b"") + m.build_message(b"2", b"") + m.build_message(b"C", b"SELECT 1\x00") + READY
)


class PeerCertificate:
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
        raise AssertionError(f"a transport was closed; it had written {self.written!r}")

    abort = close


def _config(directory: Path) -> Path:
    certs.init_ca(directory)
    certs.issue_server(directory, dns_names=["localhost"], ip_addresses=["127.0.0.1"])
    path = directory / "pos-proxy.yaml"
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
                "user": "pos_proxy",
                "sslmode": "disable",
                "pool": {"mode": "transaction", "size": 1},
            }
        },
    }
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return path


def _terminal(directory: Path) -> PeerCertificate:
    issued = certs.issue_terminal(directory, store="store-001", terminal="till-01", role="cashier")
    pem = issued.cert_path.read_bytes()
    return PeerCertificate(x509.load_pem_x509_certificate(pem).public_bytes(serialization.Encoding.DER))


async def test_messages_sent_while_settings_are_applied_wait_their_turn(tmp_path: Path) -> None:
    proxy = ProxyServer(load_config(_config(tmp_path)))
    route = proxy.routes["pos"]
    route.server_parameters.update(SERVER_PARAMETERS)
    server = ServerConnection(route.config, on_closed=lambda _connection: None)
    upstream = RecordingTransport()
    server.connection_made(upstream)  # type: ignore[arg-type]
    server.reported.update(SERVER_PARAMETERS)
    # A connection the pool opened: what _attempt does once the server is ready.
    route.pool._members.add(server)
    route.pool._idle.append(server)
    certificate = _terminal(tmp_path)

    def terminal(port: int, **parameters: str) -> tuple[ClientSession, RecordingTransport]:
        session = ClientSession(proxy._environment, f"127.0.0.1:{port}")
        transport = RecordingTransport(certificate)
        session.connection_made(transport)  # type: ignore[arg-type]
        session.data_received(m.build_startup_message({"user": "till-01", "database": "pos", **parameters}))
        assert transport.written[-1].endswith(READY), transport.written
        return session, transport

    first, first_transport = terminal(40001)
    tokyo, tokyo_transport = terminal(40002, TimeZone="Asia/Tokyo")
    first.data_received(PARSE_BIND_EXECUTE + SYNC)  # takes the only server connection
    tokyo.data_received(PARSE_BIND_EXECUTE)  # waits in line, Sync still to come
    assert upstream.written == [PARSE_BIND_EXECUTE + SYNC]

    server.data_received(CYCLE_REPLY)  # the first is done: the connection goes to the waiting one
    await asyncio.sleep(0)  # the hand-over task sends its internal query and waits for it
    assert len(upstream.written) == 2 and b"set_config" in upstream.written[1], upstream.written

    tokyo.data_received(SYNC)  # while the server is still answering the internal query
    assert len(upstream.written) == 2, "the Sync overtook the messages waiting before it"

    server.data_received(
        m.build_message(b"T", b"\x00\x01set_config\x00" + b"\x00" * 18)
        + m.build_message(b"D", b"\x00\x01\x00\x00\x00\x0aAsia/Tokyo")
        + m.build_message(b"C", b"SELECT 1\x00")
        + READY
    )
    for _ in range(10):
        if len(upstream.written) > 2:
            break
        await asyncio.sleep(0)
    assert upstream.written[2:] == [PARSE_BIND_EXECUTE + SYNC]
    server.data_received(CYCLE_REPLY)
    assert tokyo_transport.written[-1] == CYCLE_REPLY
    assert first_transport.written[-1] == CYCLE_REPLY


@pytest.fixture(autouse=True)
def _quiet_logs() -> None:
    from proxy.oplog import configure_logging  # noqa: PLC0415 -- per test, like the CLI does

    configure_logging(json=False, level="error")
