"""Reference log-probs on the actor (``ppo.reference_on = "actors"``): the frozen base scores each completion.

The KL penalty needs log pi_ref(response | prompt) for every response token. Computing it where the sequence was
sampled moves one trunk pass per update off the learner, which is the bottleneck of an async run, onto the
actors, which scale out. It is the same computation the learner would do (``common/logprobs.py``'s padding and
``response_logprobs`` at the sampling temperature, adapters switched off), in micro-batches.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from common.logprobs import pad_sequences, response_logprobs
from common.lora import adapters_disabled
from common.ragged import Ragged


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
            chunk = zip(
                prompts[start : start + micro_batch], responses[start : start + micro_batch], strict=True
            )
            pairs = [(list(p), list(r)) for p, r in chunk]
            sequences = Ragged.from_rows([p + r for p, r in pairs], np.int32)
            padded = pad_sequences(sequences, np.array([len(p) for p, _ in pairs]))[:3]
            logprobs = np.array(response_logprobs(model, *(mx.array(a) for a in padded), temperature))
            out += [logprobs[b, : len(r)].astype(np.float32) for b, (_, r) in enumerate(pairs)]
    return out
