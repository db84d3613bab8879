"""Multi-turn environments (issue 18, first part): the interface, a loader by name, the guessing game.

An environment is what a model talks to over several turns: a calculator, a game, a simulated user. It sees
and returns *text*; the episode runner (``actors/episodes.py``) keeps the *token ids*: what the model sampled is
appended as sampled, never decoded and re-encoded, and the environment's text is tokenised once, as the next
user turn of the model's chat template. A single-turn task is the one-turn case (``step`` returns done).

    class MyEnv:
        max_turns = 4
        def reset(self, record: dict) -> str: ...             # the first user message
        def step(self, action_text: str) -> StepResult: ...   # the answer to one model turn

Loaded like rewards, by ``module:Class`` (``load_environment``); the class is built with no arguments and one
instance runs one episode at a time.
"""

from __future__ import annotations

import importlib
import re
from dataclasses import dataclass, field
from typing import Any, Protocol


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


def load_environment(spec: str) -> type:
    """The environment class named ``module:Class`` (a clear error when it does not exist)."""
    module_name, _, class_name = spec.partition(":")
    if not module_name or not class_name:
        raise ValueError(f"environment {spec!r}: use module:Class")
    try:
        cls = getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"environment {spec!r} not found: {e}") from e
    for method in ("reset", "step"):
        if not callable(getattr(cls, method, None)):
            raise ValueError(f"environment {spec!r} has no {method}() method")
    return cls


_NUMBER = re.compile(r"-?\d+")


class GuessTheNumber:
    """Guess a secret integer in ``[low, high]``; each wrong guess is answered 'higher' or 'lower'.

    Record fields: ``secret``, ``low`` (default 1), ``high`` (default 100). Reward 1 on the turn the guess is
    right, 0 otherwise; a turn without a number is answered with the rules again.
    """

    max_turns = 6

    def reset(self, record: dict[str, Any]) -> str:
        self.secret, self.low, self.high = (
            int(record["secret"]),
            int(record.get("low", 1)),
            int(record.get("high", 100)),
        )
        return (
            f"I picked a whole number between {self.low} and {self.high}. Guess it: answer with one number. "
            "I will say 'higher' or 'lower' after each wrong guess."
        )

    def step(self, action_text: str) -> StepResult:
        match = _NUMBER.search(action_text)
        if match is None:
            return StepResult(
                f"Answer with one number between {self.low} and {self.high}.", info={"no_number": 1}
            )
        guess = int(match.group())
        if guess == self.secret:
            return StepResult("Correct!", reward=1.0, done=True)
        return StepResult("higher" if guess < self.secret else "lower")
