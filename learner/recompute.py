"""The no-grad pass of an update: what the current weights say about the batch before any step is taken.

Per response token, ``[B, T]`` each: the proximal log-probs and entropy of the policy and the old values of the
critic (part ``"policy"``), and the reference log-probs (part ``"ref"``: a whole extra trunk pass, with the
adapters switched off, or the initial weights of a full fine-tuning; skipped when the actors sent them). It runs
micro-batch by micro-batch, each split over the shard pool's workers (``learner/shards.py``).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from common.config import PPOUpdateConfig
from common.logprobs import gather_token_logprobs, response_logprobs, sampling_logprobs
from common.lora import adapters_disabled
from learner.experience import rows_cut_to_length
from learner.loss import token_entropy
from learner.micro_batches import MicroBatching
from learner.models import PolicyAndValue
from learner.shards import ShardPool, Worker, micro_batch_shards
from learner.vocab_pass import chunked_logprobs_and_entropy, flat, head_weight


class Recompute:
    """Runs the no-grad pass over padded batch arrays (``Experience.padded``)."""

    def __init__(
        self,
        pool: ShardPool,
        temperature: float,
        micro_batching: MicroBatching,
        reference: nn.Module | None = None,
        vocab_chunk: int = 0,
        compile_passes: bool = True,
    ):
        """``reference``: the frozen initial policy of a full fine-tuning (None: the policy with its adapters
        off); ``vocab_chunk``: tokens per chunk of the vocabulary pass (0: all at once)."""
        self.pool, self.temperature, self.micro_batching = pool, temperature, micro_batching
        self.reference, self.vocab_chunk, self.compile_passes = reference, vocab_chunk, compile_passes

    def run(self, arrays: dict[str, np.ndarray], parts: tuple[str, ...]) -> dict[str, np.ndarray]:
        """``proximal``, ``entropy`` and (with a critic) ``values`` for part ``"policy"``, ``ref`` for ``"ref"``."""
        step = partial(self._shard, arrays=arrays, parts=parts)
        micro_batches = self.micro_batching(arrays, np.arange(len(arrays["tokens"])))
        shards = micro_batch_shards(micro_batches, self.pool.size)
        results: dict[str, np.ndarray] = {}
        for shard, out in zip(shards, self.pool.map(step, shards), strict=True):
            for key, value in out.items():  # [b, t] with t cut to the shard's own length: back into [B, T]
                full = results.setdefault(key, np.zeros(arrays["mask"].shape, np.float32))
                full[shard, : value.shape[1]] = np.array(value)
        return results

    def _shard(
        self, worker: Worker, rows: np.ndarray, arrays: dict[str, np.ndarray], parts: tuple[str, ...]
    ) -> dict[str, mx.array]:
        cut = rows_cut_to_length(
            {k: arrays[k] for k in ("tokens", "positions", "response", "mask")},
            rows,
            self.micro_batching.multiple,
        )
        tokens, positions, response = (mx.array(cut[k]) for k in ("tokens", "positions", "response"))
        out = {}
        if "policy" in parts:
            out.update(self._pass(worker, "policy")(tokens, positions, response))
        if "ref" in parts:
            out["ref"] = self._pass(worker, "ref")(tokens, positions, response)
        return out

    def _pass(self, worker: Worker, part: str) -> Callable[[mx.array, mx.array, mx.array], Any]:
        """The ``part`` pass on ``worker``'s view of the model, ``mx.compile``d once per worker (the weights are
        its inputs, so updated adapters are read; the reference's adapter scale of 0 is fixed in its trace): on a
        GPU the uncompiled passes took ~2.7x the time of the same FLOPs compiled (bench/learner_profile.py)."""
        fn = partial(self.policy_part if part == "policy" else self.reference_logprobs, worker.module)
        if not self.compile_passes:
            return fn
        key = f"no-grad {part}"
        if key not in worker.cache:
            state = [worker.module.state] + ([self.reference.state] if self.reference is not None else [])
            worker.cache[key] = mx.compile(fn, inputs=state)
        return worker.cache[key]

    def policy_part(
        self, module: PolicyAndValue, tokens: mx.array, positions: mx.array, response: mx.array
    ) -> dict[str, mx.array]:
        """``proximal`` log-probs, ``entropy`` and (with a critic) ``values``, ``[b, T]`` each."""
        weight = head_weight(module.policy) if self.vocab_chunk > 0 else None
        if weight is None:
            logits, values = module.response_outputs(tokens, positions)
            logprobs = sampling_logprobs(logits, self.temperature)
            out = {"proximal": gather_token_logprobs(logprobs, response), "entropy": token_entropy(logprobs)}
        else:
            hidden, values = module.response_hidden(tokens, positions)
            targets = flat(response).astype(mx.int32)
            parts = chunked_logprobs_and_entropy(
                flat(hidden), weight, targets, self.temperature, self.vocab_chunk
            )
            out = {"proximal": parts[0].reshape(response.shape), "entropy": parts[1].reshape(response.shape)}
        return out if values is None else out | {"values": values}

    def reference_logprobs(
        self, module: PolicyAndValue, tokens: mx.array, positions: mx.array, response: mx.array
    ) -> mx.array:
        """``[b, T]`` reference log-probs of ``response`` (``module``: a worker's view of the container)."""
        if self.reference is not None:  # full fine-tuning: forward only, safe to share between threads
            return response_logprobs(self.reference, tokens, positions, response, self.temperature)
        with adapters_disabled(module.policy):
            return response_logprobs(module.policy, tokens, positions, response, self.temperature)


def proximal_from_step(cfg: PPOUpdateConfig, requested: bool | None = None) -> bool:
    """Whether the gradient step's own forward stands in for the policy part of the no-grad pass.

    It can with one gradient step per update, no critic (whose old values GAE needs first) and no KL in the
    reward (its k1 needs the proximal log-probs before the step): the proximal policy is then the policy of the
    step's forward (as verl does on-policy). ``requested`` None decides by that; True where it cannot raises.
    """
    single_step = (
        cfg.update_epochs == 1 and cfg.num_minibatches == 1 and cfg.is_critic_free and cfg.kl_coef == 0
    )
    if requested and not single_step:
        raise ValueError(
            "proximal_in_step needs a critic-free update of one epoch and one minibatch, and kl_coef = 0"
        )
    return single_step if requested is None else requested
