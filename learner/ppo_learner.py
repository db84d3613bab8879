"""``PPOLearner``: the learner's state (model container, optimizer, KL controller, policy version) and the update.

The math lives in ``learner/advantages.py`` and ``learner/ppo.py``; this class only sequences it. Tests drive it
directly in one process; the learner process wraps it with sockets.
"""

from __future__ import annotations

import logging
import time
import warnings
from collections.abc import Callable
from functools import partial
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten, tree_map, tree_unflatten

from common.config import PPOUpdateConfig
from common.logprobs import gather_token_logprobs, sampling_logprobs
from common.lora import adapters_disabled
from learner import advantages as adv
from learner.aggregation import default_overlong_buffer, loss_weights, overlong_penalty
from learner.distributed import collective, sum_gradients, sum_over_ranks, sum_stats_over_ranks
from learner.kl_control import make_kl_controller
from learner.kl_estimators import kl_estimate
from learner.loss import Clip, LossSettings, explained_variance, ppo_objective, token_entropy
from learner.models import PolicyAndValue, share_weights_clone
from learner.optimizer import MasterWeights, make_adam, schedule_of, to_float32
from learner.shards import ShardPool, Worker, auto_threads, split_rows
from learner.update import (
    Experience,
    TrainBatch,
    collate,
    pad_per_token,
    policy_logprobs,
)

logger = logging.getLogger(__name__)

_MAX_STATS = ("is/weight_max",)
_GLOBAL_STATS = ("grad/norm", "update/skipped_nonfinite", "update/skipped_empty")  # the same on every rank


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
        total_updates: int = 1,
        max_new_tokens: int = 64,
    ):
        """``total_updates`` (run.max_updates) is the learning-rate schedule's horizon; ``max_new_tokens``
        (sampling.max_new_tokens) the response budget of Dr. GRPO's normaliser and the overlong penalty."""
        self.container = container
        self.cfg = cfg
        self.temperature = temperature
        self.max_new_tokens = max_new_tokens
        self.policy_version = 0
        self.pad_multiple = pad_multiple
        self.group = group  # mlx.distributed group of learner ranks, or None
        self.kl_controller = make_kl_controller(cfg.kl_coef, cfg.kl_target or None, cfg.kl_horizon)
        self.optimizer = make_adam(schedule_of(cfg, total_updates))
        # bf16/fp16 trainable weights (full fine-tuning on a GPU): Adam steps float32 master copies.
        self.master = MasterWeights(container) if MasterWeights.needed(container) else None
        self.optimizer.init(self.master.state["weights"] if self.master else container.trainable_parameters())
        # Full fine-tuning has no adapters to switch off: keep the initial weights (shared, not copied) as reference.
        self.reference = share_weights_clone(container.policy) if cfg.full_finetune else None
        self.seed = seed
        self.rng = np.random.default_rng()  # reseeded from (seed, policy version) at every update
        # Called after every shard of a micro-batch: an update can outlast the actors' patience (minutes on a CPU), and
        # the service heartbeats from here so that they do not take a busy learner for a gone one.
        self.on_progress: Callable[[], None] = lambda: None
        # One gradient step per update, no critic (whose old values GAE needs first) and no KL in the reward (its
        # k1 needs the proximal log-probs before the step): the step's own forward is the proximal policy, and
        # the no-grad pass over the policy is skipped (as verl does on-policy).
        single_step = (
            cfg.update_epochs == 1 and cfg.num_minibatches == 1 and cfg.is_critic_free and cfg.kl_coef == 0
        )
        if proximal_in_step and not single_step:
            raise ValueError(
                "proximal_in_step needs a critic-free update of one epoch and one minibatch, and kl_coef = 0"
            )
        self.proximal_in_step = single_step if proximal_in_step is None else proximal_in_step
        # The shards of each micro-batch run on this many threads at once (CPU: MLX's elementwise ops are
        # single-threaded per stream, learner/shards.py); one thread runs everything in the caller.
        self.pool = ShardPool(container, auto_threads(cfg.compute_threads))
        self.compile_step = compile_step
        self.weights = LossSettings(
            temperature,
            Clip(cfg.clip_low or cfg.clip_coef, cfg.clip_high or cfg.clip_coef, cfg.dual_clip),
            cfg.value_clip,
            cfg.vf_coef,
            cfg.ent_coef,
            cfg.is_cap,
            cfg.kl_loss_coef,
            self.proximal_in_step,
            cfg.kl_loss_estimator,
            cfg.policy_ratio,
            cfg.is_correction,
            cfg.is_low,
            cfg.is_high,
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
            # Every rank's loss is its token sum over the whole minibatch's normaliser: the ranks' gradients add up.
            grads = sum_gradients(grads, self.group)
            grad_norm = mx.array(0.0)
            if self.cfg.max_grad_norm > 0:
                grads, grad_norm = optim.clip_grad_norm(grads, self.cfg.max_grad_norm)
            if self.master is None:
                self.optimizer.update(self.container, grads)
            else:
                self.master.apply(self.optimizer, self.container, grads)
            return grad_norm

        state = [self.container.state, self.optimizer.state]
        if self.master is not None:
            state.append(self.master.state)
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

    def _sum_over_ranks(self, values: np.ndarray) -> np.ndarray:
        return sum_over_ranks(values, self.group)

    def _shaped_scores(self, exp: Experience, lengths: np.ndarray) -> np.ndarray:
        """The scores the advantages see: the reward's, plus DAPO's overlong penalty when configured."""
        scores = np.asarray(exp.scores, np.float64)
        if self.cfg.truncated == "overlong_penalty":
            buffer = self.cfg.overlong_buffer or default_overlong_buffer(self.max_new_tokens)
            scores = scores + overlong_penalty(
                lengths, self.max_new_tokens, buffer, self.cfg.overlong_penalty
            )
        return scores

    def _loss_mask(self, exp: Experience, mask: np.ndarray) -> np.ndarray:
        """The tokens the loss sees: with ``truncated = "mask"`` cut-off responses are left out (they still
        counted in their group's baseline)."""
        if self.cfg.truncated != "mask" or exp.truncated is None:
            return mask
        return mask * (~np.asarray(exp.truncated, bool))[:, None].astype(np.float32)

    def prepare(self, exp: Experience) -> tuple[dict[str, np.ndarray], dict[str, float]]:
        """Collate and compute everything the epochs need; returns the arrays and their statistics."""
        batch = collate(exp, self.pad_multiple)
        need_ref = exp.ref_logprobs is None and self.needs_reference
        if self.proximal_in_step:
            recomputed = self._reference_pass(batch, self.cfg.micro_batch_size) if need_ref else {}
            recomputed["proximal"] = batch.behaviour  # placeholder: the step uses its own forward
        else:
            recomputed = self._forward_no_grad(batch, self.cfg.micro_batch_size, need_ref)
        proximal, values, mask = recomputed["proximal"], recomputed.get("values"), batch.mask
        ref = recomputed.get("ref")  # None when nothing needs it (every KL term off)
        if exp.ref_logprobs is not None:
            ref = pad_per_token(exp.ref_logprobs, mask.shape[1])
        k1 = np.zeros_like(mask) if ref is None else kl_estimate(proximal, ref, "k1") * mask
        scores = self._shaped_scores(exp, mask.sum(axis=1))
        advantages, returns = adv.training_signal(
            self.cfg, scores, k1, mask, values, self.kl_controller.value, self._sum_over_ranks
        )
        loss_mask = self._loss_mask(exp, mask)
        weights, units = loss_weights(loss_mask, self.cfg.loss_aggregation, self.max_new_tokens)
        arrays = {
            "tokens": batch.tokens,
            "positions": batch.positions,
            "response": batch.response,
            "mask": loss_mask,
            "weights": weights,
            "units": units,
            "behaviour": batch.behaviour,
            "proximal": proximal,
            "advantages": advantages,
        }
        if values is not None:
            arrays.update(old_values=values, returns=returns)
        if self.cfg.kl_loss_coef > 0:
            arrays["ref"] = ref.astype(np.float32)
        stats = self._batch_stats(exp, batch, recomputed, ref, scores)
        global_size = int(stats.pop("_global_size"))  # every rank's sequences
        if ref is not None:  # the controller sees the whole batch, as one learner on the union would
            self.kl_controller.update(stats["kl/ref_mean"], global_size)
        return arrays, stats

    @property
    def needs_reference(self) -> bool:
        """Whether anything uses reference log-probs (the peers skip the reference pass at beta 0 too)."""
        return self.cfg.kl_coef > 0 or self.cfg.kl_loss_coef > 0 or self.cfg.kl_target > 0

    def _batch_stats(
        self, exp: Experience, batch: TrainBatch, recomputed: dict, ref: np.ndarray | None, scores: np.ndarray
    ) -> dict[str, float]:
        """Statistics of the whole batch (every rank's): KL to the reference (k3, per sequence; when a reference
        was computed), scores, lengths, truncation, and the mismatch / entropy of the no-grad pass."""
        mask, proximal = batch.mask, recomputed["proximal"]
        k3_sum = 0.0 if ref is None else (kl_estimate(proximal, ref, "k3") * mask).sum()
        truncated = 0.0 if exp.truncated is None else float(np.sum(exp.truncated))
        sums = [k3_sum, np.sum(exp.scores), np.sum(np.square(exp.scores)), mask.sum(), truncated, batch.size]
        if not self.proximal_in_step:  # otherwise the step reports these from its forward
            mismatch = kl_estimate(batch.behaviour, proximal, "k3") * mask
            sums += [mismatch.sum(), (recomputed["entropy"] * mask).sum()]
        sums = self._sum_over_ranks(np.array(sums, np.float64))
        size, tokens = max(sums[5], 1.0), max(sums[3], 1.0)
        stats = {
            "kl/coef": self.kl_controller.value,
            "rollout/score_mean": float(sums[1] / size),
            "rollout/score_std": float(np.sqrt(max(sums[2] / size - (sums[1] / size) ** 2, 0.0))),
            "rollout/response_len_mean": float(sums[3] / size),
            "rollout/truncated_frac": float(sums[4] / size),
            "rollout/shaped_score_mean": float(self._sum_over_ranks(np.array([scores.sum()]))[0] / size),
        }
        stats["_global_size"] = float(sums[5])
        if ref is not None:
            stats["kl/ref_mean"] = float(sums[0] / size)
        if not self.proximal_in_step:
            stats["mismatch/behaviour_proximal_kl"] = float(sums[6] / tokens)
            stats["policy/entropy"] = float(sums[7] / tokens)
        return stats

    # -- step 3: epochs x minibatches x micro-batches ------------------------------------------------------

    def _minibatch_step(self, arrays: dict[str, np.ndarray], indices: np.ndarray) -> dict[str, mx.array]:
        # The minibatch's normalisers, over every rank: each micro-batch of each rank divides by them, so their
        # token sums add up to exactly the loss of one learner on the union (whatever the lengths per rank).
        local = np.array([arrays["units"][indices].sum(), arrays["mask"][indices].sum()], np.float64)
        global_counts = self._sum_over_ranks(local)
        if global_counts[0] <= 0:  # every sequence masked out (all truncated, say): no gradient, no Adam step
            return {"update/skipped_empty": mx.array(1.0)}
        normaliser, num_tokens = (mx.array(max(v, 1.0), dtype=mx.float32) for v in global_counts)
        grads, stats = None, {}
        step_keys = [k for k in arrays if k != "units"]
        shards = [
            {k: mx.array(arrays[k][rows]) for k in step_keys}
            | {"normaliser": normaliser, "num_tokens": num_tokens}
            for rows in self._shards(indices, self.cfg.micro_batch_size)
        ]
        # Shards come back in order as they finish; each one's stats are token sums over the minibatch's
        # normalisers, so shards add up as whole micro-batches would. Evaluating the running sum frees each shard's
        # gradients (a whole model's with full fine-tuning).
        for mb_stats, mb_grads in self.pool.imap(self._grad_step, shards, self.on_progress):
            if self.master is not None:  # bf16 gradients would round as they add up
                mb_grads = to_float32(mb_grads)
            grads = mb_grads if grads is None else tree_map(mx.add, grads, mb_grads)
            for k, v in mb_stats.items():
                stats[k] = (
                    v if k not in stats else (mx.maximum(stats[k], v) if k in _MAX_STATS else stats[k] + v)
                )
            mx.eval(grads, stats)
        if not self._finite_everywhere(grads, stats["loss/total"]):
            # A NaN/Inf loss or gradient (bad data that slipped through, an overflow) would poison every weight
            # and every later batch: skip this step, keep the weights and Adam's state, count it.
            logger.error(
                "skipped an optimizer step: non-finite loss or gradients (update %d)", self.policy_version + 1
            )
            return stats | {"grad/norm": mx.array(float("nan")), "update/skipped_nonfinite": mx.array(1.0)}
        stats["grad/norm"] = self._apply_fn(grads)
        stats["update/skipped_nonfinite"] = mx.array(0.0)
        # Micro-batches are evaluated: this is the exchange + Adam.
        with collective("the gradient all-reduce"):
            mx.eval(self.container.parameters(), self.optimizer.state, stats)
        return stats

    def _finite_everywhere(self, grads: dict, loss: mx.array) -> bool:
        """Whether the loss and every gradient are finite on every rank (one decision for all of them)."""
        squares = sum(mx.sum(mx.square(g.astype(mx.float32))) for _, g in tree_flatten(grads))
        local_bad = 0.0 if bool(mx.isfinite(squares + loss).item()) else 1.0
        return float(self._sum_over_ranks(np.array([local_bad]))[0]) == 0.0

    def optimize(self, arrays: dict[str, np.ndarray]) -> dict[str, float]:
        """Run the epochs; returns stats averaged over the minibatch steps taken (every rank's tokens)."""
        size = len(arrays["tokens"])
        per_minibatch = size // self.cfg.num_minibatches
        history: list[dict[str, float]] = []
        for _ in range(self.cfg.update_epochs):
            order = self.rng.permutation(size)
            for start in range(0, size, per_minibatch):
                stats = self._minibatch_step(arrays, order[start : start + per_minibatch])
                history.append(sum_stats_over_ranks(stats, self.group, _MAX_STATS, local=_GLOBAL_STATS))
                # Global token sums: every rank takes the same early-stop decision.
                if self.cfg.target_kl > 0 and history[-1].get("policy/approx_kl", 0.0) > self.cfg.target_kl:
                    return self._average(history, early_stop=True)
        return self._average(history, early_stop=False)

    @staticmethod
    def _average(history: list[dict[str, float]], early_stop: bool) -> dict[str, float]:
        """Mean over the minibatch steps (maxima: their maximum; a skipped step's NaN norm left out)."""
        out = {}
        for k in dict.fromkeys(k for h in history for k in h):
            values = [h[k] for h in history if k in h]
            pick = np.max if k in _MAX_STATS else np.nanmean if k == "grad/norm" else np.mean
            with np.errstate(all="ignore"), warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)  # nanmean of only NaNs: NaN, said once here
                out[k] = float(pick(values))
        out["update/minibatch_steps"] = float(len(history))
        out["update/early_stop"] = float(early_stop)
        return out

    def trainable_weights(self) -> dict[str, mx.array]:
        """Name -> array of what the optimizer trains (the float32 master copies when there are some)."""
        tree = self.master.state["weights"] if self.master else self.container.trainable_parameters()
        return dict(tree_flatten(tree))

    def load_trainable_weights(self, weights: dict[str, mx.array]) -> None:
        """Set what ``trainable_weights`` returns (and the model's casts of master weights)."""
        if self.master is None:
            self.container.load_weights(list(weights.items()), strict=False)
        else:
            self.master.load(self.container, tree_unflatten(list(weights.items())))

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
