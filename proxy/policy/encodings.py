"""Client encodings as PostgreSQL names them, and the few the proxy can read exactly as the server does.

PostgreSQL converts a statement from the client encoding to the server encoding before it parses
it. In the client-only encodings (SJIS, BIG5, GBK, UHC, JOHAB, GB18030, SHIFT_JIS_2004) a
multibyte character can end in the byte of a backslash or a quote, so the same bytes split into
literals differently for the server and for a reader that decodes them any other way. The proxy
therefore accepts only encodings in which every ASCII byte always means that ASCII character and
for which Python has a codec that maps the other bytes as PostgreSQL's conversion does, but for
a few characters listed here (checked against the server, character by character, in
tests/security/test_client_encodings.py); everything else is refused.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Final

# PostgreSQL's names for the encodings, as it reports them (pg_encoding_to_char), by every
# spelling its name table accepts once cleaned (src/common/encnames.c, pg_encname_tbl).
_ALIASES: Final = {
    "abc": "WIN1258",
    "alt": "WIN866",
    "big5": "BIG5",
    "euccn": "EUC_CN",
    "eucjis2004": "EUC_JIS_2004",
    "eucjp": "EUC_JP",
    "euckr": "EUC_KR",
    "euctw": "EUC_TW",
    "gb18030": "GB18030",
    "gbk": "GBK",
    "iso88591": "LATIN1",
    "iso885910": "LATIN6",
    "iso885913": "LATIN7",
    "iso885914": "LATIN8",
    "iso885915": "LATIN9",
    "iso885916": "LATIN10",
    "iso88592": "LATIN2",
    "iso88593": "LATIN3",
    "iso88594": "LATIN4",
    "iso88595": "ISO_8859_5",
    "iso88596": "ISO_8859_6",
    "iso88597": "ISO_8859_7",
    "iso88598": "ISO_8859_8",
    "iso88599": "LATIN5",
    "johab": "JOHAB",
    "koi8": "KOI8R",
    "koi8r": "KOI8R",
    "koi8u": "KOI8U",
    "latin1": "LATIN1",
    "latin10": "LATIN10",
    "latin2": "LATIN2",
    "latin3": "LATIN3",
    "latin4": "LATIN4",
    "latin5": "LATIN5",
    "latin6": "LATIN6",
    "latin7": "LATIN7",
    "latin8": "LATIN8",
    "latin9": "LATIN9",
    "mskanji": "SJIS",
    "muleinternal": "MULE_INTERNAL",
    "shiftjis": "SJIS",
    "shiftjis2004": "SHIFT_JIS_2004",
    "sjis": "SJIS",
    "sqlascii": "SQL_ASCII",
    "tcvn": "WIN1258",
    "tcvn5712": "WIN1258",
    "uhc": "UHC",
    "unicode": "UTF8",
    "utf8": "UTF8",
    "vscii": "WIN1258",
    "win": "WIN1251",
    "win1250": "WIN1250",
    "win1251": "WIN1251",
    "win1252": "WIN1252",
    "win1253": "WIN1253",
    "win1254": "WIN1254",
    "win1255": "WIN1255",
    "win1256": "WIN1256",
    "win1257": "WIN1257",
    "win1258": "WIN1258",
    "win866": "WIN866",
    "win874": "WIN874",
    "win932": "SJIS",
    "win936": "GBK",
    "win949": "UHC",
    "win950": "BIG5",
    "windows1250": "WIN1250",
    "windows1251": "WIN1251",
    "windows1252": "WIN1252",
    "windows1253": "WIN1253",
    "windows1254": "WIN1254",
    "windows1255": "WIN1255",
    "windows1256": "WIN1256",
    "windows1257": "WIN1257",
    "windows1258": "WIN1258",
    "windows866": "WIN866",
    "windows874": "WIN874",
    "windows932": "SJIS",
    "windows936": "GBK",
    "windows949": "UHC",
    "windows950": "BIG5",
}
ALIASES: Final = tuple(_ALIASES)

# The accepted client encodings and the Python codec that reads each one as the server does.
# SQL_ASCII means "no conversion": the server checks the bytes as its own encoding, UTF-8
# (server_encoding must be UTF8, see docs/compatibility.md "Client encodings").
_CODECS: Final = {
    "UTF8": "utf-8",
    "SQL_ASCII": "utf-8",
    "LATIN1": "iso8859_1",
    "LATIN2": "iso8859_2",
    "LATIN3": "iso8859_3",
    "LATIN4": "iso8859_4",
    "LATIN5": "iso8859_9",
    "LATIN6": "iso8859_10",
    "LATIN7": "iso8859_13",
    "LATIN8": "iso8859_14",
    "LATIN9": "iso8859_15",
    "LATIN10": "iso8859_16",
    "ISO_8859_5": "iso8859_5",
    "ISO_8859_6": "iso8859_6",
    "ISO_8859_7": "iso8859_7",
    "ISO_8859_8": "iso8859_8",
    "WIN866": "cp866",
    "WIN874": "cp874",
    "WIN1250": "cp1250",
    "WIN1251": "cp1251",
    "WIN1252": "cp1252",
    "WIN1253": "cp1253",
    "WIN1254": "cp1254",
    "WIN1255": "cp1255",
    "WIN1256": "cp1256",
    "WIN1257": "cp1257",
    "WIN1258": "cp1258",
    "KOI8R": "koi8_r",
    "KOI8U": "koi8_u",
    "EUC_CN": "gb2312",
    "EUC_KR": "euc_kr",
    "EUC_JP": "euc_jp",
    "EUC_JIS_2004": "euc_jis_2004",
}
# Left out: EUC_TW and MULE_INTERNAL (no Python codec; EUC_TW has 19,378 characters the server
# converts, docs/compatibility.md), and the client-only encodings, whose trailing bytes can be ASCII.

# The characters Python's codec reads as another code point than PostgreSQL 15 converts them to:
# Python's reading -> the server's. Measured against the server over every sequence of one to
# three bytes (the JIS X 0208 symbols that CP932 maps to fullwidth forms, and JIS X 0213's
# overline, dashes and parentheses); the test re-measures and compares on every run. Python's
# reading of an accepted statement writes back to the same bytes (read_statement), so each of
# these code points stands for exactly one byte sequence and can be replaced after decoding.
SERVER_READINGS: Final[Mapping[str, Mapping[str, str]]] = {
    "EUC_JP": {
        "\u301c": "\uff5e",  # A1C1 WAVE DASH -> FULLWIDTH TILDE
        "\u2016": "\u2225",  # A1C2 DOUBLE VERTICAL LINE -> PARALLEL TO
        "\u2212": "\uff0d",  # A1DD MINUS SIGN -> FULLWIDTH HYPHEN-MINUS
        "\u00a2": "\uffe0",  # A1F1 CENT SIGN -> FULLWIDTH CENT SIGN
        "\u00a3": "\uffe1",  # A1F2 POUND SIGN -> FULLWIDTH POUND SIGN
        "\u00ac": "\uffe2",  # A2CC NOT SIGN -> FULLWIDTH NOT SIGN
        "\u00a6": "\uffe4",  # 8FA2C3 BROKEN BAR -> FULLWIDTH BROKEN BAR
    },
    "EUC_JIS_2004": {
        "\uffe3": "\u203e",  # A1B1 FULLWIDTH MACRON -> OVERLINE
        "\u2015": "\u2014",  # A1BD HORIZONTAL BAR -> EM DASH
        "\uffe5": "\u00a5",  # A1EF FULLWIDTH YEN SIGN -> YEN SIGN
        "\u2985": "\uff5f",  # A2D6 LEFT WHITE PARENTHESIS -> FULLWIDTH LEFT WHITE PARENTHESIS
        "\u2986": "\uff60",  # A2D7 RIGHT WHITE PARENTHESIS -> FULLWIDTH RIGHT WHITE PARENTHESIS
    },
}
_TRANSLATIONS: Final = {
    encoding: str.maketrans(dict(readings)) for encoding, readings in SERVER_READINGS.items()
}
_UNTRANSLATIONS: Final = {
    encoding: str.maketrans({server: python for python, server in readings.items()})
    for encoding, readings in SERVER_READINGS.items()
}
# Byte sequences Python's codec reads and writes back but the server refuses (22021 there too).
# Python's euc_jis_2004 falls back to JIS X 0212 for three-byte sequences in the rows JIS X 0213
# plane 2 leaves free (3,158 characters); the server converts only plane 2. 0x8F is never a
# trailing byte, so in bytes the codec has read, a match is the start of one character.
SERVER_REFUSES: Final[Mapping[str, re.Pattern[bytes]]] = {
    "EUC_JIS_2004": re.compile(b"\x8f[\xa2\xa6\xa7\xa9-\xab\xb0-\xed]"),
}
ACCEPTED: Final = frozenset(_CODECS)
SUPPORTED_LIST: Final = ", ".join(sorted(ACCEPTED))
# What the proxy's server connections use, so RESET ALL and DISCARD ALL return to it.
DEFAULT_ENCODING: Final = "UTF8"
# pg_char_to_encoding gives up on names of NAMEDATALEN bytes or more.
_NAMEDATALEN: Final = 64


def canonical_name(name: str) -> str | None:
    """The name PostgreSQL reports for the encoding ``name`` stands for, or None if it knows none.

    PostgreSQL keeps only the letters and digits of a name, lower-cased (clean_encoding_name).
    A name with any non-ASCII character is unknown here: whether the server keeps such a
    character depends on its locale, and an unknown name is refused.
    """
    if not name or not name.isascii() or len(name) >= _NAMEDATALEN:
        return None
    return _ALIASES.get("".join(char for char in name.lower() if char.isalnum()))


def accepted_encoding(name: str) -> str | None:
    """The canonical name of ``name`` when the proxy accepts that encoding, else None."""
    canonical = canonical_name(name)
    return canonical if canonical in ACCEPTED else None


def python_codec(encoding: str) -> str:
    """The Python codec for an accepted encoding's canonical name."""
    return _CODECS[encoding]


def read_statement(sql: bytes, encoding: str) -> str:
    """``sql`` read as the server reads it in the accepted client ``encoding``.

    Raises UnicodeDecodeError for bytes not valid in it, and for bytes the codec reads other than
    character by character: those it does not write back the same way. Python's euc_kr reads an
    8-byte KS X 1001 Annex 3 make-up sequence as one Hangul syllable, where PostgreSQL converts
    each of its four characters (a filler and jamo): one identifier, two names. Also raises it for
    the bytes the server refuses in that encoding (SERVER_REFUSES); the few characters Python reads
    otherwise than the server are read as the server reads them (SERVER_READINGS).
    """
    codec = _CODECS[encoding]
    text = sql.decode(codec)
    # The bytes, not the text: Python's euc_jp reads 8FA2B7 as "~" (the server refuses it).
    if codec == _CODECS[DEFAULT_ENCODING] or sql.isascii():
        return text
    if text.encode(codec) != sql:
        raise UnicodeDecodeError(codec, sql, 0, len(sql), "not read character by character")
    refused = SERVER_REFUSES.get(encoding)
    found = refused.search(sql) if refused is not None else None
    if found is not None:
        raise UnicodeDecodeError(codec, sql, found.start(), found.end(), "not converted by the server")
    translation = _TRANSLATIONS.get(encoding)
    return text.translate(translation) if translation is not None else text


def write_statement(text: str, encoding: str) -> bytes:
    """The bytes the server reads as ``text`` in the accepted client ``encoding`` (read_statement's inverse).

    Raises UnicodeEncodeError for text the encoding cannot spell.
    """
    untranslation = _UNTRANSLATIONS.get(encoding)
    return (text.translate(untranslation) if untranslation is not None else text).encode(_CODECS[encoding])


def refusal_message(name: str) -> str:
    """What the client is told when it asks for an encoding the proxy does not accept."""
    canonical = canonical_name(name)
    shown = canonical if canonical is not None else repr(name[:_NAMEDATALEN])
    return f"client_encoding {shown} is not supported by the proxy; supported: {SUPPORTED_LIST}"
