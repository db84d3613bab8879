"""What many test files share: the small run settings, an in-process learner + actors harness over real ZeroMQ
sockets, a tiny learner with sampled experience, and launching and watching real runs (polls with deadlines)."""

import json
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import mlx.core as mx
import numpy as np
import zmq

from actors.actor import Actor
from actors.sampler import SamplingParams, generate_completions
from actors.tasks import get_task
from common.config import LoraConfig, ModelConfig, PPOUpdateConfig, load_config
from common.lora import adapter_weights
from common.models import load_model, load_policy
from common.transport import ActorSockets, Endpoints, LearnerSockets, zmq_context
from learner.experience import Experience
from learner.models import build_policy_and_value
from learner.ppo_learner import PPOLearner
from learner.process import build_learner
from learner.service import LearnerService

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


def build_actor(cfg, sockets, actor_id=0, num_actors=1, task=None) -> Actor:
    """An actor on ``sockets`` with its policy set up as an actor process sets it up (``task``: the config's)."""
    loaded = load_policy(cfg.model, cfg.lora, cfg.ppo.full_finetune)
    task = task or get_task(cfg.run.task)
    return Actor(cfg, actor_id, num_actors, sockets, loaded.model, loaded.tokenizer, task)


class Harness:
    """A learner service and actors in this process over inproc sockets, stepped by the test."""

    def __init__(self, cfg, ctx):
        self.cfg, self.ctx, self.endpoints = cfg, ctx, Endpoints.inproc()
        self.learner_sockets = LearnerSockets(ctx, self.endpoints, cfg.transport.experience_hwm)
        self.service = LearnerService(cfg, self.learner_sockets, build_learner(cfg), Path(cfg.run.run_dir))
        self.service.publish_weights()
        self.sockets = [self.learner_sockets]

    def actor(self, actor_id, cfg=None):
        cfg = cfg or self.cfg
        sockets = ActorSockets(self.ctx, self.endpoints, cfg.transport.experience_hwm)
        self.sockets.append(sockets)
        return build_actor(cfg, sockets, actor_id, num_actors=2)

    def join(self, actor, rounds=200):
        for _ in range(rounds):
            if actor.join(0):
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


def until_granted(h: Harness, actor, rounds: int = 100) -> None:
    """Step learner and actor until the actor holds a rollout grant."""
    for _ in range(rounds):
        h.service.poll(5)
        if actor.poll_grant(0):
            return
    raise AssertionError("no grant")


def launch_tiny_run(
    model_cache, run_dir, actors: int, learners: int, updates: int
) -> subprocess.CompletedProcess:
    """``launch.py`` as a user runs it, with the tiny model and the small settings."""
    cmd = [sys.executable, str(ROOT / "launch.py"), "--actors", str(actors), "--learners", str(learners)]
    cmd += ["--model", "tiny", "--max-updates", str(updates), "--run-dir", str(run_dir)]
    for item in [*SMALL, f'model.cache_dir="{model_cache}"']:
        cmd += ["--set", item]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600)


def tiny_experience():
    """8 random sequences of 6 prompt + 5 response tokens of the tiny model's vocabulary, seeded."""
    import numpy as np

    from learner.experience import Experience

    rng = np.random.default_rng(0)
    return Experience.from_rows(
        [rng.integers(3, 250, 6).tolist() for _ in range(8)],
        [rng.integers(3, 250, 5).tolist() for _ in range(8)],
        [np.full(5, -5.0, np.float32) for _ in range(8)],
        rng.normal(size=8).astype(np.float32),
        np.zeros(8),
    )


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
    """The learner's metrics rows so far; a last line still being written is left for the next read."""
    path = run_dir / "metrics.jsonl"
    rows = []
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            break
    return rows


def poll_until(condition, what: str, seconds: float = 300, alive=(), interval: float = 0.2) -> None:
    """Poll ``condition`` (state that other processes write: files, metrics) until it holds; fail with ``what``
    at the deadline or as soon as one of the ``alive`` processes has exited."""
    deadline = time.monotonic() + seconds
    while not condition():
        dead = [(p.args, p.returncode) for p in alive if p.poll() is not None]  # args: a list, not a key
        assert not dead, f"{what}: exited early: {dead}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(interval)  # polling state another process writes; there is nothing to hand-shake with


def wait_until(launcher: subprocess.Popen, condition, what: str, seconds: float = 300) -> None:
    poll_until(condition, what, seconds, alive=(launcher,))


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


def failing_reward(prompt: str, completion: str) -> float:
    raise RuntimeError("reward service down")


def until_version(h: Harness, actor, version: int, on_round=lambda: None) -> None:
    """Step learner and actor until the actor runs snapshot ``version`` (as a grant of it would make it)."""
    actor.grants.version = version
    for _ in range(2000):
        h.service.poll(1)
        actor.poll_grant(0)  # asks for the snapshot it lacks, takes chunks, asks for more
        on_round()
        if actor.weights.policy_version == version:
            return
    raise AssertionError(f"snapshot v{version} did not arrive")


def same_weights(actor, h: Harness) -> bool:
    import numpy as np
    from mlx.utils import tree_flatten

    ours = dict(tree_flatten(actor.rollout.model.parameters()))
    theirs = dict(tree_flatten(h.service.learner.container.policy.parameters()))
    return ours.keys() == theirs.keys() and all(np.array_equal(ours[k], theirs[k]) for k in ours)


def one_update(h: Harness) -> None:
    h.service.learner.update(tiny_experience())
    h.service.publish_weights()  # the announcement goes out over PUB


LORA = LoraConfig(rank=4, alpha=8.0)


def make_learner(
    model_cache, value_kind="separate", seed=0, proximal_in_step=None, compile_step=False, **overrides
):
    loaded = load_model(ModelConfig(name="tiny", cache_dir=str(model_cache)))
    mx.random.seed(seed)
    container = build_policy_and_value(loaded.model, LORA, value_kind=value_kind)
    # Non-zero B matrices so that the adapters matter from the first step.
    mx.random.seed(seed + 1)
    container.policy.load_weights(
        [
            (k, mx.random.normal(v.shape) * 0.05)
            for k, v in adapter_weights(container.policy).items()
            if k.endswith("lora_b")
        ],
        strict=False,
    )
    settings = dict(batch_size=8, num_minibatches=1, micro_batch_size=8, update_epochs=1, learning_rate=1e-3)
    settings.update(overrides)
    cfg = PPOUpdateConfig(**settings)
    learner = PPOLearner(container, cfg, 1.0, compile_step=compile_step, proximal_in_step=proximal_in_step)
    return learner, loaded


def sample_experience(learner, tokenizer, n=8, seed=0, max_new=6):
    prompts = [[1] + tokenizer.encode(f"question {i}") for i in range(n)]
    completions = generate_completions(
        learner.container.policy,
        prompts,
        SamplingParams(max_new_tokens=max_new),
        set(),
        seeds=[seed * 100 + i for i in range(n)],
    )
    target = tokenizer.encode("a")[0]
    scores = np.array(
        [np.mean([t == target for t in c.response_ids]) + 0.1 * i for i, c in enumerate(completions)],
        np.float32,
    )
    return Experience.from_rows(
        [c.prompt_ids for c in completions],
        [c.response_ids for c in completions],
        [c.logprobs for c in completions],
        scores,
        np.zeros(n, np.int64),
    )
