"""proxy.protocols.postgres.refusal: a refused statement becomes a DO block raising the SQLSTATE."""

from __future__ import annotations

import json
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pglast import ast, parse_sql
from pglast.parser import parse_plpgsql_json

from proxy.protocols.postgres import messages as m
from proxy.protocols.postgres import refusal as refusal_module
from proxy.protocols.postgres.refusal import (
    PROXY_ERROR_MARK,
    Refusal,
    audit_unwritable,
    ends_transaction,
    proxy_error_response,
    read_error,
)

MAX = 1 << 20
_INT16 = struct.Struct("!h")
_INT32 = struct.Struct("!i")
# PL/pgSQL RAISE option types (plpgsql.h, PLpgSQL_raise_option_type).
_ERRCODE, _MESSAGE, _HINT, _SCHEMA = 0, 1, 3, 8

TRICKY = [
    "it's refused",
    "''",
    "'; DROP TABLE orders; --",
    "back\\slash \\' \\\\ \\n",
    "dollar $ $$ $1 $a$ $$ $body$",
    "$refused_$ $refused_0123456789ab$",
    "$refused_",
    "END; $$; DO $$ BEGIN PERFORM pg_sleep(10); END $$; --",
    "E'x' U&'\\0041'",
    "/* comment */ -- line",
    "line\nbreak\ttab\r",
    "unicode: é ü 漢字 😀",
    "%s %% %I %L",
    "",
]


def do_body(block: str) -> str:
    """The body of the single DO statement in ``block`` (fails unless there is exactly one)."""
    statements = parse_sql(block)
    assert len(statements) == 1
    statement = statements[0].stmt
    assert isinstance(statement, ast.DoStmt)
    (argument,) = statement.args
    assert argument.defname == "as"
    return str(argument.arg.sval)


def raise_options(block: str) -> dict[int, str]:
    """The options of the block's only RAISE, each evaluated as the SQL literal it must be."""
    (function,) = json.loads(parse_plpgsql_json(block))
    body = function["PLpgSQL_function"]["action"]["PLpgSQL_stmt_block"]["body"]
    raises = [statement["PLpgSQL_stmt_raise"] for statement in body if "PLpgSQL_stmt_raise" in statement]
    others = [
        statement for statement in body if not {"PLpgSQL_stmt_raise", "PLpgSQL_stmt_return"} & set(statement)
    ]
    assert len(raises) == 1, body
    assert others == [], body
    (raised,) = raises
    assert raised["elog_level"] == 21  # ERROR
    options: dict[int, str] = {}
    for item in raised["options"]:
        option = item["PLpgSQL_raise_option"]
        options[option.get("opt_type", 0)] = literal(option["expr"]["PLpgSQL_expr"]["query"])
    return options


def literal(expression: str) -> str:
    """The value of a SQL string literal, read by PostgreSQL's own parser."""
    (statement,) = parse_sql(f"SELECT {expression}")
    (target,) = statement.stmt.targetList
    assert isinstance(target.val, ast.A_Const), expression
    return str(target.val.val.sval)


def check_block(block: str, refusal: Refusal) -> None:
    assert block.startswith("DO $refused_")
    do_body(block)
    options = raise_options(block)
    expected = {_ERRCODE: refusal.sqlstate, _MESSAGE: refusal.message, _SCHEMA: PROXY_ERROR_MARK}
    if refusal.hint:
        expected[_HINT] = refusal.hint
    assert options == expected


def test_block_is_valid_sql_raising_the_sqlstate_message_and_hint() -> None:
    refusal = Refusal("0A000", "SET work_mem is not supported", hint="use SET LOCAL")
    block = refusal.raising_block()
    body = do_body(block)
    assert "RAISE EXCEPTION" in body
    check_block(block, refusal)


def test_no_hint_means_no_hint_option() -> None:
    for hint in (None, ""):
        refusal = Refusal("0A000", "refused", hint=hint)
        assert "HINT" not in refusal.raising_block()
        check_block(refusal.raising_block(), refusal)


@pytest.mark.parametrize("text", TRICKY)
def test_tricky_texts_stay_literal(text: str) -> None:
    refusal = Refusal("0A000", text, hint=text or None)
    check_block(refusal.raising_block(), refusal)
    check_block(refusal.as_query()[5:-1].decode(), refusal)


def test_tag_found_in_the_text_is_not_used(monkeypatch: pytest.MonkeyPatch) -> None:
    tokens = iter(["000000000000", "000000000000", "111111111111"])
    monkeypatch.setattr(refusal_module.secrets, "token_hex", lambda _size: next(tokens))
    refusal = Refusal("0A000", "closing tag $refused_000000000000$ inside", hint="$refused_000000000000$")
    block = refusal.raising_block()
    assert block.startswith("DO $refused_111111111111$BEGIN")
    assert block.endswith("$refused_111111111111$")
    check_block(block, refusal)


def test_tags_differ_between_blocks() -> None:
    refusal = Refusal("0A000", "refused")
    tags = {refusal.raising_block().split("BEGIN", 1)[0] for _ in range(20)}
    assert len(tags) == 20


_TEXT = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=40)


@settings(max_examples=100, deadline=None)
@given(
    message=st.one_of(_TEXT, st.sampled_from(TRICKY), st.lists(st.sampled_from(TRICKY)).map("".join)),
    hint=st.one_of(st.none(), _TEXT, st.sampled_from(TRICKY)),
    sqlstate=st.from_regex(r"\A[0-9A-Z]{5}\Z"),
)
def test_any_text_cannot_escape_the_block(message: str, hint: str | None, sqlstate: str) -> None:
    refusal = Refusal(sqlstate, message, hint)
    check_block(refusal.raising_block(), refusal)


# --- wire messages --------------------------------------------------------------------------------------


def test_as_query_is_one_query_message() -> None:
    refusal = Refusal("0A000", "no $$ here's", hint="h")
    data = refusal.as_query()
    frames, consumed = m.scan_frames(data, MAX)
    assert consumed == len(data)
    ((kind, start, end),) = frames
    assert kind == ord("Q")
    payload = data[start + 5 : end]
    assert payload.endswith(b"\x00") and payload.count(b"\x00") == 1
    check_block(payload[:-1].decode(), refusal)


def test_as_extended_is_parse_bind_execute_of_the_unnamed_statement_and_portal() -> None:
    refusal = Refusal("0A000", "refused 'here'", hint="try $$ again")
    data = refusal.as_extended()
    frames, consumed = m.scan_frames(data, MAX)
    assert consumed == len(data)
    assert [chr(kind) for kind, _, _ in frames] == ["P", "B", "E"]
    parse, bind, execute = (data[start + 5 : end] for _, start, end in frames)

    name, text, rest = parse.split(b"\x00", 2)
    assert name == b""
    check_block(text.decode(), refusal)
    assert rest == _INT16.pack(0)  # no parameter types

    portal, statement, rest = bind.split(b"\x00", 2)
    assert portal == b"" and statement == b""
    assert rest == _INT16.pack(0) * 3  # no parameter formats, no parameters, no result formats

    portal, rest = execute.split(b"\x00", 1)
    assert portal == b""
    assert rest == _INT32.pack(0)  # no row limit


@settings(max_examples=50, deadline=None)
@given(message=_TEXT, hint=st.one_of(st.none(), _TEXT))
def test_extended_and_query_forms_carry_the_same_block_shape(message: str, hint: str | None) -> None:
    refusal = Refusal("0A000", message, hint)
    query_text = refusal.as_query()[5:-1].decode()
    frames, _ = m.scan_frames(refusal.as_extended(), MAX)
    parse_payload = refusal.as_extended()[frames[0][1] + 5 : frames[0][2]]
    parse_text = parse_payload.split(b"\x00")[1].decode()
    # Only the random tag differs between two blocks.
    assert do_body(query_text) == do_body(parse_text)
    check_block(parse_text, refusal)


# What PostgreSQL 15 sends for the raising block: PL/pgSQL's RAISE, from inline_code_block.
def _server_error(*, marked: bool, hint: str | None = None, encoding: str = "utf-8") -> bytes:
    fields = [
        b"SERROR",
        b"VERROR",
        b"C42501",
        b"M" + "refusé: pas de DELETE".encode(encoding),
    ]
    if hint:
        fields.append(b"H" + hint.encode(encoding))
    if marked:
        fields.append(b"s" + PROXY_ERROR_MARK.encode())
    fields += [
        b"WPL/pgSQL function inline_code_block line 1 at RAISE",
        b"Fpl_exec.c",
        b"L3907",
        b"Rexec_stmt_raise",
    ]
    return b"".join(field + b"\x00" for field in fields) + b"\x00"


def test_a_marked_error_reaches_the_client_with_the_proxys_fields_only() -> None:
    for encoding in ("utf-8", "latin-1"):
        sqlstate, replacement = read_error(
            _server_error(marked=True, hint="ask a manager", encoding=encoding)
        )
        assert sqlstate == "42501"
        assert replacement is not None
        assert replacement[:1] == b"E"
        assert _INT32.unpack(replacement[1:5])[0] == len(replacement) - 1
        fields = m.parse_error_fields(replacement[5:])
        assert set(fields) == {"S", "V", "C", "M", "H"}
        assert (fields["S"], fields["C"], fields["H"]) == ("ERROR", "42501", "ask a manager")
        # The message's bytes pass as they are, in whatever encoding the client reads.
        assert "refusé: pas de DELETE".encode(encoding) in replacement


def test_the_servers_own_error_passes_untouched() -> None:
    assert read_error(_server_error(marked=False)) == ("42501", None)
    # A mark of another process (or a guess) is not this one's.
    forged = _server_error(marked=False).replace(b"\x00\x00", b"\x00spos_proxy_0000000000000000\x00\x00")
    assert read_error(forged) == ("42501", None)
    assert read_error(b"\x00") == ("", None)


def test_an_error_the_proxy_puts_among_the_replies_is_marked() -> None:
    message = proxy_error_response("53400", "result too large", hint="fetch fewer rows")
    assert _INT32.unpack(message[1:5])[0] == len(message) - 1
    fields = m.parse_error_fields(message[5:])
    assert fields["s"] == PROXY_ERROR_MARK
    sqlstate, replacement = read_error(message[5:])
    assert sqlstate == "53400"
    assert replacement is not None
    assert m.parse_error_fields(replacement[5:]) == {
        "S": "ERROR",
        "V": "ERROR",
        "C": "53400",
        "M": "result too large",
        "H": "fetch fewer rows",
    }


@pytest.mark.parametrize(
    "text", [b"ROLLBACK", b"rollback;", b"  ABORT  ", b"ROLLBACK WORK", b"rollback\n\ttransaction ;"]
)
def test_a_plain_rollback_ends_the_transaction(text: bytes) -> None:
    assert ends_transaction(text)


@pytest.mark.parametrize(
    "text",
    [
        b"",
        b"ROLLBACK; INSERT INTO sales VALUES (1)",  # a second statement rides along
        b"ROLLBACK TO SAVEPOINT s",  # the transaction goes on
        b"ROLLBACK PREPARED 'x'",
        b"ROLLBACK AND CHAIN",  # starts a new transaction at once
        b"COMMIT",
        b"/* ROLLBACK */ DELETE FROM sales",
        b"ROLLBACK;;",
    ],
)
def test_anything_more_than_a_rollback_does_not(text: bytes) -> None:
    assert not ends_transaction(text)


def test_an_unwritable_audit_log_refuses_with_disk_full_or_io_error() -> None:
    full, unwritable = audit_unwritable(disk_full=True), audit_unwritable(disk_full=False)
    assert (full.sqlstate, unwritable.sqlstate) == ("53100", "58030")
    assert full.message.startswith("the audit log cannot be written (its disk is full)")
    assert "ROLLBACK" in (full.hint or "")
