"""How much each token counts: the loss aggregation's weights, and what truncated responses get. Pure NumPy.

A minibatch loss is ``sum_{b,t} l_bt * w_bt / N`` where ``w`` are per-token weights and ``N`` is the minibatch's
normaliser: the sum of every sequence's ``units`` over the *whole* minibatch (all its micro-batches and ranks),
so a token's weight in the gradient never depends on how the minibatch was split.

| ``loss_aggregation``        | ``w_bt``         | ``units_b``          | the loss                                   |
|-----------------------------|------------------|----------------------|--------------------------------------------|
| ``token_mean``              | ``m_bt``         | ``len_b``            | mean over the minibatch's tokens (DAPO)    |
| ``seq_mean_token_mean``     | ``m_bt / len_b`` | 1                    | mean over sequences of token means (GRPO)  |
| ``seq_mean_token_sum_norm`` | ``m_bt``         | ``max_new_tokens``   | token sum / (sequences x budget) (Dr. GRPO)|

Shapes: ``B`` sequences, ``T`` response tokens; ``mask`` ``[B, T]`` is 1 on real response tokens.
"""

from __future__ import annotations

import numpy as np

AGGREGATIONS = ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm")


def loss_weights(mask: np.ndarray, mode: str, max_new_tokens: int) -> tuple[np.ndarray, np.ndarray]:
    """``([B, T] per-token weights, [B] units)`` of the aggregation ``mode`` (table above).

    A sequence whose mask is empty (left out of the loss) weighs nothing and adds no units.
    """
    mask = np.asarray(mask, np.float32)
    lengths = mask.sum(axis=1)
    present = (lengths > 0).astype(np.float32)
    if mode == "token_mean":
        return mask, lengths
    if mode == "seq_mean_token_mean":
        return mask / np.maximum(lengths, 1.0)[:, None], present
    if mode == "seq_mean_token_sum_norm":
        return mask, present * float(max_new_tokens)
    raise ValueError(f"unknown loss aggregation {mode!r}: use one of {', '.join(AGGREGATIONS)}")


def overlong_penalty(
    lengths: np.ndarray, max_new_tokens: int, buffer: int, penalty: float = 1.0
) -> np.ndarray:
    """DAPO's soft overlong punishment (Yu et al. 2025, arXiv:2503.14476, eq. 13), ``[B]`` -> ``[B]`` (<= 0).

    0 up to ``max_new_tokens - buffer`` tokens, then falling linearly to ``-penalty`` at ``max_new_tokens``
    (responses never exceed it here: the sampler stops there).
    """
    if not 0 < buffer <= max_new_tokens:
        raise ValueError(f"overlong buffer {buffer} must be in (0, max_new_tokens={max_new_tokens}]")
    excess = np.asarray(lengths, np.float64) - (max_new_tokens - buffer)
    return (-penalty * np.clip(excess / buffer, 0.0, 1.0)).astype(np.float32)


def default_overlong_buffer(max_new_tokens: int) -> int:
    """The overlong buffer when ``ppo.overlong_buffer`` is 0: a quarter of the budget (DAPO: 4,096 of 20,480)."""
    return max(max_new_tokens // 4, 1)
