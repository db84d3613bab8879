"""The actor/learner runtime over real ZeroMQ sockets: one-process mode, joins, refusals, back-pressure, bad input."""

import json
import math
import re
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
import zmq

from actors.actor import ActorStopped, ActorWorker
from actors.tasks import get_task
from common import protocol
from common.config import load_config
from common.lora import attach_lora
from common.models import load_model
from common.transport import ActorSockets, Endpoints, LearnerSockets, free_tcp_ports, zmq_context
from learner.process import build_learner
from learner.service import LearnerService
from local_run import run_one_process

ROOT = Path(__file__).resolve().parent.parent
SMALL = [
    "sampling.batch_size=8",
    "sampling.max_new_tokens=8",
    "ppo.batch_size=8",
    "ppo.group_size=2",
    "ppo.num_minibatches=1",
    "ppo.micro_batch_size=8",
    "ppo.update_epochs=1",
    "ppo.learning_rate=1e-3",
    "lora.rank=4",
    'run.task="letters"',
    "run.checkpoint_every=2",
    "transport.startup_timeout_s=60",
]
REQUIRED_KEYS = {
    "step",
    "policy_version",
    "time_s",
    "perf/samples_per_s",
    "perf/gen_tokens_per_s",
    "perf/train_tokens_per_s",
    "perf/learner_busy_frac",
    "lag/mean",
    "lag/max",
    "lag/dropped",
    "buffer/depth",
    "sync/ms",
    "sync/bytes",
    "rollout/score_mean",
    "loss/policy",
    "loss/value",
    "policy/approx_kl",
    "kl/ref_mean",
    "memory/peak_gb",
}


def small_config(model_cache, run_dir, *extra):
    return load_config(
        None,
        [
            *SMALL,
            'model.name="tiny"',
            f'model.cache_dir="{model_cache}"',
            f'run.run_dir="{run_dir}"',
            *extra,
        ],
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


class Harness:
    """A learner service and actor workers in this process over inproc sockets, stepped by the test."""

    def __init__(self, cfg, ctx):
        self.cfg, self.ctx, self.endpoints = cfg, ctx, Endpoints.inproc()
        self.learner_sockets = LearnerSockets(ctx, self.endpoints, cfg.transport.experience_hwm)
        self.service = LearnerService(cfg, self.learner_sockets, build_learner(cfg), Path(cfg.run.run_dir))
        self.service.publish_weights()
        self.sockets = [self.learner_sockets]

    def actor(self, actor_id, cfg=None):
        cfg = cfg or self.cfg
        loaded = load_model(cfg.model)
        if not cfg.ppo.full_finetune:
            attach_lora(loaded.model, cfg.lora)
        sockets = ActorSockets(self.ctx, self.endpoints, cfg.transport.experience_hwm)
        self.sockets.append(sockets)
        return ActorWorker(cfg, actor_id, 2, sockets, loaded.model, loaded.tokenizer, get_task(cfg.run.task))

    def join(self, worker, rounds=200):
        for _ in range(rounds):
            if worker.poll_connect(0):
                return
            self.service.poll(10)
        raise AssertionError("actor did not join")

    def close(self):
        for s in self.sockets:
            s.close()


@contextmanager
def harness_with(model_cache, tmp_path, *settings):
    """A harness over the small config plus ``settings``, closed on exit."""
    with zmq_context() as ctx:
        h = Harness(small_config(model_cache, tmp_path, *settings), ctx)
        try:
            yield h
        finally:
            h.close()


def until_granted(h: Harness, worker, rounds: int = 100) -> None:
    """Step learner and actor until the actor holds a rollout grant."""
    for _ in range(rounds):
        h.service.poll(5)
        if worker.poll_grant(0):
            return
    raise AssertionError("no grant")


@pytest.fixture
def harness(model_cache, tmp_path):
    with zmq_context() as ctx:
        h = Harness(small_config(model_cache, tmp_path, "run.max_updates=10"), ctx)
        yield h
        h.close()


def test_late_joiner_gets_the_current_snapshot(harness):
    first = harness.actor(0)
    harness.join(first)
    while harness.service.step_count < 2:
        first.step_nonblocking()
        harness.service.step(timeout_ms=10)
    late = harness.actor(1)
    harness.join(late)
    assert late.policy_version == harness.service.learner.policy_version == 2
    assert late.checksum == harness.service.snapshot.checksum
    late.heartbeat(force=True)
    harness.service.poll(50)
    info = next(i for i in harness.service.actors.values() if i.actor_id == 1)
    assert info.policy_version == 2 and info.checksum == late.checksum  # heartbeat echoes what it runs


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


def launch_tiny_run(
    model_cache, run_dir, actors: int, learners: int, updates: int
) -> subprocess.CompletedProcess:
    """``launch.py`` as a user runs it, with the tiny model and the small settings."""
    cmd = [sys.executable, str(ROOT / "launch.py"), "--actors", str(actors), "--learners", str(learners)]
    cmd += ["--model", "tiny", "--max-updates", str(updates), "--run-dir", str(run_dir)]
    for item in [*SMALL, f'model.cache_dir="{model_cache}"']:
        cmd += ["--set", item]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600)


def test_multi_process_launch(model_cache, tmp_path):
    run_dir = tmp_path / "run"
    out = launch_tiny_run(model_cache, run_dir, actors=2, learners=1, updates=3)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["policy_version"] for r in rows] == [1, 2, 3]
    assert set(rows[-1]) >= REQUIRED_KEYS
    # Per-actor stats from heartbeats (an actor slow to start on a loaded machine may join after the last update).
    reporting = {
        k.split("/")[1] for k in rows[-1] if k.startswith("actor/") and k.endswith("/blocked_send_s")
    }
    assert reporting and all(f"actor/{a}/wait_weights_s" in rows[-1] for a in reporting)
    assert all(f"actor/{a}/policy_version" in rows[-1] for a in reporting)
    assert "actor 0 joined" in out.stderr or "actor 1 joined" in out.stderr
    assert "running policy v1" in out.stderr  # actors apply the published versions
    assert re.search(r"update 3(/3)? v3", out.stderr)


def test_free_ports_are_distinct():
    assert len(set(free_tcp_ports(count=3))) == 3


def test_two_learner_ranks_complete_updates(model_cache, tmp_path):
    """--learners 2: two ranks over mlx.distributed's ring on loopback, each with its own actor."""
    run_dir = tmp_path / "run"
    out = launch_tiny_run(model_cache, run_dir, actors=2, learners=2, updates=2)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "learner rank 0 of 2" in out.stderr and "learner rank 1 of 2" in out.stderr
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["policy_version"] for r in rows] == [1, 2]  # rank 0 alone writes metrics
    # Averaged gradients keep the ranks identical: both actors (one per rank) run the same v2 adapters.
    checksums = set(re.findall(r"\[actor-\d\].*running policy v2 \(checksum (\w+)\)", out.stderr))
    assert len(checksums) == 1, out.stderr[-3000:]


def test_actor_drops_a_batch_that_went_stale_while_blocked(harness):
    worker = harness.actor(0)
    harness.join(worker)
    old = worker.generate_batch()  # sampled with v0
    harness.service.learner.policy_version = 3  # the learner moved on meanwhile
    harness.service.publish_weights()
    fill = 0
    while worker.sockets.send_experience(old, timeout_ms=50):
        fill += 1  # the learner is not reading: fill the queues until sends block
        assert fill < 10
    worker.send(old)  # blocked: sees v3 arrive, drops the v0 batch instead of waiting forever
    assert worker.policy_version == 3 and worker.stats.stale_dropped == len(old.sequences)


def test_actors_can_compute_the_reference_log_probs_the_learner_would(model_cache, tmp_path):
    import mlx.core as mx
    import numpy as np

    from common.lora import adapter_weights
    from learner.update import Experience, collate

    with harness_with(model_cache, tmp_path, "run.max_updates=2", 'ppo.reference_on="actors"') as h:
        worker = h.actor(0)
        h.join(worker)
        # Adapters that change the policy: the reference must still be the base model's.
        mx.random.seed(5)
        weights = adapter_weights(worker.model)
        worker.model.load_weights(
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
    train = collate(Experience(prompts, responses, lp, np.zeros(len(prompts)), np.zeros(len(prompts))))
    learner = h.service.learner
    expected = np.array(
        learner._reference_logprobs(
            learner.container, *(mx.array(a) for a in (train.tokens, train.positions, train.response))
        )
    )
    np.testing.assert_allclose(batch.ref_logprobs, expected[train.mask > 0], atol=1e-4)
    assert np.abs(batch.ref_logprobs - batch.behaviour_logprobs).max() > 1e-2


def test_one_process_run_with_reference_on_actors(model_cache, tmp_path):
    cfg = small_config(model_cache, tmp_path, "run.max_updates=2", 'ppo.reference_on="actors"')
    history = run_one_process(cfg, num_actors=1, timeout_s=300)
    assert [m["policy_version"] for m in history] == [1, 2]
    assert all(math.isfinite(m["kl/ref_mean"]) for m in history)


@pytest.mark.parametrize(
    "cores,actors,learners,expected",
    [(16, 4, 1, (8, 2)), (16, 8, 1, (8, 1)), (16, 4, 2, (4, 2)), (2, 2, 1, (1, 1)), (1, 3, 1, (1, 1))],
)
def test_learners_get_half_the_cores_and_actors_share_the_rest(cores, actors, learners, expected):
    from local_run import split_threads

    assert split_threads(cores, actors, learners) == expected


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
    assert [w.granted for w in workers].count(1) == 2 and harness.service.admission.outstanding == 16
    first = next(w for w in workers if w.granted)
    first.step()  # generate with its grant and send
    poll_all()
    assert harness.service.buffer.depth == 8
    assert sum(w.granted for w in workers) == 1  # received but untrained still counts: no new grant
    assert harness.service.maybe_update() is not None  # the learner takes the batch...
    poll_all()
    assert sum(w.granted for w in workers) == 2  # ...and the waiting actor gets its grant


def test_silent_and_never_started_actors_are_told_apart_and_a_silent_one_is_welcomed_back(
    model_cache, tmp_path, caplog
):
    import logging

    caplog.set_level(logging.INFO, logger="learner.service")
    settings = ("run.max_updates=5", "transport.actor_timeout_s=0.3", "transport.startup_timeout_s=0.3")
    with harness_with(model_cache, tmp_path, *settings) as h:
        worker = h.actor(0)
        h.join(worker)
        until_granted(h, worker)
        assert worker.granted == 1 and h.service.admission.outstanding == 8
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

    caplog.set_level(logging.INFO, logger="actors.actor")
    with harness_with(model_cache, tmp_path, "transport.learner_timeout_s=0.3") as h:
        worker = h.actor(0)
        h.join(worker)
        deadline = time.monotonic() + 10
        while not worker.learner_silent and time.monotonic() < deadline:
            worker.poll_grant(20)  # the learner is not stepped: no heartbeat, no grant
        assert worker.learner_silent and "the learner went silent" in caplog.text
        for _ in range(200):  # the learner runs again: it answers the actor's hello
            h.service.step(timeout_ms=5)
            worker.poll_grant(5)
            if not worker.learner_silent:
                break
        assert not worker.learner_silent and "the learner answers again" in caplog.text


def tiny_experience():
    """8 random sequences of 6 prompt + 5 response tokens of the tiny model's vocabulary, seeded."""
    import numpy as np

    from learner.update import Experience

    rng = np.random.default_rng(0)
    return Experience(
        [rng.integers(3, 250, 6).tolist() for _ in range(8)],
        [rng.integers(3, 250, 5).tolist() for _ in range(8)],
        [np.full(5, -5.0, np.float32) for _ in range(8)],
        rng.normal(size=8).astype(np.float32),
        np.zeros(8),
    )


def test_the_learner_heartbeats_its_actors_during_a_long_update(model_cache, tmp_path):
    """An update can outlast the actors' patience (minutes on a CPU): heartbeats go on between micro-batches."""
    with harness_with(model_cache, tmp_path, "transport.heartbeat_s=0.05", "ppo.micro_batch_size=1") as h:
        worker = h.actor(0)
        h.join(worker)
        learner = h.service.learner
        grad_step = learner._grad_step

        def slow_grad_step(worker, mb):  # stands in for a micro-batch of a large model: 0.1 s of compute
            time.sleep(0.1)
            return grad_step(worker, mb)

        learner._grad_step = slow_grad_step
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
    worker.granted -= 1  # the batch of that grant went stale while blocked and was dropped by the actor
    worker.stats.stale_dropped += 8
    until_granted(harness, worker)  # the next request reports the 8 dropped sequences: they will never arrive
    assert harness.service.admission.outstanding == 8 and worker.granted == 1


def test_a_bad_hostfile_lists_its_problems(tmp_path):
    from remote_run import read_hostfile

    path = tmp_path / "hosts.json"
    path.write_text(json.dumps([{"ssh": "a", "ips": ["10.0.0.1"]}, {"ips": []}]))
    with pytest.raises(ValueError) as err:
        read_hostfile(path)
    text = str(err.value)
    assert "host 0 (a): 'role' is learner or actors" in text and "host 1: needs 'ssh'" in text
    assert "0 hosts with role learner" in text


def start_tiny_launcher(model_cache, run_dir: Path, *settings: str, args: tuple = ()) -> subprocess.Popen:
    """``launch.py`` on the tiny model: by default 2 actors and a run long enough to be stopped by the test;
    ``args`` replaces those arguments (and ``--run-dir``).

    The run's log goes to ``<run_dir>.log`` (a pipe nobody reads while the test waits would fill up and block
    every process of the run); ``finish`` returns it.
    """
    cmd = [sys.executable, str(ROOT / "launch.py"), "--model", "tiny"]
    cmd += list(args) or ["--actors", "2", "--max-updates", "100000", "--run-dir", str(run_dir)]
    for item in [*SMALL, f'model.cache_dir="{model_cache}"', *settings]:
        cmd += ["--set", item]
    with open(f"{run_dir}.log", "a") as log:
        return subprocess.Popen(cmd, stderr=log)


def finish(launcher: subprocess.Popen, run_dir: Path, timeout_s: float = 120) -> str:
    """Wait for the launcher to exit; its log."""
    launcher.wait(timeout=timeout_s)
    return Path(f"{run_dir}.log").read_text()


def metric_rows(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def wait_until(launcher: subprocess.Popen, condition, what: str, seconds: float = 300) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert launcher.poll() is None and time.monotonic() < deadline, what
        time.sleep(0.2)  # polling a file the learner writes


def test_ctrl_c_checkpoints_and_leaves_no_process_behind(model_cache, tmp_path):
    import signal

    import psutil

    run_dir = tmp_path / "run"
    launcher = start_tiny_launcher(model_cache, run_dir, "run.checkpoint_every=100000")
    wait_until(launcher, lambda: len(metric_rows(run_dir)) >= 2, "the run did not get going")
    family = psutil.Process(launcher.pid).children(recursive=True)
    assert len(family) >= 3  # learner + 2 actors
    launcher.send_signal(signal.SIGINT)
    stderr = finish(launcher, run_dir)
    assert launcher.returncode == 0, stderr[-3000:]
    steps = [row["step"] for row in metric_rows(run_dir)]
    assert (
        run_dir / "checkpoints" / f"step-{steps[-1]:06d}"
    ).is_dir()  # the final checkpoint, not a periodic one
    gone, alive = psutil.wait_procs(family, timeout=10)
    assert not alive, [p.pid for p in alive]


def bind_when_free(ctx, endpoints, seconds: float = 30.0) -> LearnerSockets:
    """Bind a learner's addresses as soon as the closed previous sockets have released them (ZeroMQ closes
    sockets in its I/O thread, so an immediate rebind can still find the port taken)."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            return LearnerSockets(ctx, endpoints, 2)
        except zmq.ZMQError as e:
            if e.errno != zmq.EADDRINUSE or time.monotonic() > deadline:
                raise
            time.sleep(0.05)  # polling for the port, with a deadline


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
        loaded = load_model(cfg.model)
        attach_lora(loaded.model, cfg.lora)
        actor_sockets = ActorSockets(ctx, endpoints, 2)
        worker = ActorWorker(cfg, 0, 1, actor_sockets, loaded.model, loaded.tokenizer, get_task(cfg.run.task))
        second = None
        try:
            for _ in range(500):
                old.poll(5)
                if worker.poll_connect(5):
                    break
            assert worker.policy_version == 5
            first.close()  # the learner goes away...
            second = bind_when_free(ctx, endpoints)  # ...and a new one (fresh, v0) takes its address
            new = LearnerService(cfg, second, build_learner(cfg), tmp_path / "new")
            new.publish_weights()
            deadline = time.monotonic() + 60
            while not (worker.granted and new.actors) and time.monotonic() < deadline:
                new.poll(10)
                worker.poll_grant(10)
            assert new.actors and worker.granted == 1
            assert new.counters["reject/unknown_peer"] >= 1
            assert worker.policy_version == 0 and worker.checksum == new.snapshot.checksum
        finally:
            actor_sockets.close()
            for s in (first, second):
                if s is not None:
                    s.close()


def test_a_killed_actor_is_restarted_rejoins_and_nothing_is_trained_twice(model_cache, tmp_path):
    """SIGKILL an actor mid-run: the launcher restarts it, it rejoins with a new pid and continues after the newest
    batch its predecessor delivered, and no group is trained twice. Every wait is on a condition (no race between
    the restart delay and the learner's silence timeout: which one comes first does not matter)."""
    import signal

    import psutil

    run_dir = tmp_path / "run"
    launcher = start_tiny_launcher(model_cache, run_dir)

    def log() -> str:
        return Path(f"{run_dir}.log").read_text()

    def trained() -> list[tuple[int, int, int]]:
        return [tuple(g) for row in metric_rows(run_dir) for g in row.get("trained/groups", [])]

    try:
        wait_until(launcher, lambda: any(a == 1 for a, _, _ in trained()), "actor 1's experience trained")
        family = psutil.Process(launcher.pid).children(recursive=True)
        victim = next(p for p in family if "--actor-id 1 " in " ".join(p.cmdline()) + " ")
        victim.send_signal(signal.SIGKILL)
        continued = re.compile(r"actor 1 continues at batch (\d+)")
        wait_until(launcher, lambda: continued.search(log()), "the restarted actor to rejoin")
        first_new = int(continued.search(log()).group(1))
        wait_until(
            launcher,
            lambda: any(a == 1 and b >= first_new for a, b, _ in trained()),
            "its new batches trained",
        )
    finally:
        launcher.send_signal(signal.SIGINT)
        stderr = finish(launcher, run_dir)
    assert launcher.returncode == 0, stderr[-3000:]
    assert "actor-1 exited with code -9; restarting it in 1 s (restart 1 of at most 3)" in stderr
    pids = re.findall(r"actor 1 joined from \S+ \(pid (\d+)\)", stderr)
    assert len(set(pids)) == 2 and int(pids[0]) == victim.pid, pids
    groups = trained()
    assert len(groups) == len(set(groups)), "a group was trained twice"
    assert first_new >= 1


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ('run.task="nope"', "unknown task 'nope': built-in tasks are"),
        ("sampling.max_prompt_tokens=1020", "max_new_tokens = 1028 > the model's context of 1024 tokens"),
    ],
)
def test_a_run_that_cannot_work_stops_with_the_reason_and_no_restarts(
    model_cache, tmp_path, setting, message
):
    run_dir = tmp_path / "run"
    launcher = start_tiny_launcher(model_cache, run_dir, setting)
    log = finish(launcher, run_dir, timeout_s=300)
    assert launcher.returncode == 2, log[-3000:]
    assert message in log and "restarting it" not in log


def test_metrics_also_reach_tensorboard_when_asked(model_cache, tmp_path):
    pytest.importorskip("tensorboardX")
    cfg = small_config(model_cache, tmp_path, "run.max_updates=2", 'run.metrics_sinks=["tensorboard"]')
    assert len(run_one_process(cfg)) == 2
    events = list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 0


def failing_reward(prompt: str, completion: str) -> float:
    raise RuntimeError("reward service down")


def test_a_reward_that_always_fails_is_reported_though_no_update_comes(harness, caplog):
    import logging

    from actors.rewards import load_reward

    caplog.set_level(logging.ERROR, logger="learner.service")
    worker = harness.actor(0)
    harness.join(worker)
    worker.scorer = load_reward("tests.test_runtime:failing_reward", worker.task)
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
        first.granted -= 1
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
            service.max_bytes = weights - 1  # as if transport.max_message_mb were below the model's size
            with pytest.raises(ValueError, match="raise it"):
                service.publish_weights()
        finally:
            sockets.close()


def until_version(h: Harness, worker, version: int, on_round=lambda: None) -> None:
    """Step learner and actor until the actor runs snapshot ``version`` (as a grant of it would make it)."""
    worker.grant_version = version
    for _ in range(2000):
        h.service.poll(1)
        worker.poll_grant(0)  # asks for the snapshot it lacks, takes chunks, asks for more
        on_round()
        if worker.policy_version == version:
            return
    raise AssertionError(f"snapshot v{version} did not arrive")


def same_weights(worker, h: Harness) -> bool:
    import numpy as np
    from mlx.utils import tree_flatten

    ours = dict(tree_flatten(worker.model.parameters()))
    theirs = dict(tree_flatten(h.service.learner.container.policy.parameters()))
    return ours.keys() == theirs.keys() and all(np.array_equal(ours[k], theirs[k]) for k in ours)


def one_update(h: Harness) -> None:
    h.service.learner.update(tiny_experience())
    h.service.publish_weights()  # the announcement goes out over PUB


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
            in_flight.append(len(worker.fetch.asked) if worker.fetch else 0)

        until_version(h, worker, 0, record)
        assert same_weights(worker, h) and worker.checksum == h.service.snapshot.checksum
        one_update(h)
        until_version(h, worker, 1, record)
        assert same_weights(worker, h) and worker.checksum == h.service.snapshot.checksum
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
        until_version(h, worker, 1, lambda: asked.append(worker.fetch is not None))
        assert not any(asked)  # no chunk was fetched: the file was read
        assert same_weights(worker, h) and worker.checksum == h.service.snapshot.checksum
        h.service.shutdown("done")
        assert not Path(announce.shared).exists()
