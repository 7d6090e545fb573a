"""Result-size guard on the reply stream (sans-IO): count DataRows per statement, cut off the excess.

When a statement's rows or bytes cross the terminal's limits, the rest of its DataRows are
dropped and its end (CommandComplete, or the server's error once the proxy's cancel lands) is
replaced by one ErrorResponse 53400 naming the limit, so the client sees a failed statement and
its session goes on.
"""

from __future__ import annotations

from collections.abc import Callable

from proxy.limits import LimitHit, ResultGuard
from proxy.protocols.postgres import messages as m

CONFIGURATION_LIMIT_EXCEEDED = "53400"
_DATA_ROW = ord("D")
_ERROR = ord("E")
# What ends one statement's result: CommandComplete, EmptyQuery, ErrorResponse, PortalSuspended.
_RESULT_ENDS = frozenset(b"CIEs")


class ResultWatch:
    """Watches one client's replies; ``new_guard`` makes the guard for each statement."""

    def __init__(self, new_guard: Callable[[], ResultGuard], on_hit: Callable[[LimitHit], None]) -> None:
        self._new_guard = new_guard
        self._on_hit = on_hit
        self._guard: ResultGuard | None = None
        self._cutting: LimitHit | None = None

    def apply(self, buffer: bytes, frames: list[m.Frame]) -> tuple[bytes, list[m.Frame]]:
        """The messages to pass on: the same ones unless a statement is over its limits."""
        first = 0 if self._cutting is not None else self._first_row_over(buffer, frames)
        if first is None:
            return buffer, frames
        out = bytearray(buffer[: frames[first][1]])
        kept = list(frames[:first])
        for kind, start, end in frames[first:]:
            message, passed_kind = buffer[start:end], kind
            if kind == _DATA_ROW:
                if self._cutting is not None or self._row_crosses(end - start):
                    continue
            elif kind in _RESULT_ENDS:
                self._guard = None
                if self._cutting is not None:
                    message = m.build_error_response(
                        "ERROR", CONFIGURATION_LIMIT_EXCEEDED, self._cutting.message
                    )
                    passed_kind = _ERROR
                    self._cutting = None
            kept.append((passed_kind, len(out), len(out) + len(message)))
            out += message
        return bytes(out), kept

    def _first_row_over(self, buffer: bytes, frames: list[m.Frame]) -> int | None:
        """Count the batch's rows; the index of the first one over the limits, if any."""
        for index, (kind, start, end) in enumerate(frames):
            if kind == _DATA_ROW:
                if self._row_crosses(end - start):
                    return index
            elif kind in _RESULT_ENDS:
                self._guard = None
        return None

    def _row_crosses(self, nbytes: int) -> bool:
        """Count one row; on the first crossing start cutting and report the hit."""
        if self._guard is None:
            self._guard = self._new_guard()
        hit = self._guard.add(1, nbytes)
        if hit is None:
            return False
        self._cutting = hit
        self._on_hit(hit)
        return True
