"""Which statements leave state in a server session, the thing transaction pooling cannot move.

Decided on PostgreSQL's own parse tree (pglast / libpg_query). A cheap textual pre-filter
sends only statements that could possibly matter to the parser, and answers are cached by
exact text (classifiercache.py), so the data path pays a dictionary lookup for statements it has seen.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass

from pglast import ast, enums, parse_sql, visitors
from pglast.parser import ParseError

# Settings the server reports with ParameterStatus: the proxy sees every change to them and
# carries them to the next server connection, so SET of these needs no pinning.
REPORTED_SETTINGS = frozenset(
    {
        "client_encoding",
        "datestyle",
        "timezone",
        "intervalstyle",
        "application_name",
        "standard_conforming_strings",
    }
)
# SET TRANSACTION ... and SET TRANSACTION SNAPSHOT last only for the transaction.
_TRANSACTION_SCOPED = frozenset({"transaction", "transaction snapshot"})
_RESETS = frozenset({enums.VariableSetKind.VAR_RESET, enums.VariableSetKind.VAR_RESET_ALL})
_SESSION_LOCK_FUNCTIONS = frozenset(
    {"pg_advisory_lock", "pg_advisory_lock_shared", "pg_try_advisory_lock", "pg_try_advisory_lock_shared"}
)
# No false negatives allowed: any statement with session effects contains one of these.
# Comments and U& identifiers could hide a keyword from a regex, so their mere presence sends
# the statement to the parser.
_MIGHT_MATTER = re.compile(
    r"/\*|--|u&|advisory|set_config"
    r"|(?:^|;)[\s(]*(?:set|reset)\b"
    r"|\b(?:prepare|listen|temp|temporary|pg_temp|declare|load|discard|deallocate)\b",
    re.IGNORECASE,
)


class Effect(enum.Enum):
    NONE = "none"
    # Leaves state only this server session has: the client must keep this server connection.
    SESSION_STATE = "session state"
    # Drops the server's prepared statements (DISCARD ALL, DEALLOCATE ALL).
    FORGETS_STATEMENTS = "forgets prepared statements"


@dataclass(frozen=True, slots=True)
class Classification:
    effect: Effect
    reason: str = ""


_NO_EFFECT = Classification(Effect.NONE)


def might_matter(sql: str) -> bool:
    """False only for statements that certainly leave no session state (no parse needed)."""
    return _MIGHT_MATTER.search(sql) is not None


def classify(sql: str) -> Classification:
    if not might_matter(sql):
        return _NO_EFFECT
    try:
        statements = parse_sql(sql)
    except ParseError:
        # The server will refuse it too; nothing it could leave behind.
        return _NO_EFFECT
    finder = _EffectFinder()
    for raw in statements:
        if raw.stmt is not None:
            finder(raw.stmt)
        if finder.result.effect is Effect.SESSION_STATE:
            break
    return finder.result


class _EffectFinder(visitors.Visitor):
    def __init__(self) -> None:
        super().__init__()
        self.result = _NO_EFFECT
        self._dropped_at_commit: set[int] = set()

    def _found(self, effect: Effect, reason: str) -> None:
        if self.result.effect is not Effect.SESSION_STATE:
            self.result = Classification(effect, reason)

    def visit_VariableSetStmt(self, ancestors: visitors.Ancestor, node: ast.VariableSetStmt) -> None:
        # A SET inside ALTER DATABASE/ROLE/SYSTEM or CREATE FUNCTION is stored in the catalog.
        if ancestors.node is not None or node.is_local or node.kind in _RESETS:
            return
        name = (node.name or "").lower()
        if name not in REPORTED_SETTINGS and name not in _TRANSACTION_SCOPED:
            self._found(Effect.SESSION_STATE, f"SET {name}")

    def visit_PrepareStmt(self, ancestors: object, node: ast.PrepareStmt) -> None:
        self._found(Effect.SESSION_STATE, "PREPARE")

    def visit_ListenStmt(self, ancestors: object, node: ast.ListenStmt) -> None:
        self._found(Effect.SESSION_STATE, "LISTEN")

    def visit_LoadStmt(self, ancestors: object, node: ast.LoadStmt) -> None:
        self._found(Effect.SESSION_STATE, "LOAD")

    def visit_CreateStmt(self, ancestors: object, node: ast.CreateStmt) -> None:
        if node.oncommit is enums.OnCommitAction.ONCOMMIT_DROP and node.relation is not None:
            self._dropped_at_commit.add(id(node.relation))

    def visit_IntoClause(self, ancestors: object, node: ast.IntoClause) -> None:
        if node.onCommit is enums.OnCommitAction.ONCOMMIT_DROP and node.rel is not None:
            self._dropped_at_commit.add(id(node.rel))

    def visit_RangeVar(self, ancestors: object, node: ast.RangeVar) -> None:
        # Catches CREATE TEMP TABLE / SEQUENCE / VIEW and SELECT ... INTO TEMP alike; a
        # temporary table dropped at commit cannot outlive the transaction.
        temporary = node.relpersistence == "t" or node.schemaname == "pg_temp"
        if temporary and id(node) not in self._dropped_at_commit:
            self._found(Effect.SESSION_STATE, "temporary relation")

    def visit_CreateFunctionStmt(self, ancestors: object, node: ast.CreateFunctionStmt) -> None:
        names = [part.sval for part in node.funcname or ()]
        if len(names) > 1 and names[0] == "pg_temp":
            self._found(Effect.SESSION_STATE, "temporary function")

    def visit_DeclareCursorStmt(self, ancestors: object, node: ast.DeclareCursorStmt) -> None:
        if (node.options or 0) & enums.CURSOR_OPT_HOLD:
            self._found(Effect.SESSION_STATE, "WITH HOLD cursor")

    def visit_DiscardStmt(self, ancestors: object, node: ast.DiscardStmt) -> None:
        if node.target is enums.DiscardMode.DISCARD_ALL:
            self._found(Effect.FORGETS_STATEMENTS, "DISCARD ALL")

    def visit_DeallocateStmt(self, ancestors: object, node: ast.DeallocateStmt) -> None:
        # DEALLOCATE of one name cannot reach the proxy's own statement names; ALL can.
        if node.name is None:
            self._found(Effect.FORGETS_STATEMENTS, "DEALLOCATE ALL")

    def visit_FuncCall(self, ancestors: object, node: ast.FuncCall) -> None:
        name = (node.funcname or ())[-1].sval.lower()
        arguments = node.args or ()
        if name in _SESSION_LOCK_FUNCTIONS:
            self._found(Effect.SESSION_STATE, f"session advisory lock ({name})")
        elif name == "set_config" and not (len(arguments) == 3 and _is_true_constant(arguments[2])):
            self._found(Effect.SESSION_STATE, "set_config(..., false)")


def _is_true_constant(node: object) -> bool:
    """True only for a literal true: anything computed at run time may be false."""
    if isinstance(node, ast.TypeCast):
        node = node.arg
    return isinstance(node, ast.A_Const) and isinstance(node.val, ast.Boolean) and bool(node.val.boolval)
