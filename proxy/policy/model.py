"""Per-role SQL policy values: what a role may run, as parsed from its policy file."""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType


class PolicyMode(enum.Enum):
    ENFORCE = "enforce"  # refuse what is not allowed
    LEARN = "learn"  # allow everything, record new statements for review
    MONITOR = "monitor"  # allow everything, log what enforce would have refused


# Statement kinds a policy may allow by name (SELECT FOR UPDATE is a SELECT that takes row locks).
STATEMENT_KINDS = frozenset(
    {
        "SELECT",
        "SELECT FOR UPDATE",
        "INSERT",
        "UPDATE",
        "DELETE",
        "MERGE",
        "COPY FROM STDIN",
        "COPY TO STDOUT",
        "SET",
        "SHOW",
        "RESET",
        "LOCK",
        "LISTEN",
        "UNLISTEN",
        "NOTIFY",
        "PREPARE",
        "EXECUTE",
        "DEALLOCATE",
        "DECLARE CURSOR",
        "FETCH",
        "CLOSE CURSOR",
        "EXPLAIN",
        "CALL",
        "TRANSACTION",
        "DISCARD",
    }
)

# The built-in deny list: what no allow rule overrides unless a policy names it in
# `allow.denylist_exceptions`. Statement classes first, then functions.
DENIED_STATEMENTS = frozenset(
    {
        "DDL",
        "GRANT",
        "ALTER SYSTEM",
        "COPY PROGRAM",
        "COPY FILE",
        "DO",
        "LOAD",
        "CREATE EXTENSION",
        "SET ROLE",
        "SET SESSION AUTHORIZATION",
        # SET of search_path, standard_conforming_strings, client_encoding and the other
        # settings that change who the session is, what names mean or how strings are read.
        "SET SECURITY SETTING",
        "TWO-PHASE COMMIT",
    }
)
DENIED_FUNCTIONS = frozenset(
    {
        "pg_sleep",
        "pg_sleep_for",
        "pg_sleep_until",
        "pg_stat_file",
        "pg_terminate_backend",
        "pg_cancel_backend",
        "pg_reload_conf",
        "pg_rotate_logfile",
        # These run SQL or read whole tables given by name, out of the policy's sight.
        "query_to_xml",
        "query_to_xmlschema",
        "query_to_xml_and_xmlschema",
        "cursor_to_xml",
        "cursor_to_xmlschema",
        "table_to_xml",
        "table_to_xmlschema",
        "table_to_xml_and_xmlschema",
        "schema_to_xml",
        "schema_to_xmlschema",
        "schema_to_xml_and_xmlschema",
        "database_to_xml",
        "database_to_xmlschema",
        "database_to_xml_and_xmlschema",
        "ts_stat",
        "ts_rewrite",
    }
)
# Any function whose name starts with one of these is denied too: dblink*, server-side file
# access (pg_read_file, pg_read_binary_file, pg_ls_dir, pg_ls_logdir, ...; adminpack's
# pg_file_*), large objects (lo_import, lo_export, lo_get, lo_put, ...).
DENIED_FUNCTION_PREFIXES = ("dblink", "pg_read_", "pg_ls_", "pg_file_", "lo_")
# set_config is denied only for security-relevant settings (see policy.postgres.SENSITIVE_SETTINGS).
DENYLIST_NAMES = DENIED_STATEMENTS | DENIED_FUNCTIONS | frozenset((*DENIED_FUNCTION_PREFIXES, "set_config"))


@dataclass(frozen=True, slots=True)
class ApprovedStatement:
    fingerprint: str
    text: str


@dataclass(frozen=True, slots=True)
class RolePolicy:
    """One role's policy. Table names are schema-qualified (resolved through ``search_path``)."""

    mode: PolicyMode = PolicyMode.ENFORCE
    search_path: tuple[str, ...] = ("public",)
    kinds: frozenset[str] = frozenset()
    read_tables: frozenset[str] = frozenset()
    write_tables: frozenset[str] = frozenset()
    update_without_where: bool = False
    stacked_queries: bool = False
    function_call_message: bool = False
    housekeeping: bool = True
    denylist_exceptions: frozenset[str] = frozenset()
    max_violations: int | None = None
    fingerprints: Mapping[str, ApprovedStatement] = field(default_factory=lambda: MappingProxyType({}))

    def qualify(self, table: str) -> str:
        return table if "." in table else f"{self.search_path[0]}.{table}"
