"""How many sequences go into one forward/backward pass: a fixed count, or as many as fit a token budget.

A fixed ``micro_batch_size`` pads every micro-batch to its longest sequence whatever its length: eight short
answers use the GPU a fraction as well as eight long ones, and the size that fits memory for the longest batch
wastes most of it on the others. With a token budget (``ppo.micro_batch_tokens``) the rows, sorted by length
(``learner/experience.by_length``), are taken greedily while ``rows x their padded length`` stays within it: short
sequences travel in large micro-batches, long ones in small ones, and peak memory follows the budget, not the
batch. The gradient is the same (each micro-batch's token sums over the minibatch's normalisers add up).

``-1`` (the default) picks the budget from the device's memory on a GPU: ``AUTO_MEMORY_FRACTION`` of what is free
when the learner starts, over ``activation_bytes_per_token``; on the CPU backend it keeps the fixed count (larger
micro-batches measured no faster there, and the shard threads split each one anyway).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import mlx.core as mx
import numpy as np

from common.device_share import applied_limit
from common.logprobs import round_up
from learner.experience import by_length, sequence_lengths

logger = logging.getLogger(__name__)

AUTO_MEMORY_FRACTION = 0.5
"""Of the device memory free at start-up (weights loaded), what auto-sized micro-batches may use: actors on the
same GPU (a Mac's unified memory) keep the rest for their weights and KV caches."""
SHARED_PART_FRACTION = 0.75
"""With the device shared by the launcher (``common/device_share.py``: the actors hold their own parts), what
auto-sized micro-batches may use of the learner's part left after its weights; the rest is the optimizer state
and the allocator's slack (the measured peak was 1.2x the activation estimate)."""


def token_budget_groups(
    rows: np.ndarray, lengths: np.ndarray, budget: int, multiple: int
) -> list[np.ndarray]:
    """Consecutive groups of ``rows`` (sorted shortest first) whose ``len(group) x round_up(longest, multiple)``
    stays within ``budget`` tokens; a sequence longer than the budget goes alone.

    Args:
        rows: ``[n]`` row indices, ascending in ``lengths``. lengths: ``[n]`` tokens of each of them.
        budget: padded tokens per group (> 0). multiple: the padding ``rows_cut_to_length`` rounds up to.

    Returns:
        The groups, in order, covering ``rows`` exactly once.
    """
    groups, start = [], 0
    for i in range(1, len(rows) + 1):
        if i == len(rows) or (i + 1 - start) * round_up(lengths[i], multiple) > budget:
            groups.append(rows[start:i])
            start = i
    return [g for g in groups if len(g)]


def activation_bytes_per_token(args, dtype_bytes: int) -> int:
    """Bytes one token of a micro-batch holds through a gradient step (an upper-end estimate, fitted to the
    peaks measured on an H200 at 8k and 32k tokens: 1.6 MB/token for SmolLM2-135M, 4.0 MB for the 1.7B shape).

    Per block, what the backward keeps: the inputs of the linear layers, norms, rotary outputs, attention's and the
    gated MLP's activations, about ``16 x hidden + 6 x intermediate`` values; per response token, the vocabulary's
    logits in the compute dtype, their float32 copy and its gradient (``2 + 4 + 4 + 2`` bytes each).
    """
    per_block = (16 * args.hidden_size + 6 * args.intermediate_size) * dtype_bytes
    return int(args.num_hidden_layers * per_block + 12 * args.vocab_size)


def free_device_memory(info: dict) -> int:
    """Bytes the default device can still hold, from ``mx.device_info()``: CUDA reports ``free_memory``; Metal
    its recommended working set (``max_recommended_working_set_size``, or ``memory_size``), less what MLX holds
    now; 0 when unknown (the CPU backend reports neither)."""
    if "free_memory" in info:
        return int(info["free_memory"])
    total = int(info.get("max_recommended_working_set_size") or info.get("memory_size") or 0)
    return max(total - mx.get_active_memory(), 0) if total else 0


def resolve_token_budget(requested: int, args, dtype: mx.Dtype, shared_limit: int = 0) -> int:
    """``ppo.micro_batch_tokens`` as the learner uses it: > 0 as given, 0 off, -1 auto (off on the CPU);
    ``shared_limit``: this process's memory limit on a shared device (0: alone)."""
    if requested >= 0:
        return requested
    free, fraction = budget_memory(free_device_memory(mx.device_info()), shared_limit)
    if mx.default_device() == mx.cpu or free <= 0:
        return 0
    per_token = activation_bytes_per_token(args, dtype.size)
    budget = int(fraction * free / per_token)
    logger.info(
        "micro-batches of up to %d tokens (%.0f%% of %.1f GB free / %.2f MB per token)",
        budget,
        100 * fraction,
        free / 1e9,
        per_token / 1e6,
    )
    return max(budget, 1)


def budget_memory(free: int, shared_limit: int) -> tuple[int, float]:
    """The memory auto-sized micro-batches are cut from and the fraction of it they may use: the device's free
    memory, or with a shared device (``shared_limit`` > 0, this process's memory limit) the part of it left."""
    if shared_limit <= 0:
        return free, AUTO_MEMORY_FRACTION
    return min(free, max(shared_limit - mx.get_active_memory(), 0)), SHARED_PART_FRACTION


def token_budget(requested: int, model, shared_limit: int | None = None) -> int:
    """``resolve_token_budget`` for an mlx-lm ``model`` (its args and compute dtype); auto is off for a model
    without mlx-lm's args. ``shared_limit``: default, the limit ``common.device_share`` set in this process."""
    args = getattr(model, "args", None)
    if requested < 0 and not hasattr(args, "intermediate_size"):
        return 0
    dtype = model.model.embed_tokens.weight.dtype
    dtype = dtype if mx.issubdtype(dtype, mx.floating) else mx.bfloat16
    return resolve_token_budget(
        requested, args, dtype, applied_limit() if shared_limit is None else shared_limit
    )


def plan_micro_batches(
    rows: np.ndarray, lengths: np.ndarray, micro_batch_size: int, token_budget: int, multiple: int
) -> list[np.ndarray]:
    """The micro-batches of ``rows`` (sorted shortest first, ``lengths`` theirs): by ``token_budget`` when it is
    > 0, else ``micro_batch_size`` rows each."""
    if token_budget > 0:
        return token_budget_groups(rows, lengths, token_budget, multiple)
    return [rows[start : start + micro_batch_size] for start in range(0, len(rows), micro_batch_size)]


@dataclass(frozen=True)
class MicroBatching:
    """The learner's micro-batch rule: ``size`` rows each, or (``token_budget`` > 0) as many as fit the budget."""

    size: int
    token_budget: int
    multiple: int
    """The padding multiple micro-batches are cut to (``rows_cut_to_length``)."""

    def __call__(self, arrays: dict[str, np.ndarray], rows: np.ndarray) -> list[np.ndarray]:
        """Micro-batches of ``rows`` of ``Experience.padded``'s ``arrays``, sequences of similar lengths together."""
        ordered = by_length(arrays, rows)
        lengths = sequence_lengths(arrays, ordered)
        return plan_micro_batches(ordered, lengths, self.size, self.token_budget, self.multiple)
