"""The optimisation of an update: ``update_epochs`` x minibatches, each one Adam step over its micro-batches.

``MinibatchUpdate.step`` accumulates the gradient of ``learner/loss.py``'s ``ppo_objective`` over the micro-batches
(each split over the shard pool's workers) and every rank, checks it is finite everywhere, clips it and applies
it; ``run_epochs`` draws the minibatches and stops early past ``target_kl``. The gradient step is compiled with
``mx.compile`` the way mlx-lm's trainer does it.
"""

from __future__ import annotations

import logging
import warnings
from functools import partial

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten, tree_map

from common.config import PPOUpdateConfig
from learner.distributed import collective, sum_gradients, sum_over_ranks, sum_stats_over_ranks
from learner.experience import rows_cut_to_length
from learner.loss import LossSettings, ppo_objective
from learner.micro_batches import MicroBatching
from learner.models import PolicyAndValue
from learner.optimizer import MasterWeights, to_float32
from learner.shards import ShardPool, Worker, micro_batch_shards

logger = logging.getLogger(__name__)

MAX_STATS = ("is/weight_max",)
"""Statistics whose minibatch value is the maximum over shards, ranks and steps (the others add up / average)."""
GLOBAL_STATS = ("grad/norm", "update/skipped_nonfinite", "update/skipped_empty")
"""The same on every rank already: not summed over ranks."""


class MinibatchUpdate:
    """One optimizer step per minibatch: gradients summed over micro-batches, shards and ranks, then applied."""

    def __init__(
        self,
        container: PolicyAndValue,
        optimizer: optim.Optimizer,
        master: MasterWeights | None,
        settings: LossSettings,
        pool: ShardPool,
        cfg: PPOUpdateConfig,
        micro_batching: MicroBatching,
        group=None,
        compile_step: bool = True,
    ):
        self.container, self.optimizer, self.master = container, optimizer, master
        self.micro_batching = micro_batching  # micro-batches are cut to their own longest
        self.settings, self.pool, self.group = settings, pool, group
        self.max_grad_norm = cfg.max_grad_norm
        self.compile_step = compile_step
        self._apply = self._make_apply_fn()

    def _make_grad_fn(self, module: nn.Module):
        loss_and_grad = nn.value_and_grad(module, partial(ppo_objective, w=self.settings))

        def grad_step(mb: dict[str, mx.array]):
            (_, stats), grads = loss_and_grad(module, mb)
            return stats, grads

        # value_and_grad writes the parameters back into the module, so they are outputs too (as in mlx-lm).
        state = [module.state, mx.random.state]
        return mx.compile(grad_step, inputs=state, outputs=state) if self.compile_step else grad_step

    def grad_step(self, worker: Worker, mb: dict[str, mx.array]):
        """``(stats, grads)`` of one shard on ``worker``'s view of the model (its own compiled step)."""
        if "grad" not in worker.cache:
            worker.cache["grad"] = self._make_grad_fn(worker.module)
        return worker.cache["grad"](mb)

    def _make_apply_fn(self):
        def apply(grads):
            # Every rank's loss is its token sum over the whole minibatch's normaliser: the ranks' gradients add up.
            grads = sum_gradients(grads, self.group)
            grad_norm = mx.array(0.0)
            if self.max_grad_norm > 0:
                grads, grad_norm = optim.clip_grad_norm(grads, self.max_grad_norm)
            if self.master is None:
                self.optimizer.update(self.container, grads)
            else:
                self.master.apply(self.optimizer, self.container, grads)
            return grad_norm

        state = [self.container.state, self.optimizer.state]
        if self.master is not None:
            state.append(self.master.state)
        return mx.compile(apply, inputs=state, outputs=state) if self.compile_step else apply

    def _accumulate(self, shards: list[dict[str, mx.array]]) -> tuple[dict, dict[str, mx.array]]:
        """Gradients and statistics summed over ``shards`` (maxima for ``MAX_STATS``)."""
        grads, stats = None, {}
        # Shards come back in order as they finish; each one's stats are token sums over the minibatch's
        # normalisers, so shards add up as whole micro-batches would. Evaluating the running sum frees each shard's
        # gradients (a whole model's with full fine-tuning).
        for mb_stats, mb_grads in self.pool.imap(self.grad_step, shards):
            if self.master is not None:  # bf16 gradients would round as they add up
                mb_grads = to_float32(mb_grads)
            grads = mb_grads if grads is None else tree_map(mx.add, grads, mb_grads)
            for k, v in mb_stats.items():
                stats[k] = (
                    v if k not in stats else (mx.maximum(stats[k], v) if k in MAX_STATS else stats[k] + v)
                )
            mx.eval(grads, stats)
        return grads, stats

    def step(self, arrays: dict[str, np.ndarray], indices: np.ndarray, version: int) -> dict[str, mx.array]:
        """One optimizer step on the minibatch ``indices`` of ``arrays`` (of the update to policy ``version``)."""
        # The minibatch's normalisers, over every rank: each micro-batch of each rank divides by them, so their
        # token sums add up to exactly the loss of one learner on the union (whatever the lengths per rank).
        local = np.array([arrays["units"][indices].sum(), arrays["mask"][indices].sum()], np.float64)
        global_counts = sum_over_ranks(local, self.group)
        if global_counts[0] <= 0:  # every sequence masked out (all truncated, say): no gradient, no Adam step
            return {"update/skipped_empty": mx.array(1.0)}
        normaliser, num_tokens = (mx.array(max(v, 1.0), dtype=mx.float32) for v in global_counts)
        step_arrays = {k: v for k, v in arrays.items() if k != "units"}
        multiple = self.micro_batching.multiple
        shards = [
            {k: mx.array(v) for k, v in rows_cut_to_length(step_arrays, rows, multiple).items()}
            | {"normaliser": normaliser, "num_tokens": num_tokens}
            for rows in micro_batch_shards(self.micro_batching(arrays, indices), self.pool.size)
        ]
        grads, stats = self._accumulate(shards)
        if not self._finite_everywhere(grads, stats["loss/total"]):
            # A NaN/Inf loss or gradient (bad data that slipped through, an overflow) would poison every weight
            # and every later batch: skip this step, keep the weights and Adam's state, count it.
            logger.error("skipped an optimizer step: non-finite loss or gradients (update %d)", version)
            return stats | {"grad/norm": mx.array(float("nan")), "update/skipped_nonfinite": mx.array(1.0)}
        stats["grad/norm"] = self._apply(grads)
        stats["update/skipped_nonfinite"] = mx.array(0.0)
        # Micro-batches are evaluated: this is the exchange + Adam.
        with collective("the gradient all-reduce"):
            mx.eval(self.container.parameters(), self.optimizer.state, stats)
        return stats

    def _finite_everywhere(self, grads: dict, loss: mx.array) -> bool:
        """Whether the loss and every gradient are finite on every rank (one decision for all of them)."""
        squares = sum(mx.sum(mx.square(g.astype(mx.float32))) for _, g in tree_flatten(grads))
        local_bad = 0.0 if bool(mx.isfinite(squares + loss).item()) else 1.0
        return float(sum_over_ranks(np.array([local_bad]), self.group)[0]) == 0.0

    def run_epochs(
        self, arrays: dict[str, np.ndarray], cfg: PPOUpdateConfig, rng: np.random.Generator, version: int
    ) -> dict[str, float]:
        """``cfg.update_epochs`` passes of minibatch steps in ``rng``'s order; returns their averaged statistics
        (every rank's tokens), stopping early once ``policy/approx_kl`` passes ``cfg.target_kl`` (> 0)."""
        size = len(arrays["tokens"])
        per_minibatch = size // cfg.num_minibatches
        history: list[dict[str, float]] = []
        for _ in range(cfg.update_epochs):
            order = rng.permutation(size)
            for start in range(0, size, per_minibatch):
                stats = self.step(arrays, order[start : start + per_minibatch], version)
                history.append(sum_stats_over_ranks(stats, self.group, MAX_STATS, local=GLOBAL_STATS))
                # Global token sums: every rank takes the same early-stop decision.
                if cfg.target_kl > 0 and history[-1].get("policy/approx_kl", 0.0) > cfg.target_kl:
                    return average_steps(history, early_stop=True)
        return average_steps(history, early_stop=False)


def average_steps(history: list[dict[str, float]], early_stop: bool) -> dict[str, float]:
    """Mean over the minibatch steps (maxima: their maximum; a skipped step's NaN norm left out)."""
    out = {}
    for k in dict.fromkeys(k for h in history for k in h):
        values = [h[k] for h in history if k in h]
        pick = np.max if k in MAX_STATS else np.nanmean if k == "grad/norm" else np.mean
        with np.errstate(all="ignore"), warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # nanmean of only NaNs: NaN, said once here
            out[k] = float(pick(values))
    out["update/minibatch_steps"] = float(len(history))
    out["update/early_stop"] = float(early_stop)
    return out
