"""The result-size guard on the reply stream, without sockets."""

from __future__ import annotations

from proxy.limits import Limiter, LimitHit, LimitSettings
from proxy.protocols.postgres import messages as m
from proxy.protocols.postgres.results import ResultWatch

ROW = m.build_message(b"D", b"\x00\x01\x00\x00\x00\x01x")
DONE = m.build_message(b"C", b"SELECT 3\x00")
READY = m.build_ready_for_query(b"I")


def _watch(limits: LimitSettings) -> tuple[ResultWatch, list[LimitHit]]:
    limiter, hits = Limiter(), []
    watch = ResultWatch(lambda: limiter.result_guard("s", "t", limits), hits.append, lambda: None)
    return watch, hits


def _kinds(data: bytes | bytearray) -> str:
    frames, _ = m.scan_frames(data, 1 << 20)
    return "".join(chr(kind) for kind, _start, _end in frames)


def _feed(watch: ResultWatch, data: bytes) -> bytes | bytearray:
    frames, _ = m.scan_frames(data, 1 << 20)
    out, kept = watch.apply(data, frames)
    assert [end - start for _kind, start, end in kept] == [
        end - start for _k, start, end in m.scan_frames(out, 1 << 20)[0]
    ]
    return out


def test_results_within_limits_pass_unchanged() -> None:
    watch, hits = _watch(LimitSettings(max_rows_per_statement=3))
    data = ROW * 3 + DONE + READY
    assert _feed(watch, data) is data
    assert hits == []


def test_rows_over_the_limit_are_dropped_and_the_statement_ends_in_53400() -> None:
    watch, hits = _watch(LimitSettings(max_rows_per_statement=2))
    out = _feed(watch, ROW * 5 + DONE + READY)
    assert _kinds(out) == "DDEZ"
    frames, _ = m.scan_frames(out, 1 << 20)
    error = m.parse_error_fields(m.frame_payload(out, frames[2]))
    assert error["C"] == "53400"
    assert len(hits) == 1 and hits[0].limit == "rows per statement"


def test_the_cut_spans_reads_and_the_next_statement_is_counted_afresh() -> None:
    watch, hits = _watch(LimitSettings(max_rows_per_statement=2))
    assert _kinds(_feed(watch, ROW * 3)) == "DD"
    assert _kinds(_feed(watch, ROW * 4)) == ""
    # The server's answer to the cancel becomes the proxy's error, once.
    cancelled = m.build_error_response("ERROR", "57014", "canceling statement due to user request")
    assert _kinds(_feed(watch, cancelled + READY)) == "EZ"
    assert _kinds(_feed(watch, ROW * 2 + DONE + READY)) == "DDCZ"
    assert len(hits) == 1


# --- counting per portal and per cursor: requests as the server receives them, then its replies ---

SUSPENDED = m.build_message(b"s", b"")
BIND_COMPLETE = m.build_message(b"2", b"")
SYNC = m.build_message(b"S", b"")
FAILED = m.build_error_response("ERROR", "42P03", 'cursor "a" already exists')


def _bind(portal: bytes, statement: bytes = b"") -> bytes:
    return m.build_message(b"B", portal + b"\x00" + statement + b"\x00\x00\x00\x00\x00\x00\x00")


def _execute(portal: bytes, max_rows: int = 0) -> bytes:
    return m.build_message(b"E", portal + b"\x00" + max_rows.to_bytes(4, "big"))


def _send(watch: ResultWatch, data: bytes) -> None:
    frames, _ = m.scan_frames(data, 1 << 20)
    watch.sent(data, data, frames)


def test_a_portal_is_one_result_across_executes_and_other_portals_in_between() -> None:
    watch, hits = _watch(LimitSettings(max_rows_per_statement=4))
    _send(watch, _bind(b"a") + _bind(b"b") + SYNC)
    assert _kinds(_feed(watch, BIND_COMPLETE * 2 + READY)) == "22Z"
    for _ in range(2):
        # Portal a, three rows at a time, with portal b run to its end in between.
        _send(watch, _execute(b"a", 3) + _execute(b"b") + SYNC)
        replies = _feed(watch, ROW * 3 + SUSPENDED + ROW + DONE + READY)
        if not hits:
            assert _kinds(replies) == "DDDsDCZ"
    # The second round of a crossed its limit after one row: the rest cut, its suspension an error.
    assert _kinds(replies) == "DEDCZ"
    assert len(hits) == 1


def test_a_failed_bind_does_not_give_a_live_portal_a_new_count() -> None:
    watch, hits = _watch(LimitSettings(max_rows_per_statement=2))
    _send(watch, _bind(b"a") + _execute(b"a", 2) + SYNC)
    assert _kinds(_feed(watch, BIND_COMPLETE + ROW * 2 + SUSPENDED + READY)) == "2DDsZ"
    # Binding a again fails (the portal exists): the server skips to Sync, and a keeps its count.
    _send(watch, _bind(b"a") + _execute(b"a", 2) + SYNC)
    assert _kinds(_feed(watch, FAILED + READY)) == "EZ"
    _send(watch, _execute(b"a", 2) + SYNC)
    assert _kinds(_feed(watch, ROW * 2 + SUSPENDED + READY)) == "EZ"
    assert len(hits) == 1


def test_fetch_from_a_sql_cursor_counts_per_cursor_until_it_is_declared_again() -> None:
    watch, hits = _watch(LimitSettings(max_rows_per_statement=3))
    fetch = m.build_query("FETCH 2 FROM c")
    fetched = m.build_message(b"C", b"FETCH 2\x00")
    _send(watch, fetch)
    assert _kinds(_feed(watch, ROW * 2 + fetched + READY)) == "DDCZ"
    _send(watch, fetch)
    assert _kinds(_feed(watch, ROW * 2 + fetched + READY)) == "DEZ"
    assert len(hits) == 1
    _send(watch, m.build_query("CLOSE c; DECLARE c CURSOR WITH HOLD FOR SELECT 1"))
    closed = m.build_message(b"C", b"CLOSE CURSOR\x00")
    _feed(watch, closed + m.build_message(b"C", b"DECLARE CURSOR\x00") + READY)
    _send(watch, fetch)
    assert _kinds(_feed(watch, ROW * 2 + fetched + READY)) == "DDCZ"


def test_copy_data_counts_as_rows_and_copy_done_is_cut_with_them() -> None:
    watch, hits = _watch(LimitSettings(max_rows_per_statement=2))
    _send(watch, m.build_query("COPY t TO STDOUT"))
    copy_out = m.build_message(b"H", b"\x00\x00\x01\x00\x00")
    line = m.build_message(b"d", b"1\tx\n")
    copied = m.build_message(b"C", b"COPY 5\x00")
    out = _feed(watch, copy_out + line * 5 + m.build_message(b"c", b"") + copied + READY)
    assert _kinds(out) == "HddEZ"
    assert len(hits) == 1


def test_the_server_is_cancelled_only_while_it_still_sends_the_cut_result() -> None:
    limiter, cancels = Limiter(), []
    limits = LimitSettings(max_rows_per_statement=2)
    watch = ResultWatch(
        lambda: limiter.result_guard("s", "t", limits), lambda _hit: None, lambda: cancels.append(1)
    )
    # The whole cut result in one batch: the server is done with it, a cancel could only hit what comes next.
    _send(watch, _bind(b"a") + _execute(b"a", 3) + SYNC)
    assert _kinds(_feed(watch, BIND_COMPLETE + ROW * 3 + SUSPENDED + READY)) == "2DDEZ"
    assert cancels == []
    # A result still streaming when the batch ends: cancelled, once.
    _send(watch, m.build_query("SELECT 1"))
    assert _kinds(_feed(watch, ROW * 3)) == "DD"
    assert _kinds(_feed(watch, ROW * 3)) == ""
    assert cancels == [1]
    assert _kinds(_feed(watch, DONE + READY)) == "EZ"
    assert cancels == [1]


def test_a_sql_cursor_executed_by_name_shares_the_count_of_its_fetches() -> None:
    watch, hits = _watch(LimitSettings(max_rows_per_statement=3))
    _send(watch, m.build_query("DECLARE c CURSOR WITH HOLD FOR SELECT 1; FETCH 2 FROM c"))
    declared = m.build_message(b"C", b"DECLARE CURSOR\x00")
    assert _kinds(_feed(watch, declared + ROW * 2 + m.build_message(b"C", b"FETCH 2\x00") + READY)) == "CDDCZ"
    # The cursor is a portal: Execute names it without a Bind.
    _send(watch, _execute(b"c", 2) + SYNC)
    assert _kinds(_feed(watch, ROW * 2 + SUSPENDED + READY)) == "DEZ"
    assert len(hits) == 1
