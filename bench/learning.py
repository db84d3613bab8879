"""Learning benchmark (issue 14): reward against wall-clock time, ours and a peer's, same task, model and budget.

    python bench/learning.py [--tasks arithmetic,format,length] [--systems ppo,grpo,drgrpo,dapo,legacy]
                             [--peer mlx-lm-lora] [--seeds 0,1,2] [--budget-s 240]
    python bench/learning.py --analyse-only      # curves, bench/results/learning.json and the PNGs again

Every run trains the bundled SmolLM2-135M-Instruct for a fixed wall-clock budget (from the start of its process,
model loading included) and scores with ``bench.learning_rewards``, which logs every score with its time; the
curves are the mean score of what was sampled in a trailing window, so every system is measured the same way.

- ours: ``launch.py --actors 2 --learners 1`` with each configuration of ``SYSTEMS``, stopped with SIGINT at
  the budget;
- ``legacy``: the same, run from a git worktree of ``--legacy-ref`` (the code before issue 14) with that code's
  Python-API defaults ("today's default");
- ``--peer mlx-lm-lora``: mlx-lm-lora 5.10.2's GRPO in its own virtual environment (``bench/peer_env.py``,
  installed on first use), through ``bench/peer_mlx_lm_lora.py``.

Runs go one at a time (the machine's cores are the budget); raw logs land in ``bench/results/learning/``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script: the repository's packages
    sys.path.insert(0, str(ROOT))

from bench.learning_curves import analyse  # noqa: E402

logger = logging.getLogger("bench.learning")
OUT = ROOT / "bench" / "results" / "learning"
TASK_TOKENS = {"arithmetic": 32, "format": 48, "length": 32}
"""sampling.max_new_tokens per task (the peer gets the same)."""
SHARED = {
    "model.name": "default",
    "sampling.batch_size": 8,
    "ppo.batch_size": 16,
    "ppo.group_size": 4,
    "ppo.num_minibatches": 1,
    "ppo.update_epochs": 1,
    "ppo.micro_batch_size": 8,
    "run.max_updates": 100000,
    "run.checkpoint_every": 100000,
}
CRITIC_FREE = {"ppo.algorithm": "grpo", "ppo.kl_coef": 0.0, "ppo.learning_rate": 1e-3}
SYSTEMS: dict[str, dict[str, object]] = {
    "ppo": {
        "ppo.algorithm": "ppo", "ppo.update_epochs": 2, "ppo.num_minibatches": 2, "ppo.micro_batch_size": 4,
        "ppo.kl_coef": 0.02, "ppo.learning_rate": 5e-4,
    },
    "grpo": CRITIC_FREE | {"ppo.kl_loss_coef": 0.04, "ppo.loss_aggregation": "seq_mean_token_mean"},
    "drgrpo": CRITIC_FREE | {"ppo.advantage_norm": "none", "ppo.loss_aggregation": "seq_mean_token_sum_norm"},
    "dapo": CRITIC_FREE | {"ppo.dynamic_sampling": True, "ppo.clip_low": 0.2, "ppo.clip_high": 0.28},
}  # fmt: skip
"""Our configurations (``--set`` overrides over ``SHARED``)."""
LEGACY = {
    "ppo.algorithm": "grpo", "ppo.kl_coef": 0.05, "ppo.learning_rate": 2e-4, "ppo.micro_batch_size": 8,
}  # fmt: skip
"""The Python API's defaults before issue 14 (``mlx_ppo/config.py`` at --legacy-ref) that differ from SHARED."""
PEER_LR = 1e-3
"""mlx-lm-lora's learning rate (its own Adam, without bias correction): the best of 1e-4 / 3e-4 / 1e-3 on length
(BENCHMARKS.md has the sweep); ours, 1e-3 (of 3e-4 / 1e-3 / 3e-3: 3e-3 rose fastest on length and collapsed
arithmetic to 0)."""


@dataclass(frozen=True)
class Run:
    system: str
    task: str
    seed: int

    @property
    def name(self) -> str:
        return f"{self.task}-{self.system}-s{self.seed}"


def toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return json.dumps(value)


def overrides(run: Run, lr: float | None = None, extra: Sequence[str] = ()) -> list[str]:
    """``--set`` items of ``run``: SHARED, the system's own, the task's, then ``lr`` and ``extra`` (sweeps)."""
    settings = SHARED | (LEGACY if run.system == "legacy" else SYSTEMS[run.system])
    if lr is not None:
        settings["ppo.learning_rate"] = lr
    settings |= {
        "run.task": run.task,
        "run.reward": f"bench.learning_rewards:{run.task}",
        "run.seed": run.seed,
        "sampling.max_new_tokens": TASK_TOKENS[run.task],
    }
    return [f"{key}={toml_value(value)}" for key, value in settings.items()] + list(extra)


def legacy_root(ref: str) -> Path:
    """A git worktree of ``ref`` (made once), with this checkout's logged rewards copied in."""
    root = Path(os.environ.get("TMPDIR", "/tmp")) / f"mlx-ppo-legacy-{ref}"
    if not root.exists():
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(root), ref], check=True)
    shutil.copy(ROOT / "bench" / "learning_rewards.py", root / "bench" / "learning_rewards.py")
    return root


def run_for_budget(command: list[str], cwd: Path, log: Path, env: dict, budget_s: float) -> dict:
    """Start ``command``; at the budget send SIGINT (a clean stop), then SIGKILL after 90 s. Returns timings."""
    started = time.time()
    with open(log.with_suffix(".log"), "w") as out:
        proc = subprocess.Popen(
            command, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            proc.wait(timeout=budget_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGINT)
            try:
                proc.wait(timeout=90)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    return {"t0": started, "wall_s": time.time() - started, "returncode": proc.returncode}


def ours(
    run: Run, budget_s: float, root: Path, rewards: Path, lr: float | None, extra: Sequence[str]
) -> dict:
    """One run of our launcher (or the legacy worktree's) for the budget."""
    run_dir = Path(os.environ.get("TMPDIR", "/tmp")) / "mlx-ppo-learning" / run.name
    shutil.rmtree(run_dir, ignore_errors=True)
    command = [sys.executable, "launch.py", "--actors", "2", "--learners", "1", "--run-dir", str(run_dir)]
    for item in overrides(run, lr, extra):
        command += ["--set", item]
    env = os.environ | {"MLX_PPO_REWARD_LOG": str(rewards), "PYTHONPATH": str(root)}
    record = run_for_budget(command, root, rewards, env, budget_s)
    metrics = run_dir / "metrics.jsonl"
    rows = [json.loads(line) for line in metrics.read_text().splitlines()] if metrics.exists() else []
    return record | {"updates": len(rows), "command": command[1:]}


def peer(run: Run, budget_s: float, rewards: Path, lr: float | None) -> dict:
    """One run of mlx-lm-lora's GRPO on the same model, prompts, reward, sampling and budget."""
    from bench.peer_env import ensure_peer_python
    from common.config import ModelConfig
    from common.models import resolve_model_folder

    python = ensure_peer_python(ROOT)
    out_dir = Path(os.environ.get("TMPDIR", "/tmp")) / "mlx-ppo-learning" / run.name
    command = [
        str(python), "bench/peer_mlx_lm_lora.py", "--model", str(resolve_model_folder(ModelConfig().name)),
        "--task", run.task, "--budget-s", str(budget_s), "--seed", str(run.seed), "--group-size", "4",
        "--prompts-per-step", "4", "--max-new-tokens", str(TASK_TOKENS[run.task]), "--learning-rate", str(lr or PEER_LR),
        "--lora-rank", "8", "--lora-alpha", "16", "--out-dir", str(out_dir),
    ]  # fmt: skip
    env = os.environ | {"MLX_PPO_REWARD_LOG": str(rewards)}
    record = run_for_budget(command, ROOT, rewards, env, budget_s + 120)  # it stops itself at the budget
    steps = out_dir / "peer_run.json"
    updates = len(json.loads(steps.read_text()).get("steps", [])) if steps.exists() else 0
    return record | {"updates": updates, "command": command[1:]}


def run_one(
    run: Run, budget_s: float, legacy_ref: str, out: Path, lr: float | None = None, extra: Sequence[str] = ()
) -> None:
    """Run ``run`` unless its record exists in ``out``; write its rewards log and record there."""
    record_path = out / f"{run.name}.json"
    if record_path.exists():
        logger.info("%s: done already (%s)", run.name, record_path)
        return
    rewards = out / f"{run.name}.rewards.jsonl"
    rewards.unlink(missing_ok=True)
    logger.info("%s: running for %.0f s", run.name, budget_s)
    if run.system == "mlx-lm-lora":
        record = peer(run, budget_s, rewards, lr)
    else:
        root = legacy_root(legacy_ref) if run.system == "legacy" else ROOT
        record = ours(run, budget_s, root, rewards, lr, extra)
    record |= {"system": run.system, "task": run.task, "seed": run.seed, "budget_s": budget_s, "lr": lr}
    record |= {"extra": list(extra)}
    record_path.write_text(json.dumps(record, indent=1))
    logger.info("%s: %d updates, exit %s", run.name, record["updates"], record["returncode"])


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tasks", default="arithmetic,format,length")
    p.add_argument("--systems", default="ppo,grpo,drgrpo,dapo,legacy")
    p.add_argument("--peer", default="", choices=["", "mlx-lm-lora"], help="also run this peer trainer")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--budget-s", type=float, default=240.0, help="wall-clock seconds per run")
    p.add_argument("--legacy-ref", default="018d55a", help="the commit 'legacy' runs (before issue 14)")
    p.add_argument("--analyse-only", action="store_true", help="only rebuild the summary and curves")
    p.add_argument("--lr", type=float, default=None, help="override every system's learning rate (sweeps)")
    p.add_argument("--out", type=Path, default=OUT, help="where the runs' logs go (a sweep: elsewhere)")
    p.add_argument(
        "--set", action="append", default=[], help="more section.key=value for our systems (sweeps)"
    )
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    if not args.analyse_only:
        systems = [s for s in args.systems.split(",") if s] + ([args.peer] if args.peer else [])
        unknown = set(systems) - set(SYSTEMS) - {"legacy", "mlx-lm-lora"}
        if unknown:
            raise SystemExit(f"unknown systems {sorted(unknown)}: use {', '.join(SYSTEMS)}, legacy")
        for seed in (int(s) for s in args.seeds.split(",")):
            for task in args.tasks.split(","):
                for system in systems:
                    run_one(
                        Run(system, task, seed), args.budget_s, args.legacy_ref, args.out, args.lr, args.set
                    )
    summary = ROOT / "bench" / "results" / "learning.json" if args.out == OUT else args.out / "summary.json"
    analyse(args.out, summary, argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
