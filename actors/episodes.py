"""Multi-turn episodes as token ids: the model's turns exactly as sampled, the environment's turns masked out.

Re-tokenising a decoded conversation between turns changes token ids (merges across the turn boundary, a
different split of the same text), so the learner's log-prob ratio would compare different sequences. Here each
episode is one growing id list: the prompt (the first user turn in the chat template), then per turn the ids
the sampler drew (with their behaviour log-probs, ``loss_mask`` 1) and the ids of the environment's answer,
rendered once as the template's next user turn (``loss_mask`` 0). Many episodes decode together, one batched
generation per turn over the episodes still running.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import mlx.nn as nn

from actors.environments import Environment
from actors.sampler import SamplingParams, generate_completions
from common.models import chat_prompt_ids

logger = logging.getLogger(__name__)


@dataclass
class Episode:
    """One conversation: ``ids`` = prompt ids, then the response part (model and environment turns)."""

    ids: list[int]
    prompt_len: int
    logprobs: list[float] = field(default_factory=list)
    """Per id after the prompt: the behaviour log-prob of a sampled id, 0 for an environment id."""
    loss_mask: list[int] = field(default_factory=list)
    """Per id after the prompt: 1 sampled by the model (trained on), 0 written by the environment."""
    rewards: list[float] = field(default_factory=list)
    """Per model turn."""
    ended: str = ""
    """'done' (the environment ended it), 'turn_limit', 'context' (over the budget), 'error' (the env raised)."""

    def add(self, ids: Sequence[int], logprobs: Sequence[float] | None) -> None:
        """Append a model turn (``logprobs`` given) or an environment turn (None)."""
        self.ids.extend(int(t) for t in ids)
        self.logprobs.extend([0.0] * len(ids) if logprobs is None else [float(x) for x in logprobs])
        self.loss_mask.extend([0 if logprobs is None else 1] * len(ids))

    @property
    def episode_return(self) -> float:
        return float(sum(self.rewards))


def user_turn_ids(tokenizer: Any, observation: str, model_stopped: bool) -> list[int]:
    """The ids that follow a model turn to present ``observation`` as the next user turn and open the answer.

    Taken from the chat template itself: the text the template puts after an assistant turn's end token, then
    the user turn and the generation prompt (``[u, a]`` against ``[u, a, u']``). ``model_stopped``: the turn ended
    on the end token (it was sampled); else (cut at the token limit) the end token is written here.
    """
    eos = tokenizer.eos_token
    before = [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]
    head = tokenizer.apply_chat_template(before, tokenize=False)
    full = tokenizer.apply_chat_template(
        [*before, {"role": "user", "content": observation}], tokenize=False, add_generation_prompt=True
    )
    if not full.startswith(head) or eos not in head:
        raise ValueError("the chat template does not extend a conversation by appending to it")
    text = head[head.rindex(eos) + len(eos) :] + full[len(head) :]
    return ([] if model_stopped else list(tokenizer.encode(eos, add_special_tokens=False))) + list(
        tokenizer.encode(text, add_special_tokens=False)
    )


def run_episodes(
    model: nn.Module,
    tokenizer: Any,
    envs: Sequence[Environment],
    records: Sequence[dict[str, Any]],
    params: SamplingParams,
    seed_of: Callable[[int, int], int],
    max_context: int = 2048,
    max_observation_chars: int = 4000,
) -> list[Episode]:
    """One episode per ``(env, record)``, all decoding together turn by turn.

    ``seed_of(episode, turn)``: the sampling seed of one model turn. ``max_context``: an episode that could not fit
    another full turn ends (``context``). An environment answer over ``max_observation_chars`` is cut to it (a tool
    that returns megabytes); an environment that raises ends its episode (``error``, logged) with its rewards.
    """
    stop_ids = set(tokenizer.eos_token_ids)
    episodes = []
    for env, record in zip(envs, records, strict=True):
        prompt = chat_prompt_ids(tokenizer, env.reset(record))
        episodes.append(Episode(ids=list(prompt), prompt_len=len(prompt)))
    live = list(range(len(episodes)))
    for turn in range(max(env.max_turns for env in envs) if envs else 0):
        for i in live:
            if len(episodes[i].ids) + params.max_new_tokens > max_context:
                _end(episodes[i], "context")
        live = [i for i in live if not episodes[i].ended]
        if not live:
            break
        completions = generate_completions(
            model, [episodes[i].ids for i in live], params, stop_ids, seeds=[seed_of(i, turn) for i in live]
        )
        still = []
        for i, completion in zip(live, completions, strict=True):
            if _play_turn(episodes[i], envs[i], completion, tokenizer, stop_ids, turn, max_observation_chars):
                still.append(i)
        live = still
    return episodes


def _end(episode: Episode, why: str) -> bool:
    episode.ended = why
    return False


def _play_turn(episode, env, completion, tokenizer, stop_ids, turn: int, max_observation_chars: int) -> bool:
    """Append one model turn and the environment's answer; False when the episode ended."""
    episode.add(completion.response_ids, completion.logprobs)
    text = tokenizer.decode([t for t in completion.response_ids if t not in stop_ids])
    try:
        result = env.step(text)
    except Exception as e:  # a user's environment: its failure ends this episode, not the actor
        logger.warning("environment %s raised on turn %d: %r", type(env).__name__, turn + 1, e)
        return _end(episode, "error")
    episode.rewards.append(float(result.reward))
    if result.done:
        return _end(episode, "done")
    if turn + 1 >= env.max_turns:
        return _end(episode, "turn_limit")
    observation = str(result.observation)
    if len(observation) > max_observation_chars:
        logger.warning("environment %s answered %d characters: cut to %d", type(env).__name__, len(observation),
                       max_observation_chars)  # fmt: skip
        observation = observation[:max_observation_chars]
    episode.add(user_turn_ids(tokenizer, observation, completion.finish_reason == "stop"), None)
    return True
