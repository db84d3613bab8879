"""Multi-turn environments (issue 18, first part): the interface, a loader by name, the guessing game.

An environment is what a model talks to over several turns: a calculator, a game, a simulated user. It sees
and returns *text*; the episode runner (``actors/episodes.py``) keeps the *token ids*: what the model sampled is
appended as sampled, never decoded and re-encoded, and the environment's text is tokenised once, as the next
user turn of the model's chat template. A single-turn task is the one-turn case (``step`` returns done).

    class MyEnv:
        max_turns = 4
        def reset(self, record: dict) -> str: ...             # the first user message
        def step(self, action_text: str) -> StepResult: ...   # the answer to one model turn

Chosen by ``run.environment``: a registry name (``ENVIRONMENTS``: its class brings its own offline records from a
static ``records(seed=0, count=400)``) or ``module:Class`` (its records are ``run.prompts``' records). The class
is built with no arguments, once per episode: an instance runs one episode and is never reused.
"""

from __future__ import annotations

import importlib
import random
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from common.config import Config

ENVIRONMENTS = {
    "guess_number": "actors.environments:GuessTheNumber",
    "calculator": "actors.tool_environments:Calculator",
    "python": "actors.tool_environments:PythonTool",
}
"""``run.environment`` names and the class each stands for (imported when used, by its ``module:Class``)."""


@dataclass(frozen=True)
class StepResult:
    """What an environment answers to one model turn."""

    observation: str
    """The next user turn (ignored when ``done``)."""
    reward: float = 0.0
    """This turn's reward; an episode's return is the sum (PPO can use them per turn)."""
    done: bool = False
    info: dict[str, Any] = field(default_factory=dict)


class Environment(Protocol):
    max_turns: int
    """Model turns at most; the runner ends the episode after that many (counted as ``turn_limit``)."""

    def reset(self, record: dict[str, Any]) -> str: ...

    def step(self, action_text: str) -> StepResult: ...


class OneTurn:
    """A single-turn task as an environment: the record's ``prompt`` is the first message, the model answers
    once, and ``reward(prompt, answer)`` is the episode's return. Built by ``one_turn``; the actor's single-turn
    path (``actors/rollout.py``, batched reward functions) samples and scores the same way, faster."""

    max_turns = 1

    @staticmethod
    def reward(prompt: str, completion: str) -> float:
        raise NotImplementedError("build the class with one_turn(reward)")

    def reset(self, record: dict[str, Any]) -> str:
        self.prompt = str(record["prompt"])
        return self.prompt

    def step(self, action_text: str) -> StepResult:
        return StepResult("", reward=float(self.reward(self.prompt, action_text)), done=True)


def one_turn(reward: Callable[[str, str], float]) -> type:
    """The ``OneTurn`` environment class of a per-sample reward function ``(prompt, completion) -> float``."""
    return type("OneTurn", (OneTurn,), {"reward": staticmethod(reward)})


def load_environment(spec: str) -> type:
    """The environment class a registry name (``ENVIRONMENTS``) or ``module:Class`` names; ValueError saying
    what is wrong when it cannot be imported or lacks ``reset``, ``step`` or a ``max_turns`` of at least 1."""
    if ":" not in spec and spec not in ENVIRONMENTS:
        raise ValueError(
            f"environment {spec!r}: not a registry name ({', '.join(sorted(ENVIRONMENTS))}); "
            "or use module:Class"
        )
    module_name, _, class_name = ENVIRONMENTS.get(spec, spec).partition(":")
    if not module_name or not class_name:
        raise ValueError(f"environment {spec!r}: use module:Class")
    try:
        cls = getattr(importlib.import_module(module_name), class_name)
    except Exception as e:  # a user's module may fail to import in any way
        raise ValueError(f"environment {spec!r} not found: {type(e).__name__}: {e}") from e
    for method in ("reset", "step"):
        if not callable(getattr(cls, method, None)):
            raise ValueError(f"environment {spec!r} has no {method}() method")
    turns = getattr(cls, "max_turns", None)
    if not isinstance(turns, int) or isinstance(turns, bool) or turns < 1:
        raise ValueError(f"environment {spec!r}: max_turns={turns!r}, needs a class attribute int >= 1")
    return cls


def environment_problems(cfg: Config) -> list[str]:
    """What would stop actors from running ``cfg.run.environment``, found without loading a model: the class
    does not load, or it has no records (a ``module:Class`` without a static ``records()`` needs
    ``run.prompts``). For the launcher to check once before starting anything; no reward is needed."""
    r = cfg.run
    try:
        cls = load_environment(r.environment)
    except ValueError as e:
        return [f"run.environment: {e}"]
    if r.prompts and not r.prompts.startswith("hf:") and not Path(r.prompts).expanduser().is_file():
        return [f"run.prompts={r.prompts!r}: no such file"]
    if not r.prompts and not callable(getattr(cls, "records", None)):
        return [
            f"run.environment={r.environment!r} has no records of its own (a static records() method): set "
            "run.prompts to a .jsonl file of records (one object a line, each given to reset)"
        ]
    return []


_NUMBER = re.compile(r"-?\d+")


def _rules(low: int, high: int) -> str:
    return (
        f"I picked a whole number between {low} and {high}. Guess it: answer with one number. "
        "I will say 'higher' or 'lower' after each wrong guess."
    )


class GuessTheNumber:
    """Guess a secret integer in ``[low, high]``; each wrong guess is answered 'higher' or 'lower'.

    Record fields: ``secret``, ``low`` (default 1), ``high`` (default 100). Reward 1 on the turn the guess is
    right, 0 on a wrong guess, ``no_number_reward`` (-0.1) on a turn without a number, which is answered with the
    rules again: a small push towards answering in the game's format at all, which a model that rarely guesses
    right would otherwise get no signal for.
    """

    max_turns = 6
    no_number_reward = -0.1

    @staticmethod
    def records(seed: int = 0, count: int = 400) -> list[dict[str, Any]]:
        """``count`` games with secrets drawn from 1..10 (``low`` 1, ``high`` 10): small enough that the bundled
        135M model finds some within its six turns and learns in a short run. ``prompt`` is the first message
        (for logs; ``reset`` writes it from the other fields)."""
        rng = random.Random(seed)
        return [
            {"prompt": _rules(1, 10), "secret": rng.randint(1, 10), "low": 1, "high": 10}
            for _ in range(count)
        ]

    def reset(self, record: dict[str, Any]) -> str:
        self.secret, self.low, self.high = (
            int(record["secret"]),
            int(record.get("low", 1)),
            int(record.get("high", 100)),
        )
        return _rules(self.low, self.high)

    def step(self, action_text: str) -> StepResult:
        match = _NUMBER.search(action_text)
        if match is None:
            return StepResult(
                f"Answer with one number between {self.low} and {self.high}.",
                reward=self.no_number_reward,
                info={"no_number": 1},
            )
        guess = int(match.group())
        if guess == self.secret:
            return StepResult("Correct!", reward=1.0, done=True)
        return StepResult("higher" if guess < self.secret else "lower")
