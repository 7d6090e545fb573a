"""Read a role's policy file (config/policies/, docs/policies.md) into a RolePolicy; problems are reported
with their key paths, as the config's."""

from __future__ import annotations

import types
from pathlib import Path
from typing import Final

from proxy.policy.model import (
    DENYLIST_NAMES,
    STATEMENT_KINDS,
    ApprovedStatement,
    PolicyMode,
    RolePolicy,
)
from proxy.yamlreader import (
    Context,
    Section,
    boolean,
    enum_member,
    in_range,
    list_of,
    load_yaml,
    matching,
    one_of_names,
    string,
    whole_number,
)

_POLICY_KEYS: Final = (
    "mode",
    "search_path",
    "stacked_queries",
    "function_call_message",
    "housekeeping",
    "max_violations",
    "allow",
    "fingerprints",
)
_POLICY_ALLOW_KEYS: Final = (
    "kinds",
    "read",
    "write",
    "update_without_where",
    "functions",
    "sequences",
    "denylist_exceptions",
)
_IDENTIFIER: Final = r"[A-Za-z_][A-Za-z0-9_$]*"
_TABLE_NAME: Final = rf"{_IDENTIFIER}(\.{_IDENTIFIER})?"


def read_policy_file(path: Path, section: Section, key: str) -> RolePolicy | None:
    """The policy in the file at ``path``, which ``key`` of ``section`` names; None when the file cannot
    be read as YAML. Problems go to the section's report under that key, relative paths start at the
    file's directory."""
    try:
        data = load_yaml(path)
    except ValueError as exc:
        section.report(key, str(exc))
        return None
    ctx = Context(path.parent, section.ctx.environ, section.ctx.problems)
    return _parse_policy(ctx.section(data, section.key_path(key), _POLICY_KEYS))


def _parse_policy(section: Section) -> RolePolicy:
    """A role's policy file (see config/policies/ and docs/policies.md)."""
    default = RolePolicy()
    search_path = tuple(section.read("search_path", _policy_search_path, list(default.search_path)))
    allow = section.child("allow", _POLICY_ALLOW_KEYS)
    no_names: list[str] = []
    qualify = RolePolicy(search_path=search_path or default.search_path).qualify
    fingerprints: dict[str, ApprovedStatement] = {}
    raw = section.data.get("fingerprints")
    if raw is not None and raw != []:
        for path, item in section.items("fingerprints"):
            entry = section.ctx.section(item, path, ("fingerprint", "text"))
            fingerprint = entry.require("fingerprint", matching(r"[0-9a-f]{16}"), "")
            fingerprints[fingerprint] = ApprovedStatement(fingerprint, entry.read("text", string(), ""))
    return RolePolicy(
        mode=section.read("mode", enum_member(PolicyMode), default.mode),
        search_path=search_path or default.search_path,
        kinds=frozenset(allow.read("kinds", list_of(one_of_names(STATEMENT_KINDS)), no_names)),
        read_tables=frozenset(map(qualify, allow.read("read", list_of(matching(_TABLE_NAME)), no_names))),
        write_tables=frozenset(map(qualify, allow.read("write", list_of(matching(_TABLE_NAME)), no_names))),
        update_without_where=allow.read("update_without_where", boolean, False),
        stacked_queries=section.read("stacked_queries", boolean, default.stacked_queries),
        function_call_message=section.read("function_call_message", boolean, default.function_call_message),
        housekeeping=section.read("housekeeping", boolean, default.housekeeping),
        denylist_exceptions=frozenset(allow.read("denylist_exceptions", list_of(_denylist_entry), no_names)),
        functions=frozenset(allow.read("functions", list_of(matching(_TABLE_NAME)), no_names)),
        sequences=frozenset(map(qualify, allow.read("sequences", list_of(matching(_TABLE_NAME)), no_names))),
        max_violations=section.read(
            "max_violations", in_range(whole_number, "an integer", minimum=1), default.max_violations
        ),
        fingerprints=types.MappingProxyType(fingerprints),
    )


def _policy_search_path(value: object) -> list[str]:
    schemas = list_of(matching(_IDENTIFIER))(value)
    if "pg_catalog" in schemas[1:]:
        # Listed later, pg_catalog would let a same-named function in an earlier schema stand in
        # for a built-in the policy allows (see RolePolicy.allows_function).
        raise ValueError("pg_catalog may only be listed first")
    return schemas


def _denylist_entry(value: object) -> str:
    try:
        return one_of_names(DENYLIST_NAMES)(value)
    except ValueError as exc:
        raise ValueError(f"{exc} (a function the role may call goes in allow.functions)") from None
