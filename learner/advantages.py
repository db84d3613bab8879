"""Rewards and advantages for token-level PPO and the critic-free variants: pure NumPy on response tokens.

Shapes: ``B`` sequences, ``T`` response tokens (right-padded); ``mask`` is 1 on real response tokens (a prefix
of each row) and 0 on padding. Every output is 0 where ``mask`` is 0. Advantages are data preparation, not
differentiated, so they stay in NumPy and are computed once per update.

References: GAE, Schulman et al. 2016 (arXiv:1506.02438); per-token KL penalty, Ziegler et al. 2019
(arXiv:1909.08593); k3 estimator, Schulman 2020 ("Approximating KL Divergence"); GRPO, Shao et al. 2024
(arXiv:2402.03300); RLOO, Ahmadian et al. 2024 (arXiv:2402.14740).
"""

from __future__ import annotations

from typing import Literal

import numpy as np

KLEstimator = Literal["k1", "k3"]


def masked_mean(x: np.ndarray, mask: np.ndarray) -> float:
    """Mean of ``x`` over positions where ``mask`` is 1 (0.0 when the mask is empty)."""
    count = mask.sum()
    return float((x * mask).sum() / count) if count > 0 else 0.0


def masked_moments(x: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """``[sum, sum of squares, count]`` of ``x`` over masked positions (float64; summable across ranks)."""
    xm = np.asarray(x, np.float64) * mask
    return np.array([xm.sum(), (xm * x).sum(), float(mask.sum())], np.float64)


def whiten_with(
    x: np.ndarray, mask: np.ndarray, moments: np.ndarray, shift_mean: bool = True, eps: float = 1e-8
) -> np.ndarray:
    """``(x - mean) / std`` with mean and unbiased std from ``moments`` (``masked_moments``, maybe of all ranks)."""
    total, total_sq, count = (float(m) for m in moments)
    mean = total / count if count > 0 else 0.0
    var = max(total_sq - count * mean * mean, 0.0) / max(count - 1, 1)
    whitened = (x - mean) / np.sqrt(var + eps)
    if not shift_mean:
        whitened = whitened + mean
    return (whitened * mask).astype(np.float32)


def masked_whiten(x: np.ndarray, mask: np.ndarray, shift_mean: bool = True, eps: float = 1e-8) -> np.ndarray:
    """``(x - mean) / std`` over masked positions (std unbiased); 0 outside the mask.

    With ``shift_mean=False`` only the scale changes (the mean is added back), as TRL does for rewards.
    """
    return whiten_with(x, mask, masked_moments(x, mask), shift_mean, eps)


def kl_estimate(logprobs: np.ndarray, ref_logprobs: np.ndarray, estimator: KLEstimator = "k1") -> np.ndarray:
    """Per-token estimate of KL(policy || reference) at sampled tokens: ``[B, T]`` log-probs -> ``[B, T]``.

    k1 = log pi - log pi_ref (unbiased, can be negative); k3 = (r - 1) - log r with r = pi_ref / pi
    (unbiased, always >= 0, lower variance).
    """
    log_ratio = (logprobs - ref_logprobs).astype(np.float64)
    if estimator == "k1":
        return log_ratio.astype(np.float32)
    if estimator == "k3":
        return (np.expm1(-log_ratio) + log_ratio).astype(np.float32)
    raise ValueError(f"unknown KL estimator {estimator!r}: use 'k1' or 'k3'")


def last_token_index(mask: np.ndarray) -> np.ndarray:
    """``[B]`` index of each row's last response token (rows need at least one)."""
    lengths = mask.sum(axis=1).astype(np.int64)
    if (lengths < 1).any():
        raise ValueError("every sequence needs at least one response token")
    return lengths - 1


def shape_rewards(scores: np.ndarray, kl: np.ndarray, mask: np.ndarray, kl_coef: float) -> np.ndarray:
    """Per-token rewards ``[B, T]``: ``-kl_coef * kl_t`` everywhere, plus the sequence score on the last token.

    Args:
        scores: ``[B]`` sequence scores from the reward function. kl: ``[B, T]`` per-token KL estimates.
    """
    rewards = -kl_coef * kl * mask
    rewards[np.arange(len(scores)), last_token_index(mask)] += scores
    return rewards.astype(np.float32)


def compute_gae(
    rewards: np.ndarray, values: np.ndarray, mask: np.ndarray, gamma: float, lam: float
) -> tuple[np.ndarray, np.ndarray]:
    """Generalized advantage estimation over response tokens.

    ``delta_t = r_t + gamma * V_{t+1} - V_t`` (``V`` after the last token is 0: the episode ends there) and
    ``A_t = delta_t + gamma * lam * A_{t+1}``; returns ``R_t = A_t + V_t``.

    Args:
        rewards, values, mask: ``[B, T]``.

    Returns:
        ``(advantages, returns)``, both ``[B, T]`` float32, 0 where ``mask`` is 0.
    """
    rewards, values, mask = (np.asarray(a, dtype=np.float64) for a in (rewards, values, mask))
    batch, steps = rewards.shape
    advantages = np.zeros((batch, steps))
    next_advantage = np.zeros(batch)
    next_value = np.zeros(batch)
    for t in reversed(range(steps)):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        next_advantage = (delta + gamma * lam * next_advantage) * mask[:, t]
        advantages[:, t] = next_advantage
        next_value = values[:, t] * mask[:, t]
    returns = (advantages + values) * mask
    return advantages.astype(np.float32), returns.astype(np.float32)


def group_advantages(
    scores: np.ndarray, group_size: int, method: Literal["grpo", "rloo"], eps: float = 1e-6
) -> np.ndarray:
    """Critic-free sequence advantages ``[B]`` for ``B / group_size`` prompts with ``group_size`` samples each.

    Samples of one prompt are consecutive. GRPO: ``(s - mean_group) / (std_group + eps)`` (unbiased std);
    RLOO: ``s - mean of the other samples of the group`` = ``G / (G - 1) * (s - mean_group)``.
    """
    if group_size < 2 or len(scores) % group_size:
        raise ValueError(
            f"{len(scores)} scores do not split into groups of {group_size} (need group_size >= 2)"
        )
    groups = np.asarray(scores, dtype=np.float64).reshape(-1, group_size)
    centred = groups - groups.mean(axis=1, keepdims=True)
    if method == "grpo":
        advantages = centred / (groups.std(axis=1, ddof=1, keepdims=True) + eps)
    elif method == "rloo":
        advantages = centred * group_size / (group_size - 1)
    else:
        raise ValueError(f"unknown group method {method!r}: use 'grpo' or 'rloo'")
    return advantages.reshape(-1).astype(np.float32)


def broadcast_to_tokens(sequence_values: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """``[B]`` per-sequence values -> ``[B, T]``, the same value on every response token."""
    return (np.asarray(sequence_values, dtype=np.float32)[:, None] * mask).astype(np.float32)
