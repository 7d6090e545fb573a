"""Run a coroutine on uvloop when it is installed (it roughly doubles socket throughput), else asyncio."""

from __future__ import annotations

import asyncio
import traceback
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

import structlog

from proxy import allocator

T = TypeVar("T")

log = structlog.get_logger("pos_proxy.eventloop")


def _loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    try:
        import uvloop  # noqa: PLC0415 - optional dependency
    except ImportError:
        return None
    factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
    return factory


def log_unhandled_error(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
    """An error no task or callback handled, as one JSON event (``internal_error``).

    asyncio's default handler prints a plain-text traceback through the logging module, which
    breaks a JSON log stream and carries no event name an operator can alert on.  Such an error
    is a bug in the proxy: the event says where it happened and keeps the traceback.
    """
    exception = context.get("exception")
    fields: dict[str, Any] = {"message": context.get("message", "unhandled error in the event loop")}
    for key in ("task", "future", "handle", "protocol", "transport"):
        if key in context:
            fields[key] = repr(context[key])
    if isinstance(exception, BaseException):
        fields["error"] = f"{type(exception).__name__}: {exception}"
        fields["traceback"] = "".join(traceback.format_exception(exception))
    log.error("internal_error", **fields)


def run(main: Coroutine[Any, Any, T]) -> T:
    allocator.keep_read_buffers_on_heap()
    with asyncio.Runner(loop_factory=_loop_factory()) as runner:
        runner.get_loop().set_exception_handler(log_unhandled_error)
        return runner.run(main)
