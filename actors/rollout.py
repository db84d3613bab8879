"""One rollout: this actor's next prompts -> sampled completions -> scores -> an ``ExperienceBatch``.

Prompts come in a deterministic, sharded order and every sequence has its own seed, so the same run, actor and
batch always sample the same way. The reference pass (``ppo.reference_on = "actors"``) runs here too.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import mlx.nn as nn
import numpy as np

from actors.builtin_tasks import Task
from actors.reference import reference_logprobs
from actors.rewards import encode_prompts, load_reward
from actors.sampler import Completion, SamplingParams, generate_completions
from common import protocol
from common.config import Config
from common.protocol import ExperienceBatch

logger = logging.getLogger(__name__)


def sequence_seed(run_seed: int, actor_id: int, batch_id: int, index: int) -> int:
    """The seed of one sequence: the same run, actor, batch and position always sample the same way."""
    return int(np.random.SeedSequence([run_seed, actor_id, batch_id, index]).generate_state(1)[0])


def is_stale(batch_version: int, current_version: int, max_policy_lag: int) -> bool:
    """Whether the learner would drop a batch sampled with ``batch_version`` as too old once at
    ``current_version`` (``ppo.max_policy_lag``)."""
    return current_version - batch_version > max_policy_lag


class PromptShard:
    """This actor's encoded prompts in a deterministic, sharded order: actor ``i`` of ``n`` takes every n-th
    prompt of a seeded shuffle (all of them when there are fewer prompts than actors)."""

    def __init__(self, ids: list[list[int]], texts: list[str], actor_id: int, num_actors: int, seed: int):
        self.ids, self.texts = ids, texts
        order = np.random.default_rng(seed).permutation(len(ids))
        self.order = order[actor_id::num_actors] if len(ids) >= num_actors else order
        self.cursor = 0  # prompts of this shard taken so far

    def next_indices(self, count: int) -> list[int]:
        out = [int(self.order[(self.cursor + i) % len(self.order)]) for i in range(count)]
        self.cursor += count
        return out


@dataclass
class RolloutStats:
    """What this actor did and waited for (its heartbeat carries ``as_dict``)."""

    generated_tokens: int = 0
    generate_s: float = 0.0
    reference_s: float = 0.0
    wait_weights_s: float = 0.0
    wait_grant_s: float = 0.0
    blocked_send_s: float = 0.0
    batches_sent: int = 0
    stale_dropped: int = 0
    started: float = field(default_factory=time.perf_counter)

    def as_dict(self) -> dict[str, float]:
        return {
            "gen_tokens_per_s": self.generated_tokens / max(self.generate_s, 1e-9),
            "wait_weights_s": self.wait_weights_s,
            "wait_grant_s": self.wait_grant_s,
            "reference_s": self.reference_s,
            "blocked_send_s": self.blocked_send_s,
            "batches_sent": float(self.batches_sent),
            "stale_dropped": float(self.stale_dropped),
        }


class Rollout:
    """Generates and scores this actor's batches, numbered from 0 (or from where a resumed learner says)."""

    def __init__(
        self,
        cfg: Config,
        actor_id: int,
        num_actors: int,
        model: nn.Module,
        tokenizer,
        task: Task,
        stats: RolloutStats,
    ):
        self.cfg, self.actor_id, self.model, self.tokenizer, self.stats = (
            cfg,
            actor_id,
            model,
            tokenizer,
            stats,
        )
        # resolve_task's batch scorer; a Task built by hand scores with its per-sample reward.
        self.scorer = task.scorer or load_reward("", task, cfg.run.reward_timeout_s)
        self.params = SamplingParams.from_config(cfg.sampling)
        self.stop_ids = set(tokenizer.eos_token_ids)
        ids, texts = encode_prompts(tokenizer, task.prompts, cfg.sampling.max_prompt_tokens)
        self.shard = PromptShard(ids, texts, actor_id, num_actors, cfg.run.seed)
        self.prompts_per_batch = cfg.sampling.batch_size // cfg.ppo.group_size  # distinct prompts
        self.batch_id = 0

    def resume_at(self, batch_id: int) -> None:
        """Continue with batch ``batch_id`` and its prompts (a learner resumed from a checkpoint)."""
        self.batch_id, self.shard.cursor = batch_id, batch_id * self.prompts_per_batch
        logger.info("continuing at batch %d (prompt %d of this shard)", batch_id, self.shard.cursor)

    def run(self, policy_version: int, token: str, on_step: Callable[[], None]) -> ExperienceBatch:
        """The next batch, sampled with the weights of ``policy_version``; ``on_step`` runs at every decoding
        step (heartbeats keep flowing during a long generation)."""
        group = self.cfg.ppo.group_size
        indices = [i for i in self.shard.next_indices(self.prompts_per_batch) for _ in range(group)]
        completions = self._generate([self.shard.ids[i] for i in indices], on_step)
        texts = [
            self.tokenizer.decode([t for t in c.response_ids if t not in self.stop_ids]) for c in completions
        ]
        scores = self.scorer([self.shard.texts[i] for i in indices], texts)  # NaN where the reward failed
        sequences = [
            protocol.Sequence_(len(c.prompt_ids), len(c.response_ids), score, c.finish_reason, i)
            for i, c, score in zip(indices, completions, scores, strict=True)
        ]
        batch = ExperienceBatch(
            self.actor_id,
            self.batch_id,
            policy_version,
            tuple(sequences),
            np.concatenate([np.asarray(c.prompt_ids + c.response_ids, np.int32) for c in completions]),
            np.concatenate([c.logprobs for c in completions]).astype(np.float32),
            self._reference(completions),
            gen_tokens_per_s=self.stats.as_dict()["gen_tokens_per_s"],
            token=token,
        )
        self.batch_id += 1
        return batch

    def _generate(self, prompts: list[list[int]], on_step: Callable[[], None]) -> list[Completion]:
        seeds = [
            sequence_seed(self.cfg.run.seed, self.actor_id, self.batch_id, k) for k in range(len(prompts))
        ]
        start = time.perf_counter()
        completions = generate_completions(
            self.model,
            prompts,
            self.params,
            self.stop_ids,
            seeds,
            on_step=on_step,
            max_rows=self.cfg.sampling.max_rows,
        )
        self.stats.generate_s += time.perf_counter() - start
        self.stats.generated_tokens += sum(len(c.response_ids) for c in completions)
        return completions

    def _reference(self, completions: Sequence[Completion]) -> np.ndarray | None:
        """Reference log-probs of every response token, when this actor computes them (``ppo.reference_on``)."""
        if self.cfg.ppo.reference_on != "actors":
            return None
        start = time.perf_counter()
        ref = reference_logprobs(
            self.model,
            [c.prompt_ids for c in completions],
            [c.response_ids for c in completions],
            self.params.temperature,
        )
        self.stats.reference_s += time.perf_counter() - start
        return np.concatenate(ref).astype(np.float32)
