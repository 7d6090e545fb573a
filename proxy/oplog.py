"""Operational log (structlog): configured once, JSON lines for services, key=value for people."""

from __future__ import annotations

import logging
import sys
from typing import TextIO

import structlog


def configure_logging(*, json: bool, level: str = "info", stream: TextIO | None = None) -> None:
    """Set up the one processor pipeline every module's ``structlog.get_logger`` uses."""
    # JSON lines carry a logged exception as its formatted traceback (``exception``); without
    # format_exc_info the renderer wrote ``"exc_info": true`` and the traceback was lost. The
    # console renderer formats exceptions itself.
    renderers: list[structlog.typing.Processor] = (
        [structlog.processors.format_exc_info, structlog.processors.JSONRenderer()]
        if json
        else [structlog.dev.ConsoleRenderer(colors=False)]
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            *renderers,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelNamesMapping()[level.upper()]),
        # One write per line: worker processes share the stream, and their lines must not interleave.
        logger_factory=structlog.WriteLoggerFactory(stream or sys.stderr),
        cache_logger_on_first_use=True,
    )
