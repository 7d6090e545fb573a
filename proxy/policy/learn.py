"""Learn mode's review file: statements seen per role that the policy does not list yet.

The file is JSON, rewritten atomically. The proxy only adds to it: each flush re-reads the file
(under a lock: worker processes share it) and merges what was seen since the last flush, so
entries that ``pos-proxy policy approve`` removed in the meantime stay removed unless the
statement is seen again.
"""

from __future__ import annotations

import fcntl
import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path

_VERSION = 1


class ReviewFileError(ValueError):
    """The review file exists but is not one this proxy wrote."""


@dataclass(slots=True)
class ReviewEntry:
    role: str
    fingerprint: str
    text: str
    count: int
    first_seen: str
    last_seen: str
    policy_file: str | None = None


class ReviewLog:
    """What learn mode saw since the last flush, merged into ``path`` off the data path."""

    def __init__(self, path: Path) -> None:
        self.path = path
        read_review(path)  # refuse a malformed file now, not at the first flush
        self._seen: dict[tuple[str, str], ReviewEntry] = {}

    def record(self, role: str, fingerprint: str, text: str, policy_file: Path | None) -> None:
        now = datetime.now(UTC).isoformat(timespec="seconds")
        entry = self._seen.get((role, fingerprint))
        if entry is None:
            self._seen[(role, fingerprint)] = ReviewEntry(
                role, fingerprint, text, 1, now, now, str(policy_file) if policy_file else None
            )
        else:
            entry.count += 1
            entry.last_seen = now

    def flush(self) -> None:
        if not self._seen:
            return
        with _locked(self.path):
            merged = {(entry.role, entry.fingerprint): entry for entry in read_review(self.path)}
            for key, seen in self._seen.items():
                known = merged.get(key)
                if known is None:
                    merged[key] = seen
                else:
                    known.count += seen.count
                    known.last_seen = seen.last_seen
            write_review(self.path, list(merged.values()))
        self._seen.clear()


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    """Held across read-merge-write: worker processes (run --workers N) flush into one file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle = os.open(path.with_name(f".{path.name}.lock"), os.O_CREAT | os.O_RDWR, 0o600)
    try:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield
    finally:
        os.close(handle)  # releases the lock


def read_review(path: Path) -> list[ReviewEntry]:
    """The entries of a review file; a missing or empty file has none."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return []
    if not text.strip():
        return []
    try:
        data = json.loads(text)
        return [ReviewEntry(**entry) for entry in data["statements"]]
    except (ValueError, TypeError, KeyError) as exc:
        raise ReviewFileError(f"{path}: not a pos-db-proxy review file ({exc})") from None


def write_review(path: Path, entries: list[ReviewEntry]) -> None:
    entries = sorted(entries, key=lambda entry: (entry.role, -entry.count, entry.fingerprint))
    payload = json.dumps({"version": _VERSION, "statements": [asdict(entry) for entry in entries]}, indent=2)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(handle, "w", encoding="utf-8") as stream:
        stream.write(payload + "\n")
    os.replace(temporary, path)
