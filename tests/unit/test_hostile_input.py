"""Hostile input at the learner's boundary (issue 15's attack table): each is a counted, logged drop, never a crash,
a stall, or training on the bad data. Real sockets (inproc), a real learner and a real actor on the tiny model."""

from __future__ import annotations

import dataclasses
import logging
import os

import numpy as np
import pytest
import zmq
from mlx.utils import tree_flatten

from common import protocol
from learner.experience import Experience
from tests.helpers import harness_with


def send(h, batch: protocol.ExperienceBatch) -> None:
    h.service.handle_experience([bytes(f) for f in protocol.encode(batch)])


@pytest.fixture
def joined(model_cache, tmp_path):
    """A harness whose actor 0 has joined, and one real batch of its experience."""
    with harness_with(model_cache, tmp_path, "run.max_updates=5") as h:
        worker = h.actor(0)
        h.join(worker)
        yield h, worker, worker.generate_batch()


def tampered(batch: protocol.ExperienceBatch, **changes) -> protocol.ExperienceBatch:
    return dataclasses.replace(batch, **changes)


@pytest.mark.parametrize(
    ("attack", "reason"),
    [
        ("a token id of 2**31 - 1", "reject/bad_tokens"),  # the learner segfaulted (-11)
        ("a token id just past the vocabulary", "reject/bad_tokens"),  # it trained on out-of-bounds reads
        ("a negative token id", "reject/bad_tokens"),
        ("NaN reference log-probs", "reject/bad_logprobs"),  # weights turned NaN and the run stalled
        ("positive reference log-probs", "reject/bad_logprobs"),
    ],
)
def test_bad_sequences_drop_their_group_and_the_rest_is_kept(joined, attack, reason):
    h, _, batch = joined
    vocab = h.service.buffer.limits.vocab_size
    tokens, ref = batch.tokens.copy(), np.full(batch.behaviour_logprobs.shape, -1.0, np.float32)
    first = batch.sequences[0]
    if "2**31" in attack:
        tokens[first.prompt_len] = 2**31 - 1
    elif "past" in attack:
        tokens[0] = vocab
    elif "negative" in attack:
        tokens[1] = -5
    elif "NaN" in attack:
        ref[0] = np.nan
    else:
        ref[0] = 0.5
    send(h, tampered(batch, tokens=tokens, ref_logprobs=ref))
    group = h.cfg.ppo.group_size
    assert h.service.buffer.counters[reason] == group  # the first group only
    assert h.service.buffer.depth == len(batch.sequences) - group


def test_a_sequence_longer_than_the_config_allows_is_dropped(joined):
    """Row 6: one 60,000-token sequence in a small message put the learner out of memory."""
    h, _, batch = joined
    long_prompt = protocol.Sequence_(60_000, 1, 0.5, "stop")
    sequences = (long_prompt, *batch.sequences[1:])
    tokens = np.concatenate([np.ones(60_001, np.int32), batch.tokens[sum(_lens(batch.sequences[:1])) :]])
    behaviour = np.concatenate([[-1.0], batch.behaviour_logprobs[batch.sequences[0].response_len :]])
    send(
        h,
        tampered(batch, sequences=sequences, tokens=tokens, behaviour_logprobs=behaviour.astype(np.float32)),
    )
    assert h.service.buffer.counters["reject/too_long"] == h.cfg.ppo.group_size


def _lens(sequences) -> list[int]:
    return [s.prompt_len + s.response_len for s in sequences]


@pytest.mark.parametrize(
    "changes",
    [
        {"actor_id": 7},  # an actor that never said hello
        {"token": ""},  # actor 0's id without its admission token (PUSH/PULL names no sender)
        {"token": "0" * 32},  # a guessed token
    ],
)
def test_experience_without_an_admission_is_not_trained_on(joined, changes):
    """Row 4: experience from a peer that never said hello was trained on; so was one claiming a live actor's id."""
    h, _, batch = joined
    send(h, tampered(batch, **changes))
    assert h.service.counters["reject/unknown_sender"] == 1 and h.service.buffer.depth == 0
    send(h, batch)
    assert h.service.buffer.depth == len(batch.sequences)


def control_peer(h):
    dealer = h.ctx.socket(zmq.DEALER)
    dealer.connect(h.endpoints.control)
    h.sockets.append(_Closer(dealer))
    return dealer


class _Closer:
    def __init__(self, sock):
        self.sock = sock

    def close(self):
        self.sock.close(linger=0)


def replies(h, dealer, rounds: int = 30) -> list[protocol.Message]:
    out = []
    for _ in range(rounds):
        h.service.poll(5)
        while dealer.poll(0):
            out.append(protocol.decode(dealer.recv_multipart()))
    return out


def test_a_flood_of_bad_frames_is_counted_exactly_and_logged_a_few_times(joined, caplog):
    """Row 14: 10,000 bad frames wrote 10,000 warning lines; each is still counted, the log says so once."""
    h, _, _ = joined
    with caplog.at_level(logging.WARNING, logger="learner.rejections"):
        for _ in range(5000):
            h.service.handle_experience([b"not a message"])
    assert h.service.counters["reject/bad_frames"] == 5000
    lines = [r for r in caplog.records if "rejected a message" in r.getMessage()]
    assert 1 <= len(lines) <= 2


def test_drops_and_rejects_keep_counting_after_a_resume(joined, model_cache, tmp_path):
    """A resumed learner used to count from 0: the drops before the crash vanished from its metrics."""
    h, _, batch = joined
    ref = np.full(batch.behaviour_logprobs.shape, -1.0, np.float32)
    ref[0] = np.nan
    send(h, tampered(batch, ref_logprobs=ref))
    h.service.handle_experience([b"not a message"])
    service, buffer = dict(h.service.counters), dict(h.service.buffer.counters)
    assert service and buffer["reject/bad_logprobs"] == h.cfg.ppo.group_size
    folder = h.service.save_checkpoint()
    with harness_with(model_cache, tmp_path / "resumed") as again:
        again.service.resume(folder)
        assert dict(again.service.counters) == service and dict(again.service.buffer.counters) == buffer


def test_a_refusal_never_tells_the_learners_config_hash(joined):
    """Row 5: the hash read from a Refuse let a stranger say a valid hello."""
    h, _, _ = joined
    dealer = control_peer(h)
    dealer.send_multipart(protocol.encode(protocol.Hello(actor_id=9, config_hash="wrong")))
    refusals = [m for m in replies(h, dealer) if isinstance(m, protocol.Refuse)]
    assert refusals and h.service.config_hash not in refusals[0].reason
    assert "wrong" in refusals[0].reason  # its own hash is named


def test_a_hello_reusing_a_live_actors_id_does_not_kick_it_off(joined):
    """Row 5: the real actor was dropped from the registry; the impostor waits until the id falls quiet."""
    h, worker, batch = joined
    dealer = control_peer(h)
    dealer.send_multipart(protocol.encode(protocol.Hello(actor_id=0, config_hash=h.service.config_hash)))
    dealer.send_multipart(protocol.encode(protocol.WeightsRequest(actor_id=0)))
    answers = replies(h, dealer)
    assert not any(isinstance(m, protocol.Welcome | protocol.Weights) for m in answers)
    assert h.service.counters["reject/duplicate_actor"] == 1
    assert [a.pid for a in h.service.actors.values()] == [os.getpid()]  # the harness's actor, in this process
    send(h, batch)  # the real actor's experience still counts
    assert h.service.buffer.depth == len(batch.sequences)


def test_a_non_finite_update_is_skipped_and_the_weights_are_kept(joined):
    """Row 12: an update with a NaN loss was applied silently (30 updates with null loss, exit 0)."""
    h, _, batch = joined
    learner = h.service.learner
    size = h.cfg.ppo.batch_size
    exp = Experience.from_rows(
        [[1, 5, 6]] * size, [[7, 8]] * size, [np.array([-1.0, -1.0], np.float32)] * size,
        np.full(size, np.nan, np.float32), np.zeros(size, np.int64),
    )  # fmt: skip
    before = {k: np.array(v) for k, v in tree_flatten(learner.container.trainable_parameters())}
    stats = learner.update(exp)
    assert stats["update/skipped_nonfinite"] == 1.0
    for name, value in tree_flatten(learner.container.trainable_parameters()):
        np.testing.assert_array_equal(np.array(value), before[name], err_msg=name)
    exp.scores[:] = np.arange(size, dtype=np.float32) % 2  # good data trains again
    assert learner.update(exp)["update/skipped_nonfinite"] == 0.0


def test_oversized_frames_never_reach_the_learner_and_it_keeps_serving():
    """Row 7: 20 control messages of 200 MB grew a learner 173 MiB -> 3.1 GiB. Every socket that receives now
    caps its frames (ZeroMQ drops the sender's connection first); here 12 frames of 8 MB over tcp."""
    import psutil

    from common.transport import Endpoints, LearnerSockets, free_tcp_ports, zmq_context

    with zmq_context() as ctx:
        endpoints = Endpoints.tcp("127.0.0.1", free_tcp_ports("127.0.0.1", 3))
        learner = LearnerSockets(ctx, endpoints, 2, max_message_bytes=16 << 20)
        rss_before = psutil.Process().memory_info().rss
        flood = ctx.socket(zmq.DEALER)
        flood.connect(endpoints.control)
        big = protocol.encode(protocol.Shutdown("x" * (8 << 20)))
        for _ in range(12):
            flood.send_multipart(big, copy=False)
        pusher = ctx.socket(zmq.PUSH)
        pusher.connect(endpoints.experience)
        pusher.send_multipart([b"y" * (32 << 20)])  # over the experience cap too
        polite = ctx.socket(zmq.DEALER)
        polite.connect(endpoints.control)
        polite.send_multipart(protocol.encode(protocol.Heartbeat("actor", 0)))
        got = []
        for _ in range(200):
            got += [frames for _, _, frames in learner.poll(10)]
            if got:
                break
        assert [protocol.decode(f) for f in got] == [protocol.Heartbeat("actor", 0)]
        growth_mb = (psutil.Process().memory_info().rss - rss_before) / 2**20
        assert growth_mb < 60, growth_mb  # the senders' own buffers aside, nothing was taken in
        for sock in (flood, pusher, polite):
            sock.close(linger=0)
        learner.close()
