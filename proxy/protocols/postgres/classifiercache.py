"""The session-state classifier's answers by statement text, looked up for every Parse and Query.

Separate from sessionstate.py so it can be compiled with the data path (setup.py): the classifier
itself cannot be, since pglast's Visitor finds its ``visit_*`` methods with ``inspect.ismethod``,
which is false for compiled methods.
"""

from __future__ import annotations

from typing import Final

from proxy.policy.encodings import read_statement
from proxy.policy.engine import DIGEST_KEYS_ABOVE, ENTRY_OVERHEAD, StatementKey, statement_key
from proxy.protocols.postgres.sessionstate import NOT_READABLE, Classification, classify

# Distinct texts remembered before the cache starts over.
CACHE_LIMIT: Final = 10_000
# Bytes of keys remembered before the cache starts over (the values are a few shared objects).
CACHE_BYTES: Final = 8 * 2**20


class SessionStateClassifier:
    """Classify statement texts, remembering answers for the texts seen most."""

    def __init__(self, limit: int = CACHE_LIMIT, max_bytes: int = CACHE_BYTES) -> None:
        # By (client encoding, text or digest): the same bytes are another statement in another encoding.
        self._cache: dict[tuple[str, StatementKey], Classification] = {}
        self._limit = limit
        self._max_bytes = max_bytes
        self.held_bytes = 0

    def classify(self, sql: bytes, encoding: str) -> Classification:
        """Classify statement text as it came off the wire, read in the client ``encoding`` as the
        server reads it (a text the proxy cannot read so counts as leaving session state)."""
        # statement_key, inlined for the short texts of the data path.
        key = (encoding, sql if len(sql) <= DIGEST_KEYS_ABOVE else statement_key(sql))
        cached = self._cache.get(key)
        if cached is not None:
            return cached
        try:
            result = classify(read_statement(sql, encoding))
        except UnicodeDecodeError:
            result = NOT_READABLE
        self._remember(key, result)
        return result

    def cached(self, sql: bytes, encoding: str) -> Classification | None:
        return self._cache.get((encoding, statement_key(sql)))

    def classified(self, sql: bytes, encoding: str, result: Classification) -> Classification:
        """Remember ``result``, the classification of ``sql`` made elsewhere (a worker process)."""
        self._remember((encoding, statement_key(sql)), result)
        return result

    def _remember(self, key: tuple[str, StatementKey], result: Classification) -> None:
        cost = ENTRY_OVERHEAD + len(key[1])
        if len(self._cache) >= self._limit or self.held_bytes + cost > self._max_bytes:
            # Literal-laden simple-protocol texts rarely repeat: start over rather than track recency.
            self._cache.clear()
            self.held_bytes = 0
        self._cache[key] = result
        self.held_bytes += cost

    def __len__(self) -> int:
        return len(self._cache)
