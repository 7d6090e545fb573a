"""psycopg's pipeline after a failed statement (its ``test_errors_raised_on_commit`` as libpq traced
it, the run where ``rollback()`` met ``PipelineAborted``), without sockets: the server's replies reach
the client as they are, however the reads split either side's bytes. The replies to the Syncs after the error
are the ones whose count or order would leave the client's pipeline aborted. (What the server
gets may differ: a Parse read apart from its Bind is sent again before it, its ParseComplete
dropped, as for any unnamed statement the proxy is not sure the server still has.)"""

from __future__ import annotations

from pathlib import Path

import pytest

from proxy.oplog import configure_logging
from proxy.protocols.postgres import messages as m
from proxy.protocols.postgres.upstream import ServerConnection
from proxy.server import ProxyServer
from tests.sockless import (
    PeerCertificate,
    RecordingTransport,
    add_server,
    open_session,
    proxy_without_listener,
    terminal_certificate,
)

SERVER_PARAMETERS = {"server_version": "15.0", "client_encoding": "UTF8", "TimeZone": "UTC"}
SYNC = m.build_message(b"S", b"")
FLUSH = m.build_message(b"H", b"")


def _unnamed(sql: str) -> bytes:
    """Parse, Bind (text results), Describe of the portal, Execute: libpq's PQsendQueryParams."""
    return (
        m.build_message(b"P", b"\x00" + sql.encode() + b"\x00\x00\x00")
        + m.build_message(b"B", b"\x00\x00\x00\x00\x00\x00\x00\x01\x00\x00")
        + m.build_message(b"D", b"P\x00")
        + m.build_message(b"E", b"\x00\x00\x00\x00\x00")
    )


def _ready(status: bytes) -> bytes:
    return m.build_ready_for_query(status)


def _done(tag: bytes) -> bytes:
    return m.build_message(b"C", tag + b"\x00")


ERROR = m.build_error_response("ERROR", "42P01", 'relation "nosuchtable" does not exist')
# What the client sends in turn, as libpq traced it.
EXCHANGE: tuple[bytes, ...] = (
    _unnamed("BEGIN") + SYNC,
    _unnamed("select 1 from nosuchtable"),
    _unnamed("COMMIT") + SYNC + SYNC,
    SYNC + FLUSH,
    m.build_query("ROLLBACK"),
)


class Backend:
    """PostgreSQL's answers to what the proxy sent, message by message: an error on the missing
    table, then nothing up to the Sync (55.2.3)."""

    def __init__(self, answered: int) -> None:
        self.status = b"I"
        self.skipping = False
        self.read = answered  # how much of the upstream bytes were answered

    def answer(self, sent: bytes) -> bytes:
        data, self.read = sent[self.read :], len(sent)
        frames, consumed = m.scan_frames(data, 1 << 20)
        assert consumed == len(data)
        out = b""
        for kind, start, end in frames:
            if kind == 0x53:  # Sync
                self.skipping = False
                out += _ready(self.status)
            elif kind == 0x51:  # Query: ROLLBACK
                self.status = b"I"
                out += _done(b"ROLLBACK") + _ready(self.status)
            elif self.skipping or kind == 0x48:  # skipped, or a Flush
                continue
            elif kind == 0x50:
                failing = b"nosuchtable" in data[start:end]
                out += ERROR if failing else m.build_message(b"1", b"")
                self.skipping = failing
                self.status = b"E" if failing else self.status
            elif kind == 0x42:
                out += m.build_message(b"2", b"")
            elif kind == 0x44:
                out += m.build_message(b"n", b"")
            elif kind == 0x45:  # Execute: only BEGIN gets this far
                self.status = b"T"
                out += _done(b"BEGIN")
        return out


def _session(
    proxy: ProxyServer,
    certificate: PeerCertificate,
    upstream: tuple[ServerConnection, RecordingTransport],
    split: tuple[int, str, int] | None,
) -> tuple[list[bytes], list[bytes]]:
    """What the server answered and what the client got at each step of the exchange, ``split`` =
    (step, side, offset) read in two."""
    server, written = upstream
    till, received = open_session(proxy, certificate, 40000)
    backend = Backend(sum(map(len, written.written)))
    answers: list[bytes] = []
    got: list[bytes] = []
    for step, sent in enumerate(EXCHANGE):
        before = len(received.written)
        for part in _halves(sent, split[2] if split is not None and split[:2] == (step, "client") else None):
            till.data_received(part)
        answer = backend.answer(b"".join(written.written))
        for part in _halves(
            answer, split[2] if split is not None and split[:2] == (step, "server") else None
        ):
            server.data_received(part)
        answers.append(answer)
        got.append(b"".join(received.written[before:]))
    return answers, got


@pytest.fixture(autouse=True)
def _quiet_logs() -> None:
    configure_logging(json=False, level="error")


def _halves(data: bytes, at: int | None) -> list[bytes]:
    return [data] if at is None else [data[:at], data[at:]]


async def test_every_split_of_each_side_reaches_the_client_as_unsplit(tmp_path: Path) -> None:
    proxy = proxy_without_listener(tmp_path)
    upstream = add_server(proxy.routes["pos"], SERVER_PARAMETERS)
    certificate = terminal_certificate(tmp_path)
    answers, unsplit = _session(proxy, certificate, upstream, None)
    # The client's outcome: the error, then one ReadyForQuery per Sync, in the failed transaction.
    assert unsplit[1] == ERROR
    assert unsplit[2:4] == [_ready(b"E") * 2, _ready(b"E")]
    splits = [(step, "client", at) for step, sent in enumerate(EXCHANGE) for at in range(1, len(sent))]
    splits += [(step, "server", at) for step, answer in enumerate(answers) for at in range(1, len(answer))]
    for split in splits:
        assert _session(proxy, certificate, upstream, split)[1] == unsplit, split
