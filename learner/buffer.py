"""The experience buffer: accepts sequence groups from actors, drops bad or stale ones (counted), hands out batches.

Sequences arrive in groups of ``group_size`` completions of one prompt (consecutive in a batch); a group is
accepted or dropped whole, so GRPO/RLOO baselines always see complete groups. A sequence whose score or
log-probs (behaviour or reference) are not finite, or whose log-probs are positive, drops its group
(``reject/bad_score`` or ``reject/bad_logprobs``), as do token ids outside the vocabulary (``reject/bad_tokens``:
the embedding lookup would read out of bounds) and prompts or responses longer than the config allows
(``reject/too_long``), and a multi-turn response without a single model token (``reject/no_model_tokens``: its
loss mask is all environment, nothing to train on or to put its score on); a group older than ``max_policy_lag``
policy versions is dropped on arrival and again when a batch is taken (``lag/dropped``).
"""

from __future__ import annotations

import logging
from collections import Counter, deque
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from common.logs import RateLimitFilter
from common.protocol import ExperienceBatch
from common.ragged import Ragged
from learner.experience import Experience

logger = logging.getLogger(__name__)
logger.addFilter(RateLimitFilter())  # what peers send decides how often these fire
_LOGPROB_SLACK = 1e-4  # float error can put a log-prob of a near-certain token just above 0
_EQUAL_SCORES = 1e-6  # scores closer than this in a group count as equal (dynamic sampling)


@dataclass(frozen=True)
class SequenceLimits:
    """What a sequence may hold: token ids in ``[0, vocab_size)``, at most ``max_prompt`` prompt tokens
    (sampling.max_prompt_tokens) and ``max_response`` response tokens (``common.config.max_response_tokens``)."""

    vocab_size: int = 2**31 - 1
    max_prompt: int = 2**31 - 1
    max_response: int = 2**31 - 1


def _problem(exp: Experience, b: int, limits: SequenceLimits) -> str | None:
    """Why sequence ``b`` of ``exp`` cannot be trained on (a ``reject/...`` counter name), or None."""
    if exp.prompt_lens[b] > limits.max_prompt or exp.response_lens[b] > limits.max_response:
        return "reject/too_long"
    tokens = exp.tokens[b]
    if tokens.size and (tokens.min() < 0 or tokens.max() >= limits.vocab_size):
        return "reject/bad_tokens"
    if not np.isfinite(exp.scores[b]):
        return "reject/bad_score"
    if (
        exp.loss_mask is not None and not exp.loss_mask[b].any()
    ):  # nothing the model sampled: nothing to train
        return "reject/no_model_tokens"
    for logprobs in (exp.behaviour[b], None if exp.ref is None else exp.ref[b]):
        if logprobs is not None and (not np.isfinite(logprobs).all() or (logprobs > _LOGPROB_SLACK).any()):
            return "reject/bad_logprobs"
    return None


@dataclass
class Group:
    """``group_size`` sequences sampled from one prompt with one policy version."""

    actor_id: int
    batch_id: int
    policy_version: int
    experience: Experience
    prompt_index: int = -1
    """Which prompt of the actor's prompt list the group answers (-1: not said)."""

    @property
    def origin(self) -> tuple[int, int, int]:
        """``(actor id, batch id, prompt index)``: where the group came from, unique within a run."""
        return (self.actor_id, self.batch_id, self.prompt_index)


def split_groups(
    msg: ExperienceBatch,
    group_size: int,
    drop_equal_scores: bool = False,
    limits: SequenceLimits = SequenceLimits(),
) -> tuple[list[Group], Counter]:
    """Cut a batch into groups; invalid groups are left out and counted by reason (the first bad sequence's).

    ``drop_equal_scores`` (DAPO's dynamic sampling): a group whose scores are all equal has zero advantage under
    any group baseline, so it carries no signal; it is left out as ``reject/zero_variance``.
    """
    rejects: Counter = Counter()
    if len(msg.sequences) % group_size:
        rejects["reject/bad_group"] += len(msg.sequences)
        return [], rejects
    exp, groups = Experience.from_message(msg), []
    for start in range(0, exp.size, group_size):
        rows = range(start, start + group_size)
        reason = next((r for b in rows if (r := _problem(exp, b, limits)) is not None), None)
        if (
            reason is None
            and drop_equal_scores
            and np.ptp(exp.scores[start : start + group_size]) <= _EQUAL_SCORES
        ):
            reason = "reject/zero_variance"
        if reason is None:
            part = exp.select(slice(start, start + group_size))
            index = msg.sequences[start].prompt_index
            groups.append(Group(msg.actor_id, msg.batch_id, msg.policy_version, part, index))
        else:
            rejects[reason] += group_size
    return groups, rejects


class ExperienceBuffer:
    """Accepted groups, oldest first, up to ``capacity`` sequences."""

    def __init__(
        self,
        capacity: int,
        group_size: int,
        max_policy_lag: int,
        dynamic_sampling: bool = False,
        limits: SequenceLimits = SequenceLimits(),
    ):
        self.capacity = capacity
        self.group_size = group_size
        self.max_policy_lag = max_policy_lag
        self.dynamic_sampling = dynamic_sampling
        self.limits = limits
        self.groups: deque[Group] = deque()
        self.counters: Counter = Counter()

    @property
    def depth(self) -> int:
        """Sequences held."""
        return len(self.groups) * self.group_size

    def is_stale(self, policy_version: int, current_version: int) -> bool:
        """Whether experience sampled with ``policy_version`` is older than the lag bound allows."""
        return current_version - policy_version > self.max_policy_lag

    def has_room(self) -> bool:
        return self.depth < self.capacity

    def add(self, msg: ExperienceBatch, current_version: int) -> int:
        """Add a batch's valid, fresh groups; returns the number of sequences accepted."""
        self.counters["batches/received"] += 1
        groups, rejects = split_groups(msg, self.group_size, self.dynamic_sampling, self.limits)
        self.counters.update(rejects)
        if self.is_stale(msg.policy_version, current_version):
            self.counters["lag/dropped"] += len(groups) * self.group_size
            logger.info(
                "dropped %d stale sequences from actor %d (v%d, learner at v%d)",
                len(groups) * self.group_size,
                msg.actor_id,
                msg.policy_version,
                current_version,
            )
            return 0
        for reason, count in rejects.items():
            log = (
                logger.info if reason == "reject/zero_variance" else logger.warning
            )  # expected, not an error
            log("dropped %d sequences from actor %d: %s", count, msg.actor_id, reason)
        self.groups.extend(groups)
        return len(groups) * self.group_size

    def _drop_stale(self, current_version: int) -> None:
        fresh = deque(g for g in self.groups if not self.is_stale(g.policy_version, current_version))
        dropped = (len(self.groups) - len(fresh)) * self.group_size
        if dropped:
            self.counters["lag/dropped"] += dropped
            logger.info("dropped %d buffered sequences older than %d versions", dropped, self.max_policy_lag)
        self.groups = fresh

    def take(self, num_sequences: int, current_version: int) -> tuple[Experience, np.ndarray] | None:
        """The oldest ``num_sequences`` fresh sequences as an ``Experience`` and their lags, or None if too few."""
        self._drop_stale(current_version)
        if self.depth < num_sequences:
            return None
        taken = [self.groups.popleft() for _ in range(num_sequences // self.group_size)]
        exp = Experience.concat([g.experience for g in taken])
        exp.scores = exp.scores.astype(np.float32)
        exp.origins = [g.origin for g in taken]
        return exp, current_version - exp.policy_versions


def save_groups(groups: list[Group], path: Path) -> None:
    """Write buffered groups to ``path`` (``.npz`` of plain arrays; read back with pickling off)."""
    exp = Experience.concat([g.experience for g in groups]) if groups else None
    with_ref = exp is not None and exp.ref is not None
    sizes = [g.experience.size for g in groups]
    owner = np.repeat(np.arange(len(groups)), sizes)
    arrays = {
        "groups": np.array([[g.actor_id, g.batch_id, g.policy_version, g.prompt_index] for g in groups], np.int64),
        "sequences": np.zeros((0, 4), np.int64) if exp is None else np.stack(
            [owner, exp.prompt_lens, exp.response_lens, exp.truncated.astype(np.int64)], axis=1
        ).astype(np.int64),
        "scores": np.zeros(0) if exp is None else exp.scores.astype(np.float64),
        "tokens": np.zeros(0, np.int32) if exp is None else exp.tokens.values.astype(np.int32),
        "behaviour": np.zeros(0, np.float32) if exp is None else exp.behaviour.values.astype(np.float32),
        "ref": exp.ref.values.astype(np.float32) if with_ref else np.zeros(0, np.float32),
    }  # fmt: skip
    if exp is not None and exp.loss_mask is not None:  # multi-turn episodes (older files have none)
        arrays["loss_mask"] = exp.loss_mask.values.astype(np.uint8)
    if exp is not None and exp.token_rewards is not None:  # per-turn rewards (older files have none)
        arrays["token_rewards"] = exp.token_rewards.values.astype(np.float32)
    with path.open("wb") as f:
        np.savez(f, with_ref=np.array(with_ref), **arrays)


def _optional_rows(arrays: dict[str, np.ndarray], key: str, lengths: np.ndarray) -> Ragged | None:
    """The per-response-token array ``key`` of a buffer file as rows, or None in a file written without it."""
    return Ragged.from_lengths(arrays[key], lengths) if key in arrays else None


def load_groups(path: Path) -> list[Group]:
    """The groups ``save_groups`` wrote."""
    with np.load(path, allow_pickle=False) as data:
        arrays = {k: data[k] for k in data.files}
    owner, prompt_lens, response_lens, truncated = arrays["sequences"].reshape(-1, 4).T
    versions = arrays["groups"].reshape(-1, 4)[:, 2]
    exp = Experience(
        tokens=Ragged.from_lengths(arrays["tokens"], prompt_lens + response_lens),
        prompt_lens=prompt_lens.astype(np.int64),
        behaviour=Ragged.from_lengths(arrays["behaviour"], response_lens),
        scores=arrays["scores"].astype(np.float64),
        policy_versions=versions[owner].astype(np.int64),
        ref=Ragged.from_lengths(arrays["ref"], response_lens) if arrays["with_ref"] else None,
        truncated=truncated.astype(bool),
        loss_mask=_optional_rows(arrays, "loss_mask", response_lens),
        token_rewards=_optional_rows(arrays, "token_rewards", response_lens),
    )
    return [
        Group(int(a), int(b), int(v), exp.select(np.flatnonzero(owner == k)), int(p))
        for k, (a, b, v, p) in enumerate(arrays["groups"].reshape(-1, 4))
    ]
