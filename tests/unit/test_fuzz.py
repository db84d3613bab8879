"""Fuzzing the wire: random and mutated frames never crash ``decode`` or a live learner, and every one is counted."""

from __future__ import annotations

import time

import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from common import protocol
from tests.helpers import harness_with
from tests.protocol_samples import samples

GOLDEN = {name: [bytes(f) for f in protocol.encode(msg)] for name, msg in samples().items()}
MESSAGE_TYPES = tuple(type(m) for m in samples().values())


def _decodes_or_refuses(frames: list[bytes]) -> None:
    try:
        msg = protocol.decode(frames)
    except protocol.ProtocolError as e:
        assert e.reason  # a named reject counter
    else:
        assert isinstance(msg, MESSAGE_TYPES)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.binary(max_size=64), max_size=6))
def test_random_frames_decode_or_are_refused_by_name(frames):
    _decodes_or_refuses(frames)


@st.composite
def mutated(draw):
    """A valid message of some type with bytes flipped, frames cut, dropped or duplicated."""
    frames = list(GOLDEN[draw(st.sampled_from(sorted(GOLDEN)))])
    for _ in range(draw(st.integers(1, 4))):
        i = draw(st.integers(0, len(frames) - 1))
        frame = bytearray(frames[i])
        kind = draw(st.sampled_from(["flip", "cut", "drop", "dup", "grow"]))
        if kind == "flip" and frame:
            at = draw(st.integers(0, len(frame) - 1))
            frame[at] ^= draw(st.integers(1, 255))
            frames[i] = bytes(frame)
        elif kind == "cut":
            frames[i] = bytes(frame[: draw(st.integers(0, len(frame)))])
        elif kind == "drop" and len(frames) > 1:
            frames.pop(i)
        elif kind == "dup":
            frames.insert(i, bytes(frame))
        elif kind == "grow":
            frames[i] = bytes(frame) + draw(st.binary(min_size=1, max_size=16))
    return frames


@settings(max_examples=500, deadline=None)
@given(mutated())
def test_mutated_messages_decode_or_are_refused_by_name(frames):
    _decodes_or_refuses(frames)


@settings(max_examples=5, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(mutated(), min_size=5, max_size=20))
def test_a_live_learner_counts_every_bad_frame_and_keeps_serving(model_cache, tmp_path, batch):
    """Mutated messages on the experience socket: each is rejected (counted) or reaches the buffer; the learner
    lives on and still admits an actor."""

    def accounted(service) -> int:
        rejected = sum(v for k, v in service.counters.items() if k.startswith("reject/"))
        return rejected + service.buffer.counters["batches/received"]

    with harness_with(model_cache, tmp_path, "transport.buffer_batches=1000") as h:
        pusher = h.ctx.socket(zmq.PUSH)
        pusher.setsockopt(zmq.LINGER, 0)
        pusher.connect(h.endpoints.experience)
        try:
            for frames in batch:
                pusher.send_multipart(frames)
            deadline = time.monotonic() + 20
            while accounted(h.service) < len(batch) and time.monotonic() < deadline:
                h.service.poll(10)
            assert accounted(h.service) == len(batch)
        finally:
            pusher.close()
        worker = h.actor(0)
        h.join(worker)  # still serving
