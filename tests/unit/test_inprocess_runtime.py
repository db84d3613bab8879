"""The actor/learner runtime in one process over real ZeroMQ sockets: one-process mode, joins, refusals,
back-pressure, bad input, stale batches, reference log-probs, grants (links and snapshots: test_inprocess_links.py)."""

import json
import math

import pytest
import zmq

from actors.actor import ActorStopped
from actors.tasks import get_task
from common import protocol
from common.transport import ActorSockets, Endpoints, LearnerSockets, zmq_context
from launcher.one_process import run_one_process
from tests.helpers import (
    REQUIRED_KEYS,
    harness_with,
    small_config,
    until_granted,
)


def test_one_process_end_to_end(model_cache, tmp_path):
    cfg = small_config(model_cache, tmp_path, "run.max_updates=3")
    history = run_one_process(cfg, num_actors=2, timeout_s=300)
    assert [m["policy_version"] for m in history] == [1, 2, 3]
    assert set(history[-1]) >= REQUIRED_KEYS
    assert history[-1]["sync/bytes"] > 0 and history[-1]["actors/connected"] == 2
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [1, 2, 3]
    assert (tmp_path / "adapters" / "adapters.safetensors").exists()  # final checkpoint refreshed adapters/


def test_actors_can_decode_a_few_rows_at_a_time(model_cache, tmp_path):
    cfg = small_config(model_cache, tmp_path, "run.max_updates=2", "sampling.max_rows=3")
    history = run_one_process(cfg, num_actors=1, timeout_s=300)
    assert [m["policy_version"] for m in history] == [1, 2]
    assert history[-1]["rollout/response_len_mean"] > 0


def test_mismatched_config_is_refused_with_a_reason(harness, model_cache, tmp_path):
    other = small_config(model_cache, tmp_path, "run.max_updates=10", "sampling.temperature=0.5")
    worker = harness.actor(0, other)
    with pytest.raises(ActorStopped) as stop:
        harness.join(worker)
    assert stop.value.refused and "config" in str(stop.value)
    assert harness.service.counters["reject/config_mismatch"] == 1


def test_bad_input_is_counted_and_the_learner_carries_on(harness):
    pusher = harness.ctx.socket(zmq.PUSH)
    pusher.connect(harness.endpoints.experience)
    dealer = harness.ctx.socket(zmq.DEALER)
    dealer.connect(harness.endpoints.control)
    pusher.send_multipart([b"garbage"])
    pusher.send_multipart([protocol.header_for(protocol.MsgType.EXPERIENCE), b"\xc1"])
    dealer.send_multipart(protocol.encode(protocol.Heartbeat("stranger", 0)))
    for _ in range(20):
        harness.service.poll(10)
    counters = harness.service.counters
    assert counters["reject/bad_frames"] == 1 and counters["reject/bad_body"] == 1
    assert counters["reject/unknown_peer"] == 1
    worker = harness.actor(0)
    harness.join(worker)  # still serving
    pusher.close(linger=0)
    dealer.close(linger=0)


def test_back_pressure_blocks_actors_and_bounds_memory():
    """A learner that does not read: an actor can queue at most the high-water marks, then its sends fail."""
    with zmq_context() as ctx:
        endpoints = Endpoints.inproc()
        learner = LearnerSockets(ctx, endpoints, experience_hwm=2)
        actor = ActorSockets(ctx, endpoints, experience_hwm=2)
        msg = protocol.Shutdown("x" * 1000)
        sent = 0
        while actor.send_experience(msg, timeout_ms=50):
            sent += 1
            assert sent <= 10, "sends never blocked"
        assert 2 <= sent <= 4  # send HWM + receive HWM
        assert list(learner.poll(10, read_experience=False)) == []  # a full buffer leaves experience queued
        drained = sum(len(list(learner.poll(10, read_experience=True))) for _ in range(sent))
        assert drained == sent  # nothing was dropped
        assert actor.send_experience(msg, timeout_ms=1000)  # reading released the actor
        actor.close()
        learner.close()


@pytest.mark.parametrize("timeout_ms", [200, 0], ids=["process-loop", "one-process-mode"])
def test_actor_drops_a_batch_that_went_stale_while_blocked(harness, timeout_ms):
    """The process loop steps with 200 ms, the one-process mode with 0: both drop a batch gone stale."""
    worker = harness.actor(0)
    harness.join(worker)
    old = worker.generate_batch()  # sampled with v0
    harness.service.learner.policy_version = 3  # the learner moved on meanwhile
    harness.service.publish_weights()
    fill = 0
    while worker.sockets.send_experience(old, timeout_ms=50):
        fill += 1  # the learner is not reading: fill the queues until sends block
        assert fill < 10
    worker.outbox.hold(old)
    for _ in range(20):  # blocked: sees v3 arrive, drops the v0 batch instead of waiting forever
        worker.step(timeout_ms)
        if worker.outbox.held is None:
            break
    assert worker.weights.policy_version == 3 and worker.stats.stale_dropped == len(old.sequences)


def test_actors_can_compute_the_reference_log_probs_the_learner_would(model_cache, tmp_path):
    import mlx.core as mx
    import numpy as np

    from common.lora import adapter_weights
    from learner.experience import Experience

    with harness_with(model_cache, tmp_path, "run.max_updates=2", 'ppo.reference_on="actors"') as h:
        worker = h.actor(0)
        h.join(worker)
        # Adapters that change the policy: the reference must still be the base model's.
        mx.random.seed(5)
        weights = adapter_weights(worker.rollout.model)
        worker.rollout.model.load_weights(
            [(k, mx.random.normal(v.shape) * 0.3) for k, v in weights.items()], strict=False
        )
        batch = worker.generate_batch()
    assert batch.ref_logprobs is not None and batch.ref_logprobs.shape == batch.behaviour_logprobs.shape
    prompts, responses, at = [], [], 0
    for seq in batch.sequences:
        prompts.append(batch.tokens[at : at + seq.prompt_len].tolist())
        responses.append(batch.tokens[at + seq.prompt_len : at + seq.prompt_len + seq.response_len].tolist())
        at += seq.prompt_len + seq.response_len
    lp = [np.zeros(len(r), np.float32) for r in responses]
    train = Experience.from_rows(
        prompts, responses, lp, np.zeros(len(prompts)), np.zeros(len(prompts))
    ).padded()
    learner = h.service.learner
    expected = np.array(
        learner.recompute.reference_logprobs(
            learner.container, *(mx.array(train[k]) for k in ("tokens", "positions", "response"))
        )
    )
    np.testing.assert_allclose(batch.ref_logprobs, expected[train["mask"] > 0], atol=1e-4)
    assert np.abs(batch.ref_logprobs - batch.behaviour_logprobs).max() > 1e-2


def test_one_process_run_with_reference_on_actors(model_cache, tmp_path):
    cfg = small_config(model_cache, tmp_path, "run.max_updates=2", 'ppo.reference_on="actors"')
    history = run_one_process(cfg, num_actors=1, timeout_s=300)
    assert [m["policy_version"] for m in history] == [1, 2]
    assert all(math.isfinite(m["kl/ref_mean"]) for m in history)


def test_actors_generate_only_what_the_learner_can_train_in_time(harness):
    """max_policy_lag 2 x ppo.batch_size 8 = 16 sequences in flight: two of three actors may generate."""
    workers = [harness.actor(i) for i in range(3)]
    for w in workers:
        harness.join(w)

    def poll_all(rounds=50):
        for _ in range(rounds):
            harness.service.poll(5)
            for w in workers:
                w.poll_grant(0)

    poll_all()
    assert [w.grants.granted for w in workers].count(1) == 2 and harness.service.admission.outstanding == 16
    first = next(w for w in workers if w.grants.granted)
    first.step()  # generate with its grant and send
    poll_all()
    assert harness.service.buffer.depth == 8
    assert sum(w.grants.granted for w in workers) == 1  # received but untrained still counts: no new grant
    assert harness.service.maybe_update() is not None  # the learner takes the batch...
    poll_all()
    assert sum(w.grants.granted for w in workers) == 2  # ...and the waiting actor gets its grant


def test_a_batch_the_actor_dropped_gives_its_grant_back(harness):
    worker = harness.actor(0)
    harness.join(worker)
    until_granted(harness, worker)
    assert harness.service.admission.outstanding == 8
    worker.grants.granted -= (
        1  # the batch of that grant went stale while blocked and was dropped by the actor
    )
    worker.stats.stale_dropped += 8
    until_granted(harness, worker)  # the next request reports the 8 dropped sequences: they will never arrive
    assert harness.service.admission.outstanding == 8 and worker.grants.granted == 1


def test_metrics_also_reach_tensorboard_when_asked(model_cache, tmp_path):
    pytest.importorskip("tensorboardX")
    cfg = small_config(model_cache, tmp_path, "run.max_updates=2", 'run.metrics_sinks=["tensorboard"]')
    assert len(run_one_process(cfg)) == 2
    events = list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 0


def test_a_reward_that_always_fails_is_reported_though_no_update_comes(harness, caplog):
    import logging

    from actors.rewards import load_reward

    caplog.set_level(logging.ERROR, logger="learner.rejections")
    worker = harness.actor(0)
    harness.join(worker)
    worker.rollout.scorer = load_reward("tests.helpers:failing_reward", get_task(harness.cfg.run.task))
    for _ in range(3):
        frames = [bytes(f) for f in protocol.encode(worker.generate_batch())]
        harness.service.handle_experience(frames)
    assert harness.service.buffer.depth == 0 and harness.service.step_count == 0
    assert "the last 3 batches were rejected whole" in caplog.text and "reject/bad_score" in caplog.text


def test_training_waits_for_min_actors(model_cache, tmp_path):
    with harness_with(model_cache, tmp_path, "run.max_updates=3", "run.min_actors=2") as h:
        first = h.actor(0)
        h.join(first)
        until_granted(h, first)
        first.grants.granted -= 1
        h.service.handle_experience([bytes(f) for f in protocol.encode(first.generate_batch())])
        assert h.service.buffer.depth == 8 and h.service.step() is None  # a full batch, one actor of two
        h.join(h.actor(1))
        assert h.service.step() is not None  # both joined: the buffered batch trains
