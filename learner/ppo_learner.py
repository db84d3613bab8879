"""``PPOLearner``: the learner's state (model container, optimizer, KL controller, policy version) and the update.

The math lives in ``learner/advantages.py`` and ``learner/ppo.py``; this class only sequences it. Tests drive it
directly in one process; the learner process wraps it with sockets.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from functools import partial
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_map

from common.config import PPOUpdateConfig
from common.logprobs import gather_token_logprobs, sampling_logprobs
from common.lora import adapters_disabled
from learner import advantages as adv
from learner.distributed import average_gradients, collective, mean_over_ranks, sum_over_ranks
from learner.kl_control import make_kl_controller
from learner.models import PolicyAndValue, share_weights_clone
from learner.ppo import explained_variance, token_entropy
from learner.shards import ShardPool, Worker, auto_threads, split_rows
from learner.update import (
    Experience,
    LossWeights,
    TrainBatch,
    collate,
    pad_per_token,
    policy_logprobs,
    ppo_objective,
)

logger = logging.getLogger(__name__)

_MAX_STATS = ("is/weight_max",)


class PPOLearner:
    """Holds what persists across updates and runs one update per call to ``update``."""

    def __init__(
        self,
        container: PolicyAndValue,
        cfg: PPOUpdateConfig,
        temperature: float,
        compile_step: bool = True,
        pad_multiple: int = 32,
        group: Any | None = None,
        proximal_in_step: bool | None = None,
        seed: int = 0,
    ):
        self.container = container
        self.cfg = cfg
        self.temperature = temperature
        self.policy_version = 0
        self.pad_multiple = pad_multiple
        self.group = group  # mlx.distributed group of learner ranks, or None
        self.kl_controller = make_kl_controller(cfg.kl_coef, cfg.kl_target or None, cfg.kl_horizon)
        self.optimizer = optim.Adam(learning_rate=cfg.learning_rate)
        self.optimizer.init(container.trainable_parameters())
        # Full fine-tuning has no adapters to switch off: keep the initial weights (shared, not copied) as reference.
        self.reference = share_weights_clone(container.policy) if cfg.full_finetune else None
        self.seed = seed
        self.rng = np.random.default_rng()  # reseeded from (seed, policy version) at every update
        # Called after every shard of a micro-batch: an update can outlast the actors' patience (minutes on a CPU), and
        # the service heartbeats from here so that they do not take a busy learner for a gone one.
        self.on_progress: Callable[[], None] = lambda: None
        # One gradient step per update and no critic (whose old values GAE needs first): the step's own forward
        # is the proximal policy, and the no-grad pass over the policy is skipped (as verl does on-policy).
        single_step = cfg.update_epochs == 1 and cfg.num_minibatches == 1 and cfg.is_critic_free
        if proximal_in_step and not single_step:
            raise ValueError("proximal_in_step needs a critic-free update of one epoch and one minibatch")
        self.proximal_in_step = single_step if proximal_in_step is None else proximal_in_step
        # The shards of each micro-batch run on this many threads at once (CPU: MLX's elementwise ops are
        # single-threaded per stream, learner/shards.py); one thread runs everything in the caller.
        self.pool = ShardPool(container, auto_threads(cfg.compute_threads))
        self.compile_step = compile_step
        self.weights = LossWeights(
            temperature,
            cfg.clip_coef,
            cfg.value_clip,
            cfg.vf_coef,
            cfg.ent_coef,
            cfg.is_cap,
            cfg.kl_loss_coef,
            self.proximal_in_step,
        )
        self._apply_fn = self._make_apply_fn()

    def _make_grad_fn(self, module: nn.Module):
        loss_and_grad = nn.value_and_grad(module, partial(ppo_objective, w=self.weights))

        def grad_step(mb: dict[str, mx.array]):
            (_, stats), grads = loss_and_grad(module, mb)
            return stats, grads

        # value_and_grad writes the parameters back into the module, so they are outputs too (as in mlx-lm).
        state = [module.state, mx.random.state]
        return mx.compile(grad_step, inputs=state, outputs=state) if self.compile_step else grad_step

    def _grad_step(self, worker: Worker, mb: dict[str, mx.array]):
        """``(stats, grads)`` of one shard on ``worker``'s view of the model (its own compiled step)."""
        if "grad" not in worker.cache:
            worker.cache["grad"] = self._make_grad_fn(worker.module)
        return worker.cache["grad"](mb)

    def _make_apply_fn(self):
        def apply(grads):
            grads = average_gradients(grads, self.group)
            grad_norm = mx.array(0.0)
            if self.cfg.max_grad_norm > 0:
                grads, grad_norm = optim.clip_grad_norm(grads, self.cfg.max_grad_norm)
            self.optimizer.update(self.container, grads)
            return grad_norm

        state = [self.container.state, self.optimizer.state]
        return mx.compile(apply, inputs=state, outputs=state) if self.compile_step else apply

    # -- step 1: recompute with the current weights ---------------------------------------------------------

    def _forward_no_grad(self, batch: TrainBatch, micro: int, need_ref: bool) -> dict[str, np.ndarray]:
        """Proximal log-probs, entropy, old values and (``need_ref``) reference log-probs, each ``[B, T]``."""
        step = partial(self._no_grad_shard, batch=batch, parts=("policy", "ref") if need_ref else ("policy",))
        return self._map_micro_batches(step, batch.size, micro)

    def _reference_pass(self, batch: TrainBatch, micro: int) -> dict[str, np.ndarray]:
        """Reference log-probs alone, ``[B, T]`` (when the step itself provides the proximal ones)."""
        step = partial(self._no_grad_shard, batch=batch, parts=("ref",))
        return self._map_micro_batches(step, batch.size, micro)

    def _map_micro_batches(self, step, size: int, micro: int) -> dict[str, np.ndarray]:
        """Run ``step(worker, rows)`` over the batch, micro-batch by micro-batch, each split over the workers."""
        parts: dict[str, list[mx.array]] = {}
        for out in self.pool.map(step, self._shards(np.arange(size), micro), self.on_progress):
            for key, value in out.items():
                parts.setdefault(key, []).append(value)
        return {k: np.concatenate([np.array(x) for x in v]) for k, v in parts.items()}

    def _shards(self, rows: np.ndarray, micro: int) -> list[np.ndarray]:
        """Micro-batches of ``rows``, each split over the pool's workers, in order."""
        return [
            piece
            for start in range(0, len(rows), micro)
            for piece in split_rows(rows[start : start + micro], self.pool.size)
        ]

    def _no_grad_shard(
        self, worker: Worker, rows: np.ndarray, batch: TrainBatch, parts: tuple[str, ...]
    ) -> dict[str, mx.array]:
        """For ``rows`` of the batch: proximal log-probs, entropy and values ('policy'), reference log-probs
        ('ref': a whole extra trunk pass, skipped when the actors sent them), each ``[rows, T]``."""
        tokens, positions, response = (
            mx.array(a[rows]) for a in (batch.tokens, batch.positions, batch.response)
        )
        out = {}
        if "policy" in parts:
            logits, values = worker.module.response_outputs(tokens, positions)
            logprobs = sampling_logprobs(logits, self.temperature)
            out["proximal"] = gather_token_logprobs(logprobs, response)
            out["entropy"] = token_entropy(logprobs)
            if values is not None:
                out["values"] = values
        if "ref" in parts:
            out["ref"] = self._reference_logprobs(worker.module, tokens, positions, response)
        return out

    def _reference_logprobs(
        self, module: PolicyAndValue, tokens: mx.array, positions: mx.array, response: mx.array
    ) -> mx.array:
        if self.reference is not None:  # full fine-tuning: forward only, safe to share between threads
            return policy_logprobs(self.reference, tokens, positions, response, self.temperature)
        with adapters_disabled(module.policy):
            return policy_logprobs(module.policy, tokens, positions, response, self.temperature)

    # -- step 2: rewards and advantages ---------------------------------------------------------------------

    def _advantages(self, scores: np.ndarray, kl: np.ndarray, values: np.ndarray | None, mask: np.ndarray):
        kl_coef = self.kl_controller.value
        if self.cfg.is_critic_free:
            penalised = scores - kl_coef * (kl * mask).sum(axis=1)
            seq_adv = adv.group_advantages(penalised, self.cfg.group_size, self.cfg.algorithm)
            return adv.broadcast_to_tokens(seq_adv, mask), None
        rewards = adv.shape_rewards(scores, kl, mask, kl_coef)
        advantages, returns = adv.compute_gae(rewards, values, mask, self.cfg.gamma, self.cfg.lam)
        if self.cfg.whiten_advantages:  # over the whole batch of all ranks, as one learner would
            moments = sum_over_ranks(adv.masked_moments(advantages, mask), self.group)
            advantages = adv.whiten_with(advantages, mask, moments)
        return advantages, returns

    def prepare(self, exp: Experience) -> tuple[dict[str, np.ndarray], dict[str, float]]:
        """Collate and compute everything the epochs need; returns the arrays and their statistics."""
        batch = collate(exp, self.pad_multiple)
        need_ref = exp.ref_logprobs is None
        if self.proximal_in_step:
            recomputed = self._reference_pass(batch, self.cfg.micro_batch_size) if need_ref else {}
            recomputed["proximal"] = batch.behaviour  # placeholder: the step uses its own forward
        else:
            recomputed = self._forward_no_grad(batch, self.cfg.micro_batch_size, need_ref)
        proximal, values = recomputed["proximal"], recomputed.get("values")
        if exp.ref_logprobs is None:
            ref = recomputed["ref"]
        else:
            ref = pad_per_token(exp.ref_logprobs, batch.mask.shape[1])
        mask = batch.mask
        kl = adv.kl_estimate(proximal, ref, self.cfg.kl_estimator) * mask
        advantages, returns = self._advantages(np.asarray(exp.scores, np.float32), kl, values, mask)
        arrays = {
            "tokens": batch.tokens,
            "positions": batch.positions,
            "response": batch.response,
            "mask": mask,
            "behaviour": batch.behaviour,
            "proximal": proximal,
            "advantages": advantages,
        }
        if values is not None:
            arrays.update(old_values=values, returns=returns)
        if self.cfg.kl_loss_coef > 0:
            arrays["ref"] = ref.astype(np.float32)
        seq_kl = float((kl.sum(axis=1)).mean())
        stats = {
            "kl/ref_mean": seq_kl,
            "kl/coef": self.kl_controller.value,
            "rollout/score_mean": float(np.mean(exp.scores)),
            "rollout/score_std": float(np.std(exp.scores)),
            "rollout/response_len_mean": float(mask.sum(axis=1).mean()),
        }
        if not self.proximal_in_step:  # otherwise the step reports these from its forward
            mismatch = adv.kl_estimate(batch.behaviour, proximal, "k3") * mask
            stats["mismatch/behaviour_proximal_kl"] = adv.masked_mean(mismatch, mask)
            stats["policy/entropy"] = adv.masked_mean(recomputed["entropy"], mask)
        self.kl_controller.update(mean_over_ranks(seq_kl, self.group), batch.size)
        return arrays, stats

    # -- step 3: epochs x minibatches x micro-batches ------------------------------------------------------

    def _minibatch_step(self, arrays: dict[str, np.ndarray], indices: np.ndarray) -> dict[str, mx.array]:
        num_tokens = mx.array(arrays["mask"][indices].sum(), dtype=mx.float32)
        grads, stats = None, {}
        shards = [
            {k: mx.array(v[rows]) for k, v in arrays.items()} | {"num_tokens": num_tokens}
            for rows in self._shards(indices, self.cfg.micro_batch_size)
        ]
        # Shards come back in order as they finish; each one's stats are token sums over the minibatch's
        # num_tokens, so shards add up as whole micro-batches would. Evaluating the running sum frees each shard's
        # gradients (a whole model's with full fine-tuning).
        for mb_stats, mb_grads in self.pool.imap(self._grad_step, shards, self.on_progress):
            grads = mb_grads if grads is None else tree_map(mx.add, grads, mb_grads)
            for k, v in mb_stats.items():
                stats[k] = (
                    v if k not in stats else (mx.maximum(stats[k], v) if k in _MAX_STATS else stats[k] + v)
                )
            mx.eval(grads, stats)
        stats["grad/norm"] = self._apply_fn(grads)
        with collective(
            "the gradient all-reduce"
        ):  # micro-batches are evaluated: this is the exchange + Adam
            mx.eval(self.container.parameters(), self.optimizer.state, stats)
        return stats

    def optimize(self, arrays: dict[str, np.ndarray]) -> dict[str, float]:
        """Run the epochs; returns stats averaged over the minibatch steps taken."""
        size = len(arrays["tokens"])
        per_minibatch = size // self.cfg.num_minibatches
        history: list[dict[str, float]] = []
        for _ in range(self.cfg.update_epochs):
            order = self.rng.permutation(size)
            for start in range(0, size, per_minibatch):
                stats = self._minibatch_step(arrays, order[start : start + per_minibatch])
                history.append({k: float(v.item()) for k, v in stats.items()})
                approx_kl = mean_over_ranks(
                    history[-1]["policy/approx_kl"], self.group
                )  # same decision on every rank
                if self.cfg.target_kl > 0 and approx_kl > self.cfg.target_kl:
                    return self._average(history, early_stop=True)
        return self._average(history, early_stop=False)

    @staticmethod
    def _average(history: list[dict[str, float]], early_stop: bool) -> dict[str, float]:
        out = {k: float(np.mean([h[k] for h in history])) for k in history[0]}
        out["update/minibatch_steps"] = float(len(history))
        out["update/early_stop"] = float(early_stop)
        return out

    def _reseed(self) -> None:
        """Minibatch order and any dropout depend on (seed, policy version) alone: a run resumed from a
        checkpoint draws what the uninterrupted run drew, with no RNG state to save."""
        seeds = np.random.SeedSequence([self.seed, self.policy_version])
        self.rng = np.random.default_rng(seeds)
        mx.random.seed(int(seeds.generate_state(1)[0]))

    def update(self, exp: Experience) -> dict[str, Any]:
        """One full PPO update on ``exp``; bumps ``policy_version`` and returns the metrics."""
        start = time.perf_counter()
        mx.reset_peak_memory()
        self._reseed()
        arrays, stats = self.prepare(exp)
        stats.update(self.optimize(arrays))
        if self.container.has_value:
            values, returns, mask = (mx.array(arrays[k]) for k in ("old_values", "returns", "mask"))
            stats["value/explained_var"] = explained_variance(values, returns, mask).item()
        self.policy_version += 1
        elapsed = time.perf_counter() - start
        trained_tokens = sum(len(p) + len(r) for p, r in zip(exp.prompt_ids, exp.response_ids, strict=True))
        stats.update(
            {
                "policy_version": self.policy_version,
                "perf/update_s": elapsed,
                "perf/train_tokens_per_s": trained_tokens * self.cfg.update_epochs / elapsed,
                "memory/peak_gb": mx.get_peak_memory() / 1e9,
            }
        )
        return stats
