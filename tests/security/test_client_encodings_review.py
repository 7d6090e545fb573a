"""Client encodings, attacked again: a hostile review of the client-encoding guarantee.

Each test tries one more way to make PostgreSQL read a statement other than the proxy's policy
read it, as a cashier terminal under an enforced policy or as a manager without a policy, against
the real server through the real proxy, and asserts the safe outcome: refused (the session still
usable), or ended, and the cashier's table unchanged.
"""

from __future__ import annotations

import contextlib
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
import yaml
from pglast.parser import fingerprint

from proxy.protocols.postgres import messages as m
from tests.integration.proxyproc import ProxyProcess, TerminalPKI, deep_merge
from tests.integration.test_postgres_robustness import (
    PeerClosed,
    RawClient,
    assert_startup_succeeded,
    tls_client,
)

# KS X 1001:1998 Annex 3: a Hangul filler, then initial, medial and final jamo (a filler: none).
# Python's euc_kr reads the 8 bytes as one syllable, PostgreSQL as four characters.
MAKE_UP_GA = bytes.fromhex("a4d4a4a1a4bfa4d4")
GA = "\uac00"  # the syllable Python makes of MAKE_UP_GA
FILLER_JAMO = "\u3164\u3131\u314f\u3164"  # what PostgreSQL makes of MAKE_UP_GA
# EUC_JP A1C1: WAVE DASH to Python's euc_jp, FULLWIDTH TILDE to PostgreSQL's conversion.
WAVE_DASH_EUC_JP = bytes.fromhex("a1c1")
WAVE_DASH, FULLWIDTH_TILDE = "\u301c", "\uff5e"

SCHEMA = f"""
CREATE TABLE IF NOT EXISTS public.rv_sales (id serial PRIMARY KEY, total_cents integer NOT NULL);
CREATE TABLE IF NOT EXISTS public.rv_prices (name text, price_cents integer);
CREATE TABLE IF NOT EXISTS public."{GA}" (what text);
CREATE TABLE IF NOT EXISTS public."{FILLER_JAMO}" (what text);
CREATE TABLE IF NOT EXISTS public."{WAVE_DASH}" (what text);
CREATE TABLE IF NOT EXISTS public."{FULLWIDTH_TILDE}" (what text);
ALTER TABLE public.rv_sales OWNER TO pos_proxy;
ALTER TABLE public.rv_prices OWNER TO pos_proxy;
ALTER TABLE public."{GA}" OWNER TO pos_proxy;
ALTER TABLE public."{FILLER_JAMO}" OWNER TO pos_proxy;
ALTER TABLE public."{WAVE_DASH}" OWNER TO pos_proxy;
ALTER TABLE public."{FULLWIDTH_TILDE}" OWNER TO pos_proxy;
TRUNCATE public.rv_sales, public.rv_prices, public."{GA}", public."{FILLER_JAMO}";
TRUNCATE public."{WAVE_DASH}", public."{FULLWIDTH_TILDE}";
INSERT INTO public.rv_sales (total_cents) VALUES (100), (250);
INSERT INTO public."{GA}" VALUES ('allowed table');
INSERT INTO public."{FILLER_JAMO}" VALUES ('forbidden table');
INSERT INTO public."{WAVE_DASH}" VALUES ('allowed table');
INSERT INTO public."{FULLWIDTH_TILDE}" VALUES ('forbidden table');
-- An application helper a DBA might well install: any setting, by name. Functions are default-deny:
-- only a policy that lists it in allow.functions lets it be called; what it sets, the proxy cannot see.
CREATE OR REPLACE FUNCTION public.rv_set(setting text, value text) RETURNS text LANGUAGE sql
    AS $$ SELECT pg_catalog.set_config(setting, value, false) $$;
"""
READ_GA = f'SELECT what FROM "{GA}"'
READ_WAVE_DASH = f'SELECT what FROM "{WAVE_DASH}"'
# Table lists take ASCII names only; a statement on table 가 is approved by its fingerprint.
CASHIER_POLICY: dict[str, Any] = {
    "mode": "enforce",
    "search_path": ["public"],
    "allow": {"kinds": ["SELECT", "INSERT"], "read": ["rv_prices"], "write": ["rv_sales"]},
    "fingerprints": [{"fingerprint": fingerprint(text), "text": text} for text in (READ_GA, READ_WAVE_DASH)],
}
# The same policy, had its author listed the helper (docs/security.md "Known limit": never list one).
CASHIER_POLICY_LISTING_THE_HELPER: dict[str, Any] = {
    **CASHIER_POLICY,
    "allow": {**CASHIER_POLICY["allow"], "functions": ["public.rv_set"]},
}
REFUSED_SQLSTATES = ("0A000", "42501")
SET_CONFIG_OID = 2078  # pg_catalog.set_config(text, text, boolean)


def _superuser(cluster: Any) -> psycopg.Connection:
    return psycopg.connect(**cluster.connect_kwargs(user="postgres", dbname="pos"), autocommit=True)


def _sales(cluster: Any) -> int:
    with _superuser(cluster) as admin:
        row = admin.execute("SELECT count(*) FROM public.rv_sales").fetchone()
    assert row is not None
    return int(row[0])


def swallower(codec: str) -> bytes:
    """A character whose UTF-8 bytes end, read in ``codec``, in a lead byte taking the next byte."""
    for code_point in range(0xA0, 0x3000):
        candidate = chr(code_point).encode()
        try:
            read = (candidate + b"\\'").decode(codec)
        except UnicodeDecodeError:
            continue
        if "\\" not in read:
            return candidate
    raise AssertionError(f"no swallower for {codec}")


SJIS_SWALLOWER = swallower("shift_jis")
# Valid UTF-8: a SELECT of one string to a UTF-8 reader; in SJIS a string, then a DELETE.
DELETE_IN_SJIS = b"SELECT E'" + SJIS_SWALLOWER + b"\\'; DELETE FROM public.rv_sales; --'"
# One statement (what a Parse message may hold): to a UTF-8 reader a CTE selecting a string, in
# SJIS a CTE that deletes, the rest a comment.
CTE_DELETE_IN_SJIS = (
    b"WITH x AS (SELECT E'"
    + SJIS_SWALLOWER
    + b"\\'), d AS (DELETE FROM public.rv_sales RETURNING 1) SELECT 1 --') SELECT 1"
)


@pytest.fixture(scope="module")
def schema(pg_cluster: Any) -> None:
    with _superuser(pg_cluster) as admin:
        admin.execute(SCHEMA)


@pytest.fixture(autouse=True)
def two_sales(pg_cluster: Any, schema: None) -> None:
    """Every test starts with the cashier's two sales (a test that failed may have deleted them)."""
    with _superuser(pg_cluster) as admin:
        admin.execute("TRUNCATE public.rv_sales")
        admin.execute("INSERT INTO public.rv_sales (total_cents) VALUES (100), (250)")


@pytest.fixture(scope="module")
def review_proxy(
    base_config: dict[str, Any], tmp_path_factory: pytest.TempPathFactory, schema: None
) -> Iterator[ProxyProcess]:
    """The cashier under an enforced policy; the manager has none. Session pooling."""
    yield from _proxy_with(CASHIER_POLICY, base_config, tmp_path_factory)


@pytest.fixture(scope="module")
def helper_proxy(
    base_config: dict[str, Any], tmp_path_factory: pytest.TempPathFactory, schema: None
) -> Iterator[ProxyProcess]:
    """As review_proxy, with the cashier's policy listing the helper public.rv_set."""
    yield from _proxy_with(CASHIER_POLICY_LISTING_THE_HELPER, base_config, tmp_path_factory)


def _proxy_with(
    cashier_policy: dict[str, Any], base_config: dict[str, Any], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ProxyProcess]:
    directory = tmp_path_factory.mktemp("enc-review")
    policy_file = directory / "cashier.yaml"
    policy_file.write_text(yaml.safe_dump(cashier_policy, allow_unicode=True), encoding="utf-8")
    overrides = {
        "roles": {"cashier": {"policy": str(policy_file)}},
        "policy": {"review_file": str(directory / "review.json")},
    }
    process = ProxyProcess(directory / "proxy", deep_merge(base_config, overrides)).start()
    yield process
    process.stop()


def _connect(proxy: ProxyProcess, pki: TerminalPKI, role: str, **options: Any) -> psycopg.Connection:
    terminal = pki.cashier if role == "cashier" else pki.manager
    return psycopg.connect(**proxy.conninfo(terminal, pki.ca), autocommit=True, **options)


def _raw(proxy: ProxyProcess, pki: TerminalPKI, role: str, **startup: str) -> RawClient:
    terminal = pki.cashier if role == "cashier" else pki.manager
    client = tls_client(proxy, pki, terminal)
    client.send(m.build_startup_message({"user": terminal.terminal, "database": "pos", **startup}))
    return client


def _query(sql: bytes) -> bytes:
    return m.build_message(b"Q", sql + b"\x00")


def _read_all(client: RawClient, answers: int) -> list[tuple[bytes, bytes]]:
    """Messages up to the ``answers``-th ReadyForQuery, or up to the proxy closing the session."""
    received: list[tuple[bytes, bytes]] = []
    try:
        for _ in range(answers):
            received += client.read_until_ready()
    except PeerClosed:
        pass
    return received


def _errors(received: list[tuple[bytes, bytes]]) -> list[dict[str, str]]:
    return [m.parse_error_fields(payload) for kind, payload in received if kind == b"E"]


@pytest.mark.parametrize("payload", [DELETE_IN_SJIS, CTE_DELETE_IN_SJIS])
def test_the_payloads_delete_when_the_server_reads_sjis(
    pg_cluster: Any, schema: None, payload: bytes
) -> None:
    """Without the proxy the attacks work: what the proxy must never let the server read so."""
    kwargs = pg_cluster.connect_kwargs(user="postgres", dbname="pos")
    with psycopg.connect(**kwargs, autocommit=True, options="-c client_encoding=SJIS") as admin:
        admin.execute("BEGIN")
        admin.execute(payload)
        row = admin.execute("SELECT count(*) FROM public.rv_sales").fetchone()
        admin.execute("ROLLBACK")
    assert row == (0,)


# --- the proxy's reading of an accepted encoding ---


def test_server_reads_an_euc_kr_make_up_sequence_as_four_characters(pg_cluster: Any) -> None:
    """Where Python's euc_kr codec and PostgreSQL differ: both accept the bytes, read otherwise."""
    assert MAKE_UP_GA.decode("euc_kr") == GA
    with _superuser(pg_cluster) as admin:
        row = admin.execute("SELECT convert_from(%s, 'EUC_KR')", (MAKE_UP_GA,)).fetchone()
    assert row == (FILLER_JAMO,)


def test_an_euc_kr_make_up_sequence_cannot_name_another_table(
    review_proxy: ProxyProcess, terminal_pki: TerminalPKI
) -> None:
    """The cashier may read table 가. Spelled as a make-up sequence, Python read 가 where the server
    reads the filler-and-jamo table: the proxy refuses bytes it does not read character by character."""
    with _connect(review_proxy, terminal_pki, "cashier", client_encoding="EUC_KR") as conn:
        standard = READ_GA.encode("euc_kr")
        assert conn.execute(standard).fetchone() == ("allowed table",)
        with pytest.raises(psycopg.errors.CharacterNotInRepertoire):
            conn.execute(b'SELECT what FROM "' + MAKE_UP_GA + b'"')
        assert conn.execute(standard).fetchone() == ("allowed table",)
        # Python writes the filler-and-jamo name as that very make-up sequence: not nameable in
        # EUC_KR through the proxy at all (the server would read it; refusing is the safe side).
        assert FILLER_JAMO.encode("euc_kr") == MAKE_UP_GA


def test_an_euc_jp_character_python_reads_otherwise_names_the_table_the_server_reads(
    review_proxy: ProxyProcess, terminal_pki: TerminalPKI
) -> None:
    """The cashier may read table U+301C (WAVE DASH). In EUC_JP its bytes A1C1 are that to Python's codec
    but the twin table U+FF5E (FULLWIDTH TILDE) to the server: the proxy decides on the server's reading."""
    assert WAVE_DASH_EUC_JP.decode("euc_jp") == WAVE_DASH
    statement = b'SELECT what FROM "' + WAVE_DASH_EUC_JP + b'"'
    with _connect(review_proxy, terminal_pki, "manager", client_encoding="EUC_JP") as conn:
        assert conn.info.parameter_status("client_encoding") == "EUC_JP"
        assert conn.execute(statement).fetchone() == ("forbidden table",)  # what the server reads
    with _connect(review_proxy, terminal_pki, "cashier") as conn:
        assert conn.execute(READ_WAVE_DASH).fetchone() == ("allowed table",)
    with _connect(review_proxy, terminal_pki, "cashier", client_encoding="euc-jp") as conn:
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute(statement)
        # The session carries on, in EUC_JP, with what the policy allows.
        assert conn.execute("SELECT 'コーヒー'").fetchone() == ("コーヒー",)


# --- switches the proxy sees ---

SET_CONFIG_SPELLINGS = (
    "SELECT * FROM set_config('client_encoding', 'SJIS', false)",
    "SELECT s FROM pg_catalog.set_config('client_encoding', 'SJIS', false) AS s",
    "WITH s AS (SELECT set_config('client_encoding', 'SJIS', false)) SELECT * FROM s",
    "SELECT 1 WHERE set_config('client_encoding', 'SJIS', false) IS NOT NULL",
    "SELECT (SELECT set_config('client_encoding', 'SJIS', false))",
    "SELECT set_config('client_encoding'::text::text, 'SJIS', false)",
    "SELECT set_config('client_encoding' COLLATE \"C\", 'SJIS', false)",
    "SELECT set_config('client_encoding', 'SJIS'::text::text, false)",
    "SELECT set_config('client_encoding', (SELECT 'SJIS'), false)",
    "SELECT set_config('client_encoding', format('%s', 'SJIS'), false)",
    "SELECT set_config('client_encoding', 'S' || 'JIS', false)",
    "SELECT set_config('client_encoding', current_setting('application_name'), false)",
    "SELECT set_config(U&'client\\005fencoding', 'SJIS', false)",
    "SELECT set_config(E'client\\x5fencoding', 'SJIS', false)",
    "SELECT set_config($$client_encoding$$, $q$SJIS$q$, false)",
    "SELECT set_config('client_encoding', U&'\\0053JIS', false)",
    "SELECT pg_catalog.\"set_config\"('client_encoding', 'SJIS', false)",
    "SELECT set_config('client_encoding', 'SJIS', false) FROM generate_series(1, 1)",
    "SELECT set_config('client_encoding', 'SJIS\u00a0', false)",
    "SELECT set_config('client_encoding', ' s-j-i-s ', false)",
    "SELECT set_config('client_encoding', 'sjis' || repeat('_', 70), false)",
    "EXPLAIN ANALYZE SELECT set_config('client_encoding', 'SJIS', false)",
    "PREPARE rv_switch AS SELECT set_config('client_encoding', 'SJIS', false)",
    "DECLARE rv_cursor CURSOR WITH HOLD FOR SELECT set_config('client_encoding', 'SJIS', false)",
    "SET client_encoding = 'SJIS\u00a0'",
    "SET client_encoding = ' Shift-JIS '",
    "SET client_encoding = sjis_",
    "SET client_encoding = 'UTF8', 'SJIS'",
    "ALTER ROLE CURRENT_USER SET client_encoding = 'SJIS'",
    "ALTER ROLE CURRENT_USER IN DATABASE pos SET client_encoding = 'SJIS'",
    "ALTER DATABASE pos SET client_encoding = 'BIG5'",
    "CREATE FUNCTION public.rv_f() RETURNS int LANGUAGE sql SET client_encoding = 'SJIS' AS 'SELECT 1'",
)


@pytest.mark.parametrize("role", ["cashier", "manager"])
def test_every_spelling_of_a_switch_is_refused(
    review_proxy: ProxyProcess, terminal_pki: TerminalPKI, pg_cluster: Any, role: str
) -> None:
    with _connect(review_proxy, terminal_pki, role) as conn:
        for switch in SET_CONFIG_SPELLINGS:
            with pytest.raises(psycopg.Error) as refused:
                conn.execute(switch)
            assert refused.value.sqlstate in REFUSED_SQLSTATES, (switch, refused.value)
            assert conn.execute("SHOW client_encoding").fetchone() == ("UTF8",), switch
            assert conn.execute(DELETE_IN_SJIS).fetchone() is not None
        # The statement PREPAREd under another name cannot be run either: none was prepared.
        with pytest.raises(psycopg.Error):
            conn.execute("EXECUTE rv_switch")
        assert conn.execute("SHOW client_encoding").fetchone() == ("UTF8",)
    assert _sales(pg_cluster) == 2


def test_a_policy_session_in_latin1_cannot_return_to_the_servers_default(
    review_proxy: ProxyProcess, terminal_pki: TerminalPKI
) -> None:
    """RESET client_encoding and its spellings would bring the server connection's UTF8 back while
    the proxy still read pipelined statements in LATIN1: refused to a policy role, like RESET ALL."""
    with _connect(review_proxy, terminal_pki, "cashier", client_encoding="LATIN1") as conn:
        for statement in (
            "RESET client_encoding",
            "SET client_encoding TO DEFAULT",
            "SET client_encoding FROM CURRENT",
            "SET NAMES DEFAULT",
            "SET NAMES",
            "SET NAMES 'UTF8'",
            "SET SESSION client_encoding = 'utf-8'",
            "SELECT set_config('client_encoding', 'UTF8', false)",
            "SELECT set_config('client_encoding', 'LATIN1', true)",
            "RESET ALL",
            "DISCARD ALL",
        ):
            with pytest.raises(psycopg.Error) as refused:
                conn.execute(statement)
            assert refused.value.sqlstate in REFUSED_SQLSTATES, (statement, refused.value)
            assert conn.execute("SHOW client_encoding").fetchone() == ("LATIN1",), statement
        assert conn.execute("SELECT 'é'").fetchone() == ("é",)


def test_a_role_without_a_policy_returning_to_utf8_is_followed(
    review_proxy: ProxyProcess, terminal_pki: TerminalPKI
) -> None:
    """The manager may switch between accepted encodings; the proxy reads each next statement in
    the encoding the server reported (the audit and the classifier see the server's text)."""
    with _connect(review_proxy, terminal_pki, "manager", client_encoding="LATIN1") as conn:
        for statement, encoding in (
            ("RESET client_encoding", "UTF8"),
            ("SET client_encoding TO 'WIN1252'", "WIN1252"),
            ("SET client_encoding TO DEFAULT", "UTF8"),
            ("SET NAMES 'iso-8859-1'", "LATIN1"),
            ("SET NAMES DEFAULT", "UTF8"),
        ):
            conn.execute(statement)
            assert conn.info.parameter_status("client_encoding") == encoding, statement
            assert conn.execute("SHOW client_encoding").fetchone() == (encoding,)
            assert conn.execute("SELECT 'Crème brûlée'").fetchone() == ("Crème brûlée",)


# --- switches the proxy cannot see ---

HELPER_SWITCHES = pytest.mark.parametrize(
    ("setting", "value"), [("client_encoding", "SJIS"), ("standard_conforming_strings", "off")]
)
HELPER_REFUSED = ("42501", "function public.rv_set is not allowed for role cashier")
ONE = (b"D", struct.pack("!hi", 1, 1) + b"1")  # the DataRow of SELECT 1: the session still answers


def _pipelined_switch(setting: str, value: str) -> tuple[bytes, bytes]:
    """The helper's call switching ``setting`` to ``value``, and a statement the proxy reads as a
    SELECT of strings and a server already switched as a DELETE."""
    payload = DELETE_IN_SJIS if setting == "client_encoding" else DELETE_WITHOUT_CONFORMING_STRINGS
    return f"SELECT public.rv_set('{setting}', '{value}')".encode(), payload


def _extended(sql: bytes) -> bytes:
    """Parse, Bind and Execute of ``sql`` as the unnamed statement and portal, without a Sync."""
    parse = m.build_message(b"P", b"\x00" + sql + b"\x00" + struct.pack("!h", 0))
    bind = m.build_message(b"B", b"\x00\x00" + struct.pack("!hhh", 0, 0, 0))
    return parse + bind + m.build_message(b"E", b"\x00" + struct.pack("!i", 0))


@HELPER_SWITCHES
def test_a_switch_inside_a_function_outside_the_allow_set_is_refused_before_a_pipelined_statement(
    review_proxy: ProxyProcess, terminal_pki: TerminalPKI, pg_cluster: Any, setting: str, value: str
) -> None:
    """The pipelined attack below against a policy that does not list the helper: its call is refused
    (functions are default-deny), so the server never switches, the statement behind it is read as
    the proxy read it, and the session stays usable."""
    call, payload = _pipelined_switch(setting, value)
    client = _raw(review_proxy, terminal_pki, "cashier")
    try:
        assert_startup_succeeded(client.read_until_ready())
        client.send(_query(call) + _query(payload) + _query(b"SELECT 1"))
        received = _read_all(client, 3)
    finally:
        client.close()
    assert [(error["C"], error["M"]) for error in _errors(received)] == [HELPER_REFUSED], received
    assert [kind for kind, _payload in received].count(b"Z") == 3, received
    assert ONE in received, received
    assert not any(kind == b"S" and payload.startswith(setting.encode()) for kind, payload in received)
    assert _sales(pg_cluster) == 2


def test_a_switch_inside_a_function_outside_the_allow_set_is_refused_before_a_later_parse_of_the_batch(
    review_proxy: ProxyProcess, terminal_pki: TerminalPKI, pg_cluster: Any
) -> None:
    """The extended-protocol batch below against a policy that does not list the helper: its Parse is
    refused, the rest of the batch is skipped up to the Sync, and the session stays usable."""
    client = _raw(review_proxy, terminal_pki, "cashier")
    try:
        assert_startup_succeeded(client.read_until_ready())
        call = b"SELECT public.rv_set('client_encoding', 'SJIS')"
        client.send(_extended(call) + _extended(CTE_DELETE_IN_SJIS) + m.build_message(b"S", b""))
        client.send(_query(b"SELECT 1"))
        received = _read_all(client, 2)
    finally:
        client.close()
    assert [(error["C"], error["M"]) for error in _errors(received)] == [HELPER_REFUSED], received
    assert [kind for kind, _payload in received].count(b"Z") == 2, received
    assert ONE in received, received
    assert not any(kind == b"S" and payload.startswith(b"client_encoding") for kind, payload in received)
    assert _sales(pg_cluster) == 2


@pytest.mark.xfail(
    strict=True,
    reason="the backstop (the server's ParameterStatus) arrives after statements already pipelined "
    "behind the call; with the extended protocol it arrives only at Sync, after every Parse of the "
    "batch was read under the new setting. No fix in the proxy yet: see the review report",
)
@HELPER_SWITCHES
def test_a_switch_inside_a_function_cannot_change_how_a_pipelined_statement_is_read(
    helper_proxy: ProxyProcess, terminal_pki: TerminalPKI, pg_cluster: Any, setting: str, value: str
) -> None:
    """The cashier calls a helper its policy lists in allow.functions, which sets client_encoding to
    SJIS (or standard_conforming_strings off), out of the proxy's sight, and in the same write a
    statement the proxy reads as a SELECT of strings and the server, already switched, as a DELETE.
    The server reports the switch (the backstop) only after both were sent."""
    call, payload = _pipelined_switch(setting, value)
    client = _raw(helper_proxy, terminal_pki, "cashier")
    try:
        assert_startup_succeeded(client.read_until_ready())
        client.send(_query(call) + _query(payload))
        _read_all(client, 2)
    finally:
        client.close()
    assert _sales(pg_cluster) == 2


@pytest.mark.xfail(
    strict=True,
    reason="in one extended-protocol batch the server reads each Parse in the encoding it is in by "
    "then and reports a change only at Sync: no report can come in time. See the review report",
)
def test_a_switch_inside_a_function_cannot_change_how_a_later_parse_of_the_batch_is_read(
    helper_proxy: ProxyProcess, terminal_pki: TerminalPKI, pg_cluster: Any
) -> None:
    """As above in one extended-protocol batch, the helper listed in the cashier's allow.functions."""
    client = _raw(helper_proxy, terminal_pki, "cashier")
    try:
        assert_startup_succeeded(client.read_until_ready())
        call = b"SELECT public.rv_set('client_encoding', 'SJIS')"
        client.send(_extended(call) + _extended(CTE_DELETE_IN_SJIS) + m.build_message(b"S", b""))
        _read_all(client, 1)
    finally:
        client.close()
    assert _sales(pg_cluster) == 2


def test_a_decision_made_in_one_encoding_is_not_reused_in_another(
    review_proxy: ProxyProcess, terminal_pki: TerminalPKI
) -> None:
    """The approved statement on table 가, then its very bytes from a LATIN1 session, where they
    name table "ê°\x80": decided anew (refused), not taken from the decision cache."""
    with _connect(review_proxy, terminal_pki, "cashier") as conn:
        assert conn.execute(READ_GA.encode()).fetchone() == ("allowed table",)
    with _connect(review_proxy, terminal_pki, "cashier", client_encoding="LATIN1") as conn:
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match="reading table"):
            conn.execute(READ_GA.encode())
        assert conn.execute("SELECT 1").fetchone() == (1,)


def test_a_function_call_message_switch_ends_the_session(
    review_proxy: ProxyProcess, terminal_pki: TerminalPKI, pg_cluster: Any
) -> None:
    """The legacy FunctionCall message runs set_config by OID, no SQL for the proxy to read: refused
    to the cashier's policy; for the manager the server's report of SJIS ends the session."""
    arguments = (b"client_encoding", b"SJIS", b"f")
    body = struct.pack("!ihh", SET_CONFIG_OID, 0, len(arguments))
    body += b"".join(struct.pack("!i", len(value)) + value for value in arguments)
    call = m.build_message(b"F", body + struct.pack("!h", 0))
    for role in ("cashier", "manager"):
        client = _raw(review_proxy, terminal_pki, role)
        try:
            assert_startup_succeeded(client.read_until_ready())
            client.send(call)
            received = _read_all(client, 1)
            errors = _errors(received)
            assert errors and errors[0]["C"] in REFUSED_SQLSTATES, received
            if role == "cashier":
                client.send(_query(b"SHOW client_encoding"))
                assert (b"D", b"\x00\x01\x00\x00\x00\x04UTF8") in client.read_until_ready()
            else:
                assert errors[0]["S"] == "FATAL", received
        finally:
            client.close()
    assert _sales(pg_cluster) == 2


def test_copy_with_an_encoding_option_does_not_change_the_client_encoding(
    review_proxy: ProxyProcess, terminal_pki: TerminalPKI
) -> None:
    """COPY ... (ENCODING 'SJIS') reads only the COPY data in SJIS, data the proxy does not parse."""
    row = "ソ\t1\n".encode("shift_jis")  # ソ ends in 0x5C in SJIS
    assert b"\\" in row
    with _connect(review_proxy, terminal_pki, "manager") as conn:
        with conn.cursor().copy("COPY public.rv_prices FROM STDIN (ENCODING 'SJIS')") as copy:
            copy.write(row)
        assert conn.execute("SHOW client_encoding").fetchone() == ("UTF8",)
        assert conn.execute("SELECT name FROM public.rv_prices WHERE price_cents = 1").fetchone() == ("ソ",)
        assert conn.execute(DELETE_IN_SJIS).fetchone() is not None


# --- startup ---


def test_startup_spellings_the_server_might_read_otherwise_are_refused(
    review_proxy: ProxyProcess, terminal_pki: TerminalPKI
) -> None:
    for startup in (
        {"CLIENT_ENCODING": "SJIS"},
        {"Client_Encoding": "big5"},
        {"client_encoding": "SJIS\u00a0"},
        {"client_encoding": "utf8" + "_" * 60},
        {"client_encoding": "auto"},
        {"client_encoding": "UTF8", "CLIENT_ENCODING": "SJIS"},
        {"options": "-c client_encoding=SJIS"},
        {"options": "--client-encoding=SJIS"},
    ):
        client = _raw(review_proxy, terminal_pki, "cashier", **startup)
        try:
            client.expect_fatal("0A000")
        finally:
            client.close()
    client = _raw(review_proxy, terminal_pki, "cashier", client_encoding="  utf-8  ")
    try:
        received = client.read_until_ready()
        assert_startup_succeeded(received)
        assert (b"S", b"client_encoding\x00UTF8\x00") in received
    finally:
        client.close()


def test_a_client_leaving_mid_switch_does_not_leave_its_encoding_to_the_next(
    start_proxy: Any, terminal_pki: TerminalPKI, tmp_path: Path, schema: None
) -> None:
    """Transaction pooling, one server connection: the manager switches to WIN1252 and vanishes
    before the answer; the cashier who gets that server connection next is read in UTF8."""
    policy_file = tmp_path / "cashier.yaml"
    policy_file.write_text(yaml.safe_dump(CASHIER_POLICY, allow_unicode=True), encoding="utf-8")
    process = start_proxy(
        roles={"cashier": {"policy": str(policy_file)}},
        routes={"pos": {"pool": {"mode": "transaction", "size": 1}}},
    )
    for switch in (b"SET client_encoding TO 'WIN1252'", b"BEGIN; SET client_encoding TO 'LATIN1'"):
        client = _raw(process, terminal_pki, "manager")
        assert_startup_succeeded(client.read_until_ready())
        client.send(_query(switch) + _query(b"SELECT pg_sleep(0.2)"))
        client.close()
        with _connect(process, terminal_pki, "cashier") as conn:
            assert conn.execute("SHOW client_encoding").fetchone() == ("UTF8",)
            assert conn.execute(READ_GA).fetchone() == ("allowed table",)
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                conn.execute(f'SELECT what FROM "{FILLER_JAMO}"')


# --- the server's own encoding ---

LATIN1_READING = GA.encode().decode("latin-1")  # what a LATIN1 database makes of 가's UTF-8 bytes


@pytest.fixture(scope="module")
def latin1_database(pg_cluster: Any) -> str:
    """A LATIN1 database holding a forbidden table named as it reads the UTF-8 bytes of 가."""
    with _superuser(pg_cluster) as admin:
        if admin.execute("SELECT 1 FROM pg_database WHERE datname = 'rv_latin1'").fetchone() is None:
            admin.execute(
                "CREATE DATABASE rv_latin1 ENCODING 'LATIN1' LOCALE 'C' TEMPLATE template0 OWNER pos_proxy"
            )
    kwargs = pg_cluster.connect_kwargs(user="postgres", dbname="rv_latin1")
    with psycopg.connect(**kwargs, autocommit=True) as admin:
        admin.execute(f'CREATE TABLE IF NOT EXISTS public."{LATIN1_READING}" (what text)')
        admin.execute(f'ALTER TABLE public."{LATIN1_READING}" OWNER TO pos_proxy')
        admin.execute(f'TRUNCATE public."{LATIN1_READING}"')
        admin.execute(f"INSERT INTO public.\"{LATIN1_READING}\" VALUES ('forbidden table')")
    with psycopg.connect(**kwargs, autocommit=True, client_encoding="SQL_ASCII") as direct:
        # A SQL_ASCII client's bytes are not converted: this database reads them as LATIN1.
        assert direct.execute(READ_GA.encode()).fetchone() == (b"forbidden table",)
    return "rv_latin1"


def test_a_database_not_in_utf8_is_not_served(
    start_proxy: Any, terminal_pki: TerminalPKI, tmp_path: Path, latin1_database: str
) -> None:
    """In a LATIN1 database the cashier's approved statement on table 가, sent by a SQL_ASCII
    client, names another table (and a single-byte database folds non-ASCII identifiers by its
    locale, which the proxy's parser never does): the proxy serves UTF8 databases only."""
    policy_file = tmp_path / "cashier.yaml"
    policy_file.write_text(yaml.safe_dump(CASHIER_POLICY, allow_unicode=True), encoding="utf-8")
    process = start_proxy(
        roles={"cashier": {"policy": str(policy_file)}}, routes={"pos": {"dbname": latin1_database}}
    )
    with (
        pytest.raises(psycopg.OperationalError),
        _connect(process, terminal_pki, "cashier", client_encoding="SQL_ASCII") as conn,
    ):
        conn.execute(READ_GA.encode()).fetchone()
    process.wait_for_event(
        "server_protocol_error", error="server_encoding is LATIN1: the proxy serves UTF8 databases only"
    )


# --- the other setting that decides where a string ends ---

# One SELECT of two strings while backslashes are literal (standard_conforming_strings on, as
# the proxy's parser reads); with them off, a string and then a DELETE.
DELETE_WITHOUT_CONFORMING_STRINGS = b"SELECT 'a\\', $$' ; DELETE FROM public.rv_sales; --$$"


def test_the_payload_deletes_when_backslashes_escape(pg_cluster: Any, schema: None) -> None:
    with _superuser(pg_cluster) as admin:
        admin.execute("BEGIN")
        admin.execute("SET LOCAL standard_conforming_strings = off")
        admin.execute(DELETE_WITHOUT_CONFORMING_STRINGS)
        row = admin.execute("SELECT count(*) FROM public.rv_sales").fetchone()
        admin.execute("ROLLBACK")
    assert row == (0,)


@pytest.mark.parametrize("role", ["cashier", "manager"])
def test_turning_standard_conforming_strings_off_is_refused(
    review_proxy: ProxyProcess, terminal_pki: TerminalPKI, pg_cluster: Any, role: str
) -> None:
    with _connect(review_proxy, terminal_pki, role) as conn:
        for switch in (
            "SET standard_conforming_strings = off",
            "SET SESSION standard_conforming_strings TO false",
            "SET LOCAL standard_conforming_strings = 'no'",
            "SELECT set_config('standard_conforming_strings', 'off', false)",
            "SELECT set_config('standard_conforming_strings', '0', true)",
        ):
            with pytest.raises(psycopg.Error) as refused:
                conn.execute(switch)
            assert refused.value.sqlstate in REFUSED_SQLSTATES, (switch, refused.value)
            assert conn.execute("SHOW standard_conforming_strings").fetchone() == ("on",)
            assert conn.execute(DELETE_WITHOUT_CONFORMING_STRINGS).fetchone() is not None
    assert _sales(pg_cluster) == 2


@pytest.mark.parametrize("role", ["cashier", "manager"])
def test_standard_conforming_strings_turned_off_out_of_sight_ends_the_session(
    helper_proxy: ProxyProcess, terminal_pki: TerminalPKI, pg_cluster: Any, role: str
) -> None:
    """A helper function turns it off (the cashier's policy lists it): the server's report of it is
    the backstop, as for encodings."""
    client = _raw(helper_proxy, terminal_pki, role)
    try:
        assert_startup_succeeded(client.read_until_ready())
        client.send(_query(b"SELECT public.rv_set('standard_conforming_strings', 'off')"))
        received = _read_all(client, 1)
        with contextlib.suppress(PeerClosed, OSError):
            client.send(_query(DELETE_WITHOUT_CONFORMING_STRINGS))
            received += _read_all(client, 1)
    finally:
        client.close()
    assert _sales(pg_cluster) == 2
    assert any(error["S"] == "FATAL" for error in _errors(received)), received


def test_resetting_returns_to_on_whatever_the_roles_default(
    review_proxy: ProxyProcess, terminal_pki: TerminalPKI, pg_cluster: Any
) -> None:
    """With the server role's stored default off, RESET and DISCARD ALL still return to on: server
    connections start with it on, a source the stored defaults do not outrank."""
    with _superuser(pg_cluster) as admin:
        admin.execute("ALTER ROLE pos_proxy SET standard_conforming_strings = off")
    try:
        with _connect(review_proxy, terminal_pki, "manager") as conn:
            for statement in (
                "RESET standard_conforming_strings",
                "SET standard_conforming_strings TO DEFAULT",
                "RESET ALL",
                "DISCARD ALL",
            ):
                conn.execute(statement)
                assert conn.execute("SHOW standard_conforming_strings").fetchone() == ("on",), statement
                assert conn.execute(DELETE_WITHOUT_CONFORMING_STRINGS).fetchone() is not None
    finally:
        with _superuser(pg_cluster) as admin:
            admin.execute("ALTER ROLE pos_proxy RESET standard_conforming_strings")
    assert _sales(pg_cluster) == 2
