"""Bounds on what statement texts can make the proxy hold or spend: the byte-bounded caches, the
digest keys of long texts, the size limit for roles with a policy, the per-client limits on named
prepared statements, and analysis in worker processes (real ones: they are the point)."""

from __future__ import annotations

import asyncio
import hashlib

import pytest

from proxy.policy.engine import (
    DIGEST_KEYS_ABOVE,
    PROGRAM_LIMIT_EXCEEDED,
    PolicyEngine,
    StatementSummaries,
    statement_key,
)
from proxy.policy.model import RolePolicy
from proxy.policy.redact import not_parsed
from proxy.protocols.postgres import messages as m
from proxy.protocols.postgres.analysis import (
    NOT_ANALYSED,
    AnalysisFailed,
    AnalysisPool,
    AnalysisRequest,
    analyze_text,
)
from proxy.protocols.postgres.classifiercache import SessionStateClassifier
from proxy.protocols.postgres.prepared import ClientStatements, ServerState, ServerStatements, StatementStats
from proxy.protocols.postgres.sessionstate import NOT_READABLE, Effect, classify

CASHIER = RolePolicy(kinds=frozenset({"SELECT", "INSERT"}), read_tables=frozenset({"public.products"}))


def padded(number: int, size: int) -> bytes:
    """A distinct SELECT of ``size`` bytes whose normalised text keeps its length: a long column
    alias, which the audit's redaction keeps (it takes literals and comments out), in one token
    so that parsing it stays cheap."""
    head = f'SELECT {number} AS "'.encode()
    return head + b"x" * (size - len(head) - 1) + b'"'


def test_long_texts_are_keyed_by_a_digest_no_text_can_equal() -> None:
    short = b"SELECT 1"
    assert statement_key(short) is short
    long = padded(1, DIGEST_KEYS_ABOVE + 1)
    key = statement_key(long)
    assert key == hashlib.blake2b(long, digest_size=16).hexdigest()
    # A client sending a digest (its bytes, or its hex) as a statement cannot take the long text's
    # cache entry: a text's key is bytes, a digest key is a str, and the two never compare equal.
    policies = PolicyEngine({"cashier": CASHIER})
    for poison in (bytes.fromhex(str(key)), b"\x00" + bytes.fromhex(str(key)), str(key).encode()):
        assert statement_key(poison) != key
        assert not policies.decide("cashier", poison).allowed
    assert policies.decide("cashier", long).allowed


def test_decision_cache_is_bounded_in_bytes() -> None:
    budget = 2 * 2**20
    policies = PolicyEngine({"cashier": CASHIER}, cache_size=10_000, cache_bytes=budget)
    for number in range(200):  # 200 x 50 KB of normalised text: 10 MB held without the bound
        assert policies.decide("cashier", padded(number, 50_000)).allowed
    assert policies._cache.held_bytes <= budget
    assert 20 <= len(policies._cache) <= budget // 50_000
    # Short statements still fill the cache by number of entries.
    for number in range(100):
        policies.decide("cashier", b"SELECT %d" % number)
    assert policies.decide("cashier", b"SELECT 99") is policies.decide("cashier", b"SELECT 99")


def test_an_entry_larger_than_the_whole_budget_is_not_kept() -> None:
    policies = PolicyEngine({"cashier": CASHIER}, cache_bytes=10_000, max_statement_bytes=2**20)
    policies.decide("cashier", b"SELECT 1")
    policies.decide("cashier", padded(1, 20_000))
    assert len(policies._cache) == 1 and policies._cache.held_bytes <= 10_000


def test_summaries_are_bounded_in_bytes_and_long_texts_are_not_parsed() -> None:
    summaries = StatementSummaries(cache_bytes=64 * 1024, parse_up_to=4096)
    for number in range(100):
        summaries.summarize(padded(number, 4000))
    assert summaries._cache.held_bytes <= 64 * 1024
    long = padded(1, 5000)
    [(fingerprint, text)] = summaries.summarize(long)
    assert fingerprint == "" and text == not_parsed(long)
    assert "5000 bytes" in text and "xxxx" not in text


def test_classifier_cache_is_bounded_in_bytes() -> None:
    classifier = SessionStateClassifier(max_bytes=64 * 1024)
    for number in range(300):
        sql = b"SET enable_seqscan = %d" % number + b" " * 1000 if number % 2 else b"SELECT %d" % number
        assert classifier.classify(sql, "UTF8").effect is (
            Effect.SESSION_STATE if number % 2 else Effect.NONE
        )
        assert classifier.held_bytes <= 64 * 1024
    long = padded(1, 10 * 1024)
    classifier.classify(long, "UTF8")
    assert classifier.cached(long, "UTF8") is not None
    assert classifier.held_bytes <= 64 * 1024


def test_statement_over_the_size_limit_is_refused_unparsed_for_roles_with_a_policy() -> None:
    policies = PolicyEngine({"cashier": CASHIER, "kiosk": None}, max_statement_bytes=4096)
    over = padded(1, 4097)
    decision = policies.decide("cashier", over)
    assert (decision.allowed, decision.sqlstate) == (False, PROGRAM_LIMIT_EXCEEDED)
    assert "4096 bytes" in decision.message
    assert policies.cached("cashier", over) is decision
    assert policies.decide("cashier", padded(1, 4096)).allowed
    assert policies.decide("kiosk", over).allowed  # no policy: not limited here
    assert policies.misses == 1  # only the one at the limit was parsed


def test_a_decision_from_a_worker_analysis_equals_one_made_here() -> None:
    texts = [
        b"SELECT name FROM products WHERE sku = $1",
        b"DELETE FROM sales",
        b"SELECT pg_sleep(1)",
        b"SELEC 1",
        b"SELECT '\xff'",
        b"SELECT 1; SELECT 2",
    ]
    here, there = PolicyEngine({"cashier": CASHIER}), PolicyEngine({"cashier": CASHIER})
    for sql in texts:
        analysis = analyze_text(AnalysisRequest(sql, "UTF8", CASHIER.search_path))
        decided = there.decide_analyzed("cashier", sql, analysis.statements, readable=analysis.readable)
        assert decided == here.decide("cashier", sql), sql
        try:
            expected = classify(sql.decode("utf-8"))
        except UnicodeDecodeError:
            expected = NOT_READABLE  # what the proxy cannot read keeps the server connection
        assert analysis.classification == expected


def test_client_prepared_statements_are_limited_in_number_and_bytes() -> None:
    statements = ClientStatements(StatementStats(), max_count=3, max_bytes=1000)
    server = ServerState(ServerStatements(100))

    def parse(name: bytes, size: int) -> bytes:
        body = b"SELECT 1 " + b" " * (size - 12) + b"\x00\x00\x00"
        return m.build_message(b"P", name + b"\x00" + body)

    for name in (b"a", b"b", b"c"):
        assert statements.over_limit(name, 200) is None
        message = parse(name, 200)
        statements.rewrite(message, m.scan_frames(message, 2**20)[0], server)
    assert statements.held_bytes == 600
    refusal = statements.over_limit(b"d", 10)
    assert refusal is not None and refusal.sqlstate == "53400" and "3 statements" in refusal.message
    assert statements.over_limit(b"a", 600) is None  # replacing one: same count, 1000 bytes
    assert statements.over_limit(b"a", 601) is not None  # 1001 bytes
    close = m.build_message(b"C", b"Sb\x00")
    statements.rewrite(close, m.scan_frames(close, 2**20)[0], server)
    assert statements.held_bytes == 400 and statements.over_limit(b"d", 10) is None


def test_analysis_pool_answers_and_fails_closed() -> None:
    async def run() -> None:
        pool = AnalysisPool(workers=1, timeout=0.5)
        try:
            [quick] = await pool.analyze([AnalysisRequest(padded(1, 20_000), "UTF8", ("public",))])
            assert quick.statements is not None and quick.statements[0].kind == "SELECT"
            # Slow to analyse (~1.4 s: pglast builds and walks every node): killed at the budget.
            chain = b"(SELECT " * 400 + b"1" + b")" * 400
            slow = b"SELECT " + b" + ".join([chain] * 16)
            with pytest.raises(AnalysisFailed, match="no answer within"):
                await pool.analyze([AnalysisRequest(slow, "UTF8", ("public",))])
            # Deep enough to overflow the C stack while pglast builds the tree: the worker dies.
            deep = b"SELECT 1" + b"+1" * 40_000
            with pytest.raises(AnalysisFailed):
                await pool.analyze([AnalysisRequest(deep, "UTF8", ("public",))])
            setting = b"SET enable_seqscan = 1 /*" + b"x" * 2000 + b"*/"
            [again] = await pool.analyze([AnalysisRequest(setting, "UTF8", None)])
            assert again.statements == () and again.classification.effect is Effect.SESSION_STATE
        finally:
            await pool.close()

    asyncio.run(run())


def test_texts_over_the_parse_bound_are_only_scanned() -> None:
    """A role without a policy has no size limit: its longest texts are never parsed, and count as
    leaving session state unless a plain scan shows they cannot."""
    harmless = b"SELECT 1 WHERE 'x' <> '" + b"x" * 5000 + b"'"
    scanned = analyze_text(AnalysisRequest(harmless, "UTF8", None, parse_up_to=4096))
    assert scanned.classification.effect is Effect.NONE
    commented = b"SELECT 1 /*" + b"x" * 5000 + b"*/"
    assert (
        analyze_text(AnalysisRequest(commented, "UTF8", None, parse_up_to=4096)).classification
        == NOT_ANALYSED
    )
    assert analyze_text(AnalysisRequest(commented, "UTF8", None)).classification.effect is Effect.NONE
