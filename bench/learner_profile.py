"""Where a learner update's time goes: its parts timed alone, each against its own matmul FLOPs and the peak.

    python bench/learner_profile.py --model DIR [--batch 64] [--prompt-len 128] [--response-len 384]
                                    [--micro 16] [--lora-rank 16] [--repeats 3] [--output PATH]

No hardware counters are needed (the lent GPU host has none): each part of the update runs alone, compiled the way
the learner compiles it, on one micro-batch of ``--micro`` sequences (value head on the policy trunk, LoRA on every
linear layer), and its median time is set against the matmul FLOPs it performs and the bf16 (GPU) / float32 (CPU)
GEMM peak measured in the same process:

- ``gemm ceiling``: the trunk's and the head's matmuls alone, at the micro-batch's shapes (what the hardware gives
  for those shapes, the most any part could reach);
- ``no-grad pass``: the policy's log-probs and values (the learner's recompute);
- ``trunk fwd+bwd``: the trunk and LoRA gradients with a trivial loss (no vocabulary work);
- ``head fwd+bwd``: the vocabulary projection and log-probs with their input gradient alone;
- ``gradient step``: the learner's compiled forward + loss + backward (``MinibatchUpdate``'s);
- ``whole update``: ``PPOLearner.update`` over ``--batch`` sequences (no-grad passes, micro-batches, Adam).

The differences say what limits the update: a part far below the GEMM ceiling is overhead (elementwise work,
kernel launches, host syncs), the ceiling far below the peak says the shapes are too small for the chip.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import mlx.core as mx  # noqa: E402
import mlx.nn as nn  # noqa: E402
import numpy as np  # noqa: E402

from bench.learner import matmul_peak_gflops, synthetic_experience, trunk_params, update_flops  # noqa: E402
from bench.machine import describe_machine, run_record  # noqa: E402


def timed(fn: Callable[[], object], repeats: int) -> float:
    """Median seconds of ``mx.eval(fn())`` after one warm-up call (which compiles)."""
    mx.eval(fn())
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        mx.eval(fn())
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def linear_shapes(args) -> list[tuple[int, int]]:
    """``(in, out)`` of one block's linear layers (q, k, v, o, gate, up, down)."""
    h, inter = args.hidden_size, args.intermediate_size
    kv = args.num_key_value_heads * (h // args.num_attention_heads)
    return [(h, h), (h, kv), (h, kv), (h, h), (h, inter), (h, inter), (inter, h)]


def gemm_ceiling(
    args, tokens: int, response_tokens: int, dtype: mx.Dtype, repeats: int
) -> tuple[float, float]:
    """Seconds and FLOPs of the trunk's forward matmuls (all layers) and the head's, at these token counts."""
    total_s, flops = 0.0, 0.0
    shapes = [(s, tokens, args.num_hidden_layers) for s in linear_shapes(args)]
    shapes.append(((args.hidden_size, args.vocab_size), response_tokens, 1))
    for (n_in, n_out), rows, count in shapes:
        x = mx.random.normal((rows, n_in)).astype(dtype)
        w = mx.random.normal((n_out, n_in)).astype(dtype)
        total_s += count * timed(lambda x=x, w=w: x @ w.T, repeats)
        flops += count * 2.0 * rows * n_in * n_out
    return total_s, flops


def micro_batch(learner, exp, micro: int) -> dict[str, mx.array]:
    """The first micro-batch the learner's gradient step would see (its arrays after ``prepare``)."""
    from learner.experience import rows_cut_to_length

    arrays, _ = learner.prepare(exp)
    step_arrays = {k: v for k, v in arrays.items() if k != "units"}
    cut = rows_cut_to_length(step_arrays, np.arange(micro), learner.pad_multiple)
    mb = {k: mx.array(v) for k, v in cut.items()}
    mb["normaliser"] = mb["num_tokens"] = mx.array(float(arrays["mask"][:micro].sum()))
    return mb


def parts(learner, mb: dict[str, mx.array]) -> dict[str, Callable[[], object]]:
    """The update's parts as thunks over one micro-batch (each compiled as the learner compiles its step)."""
    from common.logprobs import token_logprobs
    from common.models import lm_head_logits

    container = learner.container
    policy = container.policy
    tokens, positions, response = mb["tokens"], mb["positions"], mb["response"]
    worker = learner.pool.workers[0]

    def no_grad():
        logits, values = container.response_outputs(tokens, positions)
        return token_logprobs(logits, response), values

    def trunk_loss(model):
        return model.policy.model(tokens).astype(mx.float32).mean()

    trunk_grad = nn.value_and_grad(container, trunk_loss)
    hidden = mx.stop_gradient(mx.take_along_axis(policy.model(tokens), positions[..., None], axis=1))
    mx.eval(hidden)

    def head_loss(h):
        return token_logprobs(lm_head_logits(policy, h), response).sum()

    head_grad = mx.compile(mx.grad(head_loss))
    return {
        "no-grad pass": mx.compile(no_grad),
        "trunk fwd+bwd": lambda: trunk_grad(container),
        "head fwd+bwd": lambda: head_grad(hidden),
        "gradient step": lambda: learner.minibatches.grad_step(worker, mb),
    }


def part_flops(args, name: str, micro: int, seq_len: int, response_len: int) -> float:
    """Matmul FLOPs of one part (``update_flops``' accounting: input-gradient backward through frozen weights)."""
    linear = 2 * trunk_params(args) * micro * seq_len
    attention = 4 * args.num_hidden_layers * seq_len**2 * args.hidden_size * micro
    head = 2 * args.hidden_size * args.vocab_size * micro * response_len
    return {
        "no-grad pass": linear + attention + head,
        "trunk fwd+bwd": 3 * linear + 4 * attention,
        "head fwd+bwd": 2 * head,
        "gradient step": 3 * linear + 4 * attention + 2 * head,
    }[name]


def build(opts):
    from common.config import LoraConfig, ModelConfig, PPOUpdateConfig
    from common.models import load_model
    from learner.models import build_policy_and_value
    from learner.ppo_learner import PPOLearner

    loaded = load_model(ModelConfig(name=opts.model))
    rank = opts.lora_rank
    container = build_policy_and_value(
        loaded.model, LoraConfig(rank=rank, alpha=2.0 * rank), value_kind="shared"
    )
    cfg = PPOUpdateConfig(batch_size=opts.batch, num_minibatches=1, micro_batch_size=opts.micro,
        micro_batch_tokens=0,
                          update_epochs=1, group_size=1, compute_threads=1)  # fmt: skip
    learner = PPOLearner(container, cfg, temperature=1.0)
    exp = synthetic_experience(loaded.tokenizer, opts.batch, opts.prompt_len, opts.response_len)
    return loaded, learner, exp


def profile(opts) -> dict:
    peak = matmul_peak_gflops() * 1e9
    loaded, learner, exp = build(opts)
    args, seq_len, micro = loaded.model.args, opts.prompt_len + opts.response_len, opts.micro
    rows = []
    ceiling_s, ceiling_flops = gemm_ceiling(args, micro * seq_len, micro * opts.response_len, loaded.dtype,
                                            opts.repeats)  # fmt: skip
    rows.append({"part": "gemm ceiling", "seconds": ceiling_s, "flops": ceiling_flops})
    mb = micro_batch(learner, exp, micro)
    for name, thunk in parts(learner, mb).items():
        flops = part_flops(args, name, micro, seq_len, opts.response_len)
        rows.append({"part": name, "seconds": timed(thunk, opts.repeats), "flops": flops})
    update_s = timed(lambda: learner.update(exp) and mx.array(0), opts.repeats)
    flops = update_flops(args, opts.batch, seq_len, opts.response_len, False, 1, learner.needs_reference)
    rows.append({"part": f"whole update ({opts.batch} sequences)", "seconds": update_s, "flops": flops})
    for r in rows:
        r["tflops"] = r["flops"] / r["seconds"] / 1e12
        r["of_peak"] = r["flops"] / r["seconds"] / peak
    return {"peak_tflops": peak / 1e12, "dtype": str(loaded.dtype).removeprefix("mlx.core."), "rows": rows}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="default")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--response-len", type=int, default=384)
    p.add_argument("--micro", type=int, default=16)
    p.add_argument("--lora-rank", type=int, default=16)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--output", default="")
    opts = p.parse_args()
    result = profile(opts)
    header = (f"Machine: {describe_machine()}; model {opts.model} ({result['dtype']}); batch {opts.batch} x "
              f"({opts.prompt_len} + {opts.response_len}), micro {opts.micro}, LoRA r{opts.lora_rank}; "
              f"peak {result['peak_tflops']:.0f} TFLOP/s")  # fmt: skip
    print(header)
    print("| part | ms | TFLOP/s | of peak |\n|---|---:|---:|---:|")
    for r in result["rows"]:
        print(f"| {r['part']} | {r['seconds'] * 1e3:.1f} | {r['tflops']:.1f} | {r['of_peak']:.1%} |")
    if opts.output:
        out = {**run_record(), "machine": header, "settings": vars(opts), **result}
        Path(opts.output).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
