"""The session-state classifier's answers by statement text, looked up for every Parse and Query.

Separate from sessionstate.py so it can be compiled with the data path (setup.py): the classifier
itself cannot be, since pglast's Visitor finds its ``visit_*`` methods with ``inspect.ismethod``,
which is false for compiled methods.
"""

from __future__ import annotations

from typing import Final

from proxy.protocols.postgres.sessionstate import Classification, classify

# Distinct texts remembered before the cache starts over.
CACHE_LIMIT: Final = 10_000


class SessionStateClassifier:
    """Classify statement texts, remembering answers for the texts seen most."""

    def __init__(self, limit: int = CACHE_LIMIT) -> None:
        self._cache: dict[bytes, Classification] = {}
        self._limit = limit

    def classify(self, sql: bytes) -> Classification:
        """Classify statement text as it came off the wire (UTF-8)."""
        cached = self._cache.get(sql)
        if cached is not None:
            return cached
        result = classify(sql.decode("utf-8", errors="replace"))
        if len(self._cache) >= self._limit:
            # Literal-laden simple-protocol texts rarely repeat: start over rather than track recency.
            self._cache.clear()
        self._cache[sql] = result
        return result

    def __len__(self) -> int:
        return len(self._cache)
