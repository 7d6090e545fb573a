"""The fuzzer's own codec: recordings split and join losslessly, and a seed always names the same case."""

from __future__ import annotations

import random
import struct

import pytest

from proxy.protocols.postgres import messages as m
from tests.fuzz.capture import Capture
from tests.fuzz.cases import build_case
from tests.fuzz.mutate import MUTATIONS, StreamError, join_frames, mutate, split_stream, with_database

STREAM = (
    m.build_startup_message({"user": "till-01", "database": "pos"})
    + m.build_query("SELECT 1")
    + m.build_message(b"P", b"s1\x00SELECT $1::int\x00\x00\x00")
    + m.build_message(
        b"B", b"\x00s1\x00" + struct.pack("!hh", 0, 1) + struct.pack("!i", 1) + b"7" + b"\x00\x00"
    )
    + m.build_message(b"E", b"\x00\x00\x00\x00\x00")
    + m.build_message(b"S", b"")
    + m.build_terminate()
)


def test_a_recording_splits_into_its_messages_and_joins_back_byte_for_byte() -> None:
    frames = split_stream(STREAM)
    assert [kind for kind, _body in frames] == [None, b"Q", b"P", b"B", b"E", b"S", b"X"]
    assert join_frames(frames) == STREAM


def test_a_recording_cut_inside_a_message_is_not_taken_for_one() -> None:
    with pytest.raises(StreamError):
        split_stream(STREAM[:-2])


def test_the_route_is_changed_in_the_startup_packet_only() -> None:
    moved = with_database(STREAM, "pos_tx")
    startup = m.parse_startup_packet(moved[: m.startup_packet_length(moved)])
    assert isinstance(startup, m.StartupMessage)
    assert startup.parameters == {"user": "till-01", "database": "pos_tx"}
    assert split_stream(moved)[1:] == split_stream(STREAM)[1:]


@pytest.mark.parametrize("mutation", MUTATIONS, ids=lambda mutation: mutation.__name__)
def test_each_mutation_is_reproducible_from_its_seed(mutation: object) -> None:
    for seed in range(50):
        first = mutation(random.Random(seed), split_stream(STREAM))  # type: ignore[operator]
        again = mutation(random.Random(seed), split_stream(STREAM))  # type: ignore[operator]
        assert first == again


def test_a_case_seed_names_the_same_bytes_every_time() -> None:
    captures = [Capture("psql", STREAM), Capture("asyncpg", with_database(STREAM, "pos"))]
    for index in range(200):
        assert build_case("42", index, captures) == build_case("42", index, captures)
    changed = sum(mutate(STREAM, random.Random(seed)).data != STREAM for seed in range(200))
    assert changed > 190  # a mutation that happens to change nothing is rare


def test_stacked_mutations_never_trip_over_each_other() -> None:
    """Each mutation reads what the ones before it left (a Bind turned into a Query, a text without
    its terminator): none may fail on it, or the fuzzer stops instead of the proxy."""
    for seed in range(3000):
        mutate(STREAM, random.Random(seed), rounds=6, donor=STREAM)
