"""One rollout: this actor's next prompts -> sampled completions -> scores -> an ``ExperienceBatch``; with
``run.environment``, its next records -> multi-turn episodes (``actors/episode_rollout.py``) -> the same batch.

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
from actors.episode_rollout import (
    EpisodeCounts,
    EpisodeLimits,
    SequenceRow,
    episode_seed,
    play_episodes,
    row_token_rewards,
)
from actors.reference import reference_logprobs
from actors.rewards import encode_prompts, load_reward
from actors.sampler import Completion, SamplingParams, generate_completions
from common import protocol
from common.config import Config, max_response_tokens
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
    prompt of a seeded shuffle (all of them when there are fewer prompts than actors). ``ids`` is empty for an
    environment's records (its ``reset`` writes each prompt)."""

    def __init__(self, ids: list[list[int]], texts: list[str], actor_id: int, num_actors: int, seed: int):
        self.ids, self.texts = ids, texts
        order = np.random.default_rng(seed).permutation(len(texts))
        self.order = order[actor_id::num_actors] if len(texts) >= num_actors else order
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
    episodes: EpisodeCounts = field(default_factory=EpisodeCounts)
    started: float = field(default_factory=time.perf_counter)

    def as_dict(self) -> dict[str, float]:
        """The heartbeat's statistics; the episode counters only once there were episodes (run.environment)."""
        return (self.episodes.as_dict() if self.episodes.episodes else {}) | {
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
        self.params = SamplingParams.from_config(cfg.sampling)
        self.stop_ids = set(tokenizer.eos_token_ids)
        self.environment, self.records = task.environment, task.records
        if self.environment is not None:  # episodes score themselves: no reward, prompts from reset
            self.scorer = None
            self.shard = PromptShard([], list(task.prompts), actor_id, num_actors, cfg.run.seed)
        else:
            # resolve_task's batch scorer; a Task built by hand scores with its per-sample reward.
            self.scorer = task.scorer or load_reward("", task, cfg.run.reward_timeout_s)
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
        if self.environment is not None:
            rows = self._episodes(indices, on_step)
        else:
            completions = self._generate([self.shard.ids[i] for i in indices], on_step)
            texts = [
                self.tokenizer.decode([t for t in c.response_ids if t not in self.stop_ids])
                for c in completions
            ]
            scores = self.scorer([self.shard.texts[i] for i in indices], texts)  # NaN where the reward failed
            rows = [
                SequenceRow(c.prompt_ids, c.response_ids, c.logprobs, [], score, c.finish_reason, [])
                for c, score in zip(completions, scores, strict=True)
            ]
        batch = self._batch(rows, indices, policy_version, token)
        self.batch_id += 1
        return batch

    def _batch(
        self, rows: list[SequenceRow], indices: list[int], policy_version: int, token: str
    ) -> ExperienceBatch:
        """The experience message of ``rows`` (``loss_mask`` sent when the rows have one: episodes)."""
        sequences = [
            protocol.Sequence_(len(r.prompt), len(r.response), r.score, r.finish_reason, i)
            for i, r in zip(indices, rows, strict=True)
        ]
        episodes = self.environment is not None
        masks = [r.loss_mask for r in rows] if episodes else None
        return ExperienceBatch(
            self.actor_id,
            self.batch_id,
            policy_version,
            tuple(sequences),
            np.concatenate([np.asarray([*r.prompt, *r.response], np.int32) for r in rows]),
            np.concatenate([np.asarray(r.logprobs, np.float32) for r in rows]),
            self._reference([r.prompt for r in rows], [r.response for r in rows]),
            gen_tokens_per_s=self.stats.as_dict()["gen_tokens_per_s"],
            loss_mask=None if masks is None else np.concatenate([np.asarray(m, np.uint8) for m in masks]),
            token_rewards=np.concatenate([row_token_rewards(r) for r in rows]) if episodes else None,
            token=token,
        )

    def _episodes(self, indices: list[int], on_step: Callable[[], None]) -> list[SequenceRow]:
        """One episode per index (a fresh environment each), as rows; counted in ``stats.episodes``."""
        r = self.cfg.run
        limits = EpisodeLimits(
            r.env_step_timeout_s,
            r.max_observation_chars,
            max_response_tokens(self.cfg),
            self.cfg.sampling.max_prompt_tokens,
        )
        start = time.perf_counter()
        rows = play_episodes(
            self.model,
            self.tokenizer,
            self.environment,
            [dict(self.records[i]) for i in indices],
            self.params,
            lambda k, turn: episode_seed(r.seed, self.actor_id, self.batch_id, k, turn),
            limits,
            self.stats.episodes,
            on_step,
            max_rows=self.cfg.sampling.max_rows,
        )
        self.stats.generate_s += time.perf_counter() - start
        self.stats.generated_tokens += sum(sum(row.loss_mask) for row in rows)
        return rows

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

    def _reference(self, prompts: Sequence[list[int]], responses: Sequence[list[int]]) -> np.ndarray | None:
        """Reference log-probs of every response token, when this actor computes them (``ppo.reference_on``)."""
        if self.cfg.ppo.reference_on != "actors":
            return None
        start = time.perf_counter()
        ref = reference_logprobs(self.model, list(prompts), list(responses), self.params.temperature)
        self.stats.reference_s += time.perf_counter() - start
        return np.concatenate(ref).astype(np.float32)
