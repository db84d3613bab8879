"""What a task is (``Task``: a prompt set and a reward ``(prompt, completion) -> float``) and the built-in ones.

A reward that raises, or returns something that is not a finite number, scores its sequence NaN: the learner
counts and drops that sequence's group (``reject/bad_score``) and never trains on it (``actors/scoring.py``).
"""

from __future__ import annotations

import functools
import json
import random
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

RewardFn = Callable[..., float]
"""``(prompt, completion, **extras) -> float``; extras are the prompt's extra fields the function names."""
Scorer = Callable[[Sequence[str], Sequence[str]], list[float]]
"""Scores a whole batch: ``(prompts, completions) -> scores``, NaN where the reward failed (``actors.scoring``)."""


class TaskSetupError(ValueError):
    """The task, its prompts or its reward cannot be used here; the message says why and how to fix it."""


@dataclass(frozen=True)
class Task:
    name: str
    prompts: tuple[str, ...]
    reward: RewardFn
    description: str
    extras: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    """Extra fields of a prompt (by its text), passed to the reward as keyword arguments it names."""
    scorer: Scorer | None = None
    """Set by ``resolve_task``: scores whole batches (the ``reward`` per sample, a batched function, a model)."""
    check: Callable[[], None] | None = None
    """Raises ``TaskSetupError`` when the task cannot run on this machine (a missing package)."""
    environment: type | None = None
    """With ``run.environment``: the environment class, built once per episode (``actors/episode_rollout.py``);
    its episodes' returns are the scores and ``reward`` is not used."""
    records: tuple[Mapping[str, Any], ...] = ()
    """With ``environment``: what each episode's ``reset`` gets (``prompts`` holds their "prompt" fields)."""


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


_OPINION_PROMPTS = (
    "Write a short review of a café you visited recently.",
    "What do you think of rainy days?",
    "Give your opinion of the last book you read.",
    "Review a pair of running shoes in two sentences.",
    "How was your weekend?",
    "What do you think about public transport in big cities?",
    "Write a one-paragraph review of a family holiday at the beach.",
    "Describe your experience with a new phone.",
    "What is your opinion of homework?",
    "Review a pizza restaurant for a friend.",
    "How do you feel about Monday mornings?",
    "Write a short review of a concert you went to.",
    "What do you think of working from home?",
    "Give your honest opinion of a hotel stay.",
    "How do you feel about winter?",
    "Review a video game you played.",
)


@functools.cache
def _vader() -> Any:
    try:
        from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer
    except ImportError as e:
        raise TaskSetupError(
            "the sentiment task needs the vaderSentiment package: pip install vaderSentiment"
        ) from e
    return SentimentIntensityAnalyzer()  # reads its ~7,500-word lexicon once


def sentiment_reward(prompt: str, completion: str) -> float:
    """VADER's compound sentiment of the completion mapped to [0, 1]: 1 most positive, 0.5 neutral or empty."""
    return (_vader().polarity_scores(completion)["compound"] + 1.0) / 2.0


def _check_vader() -> None:
    _vader()


# Built-in format prompts; each one's format is its extras (the reward's keyword arguments), not parsed text.
_FORMAT_PROMPTS: dict[str, dict[str, Any]] = {
    f"In one sentence of at most {n} words ending with a period: {q}": {"max_words": n}
    for n, q in [
        (8, "what is the sun?"),
        (10, "why do birds sing?"),
        (12, "what is a computer?"),
        (8, "what is rain?"),
        (10, "why do we sleep?"),
        (12, "how does a bicycle work?"),
        (8, "what is bread?"),
        (10, "what is a library for?"),
    ]
} | {
    f"Reply with only a JSON object with the keys {' and '.join(map(json.dumps, keys))} for {what}.": {
        "json_keys": keys
    }
    for keys, what in [
        (["name", "color"], "a fictional cat"),
        (["city", "country"], "a place you would like to visit"),
        (["title", "year"], "a film"),
        (["name", "age", "job"], "a fictional person"),
        (["fruit", "price"], "an item at a market"),
        (["question", "answer"], "a simple quiz"),
    ]
}


def _json_object(text: str) -> Any:
    text = text.strip()
    if text.startswith("```"):  # models like to fence JSON; the fence is not the format's fault
        text = text.strip("`").removeprefix("json").strip()
    try:
        return json.loads(text)
    except ValueError:
        return None


def format_reward(prompt: str, completion: str, max_words: int = 0, json_keys: Sequence[str] = ()) -> float:
    """Score how well ``completion`` follows the asked format, in [0, 1].

    With ``json_keys``: 0 unless the whole answer is a JSON object; then 0.4 + 0.6 x (share of the keys present),
    scaled down by keys that were not asked for. Otherwise: half for ending with a period, half for at most
    ``max_words`` words (0: any number), decaying as ``max_words / words`` beyond. An empty answer scores 0.
    """
    if json_keys:
        obj = _json_object(completion)
        if not isinstance(obj, dict):
            return 0.0
        wanted = set(json_keys)
        return (0.4 + 0.6 * len(wanted & obj.keys()) / len(wanted)) * len(wanted) / len(wanted | obj.keys())
    words = len(completion.split())
    if not words:
        return 0.0
    within = 1.0 if not max_words or words <= max_words else max_words / words
    return 0.5 * completion.rstrip().endswith(".") + 0.5 * within


TASKS: dict[str, Task] = {
    "arithmetic": Task(
        "arithmetic", _arithmetic_prompts(), arithmetic_reward, "two-number sums; 1 for the right answer"
    ),
    "length": Task("length", _QUESTIONS, length_reward, "answers of about 12 words score highest"),
    "letters": Task("letters", _QUESTIONS, letters_reward, "share of lowercase letters (tiny test model)"),
    "sentiment": Task(
        "sentiment",
        _OPINION_PROMPTS,
        sentiment_reward,
        "reviews and opinions; VADER's positive sentiment scores highest",
        check=_check_vader,
    ),
    "format": Task(
        "format",
        tuple(_FORMAT_PROMPTS),
        format_reward,
        "short sentences ending with a period, or JSON objects with the asked keys",
        extras=_FORMAT_PROMPTS,
    ),
}
