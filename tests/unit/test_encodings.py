"""proxy.policy.encodings: PostgreSQL's encoding names, and which encodings the proxy can read."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from proxy.policy import encodings
from proxy.policy.engine import CHARACTER_NOT_IN_REPERTOIRE, PolicyEngine
from proxy.policy.model import RolePolicy
from proxy.protocols.postgres.parameters import SessionParameters, StartupParameterError, quote_literal

# What PostgreSQL 15's pg_encoding_to_char(pg_char_to_encoding(name)) says for each name; the
# security test checks the same table against the running server.
SERVER_SAYS = {
    "UTF8": "UTF8",
    "utf-8": "UTF8",
    "Unicode": "UTF8",
    "SQL_ASCII": "SQL_ASCII",
    "Latin-1": "LATIN1",
    "iso8859_1": "LATIN1",
    "ISO-8859-1": "LATIN1",
    "iso_8859-15": "LATIN9",
    "latin10": "LATIN10",
    "iso-8859-9": "LATIN5",
    "ISO-8859-5": "ISO_8859_5",
    "WIN1252": "WIN1252",
    "windows-1252": "WIN1252",
    "cp-1252": "",
    "win": "WIN1251",
    "alt": "WIN866",
    "abc": "WIN1258",
    "TCVN": "WIN1258",
    "tcvn-5712": "WIN1258",
    "vscii": "WIN1258",
    "KOI8": "KOI8R",
    "koi8-u": "KOI8U",
    "EUC-JP": "EUC_JP",
    "euc_jis_2004": "EUC_JIS_2004",
    "euc-cn": "EUC_CN",
    "EUCKR": "EUC_KR",
    "euc_tw": "EUC_TW",
    "mule_internal": "MULE_INTERNAL",
    "Shift-JIS": "SJIS",
    "shift_jis": "SJIS",
    "ms_kanji": "SJIS",
    "MSKANJI": "SJIS",
    "win 932": "SJIS",
    "WINDOWS932": "SJIS",
    "SHIFT_JIS_2004": "SHIFT_JIS_2004",
    "big-5": "BIG5",
    "WINDOWS950": "BIG5",
    "gbk": "GBK",
    "WINDOWS936": "GBK",
    "uhc": "UHC",
    "win949": "UHC",
    "johab": "JOHAB",
    "GB-18030": "GB18030",
    "utf 8 ": "UTF8",
    "": "",
    "nonsense": "",
    "utf9": "",
    "utf8" + "_" * 60: "",  # 64 bytes: longer than any name PostgreSQL looks up
}
CLIENT_ONLY = ("SJIS", "BIG5", "GBK", "UHC", "JOHAB", "GB18030", "SHIFT_JIS_2004")


@pytest.mark.parametrize(("name", "canonical"), SERVER_SAYS.items())
def test_canonical_name_is_the_servers(name: str, canonical: str) -> None:
    assert (encodings.canonical_name(name) or "") == canonical


def test_every_alias_names_an_encoding_the_server_reports() -> None:
    canonical = {encodings.canonical_name(alias) for alias in encodings.ALIASES}
    assert None not in canonical
    assert canonical >= encodings.ACCEPTED
    assert len(canonical) == 42  # every encoding PostgreSQL 15 knows (pg_enc2name_tbl)


def test_names_with_non_ascii_characters_are_unknown() -> None:
    # The server keeps or drops such a character depending on its locale: refuse either way.
    assert encodings.canonical_name("utf8é") is None
    assert encodings.canonical_name("\uff55\uff54\uff46\uff18") is None  # fullwidth utf8


@pytest.mark.parametrize("encoding", (*CLIENT_ONLY, "EUC_TW", "MULE_INTERNAL"))
def test_encodings_the_proxy_cannot_read_as_the_server_are_refused(encoding: str) -> None:
    assert encoding not in encodings.ACCEPTED
    for alias in encodings.ALIASES:
        if encodings.canonical_name(alias) == encoding:
            assert encodings.accepted_encoding(alias) is None
            assert encodings.accepted_encoding(alias.upper() + "-") is None


def test_refusal_names_the_encoding_and_what_is_supported() -> None:
    message = encodings.refusal_message("ms-kanji")
    assert "SJIS" in message and "UTF8" in message and "LATIN1" in message


@pytest.mark.parametrize("encoding", sorted(encodings.ACCEPTED))
@given(data=st.binary(max_size=64))
def test_accepted_encodings_keep_every_ascii_byte_ascii(encoding: str, data: bytes) -> None:
    """Where the lexer's quotes, backslashes and semicolons are is the same in every accepted encoding."""
    try:
        text = data.decode(encodings.python_codec(encoding))
    except UnicodeDecodeError:
        return
    ascii_of_text = "".join(char for char in text if char.isascii())
    assert ascii_of_text.encode("ascii") == bytes(byte for byte in data if byte < 0x80)


def test_startup_client_encoding_is_carried_under_the_servers_name() -> None:
    assert (
        SessionParameters.from_startup({"client_encoding": "iso-8859-1"}).wanted["client_encoding"]
        == "LATIN1"
    )
    assert SessionParameters.from_startup({"client_encoding": "utf-8"}).wanted["client_encoding"] == "UTF8"
    # Not asked for: still carried, so a pooled connection left in another encoding is set back.
    assert SessionParameters.from_startup({}).wanted["client_encoding"] == "UTF8"


@pytest.mark.parametrize("name", ["SJIS", "Shift-JIS", "ms_kanji", "win 932", "BIG5", "GBK", "GB18030", "x"])
def test_startup_client_encoding_the_proxy_cannot_read_is_refused(name: str) -> None:
    with pytest.raises(StartupParameterError, match="not supported"):
        SessionParameters.from_startup({"client_encoding": name})


def _engine() -> PolicyEngine:
    policy = RolePolicy(
        kinds=frozenset({"SELECT", "RESET", "DISCARD"}), read_tables=frozenset({"public.café"})
    )
    return PolicyEngine({"cashier": policy})


def test_statements_are_decided_on_the_client_encodings_reading() -> None:
    engine = _engine()
    latin1 = "SELECT * FROM café".encode("latin-1")
    assert engine.decide("cashier", latin1, "LATIN1").allowed
    # The same bytes are not UTF-8: not judged at all.
    refused = engine.decide("cashier", latin1, "UTF8")
    assert not refused.allowed and refused.sqlstate == CHARACTER_NOT_IN_REPERTOIRE
    # UTF-8 bytes of café read as LATIN1 name another table, cafÃ©: refused, as the server
    # would look up that table.
    assert not engine.decide("cashier", "SELECT * FROM café".encode(), "LATIN1").allowed
    assert engine.decide("cashier", "SELECT * FROM café".encode(), "UTF8").allowed


def test_reset_all_is_refused_while_the_client_encoding_is_not_the_servers_default() -> None:
    engine = _engine()
    for statement in (b"RESET ALL", b"DISCARD ALL"):
        assert engine.decide("cashier", statement, "UTF8").allowed
        refused = engine.decide("cashier", statement, "LATIN1")
        assert not refused.allowed and "LATIN1" in refused.message


def test_quoted_literals_are_ascii_so_every_client_encoding_reads_them_alike() -> None:
    # Refusal messages and synced settings are sent in whatever encoding the session is in.
    assert quote_literal("café 😀 it's \\") == "E'caf\\u00e9 \\U0001f600 it''s \\\\'"
    assert quote_literal("plain").isascii()


def test_bytes_a_codec_does_not_read_character_by_character_are_not_judged() -> None:
    """Python's euc_kr reads a KS X 1001 Annex 3 make-up sequence (filler, three jamo) as one
    syllable; PostgreSQL converts its four characters one by one. Neither reading is trusted."""
    make_up = bytes.fromhex("a4d4a4a1a4bfa4d4")
    assert make_up.decode("euc_kr") == "\uac00"
    with pytest.raises(UnicodeDecodeError):
        encodings.read_statement(b'SELECT 1 FROM "' + make_up + b'"', "EUC_KR")
    assert encodings.read_statement("SELECT '\uac00'".encode("euc_kr"), "EUC_KR") == "SELECT '\uac00'"
    policy = RolePolicy(kinds=frozenset({"SELECT"}))
    decision = PolicyEngine({"cashier": policy}).decide("cashier", b"SELECT '" + make_up + b"'", "EUC_KR")
    assert not decision.allowed and decision.sqlstate == CHARACTER_NOT_IN_REPERTOIRE


def test_bytes_python_reads_as_ascii_are_not_judged() -> None:
    """Python's euc_jp reads the three bytes 8FA2B7 as "~", an operator to the lexer; the server
    refuses them. The proxy refuses them too, whatever the rest of the statement."""
    tilde = bytes.fromhex("8fa2b7")
    assert tilde.decode("euc_jp") == "~"
    for sql in (tilde, b"SELECT 1 " + tilde + b" 2", "SELECT '\u3042'".encode("euc_jp") + tilde):
        with pytest.raises(UnicodeDecodeError):
            encodings.read_statement(sql, "EUC_JP")


@pytest.mark.parametrize(
    ("encoding", "sql", "server_reads"),
    [
        # WAVE DASH in Python's euc_jp, FULLWIDTH TILDE in the server's conversion (as CP932 maps it).
        ("EUC_JP", b"SELECT '\xa1\xc1'", "SELECT '\uff5e'"),
        ("EUC_JP", b"SELECT '\xa4\xa2\xa1\xdd'", "SELECT '\u3042\uff0d'"),
        ("EUC_JIS_2004", b"SELECT '\xa1\xef'", "SELECT '\u00a5'"),
    ],
)
def test_characters_are_read_as_the_server_converts_them(
    encoding: str, sql: bytes, server_reads: str
) -> None:
    assert encodings.read_statement(sql, encoding) == server_reads
    assert encodings.write_statement(server_reads, encoding) == sql


def test_jis_x_0212_characters_the_server_does_not_convert_in_euc_jis_2004_are_not_judged() -> None:
    """Python's euc_jis_2004 falls back to JIS X 0212 (row 16 here: a kanji) where JIS X 0213 plane 2
    has no row; the server converts plane 2 only."""
    kanji = bytes.fromhex("8fb0a2")  # U+4E04
    assert kanji.decode("euc_jis_2004").encode("euc_jis_2004") == kanji
    with pytest.raises(UnicodeDecodeError):
        encodings.read_statement(b"SELECT '" + kanji + b"'", "EUC_JIS_2004")


def test_a_base_and_a_combining_mark_sent_apart_are_not_judged() -> None:
    """The server reads A9DC ABDC as æ and a combining grave; Python writes that text as the one
    JIS X 0213 character ABC4, so the proxy cannot tell which bytes it read: refused (22021)."""
    pair = bytes.fromhex("a9dcabdc")
    assert pair.decode("euc_jis_2004").encode("euc_jis_2004") == bytes.fromhex("abc4")
    with pytest.raises(UnicodeDecodeError):
        encodings.read_statement(b"SELECT '" + pair + b"'", "EUC_JIS_2004")
