"""The learner's first update against later ones, and its MFU, at one shape (the GPU warm-up question).

    python bench/first_update.py MODEL BATCH PROMPT_LEN RESPONSE_LEN MICRO LORA_RANK REPEATS [nokl] [chunk=N]
    python bench/first_update.py collect ROWS.jsonl OUT.json MACHINE COMMAND   # rows -> a result for report.py

MICRO: sequences per micro-batch, or ``auto`` (``ppo.micro_batch_tokens = -1``: the budget the learner picks from
the device's memory; the row then records the budget and the micro-batches it made).
One process: the bf16 (GPU) or float32 (CPU) GEMM peak, then REPEATS + 1 PPO updates (1 epoch, 1 minibatch,
value head on the policy trunk, LoRA of LORA_RANK on every linear layer), each timed. ``nokl`` sets
``kl_coef = kl_loss_coef = 0`` (the learner then skips the reference pass, and the FLOP count leaves it out).
Prints each update's time and one ``ROW {json}`` line with the first and the median later time, MFU and
``MLX_PTX_CACHE_DIR``: MLX's CUDA backend compiles kernels at run time and keeps them on disk there, so run it
twice with one cache folder and once with a fresh one to see what the cache is worth.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import mlx.core as mx  # noqa: E402
import numpy as np  # noqa: E402

from bench.learner import matmul_peak_gflops, synthetic_experience, update_flops  # noqa: E402


def main(argv: list[str]) -> dict:
    from common.config import LoraConfig, ModelConfig, PPOUpdateConfig
    from common.models import load_model
    from learner.models import build_policy_and_value
    from learner.ppo_learner import PPOLearner

    auto = argv[4] == "auto"
    argv = [*argv[:4], "0" if auto else argv[4], *argv[5:]]
    model, batch, prompt_len, response_len, micro, rank, repeats = argv[0], *map(int, argv[1:7])
    no_kl = "nokl" in argv[7:]
    chunk = next((int(a.split("=")[1]) for a in argv[7:] if a.startswith("chunk=")), 0)  # ppo.vocab_chunk
    peak = matmul_peak_gflops()
    loaded = load_model(ModelConfig(name=model))
    container = build_policy_and_value(
        loaded.model, LoraConfig(rank=rank, alpha=2.0 * rank), value_kind="shared"
    )
    kl = {"kl_coef": 0.0, "kl_loss_coef": 0.0} if no_kl else {}
    cfg = PPOUpdateConfig(batch_size=batch, num_minibatches=1, micro_batch_size=micro or batch,
                          micro_batch_tokens=-1 if auto else 0, vocab_chunk=chunk, update_epochs=1, group_size=1, compute_threads=1,
                          **kl)  # fmt: skip
    learner = PPOLearner(container, cfg, temperature=1.0)
    exp = synthetic_experience(loaded.tokenizer, batch, prompt_len, response_len)
    times = []
    for i in range(repeats + 1):
        start = time.perf_counter()
        learner.update(exp)
        times.append(time.perf_counter() - start)
        print(f"update {i}: {times[-1]:.2f} s, peak memory {mx.get_peak_memory() / 1e9:.1f} GB", flush=True)
    flops = update_flops(loaded.model.args, batch, prompt_len + response_len, response_len, False, 1,
                         reference=learner.needs_reference)  # fmt: skip
    later = float(np.median(times[1:]))
    return {"model": model, "batch": batch, "prompt_len": prompt_len, "response_len": response_len,
            "micro": "auto" if auto else micro, "token_budget": learner.micro_batching.token_budget,
            "micro_batches": len(learner.micro_batching(learner.prepare(exp)[0], np.arange(batch))), "lora_rank": rank, "no_kl": no_kl, "vocab_chunk": chunk, "reference_pass": learner.needs_reference,
            "ptx_cache": os.environ.get("MLX_PTX_CACHE_DIR", "(default)"), "peak_tflops": peak / 1e3,
            "first_s": times[0], "later_s": later, "mfu": flops / later / 1e9 / peak,
            "peak_gb": mx.get_peak_memory() / 1e9}  # fmt: skip


def collect(rows_path: str, out_path: str, machine: str, command: str) -> None:
    """The ``ROW`` lines of a call (``bench/h200_17.sh`` collects them) as one result file for ``bench/report.py``."""
    rows = [json.loads(line) for line in Path(rows_path).read_text().splitlines() if line.strip()]
    date = time.strftime("%Y-%m-%d", time.gmtime(Path(rows_path).stat().st_mtime))
    result = {"command": command, "machine": machine, "date": date, "rows": rows}
    Path(out_path).write_text(json.dumps(result, indent=1) + "\n")


def render_first_updates(result: dict) -> list[str]:
    """One line per process: its micro-batching, first and later update, their ratio, MFU and peak memory."""
    lines = ["| model | micro-batches | vocabulary pass | reference pass | first s | later s | first / later "
             "| MFU | peak GB | bf16 peak TFLOP/s |", "|---|---|---|---|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    for r in result["rows"]:
        micro = f"{r['micro_batches']} (auto: {r['token_budget']} tokens)" if r["micro"] == "auto" else (
            f"{r['micro_batches']} x {r['micro']}")  # fmt: skip
        chunk = f"chunks of {r['vocab_chunk']}" if r["vocab_chunk"] else "whole"
        reference = "yes" if r["reference_pass"] else "skipped (kl 0)"
        lines.append(f"| {Path(r['model']).name} | {micro} | {chunk} | {reference} | {r['first_s']:.2f} | "
                     f"{r['later_s']:.2f} | {r['first_s'] / r['later_s']:.2f} | {100 * r['mfu']:.1f}% | "
                     f"{r['peak_gb']:.1f} | {r['peak_tflops']:.0f} |")  # fmt: skip
    return lines


if __name__ == "__main__":
    if sys.argv[1:2] == ["collect"]:
        collect(*sys.argv[2:6])
    else:
        print("ROW", json.dumps(main(sys.argv[1:])), flush=True)
