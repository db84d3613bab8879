"""One learner rank against two (mlx.distributed ring on loopback) on the same total data: update time and result.

    python bench/distributed.py [--model default] [--batch 16] [--repeats 2] [--output bench/results/distributed.json]

Each configuration runs in fresh processes with the cores split evenly (2 ranks: half the BLAS threads each):
the same seeded LoRA policy + separate critic, the same synthetic batch of ``--batch`` sequences (64 prompt + 64
response tokens), one PPO update (1 epoch, 1 minibatch) after a warm-up update. Two ranks take half the batch
each. Prints the median update time of each and the largest difference between their trained weights, and
writes ``bench/results/distributed.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from bench.machine import describe_machine, run_record  # noqa: E402


def rank_main(out_dir: str, model: str, batch: int, repeats: int) -> None:
    """One rank (or the single learner): time ``repeats`` updates on its share, save the trained weights."""
    import mlx.core as mx
    from mlx.utils import tree_flatten

    from bench.learner import synthetic_experience
    from common.config import LoraConfig, ModelConfig, PPOUpdateConfig
    from common.models import load_model
    from learner.distributed import init_group
    from learner.models import build_policy_and_value
    from learner.ppo_learner import PPOLearner
    from learner.update import Experience

    group = init_group()
    rank, size = (group.rank(), group.size()) if group else (0, 1)
    loaded = load_model(ModelConfig(name=model))
    mx.random.seed(0)
    container = build_policy_and_value(loaded.model, LoraConfig(), "separate")
    share = batch // size
    cfg = PPOUpdateConfig(
        batch_size=share, num_minibatches=1, micro_batch_size=4, update_epochs=1, group_size=1
    )
    learner = PPOLearner(container, cfg, 1.0, group=group)
    whole = synthetic_experience(loaded.tokenizer, batch, 64, 64)
    part = slice(rank * share, (rank + 1) * share)
    exp = Experience(
        whole.prompt_ids[part], whole.response_ids[part], whole.behaviour_logprobs[part],
        whole.scores[part], whole.policy_versions[part],
    )  # fmt: skip
    learner.update(exp)  # warm-up and compile
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        learner.update(exp)
        times.append(time.perf_counter() - start)
    weights = {k: np.array(v) for k, v in tree_flatten(container.trainable_parameters())}
    np.savez(Path(out_dir) / f"rank{rank}.npz", times=np.array(times), **weights)


def run(ranks: int, out_dir: Path, opts) -> dict:
    from local_run import child_env, learner_rank_env

    code = f"from bench.distributed import rank_main; rank_main({str(out_dir)!r}, {opts.model!r}, {opts.batch}, {opts.repeats})"
    threads = max(1, (os.cpu_count() or 1) // ranks)
    procs = []
    for rank in range(ranks):
        env = child_env(threads, learner_rank_env(out_dir, "127.0.0.1", rank, ranks))
        env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
        procs.append(subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, env=env))
    if any(p.wait() != 0 for p in procs):
        raise RuntimeError(f"the {ranks}-rank run failed")
    saved = dict(np.load(out_dir / "rank0.npz"))
    times = saved.pop("times")
    return {"ranks": ranks, "update_s": float(np.median(times)), "weights": saved}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="default")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--output", default=str(Path(__file__).parent / "results" / "distributed.json"))
    opts = parser.parse_args()
    rows = []
    for ranks in (1, 2):
        with tempfile.TemporaryDirectory() as tmp:
            rows.append(run(ranks, Path(tmp), opts))
    diff = max(float(np.abs(rows[0]["weights"][k] - rows[1]["weights"][k]).max()) for k in rows[0]["weights"])
    header = f"{describe_machine()}; model {opts.model}; {opts.batch} sequences x (64 + 64) tokens in total"
    print(header)
    print("| ranks | sequences per rank | update s | vs 1 rank |\n|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['ranks']} | {opts.batch // r['ranks']} | {r['update_s']:.2f} | {rows[0]['update_s'] / r['update_s']:.2f}x |"
        )
    print(f"largest difference between the trained weights of 1 and 2 ranks: {diff:.2e}")
    output = Path(opts.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    summary = {
        **run_record(),
        "machine": header,
        "batch": opts.batch,
        "rows": [{k: v for k, v in r.items() if k != "weights"} for r in rows],
    }
    output.write_text(json.dumps({**summary, "max_weight_diff": diff}, indent=2))


if __name__ == "__main__":
    main()
