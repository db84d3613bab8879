"""Reference log-probs on the actor (``ppo.reference_on = "actors"``): the frozen base scores each completion.

The KL penalty needs log pi_ref(response | prompt) for every response token. Computing it where the sequence was
sampled moves one trunk pass per update off the learner, which is the bottleneck of an async run, onto the
actors, which scale out. It is the same distribution the learner would compute (``token_logprobs`` at the
sampling temperature, adapters switched off), on right-padded sequences in micro-batches.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from common.logprobs import token_logprobs
from common.lora import adapters_disabled
from common.models import lm_head_logits


def _padded(
    prompts: list[list[int]], responses: list[list[int]]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``[B, L]`` right-padded tokens, ``[B, T]`` positions predicting each response token, ``[B, T]`` targets."""
    width = max(len(p) + len(r) for p, r in zip(prompts, responses, strict=True))
    steps = max(max(len(r) for r in responses), 1)
    tokens = np.zeros((len(prompts), width), np.int32)
    positions = np.zeros((len(prompts), steps), np.int32)
    targets = np.zeros((len(prompts), steps), np.int32)
    for b, (prompt, response) in enumerate(zip(prompts, responses, strict=True)):
        tokens[b, : len(prompt) + len(response)] = prompt + response
        positions[b] = np.minimum(len(prompt) - 1 + np.arange(steps), width - 1)
        targets[b, : len(response)] = response
    return tokens, positions, targets


def reference_logprobs(
    model: nn.Module,
    prompts: list[list[int]],
    responses: list[list[int]],
    temperature: float,
    micro_batch: int = 8,
) -> list[np.ndarray]:
    """Per sequence, the ``[len(response)]`` float32 log-probs of its response tokens under the base model."""
    out: list[np.ndarray] = []
    with adapters_disabled(model):
        for start in range(0, len(prompts), micro_batch):
            chunk = slice(start, start + micro_batch)
            tokens, positions, targets = _padded(prompts[chunk], responses[chunk])
            hidden = mx.take_along_axis(model.model(mx.array(tokens)), mx.array(positions)[..., None], axis=1)
            logprobs = np.array(token_logprobs(lm_head_logits(model, hidden), mx.array(targets), temperature))
            out += [logprobs[b, : len(r)].astype(np.float32) for b, r in enumerate(responses[chunk])]
    return out
