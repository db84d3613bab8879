"""Generation throughput: our sampler vs ``mlx_lm.batch_generate``, with vs without the optimized BLAS, and MBU.

    python bench/generation.py [--model default|DIR] [--batch-sizes 1,8,32] [--new-tokens 64] [--mixed-lengths]
                               [--samplers ours,mlx_lm] [--lora] [--skip-stock] [--repeats 1]
                               [--output bench/results/generation.json]

Runs one worker process per BLAS setting (the preload must be in place when a process starts); each worker
times the samplers on the same model, prompts and settings, alternating, after a warm-up. Stop tokens are ignored
so every sampler does the same work: each sequence generates exactly ``--new-tokens`` tokens, or with
``--mixed-lengths`` prompts of 1-4 questions (different lengths) and, per sequence, a number of new tokens drawn
between 16 and ``--new-tokens`` (the same draws for every sampler; ``mlx_lm.batch_generate`` takes them as its
per-prompt ``max_tokens``). Prints a markdown table and writes ``bench/results/generation.json``. On a GPU backend
the BLAS setting means nothing: rows are labelled ``gpu`` and ``--skip-stock`` runs the one worker. ``--repeats N``
times each (batch, sampler) N times in turn and the table shows the fastest (the first pass at a new batch size
can include one-time kernel compilation on CUDA, and our compiled decode step's first trace of a shape).

Samplers (``--samplers``): ``ours`` (``generate_completions`` with its defaults for this device: on a GPU the
compiled decode step of ``actors/decode.py``), ``ours-plain`` (the uncompiled step over mlx-lm's BatchKVCache),
``ours-compiled`` (the compiled step forced, tokens drawn on the device, e.g. on the CPU), ``mlx_lm``.
``--lora`` samples with the actors' policy (LoRA adapters on every linear layer) instead of the bare model.

MBU (``bench/chips.py``): the bytes the decode steps must read (weights once per step, each sequence's own KV
cache, no padding) over the elapsed time and the chip's peak bandwidth. ``MBU`` divides by the whole call (prefill
included, so a lower bound); ``decode MBU`` (ours only) by the time from the first token to the end.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

import numpy as np

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
SAMPLERS = {
    "ours": "ours",
    "ours-plain": "ours (uncompiled step)",
    "ours-compiled": "ours (compiled step)",
    "mlx_lm": "mlx_lm.batch_generate",
}
MIN_NEW = 16
"""Shortest response ``--mixed-lengths`` draws."""


def _prompts(tokenizer, n: int, mixed: bool) -> list[list[int]]:
    """``n`` chat prompts: question ``i``, or with ``mixed`` 1-4 consecutive questions in one turn."""
    sizes = np.random.default_rng(0).integers(1, 5, size=n) if mixed else np.ones(n, int)
    texts = [" ".join(QUESTIONS[(i + k) % len(QUESTIONS)] for k in range(s)) for i, s in enumerate(sizes)]
    return [
        tokenizer.apply_chat_template([{"role": "user", "content": t}], add_generation_prompt=True)
        for t in texts
    ]


def _lengths(n: int, new_tokens: int, mixed: bool) -> list[int]:
    """New tokens per sequence: all ``new_tokens``, or with ``mixed`` drawn in ``[min(16, new), new_tokens]``."""
    if not mixed:
        return [new_tokens] * n
    return [
        int(x) for x in np.random.default_rng(1).integers(min(MIN_NEW, new_tokens), new_tokens + 1, size=n)
    ]


def _time_ours(loaded, prompts, lengths, variant: str) -> tuple[int, float, float]:
    """(tokens, seconds, seconds from the first token to the end) of one ``generate_completions`` call."""
    from actors.sampler import SamplingParams, generate_completions

    forced = {"ours-plain": {"compiled_decode": False}, "ours-compiled": {"compiled_decode": True}}
    extra = forced.get(variant, {})
    if variant == "ours-compiled":
        extra["host_sampling"] = False
    params = SamplingParams(temperature=1.0, max_new_tokens=max(lengths), **extra)
    first: list[float] = []
    start = time.perf_counter()
    out = generate_completions(
        loaded.model,
        prompts,
        params,
        stop_ids=set(),
        seeds=list(range(len(prompts))),
        on_step=lambda: first or first.append(time.perf_counter()),
        max_new=lengths,
    )
    end = time.perf_counter()
    return sum(len(c.response_ids) for c in out), end - start, end - (first[0] if first else start)


def _time_mlx_lm(loaded, prompts, lengths, variant: str) -> tuple[int, float, None]:
    from mlx_lm import batch_generate
    from mlx_lm.sample_utils import make_sampler

    start = time.perf_counter()
    out = batch_generate(
        loaded.model,
        loaded.tokenizer,
        prompts,
        max_tokens=list(lengths),
        sampler=make_sampler(temp=1.0),
        return_token_ids=True,
        completion_batch_size=max(32, len(prompts)),
        prefill_batch_size=len(prompts),
    )
    return sum(len(t) for t in out.token_ids), time.perf_counter() - start, None


def weight_bytes_per_step(model) -> int:
    """Bytes of weights one decode step reads: every parameter once, except an untied input embedding (a step
    gathers only its batch's rows of it), with a float32 head counted at 4 bytes an entry."""
    from mlx.utils import tree_flatten

    total = sum(v.nbytes for _, v in tree_flatten(model.parameters()))
    embed = model.model.embed_tokens.weight if hasattr(model, "model") else None
    tied = "lm_head" not in model
    if embed is not None and not tied and "scales" not in model.model.embed_tokens:
        total -= embed.nbytes
    head = model.model.embed_tokens if tied else model.lm_head
    if getattr(model, "float32_head", False) and "scales" not in head:
        total += head.weight.size * 4 - head.weight.nbytes
    return total


def kv_position_bytes(model, dtype_bytes: int) -> int:
    from bench.chips import kv_bytes_per_position

    args = model.args
    head_dim = getattr(args, "head_dim", None) or args.hidden_size // args.num_attention_heads
    kv_heads = getattr(args, "num_key_value_heads", None) or args.num_attention_heads
    return kv_bytes_per_position(len(model.layers), kv_heads, head_dim, dtype_bytes)


def _load(args: argparse.Namespace):
    from common.config import LoraConfig, ModelConfig
    from common.models import load_model, load_policy

    cfg = ModelConfig(name=args.model)
    return load_policy(cfg, LoraConfig()) if args.lora else load_model(cfg)


def _measure(loaded, fn, variant: str, prompts, lengths) -> dict:
    """One timed call: tokens, seconds, seconds after the first token (ours), and the peak memory it reached (a
    KV cache copied at every step instead of updated in place would show here)."""
    import mlx.core as mx

    mx.reset_peak_memory()
    tokens, seconds, decode_s = fn(loaded, prompts, lengths, variant)
    row = {"sampler": SAMPLERS[variant], "tokens": tokens, "seconds": seconds, "decode_seconds": decode_s}
    return row | {"peak_memory_gb": mx.get_peak_memory() / 1e9}


def run_worker(args: argparse.Namespace) -> None:
    """Measure the samplers in this process and print one JSON line per measurement."""
    from bench.chips import generation_bytes
    from common.blas import is_preloaded

    loaded = _load(args)
    import mlx.core as mx

    loaded.tokenizer._eos_token_ids = set()  # every sampler generates exactly the lengths asked for
    on_cpu = mx.default_device() == mx.cpu
    blas = ("openblas" if is_preloaded() else "stock") if on_cpu else "gpu"  # the BLAS only matters on CPU
    dtype = str(loaded.dtype).removeprefix("mlx.core.")
    weights, kv = weight_bytes_per_step(loaded.model), kv_position_bytes(loaded.model, loaded.dtype.size)
    timers = {v: (_time_mlx_lm if v == "mlx_lm" else _time_ours) for v in args.samplers}
    for variant, fn in timers.items():  # warm-up: first-call allocation and kernel setup
        fn(loaded, _prompts(loaded.tokenizer, 2, args.mixed_lengths), [4, 3], variant)
    for batch in args.batch_sizes:
        prompts = _prompts(loaded.tokenizer, batch, args.mixed_lengths)
        lengths = _lengths(batch, args.new_tokens, args.mixed_lengths)
        decode_bytes, steps = generation_bytes(weights, kv, [len(p) for p in prompts], lengths)
        shared = {"blas": blas, "batch": batch, "decode_bytes": decode_bytes, "decode_steps": steps}
        shared |= {"weight_bytes": weights, "prompt_tokens": sum(map(len, prompts)), "dtype": dtype}
        for repeat in range(args.repeats):
            for variant, fn in timers.items():
                row = _measure(loaded, fn, variant, prompts, lengths)
                print(json.dumps({**shared, **row, "repeat": repeat}), flush=True)


def _cell(value: float | None, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def _table(rows: list[dict], bandwidth_gbs: float | None) -> str:
    """One line per (batch, BLAS, sampler): the fastest repeat's tokens/s, its ratio to mlx_lm, MBU."""
    best: dict[tuple, dict] = {}
    for r in rows:
        key = (r["batch"], r["blas"], r["sampler"])
        if key not in best or r["tokens"] / r["seconds"] > best[key]["tokens"] / best[key]["seconds"]:
            best[key] = r
    lines = [
        "| batch | BLAS | sampler | tok/s | vs mlx_lm | ours: openblas / stock | MBU | decode MBU |",
        "|---:|---|---|---:|---:|---:|---:|---:|",
    ]
    for (batch, blas, sampler), r in sorted(
        best.items(), key=lambda kv: (kv[0][0], kv[0][1] != "gpu", kv[0][1])
    ):
        rate = r["tokens"] / r["seconds"]
        stock = best.get((batch, "stock", sampler)) if blas == "openblas" else None
        theirs = best.get((batch, blas, SAMPLERS["mlx_lm"]))
        mbu = decode_mbu = None
        if bandwidth_gbs:
            mbu = r["decode_bytes"] / r["seconds"] / (bandwidth_gbs * 1e9)
            if r.get("decode_seconds"):
                decode_mbu = r["decode_bytes"] / r["decode_seconds"] / (bandwidth_gbs * 1e9)
        vs = rate / (theirs["tokens"] / theirs["seconds"]) if theirs else None
        speedup = rate / (stock["tokens"] / stock["seconds"]) if stock else None
        lines.append(
            f"| {batch} | {blas} | {sampler} | {rate:.1f} | {_cell(vs, '.2f')}x | {_cell(speedup, '.1f')}x "
            f"| {_cell(mbu, '.1%')} | {_cell(decode_mbu, '.1%')} |".replace("-x", "-")
        )
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="default", help="'default', 'tiny', or an mlx-lm model folder")
    parser.add_argument("--batch-sizes", default="1,8,32", type=lambda s: [int(x) for x in s.split(",")])
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument(
        "--mixed-lengths", action="store_true", help="prompts and responses of different lengths"
    )
    parser.add_argument(
        "--samplers", default="ours,mlx_lm", type=lambda s: s.split(","), help=f"of {','.join(SAMPLERS)}"
    )
    parser.add_argument("--lora", action="store_true", help="the actors' policy: LoRA adapters attached")
    parser.add_argument("--skip-stock", action="store_true", help="only the optimized-BLAS worker")
    parser.add_argument(
        "--repeats", type=int, default=1, help="timings per batch size and sampler (best shown)"
    )
    parser.add_argument("--output", default=str(Path(__file__).parent / "results" / "generation.json"))
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    return parser


def _worker_command(args: argparse.Namespace) -> list[str]:
    cmd = [sys.executable, __file__, "--worker", "--model", args.model, "--new-tokens", str(args.new_tokens)]
    cmd += ["--repeats", str(args.repeats), "--batch-sizes", ",".join(map(str, args.batch_sizes))]
    cmd += ["--samplers", ",".join(args.samplers)]
    return cmd + ["--mixed-lengths"] * args.mixed_lengths + ["--lora"] * args.lora


def _chip_line() -> tuple[str, float | None]:
    from bench.chips import this_chip

    chip = this_chip()
    if chip is None:
        return "MBU: no peak bandwidth known for this device (bench/chips.py)", None
    return f"MBU against {chip.name}: {chip.bandwidth_gbs:g} GB/s ({chip.source})", chip.bandwidth_gbs


def main() -> None:
    args = _parser().parse_args()
    unknown = set(args.samplers) - set(SAMPLERS)
    if unknown:
        raise SystemExit(f"unknown samplers {sorted(unknown)}: choose from {', '.join(SAMPLERS)}")
    if args.worker:
        run_worker(args)
        return
    from common.blas import env_with_fast_blas

    fast_env = env_with_fast_blas()
    stock_env = {k: v for k, v in fast_env.items() if k not in ("LD_PRELOAD", "OPENBLAS_CORETYPE")}
    rows = []
    for env in [fast_env] if args.skip_stock else [fast_env, stock_env]:
        out = subprocess.run(_worker_command(args), env=env, capture_output=True, text=True)
        if out.returncode != 0:
            sys.stderr.write(out.stdout + out.stderr)
            raise SystemExit(f"generation worker failed with exit code {out.returncode}")
        rows += [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    dtype = rows[0]["dtype"] if rows else "?"
    lengths = f"{MIN_NEW}-{args.new_tokens} (mixed)" if args.mixed_lengths else str(args.new_tokens)
    chip_line, bandwidth = _chip_line()
    header = (
        f"Machine: {describe_machine()}; date {date.today()}; model {args.model} ({dtype}{', LoRA' * args.lora}); "
        f"{lengths} new tokens/sequence{', prompts of 1-4 questions' * args.mixed_lengths}. {chip_line}."
    )
    print(header)
    print(_table(rows, bandwidth))
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    record = {**run_record(), "machine": header, "bandwidth_gbs": bandwidth, "rows": rows}
    output.write_text(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
