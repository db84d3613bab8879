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

from common.logprobs import token_logprobs
from common.models import lm_head_logits


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
