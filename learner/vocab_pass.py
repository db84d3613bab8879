"""The vocabulary projection and log-probs of response tokens, a chunk of tokens at a time.

The plain path (``common/logprobs.token_logprobs`` over ``lm_head_logits``) builds ``[N, V]`` logits in the
compute dtype, their float32 copy, and in the backward a float32 gradient of the same size: 12 bytes per
vocabulary entry per response token (0.6 MB a token with SmolLM2's 49k vocabulary, a third of a 135M model's
activation memory). Here the forward keeps only each token's log-prob and log-normaliser; the backward
recomputes each chunk's logits (one more ``[c, H] x [H, V]`` product, the price of the memory) and turns them
into the gradients at once, as Liger-Kernel's fused linear cross-entropy does for supervised losses:

    d log p(t) / d z = onehot(t) - softmax(z),  z = h W^T / T
    dh = g / T * (W[t] - softmax(z) W),          dW = g / T * (onehot(t) - softmax(z))^T h

with no ``[c, V]`` one-hot (the target rows are gathered and scattered). Plain MLX ops only: the same code runs on
Metal, CUDA and the CPU; ``mx.compile`` traces the chunk loop into the learner's step.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import cache

import mlx.core as mx
import mlx.nn as nn

from common.cpu_ops import exp, logsumexp
from common.models import head_layer


def head_weight(model: nn.Module) -> mx.array | None:
    """``[V, H]`` weight of ``model``'s vocabulary projection (the tied embedding or ``lm_head``), in the dtype
    the projection runs in (float32 with ``float32_head``); None when it is not a plain matrix (quantized, bias)."""
    layer = head_layer(model)
    if "scales" in layer or "bias" in layer:
        return None
    weight = layer.weight
    return weight.astype(mx.float32) if getattr(model, "float32_head", False) else weight


def _spans(n: int, chunk: int) -> list[tuple[int, int]]:
    return [(start, min(start + chunk, n)) for start in range(0, n, chunk)]


def _logits(hidden: mx.array, weight: mx.array, temperature: float) -> mx.array:
    """``[c, H]`` x ``[V, H]`` -> ``[c, V]`` float32 tempered logits."""
    z = (hidden.astype(weight.dtype) @ weight.T).astype(mx.float32)
    return z if temperature == 1.0 else z * (1.0 / temperature)


@cache
def chunked_token_logprobs(temperature: float, chunk: int) -> Callable:
    """``f(hidden [N, H], weight [V, H], targets [N] int32) -> (logprobs [N], log-normalisers [N])``, float32,
    with the memory-light gradient above (with respect to ``hidden`` and ``weight``; use the first output)."""

    @mx.custom_function
    def forward(hidden: mx.array, weight: mx.array, targets: mx.array) -> tuple[mx.array, mx.array]:
        picked, normalisers = [], []
        for start, end in _spans(hidden.shape[0], chunk):
            z = _logits(hidden[start:end], weight, temperature)
            lse = logsumexp(z)[:, 0]
            picked.append(mx.take_along_axis(z, targets[start:end, None], axis=-1)[:, 0] - lse)
            normalisers.append(lse)
        return mx.concatenate(picked), mx.concatenate(normalisers)

    @forward.vjp
    def backward(primals, cotangents, outputs):
        hidden, weight, targets = primals
        g = cotangents[0] * (1.0 / temperature)  # [N]
        d_hidden, d_weight = [], mx.zeros(weight.shape, mx.float32)
        for start, end in _spans(hidden.shape[0], chunk):
            h, t, g_c = hidden[start:end].astype(weight.dtype), targets[start:end], g[start:end, None]
            softmax = exp(_logits(h, weight, temperature) - outputs[1][start:end, None])
            weighted = (softmax * g_c).astype(weight.dtype)  # [c, V]
            d_hidden.append(g_c.astype(weight.dtype) * weight[t] - weighted @ weight)
            d_weight = (
                (d_weight - (weighted.T @ h).astype(mx.float32)).at[t].add((g_c * h).astype(mx.float32))
            )
        return (
            mx.concatenate(d_hidden).astype(hidden.dtype),
            d_weight.astype(weight.dtype),
            mx.zeros_like(targets),
        )

    return forward


def chunked_logprobs_and_entropy(
    hidden: mx.array, weight: mx.array, targets: mx.array, temperature: float, chunk: int
) -> tuple[mx.array, mx.array]:
    """No-grad ``([N] log-probs of targets, [N] entropies)`` of the tempered distributions, ``chunk`` tokens at a
    time (the learner's no-grad pass and the step's proximal statistics)."""
    picked, entropies = [], []
    for start, end in _spans(hidden.shape[0], chunk):
        z = _logits(hidden[start:end], weight, temperature)
        lse = logsumexp(z)
        probs = exp(z - lse)
        picked.append(mx.take_along_axis(z, targets[start:end, None], axis=-1)[:, 0] - lse[:, 0])
        entropies.append(lse[:, 0] - (probs * z).sum(axis=-1))
    return mx.concatenate(picked), mx.concatenate(entropies)


def flat(x: mx.array) -> mx.array:
    """``[B, T, ...]`` -> ``[B * T, ...]``."""
    return x.reshape(-1, *x.shape[2:])
