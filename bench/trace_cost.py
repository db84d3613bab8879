"""How much of the learner's first update is ``mx.compile`` tracing: host seconds per compiled call, first vs later.

    python bench/trace_cost.py MODEL BATCH PROMPT_LEN RESPONSE_LEN MICRO LORA_RANK [UPDATES]

Builds the learner as ``bench/first_update.py`` does (PPO, value head on the trunk, LoRA on every linear layer)
with every ``mx.compile`` it makes wrapped so that each call of a compiled function is timed on the host. A call
returns lazy arrays, so its time is building the graph: the first call of a shape traces the Python function
(and simplifies the trace), a later one replays it. Prints, per compiled function, the first call's and the
median later call's host milliseconds, and the updates' times. The tracing cost depends on the model's layers
and the host's speed, not on the batch, so a small batch on the CPU gives the GPU run's tracing time too.
"""

from __future__ import annotations

import sys
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import mlx.core as mx  # noqa: E402
import numpy as np  # noqa: E402

CALLS: dict[str, list[float]] = defaultdict(list)
_compile = mx.compile


def _timed_compile(fn, *args, **kwargs):
    compiled = _compile(fn, *args, **kwargs)
    name = getattr(getattr(fn, "func", fn), "__qualname__", repr(fn))

    def call(*a, **kw):
        start = time.perf_counter()
        out = compiled(*a, **kw)
        CALLS[name].append(time.perf_counter() - start)
        return out

    return call


def main(argv: list[str]) -> None:
    mx.compile = _timed_compile  # before the learner's modules make their compiled functions
    from bench.learner import synthetic_experience
    from common.config import LoraConfig, ModelConfig, PPOUpdateConfig
    from common.models import load_model
    from learner.models import build_policy_and_value
    from learner.ppo_learner import PPOLearner

    model, batch, prompt_len, response_len, micro, rank = argv[0], *map(int, argv[1:6])
    updates = int(argv[6]) if len(argv) > 6 else 3
    loaded = load_model(ModelConfig(name=model))
    container = build_policy_and_value(
        loaded.model, LoraConfig(rank=rank, alpha=2.0 * rank), value_kind="shared"
    )
    cfg = PPOUpdateConfig(batch_size=batch, num_minibatches=1, micro_batch_size=micro, micro_batch_tokens=0,
                          update_epochs=1, group_size=1, compute_threads=1)  # fmt: skip
    learner = PPOLearner(container, cfg, temperature=1.0)
    exp = synthetic_experience(loaded.tokenizer, batch, prompt_len, response_len)
    for i in range(updates):
        start = time.perf_counter()
        learner.update(exp)
        print(f"update {i}: {time.perf_counter() - start:.2f} s", flush=True)
    print("| compiled function | calls | first call ms | later calls, median ms |\n|---|---:|---:|---:|")
    for name, times in CALLS.items():
        later = f"{np.median(times[1:]) * 1e3:.1f}" if len(times) > 1 else "-"
        print(f"| {name} | {len(times)} | {times[0] * 1e3:.1f} | {later} |")


if __name__ == "__main__":
    main(sys.argv[1:])
