"""Session parameters a client asked for at startup, applied to whichever server connection serves it."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

from proxy.policy.encodings import DEFAULT_ENCODING, accepted_encoding, refusal_message
from proxy.policy.engine import PolicyEngine
from proxy.policy.model import PolicyMode
from proxy.policy.postgres import SENSITIVE_SETTINGS

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
        *(
            # Settings applications give drivers to send at startup (asyncpg's server_settings,
            # pg8000's startup_params, libpq's options "-c name=value"): a curated allow set of
            # settings that change only the client's own statements (what messages it is sent, how
            # fast and with how much memory its statements run), never who the session is, what
            # names mean or how the server reads a statement's text, and nothing that acts on an
            # idle connection (idle_session_timeout, tcp_keepalives_*): a carried setting stays on
            # a pooled connection until the next client is handed it.
            "client_min_messages",
            "jit",
            "work_mem",
            "maintenance_work_mem",
            "plan_cache_mode",
            "random_page_cost",
            "effective_cache_size",
            "max_parallel_workers_per_gather",
            "default_transaction_deferrable",
        ),
    )
}
# What drivers send by themselves at startup (libpq, JDBC, asyncpg, Npgsql): accepted for every
# role, since they change only how values are shown; the lexing ones are checked by value.
_DRIVER_SETTINGS = frozenset(
    {
        "application_name",
        "client_encoding",
        "DateStyle",
        "TimeZone",
        "IntervalStyle",
        "extra_float_digits",
        "standard_conforming_strings",
    }
)
# Startup packet keys that are not settings (55.7 "StartupMessage").
_NOT_SETTINGS = frozenset({"user", "database"})


class StartupParameterError(Exception):
    """The client asked for something at startup that a pooling proxy cannot honour."""


@dataclass(slots=True)
class SessionParameters:
    """What the client wants set: its startup settings, then whatever it SETs that the server reports.

    Every tracked setting not in ``wanted`` is wanted at the route's value: a server connection
    serves this client only once nothing another client left on it differs from that.
    """

    wanted: dict[str, str]

    @classmethod
    def from_startup(cls, parameters: Mapping[str, str]) -> SessionParameters:
        wanted: dict[str, str] = {}
        # As the server does (process_startup_options): the options' settings first, then the
        # startup packet's own, which win over them.
        settings = [*startup_options(parameters.get("options", "")), *parameters.items()]
        for name, value in settings:
            if name in _NOT_SETTINGS or name == "options":
                continue
            canonical = SESSION_PARAMETERS.get(name.lower())
            if canonical is None:
                raise StartupParameterError(f"unsupported startup parameter: {name}")
            wanted[canonical] = _checked_value(canonical, value)
        # Always carried: a pooled server connection may still have another client's encoding.
        wanted.setdefault("client_encoding", DEFAULT_ENCODING)
        return cls(wanted)

    def refusal_for(
        self, role: str, policies: PolicyEngine, capped: frozenset[str] = frozenset()
    ) -> str | None:
        """Why ``role`` may not start with these settings, or None when it may.

        A startup setting is a SET before the first statement: what the role's policy refuses as
        a SET it refuses here too, so a startup packet cannot do what a statement may not.
        ``capped`` names settings the session has already held to the role's own ceiling.
        """
        policy = policies.policy(role)
        if policy is None:
            return None
        for name, value in self.wanted.items():
            if name in _DRIVER_SETTINGS or name in capped:
                continue
            if name == "search_path":
                # The policy resolves unqualified table names through its own search_path: the
                # server must resolve them through the same schemas, whatever else the policy allows.
                if _search_path_or_none(value) != policy.search_path:
                    return (
                        'permission denied to set parameter "search_path": '
                        "search_path must match the role's policy"
                    )
                continue
            # Settings that change what names mean or what the session may do are refused in every
            # mode (as SET of them is, unless the policy makes an exception); the rest as enforce
            # mode would refuse their SET.
            if name.lower() in SENSITIVE_SETTINGS or policy.mode is PolicyMode.ENFORCE:
                decision = policies.decide(role, f"SET {name} TO {quote_literal(value)}".encode())
                if not decision.allowed:
                    return f'permission denied to set parameter "{name}": {decision.message}'
        return None

    def follow_policy(self, role: str, policies: PolicyEngine) -> None:
        """A role with a policy runs with the policy's search_path, not the route's.

        The policy resolves an unqualified table name in its search_path; the route's (by default
        "$user", public) would let a schema named after the route's user shadow the tables the
        policy decided on.
        """
        policy = policies.policy(role)
        if policy is not None:
            self.wanted["search_path"] = ", ".join(quote_identifier(name) for name in policy.search_path)

    def note_reported(self, name: str, value: str) -> None:
        """The server reported a new value while serving this client: carry it from now on."""
        canonical = SESSION_PARAMETERS.get(name.lower())
        if canonical is not None:
            self.wanted[canonical] = value

    def needs_sync(self, server: ServerConnection) -> bool:
        """Whether ``server`` has a tracked setting other than this client wants: checked on every
        hand-over: in the common case (the connection's last client wanted the same, and nothing
        changed since) one comparison of two small dictionaries."""
        wanted = self.wanted
        if server.settings_found_for(wanted):
            return False
        for name in server.changed_settings:
            if name not in wanted:
                return True
        if not all(server.has_setting(name, value) for name, value in wanted.items()):
            return True
        server.note_settings_found(wanted)
        return False

    async def apply(self, server: ServerConnection, timeout: float) -> None:
        """Bring ``server`` to this client's full set: the route's values, overlaid with its own."""
        wanted = self.wanted
        changes = {name: value for name, value in wanted.items() if not server.has_setting(name, value)}
        # Back to the route's value (what RESET gives: the proxy's own startup packet, then the
        # server's defaults) what the client does not want, and what it wants differently: a
        # DateStyle of "ISO" keeps the previous order (DMY, MDY), so it must start from the route's.
        resets = [name for name in server.changed_settings if name not in wanted or name in changes]
        if not changes and not resets:
            return
        await server.run_internal(sync_query(resets, changes), timeout)
        server.note_settings_applied(resets, changes)
        for name in changes:
            # As the server reports it from now on ("utf-8" is "UTF8"): compared without another set.
            reported = server.reported.get(name)
            if reported is not None:
                wanted[name] = reported


def sync_query(resets: Iterable[str], changes: Mapping[str, str]) -> str:
    """The one query that resets ``resets`` to the route's values, then sets ``changes``.

    set_config parses the value as the server's own config parser does, so list settings such as
    search_path keep their meaning; NULL resets. Two statements of one query (one round trip, one
    implicit transaction): the resets run before the settings. Public so that a reader of the
    server's log can recognise the proxy's own syncs to the byte.
    """
    statements: list[str] = []
    reset_names = list(resets)
    if reset_names:
        statements.append(_set_config_calls((name, None) for name in reset_names))
    if changes:
        statements.append(_set_config_calls(changes.items()))
    return "; ".join(statements)


def _set_config_calls(settings: Iterable[tuple[str, str | None]]) -> str:
    """One SELECT of set_config calls; a None value resets the setting (as RESET does)."""
    calls = []
    for name, value in settings:
        quoted = "NULL" if value is None else quote_literal(value)
        calls.append(f"pg_catalog.set_config({quote_literal(name)}, {quoted}, false)")
    return "SELECT " + ", ".join(calls)


# isspace() in the C locale: what pg_split_opts splits the options string at.
_OPTION_SPACE: Final = " \t\n\v\f\r"


def startup_options(options: str) -> list[tuple[str, str]]:
    """The settings of a startup packet's ``options`` (libpq's PGOPTIONS), as the server reads them.

    pg_split_opts (src/backend/utils/init/postinit.c) splits the string at unescaped C-locale
    whitespace, a backslash keeping the next character; process_postgres_switches then takes
    ``-c name=value`` (or ``-cname=value``) and ``--name=value``, with dashes in the name read as
    underscores (ParseLongOption). Any other switch (-B, -d, -D, -e, -f, ...) starts the server
    process otherwise than a pooled connection was started: StartupParameterError.
    """
    words: list[str] = []
    position, end = 0, len(options)
    while True:
        while position < end and options[position] in _OPTION_SPACE:
            position += 1
        if position == end:
            break
        chars: list[str] = []
        escaped = False
        while position < end and (escaped or options[position] not in _OPTION_SPACE):
            char = options[position]
            if not escaped and char == "\\":
                escaped = True
            else:
                escaped = False
                chars.append(char)
            position += 1
        words.append("".join(chars))
    settings: list[tuple[str, str]] = []
    index = 0
    while index < len(words):
        word = words[index]
        index += 1
        if word.startswith("--") and len(word) > 2:
            setting = word[2:]
        elif word == "-c" and index < len(words):
            setting = words[index]
            index += 1
        elif word.startswith("-c") and len(word) > 2:
            setting = word[2:]
        else:
            raise StartupParameterError(f"unsupported startup option: {word[:64]!r} (only -c name=value)")
        name, equals, value = setting.partition("=")
        if not equals:
            raise StartupParameterError(f"startup option {name[:64]!r} requires a value")
        settings.append((name.replace("-", "_"), value))
    return settings


def _checked_value(name: str, value: str) -> str:
    """``value`` as the session carries it, or StartupParameterError when the proxy cannot honour it."""
    if name == "standard_conforming_strings":
        if value.strip().lower() not in ("on", "true", "yes", "1"):
            raise StartupParameterError("standard_conforming_strings must be on")
        return "on"  # as the server reports it: libpq escapes strings by whether it reads "on"
    if name == "client_encoding":
        # Carried under the server's own name, so it compares equal to what the server reports.
        encoding = accepted_encoding(value)
        if encoding is None:
            raise StartupParameterError(refusal_message(value))
        return encoding
    return value


class SearchPathSyntaxError(ValueError):
    """The server would refuse this search_path value ("List syntax is invalid")."""


# scanner_isspace (src/backend/parser/scansup.c): the only whitespace around list items. Not
# Unicode whitespace: a no-break space is part of a name.
_LIST_SPACE: Final = " \t\n\r\f"
# NAMEDATALEN - 1: longer names are cut to this many bytes, at a character boundary.
_MAX_NAME_BYTES: Final = 63


def search_path_entries(value: str) -> tuple[str, ...]:
    """The schema names of a search_path value as the server reads them.

    PostgreSQL's SplitIdentifierString (src/backend/utils/adt/varlena.c): items separated by
    commas with ASCII whitespace around them; a double-quoted name keeps its case and may hold
    commas and doubled quotes; an unquoted one is downcased (ASCII letters only, as
    downcase_identifier does for a UTF-8 database); every name is cut to 63 bytes. "$user"
    stays as it is, as the server's own list does until it resolves it.
    """
    entries: list[str] = []
    end = len(value)
    position = _skip_space(value, 0)
    if position == end:
        return ()
    while True:
        if value[position] == '"':
            parts: list[str] = []
            position += 1
            while True:
                quote = value.find('"', position)
                if quote < 0:
                    raise SearchPathSyntaxError("unterminated quoted name")
                parts.append(value[position:quote])
                position = quote + 1
                if value.startswith('"', position):
                    parts.append('"')
                    position += 1
                else:
                    break
            name = "".join(parts)
        else:
            start = position
            while position < end and value[position] != "," and value[position] not in _LIST_SPACE:
                position += 1
            if position == start:
                raise SearchPathSyntaxError("empty name")
            name = _downcase(value[start:position])
        entries.append(_truncate(name))
        position = _skip_space(value, position)
        if position == end:
            return tuple(entries)
        if value[position] != ",":
            raise SearchPathSyntaxError("names must be separated by commas")
        position = _skip_space(value, position + 1)
        if position == end:
            raise SearchPathSyntaxError("empty name")


def _search_path_or_none(value: str) -> tuple[str, ...] | None:
    try:
        return search_path_entries(value)
    except SearchPathSyntaxError:
        return None


def _skip_space(value: str, position: int) -> int:
    while position < len(value) and value[position] in _LIST_SPACE:
        position += 1
    return position


def _downcase(name: str) -> str:
    return "".join(chr(ord(char) + 32) if "A" <= char <= "Z" else char for char in name)


def _truncate(name: str) -> str:
    encoded = name.encode("utf-8")
    if len(encoded) <= _MAX_NAME_BYTES:
        return name
    # A character cut in two is dropped whole, as pg_mbcliplen does.
    return encoded[:_MAX_NAME_BYTES].decode("utf-8", "ignore")


def quote_identifier(name: str) -> str:
    """A double-quoted identifier: the name exactly, whatever its case or characters."""
    return '"' + name.replace('"', '""') + '"'


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
