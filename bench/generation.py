"""Generation throughput: our sampler vs ``mlx_lm.batch_generate``, with vs without the optimized BLAS.

    python bench/generation.py [--model default] [--batch-sizes 1,8,32] [--new-tokens 64] [--skip-stock]
                               [--repeats 1] [--output bench/results/generation.json]

Runs one worker process per BLAS setting (the preload must be in place when a process starts); each worker
times both samplers on the same model, prompts and settings, alternating, after a warm-up. Every sequence
generates exactly ``--new-tokens`` tokens (stop tokens ignored) so both sides do the same work. Prints a
markdown table and writes ``bench/results/generation.json``. On a GPU backend the BLAS setting means nothing:
rows are labelled ``gpu`` and ``--skip-stock`` runs the one worker. ``--repeats N`` times each (batch, sampler)
N times in turn and the table shows the fastest (the first pass at a new batch size can include one-time kernel
compilation on CUDA).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.machine import describe_machine, run_record  # noqa: E402

QUESTIONS = [
    "What is the capital of France?",
    "Write a short poem about autumn leaves falling in a quiet park.",
    "Explain photosynthesis to a ten year old.",
    "List three uses of a paperclip.",
    "Why is the sky blue? Give the physical reason in two sentences.",
    "Translate 'good morning' into Spanish.",
    "What is 17 times 3?",
    "Describe the taste of a lemon to someone who has never had one, using at least two comparisons.",
]


def _prompts(tokenizer, n: int) -> list[list[int]]:
    chats = [[{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}] for i in range(n)]
    return [tokenizer.apply_chat_template(c, add_generation_prompt=True) for c in chats]


def _time_ours(loaded, prompts, new_tokens: int) -> tuple[int, float]:
    from actors.sampler import SamplingParams, generate_completions

    params = SamplingParams(temperature=1.0, max_new_tokens=new_tokens)
    start = time.perf_counter()
    out = generate_completions(loaded.model, prompts, params, stop_ids=set(), seeds=list(range(len(prompts))))
    return sum(len(c.response_ids) for c in out), time.perf_counter() - start


def _time_mlx_lm(loaded, prompts, new_tokens: int) -> tuple[int, float]:
    from mlx_lm import batch_generate
    from mlx_lm.sample_utils import make_sampler

    start = time.perf_counter()
    out = batch_generate(
        loaded.model,
        loaded.tokenizer,
        prompts,
        max_tokens=new_tokens,
        sampler=make_sampler(temp=1.0),
        return_token_ids=True,
        completion_batch_size=max(32, len(prompts)),
        prefill_batch_size=len(prompts),
    )
    return sum(len(t) for t in out.token_ids), time.perf_counter() - start


def run_worker(args: argparse.Namespace) -> None:
    """Measure both samplers in this process and print one JSON line per measurement."""
    from common.blas import is_preloaded
    from common.config import ModelConfig
    from common.models import load_model

    loaded = load_model(ModelConfig(name=args.model))
    import mlx.core as mx

    loaded.tokenizer._eos_token_ids = set()  # both sides generate exactly --new-tokens tokens
    on_cpu = mx.default_device() == mx.cpu
    blas = ("openblas" if is_preloaded() else "stock") if on_cpu else "gpu"  # the BLAS only matters on CPU
    samplers = {"ours": _time_ours, "mlx_lm.batch_generate": _time_mlx_lm}
    for fn in samplers.values():  # warm-up: first-call allocation and kernel setup
        fn(loaded, _prompts(loaded.tokenizer, 2), 4)
    for batch in args.batch_sizes:
        prompts = _prompts(loaded.tokenizer, batch)
        for repeat in range(args.repeats):
            for name, fn in samplers.items():
                tokens, seconds = fn(loaded, prompts, args.new_tokens)
                row = {"blas": blas, "batch": batch, "sampler": name, "tokens": tokens, "seconds": seconds}
                print(
                    json.dumps(
                        {**row, "repeat": repeat, "dtype": str(loaded.dtype).removeprefix("mlx.core.")}
                    ),
                    flush=True,
                )


def _table(rows: list[dict], batch_sizes: list[int]) -> str:
    rate: dict[tuple, float] = {}
    for r in rows:  # the fastest of the repeats
        key = (r["blas"], r["batch"], r["sampler"])
        rate[key] = max(rate.get(key, 0.0), r["tokens"] / r["seconds"])
    lines = [
        "| batch | BLAS | ours tok/s | mlx_lm.batch_generate tok/s | ours / mlx_lm | ours: openblas / stock |",
        "|---:|---|---:|---:|---:|---:|",
    ]
    for batch in batch_sizes:
        for blas in ("openblas", "stock", "gpu"):
            ours, theirs = rate.get((blas, batch, "ours")), rate.get((blas, batch, "mlx_lm.batch_generate"))
            if ours is None or theirs is None:
                continue
            stock = rate.get(("stock", batch, "ours"))
            speedup = f"{ours / stock:.1f}x" if blas == "openblas" and stock else ""
            lines.append(
                f"| {batch} | {blas} | {ours:.1f} | {theirs:.1f} | {ours / theirs:.2f}x | {speedup} |"
            )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="default")
    parser.add_argument("--batch-sizes", default="1,8,32", type=lambda s: [int(x) for x in s.split(",")])
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--skip-stock", action="store_true", help="only the optimized-BLAS worker")
    parser.add_argument(
        "--repeats", type=int, default=1, help="timings per batch size and sampler (best shown)"
    )
    parser.add_argument("--output", default=str(Path(__file__).parent / "results" / "generation.json"))
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        run_worker(args)
        return
    from common.blas import env_with_fast_blas

    fast_env = env_with_fast_blas()
    stock_env = {k: v for k, v in fast_env.items() if k not in ("LD_PRELOAD", "OPENBLAS_CORETYPE")}
    envs = [fast_env] if args.skip_stock else [fast_env, stock_env]
    worker = [
        sys.executable,
        __file__,
        "--worker",
        "--model",
        args.model,
        "--new-tokens",
        str(args.new_tokens),
        "--repeats",
        str(args.repeats),
    ]
    worker += ["--batch-sizes", ",".join(map(str, args.batch_sizes))]
    rows = []
    for env in envs:
        out = subprocess.run(worker, env=env, capture_output=True, text=True)
        if out.returncode != 0:
            sys.stderr.write(out.stdout + out.stderr)
            raise SystemExit(f"generation worker failed with exit code {out.returncode}")
        rows += [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    dtype = rows[0]["dtype"] if rows else "?"
    header = (
        f"Machine: {describe_machine()}; date {date.today()}; model {args.model} ({dtype}); "
        f"{args.new_tokens} new tokens/sequence."
    )
    print(header)
    print(_table(rows, args.batch_sizes))
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps({**run_record(), "machine": header, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
