"""The actor/learner runtime in one process over real ZeroMQ sockets: one-process mode, joins, refusals,
back-pressure, bad input, snapshots."""

import json
import math
import time
from pathlib import Path

import pytest
import zmq

from actors.actor import ActorStopped
from actors.tasks import get_task
from common import protocol
from common.models import load_model
from common.transport import ActorSockets, Endpoints, LearnerSockets, free_tcp_ports, zmq_context
from launcher.one_process import run_one_process
from learner.process import build_learner
from learner.service import LearnerService
from tests.helpers import (
    REQUIRED_KEYS,
    bind_when_free,
    build_actor,
    harness_with,
    one_update,
    same_weights,
    small_config,
    tiny_experience,
    until_granted,
    until_version,
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


def test_late_joiner_gets_the_current_snapshot(harness):
    first = harness.actor(0)
    harness.join(first)
    while harness.service.step_count < 2:
        first.step(timeout_ms=0)  # as the one-process mode steps it
        harness.service.step(timeout_ms=10)
    late = harness.actor(1)
    harness.join(late)
    assert late.weights.policy_version == harness.service.learner.policy_version == 2
    assert late.weights.checksum == harness.service.snapshot.checksum
    late.heartbeat(force=True)
    harness.service.poll(50)
    info = next(i for i in harness.service.actors.values() if i.actor_id == 1)
    assert (
        info.policy_version == 2 and info.checksum == late.weights.checksum
    )  # heartbeat echoes what it runs


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


def test_silent_and_never_started_actors_are_told_apart_and_a_silent_one_is_welcomed_back(
    model_cache, tmp_path, caplog
):
    import logging

    caplog.set_level(logging.INFO, logger="learner.registry")
    settings = ("run.max_updates=5", "transport.actor_timeout_s=0.3", "transport.startup_timeout_s=0.3")
    with harness_with(model_cache, tmp_path, *settings) as h:
        worker = h.actor(0)
        h.join(worker)
        until_granted(h, worker)
        assert worker.grants.granted == 1 and h.service.admission.outstanding == 8
        info = next(iter(h.service.actors.values()))
        deadline = time.monotonic() + 10
        while not info.gone and time.monotonic() < deadline:
            h.service.poll(20)
            h.service.check_actors()
        assert info.gone and h.service.admission.outstanding == 0
        assert "actor 0 went silent" in caplog.text
        # Actor 1 of the 2 this run has (the hello says) never said hello at all.
        assert "actor 1 never started" in caplog.text and "actor 0 never started" not in caplog.text
        worker.heartbeat(force=True)
        for _ in range(100):
            h.service.poll(10)
            if not info.gone:
                break
        assert not info.gone and "actor 0 is back" in caplog.text


def test_an_actor_notices_a_silent_learner_and_says_hello_again_until_it_answers(
    model_cache, tmp_path, caplog
):
    import logging

    caplog.set_level(logging.INFO, logger="actors.link")
    with harness_with(model_cache, tmp_path, "transport.learner_timeout_s=0.3") as h:
        worker = h.actor(0)
        h.join(worker)
        deadline = time.monotonic() + 10
        while not worker.link.silent and time.monotonic() < deadline:
            worker.poll_grant(20)  # the learner is not stepped: no heartbeat, no grant
        assert worker.link.silent and "the learner went silent" in caplog.text
        for _ in range(200):  # the learner runs again: it answers the actor's hello
            h.service.step(timeout_ms=5)
            worker.poll_grant(5)
            if not worker.link.silent:
                break
        assert not worker.link.silent and "the learner answers again" in caplog.text


def test_the_learner_heartbeats_its_actors_during_a_long_update(model_cache, tmp_path):
    """An update can outlast the actors' patience (minutes on a CPU): heartbeats go on between micro-batches."""
    with harness_with(model_cache, tmp_path, "transport.heartbeat_s=0.05", "ppo.micro_batch_size=1") as h:
        worker = h.actor(0)
        h.join(worker)
        learner = h.service.learner
        grad_step = learner.minibatches.grad_step

        def slow_grad_step(worker, mb):  # stands in for a micro-batch of a large model: 0.1 s of compute
            time.sleep(0.1)
            return grad_step(worker, mb)

        learner.minibatches.grad_step = slow_grad_step
        while worker.sockets.receive_control(0) is not None:  # what the join left queued
            pass
        learner.update(
            tiny_experience()
        )  # 8 micro-batches of 0.1 s; the service's own loop does not run meanwhile
        beats = []
        while (frames := worker.sockets.receive_control(0)) is not None:
            msg = protocol.decode(frames)
            if isinstance(msg, protocol.Heartbeat):
                beats.append(msg)
        assert len(beats) >= 5, len(beats)
        assert all(b.policy_version == 0 for b in beats)  # sent while the update was still running


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


def test_actors_rejoin_a_restarted_learner_and_take_its_snapshot(model_cache, tmp_path):
    """The learner process is replaced (same address): its actor is asked to say hello again, is welcomed,
    takes the new learner's snapshot whatever its version, and gets work from it."""
    cfg = small_config(model_cache, tmp_path, "run.max_updates=10", "transport.heartbeat_s=0.2")
    endpoints = Endpoints.tcp("127.0.0.1", free_tcp_ports())
    with zmq_context() as ctx:
        first = LearnerSockets(ctx, endpoints, 2)
        old = LearnerService(cfg, first, build_learner(cfg), tmp_path / "old")
        old.learner.policy_version = 5
        old.publish_weights()
        actor_sockets = ActorSockets(ctx, endpoints, 2)
        worker = build_actor(cfg, actor_sockets)
        second = None
        try:
            for _ in range(500):
                old.poll(5)
                if worker.join(5):
                    break
            assert worker.weights.policy_version == 5
            first.close()  # the learner goes away...
            second = bind_when_free(ctx, endpoints)  # ...and a new one (fresh, v0) takes its address
            new = LearnerService(cfg, second, build_learner(cfg), tmp_path / "new")
            new.publish_weights()
            deadline = time.monotonic() + 60
            while not (worker.grants.granted and new.actors) and time.monotonic() < deadline:
                new.poll(10)
                worker.poll_grant(10)
            assert new.actors and worker.grants.granted == 1
            assert new.counters["reject/unknown_peer"] >= 1
            assert worker.weights.policy_version == 0 and worker.weights.checksum == new.snapshot.checksum
        finally:
            actor_sockets.close()
            for s in (first, second):
                if s is not None:
                    s.close()


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


def test_full_fine_tuning_syncs_every_weight_to_the_actors(model_cache, tmp_path):
    from mlx.utils import tree_flatten

    cfg = small_config(model_cache, tmp_path, "run.max_updates=2", "ppo.full_finetune=true")
    history = run_one_process(cfg)  # the actor samples with every weight the learner trains
    assert [m["policy_version"] for m in history] == [1, 2]
    weights = sum(v.nbytes for _, v in tree_flatten(load_model(cfg.model).model.parameters()))
    assert history[-1]["sync/bytes"] == weights
    assert (tmp_path / "checkpoints" / "step-000002" / "trainable.safetensors").is_file()
    with zmq_context() as ctx:
        sockets = LearnerSockets(ctx, Endpoints.inproc(), 2)
        try:
            service = LearnerService(cfg, sockets, build_learner(cfg), tmp_path / "tight")
            service.publisher.max_bytes = (
                weights - 1
            )  # as if transport.max_message_mb were below the model's size
            with pytest.raises(ValueError, match="raise it"):
                service.publish_weights()
        finally:
            sockets.close()


def test_full_weights_travel_in_chunks_and_arrive_whole(model_cache, tmp_path):
    """Over ``transport.chunk_mb`` a snapshot is announced and each actor fetches it a few chunks at a time."""
    settings = ("ppo.full_finetune=true", "transport.chunk_mb=0.02", "transport.share_snapshots=false")
    with harness_with(model_cache, tmp_path, *settings) as h:
        announce = h.service.announce
        assert announce.flat.size == 0 and announce.num_chunks() >= 8
        worker = h.actor(0)
        h.join(worker)
        in_flight = []

        def record() -> None:
            in_flight.append(len(worker.weights.fetch.asked) if worker.weights.fetch else 0)

        until_version(h, worker, 0, record)
        assert same_weights(worker, h) and worker.weights.checksum == h.service.snapshot.checksum
        one_update(h)
        until_version(h, worker, 1, record)
        assert same_weights(worker, h) and worker.weights.checksum == h.service.snapshot.checksum
        assert 1 <= max(in_flight) <= 4  # never more than the window


def test_an_actor_on_the_learners_machine_reads_snapshots_from_shared_memory(model_cache, tmp_path):
    with harness_with(model_cache, tmp_path, "ppo.full_finetune=true", "transport.chunk_mb=0.02") as h:
        worker = h.actor(0)
        h.join(worker)
        until_version(h, worker, 0)  # published before any actor was known: fetched in chunks
        one_update(h)
        announce = h.service.announce
        assert announce.shared and Path(announce.shared).is_file()
        asked = []
        until_version(h, worker, 1, lambda: asked.append(worker.weights.fetch is not None))
        assert not any(asked)  # no chunk was fetched: the file was read
        assert same_weights(worker, h) and worker.weights.checksum == h.service.snapshot.checksum
        h.service.shutdown("done")
        assert not Path(announce.shared).exists()
