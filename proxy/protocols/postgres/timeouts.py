"""A role's statement_timeout as a ceiling: time settings read as the server reads them, and what a
statement does to statement_timeout. Not compiled (pglast's Visitor needs interpreted methods)."""

from __future__ import annotations

import re
from typing import Final

from pglast import ast, enums, parse_sql, visitors
from pglast.parser import ParseError

from proxy.policy.encodings import read_statement
from proxy.policy.engine import StatementKey, statement_key

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


def ceiling_milliseconds(seconds: float) -> int:
    """A role's statement_timeout in the server's unit; never 0, which the server reads as "off"."""
    return max(1, round(seconds * 1000))


def capped_statement_timeout(asked: str | None, ceiling: float) -> str:
    """The statement_timeout to apply for a client that asked for ``asked`` under a role ceiling of
    ``ceiling`` seconds: its own value when it is a limit no longer than the ceiling, else the ceiling
    (0, which the server reads as no limit at all, is longer than any)."""
    ceiling_ms = ceiling_milliseconds(ceiling)
    asked_ms = milliseconds(asked) if asked is not None else None
    if asked is None or asked_ms is None or asked_ms == 0 or asked_ms > ceiling_ms:
        return str(ceiling_ms)
    return asked


# Any statement that could change statement_timeout names it, resets everything, or calls
# set_config; U& escapes could hide a name from this filter, so they send a statement to the parser too.
_MIGHT_SET_TIMEOUT: Final = re.compile(rb"statement_timeout|u&|reset|discard|set_config", re.IGNORECASE)
# A statement_timeout change this reads as "off": RESET, DEFAULT, a value it cannot read for sure.
UNBOUNDED: Final = 0
# Distinct texts remembered before the cache starts over (as classifiercache.py).
_CACHE_LIMIT: Final = 10_000


class StatementTimeoutChanges:
    """What a statement text does to statement_timeout, by text: None (nothing), or the longest
    timeout in milliseconds it may leave in force (UNBOUNDED: none at all), read off PostgreSQL's
    own parse tree. The session refuses it when that is above the role's ceiling."""

    def __init__(self, limit: int = _CACHE_LIMIT) -> None:
        # By (client encoding, text or digest), as the decision cache (engine.statement_key).
        self._cache: dict[tuple[str, StatementKey], int | None] = {}
        self._limit = limit

    def longest(self, sql: bytes, encoding: str) -> int | None:
        if _MIGHT_SET_TIMEOUT.search(sql) is None:
            return None
        key = (encoding, statement_key(sql))
        if key in self._cache:
            return self._cache[key]
        try:
            statements = parse_sql(read_statement(sql, encoding))
        except (ParseError, UnicodeDecodeError):
            result: int | None = UNBOUNDED  # what the proxy cannot read may turn the timeout off
        else:
            finder = _TimeoutChanges()
            for raw in statements:
                if raw.stmt is not None:
                    finder(raw.stmt)
            result = finder.longest
        if len(self._cache) >= self._limit:
            self._cache.clear()
        self._cache[key] = result
        return result


class _TimeoutChanges(visitors.Visitor):
    def __init__(self) -> None:
        super().__init__()
        self.longest: int | None = None

    def _sets(self, milliseconds_or_none: int | None) -> None:
        value = (
            UNBOUNDED if milliseconds_or_none is None or milliseconds_or_none <= 0 else milliseconds_or_none
        )
        if self.longest is None or (
            self.longest != UNBOUNDED and (value == UNBOUNDED or value > self.longest)
        ):
            self.longest = value

    def visit_VariableSetStmt(self, ancestors: visitors.Ancestor, node: ast.VariableSetStmt) -> None:
        if ancestors.node is not None:
            return  # inside ALTER ROLE/DATABASE or CREATE FUNCTION: stored in the catalog, not run
        if node.kind is enums.VariableSetKind.VAR_RESET_ALL:
            self._sets(None)
        elif (node.name or "").lower() == "statement_timeout":
            value = node.args[0] if node.kind is enums.VariableSetKind.VAR_SET_VALUE and node.args else None
            self._sets(_constant_milliseconds(value))

    def visit_DiscardStmt(self, ancestors: object, node: ast.DiscardStmt) -> None:
        if node.target is enums.DiscardMode.DISCARD_ALL:
            self._sets(None)  # DISCARD ALL includes RESET ALL

    def visit_FuncCall(self, ancestors: object, node: ast.FuncCall) -> None:
        if (node.funcname or ())[-1].sval.lower() != "set_config":
            return
        arguments = node.args or ()
        name = _constant_text(arguments[0]) if arguments else None
        if name is None or name.lower() == "statement_timeout":
            self._sets(_constant_milliseconds(arguments[1] if len(arguments) > 1 else None))


def _constant(node: object) -> object:
    if isinstance(node, ast.TypeCast):
        node = node.arg
    return node.val if isinstance(node, ast.A_Const) else None


def _constant_text(node: object) -> str | None:
    value = _constant(node)
    return value.sval if isinstance(value, ast.String) else None


def _constant_milliseconds(node: object) -> int | None:
    value = _constant(node)
    if isinstance(value, ast.Integer):
        return value.ival
    if isinstance(value, ast.Float):
        return milliseconds(value.fval or "")
    if isinstance(value, ast.String):
        return milliseconds(value.sval or "")
    return None
