"""What a PostgreSQL statement does, read off PostgreSQL's own parse tree (pglast / libpg_query).

No regexes: comments, case, quoting, ``U&`` escapes, dollar quoting and nesting are resolved by
the same parser the server uses, so a statement cannot look different to the proxy and to
PostgreSQL.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from pglast import ast, enums, parse_sql, visitors
from pglast.parser import ParseError, fingerprint

from proxy.policy.model import FunctionName
from proxy.policy.redact import log_text

__all__ = ["ParseError", "PreparedName", "StatementFacts", "analyze"]

# Settings set_config may not touch: they change who the session is or what it can see.
SENSITIVE_SETTINGS = frozenset(
    {
        "role",
        "session_authorization",
        "search_path",
        "default_transaction_read_only",
        "transaction_read_only",
        "row_security",
        "session_replication_role",
        "lo_compat_privileges",
        "allow_system_table_mods",
        "default_tablespace",
        "temp_tablespaces",
        # These change how the server splits string literals: after them the server and the
        # proxy's parser could read one statement text differently.
        "standard_conforming_strings",
        "backslash_quote",
        "client_encoding",
        "escape_string_warning",
    }
)
_SENSITIVE_SHOW = re.compile(
    r"file|director|ssl|password|hba|ident|log|preload|archive|command|key|conninfo|^all$"
)
# jit: asyncpg's type introspection turns it off (SET or set_config); it changes only speed.
_HOUSEKEEPING_SETTINGS = frozenset({"application_name", "extra_float_digits", "jit"})
_HOUSEKEEPING_LOCAL_SETTINGS = frozenset({"statement_timeout", "lock_timeout"})
_HOUSEKEEPING_FUNCTIONS = frozenset({"version", "current_database", "current_schema", "pg_backend_pid"})
_TWO_PHASE = frozenset(
    {
        enums.TransactionStmtKind.TRANS_STMT_PREPARE,
        enums.TransactionStmtKind.TRANS_STMT_COMMIT_PREPARED,
        enums.TransactionStmtKind.TRANS_STMT_ROLLBACK_PREPARED,
    }
)
_DDL_LABELS = {
    "CreateStmt": "CREATE TABLE",
    "CreateTableAsStmt": "CREATE TABLE AS",
    "DropStmt": "DROP",
    "AlterTableStmt": "ALTER TABLE",
    "TruncateStmt": "TRUNCATE",
    "IndexStmt": "CREATE INDEX",
    "ViewStmt": "CREATE VIEW",
    "CreateFunctionStmt": "CREATE FUNCTION",
    "RenameStmt": "RENAME",
    "VacuumStmt": "VACUUM",
    "CreateRoleStmt": "CREATE ROLE",
    "AlterRoleStmt": "ALTER ROLE",
}
# Statements named by the deny list itself rather than as generic DDL.
_DENIED_BY_CLASS = {
    "DoStmt": ("DO", "DO"),
    "LoadStmt": ("LOAD", "LOAD"),
    "AlterSystemStmt": ("ALTER SYSTEM", "ALTER SYSTEM"),
    "CreateExtensionStmt": ("CREATE EXTENSION", "CREATE EXTENSION"),
    "GrantRoleStmt": ("GRANT", "GRANT ROLE"),
}
_ALLOWED_BY_CLASS = {
    "InsertStmt": "INSERT",
    "UpdateStmt": "UPDATE",
    "DeleteStmt": "DELETE",
    "MergeStmt": "MERGE",
    "VariableShowStmt": "SHOW",
    "LockStmt": "LOCK",
    "ListenStmt": "LISTEN",
    "UnlistenStmt": "UNLISTEN",
    "NotifyStmt": "NOTIFY",
    "PrepareStmt": "PREPARE",
    "ExecuteStmt": "EXECUTE",
    "DeallocateStmt": "DEALLOCATE",
    "DeclareCursorStmt": "DECLARE CURSOR",
    "FetchStmt": "FETCH",
    "ClosePortalStmt": "CLOSE CURSOR",
    "ExplainStmt": "EXPLAIN",
    "CallStmt": "CALL",
    "DiscardStmt": "DISCARD",
    "TransactionStmt": "TRANSACTION",
}


@dataclass(frozen=True, slots=True)
class PreparedName:
    """A SQL-level prepared statement a statement names: PREPARE, EXECUTE or DEALLOCATE of it.

    A session follows these to decide each EXECUTE by what it runs (session.py)."""

    action: str  # PREPARE, EXECUTE or DEALLOCATE (DISCARD ALL deallocates all)
    name: str | None  # as the server reads it; None: every one (DEALLOCATE ALL, DISCARD ALL)
    text: str = ""  # PREPARE: the whole statement, decided again for each EXECUTE of the name


@dataclass(frozen=True, slots=True)
class StatementFacts:
    """One statement: its kind, what it reads, writes, locks and calls, and its fingerprint."""

    kind: str  # a policy statement kind, e.g. "SELECT", "INSERT", "TRANSACTION"
    label: str  # what to call it in messages, e.g. "DROP", "BEGIN"
    denied: frozenset[str]  # deny-list entries it hits (e.g. "DDL", "pg_sleep")
    reads: frozenset[str]
    writes: frozenset[str]
    locks: frozenset[str]
    kinds_inside: frozenset[str]  # kinds of statements nested in it (CTE writes, EXPLAIN, PREPARE)
    functions: frozenset[FunctionName]  # every function it calls, as spelled (schema "" if unqualified)
    sequences: frozenset[str]  # sequences it advances or reads (nextval/currval/setval), qualified
    unnamed_sequence_calls: frozenset[str]  # sequence functions given no constant sequence name
    unbounded_write: bool  # UPDATE or DELETE without a WHERE that restricts rows
    housekeeping: bool
    resets_settings: bool  # RESET ALL or DISCARD ALL: client_encoding too returns to its reset value
    fingerprint: str
    normalized: str
    prepared_name: PreparedName | None = None


def analyze(sql: str, search_path: tuple[str, ...]) -> list[StatementFacts]:
    """Facts for each statement of ``sql``; raises ParseError when PostgreSQL could not parse it."""
    raw_statements = parse_sql(sql)
    facts = []
    for raw in raw_statements:
        if raw.stmt is None:
            continue
        # pglast reports statement positions in characters of the str it was given.
        start = raw.stmt_location or 0
        end = start + raw.stmt_len if raw.stmt_len else len(sql)
        facts.append(_facts(raw.stmt, sql[start:end].strip(), search_path))
    return facts


def _facts(statement: ast.Node, text: str, search_path: tuple[str, ...]) -> StatementFacts:
    collector = _Collector(search_path[0])
    collector(statement)
    kind, label, denied = _classify(statement)
    denied |= collector.denied_functions
    if collector.select_into:
        denied |= {"DDL"}
        label = "SELECT INTO"
    if kind == "SELECT" and (collector.locks_all_from or collector.locked):
        kind = label = "SELECT FOR UPDATE"
    reads = frozenset(collector.tables - collector.written)
    locked = frozenset(collector.locked) | (reads if collector.locks_all_from else frozenset())
    nested = frozenset(collector.nested_kinds)
    return StatementFacts(
        kind=kind,
        label=label,
        denied=frozenset(denied),
        reads=reads,
        writes=frozenset(collector.written),
        locks=locked,
        kinds_inside=nested,
        functions=frozenset(collector.functions),
        sequences=frozenset(collector.sequences),
        unnamed_sequence_calls=frozenset(collector.unnamed_sequence_calls),
        unbounded_write=collector.unbounded_write,
        housekeeping=_is_housekeeping(statement) and not (reads or collector.written or locked or nested),
        resets_settings=_resets_settings(statement),
        fingerprint=_fingerprint(text),
        normalized=log_text(text),
        prepared_name=_prepared_name(statement, collector.executes, text),
    )


def _prepared_name(statement: ast.Node, executes: str | None, text: str) -> PreparedName | None:
    if isinstance(statement, ast.PrepareStmt):
        return PreparedName("PREPARE", statement.name, text)
    if isinstance(statement, ast.DeallocateStmt):
        return PreparedName("DEALLOCATE", statement.name)
    if isinstance(statement, ast.DiscardStmt) and statement.target is enums.DiscardMode.DISCARD_ALL:
        return PreparedName("DEALLOCATE", None)
    if executes is not None:  # EXECUTE, also inside EXPLAIN or CREATE TABLE AS
        return PreparedName("EXECUTE", executes)
    return None


def _classify(statement: ast.Node) -> tuple[str, str, set[str]]:
    """(policy kind, label, deny-list hits) of a top-level statement."""
    name = type(statement).__name__
    if isinstance(statement, ast.SelectStmt):
        return "SELECT", "SELECT", set()
    if isinstance(statement, ast.CopyStmt):
        if statement.is_program:
            return "COPY", "COPY PROGRAM", {"COPY PROGRAM"}
        if statement.filename is not None:
            return "COPY", "COPY FILE", {"COPY FILE"}
        return (
            ("COPY FROM STDIN", "COPY FROM STDIN", set())
            if statement.is_from
            else (
                "COPY TO STDOUT",
                "COPY TO STDOUT",
                set(),
            )
        )
    if isinstance(statement, ast.VariableSetStmt):
        setting = (statement.name or "").lower()
        if setting == "role":
            return "SET", "SET ROLE", {"SET ROLE"}
        if setting == "session_authorization":
            return "SET", "SET SESSION AUTHORIZATION", {"SET SESSION AUTHORIZATION"}
        if setting in SENSITIVE_SETTINGS:
            return "SET", f"SET {setting}", {"SET SECURITY SETTING"}
        resets = (enums.VariableSetKind.VAR_RESET, enums.VariableSetKind.VAR_RESET_ALL)
        return ("RESET", "RESET", set()) if statement.kind in resets else ("SET", "SET", set())
    if isinstance(statement, ast.TransactionStmt):
        label = (
            statement.kind.name.removeprefix("TRANS_STMT_").replace("_", " ") if statement.kind else "BEGIN"
        )
        return "TRANSACTION", label, {"TWO-PHASE COMMIT"} if statement.kind in _TWO_PHASE else set()
    if isinstance(statement, ast.GrantStmt):
        return "GRANT", "GRANT" if statement.is_grant else "REVOKE", {"GRANT"}
    if name in _DENIED_BY_CLASS:
        denied, label = _DENIED_BY_CLASS[name]
        return denied, label, {denied}
    if name in _ALLOWED_BY_CLASS:
        kind = _ALLOWED_BY_CLASS[name]
        return kind, kind, set()
    return "DDL", _DDL_LABELS.get(name, _label_from_class(name)), {"DDL"}


def _label_from_class(name: str) -> str:
    words = re.findall(r"[A-Z][a-z]*", name.removesuffix("Stmt"))
    return " ".join(words).upper() or name


class _Collector(visitors.Visitor):
    """Walks one statement's whole tree, subqueries and CTEs included."""

    def __init__(self, default_schema: str) -> None:
        super().__init__()
        self._schema = default_schema
        self.tables: set[str] = set()
        self.written: set[str] = set()
        self.locked: set[str] = set()
        self.nested_kinds: set[str] = set()
        self.denied_functions: set[str] = set()
        self.functions: set[FunctionName] = set()
        self.sequences: set[str] = set()
        self.unnamed_sequence_calls: set[str] = set()
        self.select_into = False
        self.executes: str | None = None  # the prepared statement an EXECUTE in it runs
        self.locks_all_from = False
        self.unbounded_write = False
        self._write_targets: set[int] = set()
        self._depth = 0

    def _name(self, relation: ast.RangeVar) -> str:
        return f"{relation.schemaname or self._schema}.{relation.relname}"

    def visit_RangeVar(self, ancestors: visitors.Ancestor, node: ast.RangeVar) -> None:
        name = self._name(node)
        if id(node) in self._write_targets:
            self.written.add(name)
        elif node.schemaname is None and _names_a_visible_cte(node.relname or "", ancestors):
            return
        else:
            self.tables.add(name)

    def _target(self, relation: ast.RangeVar | None, kind: str) -> None:
        if relation is not None:
            self._write_targets.add(id(relation))
            self.written.add(self._name(relation))
        self.nested_kinds.add(kind)

    def visit_InsertStmt(self, ancestors: object, node: ast.InsertStmt) -> None:
        self._target(node.relation, "INSERT")

    def visit_UpdateStmt(self, ancestors: object, node: ast.UpdateStmt) -> None:
        self._target(node.relation, "UPDATE")
        self.unbounded_write |= not _restricts_rows(node.whereClause, node.relation)

    def visit_DeleteStmt(self, ancestors: object, node: ast.DeleteStmt) -> None:
        self._target(node.relation, "DELETE")
        self.unbounded_write |= not _restricts_rows(node.whereClause, node.relation)

    def visit_MergeStmt(self, ancestors: object, node: ast.MergeStmt) -> None:
        self._target(node.relation, "MERGE")

    def visit_CopyStmt(self, ancestors: object, node: ast.CopyStmt) -> None:
        if node.is_from:
            self._target(node.relation, "COPY FROM STDIN")

    def visit_LockStmt(self, ancestors: object, node: ast.LockStmt) -> None:
        for relation in node.relations or ():
            if isinstance(relation, ast.RangeVar):
                self.locked.add(self._name(relation))

    def visit_SelectStmt(self, ancestors: object, node: ast.SelectStmt) -> None:
        if node.intoClause is not None:
            self.select_into = True
        for clause in node.lockingClause or ():
            if not isinstance(clause, ast.LockingClause):
                continue
            if clause.lockedRels:
                self.locked.update(
                    self._name(rel) for rel in clause.lockedRels if isinstance(rel, ast.RangeVar)
                )
            else:
                self.locks_all_from = True

    def visit_FuncCall(self, ancestors: object, node: ast.FuncCall) -> None:
        # Every call, wherever it is (FROM, CALL, defaults, subqueries): the policy allows or
        # refuses each one. Operators, casts and expressions such as COALESCE are not calls.
        parts = [part.sval or "" for part in node.funcname or () if isinstance(part, ast.String)]
        # A three-part name's first part is the database, which must be the current one.
        function = FunctionName(parts[-2] if len(parts) > 1 else "", parts[-1] if parts else "")
        self.functions.add(function)
        name = function.name
        if function.schema in ("", "pg_catalog") and name in _SEQUENCE_FUNCTIONS:
            sequence = _constant_relation_name(node.args[0]) if node.args else None
            if sequence is None:
                self.unnamed_sequence_calls.add(name)
            else:
                schema, relation = sequence
                self.sequences.add(f"{schema or self._schema}.{relation}")
        if name == "set_config" and function.schema in ("", "pg_catalog"):
            setting = _constant_setting(node.args or ())
            if setting is None or setting in SENSITIVE_SETTINGS:
                self.denied_functions.add("set_config")
            elif setting not in _HOUSEKEEPING_SETTINGS:
                # set_config is a SET by other means: it needs the SET kind, as SET would.
                self.nested_kinds.add("SET")

    def visit_PrepareStmt(self, ancestors: object, node: ast.PrepareStmt) -> None:
        self.nested_kinds.add(_nested_kind(node.query))

    def visit_ExecuteStmt(self, ancestors: object, node: ast.ExecuteStmt) -> None:
        self.executes = node.name

    def visit_ExplainStmt(self, ancestors: object, node: ast.ExplainStmt) -> None:
        self.nested_kinds.add(_nested_kind(node.query))

    def visit_DeclareCursorStmt(self, ancestors: object, node: ast.DeclareCursorStmt) -> None:
        self.nested_kinds.add(_nested_kind(node.query))


def _names_a_visible_cte(name: str, ancestors: visitors.Ancestor) -> bool:
    """Whether ``name`` at this point refers to a CTE rather than a table.

    Walks out through the enclosing statements: a WITH clause's CTEs are visible to the
    statement body, and inside the clause only the CTEs before the current one are (all of
    them under WITH RECURSIVE), so a CTE cannot hide a same-named table anywhere else.
    """
    chain: list[tuple[object, object]] = []
    step: visitors.Ancestor | None = ancestors
    while step is not None and step.node is not None:
        chain.append((step.node, step.member))
        step = step.parent
    for index, (holder, member) in enumerate(chain):
        clause = getattr(holder, "withClause", None) if isinstance(holder, ast.Node) else None
        if not isinstance(clause, ast.WithClause):
            continue
        names = [cte.ctename for cte in clause.ctes or () if isinstance(cte, ast.CommonTableExpr)]
        if member == "withClause" and not clause.recursive and index >= 2:
            position = chain[index - 2][1]
            names = names[: position if isinstance(position, int) else 0]
        if name in names:
            return True
    return False


def _restricts_rows(where: ast.Node | None, target: ast.RangeVar | None) -> bool:
    """Whether an UPDATE's or DELETE's WHERE clause can leave some rows of its table alone.

    The clause is read as AND/OR/NOT of conditions, with NOT pushed inward: an AND restricts
    when one of its parts does, an OR only when all of its branches do. A condition restricts
    when it refers to a column of the target table and does not compare an expression with
    itself (``id = id``). A condition without such a column (``true``, ``1=1``, ``'a'='a'``,
    ``$1``, ``now() > '2000-01-01'``) is the same for every row: it selects all of them or
    none. ``WHERE CURRENT OF cursor`` selects one row. This catches the constant-true clauses
    that stand in for "every row"; a tautology that needs the column's meaning to see
    (``id >= 0``) still counts as a restriction.
    """
    if where is None or target is None:
        return False
    names = {target.alias.aliasname if target.alias is not None else target.relname}
    return _condition_restricts(where, frozenset(name for name in names if name), negated=False)


def _condition_restricts(node: ast.Node, target_names: frozenset[str], *, negated: bool) -> bool:
    if isinstance(node, ast.BoolExpr):
        parts = node.args or ()
        if node.boolop is enums.BoolExprType.NOT_EXPR:
            return _condition_restricts(parts[0], target_names, negated=not negated)
        # De Morgan: NOT (a AND b) is NOT a OR NOT b, and NOT (a OR b) is NOT a AND NOT b.
        conjunction = (node.boolop is enums.BoolExprType.AND_EXPR) != negated
        restricting = [_condition_restricts(part, target_names, negated=negated) for part in parts]
        return any(restricting) if conjunction else all(restricting)
    if isinstance(node, ast.CurrentOfExpr):
        return True  # the grammar allows CURRENT OF only as the whole clause
    finder = _TargetColumnFinder(target_names)
    finder(node)
    return finder.found and not _compares_with_itself(node)


class _TargetColumnFinder(visitors.Visitor):
    """Finds a reference to a column of the target table: an unqualified column outside any
    subquery, or a column qualified with the target's name (or alias) anywhere, subqueries
    included (a correlated subquery restricts the outer rows)."""

    def __init__(self, target_names: frozenset[str]) -> None:
        super().__init__()
        self._target_names = target_names
        self.found = False

    def visit_ColumnRef(self, ancestors: visitors.Ancestor, node: ast.ColumnRef) -> None:
        fields = node.fields or ()
        qualifier = fields[-2] if len(fields) >= 2 else None
        if isinstance(qualifier, ast.String):
            self.found |= qualifier.sval in self._target_names
        elif qualifier is None:
            self.found |= not _inside_subquery(ancestors)


def _inside_subquery(ancestors: visitors.Ancestor) -> bool:
    step: visitors.Ancestor | None = ancestors
    while step is not None and step.node is not None:
        if isinstance(step.node, ast.SubLink) and step.member == "subselect":
            return True
        step = step.parent
    return False


_ALWAYS_TRUE_FOR_EQUAL_SIDES = frozenset({"=", "<=", ">="})


def _compares_with_itself(node: ast.Node) -> bool:
    """``x = x``, ``x >= x``, ``x IS NOT DISTINCT FROM x``: true for every row (where x is not null)."""
    if not isinstance(node, ast.A_Expr) or node.lexpr is None or node.lexpr != node.rexpr:
        return False
    if node.kind is enums.A_Expr_Kind.AEXPR_NOT_DISTINCT:
        return True
    operator = (node.name or ())[-1:]
    return (
        node.kind is enums.A_Expr_Kind.AEXPR_OP
        and len(operator) == 1
        and isinstance(operator[0], ast.String)
        and operator[0].sval in _ALWAYS_TRUE_FOR_EQUAL_SIDES
    )


def _nested_kind(query: ast.Node | None) -> str:
    return _classify(query)[0] if query is not None else "SELECT"


# The built-in functions that take a sequence (as regclass) and use or change its value.
_SEQUENCE_FUNCTIONS = frozenset({"nextval", "currval", "setval"})
# Casts a sequence name may pass through on its way to regclass without changing the text.
_NAME_CASTS = frozenset({"regclass", "text", "varchar", "name"})
_UNQUOTED_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_$]*")
_NAME_SPACES = " \t\n\r\f"  # PostgreSQL's scanner_isspace
_NAME_MAX_BYTES = 63  # NAMEDATALEN - 1: PostgreSQL would truncate a longer name


def _constant_relation_name(argument: ast.Node) -> tuple[str, str] | None:
    """(schema or "", name) of a relation given as a string constant (``'sales_id_seq'``,
    ``'public.sales_id_seq'::regclass``), read as PostgreSQL's regclass input reads it; None for
    anything computed, a numeric OID or a spelling this reader does not follow."""
    value: ast.Node | None = argument
    while isinstance(value, ast.TypeCast):
        target = value.typeName
        names = [part.sval for part in target.names or () if isinstance(part, ast.String)] if target else []
        if (
            target is None
            or target.typmods  # varchar(5) would cut the name short
            or target.arrayBounds
            or not names
            or names[-1] not in _NAME_CASTS
            or names[:-1] not in ([], ["pg_catalog"])
        ):
            return None
        value = value.arg
    if not (isinstance(value, ast.A_Const) and isinstance(value.val, ast.String)):
        return None
    parts = _split_relation_name(value.val.sval or "")
    if parts is None or len(parts) > 2:
        return None
    return (parts[0], parts[1]) if len(parts) == 2 else ("", parts[0])


def _split_relation_name(text: str) -> list[str] | None:
    """The dotted parts of a relation name as PostgreSQL's SplitIdentifierString reads them:
    unquoted parts fold to lower case, "quoted" parts keep theirs ("" is a quote)."""
    parts = []
    rest = text.lstrip(_NAME_SPACES)
    while True:
        if rest.startswith('"'):
            name, closed, rest = "", False, rest[1:]
            while rest and not closed:
                quote = rest.find('"')
                if quote < 0:
                    return None
                name += rest[:quote]
                if rest[quote + 1 : quote + 2] == '"':
                    name, rest = name + '"', rest[quote + 2 :]
                else:
                    closed, rest = True, rest[quote + 1 :]
            if not closed:
                return None
        else:
            unquoted = _UNQUOTED_NAME.match(rest)
            if unquoted is None:
                return None  # a number would be an OID; anything else is not read here
            name, rest = unquoted.group().lower(), rest[unquoted.end() :]
        if not name or len(name.encode()) > _NAME_MAX_BYTES:
            return None
        parts.append(name)
        rest = rest.lstrip(_NAME_SPACES)
        if not rest:
            return parts
        if not rest.startswith("."):
            return None
        rest = rest[1:].lstrip(_NAME_SPACES)


def _constant_setting(arguments: tuple[ast.Node, ...]) -> str | None:
    """The setting a set_config call names, lower-cased; None when it is computed at run time
    (it could name anything)."""
    setting = arguments[0] if arguments else None
    if isinstance(setting, ast.TypeCast):
        setting = setting.arg
    if not (isinstance(setting, ast.A_Const) and isinstance(setting.val, ast.String)):
        return None
    return (setting.val.sval or "").lower()


def _resets_settings(statement: ast.Node) -> bool:
    if isinstance(statement, ast.DiscardStmt):
        return statement.target is enums.DiscardMode.DISCARD_ALL
    return (
        isinstance(statement, ast.VariableSetStmt) and statement.kind is enums.VariableSetKind.VAR_RESET_ALL
    )


def _is_housekeeping(statement: ast.Node) -> bool:
    """Connection checks and session setup that drivers and pools send (docs/policies.md, Housekeeping)."""
    if isinstance(statement, ast.TransactionStmt):
        return statement.kind not in _TWO_PHASE
    if isinstance(statement, ast.DiscardStmt):
        return statement.target is enums.DiscardMode.DISCARD_ALL
    if isinstance(statement, ast.VariableShowStmt):
        return _SENSITIVE_SHOW.search((statement.name or "").lower()) is None
    if isinstance(statement, ast.VariableSetStmt):
        setting = (statement.name or "").lower()
        return setting in _HOUSEKEEPING_SETTINGS or (
            bool(statement.is_local) and setting in _HOUSEKEEPING_LOCAL_SETTINGS
        )
    if isinstance(statement, ast.SelectStmt):
        plain = (
            statement.fromClause is None
            and statement.withClause is None
            and statement.intoClause is None
            and statement.lockingClause is None
            and statement.whereClause is None
            and statement.valuesLists is None
            and statement.op is enums.SetOperation.SETOP_NONE
            and statement.limitCount is None
            and statement.limitOffset is None
            and statement.sortClause is None
            and statement.groupClause is None
            and statement.havingClause is None
            and statement.distinctClause is None
            and statement.windowClause is None
        )
        targets = statement.targetList or ()
        return plain and bool(targets) and all(_is_constant_target(target) for target in targets)
    return False


def _is_constant_target(target: ast.Node) -> bool:
    value = target.val if isinstance(target, ast.ResTarget) else None
    while isinstance(value, ast.TypeCast):
        value = value.arg
    if isinstance(value, ast.A_Const | ast.SQLValueFunction):
        return True
    if not isinstance(value, ast.FuncCall) or value.args:
        return False
    names = [part.sval for part in value.funcname or ()]
    return names[-1] in _HOUSEKEEPING_FUNCTIONS and (len(names) == 1 or names[0] == "pg_catalog")


def _fingerprint(text: str) -> str:
    try:
        return str(fingerprint(text))
    except ParseError:
        return ""
