"""Reading PostgreSQL time settings as the server does, to keep a role's statement_timeout a ceiling."""

from __future__ import annotations

import re
from typing import Final

# guc.c's memory-and-time units for a setting whose base unit is milliseconds (unit names are
# case-sensitive there too).
_MILLISECONDS_PER_UNIT: Final = {
    "": 1.0,
    "us": 0.001,
    "ms": 1.0,
    "s": 1000.0,
    "min": 60_000.0,
    "h": 3_600_000.0,
    "d": 86_400_000.0,
}
# Plain decimal only: the server would also read hex, octal and exponents, which this leaves to the
# role's value rather than risk reading them differently.
_TIME_VALUE: Final = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-z]*)\s*")


def milliseconds(value: str) -> int | None:
    """``value`` of a millisecond setting (statement_timeout) in whole milliseconds, as the server
    rounds it; None when this does not read it with certainty."""
    match = _TIME_VALUE.fullmatch(value)
    if match is None or match.group(2) not in _MILLISECONDS_PER_UNIT:
        return None
    return round(float(match.group(1)) * _MILLISECONDS_PER_UNIT[match.group(2)])


def capped_statement_timeout(asked: str | None, ceiling: float) -> str:
    """The statement_timeout to apply for a client that asked for ``asked`` under a role ceiling of
    ``ceiling`` seconds: its own value when it is a limit no longer than the ceiling, else the ceiling
    (0, which the server reads as no limit at all, is longer than any)."""
    ceiling_ms = max(1, round(ceiling * 1000))
    asked_ms = milliseconds(asked) if asked is not None else None
    if asked is None or asked_ms is None or asked_ms == 0 or asked_ms > ceiling_ms:
        return str(ceiling_ms)
    return asked
