"""Learn mode's review file: statements seen per role that the policy does not list yet.

The file is JSON, rewritten atomically; counts and first/last seen times accumulate across
restarts. ``pos-proxy policy review`` reads it; ``policy approve`` moves entries into a role's
policy file.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path

_VERSION = 1


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
    """In-memory tally of learned statements, flushed to ``path`` off the data path."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._entries: dict[tuple[str, str], ReviewEntry] = {
            (entry.role, entry.fingerprint): entry for entry in read_review(path)
        }
        self._dirty = False

    def record(self, role: str, fingerprint: str, text: str, policy_file: Path | None) -> None:
        now = datetime.now(UTC).isoformat(timespec="seconds")
        entry = self._entries.get((role, fingerprint))
        if entry is None:
            self._entries[(role, fingerprint)] = ReviewEntry(
                role, fingerprint, text, 1, now, now, str(policy_file) if policy_file else None
            )
        else:
            entry.count += 1
            entry.last_seen = now
        self._dirty = True

    def flush(self) -> None:
        if self._dirty:
            write_review(self.path, list(self._entries.values()))
            self._dirty = False


def read_review(path: Path) -> list[ReviewEntry]:
    if not path.exists():
        return []
    data = json.loads(path.read_text(encoding="utf-8"))
    return [ReviewEntry(**entry) for entry in data.get("statements", [])]


def write_review(path: Path, entries: list[ReviewEntry]) -> None:
    entries = sorted(entries, key=lambda entry: (entry.role, -entry.count, entry.fingerprint))
    payload = json.dumps({"version": _VERSION, "statements": [asdict(entry) for entry in entries]}, indent=2)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(handle, "w", encoding="utf-8") as stream:
        stream.write(payload + "\n")
    os.replace(temporary, path)
