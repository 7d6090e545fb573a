"""Fuzz cases: what one connection to the proxy sends, derived from a seed and the recordings alone.

A case is either a session (an SSLRequest or direct TLS, a TLS handshake with a terminal
certificate, then a mutated recording) or a pre-authentication case (mutated plaintext before TLS:
SSLRequest, GSSENCRequest, CancelRequest, a plaintext startup packet, a PROXY header from the
trusted balancer or from anyone, TLS-looking garbage), which goes on into TLS and a recording when
the proxy answers "S". ``build_case(base_seed, index, ...)`` always builds the same case.
"""

from __future__ import annotations

import random
import struct
from collections.abc import Sequence
from dataclasses import dataclass

from proxy.errors import ProtocolViolation
from proxy.protocols.postgres import messages as m
from tests import proxyheaders
from tests.fuzz.capture import Capture
from tests.fuzz.mutate import (
    StreamError,
    flip_bits,
    mutate,
    split_stream,
    with_database,
    without_terminate,
    write_sizes,
)

# The fuzz proxy trusts this loopback address as its load balancer (it must send a PROXY header).
BALANCER = "127.0.0.2"
TERMINAL_HOST = "127.0.0.1"
ROUTES = ("pos", "pos_tx")  # session pooling, transaction pooling


@dataclass(frozen=True, slots=True)
class Case:
    seed: str
    kind: str
    route: str
    local_host: str
    preamble: bytes  # plaintext before TLS (empty: SSLRequest, unmutated)
    tls: str  # "request": expect b"S" to the preamble/SSLRequest then TLS; "direct"; "none"
    stream: bytes  # written inside TLS
    writes: tuple[int, ...]  # sizes of the writes of ``stream``
    steps: tuple[str, ...]
    abort: bool  # end with a reset instead of a close
    # The stream is whole messages and no Terminate: whatever state it left the session in, a
    # Sync and a Query after it must be answered (or the session closed) in bounded time.
    probe: bool = False
    # After the session's startup answer: a CancelRequest with its key ("plain", "tls"), or with
    # the key one bit off ("plain-wrong", "tls-wrong").
    cancel: str = ""

    def describe(self, limit: int = 600) -> str:
        shown = self.stream[:limit].hex()
        more = f" (+{len(self.stream) - limit} bytes)" if len(self.stream) > limit else ""
        return (
            f"case {self.seed} [{self.kind}] route={self.route} from {self.local_host} tls={self.tls} "
            f"steps={list(self.steps)} writes={len(self.writes)} abort={self.abort} "
            f"probe={self.probe} cancel={self.cancel or None}\n"
            f"  preamble={self.preamble.hex()}\n  stream={shown}{more}"
        )


def _mutated_preamble(rng: random.Random, packet: bytes, steps: list[str]) -> bytes:
    """``packet`` as it is (most of the time), bit-flipped, cut short, or with a hostile length word."""
    roll = rng.random()
    if roll < 0.4:
        return packet
    if roll < 0.7:
        flipped, step = flip_bits(rng, packet)
        steps.append(f"preamble {step}")
        return flipped
    if roll < 0.85:
        cut = rng.randrange(len(packet))
        steps.append(f"preamble truncate({cut})")
        return packet[:cut]
    length = rng.choice((0, 4, 7, 9, 10001, 0xFFFFFFFF, len(packet) + 8))
    steps.append(f"preamble length({length:#x})")
    return struct.pack("!I", length) + packet[4:]


def _preauth(rng: random.Random, seed: str, capture: Capture, route: str, steps: list[str]) -> Case:
    kind = rng.choice(
        ("ssl_request", "gssenc", "cancel", "plaintext_startup", "proxy_v1", "proxy_v2", "proxy_untrusted",
         "tls_garbage", "random")
    )  # fmt: skip
    stream = with_database(capture.stream, route)
    local_host = TERMINAL_HOST
    tls = "request"
    if kind == "ssl_request":
        preamble = _mutated_preamble(rng, m.build_ssl_request(), steps)
    elif kind == "gssenc":
        gssenc = struct.pack("!ii", 8, m.GSSENC_REQUEST_CODE)
        preamble = _mutated_preamble(rng, gssenc * rng.choice((1, 1, 2)), steps) + m.build_ssl_request()
    elif kind == "cancel":
        cancel = m.build_cancel_request(rng.getrandbits(31), rng.getrandbits(31) - 2**30)
        preamble, tls = _mutated_preamble(rng, cancel, steps), "none"
    elif kind == "plaintext_startup":
        startup_length = m.startup_packet_length(stream) or 0
        preamble, tls = _mutated_preamble(rng, stream[:startup_length], steps), "none"
    elif kind in ("proxy_v1", "proxy_v2", "proxy_untrusted"):
        source = f"203.0.113.{rng.randrange(1, 255)}"
        header = (
            proxyheaders.v1(source, rng.randrange(1, 65536))
            if kind == "proxy_v1" or (kind == "proxy_untrusted" and rng.random() < 0.5)
            else proxyheaders.v2(
                source, rng.randrange(1, 65536), tlvs=proxyheaders.tlv(rng.randrange(256), rng.randbytes(8))
            )
        )
        if rng.random() < 0.6:
            header, step = flip_bits(rng, header)
            steps.append(f"header {step}")
        elif rng.random() < 0.3:
            cut = rng.randrange(len(header))
            header = header[:cut]
            steps.append(f"header truncate({cut})")
        preamble = header + m.build_ssl_request()
        local_host = TERMINAL_HOST if kind == "proxy_untrusted" else BALANCER
    elif kind == "tls_garbage":
        preamble, tls = bytes([m.TLS_HANDSHAKE_RECORD]) + rng.randbytes(rng.choice((4, 60, 600))), "none"
    else:
        preamble, tls = rng.randbytes(rng.choice((1, 7, 8, 16, 300))), "none"
    if kind in ("ssl_request", "gssenc", "proxy_v1", "proxy_v2") and rng.random() < 0.5:
        mutated = mutate(stream, rng)
        stream = mutated.data
        steps.extend(mutated.steps)
    return Case(
        seed=seed,
        kind=f"preauth:{kind}",
        route=route,
        local_host=local_host,
        preamble=preamble,
        tls=tls,
        stream=stream if tls != "none" else b"",
        writes=tuple(write_sizes(rng, len(stream))) if tls != "none" else (),
        steps=tuple(steps),
        abort=rng.random() < 0.3,
    )


def _ends_between_messages(stream: bytes) -> bool:
    try:
        frames = split_stream(stream)
    except (StreamError, ProtocolViolation):
        return False
    return all(kind != b"X" for kind, _body in frames)


def replay_case(capture: Capture, route: str) -> Case:
    """A recording as the driver sent it, on ``route``."""
    stream = with_database(capture.stream, route)
    return Case(
        seed=f"replay:{capture.driver}",
        kind="replay",
        route=route,
        local_host=TERMINAL_HOST,
        preamble=m.build_ssl_request(),
        tls="request",
        stream=stream,
        writes=(len(stream),),
        steps=(f"from {capture.driver}",),
        abort=False,
    )


def build_case(
    base_seed: str, index: int, captures: Sequence[Capture], *, preauth_share: float = 0.3
) -> Case:
    seed = f"{base_seed}:{index}"
    rng = random.Random(seed)
    capture = rng.choice(captures)
    route = rng.choice(ROUTES)
    steps = [f"from {capture.driver}"]
    if rng.random() < preauth_share:
        return _preauth(rng, seed, capture, route, steps)
    stream = with_database(capture.stream, route)
    if rng.random() < 0.8:
        # Without the driver's Terminate the session stays open after the stream: the probe then
        # asks whether the proxy still answers whatever state the stream left it in.
        stream = without_terminate(stream)
    donor = rng.choice(captures).stream
    # A few replays stay whole: the proxy must still serve them, mid-fuzz, as it does any session.
    if rng.random() >= 0.05:
        mutated = mutate(stream, rng, donor=donor)
        stream = mutated.data
        steps.extend(mutated.steps)
    direct = rng.random() < 0.1
    return Case(
        probe=_ends_between_messages(stream),
        cancel=rng.choice(("plain", "tls", "plain-wrong", "tls-wrong")) if rng.random() < 0.1 else "",
        seed=seed,
        kind="session",
        route=route,
        local_host=TERMINAL_HOST,
        preamble=b"" if direct else m.build_ssl_request(),
        tls="direct" if direct else "request",
        stream=stream,
        writes=tuple(write_sizes(rng, len(stream))),
        steps=tuple(steps),
        abort=rng.random() < 0.3,
    )
