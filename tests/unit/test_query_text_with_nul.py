"""A simple Query whose text holds a NUL before its terminator, on a session without sockets.

PostgreSQL reads a Query's text up to its first NUL and then fails the message (invalid message
format, 08P01). The proxy must not decide such a text, nor cache a decision for it: the cache key
of a text over DIGEST_KEYS_ABOVE bytes is a NUL followed by its digest, so a 17-byte Query of a NUL
and that digest (which the server never runs) would leave its "allowed" decision, and its "no
session effect" classification, for the long statement to find.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from proxy.oplog import configure_logging
from proxy.policy.engine import DIGEST_KEYS_ABOVE, statement_key
from proxy.protocols.postgres import messages as m
from tests.sockless import READY, add_server, open_session, proxy_without_listener, terminal_certificate

PARAMETERS = {
    "server_version": "15.0",
    "client_encoding": "UTF8",
    # What a role with a policy runs with (its policy's search_path): no settings sync needed.
    "search_path": '"public"',
}
MALFORMED = m.build_message(b"E", b"SERROR\x00C08P01\x00Minvalid message format\x00\x00") + READY


@pytest.fixture(autouse=True)
def _quiet_logs() -> None:
    configure_logging(json=False, level="error")


def query(text: bytes) -> bytes:
    return m.build_message(b"Q", text + b"\x00")


def with_readable_digest(head: bytes) -> tuple[bytes, bytes]:
    """``head`` padded past DIGEST_KEYS_ABOVE (under analyze_in_worker_above), and a NUL followed by
    its digest, which happens to be valid UTF-8: what a cache keyed by NUL + digest bytes (as it
    once was) would take for the long text's key. Digest keys are str now (statement_key), but a
    Query holding a NUL must still never be decided."""
    for number in range(2_000_000):
        text = head.ljust(DIGEST_KEYS_ABOVE + 88) + b"/*%d*/" % number
        poison = b"\x00" + hashlib.blake2b(text, digest_size=16).digest()
        try:
            poison.decode("utf-8")
        except UnicodeDecodeError:
            continue
        assert statement_key(text) != poison
        return text, poison
    raise AssertionError("no digest that reads as UTF-8")


async def test_a_query_text_holding_a_nul_cannot_allow_a_long_statement_for_a_policy_role(
    tmp_path: Path,
) -> None:
    proxy = proxy_without_listener(
        tmp_path, policy="mode: enforce\nallow:\n  kinds: [SELECT]\n  read: [products]\n"
    )
    server, upstream = add_server(proxy.routes["pos"], PARAMETERS)
    session, _transport = open_session(proxy, terminal_certificate(tmp_path), 40001)
    delete, key = with_readable_digest(b"DELETE FROM products")

    session.data_received(query(key))
    assert upstream.written[-1] != query(key) and b"08P01" in upstream.written[-1]
    server.data_received(MALFORMED)

    session.data_received(query(delete))
    assert upstream.written[-1] != query(delete), "the cashier's DELETE reached the server"
    assert b"42501" in upstream.written[-1]


async def test_a_query_text_holding_a_nul_cannot_hide_a_long_statements_session_effect(
    tmp_path: Path,
) -> None:
    proxy = proxy_without_listener(tmp_path)  # role cashier without a policy
    server, upstream = add_server(proxy.routes["pos"], PARAMETERS)
    session, _transport = open_session(proxy, terminal_certificate(tmp_path), 40001)
    switch, key = with_readable_digest(b"SET client_encoding TO 'SJIS'")

    session.data_received(query(key))
    assert b"08P01" in upstream.written[-1]
    server.data_received(MALFORMED)

    session.data_received(query(switch))
    assert upstream.written[-1] != query(switch), "the SJIS switch reached the server"
    assert b"0A000" in upstream.written[-1]
