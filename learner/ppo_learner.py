"""``PPOLearner``: the learner's state (model container, optimizer, KL controller, policy version) and the update.

An update, in the order of the papers: (1) pad the batch (``Experience.padded``) and recompute proximal log-probs,
old values and (when actors did not send them) reference log-probs with the current weights
(``learner/recompute.py``); (2) per-token KL, shaped scores, GAE or group advantages (``learner/advantages.py``);
(3) ``update_epochs`` x minibatches of the clipped losses (``learner/loss.py``), each one Adam step
(``learner/update.py``). This class only sequences them. Tests drive it directly in one process; the learner
process wraps it with sockets.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from typing import Any

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten

from common.config import PPOUpdateConfig
from learner import advantages as adv
from learner.aggregation import loss_weights
from learner.distributed import sum_over_ranks
from learner.experience import Experience
from learner.kl_control import make_kl_controller
from learner.loss import LossSettings, explained_variance
from learner.micro_batches import MicroBatching, token_budget
from learner.models import PolicyAndValue, share_weights_clone
from learner.optimizer import MasterWeights, make_adam, schedule_of
from learner.recompute import Recompute, proximal_from_step
from learner.shards import ShardPool, auto_threads
from learner.update import MinibatchUpdate
from learner.update_report import batch_stats


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
        """``group``: the mlx.distributed group of learner ranks, or None; ``total_updates`` (run.max_updates):
        the learning-rate schedule's horizon; ``max_new_tokens`` (sampling.max_new_tokens): the response budget
        of Dr. GRPO's normaliser and the overlong penalty; ``proximal_in_step``: see ``proximal_from_step``."""
        self.container, self.cfg, self.group, self.seed = container, cfg, group, seed
        self.max_new_tokens, self.pad_multiple, self.policy_version = max_new_tokens, pad_multiple, 0
        self.kl_controller = make_kl_controller(cfg.kl_coef, cfg.kl_target or None, cfg.kl_horizon)
        optimizer = make_adam(schedule_of(cfg, total_updates))
        # bf16/fp16 trainable weights (full fine-tuning on a GPU): Adam steps float32 master copies.
        master = MasterWeights(container) if MasterWeights.needed(container) else None
        optimizer.init(master.state["weights"] if master else container.trainable_parameters())
        # An update can outlast the actors' patience (minutes on a CPU, kernel compilation on a GPU): the service
        # heartbeats from a thread while an update runs (the service sets while_busy).
        self.while_busy: Callable[[], contextlib.AbstractContextManager[None]] = contextlib.nullcontext
        self.proximal_in_step = proximal_from_step(cfg, proximal_in_step)
        # The shards of each micro-batch run on this many threads at once (CPU: MLX's elementwise ops are
        # single-threaded per stream, learner/shards.py); one thread runs everything in the caller.
        pool = ShardPool(container, auto_threads(cfg.compute_threads))
        # Full fine-tuning has no adapters to switch off: keep the initial weights (shared, not copied) as reference.
        reference = share_weights_clone(container.policy) if cfg.full_finetune else None
        self.micro_batching = MicroBatching(
            cfg.micro_batch_size, token_budget(cfg.micro_batch_tokens, container.policy), pad_multiple
        )
        # The no-grad passes are compiled with LoRA; with full fine-tuning the compiled pass made later evals fail
        # ("array without a primitive") in the in-process runtime tests, cause not yet found: left eager there.
        self.recompute = Recompute(
            pool,
            temperature,
            self.micro_batching,
            reference,
            cfg.vocab_chunk,
            compile_step and reference is None,
        )
        settings = LossSettings.from_config(cfg, temperature, self.proximal_in_step)
        self.minibatches = MinibatchUpdate(
            container, optimizer, master, settings, pool, cfg, self.micro_batching, group, compile_step
        )

    @property
    def optimizer(self):
        return self.minibatches.optimizer

    @property
    def master(self) -> MasterWeights | None:
        return self.minibatches.master

    @property
    def pool(self) -> ShardPool:
        return self.recompute.pool

    @property
    def needs_reference(self) -> bool:
        """Whether anything uses reference log-probs (the peers skip the reference pass at beta 0 too)."""
        return self.cfg.kl_coef > 0 or self.cfg.kl_loss_coef > 0 or self.cfg.kl_target > 0

    def _sum_over_ranks(self, values: np.ndarray) -> np.ndarray:
        return sum_over_ranks(values, self.group)

    def _recomputed(self, arrays: dict[str, np.ndarray], need_ref: bool) -> dict[str, np.ndarray]:
        """The no-grad pass's arrays; with ``proximal_in_step`` only the reference (the step has the rest)."""
        if not self.proximal_in_step:
            return self.recompute.run(arrays, ("policy", "ref") if need_ref else ("policy",))
        recomputed = self.recompute.run(arrays, ("ref",)) if need_ref else {}
        recomputed["proximal"] = arrays["behaviour"]  # placeholder: the step uses its own forward
        return recomputed

    def prepare(self, exp: Experience) -> tuple[dict[str, np.ndarray], dict[str, float]]:
        """Pad and compute everything the epochs need; returns the arrays and their statistics."""
        arrays = exp.padded(self.pad_multiple)
        sent_ref = arrays.pop("ref", None)  # the actors' reference log-probs
        model_tokens = arrays.pop("model_tokens", None)  # multi-turn: environment tokens are context only
        token_rewards = arrays.pop("token_rewards", None)  # per-turn rewards, on model tokens
        recomputed = self._recomputed(arrays, need_ref=sent_ref is None and self.needs_reference)
        proximal, values = recomputed["proximal"], recomputed.get("values")
        # The model's tokens: what KL, rewards, advantages, returns and statistics are over (not the environment's).
        mask = arrays["mask"] if model_tokens is None else arrays["mask"] * model_tokens
        ref = recomputed.get("ref") if sent_ref is None else sent_ref  # None when nothing needs it
        scores = adv.shaped_scores(self.cfg, exp.scores, mask.sum(axis=1), self.max_new_tokens)
        k1 = adv.reward_kl(proximal, ref, mask)
        advantages, returns = adv.training_signal(
            self.cfg, scores, k1, mask, values, self.kl_controller.value, self._sum_over_ranks, token_rewards
        )
        stats, global_size = batch_stats(
            exp,
            mask,
            arrays["behaviour"],
            recomputed,
            ref,
            scores,
            self._sum_over_ranks,
            not self.proximal_in_step,
        )
        stats["kl/coef"] = self.kl_controller.value
        loss_mask = adv.loss_mask(mask, exp.truncated, self.cfg.truncated)
        weights, units = loss_weights(loss_mask, self.cfg.loss_aggregation, self.max_new_tokens)
        arrays.update(mask=loss_mask, weights=weights, units=units, proximal=proximal, advantages=advantages)
        if values is not None:
            arrays.update(old_values=values, returns=returns)
        if self.cfg.kl_loss_coef > 0:
            arrays["ref"] = ref.astype(np.float32)
        if ref is not None:  # the controller sees the whole batch, as one learner on the union would
            self.kl_controller.update(stats["kl/ref_mean"], global_size)
        return arrays, stats

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

    def _reseed(self) -> np.random.Generator:
        """Minibatch order and any dropout depend on (seed, policy version) alone: a run resumed from a
        checkpoint draws what the uninterrupted run drew, with no RNG state to save."""
        seeds = np.random.SeedSequence([self.seed, self.policy_version])
        mx.random.seed(int(seeds.generate_state(1)[0]))
        return np.random.default_rng(seeds)

    def update(self, exp: Experience) -> dict[str, Any]:
        """One full PPO update on ``exp``; bumps ``policy_version`` and returns the metrics."""
        start = time.perf_counter()
        mx.reset_peak_memory()
        rng = self._reseed()
        with self.while_busy():
            arrays, stats = self.prepare(exp)
            stats.update(self.minibatches.run_epochs(arrays, self.cfg, rng, self.policy_version + 1))
        if self.container.has_value:
            values, returns, mask = (mx.array(arrays[k]) for k in ("old_values", "returns", "mask"))
            stats["value/explained_var"] = explained_variance(values, returns, mask).item()
        self.policy_version += 1
        elapsed = time.perf_counter() - start
        stats.update(
            {
                "policy_version": self.policy_version,
                "perf/update_s": elapsed,
                "perf/train_tokens_per_s": int(exp.tokens.lengths.sum()) * self.cfg.update_epochs / elapsed,
                "memory/peak_gb": mx.get_peak_memory() / 1e9,
            }
        )
        return stats
