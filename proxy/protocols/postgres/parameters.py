"""Session parameters a client asked for at startup, applied to whichever server connection serves it."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from proxy.policy.encodings import DEFAULT_ENCODING, accepted_encoding, refusal_message

if TYPE_CHECKING:  # upstream imports the statement rewriting, which quotes with this module
    from proxy.protocols.postgres.upstream import ServerConnection

# Settings drivers put in the StartupMessage (libpq, JDBC, asyncpg, psycopg, Npgsql) and that are
# safe to carry from one server connection to another. Keyed by lower case because GUC names are
# case-insensitive; the value is the spelling the server reports them under.
SESSION_PARAMETERS = {
    name.lower(): name
    for name in (
        "application_name",
        "client_encoding",
        "DateStyle",
        "TimeZone",
        "IntervalStyle",
        "extra_float_digits",
        "search_path",
        "standard_conforming_strings",
        "statement_timeout",
        "lock_timeout",
        "idle_in_transaction_session_timeout",
        "default_transaction_isolation",
        "default_transaction_read_only",
        "bytea_output",
    )
}
# Startup packet keys that are not settings (55.7 "StartupMessage").
_NOT_SETTINGS = frozenset({"user", "database"})


class StartupParameterError(Exception):
    """The client asked for something at startup that a pooling proxy cannot honour."""


@dataclass(slots=True)
class SessionParameters:
    """What the client wants set: its startup settings, then whatever it SETs that the server reports."""

    wanted: dict[str, str]

    @classmethod
    def from_startup(cls, parameters: Mapping[str, str]) -> SessionParameters:
        wanted: dict[str, str] = {}
        for name, value in parameters.items():
            if name in _NOT_SETTINGS:
                continue
            if name == "options" and not value.strip():
                continue
            canonical = SESSION_PARAMETERS.get(name.lower())
            if canonical is None:
                raise StartupParameterError(f"unsupported startup parameter: {name}")
            wanted[canonical] = _checked_value(canonical, value)
        # Always carried: a pooled server connection may still have another client's encoding.
        wanted.setdefault("client_encoding", DEFAULT_ENCODING)
        return cls(wanted)

    def note_reported(self, name: str, value: str) -> None:
        """The server reported a new value while serving this client: carry it from now on."""
        canonical = SESSION_PARAMETERS.get(name.lower())
        if canonical is not None:
            self.wanted[canonical] = value

    def changes_for(self, server: ServerConnection) -> dict[str, str]:
        """The wanted settings this server connection does not have yet."""
        return {
            name: value
            for name, value in self.wanted.items()
            if server.applied.get(name) != value and server.reported.get(name) != value
        }

    async def apply(self, server: ServerConnection, timeout: float) -> None:
        changes = self.changes_for(server)
        if not changes:
            return
        # set_config parses the value as the server's own config parser does, so list
        # settings such as search_path keep their meaning; one round trip for all of them.
        calls = ", ".join(
            f"pg_catalog.set_config({quote_literal(name)}, {quote_literal(value)}, false)"
            for name, value in changes.items()
        )
        await server.run_internal(f"SELECT {calls}", timeout)
        server.applied.update(changes)


def _checked_value(name: str, value: str) -> str:
    """``value`` as the session carries it, or StartupParameterError when the proxy cannot honour it."""
    if name == "standard_conforming_strings" and value.strip().lower() not in ("on", "true", "yes", "1"):
        raise StartupParameterError("standard_conforming_strings must be on")
    if name == "client_encoding":
        # Carried under the server's own name, so it compares equal to what the server reports.
        encoding = accepted_encoding(value)
        if encoding is None:
            raise StartupParameterError(refusal_message(value))
        return encoding
    return value


def search_path_entries(value: str) -> tuple[str, ...]:
    """The schemas of a search_path value, unquoted and in order."""
    return tuple(part.strip().strip('"') for part in value.split(",") if part.strip())


def quote_literal(text: str) -> str:
    """An E'' string literal, whatever standard_conforming_strings is, in ASCII only: other characters
    as Unicode escapes, so it reads the same in every client encoding the server may be in."""
    escaped = text.replace("\\", "\\\\").replace("'", "''")
    if not escaped.isascii():
        escaped = "".join(
            char
            if char.isascii()
            else f"\\u{ord(char):04x}"
            if ord(char) < 0x10000
            else f"\\U{ord(char):08x}"
            for char in escaped
        )
    return "E'" + escaped + "'"
