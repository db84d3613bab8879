"""Generation with GRPO-style groups: each distinct prompt prefilled once (its KV cache copied) vs every copy.

    python -m common.blas -- python bench/grouped_prompts.py [--model default] [--prompts 8] [--group 4]
        [--new-tokens 24] [--repeats 3] [--output bench/results/grouped_prompts.json]

Both variants run alternately in one process on the same prompts and seeds; the samples are identical (see
tests/unit/test_sampler.py), so the ratio of the best times is the speedup of prompt sharing.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from actors.sampler import SamplingParams, generate_completions  # noqa: E402
from bench.machine import describe_machine, run_record  # noqa: E402
from common.config import ModelConfig  # noqa: E402
from common.models import load_model  # noqa: E402

logger = logging.getLogger("bench.grouped_prompts")
QUESTIONS = [
    "Describe the ocean in a few sentences.",
    "What do you like about mornings, and why?",
    "Explain what a computer is to a child.",
    "Tell me three facts about cats.",
    "Why do people travel to other countries?",
    "What is music, in your own words?",
    "Describe a forest after the rain.",
    "How do plants grow from seeds?",
]


def time_generation(model, prompts, params, stop_ids, share: bool) -> float:
    start = time.perf_counter()
    generate_completions(model, prompts, params, stop_ids, list(range(len(prompts))), share_prompts=share)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="default")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--group", type=int, default=4)
    parser.add_argument("--new-tokens", type=int, default=24)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--output", default=str(Path(__file__).parent / "results" / "grouped_prompts.json"))
    args = parser.parse_args()
    loaded = load_model(ModelConfig(name=args.model))
    texts = [QUESTIONS[i % len(QUESTIONS)] for i in range(args.prompts)]
    encoded = [
        loaded.tokenizer.apply_chat_template([{"role": "user", "content": t}], add_generation_prompt=True)
        for t in texts
    ]
    prompts = [p for p in encoded for _ in range(args.group)]
    params = SamplingParams(max_new_tokens=args.new_tokens)
    stop_ids = set(loaded.tokenizer.eos_token_ids)
    time_generation(loaded.model, prompts, params, stop_ids, share=True)  # warm-up (kernels, caches)
    times = {"shared": [], "every copy": []}
    for _ in range(args.repeats):
        times["shared"].append(time_generation(loaded.model, prompts, params, stop_ids, share=True))
        times["every copy"].append(time_generation(loaded.model, prompts, params, stop_ids, share=False))
    best = {k: min(v) for k, v in times.items()}
    result = {
        **run_record(),
        "machine": describe_machine(),
        "model": args.model,
        "sequences": len(prompts),
        "group": args.group,
        "prompt_tokens_mean": sum(map(len, encoded)) / len(encoded),
        "new_tokens": args.new_tokens,
        "best_s": best,
        "speedup": best["every copy"] / best["shared"],
    }
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(result, indent=2))
    logger.info("%s", json.dumps(result, indent=2))


if __name__ == "__main__":
    from common.logs import setup_logging

    setup_logging("bench")
    main()
