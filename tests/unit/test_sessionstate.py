"""proxy.protocols.postgres.sessionstate: which statements leave state in a server session."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pglast import parse_sql
from pglast.parser import ParseError

from proxy.protocols.postgres import sessionstate
from proxy.protocols.postgres.classifiercache import CACHE_LIMIT, SessionStateClassifier
from proxy.protocols.postgres.sessionstate import (
    NOT_PARSABLE,
    Classification,
    Effect,
    _EffectFinder,
    classify,
)

NONE, STATE, FORGETS = Effect.NONE, Effect.SESSION_STATE, Effect.FORGETS_STATEMENTS
CARRIED = Effect.CARRIED_SETTING
ENCODING = Effect.UNSUPPORTED_ENCODING
RESERVED = Effect.RESERVED_NAME
AT_BIND = Effect.DECIDED_AT_BIND

CASES: list[tuple[str, Effect]] = [
    # Plain statements
    ("SELECT 1", NONE),
    ("select * from orders where note = 'set work_mem = 1'", NONE),
    ("INSERT INTO t (a) VALUES (1) RETURNING a", NONE),
    ("UPDATE settings SET value = 1 WHERE name = 'temp'", NONE),
    ("BEGIN", NONE),
    ("COMMIT", NONE),
    ("", NONE),
    ("   ", NONE),
    # SET and friends
    # Settings the proxy carries from one server connection to the next (parameters.SESSION_PARAMETERS)
    ("SET work_mem = '64MB'", CARRIED),
    ("set Work_Mem TO '64MB'", CARRIED),
    ("SET SESSION work_mem = '64MB'", CARRIED),
    ("SET LOCAL work_mem = '64MB'", NONE),
    ("  \n\tSET search_path TO pos, public", CARRIED),
    ("SET SCHEMA 'pos'", CARRIED),
    ("SET jit = off", CARRIED),
    ("SET statement_timeout = 5000", CARRIED),
    # and those it does not
    ("SET enable_seqscan = off", STATE),
    ("set Enable_SeqScan TO off", STATE),
    ("SET SESSION enable_seqscan = off", STATE),
    ("SET LOCAL enable_seqscan = off", NONE),
    ("SET idle_session_timeout = 1", STATE),
    ("SET ROLE cashier", STATE),
    ("SET SESSION AUTHORIZATION cashier", STATE),
    ("SET SESSION CHARACTERISTICS AS TRANSACTION ISOLATION LEVEL SERIALIZABLE", STATE),
    ("SET myapp.till = '7'", STATE),
    ("SET TIME ZONE 'Europe/Berlin'", NONE),
    ("SET timezone = 'UTC'", NONE),
    ("SET \"TimeZone\" = 'UTC'", NONE),
    ("SET application_name = 'till 7'", NONE),
    ("SET client_encoding TO 'UTF8'", NONE),
    ("SET NAMES 'UTF8'", NONE),
    ("SET client_encoding TO 'iso-8859-1'", NONE),
    ("SET client_encoding TO DEFAULT", NONE),
    # Encodings the proxy cannot read as the server does, in every spelling and statement
    ("SET client_encoding TO 'SJIS'", ENCODING),
    ("SET NAMES 'Shift-JIS'", ENCODING),
    ("SET SESSION client_encoding = 'ms_kanji'", ENCODING),
    ("SET LOCAL client_encoding = 'win 932'", ENCODING),
    ("SET client_encoding TO big5", ENCODING),
    ("SET work_mem = '1MB'; SET NAMES 'GBK'", ENCODING),
    ("SET enable_seqscan = off; SET NAMES 'GBK'", ENCODING),
    ("SET client_encoding TO 'no such encoding'", ENCODING),
    ("SET client_encoding TO 6", ENCODING),
    ("SELECT set_config('client_encoding', 'GB18030', false)", ENCODING),
    ("SELECT pg_catalog.set_config('client_encoding'::text, 'UHC', true)", ENCODING),
    ("SELECT set_config('CLIENT_ENCODING', value, false) FROM t", ENCODING),
    ("SELECT set_config('client_encoding', 'LATIN1', false)", STATE),
    ("SELECT set_config($1, $2, false)", AT_BIND),
    ("SELECT set_config($1::text, $2, false)", AT_BIND),
    ("SELECT set_config($1::pg_catalog.varchar, $2, false)", AT_BIND),
    # A parameter the server would not read as the text itself: refused now as ever.
    ("SELECT set_config($1::varchar(4), $2, false)", ENCODING),
    ("SELECT set_config($1::bpchar, $2, false)", ENCODING),
    ("SELECT set_config($1 || '', $2, false)", ENCODING),
    ("SELECT set_config('client_encoding', ($1), false)", AT_BIND),
    ("SELECT set_config('client_encoding', $1::name, false)", ENCODING),
    ("SELECT set_config($1, $2, false), set_config('client_encoding', 'SJIS', false)", ENCODING),
    ("SELECT set_config(lower('CLIENT_ENCODING'), 'SJIS', true)", ENCODING),
    ("SELECT set_config('client_encoding', $1, false)", AT_BIND),
    # Stored defaults and function settings: no SET starts these statements
    ("ALTER ROLE CURRENT_USER SET client_encoding = 'SJIS'", ENCODING),
    ("ALTER ROLE pos_proxy IN DATABASE pos SET client_encoding TO big5", ENCODING),
    ("ALTER DATABASE pos SET client_encoding = 'GBK'", ENCODING),
    ("ALTER SYSTEM SET client_encoding = 'SJIS'", ENCODING),
    ("ALTER FUNCTION f() SET client_encoding = 'UHC'", ENCODING),
    ("CREATE FUNCTION f() RETURNS int LANGUAGE sql SET client_encoding = 'JOHAB' AS 'SELECT 1'", ENCODING),
    ("ALTER ROLE CURRENT_USER SET client_encoding = 'LATIN1'", NONE),
    # standard_conforming_strings off: backslashes escape, the server splits literals otherwise
    ("SET standard_conforming_strings = off", ENCODING),
    ("SET standard_conforming_strings TO 'of'", ENCODING),
    ("SET LOCAL standard_conforming_strings = false", ENCODING),
    ("SET standard_conforming_strings = 0", ENCODING),
    ("SET standard_conforming_strings = 'on', 'off'", ENCODING),
    ("SELECT set_config('standard_conforming_strings', 'off', false)", ENCODING),
    ("SELECT set_config('Standard_Conforming_Strings', $1, true)", AT_BIND),
    ("ALTER ROLE CURRENT_USER SET standard_conforming_strings = off", ENCODING),
    ("SET standard_conforming_strings = 'ON'", NONE),
    ("SET standard_conforming_strings TO true", NONE),
    ("SET standard_conforming_strings TO DEFAULT", NONE),
    ("RESET standard_conforming_strings", NONE),
    ("SET DateStyle = 'ISO, DMY'", NONE),
    ("SET IntervalStyle = iso_8601", NONE),
    ("SET standard_conforming_strings = on", NONE),
    ("RESET work_mem", CARRIED),
    ("RESET enable_seqscan", NONE),
    ("RESET ALL", STATE),
    ("RESET search_path", CARRIED),
    ("RESET statement_timeout", CARRIED),
    ("RESET DateStyle", NONE),
    ("SET work_mem TO DEFAULT", CARRIED),
    ("SET enable_seqscan TO DEFAULT", STATE),
    ("BEGIN; SET LOCAL statement_timeout = '5s'; SELECT 1; COMMIT", NONE),
    # Comments and case tricks
    ("/* SET work_mem = 1 */ SELECT 1", NONE),
    ("-- SET work_mem = 1\nSELECT 1", NONE),
    ("/* outer /* nested */ still comment; SET x.y = 1 */ SELECT 1", NONE),
    ("/* outer /* nested */ still */ SET x.y = 1", STATE),
    ("/**/SET enable_seqscan = 1", STATE),
    ("/**/SET work_mem = 1", CARRIED),
    ("SELECT 1 -- ; SET enable_seqscan = 1", NONE),
    ("SELECT 1; -- note\nSET enable_seqscan = 1", STATE),
    ("sElEcT 1;SeT eNaBlE_SeQsCaN = 1", STATE),
    ("sElEcT 1;SeT wOrK_mEm = 1", CARRIED),
    ("(SELECT 1); SET enable_seqscan = 1", STATE),
    # PREPARE, LISTEN, LOAD
    ("PREPARE q AS SELECT 1", STATE),
    ("prepare q(int) as select $1", STATE),
    ("EXECUTE q", NONE),
    ("PREPARE TRANSACTION 'tx1'", NONE),
    ("LISTEN orders", STATE),
    ('LISTEN "Orders"', STATE),
    ("UNLISTEN orders", NONE),
    ("UNLISTEN *", NONE),
    ("NOTIFY orders, 'x'", NONE),
    ("LOAD 'auto_explain'", STATE),
    # Temporary relations
    ("CREATE TEMP TABLE scratch (id int)", STATE),
    ("CREATE TEMPORARY TABLE scratch (id int)", STATE),
    ("create local temporary table scratch (id int)", STATE),
    ("CREATE GLOBAL TEMP TABLE scratch (id int)", STATE),
    ("CREATE TEMP TABLE scratch AS SELECT 1 AS id", STATE),
    ("SELECT 1 AS id INTO TEMP scratch", STATE),
    ("SELECT 1 AS id INTO TEMPORARY TABLE scratch", STATE),
    ("SELECT 1 AS id INTO scratch", NONE),
    ("CREATE TEMP VIEW v AS SELECT 1", STATE),
    ("CREATE TEMP SEQUENCE s", STATE),
    ("CREATE TABLE temp (id int)", NONE),
    ("CREATE UNLOGGED TABLE u (id int)", NONE),
    ("SELECT * FROM temp", NONE),
    # Cursors
    ("DECLARE c CURSOR WITH HOLD FOR SELECT 1", STATE),
    ("declare c no scroll cursor with hold for select 1", STATE),
    ("DECLARE c CURSOR FOR SELECT 1", NONE),
    ("DECLARE c CURSOR WITHOUT HOLD FOR SELECT 1", NONE),
    ("DECLARE c SCROLL CURSOR FOR SELECT 1", NONE),
    # Advisory locks
    ("SELECT pg_advisory_lock(42)", STATE),
    ("SELECT pg_try_advisory_lock(42)", STATE),
    ("SELECT pg_advisory_lock_shared(1, 2)", STATE),
    ("SELECT pg_try_advisory_lock_shared(42)", STATE),
    ("SELECT pg_catalog.pg_advisory_lock(42)", STATE),
    ('SELECT "pg_advisory_lock"(42)', STATE),
    ('SELECT pg_catalog."pg_advisory_lock"(42)', STATE),
    ('SELECT U&"pg_advisory_\\006cock"(42)', STATE),
    ("SELECT U&\"pg_advisory_!006cock\" UESCAPE '!' (42)", STATE),
    ("SELECT PG_ADVISORY_LOCK(42)", STATE),
    ("SELECT * FROM orders WHERE pg_try_advisory_lock(id)", STATE),
    ("SELECT pg_advisory_xact_lock(42)", NONE),
    ("SELECT pg_try_advisory_xact_lock(42)", NONE),
    ("SELECT pg_advisory_unlock(42)", NONE),
    ("SELECT 'pg_advisory_lock(42)'", NONE),
    ("SELECT 1 /* pg_advisory_lock(42) */", NONE),
    # set_config
    ("SELECT set_config('enable_seqscan', 'off', false)", STATE),
    ("SELECT set_config('work_mem', '64MB', false)", CARRIED),
    ("SELECT current_setting('jit') AS cur, set_config('jit', 'off', false) AS new", CARRIED),
    ("SELECT set_config('jit', $1, false)", CARRIED),  # asyncpg, after its type introspection
    ("SELECT set_config('JIT', 'off', false::boolean)", CARRIED),
    ("SELECT set_config('jit', 'off', 'false')", STATE),  # a string: read as a boolean at run time
    ("SELECT set_config('work_mem', '64MB', true)", NONE),
    ("SELECT pg_catalog.set_config('work_mem', '64MB', TRUE)", NONE),
    ("SELECT set_config('work_mem', '64MB', true::boolean)", NONE),
    ("SELECT set_config('work_mem', '64MB', $1)", STATE),
    ("SELECT set_config('work_mem', '64MB', is_local) FROM flags", STATE),
    ("SELECT set_config('work_mem', '64MB', NOT false)", STATE),
    ("SELECT set_config('work_mem', '64MB', 1 = 1)", STATE),
    ("SELECT current_setting('work_mem')", NONE),
    # DISCARD and DEALLOCATE
    ("DISCARD ALL", FORGETS),
    ("discard all", FORGETS),
    ("DISCARD PLANS", NONE),
    ("DISCARD SEQUENCES", NONE),
    ("DISCARD TEMP", NONE),
    ("DEALLOCATE q", NONE),
    ("DEALLOCATE PREPARE q", NONE),
    ("DEALLOCATE ALL", FORGETS),
    ("DEALLOCATE PREPARE ALL", FORGETS),
    # Several statements in one string
    ("SELECT 1; SET enable_seqscan = off", STATE),
    ("SELECT 1; SET work_mem = '1MB'", CARRIED),
    ("SET jit = off; LISTEN orders", STATE),
    ("DISCARD ALL; SET jit = off", FORGETS),
    ("SELECT 1; LISTEN orders", STATE),
    ("SELECT 1; CREATE TEMP TABLE t (i int)", STATE),
    ("SELECT 1; SELECT pg_advisory_lock(1)", STATE),
    ("SELECT 1; DISCARD ALL", FORGETS),
    ("DISCARD ALL; LISTEN orders", STATE),
    ("LISTEN orders; DISCARD ALL", STATE),
    ("SELECT 1; SELECT 2", NONE),
    # The proxy's own statement names (prepared.SERVER_NAME_PREFIX), as the server reads names
    ("EXECUTE pdp_0123abcd", RESERVED),
    ("execute PDP_0123abcd (1, 'a')", RESERVED),
    ('EXECUTE "pdp_0123abcd"', RESERVED),
    ('EXECUTE U&"pdp\\005f0123abcd"', RESERVED),
    ("EXPLAIN ANALYZE EXECUTE pdp_0123abcd", RESERVED),
    ("CREATE TABLE t AS EXECUTE pdp_0123abcd", RESERVED),
    ("DEALLOCATE pdp_0123abcd", RESERVED),
    ("DEALLOCATE PREPARE pdp_0123abcd", RESERVED),
    ("PREPARE pdp_0123abcd AS SELECT 1", RESERVED),
    ("LISTEN x; EXECUTE pdp_0123abcd", RESERVED),
    ("EXECUTE pdp_0123abcd; LISTEN x", RESERVED),
    ('EXECUTE "PDP_0123abcd"', NONE),  # quoted: another name than the proxy's
    ("EXECUTE my_statement", NONE),
    ("SELECT 'pdp_0123abcd'", NONE),
    # Unparsable by libpg_query, which follows a newer grammar than the server may: kept pinned
    ("SET work_mem =", STATE),
    ("SELEC pg_advisory_lock(1)", STATE),
    ("LISTEN", STATE),
    ("/* unterminated SET work_mem = 1", STATE),
    ("CREATE TEMP TABLE (", STATE),
    ("SELECT 'unterminated", NONE),  # nothing in it could matter: never parsed
]


@pytest.mark.parametrize(("sql", "effect"), CASES, ids=[sql[:50] for sql, _ in CASES])
def test_classify(sql: str, effect: Effect) -> None:
    found = classify(sql)
    assert found.effect is effect, found
    assert bool(found.reason) == (effect is not NONE)
    # The parse tree alone agrees whenever the statement matters.
    if effect is not NONE:
        assert parse_only(sql) == found


def test_table_is_large_and_covers_every_effect() -> None:
    assert len(CASES) >= 60
    assert {effect for _, effect in CASES} == set(Effect)


def test_carried_settings_are_named_whatever_else_the_statement_does() -> None:
    assert classify("SET jit = off").settings == {"jit"}
    assert classify(
        "SELECT set_config('JIT', 'off', false), set_config('work_mem', '1MB', false)"
    ).settings == {
        "jit",
        "work_mem",
    }
    # A statement that also forgets prepared statements or pins still leaves the setting behind.
    assert classify("DISCARD ALL; SET jit = off").settings == {"jit"}
    assert classify("LISTEN x; RESET work_mem").settings == {"work_mem"}
    assert classify("SET LOCAL jit = off").settings == frozenset()
    assert classify("SET enable_seqscan = off").settings == frozenset()


def test_reasons_name_what_was_found() -> None:
    assert classify("SET enable_seqscan = 1").reason == "SET enable_seqscan"
    assert classify("SET work_mem = 1").reason == "SET work_mem"
    assert classify("LISTEN x").reason == "LISTEN"
    assert classify("PREPARE q AS SELECT 1").reason == "PREPARE"
    assert classify("CREATE TEMP TABLE t (i int)").reason == "temporary relation"
    assert classify("DECLARE c CURSOR WITH HOLD FOR SELECT 1").reason == "WITH HOLD cursor"
    assert "pg_advisory_lock" in classify("SELECT pg_advisory_lock(1)").reason
    assert classify("DISCARD ALL").reason == "DISCARD ALL"
    assert classify("DEALLOCATE ALL").reason == "DEALLOCATE ALL"


# --- known false answers ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "sql",
    [
        "ALTER SYSTEM SET work_mem = '1MB'",
        "ALTER DATABASE pos SET work_mem = '1MB'",
        "ALTER ROLE cashier SET search_path = pos",
        "ALTER FUNCTION f() SET search_path = pos",
        "CREATE FUNCTION f() RETURNS int LANGUAGE sql SET search_path = pos AS 'SELECT 1'",
    ],
)
def test_settings_stored_in_the_catalog_are_not_session_state(sql: str) -> None:
    assert classify(sql).effect is NONE
    assert classify("/* migration */ " + sql).effect is NONE


@pytest.mark.parametrize(
    "sql",
    [
        "SET TRANSACTION ISOLATION LEVEL SERIALIZABLE",
        "BEGIN; SET TRANSACTION READ ONLY; SELECT 1; COMMIT",
        "SET TRANSACTION SNAPSHOT '00000003-0000001B-1'",
    ],
)
def test_set_transaction_is_not_session_state(sql: str) -> None:
    assert classify(sql).effect is NONE


@pytest.mark.parametrize(
    "sql",
    [
        "CREATE TABLE pg_temp.scratch (id int)",
        "CREATE VIEW pg_temp.v AS SELECT 1",
        "CREATE FUNCTION pg_temp.f() RETURNS int LANGUAGE sql AS 'SELECT 1'",
    ],
)
def test_objects_in_pg_temp_are_session_state(sql: str) -> None:
    assert classify(sql).effect is STATE


@pytest.mark.parametrize(
    "sql",
    [
        "CREATE TEMP TABLE scratch (id int) ON COMMIT DROP",
        "CREATE TEMP TABLE scratch ON COMMIT DROP AS SELECT 1 AS id",
    ],
)
def test_temp_tables_dropped_at_commit_are_not_session_state(sql: str) -> None:
    assert classify(sql).effect is NONE


BOUND_CASES: list[tuple[str, dict[int, str], Effect, str]] = [
    ("SELECT set_config($1, $2, false)", {1: "client_encoding", 2: "SJIS"}, ENCODING, "SJIS"),
    ("SELECT set_config($1, $2, false)", {1: "Client_Encoding", 2: "shift-jis"}, ENCODING, "SJIS is not"),
    ("SELECT set_config('client_encoding', $1, true)", {1: " MSKANJI"}, ENCODING, "SJIS is not"),
    ("SELECT set_config($1, $2, false)", {1: "client_encoding", 2: "LATIN1"}, STATE, "set_config"),
    ("SELECT set_config($1, $2, false)", {1: "default_transaction_isolation", 2: "x"}, CARRIED, "isolation"),
    ("SELECT set_config($2, $1, false)", {1: "x", 2: "WORK_MEM"}, CARRIED, "work_mem"),
    ("SELECT set_config($1, $2, true)", {1: "enable_seqscan", 2: "off"}, NONE, ""),
    ("SELECT set_config($1, $2, false)", {1: "enable_seqscan", 2: "off"}, STATE, "set_config"),
    ("SELECT set_config($1, $2, false)", {1: "standard_conforming_strings", 2: "off"}, ENCODING, "stay on"),
    ("SELECT set_config($1, $2, false)", {1: "standard_conforming_strings", 2: "on"}, STATE, "set_config"),
    # A value the proxy could not read (NULL, another type, bytes not in the encoding): refused.
    ("SELECT set_config($1, $2, false)", {2: "UTF8"}, ENCODING, "constant setting name"),
    ("SELECT set_config($1, $2, false)", {1: "client_encoding"}, ENCODING, "constant name"),
    ("SELECT set_config('standard_conforming_strings', $1, false)", {}, ENCODING, "stay on"),
]


@pytest.mark.parametrize(("sql", "bound", "effect", "reason"), BOUND_CASES)
def test_bound_values_stand_where_constants_would(
    sql: str, bound: dict[int, str], effect: Effect, reason: str
) -> None:
    found = classify(sql, bound)
    assert found.effect is effect, found
    assert reason in found.reason


# --- the pre-filter never hides what the parser would find --------------------------------------------


def parse_only(sql: str) -> Classification:
    """classify() without the textual pre-filter: the parse tree's answer alone."""
    try:
        statements = parse_sql(sql)
    except ParseError:
        return NOT_PARSABLE
    finder = _EffectFinder()
    for raw in statements:
        if raw.stmt is not None:
            finder(raw.stmt)
        if finder.result.effect in (ENCODING, RESERVED):
            break
    return finder.classification()


FRAGMENTS = [
    "SELECT 1",
    "SELECT * FROM orders",
    "UPDATE t SET a = 1",
    "SET work_mem = 1",
    "SET enable_seqscan = 1",
    "SET LOCAL work_mem = 1",
    "set time zone 'UTC'",
    "RESET work_mem",
    "RESET enable_seqscan",
    "SELECT set_config('jit', 'off', false)",
    "SET x.y TO 'z'",
    "PREPARE q AS SELECT 1",
    "LISTEN ch",
    "UNLISTEN ch",
    "LOAD 'x'",
    "CREATE TEMP TABLE t (i int)",
    "CREATE TEMPORARY VIEW v AS SELECT 1",
    "SELECT 1 INTO TEMP t",
    "CREATE TABLE t (i int)",
    "DECLARE c CURSOR WITH HOLD FOR SELECT 1",
    "DECLARE c CURSOR FOR SELECT 1",
    "SELECT pg_advisory_lock(1)",
    "SELECT pg_catalog.pg_try_advisory_lock_shared(1)",
    'SELECT "pg_advisory_lock"(1)',
    'SELECT U&"pg_advisory_\\006cock"(1)',
    "SELECT U&\"set\\005fconfig\"('a', 'b', false)",
    "SELECT pg_advisory_xact_lock(1)",
    "SELECT set_config('a', 'b', false)",
    "SELECT set_config('a', 'b', true)",
    "SELECT set_config('a', 'b', $1)",
    "DISCARD ALL",
    "DISCARD PLANS",
    "DEALLOCATE ALL",
    "DEALLOCATE q",
    "BEGIN",
    "COMMIT",
    "(SELECT 1)",
]
SPACES = ["", " ", "  ", "\n", "\t", "\r\n", "\f", "/* c */", "/* a /* nested */ b */", "-- c\n"]


def _mixed_case(text: str, flips: list[bool]) -> str:
    return "".join(char.swapcase() if flips[index % len(flips)] else char for index, char in enumerate(text))


@st.composite
def statements(draw: st.DrawFn) -> str:
    parts = draw(st.lists(st.sampled_from(FRAGMENTS), min_size=1, max_size=3))
    text = ""
    for index, part in enumerate(parts):
        if index:
            text += draw(st.sampled_from(["", " ", "\n"])) + ";"
        text += draw(st.sampled_from(SPACES)) + part
    text += draw(st.sampled_from(["", ";", " ;", "; ", "\n"]))
    flips = draw(st.lists(st.booleans(), min_size=1, max_size=8))
    # Case changes keep keywords and identifiers meaningful; quoted names may change, on both sides alike.
    return _mixed_case(text, flips) if draw(st.booleans()) else text


@settings(max_examples=200, deadline=None)
@given(statements())
def test_prefilter_has_no_false_negatives(sql: str) -> None:
    full = parse_only(sql)
    if full is NOT_PARSABLE:
        # What the proxy cannot parse keeps the server connection if anything in it could matter.
        might = sessionstate._MIGHT_MATTER.search(sql) is not None
        assert classify(sql) == (NOT_PARSABLE if might else Classification(NONE)), sql
    elif full.effect is not NONE:
        assert sessionstate._MIGHT_MATTER.search(sql) is not None, sql
        assert classify(sql) == full
    else:
        assert classify(sql).effect is NONE


# --- the cache -----------------------------------------------------------------------------------------


@settings(max_examples=25, deadline=None)
@given(st.lists(statements(), min_size=1, max_size=8))
def test_cached_answers_equal_fresh_ones(texts: list[str]) -> None:
    classifier = SessionStateClassifier()
    for text in texts + texts:
        assert classifier.classify(text.encode(), "UTF8") == classify(text)


def test_cache_returns_the_same_object_for_the_same_text() -> None:
    classifier = SessionStateClassifier()
    first = classifier.classify(b"SET enable_seqscan = 1", "UTF8")
    assert classifier.classify(b"SET enable_seqscan = 1", "UTF8") is first
    assert first.effect is STATE


def test_text_the_proxy_cannot_read_in_the_client_encoding_keeps_the_server_connection() -> None:
    classifier = SessionStateClassifier()
    assert classifier.classify(b"SELECT '\xff\xfe'", "UTF8").effect is STATE
    assert classifier.classify(b"SELECT '\xff\xfe'", "LATIN1").effect is NONE


def test_statements_are_classified_in_the_client_encoding() -> None:
    """Read as UTF-8 with replacement characters, the dollar-quote tags $\xe9$ and $\xe8$ of a LATIN1
    client would both become $\ufffd$: the proxy would see one string where the server runs a SET."""
    classifier = SessionStateClassifier()
    payload = b"SELECT $\xe9$ x $\xe8$ $\xe9$; SET search_path TO evil; SELECT $\xe8$ y $\xe8$"
    found = classifier.classify(payload, "LATIN1")
    assert found.effect is CARRIED and found.reason == "SET search_path"
    assert found.settings == {"search_path"}
    # The same bytes are another statement in another encoding: cached apart.
    assert classifier.classify(payload, "UTF8").effect is STATE


def test_a_text_libpg_query_cannot_parse_keeps_the_server_connection() -> None:
    # libpg_query follows a newer grammar than the server may: unreadable is not harmless.
    assert classify("SET search_path TO evil; SELECT 1 FROM (").effect is STATE


def test_cache_stays_bounded() -> None:
    classifier = SessionStateClassifier(limit=8)
    for number in range(50):
        sql = f"SET enable_seqscan = {number}" if number % 2 else f"SELECT {number}"
        assert classifier.classify(sql.encode(), "UTF8").effect is (STATE if number % 2 else NONE)
        assert len(classifier) <= 8
    # Answers stay right after the cache starts over.
    assert classifier.classify(b"SELECT 3", "UTF8").effect is NONE
    assert classifier.classify(b"SET enable_seqscan = 3", "UTF8").effect is STATE


def test_default_cache_limit_is_bounded() -> None:
    classifier = SessionStateClassifier()
    for number in range(CACHE_LIMIT + 5):
        classifier.classify(b"SELECT %d" % number, "UTF8")
    assert len(classifier) <= CACHE_LIMIT
