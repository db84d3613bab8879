"""Rewards and advantages for token-level PPO and the critic-free variants: pure NumPy on response tokens.

All of an update's advantage math is here: the scores' shaping (``shaped_scores``: DAPO's overlong penalty), the
KL in the reward (``reward_kl``), GAE, GRPO/RLOO group baselines and their normalisations, whitening
(``training_signal`` puts them together), and the tokens the loss sees (``loss_mask``).

Shapes: ``B`` sequences, ``T`` response tokens (right-padded); ``mask`` is 1 on the tokens the model sampled and
0 elsewhere: on padding, and in a multi-turn episode on the environment's turns between the model's (context
only: they are not steps of the policy, so rewards, KL, advantages and the critic's returns live on model tokens
alone). Single-turn, the mask is a prefix of each row. Every output is 0 where ``mask`` is 0. Advantages are data
preparation, not differentiated, so they stay in NumPy and are computed once per update.

References: GAE, Schulman et al. 2016 (arXiv:1506.02438); per-token KL penalty, Ziegler et al. 2019
(arXiv:1909.08593); k3 estimator, Schulman 2020 ("Approximating KL Divergence"); GRPO, Shao et al. 2024
(arXiv:2402.03300); RLOO, Ahmadian et al. 2024 (arXiv:2402.14740).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import numpy as np

from common.config import PPOUpdateConfig
from learner.aggregation import default_overlong_buffer, overlong_penalty
from learner.experience import masked_extent
from learner.kl_estimators import kl_estimate


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


def last_token_index(mask: np.ndarray) -> np.ndarray:
    """``[B]`` index of each row's last masked token: its last response token, or in a multi-turn episode its
    last model token (rows need at least one)."""
    extent = masked_extent(mask)
    if (extent < 1).any():
        raise ValueError("every sequence needs at least one response token (one the model sampled)")
    return extent - 1


def shape_rewards(
    scores: np.ndarray,
    kl: np.ndarray,
    mask: np.ndarray,
    kl_coef: float,
    token_rewards: np.ndarray | None = None,
) -> np.ndarray:
    """Per-token rewards ``[B, T]``: ``-kl_coef * kl_t`` on every (model) token, plus the sequence score on the
    last one; with ``token_rewards``, each model token's own reward, and on the last one only what they leave of
    the score: ``r_t = token_rewards_t + [t last] * (score - sum_s token_rewards_s) - kl_coef * kl_t``.

    The score is the episode's return, so the rewards of a sequence (KL aside) always add up to its score: the
    return PPO's critic learns is the one GRPO/RLOO compare, per-turn rewards only say *where* it was earned
    (credit to the turn that earned it, GAE carrying it back), and all of a score on its last token is exactly
    the case without them. OpenRLHF puts the score on the last action token and adds per-token rewards on top
    (its return is their sum plus the score); verl keeps a per-token ``token_level_scores`` tensor; the
    remainder rule makes both readings agree whenever the score is the sum of the turn rewards.

    Args:
        scores: ``[B]`` sequence scores (episode returns). kl: ``[B, T]`` per-token KL estimates.
        token_rewards: ``[B, T]`` rewards on model tokens (0 elsewhere), or None.
    """
    rewards = -kl_coef * np.asarray(kl, np.float64) * mask
    remainder = np.asarray(scores, np.float64)
    if token_rewards is not None:
        placed = np.asarray(token_rewards, np.float64) * mask
        rewards, remainder = rewards + placed, remainder - placed.sum(axis=1)
    rewards[np.arange(len(remainder)), last_token_index(mask)] += remainder
    return rewards.astype(np.float32)


def compute_gae(
    rewards: np.ndarray, values: np.ndarray, mask: np.ndarray, gamma: float, lam: float
) -> tuple[np.ndarray, np.ndarray]:
    """Generalized advantage estimation over the tokens where ``mask`` is 1, the others skipped.

    Along each row's masked tokens ``t_1 < ... < t_n``: ``delta_i = r_{t_i} + gamma * V_{t_{i+1}} - V_{t_i}``
    (``V_{t_{n+1}}`` = 0: the episode ends there) and ``A_i = delta_i + gamma * lam * A_{i+1}``; returns
    ``R = A + V``. Single-turn the masked tokens are a prefix and this is plain GAE. In a multi-turn episode the
    environment's tokens (mask 0) are not steps of the policy: the value a model token bootstraps from is the
    next *model* token's, across the environment's turn, and gamma and lambda apply once per model token (verl's
    rule: "skip values and TD-error on observation tokens"). Values, rewards and advantages at unmasked
    positions are never read.

    Args:
        rewards, values, mask: ``[B, T]``.

    Returns:
        ``(advantages, returns)``, both ``[B, T]`` float32, 0 where ``mask`` is 0.
    """
    rewards, values = (np.asarray(a, dtype=np.float64) for a in (rewards, values))
    present = np.asarray(mask) > 0
    batch, steps = rewards.shape
    advantages = np.zeros((batch, steps))
    next_advantage, next_value = np.zeros(batch), np.zeros(batch)
    for t in reversed(range(steps)):
        advantage = rewards[:, t] + gamma * next_value - values[:, t] + gamma * lam * next_advantage
        here = present[:, t]  # elsewhere the step is skipped: what follows passes through unchanged
        advantages[:, t] = np.where(here, advantage, 0.0)
        next_advantage = np.where(here, advantage, next_advantage)
        next_value = np.where(here, values[:, t], next_value)
    returns = np.where(present, advantages + values, 0.0)
    return advantages.astype(np.float32), returns.astype(np.float32)


def penalty_to_go(per_token: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """``sum_{s >= t} x_s`` along each row's response tokens: ``[B, T]`` -> ``[B, T]`` (0 outside ``mask``).

    The return-to-go of a per-token reward with gamma = 1 and no critic. With ``x = kl_coef * k1`` it is the
    part of a critic-free advantage that carries the KL penalty: ``E[sum_t grad log pi(y_t) * sum_{s>=t} k1_s]``
    is the exact gradient of the sequence KL(pi || ref) (tokens before ``t`` do not depend on ``y_t``).
    """
    masked = np.asarray(per_token, np.float64) * mask
    return (np.flip(np.cumsum(np.flip(masked, axis=1), axis=1), axis=1) * mask).astype(np.float32)


def group_advantages(
    scores: np.ndarray,
    group_size: int,
    method: Literal["grpo", "rloo"],
    norm: Literal["group", "batch", "none"] | None = None,
    batch_moments: np.ndarray | None = None,
    eps: float = 1e-6,
) -> np.ndarray:
    """Critic-free sequence advantages ``[B]`` for ``B / group_size`` prompts with ``group_size`` samples each.

    Samples of one prompt are consecutive. The baseline: GRPO ``s - mean_group``; RLOO ``s - mean of the other
    samples`` = ``G / (G - 1) * (s - mean_group)`` (Ahmadian et al. 2024). The scale (``norm``; default GRPO's
    'group' for grpo, 'none' for rloo): 'group' divides by the group's std (unbiased; GRPO), 'batch' by the
    std of every score in the batch around the batch mean (``batch_moments``: ``masked_moments`` of the scores
    summed over ranks, the whole batch's; LitePPO's formula, Liu et al. 2025, arXiv:2508.08221, and TRL's
    ``scale_rewards="batch"``; AReaL's ``std_level="batch"`` pools the deviations from each group's mean
    instead, a smaller number), 'none' keeps the raw difference (Dr. GRPO,
    Liu et al. 2025, arXiv:2503.20783: dividing by the std up-weights prompts that are too easy or too hard).
    """
    if group_size < 2 or len(scores) % group_size:
        raise ValueError(
            f"{len(scores)} scores do not split into groups of {group_size} (need group_size >= 2)"
        )
    groups = np.asarray(scores, dtype=np.float64).reshape(-1, group_size)
    centred = groups - groups.mean(axis=1, keepdims=True)
    if method == "rloo":
        centred = centred * group_size / (group_size - 1)
    elif method != "grpo":
        raise ValueError(f"unknown group method {method!r}: use 'grpo' or 'rloo'")
    norm = norm or ("group" if method == "grpo" else "none")
    if norm == "group":
        centred = centred / (groups.std(axis=1, ddof=1, keepdims=True) + eps)
    elif norm == "batch":
        moments = masked_moments(groups, np.ones_like(groups)) if batch_moments is None else batch_moments
        total, total_sq, count = (float(m) for m in moments)
        variance = max(total_sq - total * total / count, 0.0) / max(count - 1, 1)
        centred = centred / (np.sqrt(variance) + eps)
    elif norm != "none":
        raise ValueError(f"unknown advantage normalisation {norm!r}: use 'group', 'batch' or 'none'")
    return centred.reshape(-1).astype(np.float32)


def critic_free_advantages(
    seq_advantages: np.ndarray, k1: np.ndarray, mask: np.ndarray, kl_coef: float
) -> np.ndarray:
    """Per-token critic-free advantages ``[B, T]``: each sequence's (normalised) score advantage on every token,
    minus the KL penalty-to-go ``kl_coef * sum_{s >= t} k1_s``.

    The penalty is added *after* the group normalisation: folded into the scores first, a group whose task scores
    are all equal would get ``-(KL_i - mean) / std(KL)``, unit-scale pure KL whatever ``kl_coef`` is.
    """
    advantages = broadcast_to_tokens(seq_advantages, mask)
    if kl_coef:
        advantages = advantages - penalty_to_go(kl_coef * k1, mask)
    return advantages.astype(np.float32)


def broadcast_to_tokens(sequence_values: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """``[B]`` per-sequence values -> ``[B, T]``, the same value on every response token."""
    return (np.asarray(sequence_values, dtype=np.float32)[:, None] * mask).astype(np.float32)


def shaped_scores(
    cfg: PPOUpdateConfig, scores: np.ndarray, lengths: np.ndarray, max_new_tokens: int
) -> np.ndarray:
    """``[B]`` float64: the scores the advantages see, the reward's plus DAPO's overlong penalty of the response
    ``lengths`` ``[B]`` when ``cfg.truncated = "overlong_penalty"`` (``learner/aggregation.py``)."""
    scores = np.asarray(scores, np.float64)
    if cfg.truncated == "overlong_penalty":
        buffer = cfg.overlong_buffer or default_overlong_buffer(max_new_tokens)
        scores = scores + overlong_penalty(lengths, max_new_tokens, buffer, cfg.overlong_penalty)
    return scores


def loss_mask(mask: np.ndarray, truncated: np.ndarray | None, mode: str) -> np.ndarray:
    """``[B, T]``: the tokens the loss sees. With ``ppo.truncated = "mask"`` the responses cut off (``truncated``
    ``[B]`` bool) are left out; they still count in their group's baseline."""
    if mode != "mask" or truncated is None:
        return mask
    return mask * (~np.asarray(truncated, bool))[:, None].astype(np.float32)


def reward_kl(proximal: np.ndarray, ref: np.ndarray | None, mask: np.ndarray) -> np.ndarray:
    """``[B, T]`` k1 = ``log pi_proximal - log pi_ref`` on real tokens: the KL that goes into the reward (zeros
    without reference log-probs)."""
    return np.zeros_like(mask) if ref is None else kl_estimate(proximal, ref, "k1") * mask


def _identity(values: np.ndarray) -> np.ndarray:
    return values


def training_signal(
    cfg: PPOUpdateConfig,
    scores: np.ndarray,
    k1: np.ndarray,
    mask: np.ndarray,
    values: np.ndarray | None,
    kl_coef: float,
    sum_over_ranks: Callable[[np.ndarray], np.ndarray] = _identity,
    token_rewards: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray | None]:
    """``(advantages [B, T], returns [B, T] or None)`` for an update, in the order of the papers.

    Args:
        cfg: the ``[ppo]`` settings (algorithm, group size, normalisation, GAE's gamma and lambda).
        scores: ``[B]`` sequence scores (any overlong penalty already added). k1: ``[B, T]`` per-token
            ``log pi_proximal - log pi_ref`` (0 outside ``mask``). values: ``[B, T]`` old values (PPO) or None.
        kl_coef: the KL coefficient now (the adaptive controller's).
        sum_over_ranks: elementwise sum of a small array over data-parallel ranks, so that batch statistics
            (LitePPO's std, PPO's whitening) are those of the whole batch, as one learner would compute them.
        token_rewards: ``[B, T]`` rewards the actors placed on model tokens (per-turn rewards), or None.

    ``mask`` is the model's tokens (see the module docstring): with multi-turn episodes every step below runs
    over them alone. PPO: per-token reward ``-kl_coef * k1`` plus ``token_rewards`` and what they leave of the
    score on the last model token (``shape_rewards``), GAE over model tokens, whitening. Critic-free: the group
    (GRPO/RLOO) advantage of the scores (the episode returns: ``token_rewards`` only place a return, which a
    sequence-level baseline does not look into), on every model token, minus the KL penalty-to-go.
    """
    if cfg.is_critic_free:
        norm = None if cfg.advantage_norm == "auto" else cfg.advantage_norm
        moments = None
        if norm == "batch":
            moments = sum_over_ranks(masked_moments(scores, np.ones_like(scores, dtype=np.float64)))
        seq_adv = group_advantages(scores, cfg.group_size, cfg.algorithm, norm, moments)
        return critic_free_advantages(seq_adv, k1, mask, kl_coef), None
    rewards = shape_rewards(scores, k1, mask, kl_coef, token_rewards)
    advantages, returns = compute_gae(rewards, values, mask, cfg.gamma, cfg.lam)
    if cfg.whiten_advantages:  # over the whole batch of all ranks, as one learner would
        advantages = whiten_with(advantages, mask, sum_over_ranks(masked_moments(advantages, mask)))
    return advantages, returns
