"""Learner update throughput, MFU and peak memory on the bundled SmolLM2-135M with LoRA.

    python bench/learner.py [--model default] [--batch 16] [--prompt-len 64] [--response-len 64] [--repeats 3]

One process measures, side by side: the matmul peak of this machine in the model's compute dtype (best of a few
GEMMs: float32 2048^3 on the CPU backend; bfloat16 8192^3, ten per timing, on a GPU; see ``--peak-dtype``), then
one PPO update (1 epoch, 1 minibatch, micro-batches of --micro) for each value option (a separate value network, or
a value head on the policy trunk) and each --threads setting (``ppo.compute_threads``: 1 runs the update on the
caller's thread with all BLAS threads, 0 splits each micro-batch over one worker thread per core, learner/shards.py),
after a warm-up update that also compiles the step. MFU counts the matmul FLOPs the update really performs (see
``update_flops``) over the measured time and peak. Prints a markdown table and writes
``bench/results/learner.json``.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from datetime import date
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import mlx.core as mx  # noqa: E402
import numpy as np  # noqa: E402

from bench.machine import describe_machine, run_record  # noqa: E402


def matmul_peak_gflops(n: int = 0, repeats: int = 5, dtype: str = "auto") -> float:
    """Best GEMM rate of ``repeats`` timings. Defaults: float32 2048^3 on the CPU backend; bfloat16 8192^3 on a
    GPU, ten products per timing so that launch and synchronisation costs stay out of the rate."""
    on_cpu = mx.default_device() == mx.cpu
    dt = getattr(mx, peak_dtype_name(dtype))
    n = n or (2048 if on_cpu else 8192)
    per_timing = 1 if on_cpu else 10
    a = mx.random.normal((n, n)).astype(dt)
    b = mx.random.normal((n, n)).astype(dt)
    mx.eval(a, b, a @ b)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        mx.eval(*[a @ b for _ in range(per_timing)])
        best = min(best, (time.perf_counter() - start) / per_timing)
    return 2 * n**3 / best / 1e9


def peak_dtype_name(dtype: str) -> str:
    """``auto``: float32 on the CPU backend (what models run in there), bfloat16 on a GPU."""
    if dtype != "auto":
        return dtype
    return "float32" if mx.default_device() == mx.cpu else "bfloat16"


def trunk_params(args) -> int:
    """Matmul weights in the transformer blocks (what each token multiplies through once per trunk pass)."""
    head_dim = args.hidden_size // args.num_attention_heads
    kv = args.num_key_value_heads * head_dim
    attention = 2 * args.hidden_size * args.hidden_size + 2 * args.hidden_size * kv
    mlp = 3 * args.hidden_size * args.intermediate_size
    return args.num_hidden_layers * (attention + mlp)


def update_flops(
    args,
    batch: int,
    seq_len: int,
    response_len: int,
    separate_value: bool,
    epochs: int,
    reference: bool = True,
) -> float:
    """Matmul FLOPs of one update: the no-grad pass (policy, value, and the reference when ``reference``: the
    learner skips it when no KL term uses it) and per epoch forward + backward.

    Linear layers: 2 FLOPs per weight per token forward; backward through a frozen base computes input gradients
    only, as many FLOPs again. Attention scores and the weighted sum (QK^T, PV over the full L x L square, which
    is what runs): 4 * L^2 * hidden per sequence and layer forward, twice that backward (dQ, dK, dV, dP), as in
    the PaLM MFU accounting. LoRA's rank-8 matmuls and the value head are left out (< 0.5%).
    """
    linear = 2 * trunk_params(args) * batch * seq_len
    attention = 4 * args.num_hidden_layers * seq_len**2 * args.hidden_size * batch
    head = 2 * args.hidden_size * args.vocab_size * batch * response_len
    trunks = 2 if separate_value else 1
    # no-grad: policy (+ value) trunk and the reference trunk, a vocabulary projection each
    prepare = (trunks + reference) * (linear + attention) + (1 + reference) * head
    per_epoch = trunks * (2 * linear + 3 * attention) + 2 * head  # forward + input-gradient backward
    return prepare + epochs * per_epoch


def synthetic_experience(tokenizer, batch: int, prompt_len: int, response_len: int, seed: int = 0):
    from learner.experience import Experience

    rng = np.random.default_rng(seed)
    vocab = len(tokenizer.vocab) if hasattr(tokenizer, "vocab") else 49152
    prompts = [rng.integers(20, vocab, prompt_len).tolist() for _ in range(batch)]
    responses = [rng.integers(20, vocab, response_len).tolist() for _ in range(batch)]
    logprobs = [np.full(response_len, -5.0, np.float32) for _ in range(batch)]
    return Experience.from_rows(
        prompts, responses, logprobs, rng.normal(size=batch).astype(np.float32), np.zeros(batch)
    )


def measure(value_kind: str, threads: int, opts) -> dict:
    from common.blas import set_blas_threads
    from common.config import LoraConfig, ModelConfig, PPOUpdateConfig
    from common.models import load_model
    from learner.models import build_policy_and_value
    from learner.ppo_learner import PPOLearner

    gc.collect()  # earlier rows' models (held in reference cycles by compiled steps) must not count in this peak
    mx.clear_cache()
    loaded = load_model(ModelConfig(name=opts.model))
    container = build_policy_and_value(loaded.model, LoraConfig(), value_kind=value_kind)
    cfg = PPOUpdateConfig(
        batch_size=opts.batch,
        num_minibatches=1,
        micro_batch_size=opts.micro,
        micro_batch_tokens=0,
        update_epochs=1,
        group_size=1,
        compute_threads=threads,
    )
    # A pool made for an earlier row set one BLAS thread; this row sets its own.
    set_blas_threads(opts.blas_threads)
    learner = PPOLearner(container, cfg, temperature=1.0)
    exp = synthetic_experience(loaded.tokenizer, opts.batch, opts.prompt_len, opts.response_len)
    learner.update(exp)  # warm-up and compile
    times, peaks = [], []
    for _ in range(opts.repeats):
        mx.reset_peak_memory()
        start = time.perf_counter()
        learner.update(exp)
        times.append(time.perf_counter() - start)
        peaks.append(mx.get_peak_memory() / 1e9)
    tokens = opts.batch * (opts.prompt_len + opts.response_len)
    seconds = float(np.median(times))
    flops = update_flops(
        loaded.model.args,
        opts.batch,
        opts.prompt_len + opts.response_len,
        opts.response_len,
        value_kind == "separate",
        1,
    )
    return {
        "value_model": value_kind,
        "threads": learner.pool.size,
        "update_s": seconds,
        "tokens_per_s": tokens / seconds,
        "gflops": flops / seconds / 1e9,
        "peak_gb": max(peaks),
        "dtype": str(loaded.dtype).removeprefix("mlx.core."),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="default")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument(
        "--micro",
        type=int,
        default=8,
        help="micro-batch size (sequences per forward/backward; the default's)",
    )
    parser.add_argument(
        "--threads", default="1,0", help="comma-separated ppo.compute_threads settings (0: one per core)"
    )
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--response-len", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--value-models", default="separate,shared", help="comma-separated value model kinds")
    parser.add_argument(
        "--peak-dtype", default="auto", help="dtype of the peak GEMM: auto (float32 on CPU, bfloat16 on GPU)"
    )
    parser.add_argument("--output", default=str(Path(__file__).parent / "results" / "learner.json"))
    opts = parser.parse_args()
    from common.blas import set_blas_threads
    from common.config import LoraConfig
    from learner.shards import auto_threads

    opts.blas_threads = auto_threads(0)  # the process's cores on the CPU backend, 1 on a GPU

    # Other tenants of a shared VM can depress one peak measurement: take the best of one before and one after.
    peak_before = matmul_peak_gflops(dtype=opts.peak_dtype)
    rows = [
        measure(kind, int(threads), opts)
        for kind in opts.value_models.split(",")
        for threads in opts.threads.split(",")
    ]
    set_blas_threads(opts.blas_threads)  # the last pool left one BLAS thread
    peak_after = matmul_peak_gflops(dtype=opts.peak_dtype)
    peak = max(peak_before, peak_after)
    lora = LoraConfig()
    header = (
        f"Machine: {describe_machine()}; date {date.today()}; model {opts.model}; batch {opts.batch} x "
        f"({opts.prompt_len} prompt + {opts.response_len} response), micro-batches of {opts.micro}; LoRA rank "
        f"{lora.rank} on all linear layers; model dtype {rows[0]['dtype']}; "
        f"{peak_dtype_name(opts.peak_dtype)} matmul peak {peak:.0f} GFLOP/s."
    )
    print(header)
    print("| value model | threads | update s | train tokens/s | achieved GFLOP/s | MFU | peak memory GB |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['value_model']} | {r['threads']} | {r['update_s']:.2f} | {r['tokens_per_s']:.0f} | "
            f"{r['gflops']:.1f} | "
            f"{r['gflops'] / peak:.1%} | {r['peak_gb']:.2f} |"
        )
    output = Path(opts.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(
        json.dumps(
            {
                **run_record(),
                "machine": header,
                "peak_dtype": peak_dtype_name(opts.peak_dtype),
                "peak_gflops": peak,
                "peak_before_after": [peak_before, peak_after],
                "rows": rows,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
