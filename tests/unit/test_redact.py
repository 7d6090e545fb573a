"""Statement text for the logs: no literal, no comment, whatever the quoting; unreadable text as a digest."""

from __future__ import annotations

import re

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from proxy.policy.redact import log_text, unparsable

PAN = "4111111111111111"


@pytest.mark.parametrize(
    ("sql", "logged"),
    [
        (f"SELECT * FROM t WHERE pan = '{PAN}'", "SELECT * FROM t WHERE pan = $1"),
        (
            f"SELECT E'{PAN}', U&'{PAN}', $${PAN}$$, $x${PAN}$x$, B'101', X'ff'",
            "SELECT $1, $2, $3, $4, $5, $6",
        ),
        (f"SELECT {PAN}, {PAN}.25, {PAN}e3, -{PAN}", "SELECT $1, $2, $3, $4"),
        (f"SELECT 1 /* {PAN} */", "SELECT $1"),
        (f"SELECT 1 -- {PAN}\n", "SELECT $1"),
        (f"SELECT 1 /* a /* nested {PAN} */ {PAN} */ + 2", "SELECT $1 + $2"),
        # Utility statements, which pglast's normalize leaves as they are.
        (
            f"PREPARE p AS SELECT * FROM t WHERE pan = '{PAN}' AND id = $1",
            "PREPARE p AS SELECT * FROM t WHERE pan = $2 AND id = $1",
        ),
        (f"CREATE TABLE t (pan text DEFAULT '{PAN}')", "CREATE TABLE t (pan text DEFAULT $1)"),
        (f"DO $$ BEGIN PERFORM {PAN}; END $$", "DO $1"),
        (f"COPY t TO '/tmp/{PAN}'", "COPY t TO $1"),
        # Positions are characters, not bytes.
        (f"SELECT 'é😀', '{PAN}' /* 😀 */ FROM \"tâble\"", 'SELECT $1, $2 FROM "tâble"'),
        # Identifiers are names, not values.
        ('SELECT "4111" FROM t', 'SELECT "4111" FROM t'),
    ],
)
def test_log_text_holds_no_literal_and_no_comment(sql: str, logged: str) -> None:
    assert log_text(sql) == logged


@pytest.mark.parametrize("sql", [f"SELECT '{PAN}", f"SELECT 1 /* {PAN}", f"SELECT $${PAN}"])
def test_text_the_lexer_cannot_read_is_only_a_size_and_a_digest(sql: str) -> None:
    logged = log_text(sql)
    assert re.fullmatch(r"\(not parsable: \d+ bytes, digest [0-9a-f]{16}\)", logged), logged
    assert logged == unparsable(sql.encode())
    assert unparsable(sql.encode()) != unparsable(sql.encode() + b" ")


# Any text before it (but a double quote, which could make the number part of an identifier).
@given(
    st.text(alphabet=st.characters(blacklist_characters='"'), max_size=200),
    st.sampled_from(["'{}'", "E'{}'", "$${}$$", "$q${}$q$", "/* {} */", "-- {}\n", "{}", "U&'{}'"]),
)
def test_a_card_number_never_survives_whatever_comes_before_it(prefix: str, quoting: str) -> None:
    assume(PAN not in prefix)
    assert PAN not in log_text(f"{prefix} {quoting.format(PAN)}")
