"""Where a compiled decode step's time goes (``actors/decode.py``), by leaving one part out at a time.

    python bench/decode_profile.py --model DIR [--batch-sizes 32,256] [--context 128,384] [--steps 48]
                                   [--output OUT.json]

For each batch width ``W`` and context ``P`` (prompt tokens, every row the same length: no padding, no row
finishing), the rows are prefilled once and then decoded ``--steps`` tokens with the step the actors run, timed
in the ways ``TIMINGS`` names (``--timings``). Variants (``--variants``), each traced anew and timed on the same
rows:

- ``full``: the step as it ships;
- ``no-mask``: attention without the column mask (wrong samples: it only shows what the masked attention costs
  against the kernel the backend uses without a mask, ``sdpa_vector`` on CUDA);
- ``argmax-tail``: the sampling tail (tempered log-softmax over the vocabulary, inverse-CDF draw) replaced by an
  argmax;
- ``model-head``: the model's own head in its dtype instead of the float32 copy of the head;
- ``no-write``: the cache is read but the new token's keys and values are not written (shows whether writing one
  column costs a copy of the whole cache);
- ``slice-update``: the column written with ``mx.slice_update`` at a device-array start, as the step did before
  its scatter (on CUDA that copied the whole cache at every token);
- ``additive-mask``: the mask as 0 / -inf in the compute dtype instead of booleans;
- ``matmul-attention``: attention as explicit matmuls and a softmax (MLX's own fallback, written out) instead of
  ``mx.fast.scaled_dot_product_attention``.

Each row reports ms per step, the bytes the step must read (weights once, the ``W x C`` cache columns it
attends over) and the GB/s that implies. The difference between two variants is the cost of the part left out.
"""

from __future__ import annotations

import argparse
import json
import time

import mlx.core as mx
import numpy as np

from actors import decode
from actors.sampler import SamplingParams, _prefill_rows

TIMINGS = ("host-paced", "device", "serial", "serial-sync")
"""``host-paced``: the next step queued, then this one read (``CompletionStream``'s overlapped order); ``device``:
nothing read until the end; ``serial``: this step read, then the next queued (tried for a large cache: no faster);
``serial-sync``: the same with ``mx.synchronize()`` before queueing."""
VARIANTS = (
    "full", "no-mask", "argmax-tail", "model-head", "no-write", "slice-update", "additive-mask", "matmul-attention",
)  # fmt: skip


def _argmax_draw(logits: mx.array, uniforms: mx.array, temperature: float):
    tokens = mx.argmax(logits, axis=-1).astype(mx.int32)
    return tokens, mx.zeros(tokens.shape, mx.float32)


def _no_mask(self, n, return_array=False, window_size=None):
    return None


def _no_write(self, keys, values):
    return self.keys, self.values


def _slice_update_write(self, keys, values):
    self.keys = mx.slice_update(self.keys, keys, self.pos, axes=(2,))
    self.values = mx.slice_update(self.values, values, self.pos, axes=(2,))
    return self.keys, self.values


def _additive_mask(self, n, return_array=False, window_size=None):
    allowed = _BOOL_MASK(self, n)
    return mx.where(allowed, 0.0, -mx.inf).astype(self.keys.dtype)


def _matmul_attention(queries, keys, values, scale, mask=None, sinks=None):
    w, heads, length, dim = queries.shape
    kv_heads = keys.shape[1]
    q = (queries * scale).reshape(w, kv_heads, heads // kv_heads, length, dim)  # grouped heads share a key
    # [W, Hkv, rep, 1, C] in the compute dtype, as MLX's fallback computes them
    scores = q @ keys[:, :, None].swapaxes(-1, -2)
    if mask is not None:
        mask = mask[:, :, None]
        scores = mx.where(mask, scores, -mx.inf) if mask.dtype == mx.bool_ else scores + mask
    out = mx.softmax(scores, axis=-1, precise=True) @ values[:, :, None]
    return out.reshape(w, heads, length, dim)


_BOOL_MASK = decode._LayerCache.make_mask


def _patches() -> dict[str, tuple[object, str, object]]:
    """Per variant, the (owner, attribute, replacement) its trace swaps in (``full`` swaps nothing)."""
    cache = decode._LayerCache
    return {
        "argmax-tail": (decode, "draw", mx.compile(_argmax_draw)),
        "no-mask": (cache, "make_mask", _no_mask),
        "model-head": (decode, "_float32_head", lambda model: []),
        "no-write": (cache, "update_and_fetch", _no_write),
        "slice-update": (cache, "update_and_fetch", _slice_update_write),
        "additive-mask": (cache, "make_mask", _additive_mask),
        "matmul-attention": (mx.fast, "scaled_dot_product_attention", _matmul_attention),
    }


class _Patched:
    """Within the block, the decode step traced with one part swapped out (``variant``), then restored."""

    def __init__(self, model, variant: str):
        self.model, self.patch = model, _patches().get(variant)
        self.saved = None if self.patch is None else getattr(*self.patch[:2])

    def __enter__(self):
        self.model.__dict__.pop("_compiled_decode_step", None)  # trace anew with the swapped part
        if self.patch is not None:
            setattr(*self.patch)
        return self

    def __exit__(self, *exc):
        if self.patch is not None:
            setattr(*self.patch[:2], self.saved)
        self.model.__dict__.pop("_compiled_decode_step", None)


def _rows(model, width: int, context: int, steps: int, vocab: int) -> decode.FixedBatch:
    """``width`` rows of ``context`` random prompt tokens, prefilled, with room for ``steps`` + warm-up tokens."""
    rng = np.random.default_rng(width * 1000 + context)
    prompts = rng.integers(10, vocab - 10, size=(width, context)).tolist()
    params = SamplingParams(host_sampling=False, compiled_decode=True)
    uniforms = (1.0 - rng.random((width, steps + 16))).astype(np.float32)
    cache, left, first = _prefill_rows(model, prompts, uniforms[:, 0], params, share=False)
    chunk = decode.round_up(context + steps + 16, 32)
    batch = decode.FixedBatch.from_prefill(cache, left, first, list(range(width)), mx.array(uniforms), chunk)
    mx.eval(batch.keys, batch.values, batch.tokens)
    return batch


def _time(model, batch: decode.FixedBatch, steps: int, timing: str) -> tuple[float, float]:
    """(seconds per step, of which building and queueing the step on the host) over ``steps`` steps of
    ``batch`` (its state advances; the caller gives it room), paced as ``timing`` says (``TIMINGS``)."""
    params = SamplingParams(host_sampling=False, compiled_decode=True)
    start, host = time.perf_counter(), 0.0
    for _ in range(steps):
        previous = batch.tokens
        if timing.startswith("serial"):
            previous.tolist()
            if timing == "serial-sync":
                mx.synchronize()
        queued = time.perf_counter()
        batch.queue(model, params)
        host += time.perf_counter() - queued
        if timing == "host-paced":
            previous.tolist()
    mx.eval(batch.tokens, batch.keys)
    return (time.perf_counter() - start) / steps, host / steps


def profile(
    model, width: int, context: int, steps: int, sizes: tuple[int, int], variants, timings
) -> list[dict]:
    """Rows of ms per step for each variant and timing at this width and context; ``sizes``: (KV bytes a
    position, weight bytes a step)."""
    vocab, (kv_bytes, weight_bytes) = model.args.vocab_size, sizes
    rows = []
    for variant in variants:
        with _Patched(model, variant):
            for timing in timings:
                batch = _rows(model, width, context, steps, vocab)
                _time(model, batch, 4, timing)  # trace + first replays
                seconds, host = _time(model, batch, steps // 2, timing)
                step_bytes = weight_bytes + width * batch.capacity * kv_bytes
                rows.append(
                    {"width": width, "context": context, "capacity": batch.capacity, "variant": variant}
                    | {"timing": timing, "ms_per_step": seconds * 1e3}
                    | {"host_ms_per_step": host * 1e3}
                    | {"step_bytes": step_bytes, "gbs": step_bytes / seconds / 1e9}
                )
                print(json.dumps(rows[-1]), flush=True)
                del batch
    return rows


def main() -> None:
    from bench.generation import kv_position_bytes, weight_bytes_per_step
    from common.config import ModelConfig
    from common.models import load_model

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--batch-sizes", default="32,256")
    parser.add_argument("--context", default="128")
    parser.add_argument("--steps", type=int, default=48)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--timings", default="host-paced,device")
    parser.add_argument("--output")
    args = parser.parse_args()
    loaded = load_model(ModelConfig(name=args.model))
    model = loaded.model
    kv, weights = kv_position_bytes(model, loaded.dtype.size), weight_bytes_per_step(model)
    rows = []
    for width in map(int, args.batch_sizes.split(",")):
        for context in map(int, args.context.split(",")):
            rows += profile(
                model,
                width,
                context,
                args.steps,
                (kv, weights),
                args.variants.split(","),
                args.timings.split(","),
            )
    device = str(mx.default_device())
    result = {"model": args.model, "device": device, "kv_bytes_per_position": kv, "weight_bytes": weights}
    if args.output:
        with open(args.output, "w") as f:
            json.dump(result | {"rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
