"""Client encodings: the policy reads every statement as PostgreSQL does, or the encoding is refused.

In SJIS, BIG5, GBK and GB18030 a multibyte character can end in the byte of a backslash. Bytes
that read in UTF-8 as one string constant (``E'Á\\'; DELETE ...; --'``) read in those encodings
as a string, then a DELETE. Each test attacks as a terminal holding a valid certificate would:
the payload is shown to be live against PostgreSQL itself, then every way to make the server
read a statement in such an encoding is tried through the proxy, for a role with a policy in each
policy mode and for a role without one, and the cashier's table is checked unchanged.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import psycopg
import pytest
import yaml

from proxy.policy import encodings
from tests.integration.proxyproc import ProxyProcess, TerminalPKI, deep_merge

SCHEMA = """
CREATE TABLE IF NOT EXISTS public.enc_sales (id serial PRIMARY KEY, total_cents integer NOT NULL);
CREATE TABLE IF NOT EXISTS public.enc_prices (name text, price_cents integer);
CREATE TABLE IF NOT EXISTS public."enc_tarifé" (what text);
ALTER TABLE public.enc_sales OWNER TO pos_proxy;
ALTER TABLE public.enc_prices OWNER TO pos_proxy;
ALTER TABLE public."enc_tarifé" OWNER TO pos_proxy;
TRUNCATE public.enc_sales, public.enc_prices, public."enc_tarifé";
INSERT INTO public.enc_sales (total_cents) VALUES (100), (250);
INSERT INTO public.enc_prices VALUES ('Crème brûlée', 450);
INSERT INTO public."enc_tarifé" VALUES ('forbidden table');
-- A function the proxy cannot see into, which switches the caller's client encoding.
CREATE OR REPLACE FUNCTION public.enc_switch() RETURNS text LANGUAGE sql
    AS $$ SELECT pg_catalog.set_config('client_encoding', 'SJIS', false) $$;
"""
# The cashier may add sales and read the one price table; never delete.
CASHIER_POLICY: dict[str, Any] = {
    "search_path": ["public"],
    "allow": {"kinds": ["SELECT", "INSERT"], "read": ["enc_prices"], "write": ["enc_sales"]},
    "fingerprints": [],
}
# Python codec spelling of each encoding whose trailing bytes can be a backslash.
SPLITTING = {"SJIS": "shift_jis", "BIG5": "big5", "GBK": "gbk", "GB18030": "gb18030"}
SPELLINGS = (
    "SJIS",
    "Shift-JIS",
    "ms_kanji",
    "MSKANJI",
    "win 932",
    "WINDOWS932",
    "shift_jis_2004",
    "BIG5",
    "windows950",
    "GBK",
    "WINDOWS936",
    "cp936",
    "GB18030",
    "UHC",
    "JOHAB",
    "mule_internal",
    "euc-tw",
    "utf-9",
)
MODES = ("enforce", "monitor", "learn")


def payload(encoding: str) -> bytes:
    """Valid UTF-8, one string constant to a UTF-8 reader; a string and a DELETE in ``encoding``."""
    codec = SPLITTING[encoding]
    for code_point in range(0xA0, 0x3000):
        swallower = chr(code_point).encode()
        try:
            read = (swallower + b"\\'").decode(codec)
        except UnicodeDecodeError:
            continue
        if "\\" not in read:
            return b"SELECT E'" + swallower + b"\\'; DELETE FROM public.enc_sales; --'"
    raise AssertionError(f"no payload for {encoding}")


def _superuser(cluster: Any, **options: Any) -> psycopg.Connection:
    return psycopg.connect(
        **cluster.connect_kwargs(user="postgres", dbname="pos"), autocommit=True, **options
    )


def _sales(cluster: Any) -> int:
    with _superuser(cluster) as admin:
        row = admin.execute("SELECT count(*) FROM public.enc_sales").fetchone()
    assert row is not None
    return int(row[0])


@pytest.fixture(scope="module")
def schema(pg_cluster: Any) -> None:
    with _superuser(pg_cluster) as admin:
        admin.execute(SCHEMA)


@dataclass(frozen=True, slots=True)
class ModeProxy:
    mode: str  # the cashier policy's mode
    process: ProxyProcess


@pytest.fixture(scope="module", params=MODES)
def mode_proxy(
    request: pytest.FixtureRequest,
    base_config: dict[str, Any],
    tmp_path_factory: pytest.TempPathFactory,
    schema: None,
) -> Iterator[ModeProxy]:
    """The cashier under its policy in one mode; the manager has no policy."""
    directory = tmp_path_factory.mktemp(f"enc-{request.param}")
    policy_file = directory / "cashier.yaml"
    policy_file.write_text(yaml.safe_dump({**CASHIER_POLICY, "mode": request.param}), encoding="utf-8")
    overrides = {
        "roles": {"cashier": {"policy": str(policy_file)}},
        "policy": {"review_file": str(directory / "review.json")},
    }
    process = ProxyProcess(directory / "proxy", deep_merge(base_config, overrides)).start()
    yield ModeProxy(request.param, process)
    process.stop()


def _connect(proxy: ModeProxy, pki: TerminalPKI, role: str, **options: Any) -> psycopg.Connection:
    terminal = pki.cashier if role == "cashier" else pki.manager
    return psycopg.connect(**proxy.process.conninfo(terminal, pki.ca), autocommit=True, **options)


# --- the server's own view ---


def test_server_names_every_encoding_as_the_proxy_does(pg_cluster: Any) -> None:
    names = [*encodings.ALIASES, *SPELLINGS, "Latin-1", "iso8859_1", "UNICODE", "utf-8", "ISO_8859-15"]
    names += [alias.upper() + "-" for alias in encodings.ALIASES]
    with _superuser(pg_cluster) as admin:
        for name in names:
            row = admin.execute("SELECT pg_encoding_to_char(pg_char_to_encoding(%s))", (name,)).fetchone()
            assert row is not None
            assert (encodings.canonical_name(name) or "") == row[0], name
        # Names of 64 bytes or more the proxy refuses outright, whatever the server makes of them.
        assert encodings.canonical_name("utf8" + "_" * 60) is None


_CONVERT_EACH = """
CREATE OR REPLACE FUNCTION pg_temp.convert_each(sequences bytea[], encoding text) RETURNS text[]
LANGUAGE plpgsql AS $$
DECLARE answers text[] := '{}'; sequence bytea; answer text;
BEGIN
    FOREACH sequence IN ARRAY sequences LOOP
        BEGIN answer := convert_from(sequence, encoding);
        EXCEPTION WHEN others THEN answer := NULL; END;
        answers := answers || answer;
    END LOOP;
    RETURN answers;
END $$;
"""


def _sequences(encoding: str) -> list[bytes]:
    """Every byte, and for EUC every sequence of two (and in the Japanese ones three) bytes that
    starts with a non-ASCII byte: any trailing byte, ASCII included."""
    sequences = [bytes([byte]) for byte in range(0x80, 0x100)]
    if encoding.startswith("EUC_"):
        sequences += [bytes([lead, trail]) for lead in range(0x80, 0x100) for trail in range(0x01, 0x100)]
    if encoding in ("EUC_JP", "EUC_JIS_2004"):  # 0x8F: JIS X 0212 / JIS X 0213 plane 2
        sequences += [bytes([0x8F, row, cell]) for row in range(0x01, 0x100) for cell in range(0x01, 0x100)]
    return sequences


# Characters the server converts and the proxy refuses (22021), by their leading bytes: EUC_KR A2E8
# and the lone Hangul filler A4D4, which Python does not write back alike; in EUC_JP NEC row 13
# (circled numbers, Roman numerals, unit symbols) and the IBM extension kanji at 8FF3F3-8FF4FE,
# which Python's euc_jp does not read (docs/compatibility.md "Client encodings").
PROXY_ONLY_REFUSES = {"EUC_JP": ({"ad", "8ff3", "8ff4"}, 189), "EUC_KR": ({"a2", "a4"}, 2)}


@pytest.mark.parametrize("encoding", sorted(encodings.ACCEPTED - {"UTF8", "SQL_ASCII"}))
def test_proxy_reads_every_character_as_the_server_converts_it(pg_cluster: Any, encoding: str) -> None:
    """Every character: the proxy's reading is the server's, or the proxy refuses the bytes (22021)
    while the server would accept them; never another character. The few characters Python's codec
    reads otherwise (encodings.SERVER_READINGS) are measured again here and must be exactly those."""
    sequences = _sequences(encoding)
    with _superuser(pg_cluster) as admin:
        admin.execute(_CONVERT_EACH)
        server_readings: list[str | None] = []
        for start in range(0, len(sequences), 20_000):
            batch = sequences[start : start + 20_000]
            row = admin.execute("SELECT pg_temp.convert_each(%s, %s)", (batch, encoding)).fetchone()
            assert row is not None
            server_readings += row[0]
    codec = encodings.python_codec(encoding)
    differing: dict[str, str] = {}
    python_readings: set[str] = set()
    proxy_only_refuses: list[str] = []
    for sequence, server_reading in zip(sequences, server_readings, strict=True):
        try:
            proxy_reading: str | None = encodings.read_statement(sequence, encoding)
        except UnicodeDecodeError:
            proxy_reading = None
        assert proxy_reading in (server_reading, None), (sequence.hex(), server_reading, proxy_reading)
        if server_reading is None:
            assert proxy_reading is None, sequence.hex()
        elif proxy_reading is None:
            proxy_only_refuses.append(sequence.hex())
        else:
            python_reading = sequence.decode(codec)
            python_readings.add(python_reading)
            if python_reading != server_reading:
                differing[python_reading] = server_reading
            # The way back (statement names spelled from SQL) writes the client's own bytes.
            assert encodings.write_statement(proxy_reading, encoding) == sequence, sequence.hex()
    assert differing == encodings.SERVER_READINGS.get(encoding, {})
    # Each server reading put in place of Python's stands for no other sequence Python reads.
    assert not python_readings & set(differing.values())
    leads, count = PROXY_ONLY_REFUSES.get(encoding, (set(), 0))
    assert {hexed[:2] if hexed[:2] != "8f" else hexed[:4] for hexed in proxy_only_refuses} <= leads
    assert len(proxy_only_refuses) == count


@pytest.mark.parametrize("encoding", sorted(SPLITTING))
def test_payload_deletes_when_the_server_reads_it_in_that_encoding(
    pg_cluster: Any, schema: None, encoding: str
) -> None:
    """Without the proxy the attack works: this is what the proxy must never let through."""
    with _superuser(pg_cluster, options=f"-c client_encoding={encoding}") as admin:
        admin.execute("BEGIN")
        admin.execute(payload(encoding))
        row = admin.execute("SELECT count(*) FROM public.enc_sales").fetchone()
        admin.execute("ROLLBACK")
    assert row is not None and row[0] == 0
    assert _sales(pg_cluster) == 2


# --- through the proxy ---


@pytest.mark.parametrize("role", ["cashier", "manager"])
def test_startup_in_a_refused_encoding_is_refused(
    mode_proxy: ModeProxy, terminal_pki: TerminalPKI, role: str
) -> None:
    for spelling in SPELLINGS:
        with pytest.raises(psycopg.OperationalError, match="not supported"):
            _connect(mode_proxy, terminal_pki, role, client_encoding=spelling)
        # A spelling with a space ("win 932") leaves a word that is no option of its own.
        with pytest.raises(psycopg.OperationalError, match=r"not supported|unsupported startup option"):
            _connect(mode_proxy, terminal_pki, role, options=f"-c client_encoding={spelling}")


SWITCHES = (
    "SET client_encoding TO 'MSKANJI'",
    "SET client_encoding TO sjis",
    "SET NAMES 'big5'",
    "SET SESSION client_encoding = 'Windows-936'",
    "SET LOCAL client_encoding = 'GB18030'",
    "SELECT set_config('client_encoding', 'win 932', false)",
    "SELECT pg_catalog.set_config('CLIENT_ENCODING'::text, 'GBK', true)",
    "SET client_encoding TO 'UTF8'; SET client_encoding TO 'SJIS'",
    "SELECT set_config(lower('CLIENT_ENCODING'), 'SJIS', false)",
)


@pytest.mark.parametrize("role", ["cashier", "manager"])
def test_switching_to_a_refused_encoding_is_refused(
    mode_proxy: ModeProxy, terminal_pki: TerminalPKI, pg_cluster: Any, role: str
) -> None:
    with _connect(mode_proxy, terminal_pki, role) as conn:
        for switch in SWITCHES:
            with pytest.raises(psycopg.Error) as refused:
                conn.execute(switch)
            assert refused.value.sqlstate in ("0A000", "42501"), (switch, refused.value)
            # The session stays usable, still in UTF-8.
            assert conn.execute("SHOW client_encoding").fetchone() == ("UTF8",)
            for encoding in SPLITTING:
                # Read in UTF-8 by proxy and server alike: one harmless string.
                assert conn.execute(payload(encoding)).fetchone() is not None
        # Name and value bound as parameters (extended protocol): read at Bind, refused alike.
        with pytest.raises(psycopg.Error) as refused:
            conn.execute("SELECT set_config(%s, %s, false)", ("client_encoding", "SJIS"))
        assert refused.value.sqlstate in ("0A000", "42501")
        assert conn.execute("SHOW client_encoding").fetchone() == ("UTF8",)
    assert _sales(pg_cluster) == 2


BOUND_SWITCHES = (
    ("SELECT set_config(%s, %s, false)", True),
    ("SELECT set_config(%b, %b, false)", True),
    ("SELECT set_config('client_encoding', %s, false)", False),
    ("SELECT pg_catalog.set_config('client_encoding', %b::text, true)", False),
)


@pytest.mark.parametrize("role", ["cashier", "manager"])
def test_a_bound_switch_is_refused_as_the_constant_is(
    mode_proxy: ModeProxy, terminal_pki: TerminalPKI, pg_cluster: Any, role: str
) -> None:
    """psycopg binds set_config's arguments as $1, $2 (text or binary): the proxy reads them at
    Bind, before the server does, and refuses a splitting encoding in every spelling with the
    constant's error; the same statement bound with an accepted encoding runs."""
    with _connect(mode_proxy, terminal_pki, role) as conn:
        for spelling in ("SJIS", "sjis", "Shift_JIS", "MSKANJI", "big5", "Windows-936"):
            with pytest.raises(psycopg.Error) as constant:
                conn.execute(f"SELECT set_config('client_encoding', '{spelling}', false)")
            for statement, names_the_setting in BOUND_SWITCHES:
                values = ("client_encoding", spelling) if names_the_setting else (spelling,)
                with pytest.raises(psycopg.Error) as refused:
                    conn.execute(statement, values)
                assert (refused.value.sqlstate, refused.value.diag.message_primary) == (
                    constant.value.sqlstate,
                    constant.value.diag.message_primary,
                ), (statement, spelling)
                assert conn.execute("SHOW client_encoding").fetchone() == ("UTF8",)
                assert conn.execute(payload("SJIS")).fetchone() is not None
        # Pipelined after the refused Bind, in the same messages: never run.
        with pytest.raises(psycopg.Error), conn.pipeline():
            conn.execute("SELECT set_config(%s, %s, false)", ("client_encoding", "SJIS"))
            conn.execute(payload("SJIS"))
        assert conn.execute("SHOW client_encoding").fetchone() == ("UTF8",)
        if role == "manager" or mode_proxy.mode != "enforce":
            conn.execute("SELECT set_config(%s, %s, false)", ("client_encoding", "iso-8859-1"))
            assert conn.info.parameter_status("client_encoding") == "LATIN1"
            assert conn.execute("SELECT 'Crème brûlée'").fetchone() == ("Crème brûlée",)
    assert _sales(pg_cluster) == 2


def test_sql_execute_of_a_bound_switch_is_refused(
    mode_proxy: ModeProxy, terminal_pki: TerminalPKI, pg_cluster: Any
) -> None:
    """A statement prepared through the protocol and decided at each Bind, run by SQL EXECUTE with
    its values in the text: refused, as the proxy does not read them there."""
    if mode_proxy.mode != "enforce":
        pytest.skip("a role without a policy: the policy mode does not matter")
    with _connect(mode_proxy, terminal_pki, "manager") as conn:
        conn.execute("SELECT set_config(%s, %s, false)", ("work_mem", "64MB"), prepare=True)
        prepared = conn.execute(
            "SELECT name FROM pg_prepared_statements WHERE statement LIKE '%set_config%'"
        ).fetchone()
        assert prepared is not None
        with pytest.raises(psycopg.Error) as refused:
            conn.execute(f"EXECUTE \"{prepared[0]}\"('client_encoding', 'SJIS')")
        assert (refused.value.sqlstate, refused.value.diag.message_primary) == (
            "0A000",
            "set_config needs a constant setting name",
        )
        assert conn.execute("SHOW client_encoding").fetchone() == ("UTF8",)
    assert _sales(pg_cluster) == 2


@pytest.mark.parametrize("role", ["cashier", "manager"])
def test_a_pipelined_switch_does_not_change_how_the_next_statement_is_read(
    mode_proxy: ModeProxy, terminal_pki: TerminalPKI, pg_cluster: Any, role: str
) -> None:
    with _connect(mode_proxy, terminal_pki, role) as conn:
        with pytest.raises(psycopg.Error), conn.pipeline():
            conn.execute("SET client_encoding TO 'SJIS'")
            conn.execute(payload("SJIS"))
        assert conn.execute("SHOW client_encoding").fetchone() == ("UTF8",)
    assert _sales(pg_cluster) == 2


def test_latin1_statements_are_decided_on_the_servers_reading(
    mode_proxy: ModeProxy, terminal_pki: TerminalPKI
) -> None:
    with _connect(mode_proxy, terminal_pki, "cashier", client_encoding="iso-8859-1") as conn:
        # Reported under the server's name, as PostgreSQL itself would.
        assert conn.info.parameter_status("client_encoding") == "LATIN1"
        # LATIN1 bytes (not valid UTF-8) read as the server reads them: the same string matches.
        found = conn.execute("SELECT price_cents FROM enc_prices WHERE name = 'Crème brûlée'").fetchone()
        assert found == (450,)
        # A non-ASCII table name means to the policy what it means to the server.
        forbidden = 'SELECT what FROM "enc_tarifé"'
        if mode_proxy.mode == "enforce":
            with pytest.raises(psycopg.errors.InsufficientPrivilege, match=r"public\.enc_tarifé"):
                conn.execute(forbidden)
        else:
            assert conn.execute(forbidden).fetchone() == ("forbidden table",)
        assert conn.execute("SELECT 1").fetchone() == (1,)


def test_reset_all_is_refused_while_a_policy_session_reads_latin1(
    mode_proxy: ModeProxy, terminal_pki: TerminalPKI
) -> None:
    if mode_proxy.mode != "enforce":
        pytest.skip("only enforce mode refuses")
    with _connect(mode_proxy, terminal_pki, "cashier", client_encoding="LATIN1") as conn:
        for statement in ("RESET ALL", "DISCARD ALL"):
            with pytest.raises(psycopg.Error, match="LATIN1"):
                conn.execute(statement)
        assert conn.execute("SHOW client_encoding").fetchone() == ("LATIN1",)


def test_server_reporting_a_refused_encoding_ends_the_session(
    mode_proxy: ModeProxy, terminal_pki: TerminalPKI, pg_cluster: Any
) -> None:
    """The backstop: a switch the proxy could not see (inside a function) ends the session, and the
    server connection in that encoding is closed rather than lent to another terminal."""
    with _connect(mode_proxy, terminal_pki, "manager") as conn:
        backend = conn.execute("SELECT pg_backend_pid()").fetchone()
        assert backend is not None
        with pytest.raises(psycopg.Error, match="SJIS is not supported"):
            conn.execute("SELECT public.enc_switch()")
        with pytest.raises(psycopg.OperationalError):
            conn.execute("SELECT 1")
    deadline = time.monotonic() + 10
    with _superuser(pg_cluster) as admin:
        while True:
            row = admin.execute("SELECT count(*) FROM pg_stat_activity WHERE pid = %s", backend).fetchone()
            if row == (0,) or time.monotonic() > deadline:
                break
            time.sleep(0.1)
    assert row == (0,)
    mode_proxy.process.wait_for_event("session_error", reason="server reported client_encoding SJIS")
    with _connect(mode_proxy, terminal_pki, "manager") as conn:
        assert conn.execute("SHOW client_encoding").fetchone() == ("UTF8",)


def test_other_drivers_are_refused_a_splitting_encoding_too(
    mode_proxy: ModeProxy, terminal_pki: TerminalPKI, pg_cluster: Any
) -> None:
    """asyncpg sends its client_encoding in the startup packet, psql from PGCLIENTENCODING."""
    if mode_proxy.mode != "enforce":
        pytest.skip("the startup check does not depend on the policy mode (psycopg covers all modes)")
    process = mode_proxy.process
    cashier = terminal_pki.cashier

    async def asyncpg_connect(encoding: str) -> str:
        conn = await asyncpg.connect(
            host="127.0.0.1",
            port=process.port,
            user=cashier.terminal,
            database="pos",
            ssl=process.ssl_context(cashier, terminal_pki.ca),
            server_settings={"client_encoding": encoding},
            timeout=15,
        )
        try:
            return str(await conn.fetchval("SHOW client_encoding"))
        finally:
            await conn.close()

    assert asyncio.run(asyncpg_connect("utf-8")) == "UTF8"
    with pytest.raises(asyncpg.FeatureNotSupportedError, match="SJIS is not supported"):
        asyncio.run(asyncpg_connect("Shift_JIS"))
    if shutil.which("psql") is not None:
        conninfo = " ".join(
            f"{key}={value}" for key, value in process.conninfo(cashier, terminal_pki.ca).items()
        )
        for encoding, refused in (("BIG5", True), ("WIN1252", False)):
            result = subprocess.run(
                ["psql", conninfo, "-X", "-A", "-t", "-c", "SHOW client_encoding"],
                env={**os.environ, "PGCLIENTENCODING": encoding},
                capture_output=True,
                text=True,
                timeout=30,
                check=False,
            )
            if refused:
                assert result.returncode != 0 and "BIG5 is not supported" in result.stderr, result
            else:
                assert result.returncode == 0 and result.stdout.strip() == encoding, result
    assert _sales(pg_cluster) == 2


def test_a_pooled_server_connection_never_keeps_the_last_terminals_encoding(
    start_proxy: Callable[..., ProxyProcess], terminal_pki: TerminalPKI, tmp_path: Path, schema: None
) -> None:
    """Transaction pooling, one server connection: a LATIN1 terminal uses it, then a terminal that
    asked for no encoding (UTF8) gets it back in UTF8, and its UTF-8 bytes are read as UTF-8."""
    policy_file = tmp_path / "cashier.yaml"
    policy_file.write_text(yaml.safe_dump({**CASHIER_POLICY, "mode": "enforce"}), encoding="utf-8")
    process = start_proxy(
        roles={"cashier": {"policy": str(policy_file)}},
        routes={"pos": {"pool": {"mode": "transaction", "size": 1}}},
    )
    proxy = ModeProxy("enforce", process)
    with _connect(proxy, terminal_pki, "manager", client_encoding="LATIN1") as latin1:
        assert latin1.execute("SELECT 'é'").fetchone() == ("é",)
        assert latin1.execute("SHOW client_encoding").fetchone() == ("LATIN1",)
        with _connect(proxy, terminal_pki, "cashier") as utf8:
            assert utf8.info.parameter_status("client_encoding") == "UTF8"
            assert utf8.execute("SHOW client_encoding").fetchone() == ("UTF8",)
            found = utf8.execute("SELECT price_cents FROM enc_prices WHERE name = 'Crème brûlée'").fetchone()
            assert found == (450,)
            with pytest.raises(psycopg.errors.InsufficientPrivilege, match=r"public\.enc_tarifé"):
                utf8.execute('SELECT what FROM "enc_tarifé"')
        # And back: the LATIN1 terminal's next transaction is in LATIN1 again.
        assert latin1.execute("SHOW client_encoding").fetchone() == ("LATIN1",)
        assert latin1.execute("SELECT name FROM enc_prices").fetchone() == ("Crème brûlée",)
