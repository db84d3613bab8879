"""Built-in tasks: a prompt set and a reward ``(prompt, completion) -> float``; and the deterministic prompt sampler.

A reward that raises, or returns something that is not a finite number, scores its sequence NaN: the learner
counts and drops that sequence's group (``reject/bad_score``) and never trains on it.
"""

from __future__ import annotations

import logging
import math
import random
import re
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np

logger = logging.getLogger(__name__)

RewardFn = Callable[[str, str], float]


@dataclass(frozen=True)
class Task:
    name: str
    prompts: tuple[str, ...]
    reward: RewardFn
    description: str


_NUMBER = re.compile(r"-?\d+")


def _arithmetic_prompts(seed: int = 1234, count: int = 400) -> tuple[str, ...]:
    rng = random.Random(seed)
    return tuple(
        f"What is {rng.randint(2, 60)} + {rng.randint(2, 60)}? Answer with the number." for _ in range(count)
    )


def arithmetic_reward(prompt: str, completion: str) -> float:
    """1 when the completion's first number other than the two operands is the sum asked for, else 0.

    Small models restate the question ("9 + 2 = 11"): taking the first number would score that 0. Numbers after
    the answer do not count, so listing candidates does not pay.
    """
    a, b = (int(x) for x in _NUMBER.findall(prompt)[:2])
    answers = (int(x) for x in _NUMBER.findall(completion) if int(x) not in (a, b))
    return float(next(answers, None) == a + b)


_QUESTIONS = (
    "Describe the ocean.",
    "What do you like about mornings?",
    "Explain what a computer is.",
    "Tell me about cats.",
    "Why do people travel?",
    "What is music?",
    "Describe a forest.",
    "How do plants grow?",
    "What makes a good friend?",
    "Describe your favourite food.",
    "What is the moon?",
    "Explain rain to a child.",
    "Why is exercise healthy?",
    "What is a library?",
    "Describe a city at night.",
    "What is history?",
)


def length_reward(prompt: str, completion: str, target_words: int = 12) -> float:
    """1 at exactly ``target_words`` words, ``1 / (1 + |words - target| / target)`` elsewhere (never flat)."""
    words = len(completion.split())
    return 1.0 / (1.0 + abs(words - target_words) / target_words)


def letters_reward(prompt: str, completion: str) -> float:
    """Share of lowercase ASCII letters in the completion (for the tiny byte-level test model)."""
    return sum("a" <= ch <= "z" for ch in completion) / max(len(completion), 1)


TASKS: dict[str, Task] = {
    "arithmetic": Task(
        "arithmetic", _arithmetic_prompts(), arithmetic_reward, "two-number sums; 1 for the right answer"
    ),
    "length": Task("length", _QUESTIONS, length_reward, "answers of about 12 words score highest"),
    "letters": Task("letters", _QUESTIONS, letters_reward, "share of lowercase letters (tiny test model)"),
}


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}: built-in tasks are {', '.join(sorted(TASKS))}")
    return TASKS[name]


class RewardTimeout(Exception):
    pass


@contextmanager
def _time_limit(seconds: float) -> Iterator[None]:
    """Raise ``RewardTimeout`` in this thread after ``seconds`` (a SIGALRM timer; main thread, Unix only).

    Elsewhere (a worker thread, Windows) no limit applies. C code that never returns to Python cannot be
    interrupted this way; pure-Python loops and sleeps can.
    """
    if (
        seconds <= 0
        or threading.current_thread() is not threading.main_thread()
        or not hasattr(signal, "SIGALRM")
    ):
        yield
        return

    def expire(_signum, _frame):
        raise RewardTimeout(f"took longer than {seconds:g} s")

    # Another SIGALRM user (pytest-timeout, a user's own watchdog) gets its handler and the rest of its
    # timer back afterwards; a timer of its that would have fired meanwhile fires at once on restore.
    previous_handler = signal.signal(signal.SIGALRM, expire)
    previous_delay, previous_interval = signal.setitimer(signal.ITIMER_REAL, seconds)
    started = time.monotonic()
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous_handler)
        if previous_delay > 0:
            remaining = max(previous_delay - (time.monotonic() - started), 1e-3)
            signal.setitimer(signal.ITIMER_REAL, remaining, previous_interval)


def safe_score(reward: RewardFn, prompt: str, completion: str, timeout_s: float = 0.0) -> float:
    """The reward, or NaN when it raises, exceeds ``timeout_s`` (0: no limit) or is not finite (logged).

    A NaN score makes the learner drop the sequence's group (``reject/bad_score``): never trained on.
    """
    try:
        with _time_limit(timeout_s):
            value = float(reward(prompt, completion))
    except (
        Exception
    ) as e:  # a user reward function may fail in any way; the sequence is dropped, not the actor
        logger.warning(
            "reward function failed (%s: %s); sequence scored NaN and will be dropped", type(e).__name__, e
        )
        return math.nan
    return value if math.isfinite(value) else math.nan


class PromptSampler:
    """Deterministic, sharded prompt order: actor ``i`` of ``n`` takes every n-th prompt of a seeded shuffle."""

    def __init__(self, num_prompts: int, actor_id: int, num_actors: int, seed: int):
        order = np.random.default_rng(seed).permutation(num_prompts)
        self.indices = order[actor_id::num_actors] if num_prompts >= num_actors else order
        self.cursor = 0

    def next_indices(self, count: int) -> list[int]:
        out = [int(self.indices[(self.cursor + i) % len(self.indices)]) for i in range(count)]
        self.cursor += count
        return out
