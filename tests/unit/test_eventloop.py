"""proxy.eventloop and proxy.oplog: an error nothing handled becomes one JSON ``internal_error``
event, and a logged exception keeps its traceback."""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import io
import json
from pathlib import Path

import pytest
import structlog

from proxy import demo, eventloop
from proxy.oplog import configure_logging
from tests.logcheck import unhandled_errors
from tests.sockless import proxy_without_listener


def run_logged(main: object, monkeypatch: pytest.MonkeyPatch) -> list[dict[str, object]]:
    stream = io.StringIO()
    configure_logging(json=True, level="info", stream=stream)
    # A logger caches its configuration on first use: a fresh one writes to this stream.
    monkeypatch.setattr(eventloop, "log", structlog.get_logger("pos_proxy.eventloop"))
    try:
        eventloop.run(main)  # type: ignore[arg-type]
    finally:
        structlog.reset_defaults()
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def broken_callback() -> None:
    raise ZeroDivisionError("a bug in a callback")


async def schedule_broken_callback() -> None:
    asyncio.get_running_loop().call_soon(broken_callback)
    await asyncio.sleep(0.01)


async def drop_failed_task() -> None:
    async def fail() -> None:
        raise KeyError("nobody awaited me")

    task = asyncio.get_running_loop().create_task(fail())
    await asyncio.sleep(0.01)
    assert task.done()
    del task  # the "exception was never retrieved" report comes when the task is collected
    gc.collect()


def test_a_failing_callback_is_one_json_event_with_its_traceback(monkeypatch: pytest.MonkeyPatch) -> None:
    (event,) = run_logged(schedule_broken_callback(), monkeypatch)

    assert event["event"] == "internal_error"
    assert event["level"] == "error"
    assert event["error"] == "ZeroDivisionError: a bug in a callback"
    assert "broken_callback" in str(event["traceback"])
    assert "broken_callback" in str(event["handle"])
    assert unhandled_errors(json.dumps(event)) == [json.dumps(event)]


def test_a_task_whose_error_nobody_retrieved_is_reported(monkeypatch: pytest.MonkeyPatch) -> None:
    events = run_logged(drop_failed_task(), monkeypatch)

    assert [e["event"] for e in events] == ["internal_error"]
    assert events[0]["error"] == "KeyError: 'nobody awaited me'"
    assert "never retrieved" in str(events[0]["message"])


def test_the_log_check_sees_plain_text_tracebacks_and_ignores_other_events() -> None:
    log = "\n".join(
        [
            json.dumps({"event": "session_end", "level": "info"}),
            "Traceback (most recent call last):",
            '  File "x.py", line 1',
            "Exception in callback Foo()",
        ]
    )
    assert unhandled_errors(log) == [
        'Traceback (most recent call last):\n  File "x.py", line 1',
        "Exception in callback Foo()",
    ]


def test_a_logged_exception_keeps_its_traceback_in_json() -> None:
    stream = io.StringIO()
    configure_logging(json=True, level="info", stream=stream)
    try:
        logger = structlog.get_logger("pos_proxy.test")
        try:
            raise ValueError("lost before")
        except ValueError:
            logger.exception("server_grant_failed", server_connection=7)
    finally:
        structlog.reset_defaults()
    (event,) = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert event["event"] == "server_grant_failed"
    assert "exc_info" not in event
    assert "Traceback (most recent call last)" in event["exception"]
    assert "ValueError: lost before" in event["exception"]


def test_the_demo_fails_when_its_proxy_logged_an_internal_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    log_path = tmp_path / "proxy.log"
    clean = json.dumps({"event": "session_end", "level": "info"})
    log_path.write_text(clean + "\n", encoding="utf-8")
    assert demo._report_internal_errors(log_path) == 0

    bug = {"event": "internal_error", "message": "Exception in callback", "error": "KeyError: 'x'"}
    log_path.write_text(clean + "\nnot json\n" + json.dumps(bug) + "\n", encoding="utf-8")
    assert demo._report_internal_errors(log_path) == 1
    assert "logged 1 internal error(s)" in capsys.readouterr().err


async def test_a_running_proxy_counts_the_errors_nothing_handled(tmp_path: Path) -> None:
    server = proxy_without_listener(tmp_path)
    listen_anywhere = dataclasses.replace(server.config.listen, port=0)
    server.config = dataclasses.replace(server.config, listen=listen_anywhere)
    await server.start()
    try:
        asyncio.get_running_loop().call_soon(broken_callback)
        await asyncio.sleep(0.01)
    finally:
        await server.shutdown()
    rendered = server.metrics.render().decode()
    assert "pos_proxy_internal_errors_total 1.0" in rendered.splitlines()
