"""The experience buffer: accepts sequence groups from actors, drops bad or stale ones (counted), hands out batches.

Sequences arrive in groups of ``group_size`` completions of one prompt (consecutive in a batch); a group is
accepted or dropped whole, so GRPO/RLOO baselines always see complete groups. A sequence whose score or
log-probs (behaviour or reference) are not finite, or whose log-probs are positive, drops its group
(``reject/bad_score`` or ``reject/bad_logprobs``), as do token ids outside the vocabulary (``reject/bad_tokens``:
the embedding lookup would read out of bounds) and prompts or responses longer than the config allows
(``reject/too_long``); a group older than ``max_policy_lag`` policy versions is dropped on arrival and again
when a batch is taken (``lag/dropped``).
"""

from __future__ import annotations

import logging
from collections import Counter, deque
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from common.logs import RateLimitFilter
from common.protocol import ExperienceBatch
from learner.update import Experience

logger = logging.getLogger(__name__)
logger.addFilter(RateLimitFilter())  # what peers send decides how often these fire
_LOGPROB_SLACK = 1e-4  # float error can put a log-prob of a near-certain token just above 0
_EQUAL_SCORES = 1e-6  # scores closer than this in a group count as equal (dynamic sampling)


@dataclass(frozen=True)
class SequenceLimits:
    """What a sequence may hold: token ids in ``[0, vocab_size)``, at most ``max_prompt`` prompt tokens
    (sampling.max_prompt_tokens) and ``max_response`` response tokens (sampling.max_new_tokens)."""

    vocab_size: int = 2**31 - 1
    max_prompt: int = 2**31 - 1
    max_response: int = 2**31 - 1


def _problem(seq, tokens: np.ndarray, behaviour: np.ndarray, ref: np.ndarray | None, limits: SequenceLimits):
    """Why one sequence cannot be trained on (a ``reject/...`` counter name), or None."""
    if seq.prompt_len > limits.max_prompt or seq.response_len > limits.max_response:
        return "reject/too_long"
    if tokens.size and (tokens.min() < 0 or tokens.max() >= limits.vocab_size):
        return "reject/bad_tokens"
    if not np.isfinite(seq.score):
        return "reject/bad_score"
    for logprobs in (behaviour, ref):
        if logprobs is not None and (not np.isfinite(logprobs).all() or (logprobs > _LOGPROB_SLACK).any()):
            return "reject/bad_logprobs"
    return None


@dataclass
class Group:
    """``group_size`` sequences sampled from one prompt with one policy version."""

    actor_id: int
    batch_id: int
    policy_version: int
    prompts: list[list[int]]
    responses: list[list[int]]
    behaviour: list[np.ndarray]
    ref: list[np.ndarray] | None
    scores: list[float]
    truncated: list[bool]
    """Each response was cut at sampling.max_new_tokens (finish reason 'length')."""
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
    """Cut a batch into groups; invalid groups are left out and counted by reason.

    ``drop_equal_scores`` (DAPO's dynamic sampling): a group whose scores are all equal has zero advantage under
    any group baseline, so it carries no signal; it is left out as ``reject/zero_variance``.
    """
    rejects: Counter = Counter()
    if len(msg.sequences) % group_size:
        rejects["reject/bad_group"] += len(msg.sequences)
        return [], rejects
    groups, tok_at, lp_at = [], 0, 0
    for start in range(0, len(msg.sequences), group_size):
        group = Group(
            msg.actor_id,
            msg.batch_id,
            msg.policy_version,
            [],
            [],
            [],
            [] if msg.ref_logprobs is not None else None,
            [],
            [],
            msg.sequences[start].prompt_index,
        )
        reason = None
        for seq in msg.sequences[start : start + group_size]:
            tokens = msg.tokens[tok_at : tok_at + seq.prompt_len + seq.response_len]
            behaviour = msg.behaviour_logprobs[lp_at : lp_at + seq.response_len]
            ref = None if group.ref is None else msg.ref_logprobs[lp_at : lp_at + seq.response_len]
            tok_at, lp_at = tok_at + seq.prompt_len + seq.response_len, lp_at + seq.response_len
            reason = reason or _problem(seq, tokens, behaviour, ref, limits)
            if reason is not None:
                continue  # the group is dropped: no need to copy the rest
            group.prompts.append(tokens[: seq.prompt_len].tolist())
            group.responses.append(tokens[seq.prompt_len :].tolist())
            group.behaviour.append(behaviour)
            if ref is not None:
                group.ref.append(ref)
            group.scores.append(seq.score)
            group.truncated.append(seq.finish_reason == "length")
        if reason is None and drop_equal_scores and np.ptp(group.scores) <= _EQUAL_SCORES:
            reason = "reject/zero_variance"
        if reason is None:
            groups.append(group)
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
        seqs = [(g, i) for g in taken for i in range(self.group_size)]
        with_ref = all(g.ref is not None for g in taken)
        exp = Experience(
            prompt_ids=[g.prompts[i] for g, i in seqs],
            response_ids=[g.responses[i] for g, i in seqs],
            behaviour_logprobs=[g.behaviour[i] for g, i in seqs],
            scores=np.array([g.scores[i] for g, i in seqs], np.float32),
            policy_versions=np.array([g.policy_version for g, _ in seqs], np.int64),
            ref_logprobs=[g.ref[i] for g, i in seqs] if with_ref else None,
            truncated=np.array([g.truncated[i] for g, i in seqs], bool),
            origins=[g.origin for g in taken],
        )
        return exp, current_version - exp.policy_versions


def save_groups(groups: list[Group], path: Path) -> None:
    """Write buffered groups to ``path`` (``.npz`` of plain arrays; read back with pickling off)."""
    seqs = [(g, i) for g in groups for i in range(len(g.scores))]
    with_ref = bool(groups) and all(g.ref is not None for g in groups)
    arrays = {
        "groups": np.array([[g.actor_id, g.batch_id, g.policy_version, g.prompt_index] for g in groups], np.int64),
        "sequences": np.array(
            [[k, len(g.prompts[i]), len(g.responses[i]), g.truncated[i]] for k, g in enumerate(groups) for i in range(len(g.scores))],
            np.int64,
        ).reshape(-1, 4),
        "scores": np.array([g.scores[i] for g, i in seqs], np.float64),
        "tokens": np.array([t for g, i in seqs for t in g.prompts[i] + g.responses[i]], np.int32),
        "behaviour": np.concatenate([g.behaviour[i] for g, i in seqs]).astype(np.float32) if seqs else np.zeros(0, np.float32),
        "ref": np.concatenate([g.ref[i] for g, i in seqs]).astype(np.float32) if with_ref and seqs else np.zeros(0, np.float32),
    }  # fmt: skip
    with path.open("wb") as f:
        np.savez(f, with_ref=np.array(with_ref), **arrays)


def load_groups(path: Path) -> list[Group]:
    """The groups ``save_groups`` wrote."""
    with np.load(path, allow_pickle=False) as data:
        arrays = {k: data[k] for k in data.files}
    groups = [Group(int(a), int(b), int(v), [], [], [], [] if arrays["with_ref"] else None, [], [], int(p))
              for a, b, v, p in arrays["groups"]]  # fmt: skip
    tok_at = lp_at = 0
    for (k, prompt_len, response_len, truncated), score in zip(
        arrays["sequences"], arrays["scores"], strict=True
    ):
        group, end = groups[int(k)], tok_at + prompt_len + response_len
        group.prompts.append(arrays["tokens"][tok_at : tok_at + prompt_len].tolist())
        group.responses.append(arrays["tokens"][tok_at + prompt_len : end].tolist())
        group.behaviour.append(arrays["behaviour"][lp_at : lp_at + response_len].copy())
        if group.ref is not None:
            group.ref.append(arrays["ref"][lp_at : lp_at + response_len].copy())
        group.scores.append(float(score))
        group.truncated.append(bool(truncated))
        tok_at, lp_at = end, lp_at + response_len
    return groups
