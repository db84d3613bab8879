"""Continuous batching: finished rows refilled at once vs the same rows in fixed chunks vs all at once.

    python -m common.blas -- python bench/refill.py [--model default] [--prompts 32] [--rows 8]
        [--new-tokens 64] [--repeats 2] [--output bench/results/refill.json]

``--prompts`` chat prompts of mixed length, stop tokens on (responses end where the model ends them, up to
``--new-tokens``), the same seeds in every variant (so the same samples, see tests/unit/test_sampler.py):

- ``chunks``: ``--rows`` sequences at a time, each chunk run until its longest sequence ends;
- ``refill``: at most ``--rows`` live, each finished row refilled with the next prompt (``sampling.max_rows``);
- ``all``: every sequence in one batch (the most memory).

Variants alternate in one process; tokens/s of the best repeat, as ratios to ``chunks``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from actors.sampler import SamplingParams, generate_completions  # noqa: E402
from bench.grouped_prompts import QUESTIONS  # noqa: E402
from bench.machine import describe_machine, run_record  # noqa: E402
from common.config import ModelConfig  # noqa: E402
from common.models import load_model  # noqa: E402


def run(model, prompts, params, stop_ids, variant: str, rows: int) -> tuple[float, int]:
    """Seconds and response tokens of one variant."""
    seeds = list(range(len(prompts)))
    start = time.perf_counter()
    if variant == "chunks":
        out = []
        for i in range(0, len(prompts), rows):
            out += generate_completions(model, prompts[i : i + rows], params, stop_ids, seeds[i : i + rows])
    else:
        out = generate_completions(
            model, prompts, params, stop_ids, seeds, max_rows=rows if variant == "refill" else 0
        )
    return time.perf_counter() - start, sum(len(c.response_ids) for c in out)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="default")
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--rows", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--output", default=str(Path(__file__).parent / "results" / "refill.json"))
    args = parser.parse_args()
    loaded = load_model(ModelConfig(name=args.model))
    prompts = [
        loaded.tokenizer.apply_chat_template(
            [{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)] + " " * (i % 5)}],
            add_generation_prompt=True,
        )
        for i in range(args.prompts)
    ]
    params = SamplingParams(temperature=1.0, max_new_tokens=args.new_tokens)
    stop_ids = set(loaded.tokenizer.eos_token_ids)
    best: dict[str, float] = {}
    tokens = {}
    run(loaded.model, prompts[: args.rows], params, stop_ids, "all", args.rows)  # warm-up
    for _ in range(args.repeats):
        for variant in ("chunks", "refill", "all"):
            seconds, n = run(loaded.model, prompts, params, stop_ids, variant, args.rows)
            best[variant] = min(best.get(variant, seconds), seconds)
            tokens[variant] = n
    assert len(set(tokens.values())) == 1, f"the variants sampled different amounts: {tokens}"
    header = (
        f"{describe_machine()}; model {args.model}; {args.prompts} prompts, at most {args.rows} rows, up to "
        f"{args.new_tokens} new tokens ({tokens['all']} sampled); best of {args.repeats}"
    )
    print(header)
    print("| variant | tokens/s vs chunks |\n|---|---:|")
    for variant in best:
        print(f"| {variant} | {best['chunks'] / best[variant]:.2f}x |")
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    rows = [{"variant": v, "seconds": best[v], "tokens": tokens[v]} for v in best]
    output.write_text(
        json.dumps({**run_record(), "machine": header, "rows": rows, "max_rows": args.rows}, indent=2)
    )


if __name__ == "__main__":
    main()
