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
    watch = ResultWatch(lambda: limiter.result_guard("s", "t", limits), hits.append)
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
