"""Which statements leave state in a server session, the thing transaction pooling cannot move.

Decided on PostgreSQL's own parse tree (pglast / libpg_query). A cheap textual pre-filter
sends only statements that could possibly matter to the parser, and answers are cached by
exact text (classifiercache.py), so the data path pays a dictionary lookup for statements it has seen.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Mapping
from dataclasses import dataclass

from pglast import ast, enums, parse_sql, visitors
from pglast.parser import ParseError

from proxy.policy.encodings import accepted_encoding, refusal_message
from proxy.protocols.postgres.parameters import SESSION_PARAMETERS
from proxy.protocols.postgres.prepared import SERVER_NAME_PREFIX

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
# Settings the proxy sets for clients (startup parameters) that the server does not report. A SET,
# RESET or set_config(..., false) of one is carried rather than pinned: the proxy marks the
# setting unknown on the server connection (its next client gets it set or reset) and reads the
# value back before it lends the connection to anyone else (session.py).
CARRIED_SETTINGS = frozenset(SESSION_PARAMETERS) - REPORTED_SETTINGS
# SET TRANSACTION ... and SET TRANSACTION SNAPSHOT last only for the transaction.
_TRANSACTION_SCOPED = frozenset({"transaction", "transaction snapshot"})
# What PostgreSQL reads as true (parse_bool takes any prefix of true and yes); anything else may be off.
_TRUE_WORDS = frozenset({"on", "1", "t", "tr", "tru", "true", "y", "ye", "yes"})
_RESETS = frozenset({enums.VariableSetKind.VAR_RESET, enums.VariableSetKind.VAR_RESET_ALL})
_SESSION_LOCK_FUNCTIONS = frozenset(
    {"pg_advisory_lock", "pg_advisory_lock_shared", "pg_try_advisory_lock", "pg_try_advisory_lock_shared"}
)
# No false negatives allowed: any statement with session effects contains one of these.
# Comments and U& identifiers could hide a keyword from a regex, so their mere presence sends
# the statement to the parser. A SET inside ALTER ROLE/DATABASE/SYSTEM/FUNCTION or CREATE FUNCTION
# starts no statement: it is found by the setting's name, which no spelling can avoid.
_MIGHT_MATTER = re.compile(
    r"/\*|--|u&|advisory|set_config|client_encoding|standard_conforming_strings"
    r"|(?:^|;)[\s(]*(?:set|reset)\b"
    r"|\b(?:prepare|execute|listen|temp|temporary|pg_temp|declare|load|discard|deallocate)\b"
    r"|" + SERVER_NAME_PREFIX,
    re.IGNORECASE,
)


class Effect(enum.Enum):
    NONE = "none"
    # Changes settings the proxy carries (Classification.settings): followed, not pinned.
    CARRIED_SETTING = "carried setting"
    # Leaves state only this server session has: the client must keep this server connection.
    SESSION_STATE = "session state"
    # Drops the server's prepared statements (DISCARD ALL, DEALLOCATE ALL).
    FORGETS_STATEMENTS = "forgets prepared statements"
    # Would make the server split statements otherwise than the proxy reads them: a client encoding
    # the proxy cannot read as the server does, or standard_conforming_strings off (refused for
    # every role and policy mode); the reason is the client's error message.
    UNSUPPORTED_ENCODING = "unsupported client encoding"
    # PREPARE, EXECUTE or DEALLOCATE of a name in the proxy's own namespace (prepared.py): on a
    # shared server connection that would reach the statements other terminals prepared.
    RESERVED_NAME = "reserved statement name"
    # set_config whose setting name, or whose client_encoding or standard_conforming_strings
    # value, is a bound parameter ($n): decided when the values come (Bind), by the same rules as
    # constants. Where no Bind follows (a Query, SQL PREPARE) it is refused; the reason says why.
    DECIDED_AT_BIND = "decided at bind"


@dataclass(frozen=True, slots=True)
class Classification:
    effect: Effect
    reason: str = ""
    # The carried settings (CARRIED_SETTINGS, lower case) the statement may change, whatever its
    # effect otherwise: a statement that also pins or forgets still leaves these behind.
    settings: frozenset[str] = frozenset()
    # Names the statement runs by SQL EXECUTE (as the server reads them): a statement the client
    # prepared through the protocol that changes carried settings changes them again each time.
    executes: frozenset[str] = frozenset()


_NO_EFFECT = Classification(Effect.NONE)
# What the proxy cannot read counts as leaving state: the session keeps its server connection.
NOT_PARSABLE = Classification(Effect.SESSION_STATE, "a statement the proxy cannot parse")
NOT_READABLE = Classification(
    Effect.SESSION_STATE, "a statement the proxy cannot read in the client encoding"
)
_RANK = {
    Effect.NONE: 0,
    Effect.CARRIED_SETTING: 1,
    Effect.FORGETS_STATEMENTS: 2,
    Effect.SESSION_STATE: 3,
    Effect.DECIDED_AT_BIND: 4,
    Effect.RESERVED_NAME: 5,
    Effect.UNSUPPORTED_ENCODING: 5,
}
_TOP_RANK = max(_RANK.values())


def might_matter(sql: str) -> bool:
    """False only for statements that certainly leave no session state (no parse needed)."""
    return _MIGHT_MATTER.search(sql) is not None


def classify(sql: str, bound: Mapping[int, str] | None = None) -> Classification:
    """What ``sql`` leaves in the server session. ``bound``: the values bound to its parameters
    (by number), read as the server reads them; a parameter missing from it is not readable."""
    if not might_matter(sql):
        return _NO_EFFECT
    try:
        statements = parse_sql(sql)
    except ParseError:
        # Most such texts the server refuses too, but libpg_query follows a newer grammar than
        # the server may: what the proxy cannot read, it cannot call harmless.
        return NOT_PARSABLE
    finder = _EffectFinder(bound)
    for raw in statements:
        if raw.stmt is not None:
            finder(raw.stmt)
        if _RANK[finder.result.effect] == _TOP_RANK:
            break
    return finder.classification()


class _EffectFinder(visitors.Visitor):
    def __init__(self, bound: Mapping[int, str] | None = None) -> None:
        super().__init__()
        self.result = _NO_EFFECT
        self.settings: set[str] = set()
        self.executes: set[str] = set()
        self._bound = bound
        self._dropped_at_commit: set[int] = set()

    def classification(self) -> Classification:
        """What the statements visited leave behind, with every carried setting they may change
        and every prepared statement they execute."""
        result = self.result
        if self.settings or self.executes:
            result = Classification(
                result.effect, result.reason, frozenset(self.settings), frozenset(self.executes)
            )
        return result

    def _found(self, effect: Effect, reason: str) -> None:
        # A refusal (an unsupported encoding, a reserved name) outranks session state, which
        # outranks forgetting statements; between refusals the first found stands.
        if _RANK[effect] > _RANK[self.result.effect]:
            self.result = Classification(effect, reason)

    def _check_name(self, name: str | None) -> None:
        # pglast gives the name as the server reads it (folded to lower case unless quoted).
        if name is not None and name.startswith(SERVER_NAME_PREFIX):
            self._found(
                Effect.RESERVED_NAME,
                f'prepared statement names starting with "{SERVER_NAME_PREFIX}" are reserved for the proxy',
            )

    def visit_VariableSetStmt(self, ancestors: visitors.Ancestor, node: ast.VariableSetStmt) -> None:
        name = (node.name or "").lower()
        # SET NAMES is SET client_encoding in the parse tree. Refused wherever it stands, SET LOCAL
        # and ALTER ROLE/DATABASE ... SET included: no stored default may name such an encoding either.
        if node.kind is enums.VariableSetKind.VAR_SET_VALUE:
            if name == "client_encoding":
                self._check_encoding(node.args or ())
            elif name == "standard_conforming_strings":
                self._check_conforming_strings(node.args or ())
        # A SET inside ALTER DATABASE/ROLE/SYSTEM or CREATE FUNCTION is stored in the catalog.
        if ancestors.node is not None or node.is_local:
            return
        if node.kind in _RESETS:
            if node.kind is enums.VariableSetKind.VAR_RESET_ALL:
                self._found(Effect.SESSION_STATE, "RESET ALL")
            elif name in CARRIED_SETTINGS:
                self._carried(name, f"RESET {name}")
            return
        if name in CARRIED_SETTINGS:
            self._carried(name, f"SET {name}")
        elif name not in REPORTED_SETTINGS and name not in _TRANSACTION_SCOPED:
            self._found(Effect.SESSION_STATE, f"SET {name}")

    def _carried(self, name: str, reason: str) -> None:
        self.settings.add(name)
        self._found(Effect.CARRIED_SETTING, reason)

    def visit_PrepareStmt(self, ancestors: object, node: ast.PrepareStmt) -> None:
        self._found(Effect.SESSION_STATE, "PREPARE")
        self._check_name(node.name)

    def visit_ExecuteStmt(self, ancestors: object, node: ast.ExecuteStmt) -> None:
        self._check_name(node.name)
        if node.name is not None:
            self.executes.add(node.name)

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
        if node.name is None:
            self._found(Effect.FORGETS_STATEMENTS, "DEALLOCATE ALL")
        self._check_name(node.name)

    def visit_FuncCall(self, ancestors: object, node: ast.FuncCall) -> None:
        name = (node.funcname or ())[-1].sval.lower()
        arguments = node.args or ()
        if name in _SESSION_LOCK_FUNCTIONS:
            self._found(Effect.SESSION_STATE, f"session advisory lock ({name})")
        elif name == "set_config":
            setting = self._text(arguments[0]) if arguments else None
            if setting is None:
                # A name computed at run time could be client_encoding; a bound one is read at Bind.
                self._refuse_unless_bound(arguments[:1], "set_config needs a constant setting name")
            elif setting.lower() == "client_encoding":
                self._check_encoding(arguments[1:2])
            elif setting.lower() == "standard_conforming_strings":
                self._check_conforming_strings(arguments[1:2])
            if len(arguments) == 3 and _is_true_constant(arguments[2]):
                return  # is_local: undone when the transaction ends
            if (
                setting is not None
                and setting.lower() in CARRIED_SETTINGS
                and len(arguments) == 3
                and _is_false_constant(arguments[2])
            ):
                self._carried(setting.lower(), f"set_config('{setting.lower()}', ..., false)")
            else:
                self._found(Effect.SESSION_STATE, "set_config(..., false)")

    def _check_encoding(self, values: tuple[ast.Node, ...]) -> None:
        """A new client_encoding must be one constant naming an accepted encoding (a value computed
        at run time could name any; the server's report of it is the backstop, see session.py)."""
        value = self._text(values[0]) if len(values) == 1 else None
        if value is None:
            self._refuse_unless_bound(values, "client_encoding may only be set to a constant name")
        elif accepted_encoding(value) is None:
            self._found(Effect.UNSUPPORTED_ENCODING, refusal_message(value))

    def _check_conforming_strings(self, values: tuple[ast.Node, ...]) -> None:
        """standard_conforming_strings may only be set on: off, backslashes escape in string
        literals and the server splits statements otherwise than the proxy's parser reads them."""
        value = self._text(values[0]) if len(values) == 1 else None
        if value is None:
            self._refuse_unless_bound(values, "standard_conforming_strings must stay on")
        elif value.lower() not in _TRUE_WORDS:
            self._found(Effect.UNSUPPORTED_ENCODING, "standard_conforming_strings must stay on")

    def _text(self, node: object) -> str | None:
        """A string constant's text, or the value bound to a parameter standing for one."""
        value = _constant_text(node)
        if value is None and self._bound is not None:
            number = bound_parameter(node)
            if number is not None:
                value = self._bound.get(number)
        return value

    def _refuse_unless_bound(self, values: tuple[ast.Node, ...], reason: str) -> None:
        """Refused, unless it is one parameter whose value is still to come (no values yet)."""
        number = bound_parameter(values[0]) if len(values) == 1 and self._bound is None else None
        self._found(Effect.UNSUPPORTED_ENCODING if number is None else Effect.DECIDED_AT_BIND, reason)


def _constant_text(node: object) -> str | None:
    """The text of a string constant (also cast), else None."""
    if isinstance(node, ast.TypeCast):
        node = node.arg
    if isinstance(node, ast.A_Const) and isinstance(node.val, ast.String):
        return node.val.sval or ""
    return None


# Types a parameter may be cast to (or declared as, parameters.py) for its bound bytes to be the
# text the server reads: no typmod may cut it, no type input (bpchar, name) may trim or truncate it.
_TEXT_TYPES = frozenset({"text", "varchar"})


def bound_parameter(node: object) -> int | None:
    """The number of a parameter ($n) standing alone for a text argument (also cast to text or
    varchar, without a length), else None."""
    if isinstance(node, ast.TypeCast):
        target = node.typeName
        names = [part.sval for part in target.names or () if isinstance(part, ast.String)] if target else []
        if (
            target is None
            or target.typmods
            or target.arrayBounds
            or not names
            or names[-1] not in _TEXT_TYPES
            or names[:-1] not in ([], ["pg_catalog"])
        ):
            return None
        node = node.arg
    if isinstance(node, ast.ParamRef) and node.number:
        return int(node.number)
    return None


def _is_false_constant(node: object) -> bool:
    """True only for a literal false: a value computed at run time may be true, and the setting
    then lasts only as long as the transaction, which the proxy cannot tell."""
    if isinstance(node, ast.TypeCast):
        node = node.arg
    return isinstance(node, ast.A_Const) and isinstance(node.val, ast.Boolean) and not node.val.boolval


def _is_true_constant(node: object) -> bool:
    """True only for a literal true: anything computed at run time may be false."""
    if isinstance(node, ast.TypeCast):
        node = node.arg
    return isinstance(node, ast.A_Const) and isinstance(node.val, ast.Boolean) and bool(node.val.boolval)
