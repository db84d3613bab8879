"""The actor/learner links in one process over real ZeroMQ sockets: silence and heartbeats, restarts,
and how snapshots reach actors (late joins, full weights in chunks, shared memory)."""

import time
from pathlib import Path

import pytest

from common import protocol
from common.models import load_model
from common.transport import ActorSockets, Endpoints, LearnerSockets, free_tcp_ports, zmq_context
from launcher.one_process import run_one_process
from learner.process import build_learner
from learner.service import LearnerService
from tests.helpers import (
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


def test_an_actor_that_generated_past_the_silence_timeout_reads_what_came_meanwhile_before_judging(
    model_cache, tmp_path, caplog
):
    """A batch can take longer than transport.learner_timeout_s to generate (a minute of episodes on a CPU)
    while the learner's messages wait unread: the actor reads them before deciding the learner went silent (it
    had declared it silent after every long batch, then 'answers again' at once)."""
    import logging

    caplog.set_level(logging.INFO, logger="actors.link")
    with harness_with(model_cache, tmp_path, "transport.learner_timeout_s=0.3") as h:
        worker = h.actor(0)
        h.join(worker)
        worker.grants.ask(worker.stats.stale_dropped)
        deadline = time.monotonic() + 10
        while h.service.admission.outstanding == 0 and time.monotonic() < deadline:
            h.service.poll(5)  # the learner grants: its answer waits in the actor's socket
        assert h.service.admission.outstanding > 0
        worker.link.seen -= 10  # last read 10 s ago: the actor was generating
        worker.poll_grant(20)
        assert not worker.link.silent and "went silent" not in caplog.text
        assert worker.grants.granted > 0


def test_the_learner_heartbeats_its_actors_during_a_long_update(model_cache, tmp_path):
    """An update can outlast the actors' patience (minutes on a CPU): heartbeats go on while it runs."""
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


def test_the_learner_heartbeats_inside_one_long_micro_batch(model_cache, tmp_path):
    """One evaluation can outlast the actors' patience by itself (a fresh GPU compiles its kernels in the first
    update, minutes): heartbeats come from a thread while the update runs, not between micro-batches."""
    with harness_with(model_cache, tmp_path, "transport.heartbeat_s=0.05", "ppo.micro_batch_size=8") as h:
        worker = h.actor(0)
        h.join(worker)
        learner = h.service.learner
        grad_step = learner.minibatches.grad_step

        def one_long_grad_step(worker, mb):  # the one micro-batch: 1 s in which MLX would hold no GIL either
            time.sleep(1.0)
            return grad_step(worker, mb)

        learner.minibatches.grad_step = one_long_grad_step
        while worker.sockets.receive_control(0) is not None:  # what the join left queued
            pass
        learner.update(tiny_experience())  # beats between micro-batches alone would be 3 at most
        beats = []
        while (frames := worker.sockets.receive_control(0)) is not None:
            if isinstance(msg := protocol.decode(frames), protocol.Heartbeat):
                beats.append(msg)
        assert len(beats) >= 6, len(beats)
        assert all(b.policy_version == 0 for b in beats)  # sent while the update was still running
        h.service.heartbeat()  # the socket is the loop's again once the update returned


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
