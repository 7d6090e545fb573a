"""Run a coroutine on uvloop when it is installed (it roughly doubles socket throughput), else asyncio."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

from proxy import allocator

T = TypeVar("T")


def _loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    try:
        import uvloop  # noqa: PLC0415 - optional dependency
    except ImportError:
        return None
    factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
    return factory


def run(main: Coroutine[Any, Any, T]) -> T:
    allocator.keep_read_buffers_on_heap()
    with asyncio.Runner(loop_factory=_loop_factory()) as runner:
        return runner.run(main)
