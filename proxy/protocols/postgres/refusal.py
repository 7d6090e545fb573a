"""Refuse one client statement so that the server itself raises the error (sans-IO builders),
and show the client such an error as the proxy's own.

Answering a refused statement with an ErrorResponse of our own would leave the server
unaware: an open transaction would not fail and, in the extended protocol, the client's
next messages up to Sync would still run. Instead the refused message is replaced by a
``DO`` block that raises the chosen SQLSTATE, so the server fails the transaction, skips to
Sync and reports the state the client would have seen from a real error (55.2.3).

The server's error then reads as one from a PL/pgSQL function: a CONTEXT line ("PL/pgSQL
function inline_code_block line 1 at RAISE") and the source file, line and routine of
PL/pgSQL's RAISE. The block marks its error (``PROXY_ERROR_MARK``) and the client session
passes on only the fields the proxy set (``read_error``).
"""

from __future__ import annotations

import re
import secrets
import struct
from dataclasses import dataclass
from typing import Final

from proxy.protocols.postgres import messages as m
from proxy.protocols.postgres.parameters import quote_literal

_INT16 = struct.Struct("!h")

# Marks an error the proxy raised through the server or put among the server's replies: this
# process's secret in the error's schema name field ('s', 55.8), which no error of the server's own
# carries. A client that learnt it (the DO block's text is in pg_stat_activity) could only strip
# the CONTEXT of its own errors and have them counted as the proxy's.
PROXY_ERROR_MARK: Final = f"pos_proxy_{secrets.token_hex(8)}"
_MARK_FIELD: Final = b"s" + PROXY_ERROR_MARK.encode("ascii")
# What the client gets of a marked error: severity (localized and not), SQLSTATE, message, and the
# detail and hint the proxy set (55.8 field codes).
_PROXY_FIELDS: Final = frozenset(b"SVCMDH")
# A statement that only ends the transaction (and nothing else, so no second statement rides along).
_ROLLBACK: Final = re.compile(rb"\s*(?:ROLLBACK|ABORT)(?:\s+(?:WORK|TRANSACTION))?\s*;?\s*", re.IGNORECASE)
DISK_FULL: Final = "53100"
IO_ERROR: Final = "58030"


@dataclass(frozen=True, slots=True)
class Refusal:
    sqlstate: str
    message: str
    hint: str | None = None

    def raising_body(self) -> str:
        """The PL/pgSQL code of the raising block, between its dollar quotes (ASCII only)."""
        fields = [f"ERRCODE = {quote_literal(self.sqlstate)}", f"MESSAGE = {quote_literal(self.message)}"]
        if self.hint:
            fields.append(f"HINT = {quote_literal(self.hint)}")
        fields.append(f"SCHEMA = {quote_literal(PROXY_ERROR_MARK)}")
        return f"BEGIN RAISE EXCEPTION USING {', '.join(fields)}; END"

    def raising_block(self) -> str:
        body = self.raising_body()
        # A random dollar-quote tag: the texts are ours, but may quote client identifiers.
        while True:
            tag = f"$refused_{secrets.token_hex(6)}$"
            if tag not in body:
                return f"DO {tag}{body}{tag}"

    def as_query(self) -> bytes:
        """Replacement for a Query or FunctionCall: the error and ReadyForQuery follow."""
        return m.build_query(self.raising_block())

    def as_extended(self) -> bytes:
        """Replacement for a Parse or an Execute: unnamed Parse, Bind and Execute of the raising block."""
        parse = m.build_message(b"P", b"\x00" + self.raising_block().encode() + b"\x00" + _INT16.pack(0))
        bind = m.build_message(b"B", b"\x00\x00" + _INT16.pack(0) + _INT16.pack(0) + _INT16.pack(0))
        execute = m.build_message(b"E", b"\x00" + b"\x00\x00\x00\x00")
        return parse + bind + execute


def proxy_error_response(sqlstate: str, message: str, *, hint: str | None = None) -> bytes:
    """An ErrorResponse the proxy puts among the server's replies, marked as its own."""
    unmarked = m.build_error_response("ERROR", sqlstate, message, hint=hint)
    # Before the terminating zero byte of the field list; the length field grows with it.
    fields = unmarked[5:-1] + _MARK_FIELD + b"\x00\x00"
    return m.build_message(b"E", fields)


def read_error(payload: bytes) -> tuple[str, bytes | None]:
    """The SQLSTATE of an ErrorResponse (its payload), and for one the proxy marked as its own the
    ErrorResponse the client gets instead: the proxy's fields only (None: the server's own error,
    passed on as it is).

    Bytes are split at the zero bytes that end each field: every client encoding PostgreSQL accepts
    keeps zero bytes out of its characters.
    """
    fields = payload.split(b"\x00")
    sqlstate = ""
    for field in fields:
        if field[:1] == b"C":
            sqlstate = field[1:].decode("ascii", "replace")
            break
    if _MARK_FIELD not in fields:
        return sqlstate, None
    kept = b"".join(field + b"\x00" for field in fields if field and field[0] in _PROXY_FIELDS)
    return sqlstate, m.build_message(b"E", kept + b"\x00")


def audit_unwritable(disk_full: bool) -> Refusal:
    """The refusal of a statement while the audit log cannot be written (audit.on_write_failure:
    refuse); the client may retry, on this session, once the log takes records again."""
    cause = "its disk is full" if disk_full else "its file cannot be written"
    return Refusal(
        DISK_FULL if disk_full else IO_ERROR,
        f"the audit log cannot be written ({cause}): statements are refused until it can",
        hint="Retry later; ROLLBACK still ends an open transaction.",
    )


def ends_transaction(text: bytes) -> bool:
    """Whether a statement's text is just ROLLBACK (or ABORT): it runs nothing and ends a transaction,
    so it may pass even while other statements are refused."""
    return _ROLLBACK.fullmatch(text) is not None
