"""The PPO update: a batch of experience in, new policy (and value) weights out.

Order of work, as in the papers: (1) recompute proximal log-probs, old values and (when actors did not send them)
reference log-probs with the current weights; (2) per-token KL, shaped rewards, GAE or group advantages
(``learner/advantages.py``); (3) ``update_epochs`` x minibatches of the clipped losses (``learner/ppo.py``),
each minibatch accumulated over micro-batches, gradient-clipped, one Adam step, stopping early past
``target_kl``. The gradient step is compiled with ``mx.compile`` the way mlx-lm's trainer does it.
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from common.logprobs import sampling_logprobs, token_logprobs
from common.models import lm_head_logits
from learner.models import PolicyAndValue
from learner.ppo import (
    Clip,
    entropy,
    importance_weights,
    k3,
    masked_sum_over,
    policy_loss,
    policy_stats,
    reference_kl_loss,
    sequence_ratio,
    token_entropy,
    token_ratio,
    value_loss,
)


@dataclass
class Experience:
    """A batch of sampled sequences as the learner receives them (unpadded NumPy)."""

    prompt_ids: list[list[int]]
    response_ids: list[list[int]]
    behaviour_logprobs: list[np.ndarray]
    scores: np.ndarray
    """``[B]`` sequence scores."""
    policy_versions: np.ndarray
    """``[B]`` policy version each sequence was sampled with."""
    ref_logprobs: list[np.ndarray] | None = None
    """Reference log-probs per response token, when actors computed them."""
    truncated: np.ndarray | None = None
    """``[B]`` bool: the response was cut at ``sampling.max_new_tokens`` (None: none was)."""
    origins: list[tuple[int, int, int]] | None = None
    """Per group: ``(actor id, batch id, prompt index)``, reported in the update's metrics (``trained/groups``)."""


@dataclass
class TrainBatch:
    """Padded arrays; ``[B, T]`` ones are over response tokens, ``mask`` 1 on real tokens."""

    tokens: np.ndarray  # [B, L] int32 prompt + response, right-padded
    positions: np.ndarray  # [B, T] int32 index of the hidden state predicting each response token
    response: np.ndarray  # [B, T] int32
    mask: np.ndarray  # [B, T] float32
    behaviour: np.ndarray  # [B, T] float32

    @property
    def size(self) -> int:
        return len(self.tokens)


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def collate(exp: Experience, pad_multiple: int = 32) -> TrainBatch:
    """Right-pad sequences; lengths are rounded up to ``pad_multiple`` so compiled steps see few shapes."""
    lengths = [len(p) + len(r) for p, r in zip(exp.prompt_ids, exp.response_ids, strict=True)]
    width = _round_up(max(lengths), pad_multiple)
    steps = _round_up(max(len(r) for r in exp.response_ids), pad_multiple)
    size = len(lengths)
    tokens = np.zeros((size, width), np.int32)
    positions = np.zeros((size, steps), np.int32)
    response, mask, behaviour = (
        np.zeros((size, steps), np.int32),
        np.zeros((size, steps), np.float32),
        np.zeros((size, steps), np.float32),
    )
    for b, (prompt, resp) in enumerate(zip(exp.prompt_ids, exp.response_ids, strict=True)):
        n = len(resp)
        tokens[b, : lengths[b]] = list(prompt) + list(resp)
        positions[b] = np.minimum(len(prompt) - 1 + np.arange(steps), width - 1)
        response[b, :n], mask[b, :n], behaviour[b, :n] = resp, 1.0, exp.behaviour_logprobs[b]
    return TrainBatch(tokens, positions, response, mask, behaviour)


def pad_per_token(values: list[np.ndarray], steps: int) -> np.ndarray:
    out = np.zeros((len(values), steps), np.float32)
    for b, v in enumerate(values):
        out[b, : len(v)] = v
    return out


def policy_logprobs(
    policy: nn.Module, tokens: mx.array, positions: mx.array, response: mx.array, temperature: float
) -> mx.array:
    """``[B, T]`` log-probs of response tokens under the sampling distribution, from the policy alone."""
    hidden = mx.take_along_axis(policy.model(tokens), positions[..., None], axis=1)
    return token_logprobs(lm_head_logits(policy, hidden), response, temperature)


@dataclass(frozen=True)
class LossWeights:
    """The objective's settings (``[ppo]``), as the compiled step reads them."""

    temperature: float
    clip: Clip
    value_clip: float
    vf_coef: float
    ent_coef: float
    is_cap: float
    kl_loss_coef: float = 0.0
    """Weight of ``reference_kl_loss`` in the loss (needs ``mb["ref"]``); 0 leaves it out."""
    proximal_in_step: bool = False
    """The update is one gradient step, so the proximal policy (the weights at the start of the update) is the
    policy of this very forward pass: use its log-probs, detached, instead of a separate no-grad pass."""
    kl_loss_estimator: str = "k2"
    policy_ratio: str = "token"
    """'token' (PPO) or 'sequence' (GSPO)."""
    is_correction: str = "truncate"
    is_low: float = 0.5
    is_high: float = 2.0


def proximal_stats(
    logits: mx.array, proximal: mx.array, mb: dict[str, mx.array], temperature: float
) -> dict[str, mx.array]:
    """Entropy of the proximal policy and its k3 KL to the behaviour policy, as token sums / ``num_tokens``."""
    n, mask = mb["num_tokens"], mb["mask"]
    return {
        "policy/entropy": masked_sum_over(token_entropy(sampling_logprobs(logits, temperature)), mask, n),
        "mismatch/behaviour_proximal_kl": masked_sum_over(k3(mb["behaviour"] - proximal), mask, n),
    }


def ppo_objective(
    container: PolicyAndValue, mb: dict[str, mx.array], w: LossWeights
) -> tuple[mx.array, dict[str, mx.array]]:
    """The minibatch loss: clipped surrogate + kl_loss_coef * KL loss - ent_coef * entropy + vf_coef * value loss.

    ``mb`` holds one micro-batch's ``[b, T]`` arrays and two scalars of its whole minibatch: ``normaliser`` (the
    aggregation's, for the policy, KL and entropy terms, whose per-token ``weights`` it also holds) and
    ``num_tokens`` (for the value loss and the token-mean statistics). Full-vocabulary work is kept to what the
    gradient needs: the entropy term (a second pass over ``[B, T, V]``) is only built when ``ent_coef > 0``.
    """
    logits, values = container.response_outputs(mb["tokens"], mb["positions"])
    new_logprobs = token_logprobs(logits, mb["response"], w.temperature)
    mask, n, weights, norm = mb["mask"], mb["num_tokens"], mb["weights"], mb["normaliser"]
    proximal = mx.stop_gradient(new_logprobs) if w.proximal_in_step else mb["proximal"]
    ratio = (sequence_ratio if w.policy_ratio == "sequence" else token_ratio)(new_logprobs, proximal, mask)
    sequence_level = w.policy_ratio == "sequence"
    is_weights, kept = importance_weights(
        proximal, mb["behaviour"], mask, w.is_correction, w.is_cap, w.is_low, w.is_high, sequence_level
    )
    loss = policy_loss(ratio, mb["advantages"], is_weights, weights, norm, w.clip)
    stats = policy_stats(ratio, mb["advantages"], is_weights, kept, mask, n, w.clip)
    stats["loss/policy"] = loss
    if w.proximal_in_step:  # what the skipped no-grad pass would have reported
        stats.update(proximal_stats(mx.stop_gradient(logits), proximal, mb, w.temperature))
    if w.kl_loss_coef > 0:
        stats["loss/ref_kl"] = reference_kl_loss(new_logprobs, mb["ref"], weights, norm, w.kl_loss_estimator)
        loss = loss + w.kl_loss_coef * stats["loss/ref_kl"]
    if w.ent_coef > 0:
        stats["loss/entropy"] = entropy(sampling_logprobs(logits, w.temperature), weights, norm)
        loss = loss - w.ent_coef * stats["loss/entropy"]
    if values is not None:
        v_loss, v_stats = value_loss(values, mb["old_values"], mb["returns"], mask, w.value_clip, n)
        stats.update(v_stats)
        stats["loss/value"] = v_loss
        loss = loss + w.vf_coef * v_loss
    stats["loss/total"] = loss
    return loss, stats
