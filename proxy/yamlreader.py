"""Read YAML files into validated values, reporting every problem with its key path: the machinery
under the proxy's configuration (proxy.config) and the role policy files (proxy.policy.files)."""

from __future__ import annotations

import dataclasses
import enum
import hmac
import os
import re
import stat
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Final, NoReturn, TypeVar

import yaml

T = TypeVar("T")
E = TypeVar("E", bound=enum.Enum)


# --- Errors -----------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ConfigProblem:
    """One thing wrong with the configuration; ``path`` is the dotted key, "" for the file itself."""

    path: str
    message: str

    def __str__(self) -> str:
        return f"{self.path}: {self.message}" if self.path else self.message


class ConfigError(Exception):
    """The configuration is unusable. Carries every problem found, so one edit can fix them all."""

    def __init__(self, problems: Iterable[ConfigProblem]) -> None:
        self.problems: tuple[ConfigProblem, ...] = tuple(problems)
        super().__init__("\n".join(str(problem) for problem in self.problems))


# --- Values -----------------------------------------------------------------------------------------------


class Secret:
    """A resolved credential that keeps itself out of reprs, logs and tracebacks."""

    # Deliberately not a dataclass: dataclasses.asdict() would recurse into it and expose the value.
    __slots__ = ("_value",)
    _value: str

    def __init__(self, value: str) -> None:
        object.__setattr__(self, "_value", value)

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "Secret(***)"

    __str__ = __repr__

    def __setattr__(self, name: str, value: object) -> NoReturn:
        raise AttributeError("Secret is immutable")

    def __delattr__(self, name: str) -> NoReturn:
        raise AttributeError("Secret is immutable")

    # copy, deepcopy and pickle would otherwise rebuild the object through the blocked __setattr__.
    def __reduce__(self) -> tuple[type[Secret], tuple[str]]:
        return (Secret, (self._value,))

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Secret):
            return NotImplemented
        return hmac.compare_digest(self._value.encode(), other._value.encode())

    def __hash__(self) -> int:
        return hash(self._value)


def load_yaml(path: Path) -> object:
    """The YAML document at ``path`` (duplicate keys refused); ValueError says file, line and column."""
    try:
        text = read_file(path).decode("utf-8")
    except UnicodeDecodeError:
        raise ValueError(f"{path}: not valid UTF-8") from None
    try:
        return yaml.load(text, Loader=_StrictLoader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else str(path)
        raise ValueError(f"{where}: invalid YAML: {exc.problem}") from None
    except (yaml.YAMLError, ValueError) as exc:  # ValueError: a scalar like the date 2024-13-01
        raise ValueError(f"{path}: invalid YAML: {' '.join(str(exc).split())}") from None


def parse_duration(value: object) -> float:
    """Seconds from a number of seconds or a string like "250ms", "30s", "5m", "1h"; ValueError if bad."""
    return float(_parse_quantity(value, _DURATION_UNITS, "a duration such as 30, 2.5, '250ms', '5m' or '1h'"))


def parse_size(value: object) -> int:
    """Bytes from a number or a string like "512KiB", "16MiB", "1MB", "2GiB"; ValueError if bad."""
    size = _parse_quantity(value, _SIZE_UNITS, "a size such as 1024, '512KiB', '16MiB' or '1MB'")
    if size != size.to_integral_value():
        raise ValueError(f"expected a whole number of bytes, got {describe(value)}")
    return int(size)


_DURATION_UNITS: Final = {
    "": Decimal(1),
    "ms": Decimal("0.001"),
    "s": Decimal(1),
    "m": Decimal(60),
    "h": Decimal(3600),
}
_SIZE_UNITS: Final = {
    "": Decimal(1),
    "B": Decimal(1),
    "kB": Decimal(10**3),
    "KB": Decimal(10**3),
    "MB": Decimal(10**6),
    "GB": Decimal(10**9),
    "KiB": Decimal(2**10),
    "MiB": Decimal(2**20),
    "GiB": Decimal(2**30),
}
_QUANTITY: Final = re.compile(r"\s*(?P<number>\d+(?:\.\d+)?)\s*(?P<unit>[A-Za-z]*)\s*")


def _parse_quantity(value: object, units: Mapping[str, Decimal], expected: str) -> Decimal:
    """A non-negative number, optionally carrying one of ``units``; Decimal so "1.5MiB" stays exact."""
    problem = ValueError(f"expected {expected}, got {describe(value)}")
    if isinstance(value, str):
        match = _QUANTITY.fullmatch(value)
        if match is None or match["unit"] not in units:
            raise problem
        quantity = Decimal(match["number"]) * units[match["unit"]]
    elif isinstance(value, int | float) and not isinstance(value, bool):
        quantity = Decimal(value)
    else:
        raise problem
    if not quantity.is_finite() or quantity < 0:
        raise problem
    return quantity


# --- Reading machinery ------------------------------------------------------------------------------------
#
# Readers record problems and carry on with a fallback value, so one pass finds every problem.
# parse_config raises before building a Config whenever a problem was recorded, so fallbacks
# (including the placeholders given to Section.require) never reach the caller.


@dataclass(slots=True)
class Context:
    """What one parse shares: where relative paths start, where secrets come from, what went wrong."""

    base_dir: Path
    environ: Mapping[str, str]
    problems: list[ConfigProblem] = field(default_factory=list)

    def report(self, path: str, message: str) -> None:
        self.problems.append(ConfigProblem(path, message))

    def convert(self, value: object, path: str, convert: Callable[[object], T], fallback: T) -> T:
        try:
            return convert(value)
        except ValueError as exc:
            self.report(path, str(exc))
            return fallback

    def mapping(self, value: object, path: str) -> dict[str, object]:
        """The string-keyed entries of a mapping node; absent or null counts as empty."""
        if value is None:
            return {}
        if not isinstance(value, Mapping):
            self.report(path, f"expected a mapping, got {describe(value)}")
            return {}
        entries: dict[str, object] = {}
        for key, item in value.items():
            if isinstance(key, str):
                entries[key] = item
            else:
                # Typically YAML 1.1 turning `no:` or `1.0:` into a bool or number.
                self.report(path, f"key {key!r} is not a string (quote it)")
        return entries

    def section(self, value: object, path: str, allowed: tuple[str, ...]) -> Section:
        entries = self.mapping(value, path)
        known: dict[str, object] = {}
        for key, item in entries.items():
            if key in allowed:
                known[key] = item
            else:
                # The value is never echoed: an unknown key may well hold a misplaced password.
                self.report(join_path(path, key), f"unknown key (expected one of: {', '.join(allowed)})")
        return Section(self, path, known)

    def path(self, value: object) -> Path:
        text = string()(value)
        return Path(os.path.abspath(self.base_dir / text))

    def readable_file(self, value: object) -> Path:
        path = self.path(value)
        read_file(path)
        return path

    def secret(self, value: object) -> Secret:
        """Resolve a {env: NAME}, {file: PATH} or {credential: NAME} reference. Never echoes a value."""
        if not isinstance(value, Mapping):
            raise ValueError(
                "put secrets in {env: NAME}, {file: PATH} or {credential: NAME}, not in the config file"
            )
        if len(value) != 1:
            raise ValueError("expected exactly one of {env: NAME}, {file: PATH} or {credential: NAME}")
        ((kind, name),) = value.items()
        if kind not in ("env", "file", "credential") or not isinstance(name, str) or not name:
            raise ValueError("expected exactly one of {env: NAME}, {file: PATH} or {credential: NAME}")
        if kind == "env":
            if name not in self.environ:
                raise ValueError(f"environment variable {name} is not set")
            text = self.environ[name]
        elif kind == "file":
            text = _read_secret_file(self.path(name))
        else:
            text = _read_secret_file(self._credential_path(name))
        if not text:
            raise ValueError(f"the secret from {kind} {name} is empty")
        return Secret(text)

    def _credential_path(self, name: str) -> Path:
        """Where systemd's LoadCredential= put credential ``name``."""
        directory = self.environ.get("CREDENTIALS_DIRECTORY")
        if not directory:
            raise ValueError(
                f"credential {name} needs CREDENTIALS_DIRECTORY, which systemd sets for LoadCredential=; "
                "it is not set"
            )
        if "/" in name or name in (".", ".."):
            raise ValueError(f"credential name {name!r} must be a plain file name")
        return Path(directory) / name


@dataclass(frozen=True, slots=True)
class Section:
    """A mapping node whose unknown keys were already reported, plus where it sits in the file."""

    ctx: Context
    path: str
    data: Mapping[str, object]

    def key_path(self, key: str) -> str:
        return join_path(self.path, key)

    def report(self, key: str, message: str) -> None:
        self.ctx.report(self.key_path(key), message)

    def read(self, key: str, convert: Callable[[object], T], default: T) -> T:
        """The converted value at ``key``; ``default`` when absent or null (YAML's `key:` with no value)."""
        value = self.data.get(key)
        if value is None:
            return default
        return self.ctx.convert(value, self.key_path(key), convert, default)

    def require(self, key: str, convert: Callable[[object], T], placeholder: T) -> T:
        if self.data.get(key) is None:
            self.report(key, "required")
        return self.read(key, convert, placeholder)

    def child(self, key: str, allowed: tuple[str, ...]) -> Section:
        return self.ctx.section(self.data.get(key), self.key_path(key), allowed)

    def named(
        self, key: str, what: str, name: Callable[[object], str], allowed: tuple[str, ...]
    ) -> list[tuple[str, Section]]:
        """The (name, section) entries of a mapping like `routes:`; at least one is required."""
        path = self.key_path(key)
        raw = self.data.get(key)
        entries = self.ctx.mapping(raw, path)
        if raw is None or (isinstance(raw, Mapping) and not raw):
            self.report(key, f"at least one {what} is required")
        sections: list[tuple[str, Section]] = []
        for entry, value in entries.items():
            entry_path = join_path(path, entry)
            if self.ctx.convert(entry, entry_path, name, None) is not None:
                sections.append((entry, self.ctx.section(value, entry_path, allowed)))
        return sections

    def items(self, key: str) -> list[tuple[str, object]]:
        """(path, item) for each element of the non-empty list at ``key``; [] after reporting otherwise."""
        value = self.data.get(key)
        if not isinstance(value, list) or not value:
            self.report(key, f"expected a non-empty list, got {describe(value)}")
            return []
        return [(f"{self.key_path(key)}[{index}]", item) for index, item in enumerate(value)]


def join_path(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def section_keys(schema: type, *not_keys: str) -> tuple[str, ...]:
    """The YAML keys of a section: its dataclass's fields, minus those filled from elsewhere."""
    return tuple(f.name for f in dataclasses.fields(schema) if f.name not in not_keys)


def describe(value: object) -> str:
    """Name a bad value without dumping a whole subtree into the message."""
    if isinstance(value, Mapping):
        return "a mapping"
    if isinstance(value, list):
        return "a list" if value else "an empty list"
    text = repr(value)
    return text if len(text) <= 60 else f"{text[:57]}..."


def read_file(path: Path) -> bytes:
    """The file's bytes, or ValueError naming the path and the reason it cannot be used."""
    try:
        # Checked first: opening a FIFO or device would block or never end.
        if not stat.S_ISREG(path.stat().st_mode):
            raise ValueError(f"not a regular file: {path}")
        return path.read_bytes()
    except FileNotFoundError:
        raise ValueError(f"file not found: {path}") from None
    except OSError as exc:
        raise ValueError(f"cannot read {path}: {exc.strerror}") from None


def _read_secret_file(path: Path) -> str:
    try:
        text = read_file(path).decode("utf-8")
    except UnicodeDecodeError:
        # The codec's own message quotes bytes of the secret.
        raise ValueError(f"{path} is not valid UTF-8") from None
    # `echo secret > file` and most editors add one newline that is not part of the secret.
    return text.removesuffix("\n")


# --- Value converters: object -> T, raising ValueError with what was expected ---------------------------


def string(*, allow_empty: bool = False) -> Callable[[object], str]:
    def convert(value: object) -> str:
        if not isinstance(value, str) or not (allow_empty or value.strip()):
            raise ValueError(
                f"expected {'a' if allow_empty else 'a non-empty'} string, got {describe(value)}"
            )
        return value

    return convert


def matching(pattern: str) -> Callable[[object], str]:
    compiled = re.compile(pattern)

    def convert(value: object) -> str:
        if not isinstance(value, str) or compiled.fullmatch(value) is None:
            raise ValueError(f"expected a name matching ^{pattern}$, got {describe(value)}")
        return value

    return convert


def whole_number(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"expected an integer, got {describe(value)}")
    return value


def in_range(
    parse: Callable[[object], int], what: str, *, minimum: int, maximum: int | None = None
) -> Callable[[object], int]:
    bounds = f"between {minimum} and {maximum}" if maximum is not None else f"of at least {minimum}"

    def convert(value: object) -> int:
        number = parse(value)
        if number < minimum or (maximum is not None and number > maximum):
            raise ValueError(f"expected {what} {bounds}, got {describe(value)}")
        return number

    return convert


def positive_duration(value: object) -> float:
    seconds = parse_duration(value)
    if seconds <= 0:
        raise ValueError(f"expected a duration above zero, got {describe(value)}")
    return seconds


def duration_or_off(value: object) -> float | None:
    """A positive duration, or 0 / "off": never."""
    if value in (0, "off"):
        return None
    return positive_duration(value)


def one_of(choices: Mapping[str, T]) -> Callable[[object], T]:
    expected = ", ".join(choices)

    def convert(value: object) -> T:
        # YAML reads `min_version: 1.2` as a float; take the number the user meant.
        key = str(value) if isinstance(value, int | float) and not isinstance(value, bool) else value
        if not isinstance(key, str) or key not in choices:
            raise ValueError(f"expected one of: {expected}; got {describe(value)}")
        return choices[key]

    return convert


def enum_member(kind: type[E]) -> Callable[[object], E]:
    return one_of({member.value: member for member in kind})


def in_range_float(low: float, high: float) -> Callable[[object], float]:
    def convert(value: object) -> float:
        if isinstance(value, bool) or not isinstance(value, int | float) or not low <= value <= high:
            raise ValueError(f"expected a number from {low:g} to {high:g}, got {describe(value)}")
        return float(value)

    return convert


def positive_number(value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
        raise ValueError(f"expected a positive number, got {describe(value)}")
    return float(value)


def list_of(item: Callable[[object], T]) -> Callable[[object], list[T]]:
    def convert(value: object) -> list[T]:
        if not isinstance(value, list):
            raise ValueError(f"expected a list, got {describe(value)}")
        converted = []
        for index, element in enumerate(value):
            try:
                converted.append(item(element))
            except ValueError as exc:
                raise ValueError(f"item {index}: {exc}") from None
        return converted

    return convert


def one_of_names(names: frozenset[str]) -> Callable[[object], str]:
    def convert(value: object) -> str:
        if not isinstance(value, str) or value not in names:
            raise ValueError(f"expected one of: {', '.join(sorted(names))}; got {describe(value)}")
        return value

    return convert


def boolean(value: object) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"expected true or false, got {describe(value)}")
    return value


# --- YAML -------------------------------------------------------------------------------------------------


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that rejects duplicate keys, which plain YAML loading silently resolves to the last."""


def _construct_mapping(loader: _StrictLoader, node: yaml.MappingNode) -> dict[object, object]:
    seen: set[object] = set()
    for key_node, _ in node.value:
        # `<<: *anchor` merges may legitimately repeat keys; only literal repeats are mistakes.
        if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == "tag:yaml.org,2002:merge":
            continue
        key = loader.construct_object(key_node)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                "while constructing a mapping", node.start_mark, f"duplicate key {key!r}", key_node.start_mark
            )
        seen.add(key)
    return loader.construct_mapping(node)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)
