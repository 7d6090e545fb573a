"""A statement over policy.max_statement_bytes from a role whose policy only monitors (or learns),
on a session without sockets: refused unread (54000) as in enforce mode, audited as refused, and
never handed to pglast on the event loop (a 60 KB ``SELECT 1+1+...`` overflows the C stack there)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from proxy.oplog import configure_logging
from proxy.protocols.postgres import messages as m
from proxy.protocols.postgres.session import ClientSession
from tests import compiled
from tests.sockless import add_server, open_session, proxy_without_listener, terminal_certificate

PARAMETERS = {"server_version": "15.0", "client_encoding": "UTF8", "search_path": '"public"'}


@pytest.fixture(autouse=True)
def _quiet_logs() -> None:
    configure_logging(json=False, level="error")


@pytest.mark.skipif(compiled.expected(), reason="a compiled class cannot be patched to record calls")
@pytest.mark.parametrize("mode", ["monitor", "learn"])
async def test_a_statement_over_the_size_limit_is_refused_unread_in_every_mode(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mode: str
) -> None:
    proxy = proxy_without_listener(tmp_path, policy=f"mode: {mode}\nallow:\n  kinds: [SELECT]\n")
    _server, upstream = add_server(proxy.routes["pos"], PARAMETERS)
    session, _transport = open_session(proxy, terminal_certificate(tmp_path), 40001)
    classifier = proxy._environment.classifier
    read: list[int] = []
    classify = classifier.classify
    monkeypatch.setattr(
        classifier, "classify", lambda sql, encoding: (read.append(len(sql)), classify(sql, encoding))[1]
    )
    audited: list[str | None] = []
    audit_statement = ClientSession._audit_statement

    def record(self: ClientSession, *args: Any, **kwargs: Any) -> None:
        audited.append(args[3])  # decision, mode, text, refused_by
        audit_statement(self, *args, **kwargs)

    monkeypatch.setattr(ClientSession, "_audit_statement", record)
    text = "SELECT 1 -- " + "x" * 70_000  # a comment: the classifier's prefilter would parse it
    session.data_received(m.build_query(text))
    assert b"54000" in upstream.written[-1]
    assert audited == ["statement too long"]
    assert all(size <= 64 * 1024 for size in read), "the long statement was parsed on the event loop"
