"""Update time on a batch of mixed response lengths: what cutting micro-batches to their own length saves.

    python bench/padding.py [--model default] [--batch 32] [--micro 4] [--repeats 2] [--root CHECKOUT]

GRPO (groups of 4), LoRA on every linear layer, prompts of 30 tokens and responses drawn uniformly from 8 to
``--max-response`` tokens (the spread of a GRPO batch: most answers stop well before the limit). ``--root`` runs
another checkout's learner on the very same batch (e.g. one from before micro-batches were cut to length), so two
invocations in one command line compare the two side by side. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="default")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--micro", type=int, default=4)
    parser.add_argument("--max-response", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--root", default=str(Path(__file__).resolve().parent.parent))
    parser.add_argument(
        "--fresh", action="store_true", help="a new batch (new lengths) for every update, as in training"
    )
    opts = parser.parse_args()
    sys.path.insert(0, opts.root)
    import numpy as np

    from common.config import LoraConfig, ModelConfig, PPOUpdateConfig
    from common.models import load_model
    from learner.experience import Experience
    from learner.models import build_policy_and_value
    from learner.ppo_learner import PPOLearner

    def batch(seed: int) -> Experience:
        rng = np.random.default_rng(seed)
        lengths = rng.integers(8, opts.max_response + 1, opts.batch)
        return Experience.from_rows(
            [rng.integers(20, 40000, 30).tolist() for _ in lengths],
            [rng.integers(20, 40000, n).tolist() for n in lengths],
            [np.full(n, -3.0, np.float32) for n in lengths],
            rng.normal(size=opts.batch).astype(np.float32),
            np.zeros(opts.batch),
        )

    exp = batch(0)
    loaded = load_model(ModelConfig(name=opts.model))
    container = build_policy_and_value(loaded.model, LoraConfig(), value_kind=None)
    cfg = PPOUpdateConfig(algorithm="grpo", group_size=4, batch_size=opts.batch, num_minibatches=1,
                          micro_batch_size=opts.micro, update_epochs=1, kl_coef=0.0)  # fmt: skip
    learner = PPOLearner(container, cfg, temperature=1.0)
    learner.update(exp)  # warm-up and compile
    times = []
    for i in range(opts.repeats):
        start = time.perf_counter()
        learner.update(batch(i + 1) if opts.fresh else exp)
        times.append(time.perf_counter() - start)
    lengths = exp.tokens.lengths - exp.prompt_lens
    summary = min(times) if not opts.fresh else sum(times) / len(times)  # fresh: every new shape counts
    print(json.dumps({"root": opts.root, "fresh": opts.fresh, "update_s": summary, "times": times,
                      "response_tokens": int(lengths.sum()), "padded_response_tokens": opts.batch * int(lengths.max())}))  # fmt: skip


if __name__ == "__main__":
    main()
