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

# The built-in deny list: statement classes no allow rule overrides unless a policy names them
# in `allow.denylist_exceptions` (DDL still needs an approved fingerprint as well).
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
# set_config is a deny-list entry only for security-relevant settings (see
# policy.postgres.SENSITIVE_SETTINGS); on other settings it is an ordinary built-in function.
DENYLIST_NAMES = DENIED_STATEMENTS | frozenset({"set_config"})

# Functions are default-deny for a role with a policy: a call is allowed when it is one of these
# pg_catalog built-ins or the policy lists it in `allow.functions`. Each one computes from its
# arguments (or reads only the session's own clock, identity or sequence values): none reads
# other sessions, settings, files or catalogs, takes locks, sleeps, signals, or runs SQL given as
# text (so not pg_stat_*, current_setting, pg_notify, pg_advisory_lock, pg_sleep, dblink,
# query_to_xml, ts_stat, lo_*, pg_read_file, setval, ...).
BUILTIN_FUNCTIONS = frozenset(
    {
        # arithmetic and mathematics
        *("abs", "cbrt", "ceil", "ceiling", "degrees", "div", "exp", "factorial", "floor", "gcd"),
        *("lcm", "ln", "log", "log10", "min_scale", "mod", "pi", "power", "radians", "random"),
        *("round", "scale", "sign", "sqrt", "trim_scale", "trunc", "width_bucket"),
        *("acos", "acosd", "asin", "asind", "atan", "atan2", "atan2d", "atand", "cos", "cosd"),
        *("cot", "cotd", "sin", "sind", "tan", "tand", "sinh", "cosh", "tanh", "asinh", "acosh"),
        "atanh",
        # type names called as functions: int4(x) is a cast
        *("int2", "int4", "int8", "float4", "float8", "numeric", "text", "varchar", "bpchar"),
        *("bool", "date", "time", "timetz", "timestamp", "timestamptz", "interval"),
        # strings (SUBSTRING/POSITION/OVERLAY/TRIM/NORMALIZE syntax reads as the pg_catalog calls)
        *("ascii", "bit_length", "btrim", "char_length", "character_length", "chr", "concat"),
        *("concat_ws", "format", "initcap", "left", "length", "lower", "lpad", "ltrim", "md5"),
        *("normalize", "is_normalized", "octet_length", "overlay", "position", "quote_ident"),
        *("quote_literal", "quote_nullable", "regexp_count", "regexp_instr", "regexp_like"),
        *("regexp_match", "regexp_matches", "regexp_replace", "regexp_split_to_array"),
        *("regexp_split_to_table", "regexp_substr", "repeat", "replace", "reverse", "right"),
        *("rpad", "rtrim", "split_part", "starts_with", "strpos", "substr", "substring"),
        *("translate", "upper", "unistr", "to_hex", "to_ascii", "string_to_array"),
        *("string_to_table", "array_to_string", "encode", "decode", "convert", "convert_from"),
        *("convert_to", "sha224", "sha256", "sha384", "sha512", "parse_ident"),
        *("like_escape", "similar_to_escape", "similar_escape", "pg_collation_for"),
        # date and time, formatting (EXTRACT, AT TIME ZONE, OVERLAPS read as these calls)
        *("age", "clock_timestamp", "date_bin", "date_part", "date_trunc", "extract", "isfinite"),
        *("justify_days", "justify_hours", "justify_interval", "make_date", "make_interval"),
        *("make_time", "make_timestamp", "make_timestamptz", "now", "statement_timestamp"),
        *("timeofday", "transaction_timestamp", "timezone", "overlaps"),
        *("to_char", "to_date", "to_number", "to_timestamp"),
        # aggregates
        *("array_agg", "avg", "bit_and", "bit_or", "bit_xor", "bool_and", "bool_or", "count"),
        *("every", "json_agg", "jsonb_agg", "json_object_agg", "jsonb_object_agg", "max", "min"),
        *("range_agg", "range_intersect_agg", "string_agg", "sum", "corr", "covar_pop"),
        *("covar_samp", "regr_avgx", "regr_avgy", "regr_count", "regr_intercept", "regr_r2"),
        *("regr_slope", "regr_sxx", "regr_sxy", "regr_syy", "stddev", "stddev_pop", "stddev_samp"),
        *("variance", "var_pop", "var_samp", "mode", "percentile_cont", "percentile_disc", "xmlagg"),
        # window functions
        *("row_number", "rank", "dense_rank", "percent_rank", "cume_dist", "ntile", "lag", "lead"),
        *("first_value", "last_value", "nth_value"),
        # conditionals beyond COALESCE/NULLIF/GREATEST/LEAST (which are expressions, not calls)
        *("num_nulls", "num_nonnulls"),
        # arrays, ranges, set-returning generators
        *("array_append", "array_cat", "array_dims", "array_fill", "array_length", "array_lower"),
        *("array_ndims", "array_position", "array_positions", "array_prepend", "array_remove"),
        *("array_replace", "array_upper", "cardinality", "trim_array", "unnest"),
        *("generate_subscripts", "generate_series", "int4range", "int8range", "numrange"),
        *("tsrange", "tstzrange", "daterange", "isempty", "lower_inc", "upper_inc", "lower_inf"),
        *("upper_inf", "range_merge"),
        # bits and bytes
        *("get_bit", "set_bit", "get_byte", "set_byte", "bit_count"),
        # json and jsonb builders and accessors
        *("to_json", "to_jsonb", "array_to_json", "row_to_json", "json_build_array"),
        *("json_build_object", "jsonb_build_array", "jsonb_build_object", "json_object"),
        *("jsonb_object", "json_array_length", "jsonb_array_length", "json_each", "jsonb_each"),
        *("json_each_text", "jsonb_each_text", "json_extract_path", "jsonb_extract_path"),
        *("json_extract_path_text", "jsonb_extract_path_text", "json_object_keys"),
        *("jsonb_object_keys", "json_populate_record", "jsonb_populate_record"),
        *("json_populate_recordset", "jsonb_populate_recordset", "json_to_record"),
        *("jsonb_to_record", "json_to_recordset", "jsonb_to_recordset", "json_strip_nulls"),
        *("jsonb_strip_nulls", "jsonb_set", "jsonb_set_lax", "jsonb_insert", "jsonb_pretty"),
        *("json_typeof", "jsonb_typeof", "jsonb_path_exists", "jsonb_path_match"),
        *("jsonb_path_query", "jsonb_path_query_array", "jsonb_path_query_first"),
        *("jsonb_path_exists_tz", "jsonb_path_match_tz", "jsonb_path_query_tz"),
        *("jsonb_path_query_array_tz", "jsonb_path_query_first_tz", "json_array_elements"),
        *("jsonb_array_elements", "json_array_elements_text", "jsonb_array_elements_text"),
        # xml (the XMLELEMENT/XMLFOREST/... constructors are expressions, not calls)
        "xmlexists",
        # text search over given text (not ts_stat or ts_rewrite, which run a query given as text)
        *("to_tsvector", "to_tsquery", "plainto_tsquery", "phraseto_tsquery"),
        *("websearch_to_tsquery", "ts_rank", "ts_rank_cd", "ts_headline"),
        "gen_random_uuid",
        # the session's own identity and state, for driver and pool housekeeping
        *("version", "current_database", "current_schema", "current_schemas", "pg_backend_pid"),
        *("pg_is_in_recovery", "pg_typeof"),
        # sequences: nextval/currval only on a sequence in `allow.sequences` (checked apart).
        # Not lastval: it names no sequence, and on a pooled server connection its value can
        # come from another terminal's nextval on any sequence.
        *("nextval", "currval"),
        # refused on security-relevant settings (a deny-list entry, above)
        "set_config",
    }
)


@dataclass(frozen=True, slots=True, order=True)
class FunctionName:
    """A function as a statement calls it: ``schema`` is "" when the call is not qualified."""

    schema: str
    name: str

    def __str__(self) -> str:
        return f"{self.schema}.{self.name}" if self.schema else self.name


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
    functions: frozenset[str] = frozenset()  # `allow.functions`: "name" or "schema.name"
    sequences: frozenset[str] = frozenset()  # `allow.sequences`, schema-qualified
    max_violations: int | None = None
    fingerprints: Mapping[str, ApprovedStatement] = field(default_factory=lambda: MappingProxyType({}))

    def qualify(self, table: str) -> str:
        return table if "." in table else f"{self.search_path[0]}.{table}"

    def allows_function(self, function: FunctionName) -> bool:
        """Whether this role may call ``function`` (see docs/policies.md, "Functions").

        An unqualified call of a built-in's name is the built-in: PostgreSQL searches pg_catalog
        before the search_path unless pg_catalog is listed later in it, which the policy's
        search_path may not do, and a role with a policy can neither SET search_path nor create
        functions. A qualified call is the built-in only in pg_catalog: ``public.lower`` is
        someone's function. An unqualified ``allow.functions`` entry means the function the server
        finds by that name, so it also covers calls qualified with pg_catalog or a search_path
        schema; a qualified entry covers exactly that schema's function.
        """
        if function.schema in ("", "pg_catalog") and function.name in BUILTIN_FUNCTIONS:
            return True
        if str(function) in self.functions:
            return True
        return function.name in self.functions and function.schema in ("pg_catalog", *self.search_path)
