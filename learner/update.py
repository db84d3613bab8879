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
    entropy,
    masked_sum_over,
    policy_loss,
    reference_kl_loss,
    token_entropy,
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
    temperature: float
    clip_coef: float
    value_clip: float
    vf_coef: float
    ent_coef: float
    is_cap: float
    kl_loss_coef: float = 0.0
    """Weight of ``reference_kl_loss`` in the loss (needs ``mb["ref"]``); 0 leaves it out."""
    proximal_in_step: bool = False
    """The update is one gradient step, so the proximal policy (the weights at the start of the update) is the
    policy of this very forward pass: use its log-probs, detached, instead of a separate no-grad pass."""


def proximal_stats(
    logits: mx.array, proximal: mx.array, mb: dict[str, mx.array], temperature: float
) -> dict[str, mx.array]:
    """Entropy of the proximal policy and its k3 KL to the behaviour policy, as token sums / ``num_tokens``."""
    n, mask = mb["num_tokens"], mb["mask"]
    log_ratio = mb["behaviour"] - proximal  # k3 as in prepare: kl_estimate(behaviour, proximal, "k3")
    return {
        "policy/entropy": masked_sum_over(token_entropy(sampling_logprobs(logits, temperature)), mask, n),
        "mismatch/behaviour_proximal_kl": masked_sum_over(mx.exp(-log_ratio) - 1.0 + log_ratio, mask, n),
    }


def ppo_objective(
    container: PolicyAndValue, mb: dict[str, mx.array], w: LossWeights
) -> tuple[mx.array, dict[str, mx.array]]:
    """The minibatch loss: clipped surrogate + vf_coef * value loss - ent_coef * entropy (token sums / num_tokens).

    Full-vocabulary work is kept to what the gradient needs: the entropy term (a second pass over ``[B, T, V]``)
    is only built when ``ent_coef > 0``; the reported entropy comes from the no-grad pass.
    """
    logits, values = container.response_outputs(mb["tokens"], mb["positions"])
    new_logprobs = token_logprobs(logits, mb["response"], w.temperature)
    n = mb["num_tokens"]
    proximal = mx.stop_gradient(new_logprobs) if w.proximal_in_step else mb["proximal"]
    loss, stats = policy_loss(
        new_logprobs, proximal, mb["behaviour"], mb["advantages"], mb["mask"], w.clip_coef, w.is_cap, n
    )
    stats["loss/policy"] = loss
    if w.proximal_in_step:  # what the skipped no-grad pass would have reported
        stats.update(proximal_stats(mx.stop_gradient(logits), proximal, mb, w.temperature))
    if w.kl_loss_coef > 0:
        stats["loss/ref_kl"] = reference_kl_loss(new_logprobs, mb["ref"], mb["mask"], n)
        loss = loss + w.kl_loss_coef * stats["loss/ref_kl"]
    if w.ent_coef > 0:
        stats["loss/entropy"] = entropy(sampling_logprobs(logits, w.temperature), mb["mask"], n)
        loss = loss - w.ent_coef * stats["loss/entropy"]
    if values is not None:
        v_loss, v_stats = value_loss(values, mb["old_values"], mb["returns"], mb["mask"], w.value_clip, n)
        stats.update(v_stats)
        stats["loss/value"] = v_loss
        loss = loss + w.vf_coef * v_loss
    stats["loss/total"] = loss
    return loss, stats
