"""The one definition of the sampling distribution, shared by actors (behaviour log-probs) and the learner.

PPO's importance ratio compares log-probs of the *same* distribution on both sides, so the actor's sampler and
the learner's recomputation both call ``sampling_logprobs``: temperature first, then top-k, then top-p (the
order Hugging Face uses), renormalised over what is kept. Tokens outside the kept set get -inf.

The log-probs of given responses (the learner's recomputation, the actors' reference pass) go through
``pad_sequences`` and ``response_logprobs``: one padding, one forward, on both sides.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from common.cpu_ops import logsumexp
from common.models import lm_head_logits
from common.ragged import Ragged


def _tempered(logits: mx.array, temperature: float) -> mx.array:
    """``logits / temperature`` in float32 (no pass over ``[..., V]`` when there is nothing to do)."""
    logits = logits.astype(mx.float32)
    return logits if temperature == 1.0 else logits * (1.0 / temperature)


def sampling_logprobs(logits: mx.array, temperature: float = 1.0) -> mx.array:
    """Log-probs of the distribution a sampler draws from: the whole tempered softmax (no truncation, which the
    learner could not reproduce from a token's log-prob).

    Args:
        logits: ``[..., V]`` raw model logits (any float dtype; computed in float32). temperature: > 0.

    Returns:
        ``[..., V]`` float32 log-probs.
    """
    scaled = _tempered(logits, temperature)
    return scaled - logsumexp(scaled)


def gather_token_logprobs(logprobs: mx.array, tokens: mx.array) -> mx.array:
    """``logprobs[..., tokens]`` elementwise: ``[..., V]`` and ``[...]`` int -> ``[...]``."""
    return mx.take_along_axis(logprobs, tokens[..., None].astype(mx.int32), axis=-1).squeeze(-1)


def sample_from_logprobs(logprobs: mx.array, uniforms: mx.array) -> mx.array:
    """Inverse-CDF sampling with one uniform per row: ``[B, V]`` log-probs, ``[B]`` in (0, 1] -> ``[B]`` int32.

    One caller-supplied uniform per row (instead of a batch-wide RNG draw) makes a sequence's sample depend only
    on its own seed, not on which batch it runs in. Zero-probability tokens are never picked.
    """
    cdf = mx.cumsum(mx.exp(logprobs), axis=-1)
    threshold = uniforms[:, None] * cdf[:, -1:]
    picked = (cdf < threshold).astype(mx.int32).sum(axis=-1)
    return mx.minimum(picked, logprobs.shape[-1] - 1)


def sample_on_host(
    logits: np.ndarray, uniforms: np.ndarray, temperature: float = 1.0
) -> tuple[np.ndarray, np.ndarray]:
    """NumPy twin of ``sampling_logprobs`` + ``sample_from_logprobs`` for the CPU backend.

    MLX's CPU elementwise kernels are scalar on x86 (``common/cpu_ops.py``): one exp pass over a ``[32, 49152]`` logit
    block costs ~40 ms there and ~2 ms in NumPy. Same distribution, same inverse-CDF rule, one exp pass.

    Args:
        logits: ``[B, V]`` float32. uniforms: ``[B]`` in (0, 1].

    Returns:
        ``([B] int64 tokens, [B] float32 log-probs of those tokens under the sampling distribution)``.
    """
    x = logits.astype(np.float32, copy=False) * np.float32(1.0 / temperature)
    row_max = x.max(axis=-1, keepdims=True)
    cdf = np.cumsum(np.exp(x - row_max), axis=-1)
    total = cdf[:, -1]
    tokens = np.minimum((cdf < (uniforms * total)[:, None]).sum(axis=-1), x.shape[-1] - 1)
    picked = x[np.arange(x.shape[0]), tokens]
    return tokens, (picked - row_max[:, 0] - np.log(total)).astype(np.float32)


def token_logprobs(logits: mx.array, tokens: mx.array, temperature: float = 1.0) -> mx.array:
    """``sampling_logprobs(logits, temperature)[..., tokens]`` without building the ``[..., V]`` log-prob array.

    For the full (untruncated) tempered distribution: ``z[token] - logsumexp(z)`` with ``z = logits / T``. This is
    what the learner differentiates: one pass over the vocabulary forward, one backward.
    """
    scaled = _tempered(logits, temperature)
    return gather_token_logprobs(scaled, tokens) - logsumexp(scaled)[..., 0]


def round_up(n: int, multiple: int) -> int:
    return -(-int(n) // multiple) * multiple


def pad_sequences(
    sequences: Ragged, prompt_lens: np.ndarray, multiple: int = 1
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Right-pad whole sequences (each its prompt, then its response) for a forward pass over response tokens.

    Args:
        sequences: ``B`` rows of token ids. prompt_lens: ``[B]`` prompt tokens of each (>= 1).
        multiple: ``L`` and ``T`` are rounded up to it (compiled steps then see few shapes).

    Returns:
        ``tokens [B, L]`` int32; ``positions [B, T]`` int32, the index of the hidden state predicting each
        response token (clamped into ``L`` on padding); ``targets [B, T]`` int32, the response tokens; ``mask
        [B, T]`` float32, 1 on real response tokens.
    """
    prompt_lens = np.asarray(prompt_lens, np.int64)
    response_lens = sequences.lengths - prompt_lens
    width = round_up(sequences.lengths.max(), multiple)
    steps = round_up(max(int(response_lens.max()), 1), multiple)
    tokens = sequences.padded(width).astype(np.int32)
    positions = np.minimum(prompt_lens[:, None] - 1 + np.arange(steps)[None], width - 1).astype(np.int32)
    targets = sequences.padded(steps, start=prompt_lens).astype(np.int32)
    mask = (np.arange(steps)[None] < response_lens[:, None]).astype(np.float32)
    return tokens, positions, targets, mask


def response_logprobs(
    model: nn.Module, tokens: mx.array, positions: mx.array, targets: mx.array, temperature: float
) -> mx.array:
    """``[B, T]`` log-probs of ``targets`` under the sampling distribution of a causal LM (``pad_sequences``'
    arrays): the trunk over ``tokens``, the hidden states at ``positions``, the vocabulary projection."""
    hidden = mx.take_along_axis(model.model(tokens), positions[..., None], axis=1)
    return token_logprobs(lm_head_logits(model, hidden), targets, temperature)
