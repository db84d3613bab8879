"""The actor's episode path (``run.environment``): records -> one fresh environment per episode -> episodes
(``actors/episodes.py``) -> the rows of an ``ExperienceBatch``.

An episode becomes one sequence: its prompt is the environment's first message in the chat template, its response
every id after that (the model's turns as sampled, the environment's turns between them), with the behaviour
log-probs (0 on environment ids) and ``loss_mask`` (0 on environment ids); its score is the episode's return, the
sum of its step rewards. An episode that ended in an environment's failure (it raised, or ran past
``run.env_step_timeout_s``) scores NaN: the learner drops its group (``reject/bad_score``), counted, and trains
on none of it. ``finish_reason`` is 'stop' when the environment ended it or its turns ran out, 'length' when the
token budget (``sampling.max_episode_tokens``) did. A GRPO group is ``ppo.group_size`` episodes of one record.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import mlx.nn as nn
import numpy as np

from actors.environments import StepResult
from actors.episodes import Episode, run_episodes
from actors.sampler import SamplingParams
from common.logs import RateLimitFilter
from common.models import chat_prompt_ids

logger = logging.getLogger(__name__)
# A broken environment fails every episode: say it, not thousands of times.
logger.addFilter(RateLimitFilter())

_FAILED_START = "(the environment failed to start this episode)"


MAX_INFO_KEYS = 32
"""Distinct ``info`` counters kept per episode (an environment that invents keys cannot flood the heartbeat)."""


class EnvironmentTimeout(Exception):
    pass


class GuardedEnvironment:
    """One episode's environment: built, reset and stepped on a daemon thread under a time limit, its answers
    checked (a finite reward, text cut to ``max_observation_chars``, counted in ``cuts``).

    A call past ``timeout_s`` raises ``EnvironmentTimeout`` (``failed`` = 'timeout'); its thread is left to
    finish on its own (Python cannot stop a thread), which is why an instance is never used again. A failed
    start (construction or ``reset``) makes the first ``step`` raise, so the episode ends at once as 'error'.
    ``on_wait`` runs at every step and about twice a second while one is waited for (heartbeats).
    """

    def __init__(self, cls: type, timeout_s: float, max_observation_chars: int, on_wait: Callable[[], None]):
        self.name, self.timeout_s, self._on_wait = cls.__name__, timeout_s, on_wait
        self._owner = threading.current_thread()  # heartbeats use the actor's sockets: its own thread only
        self.max_chars = max_observation_chars
        self.failed = ""  # '', 'error' (it raised while starting) or 'timeout' (a call ran past timeout_s)
        self.cuts = 0  # answers cut to max_chars
        # the numbers of the steps' info, summed (tool_calls, tool_errors ...)
        self.info: dict[str, float] = {}
        self.first: str | None = None
        self.max_turns = int(cls.max_turns)
        self.env = self._start(cls, "__init__")

    def reset(self, record: dict[str, Any]) -> str:
        """The first user message; computed once (the rollout reads it before the episode runner does)."""
        if self.first is None:
            text = self._start(self.env.reset, "reset", dict(record)) if self.env is not None else None
            if text is None:
                self.failed = self.failed or "error"
            self.first = _FAILED_START if text is None else str(text)
        return self.first

    def step(self, action_text: str) -> StepResult:
        if self.failed or self.env is None:
            raise RuntimeError(f"{self.name} did not start")
        result = self._call(self.env.step, "step", action_text)
        reward = float(result.reward)
        if not math.isfinite(reward):
            raise ValueError(f"{self.name}.step returned the reward {reward}")
        observation, done = str(result.observation), bool(result.done)
        if len(observation) > self.max_chars and not done:
            self.cuts += 1
            observation = observation[: self.max_chars]
        info = dict(getattr(result, "info", None) or {})
        for key, value in info.items():
            name = str(key)[:40]
            counted = name in self.info or len(self.info) < MAX_INFO_KEYS
            if counted and isinstance(value, int | float) and math.isfinite(value):
                self.info[name] = self.info.get(name, 0.0) + float(value)
        return StepResult(observation, reward, done, info)

    def on_wait(self) -> None:
        """Heartbeat while waiting, from the thread that built the guard only (the episode runner steps
        environments on its own threads and heartbeats itself)."""
        if threading.current_thread() is self._owner:
            self._on_wait()

    def _start(self, fn: Callable[..., Any], what: str, *args: Any) -> Any:
        """``fn(*args)`` for a start of the episode; None (``failed`` set, logged) when it raises or hangs."""
        try:
            return self._call(fn, what, *args)
        except Exception as e:  # a user's environment: its failure ends this episode, not the actor
            self.failed = self.failed or "error"
            logger.warning("environment %s failed in %s: %r", self.name, what, e)
            return None

    def _call(self, fn: Callable[..., Any], what: str, *args: Any) -> Any:
        self.on_wait()
        box: dict[str, Any] = {}

        def target() -> None:
            try:
                box["value"] = fn(*args)
            except BaseException as e:  # SystemExit from a tool included: it must not stop the actor
                box["error"] = e if isinstance(e, Exception) else RuntimeError(repr(e))

        thread = threading.Thread(target=target, name=f"env-{self.name}-{what}", daemon=True)
        thread.start()
        deadline = time.monotonic() + self.timeout_s
        while thread.is_alive() and (left := deadline - time.monotonic()) > 0:
            thread.join(min(left, 0.5))
            self.on_wait()
        if thread.is_alive():
            self.failed = "timeout"
            raise EnvironmentTimeout(f"{self.name}.{what} took longer than {self.timeout_s:g} s")
        if "error" in box:
            raise box["error"]
        return box["value"]


@dataclass(frozen=True)
class EpisodeLimits:
    """``run.env_step_timeout_s``, ``run.max_observation_chars`` and the response budget of an episode
    (``common.config.max_response_tokens``)."""

    step_timeout_s: float
    max_observation_chars: int
    max_response_tokens: int
    max_prompt_tokens: int = 0
    """``sampling.max_prompt_tokens``: a longer first message is not played (0: no limit)."""


@dataclass
class EpisodeCounts:
    """What this actor's episodes did, since it started (its heartbeat carries ``as_dict``)."""

    episodes: int = 0
    env_errors: int = 0
    env_timeouts: int = 0
    context_ends: int = 0
    turn_limit_ends: int = 0
    observation_cuts: int = 0
    prompt_too_long: int = 0
    turns: int = 0
    info: dict[str, float] = field(default_factory=dict)
    """The environments' own counters (numbers in ``StepResult.info``), summed: ``env/<key>`` in the heartbeat."""

    def add(self, episode: Episode, guard: GuardedEnvironment) -> None:
        self.episodes += 1
        self.env_errors += episode.ended == "error"
        self.env_timeouts += episode.ended == "timeout"
        self.context_ends += episode.ended == "context"
        self.turn_limit_ends += episode.ended == "turn_limit"
        self.prompt_too_long += episode.ended == "prompt_too_long"
        self.observation_cuts += guard.cuts
        self.turns += len(model_turns(episode.loss_mask))
        for key, value in guard.info.items():  # a bounded set of names: the heartbeat carries them all
            if key in self.info or len(self.info) < MAX_INFO_KEYS:
                self.info[key] = self.info.get(key, 0.0) + value

    def as_dict(self) -> dict[str, float]:
        counts = {k: float(v) for k, v in vars(self).items() if k not in ("turns", "info")}
        info = {f"env/{k}": v for k, v in self.info.items()}
        return counts | info | {"turns_per_episode": self.turns / max(self.episodes, 1)}


@dataclass(frozen=True)
class SequenceRow:
    """One sequence of an ``ExperienceBatch``: an episode (or a single-turn completion, with no mask)."""

    prompt: Sequence[int]
    response: Sequence[int]
    logprobs: Sequence[float]
    """Per response id: its behaviour log-prob, 0 on an environment's id."""
    loss_mask: Sequence[int]
    """Per response id: 1 sampled by the model, 0 written by the environment (empty: single-turn)."""
    score: float
    finish_reason: str
    turn_rewards: Sequence[float]
    """Per model turn (``token_rewards`` places them on the tokens)."""


def model_turns(loss_mask: Sequence[int]) -> list[tuple[int, int]]:
    """``[start, end)`` of each model turn: the runs of 1 in ``loss_mask`` (environment turns separate them)."""
    turns, start = [], None
    for i, m in enumerate([*loss_mask, 0]):
        if m and start is None:
            start = i
        elif not m and start is not None:
            turns.append((start, i))
            start = None
    return turns


def token_rewards(loss_mask: Sequence[int], turn_rewards: Sequence[float]) -> list[float]:
    """Per response token: each model turn's reward on that turn's last token, 0 elsewhere (environment tokens,
    a last turn the environment failed on and so gave no reward). Their sum is the episode's return."""
    turns = model_turns(loss_mask)
    if len(turn_rewards) > len(turns):
        raise ValueError(f"{len(turn_rewards)} turn rewards for {len(turns)} model turns")
    out = [0.0] * len(loss_mask)
    for (_, end), reward in zip(turns, turn_rewards, strict=False):
        out[end - 1] = float(reward)
    return out


def row_token_rewards(row: SequenceRow) -> np.ndarray:
    """``ExperienceBatch.token_rewards`` of one row: its turns' rewards on their last tokens (PPO's per-token
    returns); zeros for a row scored NaN (a failed episode, dropped by the learner: the protocol refuses
    non-finite token rewards, which would cost the whole batch)."""
    if not math.isfinite(row.score):
        return np.zeros(len(row.response), np.float32)
    return np.asarray(token_rewards(row.loss_mask, row.turn_rewards), np.float32)


def episode_row(episode: Episode, end_token: int) -> SequenceRow:
    """The sequence of ``episode``. Environment ids after its last model turn are left out (an answer the model
    never read conditions nothing trained). An episode with no model turn at all (its prompt left no room for
    one) cannot be an empty response on the wire: it becomes ``end_token`` alone, masked out and scored NaN."""
    turns = model_turns(episode.loss_mask)
    failed = episode.ended in ("error", "timeout")
    score = math.nan if failed or not turns else episode.episode_return
    reason = {"done": "stop", "turn_limit": "stop", "context": "length"}.get(episode.ended, episode.ended)
    prompt = episode.ids[: episode.prompt_len]
    if not turns:
        return SequenceRow(prompt, [end_token], [0.0], [0], math.nan, "length", [])
    n = turns[-1][1]
    response = episode.ids[episode.prompt_len : episode.prompt_len + n]
    mask, rewards = episode.loss_mask[:n], list(episode.rewards)
    return SequenceRow(prompt, response, episode.logprobs[:n], mask, score, reason, rewards)


def play_episodes(
    model: nn.Module,
    tokenizer: Any,
    env_cls: type,
    records: Sequence[dict[str, Any]],
    params: SamplingParams,
    seed_of: Callable[[int, int], int],
    limits: EpisodeLimits,
    counts: EpisodeCounts,
    on_step: Callable[[], None] = lambda: None,
    max_rows: int = 0,
) -> list[SequenceRow]:
    """One episode per record, each with a fresh ``env_cls()`` behind ``GuardedEnvironment``; their rows, and
    what they did added to ``counts``. ``seed_of(episode, turn)``: a model turn's sampling seed. The episodes
    decode as one continuous batch (``run_episodes``; at most ``max_rows`` rows, 0: all): an episode waiting for
    its environment does not hold up the others. The guards keep the time limit; ``on_step`` runs on this thread
    only (it sends heartbeats on the actor's sockets, which no other thread may use)."""
    guard = (env_cls, limits.step_timeout_s, limits.max_observation_chars, on_step)
    guards = [GuardedEnvironment(*guard) for _ in records]
    prompt_lens = [len(chat_prompt_ids(tokenizer, g.reset(r))) for g, r in zip(guards, records, strict=True)]
    fits, episodes = _within_prompt_limit(tokenizer, guards, records, prompt_lens, limits.max_prompt_tokens)
    if fits:
        # run_episodes takes one context bound for all: the shortest prompt's keeps every response within
        # budget (a longer prompt's episode gets that much less room).
        max_context = min(prompt_lens[i] for i in fits) + limits.max_response_tokens
        played = run_episodes(
            model, tokenizer, [guards[i] for i in fits], [records[i] for i in fits], params,
            lambda k, turn: seed_of(fits[k], turn), max_context, limits.max_observation_chars,
            max_rows=max_rows, on_step=on_step,
        )  # fmt: skip
        for i, episode in zip(fits, played, strict=True):
            episodes[i] = episode
    for episode, guard in zip(episodes, guards, strict=True):
        if episode.ended == "error" and guard.failed == "timeout":
            episode.ended = "timeout"
        counts.add(episode, guard)
    return [episode_row(e, int(tokenizer.eos_token_id)) for e in episodes]


def _within_prompt_limit(
    tokenizer: Any, guards: list, records: Sequence[dict], prompt_lens: list[int], limit: int
) -> tuple[list[int], list[Episode | None]]:
    """The indices of the episodes whose first message fits ``limit`` (0: all), and a stand-in episode for each
    of the others (None for those to play): the learner would refuse those (reject/too_long), so no generation
    is spent on them; logged with the limit to raise."""
    fits = [i for i, n in enumerate(prompt_lens) if not limit or n <= limit]
    episodes = [
        None if i in fits else _unplayed(tokenizer, guards[i].reset(r), limit) for i, r in enumerate(records)
    ]
    if len(fits) < len(records):
        logger.error("%d first message(s) of %s over sampling.max_prompt_tokens=%d (the longest %d tokens): not "
                     "played; raise the limit", len(records) - len(fits), guards[0].name, limit,
                     max(prompt_lens))  # fmt: skip
    return fits, episodes


def _unplayed(tokenizer: Any, first_message: str, max_prompt_tokens: int) -> Episode:
    """The stand-in of an episode not played for its over-long first message (its prompt cut to the limit,
    no model turn: ``episode_row`` makes it a masked, NaN-scored row the learner drops)."""
    prompt = chat_prompt_ids(tokenizer, first_message)[: max_prompt_tokens or None]
    return Episode(ids=list(prompt), prompt_len=len(prompt), ended="prompt_too_long")


def episode_seed(run_seed: int, actor_id: int, batch_id: int, index: int, turn: int) -> int:
    """The seed of one model turn: the same run, actor, batch, episode and turn always sample the same way."""
    return int(np.random.SeedSequence([run_seed, actor_id, batch_id, index, turn]).generate_state(1)[0])
