"""A server connection's reply handling without sockets: when it is lent back and when not."""

from __future__ import annotations

from typing import Any

from proxy.config import PoolConfig, RouteConfig, SSLMode
from proxy.protocols.postgres import messages as m
from proxy.protocols.postgres.prepared import ClientStatements, StatementStats
from proxy.protocols.postgres.upstream import ServerConnection

MAX = 1 << 24


class Transport:
    """What a server connection writes, and no more of an asyncio transport than it uses."""

    def __init__(self) -> None:
        self.written: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.written.append(data)

    def close(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


class Peer:
    """The client session a server connection is lent to, recording what it is told."""

    def __init__(self) -> None:
        self.events: list[str] = []
        self.data = b""

    def server_data(self, data: bytes) -> None:
        self.data += data

    def server_parameter(self, name: str, value: str) -> None:
        self.events.append(f"parameter {name}")

    def server_ready(self) -> None:
        self.events.append("ready")

    def server_idle(self) -> None:
        self.events.append("idle")

    def server_lost(self, reason: str) -> None:
        self.events.append("lost")

    def pause_client_reading(self) -> None:
        pass

    def resume_client_reading(self) -> None:
        pass


def _lent_connection_after_a_query() -> tuple[ServerConnection, Peer]:
    route = RouteConfig(
        database="pos", host="127.0.0.1", port=5432, dbname="pos", user="pos_proxy",
        sslmode=SSLMode.DISABLE, pool=PoolConfig(),
    )  # fmt: skip
    server = ServerConnection(route, on_closed=lambda _connection: None)
    transport: Any = Transport()
    server.connection_made(transport)
    peer = Peer()
    server.attach(peer)
    query = m.build_query("SELECT 1")
    frames, _ = m.scan_frames(query, MAX)
    server.send(ClientStatements(StatementStats()).rewrite(query, frames, server.state), frames)
    return server, peer


REPLY = m.build_message(b"C", b"SELECT 1\x00") + m.build_ready_for_query(b"I")


def test_an_idle_connection_is_lent_back_after_its_ready_for_query() -> None:
    server, peer = _lent_connection_after_a_query()
    server.data_received(REPLY)
    assert peer.events == ["ready", "idle"]
    assert server.is_clean


def test_a_fatal_right_after_ready_for_query_keeps_the_connection_from_the_next_client() -> None:
    # A server shutting down sends FATAL 57P01 to idle backends, possibly in the same read as the
    # last reply: lending the connection on would send another client's messages to a closing socket.
    server, peer = _lent_connection_after_a_query()
    fatal = m.build_error_response("FATAL", "57P01", "terminating connection due to administrator command")
    server.data_received(REPLY + fatal)
    assert peer.events == ["ready"]
    assert not server.is_clean
    assert peer.data.endswith(fatal)  # the client sees why its connection ends
