"""Statement text fit for the audit log, the operational log and the review file: no literal values, no
comments, so no card number or personal data that a statement carried reaches them.

pglast's ``normalize`` replaces the constants of plain statements by ``$n`` but leaves the text of utility
statements as it is (a PREPARE body, a column default in DDL, a COPY file name, a DO block) and keeps
comments. So its output is lexed again with PostgreSQL's own scanner, every literal token left
(string in any quoting -- '', E'', U&'', $$ $$ --, bit string, number) becomes the next ``$n`` and every
comment is dropped. Text the scanner cannot read (an unterminated quote or comment) is not logged at all:
only its length and a digest keyed per process, so repeats can be told apart within one run without the
digest being a guessable hash of a short secret.

Identifiers stay, quoted ones too: they name the tables and functions a record must name (PCI DSS
10.2.2), and they come from the schema, not from a sale.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from contextlib import suppress
from typing import Final

from pglast.parser import ParseError, normalize, scan

__all__ = ["log_text", "not_parsed", "unparsable"]

_LITERALS: Final = frozenset({"SCONST", "USCONST", "ICONST", "FCONST", "BCONST", "XCONST"})
_COMMENTS: Final = frozenset({"SQL_COMMENT", "C_COMMENT"})
# Per process: digests of unparsable text compare within one run only.
_DIGEST_KEY: Final = secrets.token_bytes(32)


def log_text(text: str) -> str:
    """``text`` (one or more statements) with every literal as ``$n`` and without comments."""
    if "\x00" in text:
        # The parser reads C strings: it would stop at the NUL and leave the rest as it is. (The server
        # refuses such a message anyway.)
        return unparsable(text.encode("utf-8", "surrogatepass"))
    original = text
    with suppress(ParseError, UnicodeEncodeError):  # without it the scanner still takes out every literal
        text = normalize(text)
    try:
        tokens = scan(text)
    except (ParseError, UnicodeEncodeError):
        return unparsable(original.encode("utf-8", "surrogatepass"))
    parameters = [int(text[token.start + 1 : token.end + 1]) for token in tokens if token.name == "PARAM"]
    number = max(parameters, default=0)
    parts: list[str] = []
    position = 0
    for token in tokens:
        if token.name in _LITERALS:
            number += 1
            parts.append(f"{text[position : token.start]}${number}")
            position = token.end + 1  # scan() reports inclusive character offsets
        elif token.name in _COMMENTS:
            # One space where the comment and the blanks around it were.
            parts.append(f"{text[position : token.start].rstrip(' ')} ")
            position = token.end + 1
            while position < len(text) and text[position] == " ":
                position += 1
    parts.append(text[position:])
    return "".join(parts).strip()


def unparsable(raw: bytes) -> str:
    """What the logs say of a text that cannot be read as SQL: its size and a keyed digest, no content."""
    return f"(not parsable: {len(raw)} bytes, digest {_digest(raw)})"


def not_parsed(raw: bytes) -> str:
    """What the logs say of a text too long to parse on the event loop, in the same terms."""
    return f"(statement of {len(raw)} bytes, not parsed, digest {_digest(raw)})"


def _digest(raw: bytes) -> str:
    return hmac.new(_DIGEST_KEY, raw, hashlib.sha256).hexdigest()[:16]
