"""``PPOTrainer``: the product description's Python API over the actor/learner runtime.

``train`` writes the prompts and the resolved config into a run directory and starts the same local processes
``python launch.py`` starts (learner + actors over ZeroMQ), then follows the learner's ``metrics.jsonl`` to call
the callbacks once per epoch. A reward reaches the actor processes by name: a module-level function of an
importable module (or of the running script), ``"module:function"``, or ``"rm:PATH"`` for a learned reward model.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO, Any

from common.config import config_to_toml
from mlx_ppo.config import PPOConfig
from tools.metrics_file import MetricsTail

logger = logging.getLogger(__name__)
ROOT = Path(__file__).resolve().parent.parent
Callback = Callable[[int, dict[str, float]], Any]


def reward_spec(reward: str | Callable | None) -> tuple[str, str]:
    """``(run.reward spec, extra PYTHONPATH entry)`` for a reward given as a spec string or a function."""
    if reward is None or isinstance(reward, str):
        return reward or "", ""
    module, name = getattr(reward, "__module__", None), getattr(reward, "__qualname__", "")
    if not module or not name or "<" in name or "." in name:
        raise TypeError(
            f"reward {reward!r} cannot reach the actor processes: give a module-level function (not a lambda, "
            "closure or method), 'module:function', or 'rm:PATH'"
        )
    if module != "__main__":
        return f"{module}:{name}", ""
    script = getattr(sys.modules["__main__"], "__file__", None)
    if not script:
        raise TypeError(
            f"reward {name} is defined interactively: put it in a module and pass 'module:function'"
        )
    return f"{Path(script).stem}:{name}", str(Path(script).resolve().parent)


def epoch_metrics(rows: Sequence[dict[str, Any]]) -> dict[str, float]:
    """One epoch's metrics from its updates' rows: ``avg_reward`` is the mean sampled score."""

    def mean(key: str) -> float:
        values = [r[key] for r in rows if isinstance(r.get(key), int | float)]
        return float(sum(values) / len(values)) if values else math.nan

    return {
        "avg_reward": mean("rollout/score_mean"),
        "kl": mean("kl/ref_mean"),
        "policy_loss": mean("loss/policy"),
        "samples_per_s": mean("perf/samples_per_s"),
        "updates": float(rows[-1]["step"]) if rows else 0.0,
    }


def write_prompts(path: Path, prompts: Sequence[str]) -> Path:
    """``prompts`` as the JSONL file ``run.prompts`` reads (one ``{"prompt": ...}`` a line); ``path``."""
    path.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    return path


def launch_command(
    config_file: Path, num_actors: int = 2, num_learners: int = 1, settings: Sequence[str] = ()
) -> list[str]:
    """The launcher command line that trains with ``config_file``; each of ``settings`` (``section.key=value``,
    a TOML value) is passed as ``--set`` and so overrides the file."""
    cmd = [sys.executable, str(ROOT / "launch.py"), "--config", str(config_file)]
    cmd += ["--actors", str(num_actors), "--learners", str(num_learners)]
    return cmd + [arg for setting in settings for arg in ("--set", setting)]


def follow_run(
    command: Sequence[str],
    metrics_path: Path,
    per_epoch: int,
    callbacks: Sequence[Callback] = (),
    stderr: IO | None = None,
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
) -> tuple[int, list[dict[str, float]]]:
    """Run the launcher ``command``, calling each callback with ``(epoch, metrics)`` after every ``per_epoch``
    updates it writes to ``metrics_path``; one returning ``False`` stops the run (with a final checkpoint).

    Returns the launcher's exit code and every epoch's metrics. ``stderr``: where the run's logs go (None: here).
    """
    follower = MetricsFollower(metrics_path, per_epoch, skip_rows=len(MetricsTail(metrics_path).read()))
    launcher = subprocess.Popen(list(command), stderr=stderr, env=env, cwd=cwd)
    try:
        while launcher.poll() is None:
            if not follower.poll(callbacks):
                launcher.send_signal(signal.SIGINT)  # a callback asked to stop: checkpoint and stop
                launcher.wait()
            time.sleep(0.5)  # following a file another process appends to
    except KeyboardInterrupt:
        launcher.send_signal(signal.SIGINT)
        launcher.wait()
        raise
    follower.poll(callbacks)
    return launcher.returncode, follower.epochs


class PPOTrainer:
    """Fine-tune ``config.model_name`` with PPO/GRPO/RLOO on prompts, in local actor and learner processes."""

    def __init__(self, config: PPOConfig, reward_model: str | Callable | None = None, **kwargs: Any):
        self.config = config.replace(**kwargs) if kwargs else config
        self.reward, self._reward_path = reward_spec(reward_model)
        self.run_dir = Path(self.config.run_dir or f"runs/api-{time.strftime('%Y%m%d-%H%M%S')}").resolve()
        self.adapters: Path | None = None  # the policy's latest adapters (trained or loaded)
        self._rounds = 0
        self.config.to_config()  # every settings problem now, not in a child process later

    def _round_config(self, prompts_file: Path, updates: int, run_dir: Path):
        more = [f"run.run_dir={json.dumps(str(run_dir))}", f"run.max_updates={updates}"]
        more.append(f"run.prompts={json.dumps(str(prompts_file))}")
        if self.reward:
            more.append(f"run.reward={json.dumps(self.reward)}")
        if self.adapters is not None:
            more.append(f"model.adapters={json.dumps(str(self.adapters))}")
        return self.config.to_config(*more)

    def train(
        self, prompts: Sequence[str], num_epochs: int = 10, callbacks: Sequence[Callback] = ()
    ) -> dict[str, Any]:
        """Train on ``prompts``; an epoch is one pass over them (``group_size`` samples each).

        Each callback gets ``(epoch, metrics)`` after every epoch (``metrics["avg_reward"]``...); one that
        returns ``False`` stops training (with a final checkpoint). Returns the last epoch's metrics, every
        epoch's under ``"epochs"`` and the run directory.
        """
        if not prompts:
            raise ValueError("train needs at least one prompt")
        run_dir = self.run_dir / f"train-{self._rounds}"
        self._rounds += 1
        run_dir.mkdir(parents=True, exist_ok=True)
        prompts_file = write_prompts(run_dir / "prompts.jsonl", prompts)
        per_epoch = max(1, math.ceil(len(prompts) * self.config.group_size / self.config.batch_size))
        cfg = self._round_config(prompts_file, per_epoch * num_epochs, run_dir)
        (run_dir / "config.toml").write_text(config_to_toml(cfg))
        epochs = self._run(run_dir, per_epoch, list(callbacks))
        self.adapters = run_dir / "adapters"
        last = epochs[-1] if epochs else {}
        return {**last, "epochs": epochs, "run_dir": str(run_dir)}

    def _run(self, run_dir: Path, per_epoch: int, callbacks: list[Callback]) -> list[dict[str, float]]:
        env = dict(os.environ)
        if self._reward_path:
            env["PYTHONPATH"] = os.pathsep.join(filter(None, [self._reward_path, env.get("PYTHONPATH")]))
        cmd = launch_command(run_dir / "config.toml", self.config.num_actors, self.config.num_learners)
        log_path = run_dir / "train.log"
        logger.info("training in %s (log: %s)", run_dir, log_path)
        with log_path.open("a") as log:
            code, epochs = follow_run(cmd, run_dir / "metrics.jsonl", per_epoch, callbacks, log, env, ROOT)
        if code != 0:
            tail = log_path.read_text()[-3000:]
            raise RuntimeError(f"training failed (exit code {code}); {log_path} ends:\n{tail}")
        return epochs

    def evaluate(self, prompts: Sequence[str]) -> dict[str, Any]:
        """Mean reward and KL to the base model of one sampled completion per prompt (and the samples)."""
        from actors.tasks import resolve_task
        from tools.evaluate import evaluate_policy

        out_dir = self.run_dir / f"eval-{time.strftime('%Y%m%d-%H%M%S')}"
        out_dir.mkdir(parents=True, exist_ok=True)
        prompts_file = write_prompts(out_dir / "prompts.jsonl", prompts)
        more = [f"run.prompts={json.dumps(str(prompts_file))}", f"run.reward={json.dumps(self.reward)}"]
        cfg = self.config.to_config(*more)
        if self._reward_path and self._reward_path not in sys.path:
            sys.path.insert(0, self._reward_path)
        task = resolve_task(cfg)
        return evaluate_policy(cfg, task.prompts, task.scorer, self.adapters, out_dir)

    def save_model(self, path: str | Path) -> None:
        """Write the policy's adapters (mlx-lm format: ``mlx_lm.generate --adapter-path PATH``)."""
        if self.adapters is None:
            raise RuntimeError("nothing to save: train or load a model first")
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        for name in ("adapters.safetensors", "adapter_config.json"):
            shutil.copy2(self.adapters / name, path / name)

    def load_model(self, path: str | Path) -> None:
        """Continue from saved adapters (a ``save_model`` folder or a run's ``adapters/``)."""
        if not (Path(path) / "adapters.safetensors").is_file():
            raise FileNotFoundError(f"{path}: no adapters.safetensors (save_model writes one)")
        self.adapters = Path(path).resolve()


class MetricsFollower:
    """Follows the rows a learner appends to ``metrics.jsonl`` (``MetricsTail``) and closes an epoch every
    ``per_epoch`` updates; ``skip_rows``: rows of earlier runs in the file (a learner appends to it)."""

    def __init__(self, path: Path, per_epoch: int, skip_rows: int = 0):
        self.tail, self.per_epoch, self.skip_rows = MetricsTail(path), per_epoch, skip_rows
        self.epochs: list[dict[str, float]] = []

    def poll(self, callbacks: Sequence[Callback]) -> bool:
        """Call the callbacks for each newly finished epoch; False when one of them asks to stop."""
        rows = self.tail.read()[self.skip_rows :]
        go_on = True
        while len(rows) >= (len(self.epochs) + 1) * self.per_epoch:
            start = len(self.epochs) * self.per_epoch
            metrics = epoch_metrics(rows[start : start + self.per_epoch])
            self.epochs.append(metrics)
            for callback in callbacks:
                go_on = callback(len(self.epochs), metrics) is not False and go_on
        return go_on
