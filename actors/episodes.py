"""Multi-turn episodes as token ids: the model's turns exactly as sampled, the environment's turns masked out.

Re-tokenising a decoded conversation between turns changes token ids (merges across the turn boundary, a
different split of the same text), so the learner's log-prob ratio would compare different sequences. Here each
episode is one growing id list: the prompt (the first user turn in the chat template), then per turn the ids
the sampler drew (with their behaviour log-probs, ``loss_mask`` 1) and the ids of the environment's answer,
rendered once as the template's next user turn (``loss_mask`` 0).

Many episodes decode together in one ``CompletionStream`` (continuous batching): when an episode's model turn
finishes, its environment call runs on a daemon thread while the others keep decoding, and once the environment
answers, the episode's next turn joins the running batch. A slow tool holds up its own episode only, and no turn
waits for the longest completion of the others; a call past ``step_timeout_s`` ends its episode and is abandoned
(a Python thread cannot be killed: ``abandoned_steps()`` counts those still running).
"""

from __future__ import annotations

import logging
import math
import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import mlx.nn as nn

from actors.environments import Environment
from actors.sampler import Completion, CompletionStream, SamplingParams
from common.models import chat_prompt_ids

logger = logging.getLogger(__name__)

WAIT_S = 0.1
"""With nothing to decode, how long the runner waits for an environment before calling ``on_step`` again."""
_abandoned: set[threading.Thread] = set()
_abandoned_lock = threading.Lock()


def abandoned_steps() -> int:
    """Environment calls given up on (past ``step_timeout_s``) whose threads are still running in this process."""
    with _abandoned_lock:
        _abandoned.difference_update([t for t in _abandoned if not t.is_alive()])
        return len(_abandoned)


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
    """'done' (the environment ended it), 'turn_limit', 'context' (over the budget), 'error' (the env raised),
    'timeout' (the env did not answer within ``step_timeout_s``)."""

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
    *,
    step_timeout_s: float = 0.0,
    max_rows: int = 0,
    on_step: Callable[[], None] | None = None,
) -> list[Episode]:
    """One episode per ``(env, record)``, all decoding together (continuous batching, see the module docstring).

    ``seed_of(episode, turn)``: the sampling seed of one model turn; an episode's ids depend on its seeds and its
    environment alone, not on the timing of the others. ``max_context``: an episode that could not fit another
    full turn ends (``context``). An environment answer over ``max_observation_chars`` is cut to it (a tool that
    returns megabytes); an environment whose ``reset`` or ``step`` raises ends its episode (``error``, logged) with
    its rewards so far; a ``reset`` or ``step`` that has not returned after ``step_timeout_s`` (> 0) ends it
    (``timeout``, logged; its thread is abandoned, see ``abandoned_steps``).
    ``max_rows`` > 0: at most that many model turns decode at once. ``on_step`` runs after every decoding step
    and at least every ``WAIT_S`` while waiting for environments (the actor heartbeats from it).
    """
    if len(envs) != len(records):
        raise ValueError(f"{len(envs)} environments but {len(records)} records")
    stream = CompletionStream(model, params, set(tokenizer.eos_token_ids), max_rows=max_rows)
    runner = _Runner(stream, tokenizer, envs, seed_of, max_context, max_observation_chars, step_timeout_s)
    for i, record in enumerate(records):
        runner.call(i, "reset", envs[i].reset, record)
    while runner.stream.busy or runner.calls:
        if runner.stream.busy:
            for i, completion in runner.stream.step():
                runner.model_turn(i, completion)
        runner.collect(wait=not runner.stream.busy)
        (on_step or _nothing)()
    return runner.episodes


def _nothing() -> None:
    pass


@dataclass
class _Call:
    """One environment call running on its own thread for one episode."""

    what: str
    """'reset' or 'step'."""
    deadline: float
    """``time.monotonic()`` after which it is abandoned (inf: never)."""
    thread: threading.Thread | None = None


def _run_call(answers: queue.SimpleQueue, i: int, call: _Call, fn: Callable[[Any], Any], arg: Any) -> None:
    """The body of a call's thread: ``fn(arg)``, answered as ``(episode, call, value, error)``."""
    try:
        answers.put((i, call, fn(arg), None))
    except Exception as e:  # a user's environment: its failure ends its episode, reported on the main thread
        answers.put((i, call, None, e))


class _Runner:
    """The state of one ``run_episodes`` call: the episodes, the stream their model turns decode in, and the
    environment calls in flight. Only the calling thread touches it; call threads only put answers."""

    def __init__(self, stream, tokenizer, envs, seed_of, max_context, max_observation_chars, timeout_s):
        self.stream, self.tokenizer, self.envs, self.seed_of = stream, tokenizer, envs, seed_of
        self.max_context, self.max_chars, self.timeout_s = max_context, max_observation_chars, timeout_s
        self.stop_ids, self.max_new_tokens = stream.stop_ids, stream.params.max_new_tokens
        self.episodes = [Episode(ids=[], prompt_len=0) for _ in envs]
        self.turns = [0] * len(envs)
        self.stopped = [False] * len(envs)  # whether each episode's last model turn ended on a stop token
        self.calls: dict[int, _Call] = {}
        self.answers: queue.SimpleQueue = queue.SimpleQueue()

    def call(self, i: int, what: str, fn: Callable[[Any], Any], arg: Any) -> None:
        """Run ``fn(arg)`` for episode ``i`` on a daemon thread (an abandoned one must not keep the process up)."""
        deadline = time.monotonic() + self.timeout_s if self.timeout_s > 0 else math.inf
        call = _Call(what, deadline)
        call.thread = threading.Thread(
            target=_run_call, args=(self.answers, i, call, fn, arg), name=f"episode-{i}-{what}", daemon=True
        )
        self.calls[i] = call
        call.thread.start()

    def collect(self, wait: bool) -> None:
        """Take the environments' answers that arrived (``wait``: block until one does or a call's deadline
        passes, at most ``WAIT_S``), then end the episodes whose call is past its deadline."""
        block = wait and bool(self.calls)
        while True:
            try:
                i, call, value, error = self.answers.get(
                    block=block, timeout=self._wait_s() if block else None
                )
            except queue.Empty:
                break
            block = False  # then only what is already there
            if self.calls.get(i) is call:  # else: a call abandoned earlier, answering late
                del self.calls[i]
                self._answered(i, call.what, value, error)
        self._expire()

    def _wait_s(self) -> float:
        deadline = min(call.deadline for call in self.calls.values())
        return max(0.0, min(WAIT_S, deadline - time.monotonic()))

    def _expire(self) -> None:
        now = time.monotonic()
        for i, call in [(i, c) for i, c in self.calls.items() if c.deadline <= now]:
            del self.calls[i]
            with _abandoned_lock:
                _abandoned.add(call.thread)
            logger.warning("environment %s did not answer %s on turn %d within %.1f s: episode ended, its call "
                           "abandoned", type(self.envs[i]).__name__, call.what, self.turns[i] + 1,
                           self.timeout_s)  # fmt: skip
            _end(self.episodes[i], "timeout")

    def _answered(self, i: int, what: str, value: Any, error: Exception | None) -> None:
        episode, env = self.episodes[i], self.envs[i]
        if error is not None:
            logger.warning("environment %s raised on %s, turn %d: %r", type(env).__name__, what, self.turns[i] + 1,
                           error)  # fmt: skip
            _end(episode, "error")
        elif what == "reset":
            prompt = chat_prompt_ids(self.tokenizer, value)
            episode.ids, episode.prompt_len = list(prompt), len(prompt)
            self._next_turn(i)
        elif self._play_answer(i, value):
            self._next_turn(i)

    def _next_turn(self, i: int) -> None:
        """Submit episode ``i``'s next model turn, or end it when another full turn would not fit."""
        episode = self.episodes[i]
        if self.turns[i] >= self.envs[i].max_turns:
            _end(episode, "turn_limit")
        elif len(episode.ids) + self.max_new_tokens > self.max_context:
            _end(episode, "context")
        else:
            self.stream.submit(i, episode.ids, self.seed_of(i, self.turns[i]))

    def model_turn(self, i: int, completion: Completion) -> None:
        """Append a finished model turn as sampled and hand its text to the environment."""
        self.episodes[i].add(completion.response_ids, completion.logprobs)
        self.stopped[i] = completion.finish_reason == "stop"
        text = self.tokenizer.decode([t for t in completion.response_ids if t not in self.stop_ids])
        self.call(i, "step", self.envs[i].step, text)

    def _play_answer(self, i: int, result: Any) -> bool:
        """Record the environment's answer to turn ``turns[i]``; False when the episode ended."""
        episode, env = self.episodes[i], self.envs[i]
        episode.rewards.append(float(result.reward))
        self.turns[i] += 1
        if result.done:
            return _end(episode, "done")
        if self.turns[i] >= env.max_turns:
            return _end(episode, "turn_limit")
        observation = str(result.observation)
        if len(observation) > self.max_chars:
            logger.warning("environment %s answered %d characters: cut to %d", type(env).__name__,
                           len(observation), self.max_chars)  # fmt: skip
            observation = observation[: self.max_chars]
        episode.add(user_turn_ids(self.tokenizer, observation, self.stopped[i]), None)
        return True


def _end(episode: Episode, why: str) -> bool:
    episode.ended = why
    return False
