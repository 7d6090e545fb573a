"""Refuse one client statement so that the server itself raises the error (sans-IO builders).

Answering a refused statement with an ErrorResponse of our own would leave the server
unaware: an open transaction would not fail and, in the extended protocol, the client's
next messages up to Sync would still run. Instead the refused message is replaced by a
``DO`` block that raises the chosen SQLSTATE, so the server fails the transaction, skips to
Sync and reports the state the client would have seen from a real error (55.2.3).
"""

from __future__ import annotations

import secrets
import struct
from dataclasses import dataclass

from proxy.protocols.postgres import messages as m
from proxy.protocols.postgres.parameters import quote_literal

_INT16 = struct.Struct("!h")


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
