"""Exp-heavy ops rebuilt for MLX's CPU backend, used only when the default device is the CPU.

Why: MLX's CPU kernels for ``exp`` / ``sigmoid`` / ``softmax`` / ``logsumexp`` are scalar on x86 (about 20 ns
per element, against 0.4 ns for a vectorised multiply), while ``power(2, y)`` is about 3x faster at the same
accuracy (both ~4e-6 relative error against float64). In a transformer update the SiLU of the MLP, the attention
softmax and the vocabulary log-softmax are then slower than the GEMMs around them (BENCHMARKS.md, issue 3).

Each op is an ``mx.custom_function`` whose gradient reuses the forward output, so the backward pass does not
recompute exponentials through autograd. On Metal and CUDA the stock fused kernels are faster; callers go through
``logsumexp`` here (which dispatches) or ``use_fast_cpu_ops(model)``, a no-op off the CPU.
"""

from __future__ import annotations

import logging
import math

import mlx.core as mx
import mlx.nn as nn

log = logging.getLogger(__name__)

LOG2E = 1.0 / math.log(2.0)


def on_cpu() -> bool:
    return mx.default_device() == mx.cpu


def exp(x: mx.array) -> mx.array:
    """``e**x`` as ``2**(x * log2 e)``: the same accuracy as ``mx.exp`` on CPU, about 3x faster there."""
    return mx.power(2.0, x * LOG2E)


def _sigmoid(x: mx.array) -> mx.array:
    return 1.0 / (1.0 + exp(-x))


@mx.custom_function
def swiglu(gate: mx.array, up: mx.array) -> mx.array:
    """``silu(gate) * up`` (the gated MLP of llama-family models), shapes ``[..., F]``."""
    return gate * _sigmoid(gate) * up


@swiglu.vjp
def _swiglu_vjp(primals, cotangent, output):
    # Recomputing the sigmoid measured no slower than keeping it as a second output (and holds less memory).
    gate, up = primals
    sig = _sigmoid(gate)
    d_silu = sig * (1.0 + gate * (1.0 - sig))
    return cotangent * up * d_silu, cotangent * (gate * sig)


def _softmax_forward(x: mx.array) -> mx.array:
    shifted = x - mx.stop_gradient(x.max(axis=-1, keepdims=True))
    e = exp(shifted)
    return e / e.sum(axis=-1, keepdims=True)


@mx.custom_function
def softmax(x: mx.array) -> mx.array:
    """Softmax over the last axis; rows of ``-inf`` only are not supported (every row needs one finite entry)."""
    return _softmax_forward(x)


@softmax.vjp
def _softmax_vjp(primals, cotangent, output):
    return output * (cotangent - (cotangent * output).sum(axis=-1, keepdims=True))


@mx.custom_function
def _logsumexp_cpu(x: mx.array) -> mx.array:
    top = x.max(axis=-1, keepdims=True)
    top = mx.where(mx.isinf(top), 0.0, top)  # all -inf rows give -inf, not nan
    return top + mx.log(exp(x - top).sum(axis=-1, keepdims=True))


@_logsumexp_cpu.vjp
def _logsumexp_vjp(primals, cotangent, output):
    return cotangent * exp(primals - output)  # one input: primals is the array itself


def logsumexp(x: mx.array) -> mx.array:
    """``log(sum(exp(x)))`` over the last axis with keepdims: ``[..., V]`` -> ``[..., 1]``."""
    if on_cpu():
        return _logsumexp_cpu(x)
    return mx.logsumexp(x, axis=-1, keepdims=True)


def causal_attention(queries: mx.array, keys: mx.array, values: mx.array, scale: float) -> mx.array:
    """Causal softmax attention with grouped KV heads: ``[B, H, L, D]`` q, ``[B, Hkv, L, D]`` k/v -> ``[B, H, L, D]``."""
    batch, heads, length, dim = queries.shape
    kv_heads = keys.shape[1]
    q = (queries * scale).reshape(batch, kv_heads, heads // kv_heads, length, dim)
    scores = q @ keys[:, :, None].swapaxes(-1, -2)
    future = mx.arange(length)[None, :] > mx.arange(length)[:, None]
    # An additive [L, L] mask: a select over every score costs ~20x an add on this backend.
    scores = scores + mx.where(future, mx.array(-mx.inf, scores.dtype), mx.array(0.0, scores.dtype))
    out = softmax(scores) @ values[:, :, None]
    return out.reshape(batch, heads, length, dim)


def _fast_classes() -> dict[type, type]:
    """Stock mlx-lm llama module classes -> subclasses whose forward uses the ops above."""
    from mlx_lm.models import llama
    from mlx_lm.tuner.lora import LoRALinear

    class CpuLlamaAttention(llama.Attention):
        def __call__(self, x: mx.array, mask=None, cache=None) -> mx.array:
            if cache is not None or not (mask is None or isinstance(mask, str)):
                return super().__call__(x, mask, cache)  # decoding and explicit masks: the stock path
            batch, length, _ = x.shape
            q = self.q_proj(x).reshape(batch, length, self.n_heads, -1).transpose(0, 2, 1, 3)
            k = self.k_proj(x).reshape(batch, length, self.n_kv_heads, -1).transpose(0, 2, 1, 3)
            v = self.v_proj(x).reshape(batch, length, self.n_kv_heads, -1).transpose(0, 2, 1, 3)
            out = causal_attention(self.rope(q), self.rope(k), v, self.scale)
            return self.o_proj(out.transpose(0, 2, 1, 3).reshape(batch, length, -1))

    class CpuLlamaMLP(llama.MLP):
        def __call__(self, x: mx.array) -> mx.array:
            return self.down_proj(swiglu(self.gate_proj(x), self.up_proj(x)))

    class CpuLoRALinear(LoRALinear):
        def __call__(self, x: mx.array) -> mx.array:
            base = self.linear
            if type(base) is not nn.Linear or "bias" in base or self.dropout._p_1 < 1.0:
                return super().__call__(x)  # quantized or biased base, dropout: the stock path
            if self.scale == 0.0:  # adapters switched off (the reference pass): the base layer alone
                return base(x)
            # The base GEMM accumulates the low-rank term itself (BLAS beta = 1): no separate scale and add
            # passes over the [..., out] output; the scale goes on the small [N, r] low-rank activation instead.
            rows = x.reshape(-1, x.shape[-1])
            low_rank = ((rows @ self.lora_a.astype(x.dtype)) * self.scale) @ self.lora_b.astype(x.dtype)
            out = mx.addmm(low_rank, rows, base.weight.T)
            return out.reshape(*x.shape[:-1], out.shape[-1])

    return {llama.Attention: CpuLlamaAttention, llama.MLP: CpuLlamaMLP, LoRALinear: CpuLoRALinear}


def use_fast_cpu_ops(model) -> int:
    """Switch ``model``'s llama attention, MLP and LoRA modules to the CPU paths above, in place; returns how many.

    Weights, parameter names and LoRA layers are untouched (only the forward changes), so checkpoints and
    adapters stay mlx-lm compatible. A no-op off the CPU; other model families keep their stock forward. Call it
    again after attaching adapters to switch the new LoRA layers too.
    """
    if not on_cpu():
        return 0
    swaps = _fast_classes()
    switched = 0
    for _, module in model.named_modules():
        fast = swaps.get(type(module))
        if fast is not None:
            module.__class__ = fast
            switched += 1
    log.debug("fast CPU ops on %d modules", switched)
    return switched
