"""Seeded mutations of recorded PostgreSQL frontend streams (sans-IO: bytes in, bytes out).

A stream is what a driver wrote after the TLS handshake: the startup packet (a length word and no
type byte, 55.7 "StartupMessage") and then typed messages (55.7). ``split_stream`` cuts it into
frames; each mutation works on frames where it needs the structure (a length field, a Bind's
counts, a statement's text) and on the raw bytes otherwise. Every choice comes from one
``random.Random`` seeded by the case's seed, so a seed names a case for good.
"""

from __future__ import annotations

import random
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from proxy.protocols.postgres import messages as m

# The startup packet has no type byte: ``kind`` is None for it.
Frame = tuple[bytes | None, bytes]

# Length words that frame parsers get wrong: zero, below the minimum, negative, the largest int32,
# just over a typical max_message_size, and the sign bit alone.
HOSTILE_LENGTHS = (0, 1, 3, 4, 0xFFFFFFFF, 0x7FFFFFFF, 0x80000000, 16 * 2**20 + 1, 2**20 + 1, 10001)
# Bytes that are not UTF-8 (nor valid in most server encodings): a lone continuation byte, an
# overlong NUL, a surrogate, a truncated 3-byte sequence, bytes never valid in UTF-8, and a NUL.
BAD_TEXT = (b"\x80", b"\xc0\x80", b"\xed\xa0\x80", b"\xe2\x82", b"\xff\xfe", b"\xf8\x88\x80\x80\x80", b"\x00")
# Startup parameters that change how the server reads what follows, or ask for what the proxy refuses.
STARTUP_PARAMETERS = (
    ("client_encoding", "SQL_ASCII"),
    ("client_encoding", "SJIS"),
    ("client_encoding", "BIG5"),
    ("client_encoding", "GB18030"),
    ("client_encoding", "no-such-encoding"),
    ("options", "-c search_path=evil"),
    ("options", "-c statement_timeout=1"),
    ("replication", "database"),
    ("database", "no_such_route"),
    ("user", ""),
    ("_pq_.protocol_extension", "1"),
    ("application_name", "x" * 300),
)


class StreamError(ValueError):
    """The recorded bytes are not a frontend stream (the recording went wrong, not the proxy)."""


def split_stream(stream: bytes) -> list[Frame]:
    """The startup packet and the typed messages of a recorded stream, in order."""
    length = m.startup_packet_length(stream)
    if length is None or length > len(stream):
        raise StreamError("no whole startup packet at the start of the stream")
    frames: list[Frame] = [(None, stream[4:length])]
    position = length
    while position < len(stream):
        if len(stream) - position < 5:
            raise StreamError(f"a partial message header at offset {position}")
        (size,) = struct.unpack_from("!I", stream, position + 1)
        end = position + 1 + size
        if size < 4 or end > len(stream):
            raise StreamError(f"a bad message length {size} at offset {position}")
        frames.append((stream[position : position + 1], stream[position + 5 : end]))
        position = end
    return frames


def join_frames(frames: Sequence[Frame]) -> bytes:
    out = bytearray()
    for kind, body in frames:
        if kind is None:
            out += struct.pack("!I", len(body) + 4) + body
        else:
            out += kind + struct.pack("!I", len(body) + 4) + body
    return bytes(out)


def with_database(stream: bytes, database: str) -> bytes:
    """The same stream, its startup packet asking for ``database`` (another route)."""
    frames = split_stream(stream)
    startup = m.parse_startup_packet(join_frames(frames[:1]))
    assert isinstance(startup, m.StartupMessage)
    rebuilt = m.build_startup_message({**startup.parameters, "database": database})
    return rebuilt + join_frames(frames[1:])


def without_terminate(stream: bytes) -> bytes:
    """The stream without the Terminate a driver ends its session with."""
    frames = split_stream(stream)
    return join_frames(frames[:-1]) if frames[-1][0] == b"X" else stream


@dataclass(frozen=True, slots=True)
class Mutated:
    """One fuzz case's bytes and the names of the mutations that made them (for the report)."""

    data: bytes
    steps: tuple[str, ...]


Mutation = Callable[[random.Random, list[Frame]], tuple[list[Frame] | bytes, str]]


def _typed(frames: list[Frame]) -> list[int]:
    return [index for index, (kind, _body) in enumerate(frames) if kind is not None]


def _pick(rng: random.Random, frames: list[Frame], kinds: bytes | None = None) -> int | None:
    candidates = [
        index for index in _typed(frames) if kinds is None or (frames[index][0] or b"?")[0] in kinds
    ]
    return rng.choice(candidates) if candidates else None


def bit_flips(rng: random.Random, frames: list[Frame]) -> tuple[bytes, str]:
    return flip_bits(rng, join_frames(frames))


def flip_bits(rng: random.Random, data: bytes) -> tuple[bytes, str]:
    if not data:
        return data, "bit_flips(empty)"
    flipped = bytearray(data)
    count = rng.randint(1, 8)
    for _ in range(count):
        flipped[rng.randrange(len(flipped))] ^= 1 << rng.randrange(8)
    return bytes(flipped), f"bit_flips({count})"


def truncate(rng: random.Random, frames: list[Frame]) -> tuple[bytes, str]:
    data = join_frames(frames)
    cut = rng.randrange(len(data))
    return data[:cut], f"truncate({cut}/{len(data)})"


def corrupt_length(rng: random.Random, frames: list[Frame]) -> tuple[bytes, str]:
    """One message's length word (or the startup packet's) set to a hostile or off-by-a-few value."""
    index = rng.randrange(len(frames))
    kind, body = frames[index]
    true_length = len(body) + 4
    length = rng.choice([*HOSTILE_LENGTHS, true_length + 1, true_length - 1, rng.getrandbits(32)])
    length &= 0xFFFFFFFF
    head = join_frames(frames[:index])
    tail = join_frames(frames[index + 1 :])
    return head + (kind or b"") + struct.pack("!I", length) + body + tail, f"length({index}={length:#x})"


def swap_type(rng: random.Random, frames: list[Frame]) -> tuple[list[Frame], str]:
    index = _pick(rng, frames)
    if index is None:
        return frames, "swap_type(none)"
    new = bytes([rng.choice([*m.FRONTEND_TYPES, *b"!ZTNK\x00\xff"])])
    frames = list(frames)
    frames[index] = (new, frames[index][1])
    return frames, f"swap_type({index}->{new!r})"


def duplicate(rng: random.Random, frames: list[Frame]) -> tuple[list[Frame], str]:
    start = rng.randrange(len(frames))
    end = min(len(frames), start + rng.randint(1, 4))
    times = rng.choice((1, 2, 50))
    frames = list(frames)
    frames[end:end] = frames[start:end] * times
    return frames, f"duplicate({start}:{end}x{times})"


def reorder(rng: random.Random, frames: list[Frame]) -> tuple[list[Frame], str]:
    if len(frames) < 3:
        return frames, "reorder(none)"
    first, second = rng.sample(range(len(frames)), 2)
    frames = list(frames)
    frames[first], frames[second] = frames[second], frames[first]
    return frames, f"reorder({first}<->{second})"


def drop(rng: random.Random, frames: list[Frame]) -> tuple[list[Frame], str]:
    index = _pick(rng, frames)
    if index is None:
        return frames, "drop(none)"
    return frames[:index] + frames[index + 1 :], f"drop({index})"


def huge_bind_counts(rng: random.Random, frames: list[Frame]) -> tuple[list[Frame], str]:
    """A Bind (55.7 "Bind") whose format-code, parameter or result-format count, or a parameter's
    length, is far larger than the message (or negative), the rest of the message left as it was."""
    index = _pick(rng, frames, b"B")
    if index is None:
        # No Bind recorded: make one for the unnamed statement.
        index = len(frames)
        frames = [*frames, (b"B", b"\x00\x00" + struct.pack("!hh", 0, 0) + struct.pack("!h", 0))]
    body = frames[index][1]
    portal_end = body.find(b"\x00") + 1
    statement_end = body.find(b"\x00", portal_end) + 1 if portal_end else 0
    if not statement_end:
        return frames, f"huge_bind({index}:not a Bind any more)"  # an earlier mutation made it one
    huge = rng.choice((0x7FFF, -1, -32768, 0x7FFE))
    where = rng.choice(("formats", "parameters", "parameter_length", "results"))
    rest = body[statement_end:]
    if where == "formats":
        rest = struct.pack("!h", huge) + rest[2:]
    elif where == "parameters":
        (formats,) = struct.unpack_from("!h", rest) if len(rest) >= 2 else (0,)
        at = 2 + 2 * max(formats, 0)
        rest = rest[:at] + struct.pack("!h", huge) + rest[at + 2 :]
    elif where == "parameter_length":
        rest = rest + struct.pack("!i", rng.choice((0x7FFFFFFF, -2, 2**24)))
    else:
        rest = rest[:-2] + struct.pack("!h", huge) if len(rest) >= 2 else struct.pack("!h", huge)
    frames = list(frames)
    frames[index] = (b"B", body[:statement_end] + rest)
    return frames, f"huge_bind({index}:{where}={huge})"


def bad_text(rng: random.Random, frames: list[Frame]) -> tuple[list[Frame], str]:
    """Invalid UTF-8 (or a NUL, or no terminating NUL) inside a Query's or Parse's SQL text."""
    index = _pick(rng, frames, b"QP")
    if index is None:
        return frames, "bad_text(none)"
    kind, body = frames[index]
    start = body.find(b"\x00") + 1 if kind == b"P" else 0
    end = body.find(b"\x00", start)
    if end < 0:  # an earlier mutation took the terminator away
        end = len(body)
    at = rng.randint(start, end)
    junk = rng.choice(BAD_TEXT) * rng.choice((1, 1, 3))
    if rng.random() < 0.15:
        body = body[:end] + body[end + 1 :]  # the text's terminating NUL gone (if it was there)
        step = "unterminated"
    else:
        body = body[:at] + junk + body[at:]
        step = f"junk {junk!r}@{at}"
    frames = list(frames)
    frames[index] = (kind, body)
    return frames, f"bad_text({index}:{step})"


def startup_parameter(rng: random.Random, frames: list[Frame]) -> tuple[list[Frame], str]:
    """The startup packet with one parameter set, replaced or made malformed."""
    name, value = rng.choice(STARTUP_PARAMETERS)
    body = frames[0][1]
    protocol, pairs = body[:4], body[4:]
    if rng.random() < 0.2:
        protocol = struct.pack("!I", rng.choice((0x00020000, 0x00030001, 0x00040000, 0x04D2162F)))
    added = name.encode() + b"\x00" + value.encode() + b"\x00"
    body = protocol + added + pairs
    return [(None, body), *frames[1:]], f"startup({name}={value[:20]!r})"


def splice(rng: random.Random, frames: list[Frame]) -> tuple[list[Frame], str]:
    """A message of a random type with a random body put in somewhere after startup."""
    kind = bytes([rng.choice([*m.FRONTEND_TYPES, rng.randrange(256)])])
    body = rng.randbytes(rng.choice((0, 1, 4, 17, 300)))
    at = rng.randint(1, len(frames))
    frames = list(frames)
    frames.insert(at, (kind, body))
    return frames, f"splice({at}:{kind!r}+{len(body)})"


def graft(rng: random.Random, frames: list[Frame], donor: Sequence[Frame]) -> tuple[list[Frame], str]:
    """A run of messages from another driver's recording put in somewhere: well-formed messages out
    of their context (a Bind of a statement never parsed, CopyData outside COPY, an Execute of a
    portal of another session), which reach the statement and portal bookkeeping, not the framing."""
    typed = [frame for frame in donor if frame[0] is not None]
    if not typed:
        return frames, "graft(none)"
    start = rng.randrange(len(typed))
    run = typed[start : start + rng.randint(1, 6)]
    at = rng.randint(1, len(frames))
    return [*frames[:at], *run, *frames[at:]], f"graft({len(run)}@{at}:{[k for k, _ in run]})"


MUTATIONS: tuple[Mutation, ...] = (
    bit_flips,
    truncate,
    corrupt_length,
    swap_type,
    duplicate,
    reorder,
    drop,
    huge_bind_counts,
    bad_text,
    startup_parameter,
    splice,
)


def mutate(
    stream: bytes, rng: random.Random, *, rounds: int | None = None, donor: bytes | None = None
) -> Mutated:
    """1-3 mutations of ``stream``, stacked; once a mutation leaves raw bytes (no longer frames),
    only byte-level ones follow. With a ``donor`` recording, grafts of its messages join in."""
    frames: list[Frame] | None = split_stream(stream)
    donor_frames = split_stream(donor) if donor is not None else []
    data = stream
    steps: list[str] = []
    for _ in range(rounds if rounds is not None else rng.choice((1, 1, 2, 3))):
        if frames is None:
            data, step = flip_bits(rng, data)
            steps.append(step)
            continue
        result: list[Frame] | bytes
        if donor_frames and rng.random() < 0.15:
            result, step = graft(rng, frames, donor_frames)
        else:
            result, step = rng.choice(MUTATIONS)(rng, frames)
        steps.append(step)
        if isinstance(result, bytes):
            frames, data = None, result
        else:
            frames = result
    return Mutated(join_frames(frames) if frames is not None else data, tuple(steps))


def write_sizes(rng: random.Random, total: int) -> list[int]:
    """How to cut ``total`` bytes into writes: all at once, random chunks, or (the first KiB) one
    byte per write, so the proxy sees every split point of a header."""
    style = rng.choice(("whole", "chunks", "chunks", "bytes"))
    if style == "whole" or total == 0:
        return [total] if total else []
    sizes: list[int] = []
    left = total
    if style == "bytes":
        ones = min(left, 1024)
        sizes += [1] * ones
        left -= ones
    while left > 0:
        size = min(left, rng.randint(1, 700))
        sizes.append(size)
        left -= size
    return sizes
