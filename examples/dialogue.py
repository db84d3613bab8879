"""Dialogue: everyday requests in, replies out; rewarded for politeness and staying on topic.

``python -m examples.dialogue [--model tiny] [--max-updates 2]`` scores with a heuristic; with
``--reward-model PATH`` it scores with a learned reward model instead (train one on the bundled preference
pairs: ``python launch.py train-rm --pairs examples/data/preference_pairs.jsonl --out runs/rm``).
"""

from __future__ import annotations

import logging
import re
import sys
from pathlib import Path

from examples.runner import ExampleTrainer, example_main
from examples.summarization import content_words

logger = logging.getLogger(__name__)

_POLITE = re.compile(
    r"\b(please|thank(s| you)|sorry|glad|happy to|hope|certainly|of course|welcome|good luck)\b"
)
_RUDE = re.compile(
    r"\b(stupid|idiot|dumb|shut up|whatever|go away|not my problem|nonsense|deal with it|your own fault)\b"
)


def politeness(text: str) -> float:
    """Polite phrases count up (two are enough for 1), rude ones count down, in [-1, 1]."""
    lower = text.lower()
    return max(-1.0, min(1.0, len(_POLITE.findall(lower)) / 2) - len(_RUDE.findall(lower)))


def relevance(prompt: str, reply: str) -> float:
    """Share of the request's content words (at most 4 needed) that the reply takes up."""
    asked, said = set(content_words(prompt)), set(content_words(reply))
    return min(1.0, len(asked & said) / max(1, min(len(asked), 4)))


def dialogue_reward(prompt: str, completion: str) -> float:
    """``0.5 relevance + 0.3 politeness + 0.2 length`` in [-0.3, 1]; length: 1 for 8-80 words, less outside."""
    words = len(completion.split())
    if not words:
        return 0.0
    length = 1.0 if 8 <= words <= 80 else min(words / 8, 80 / words)
    return 0.5 * relevance(prompt, completion) + 0.3 * politeness(completion) + 0.2 * length


class DialogueTrainer(ExampleTrainer):
    """Train a model to answer everyday requests politely and on topic (heuristic or learned reward)."""

    name = "dialogue"
    data = "dialogue.jsonl"
    reward = "examples.dialogue:dialogue_reward"

    def __init__(self, *args, reward_model: str | Path | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        if reward_model:  # an instance setting: the class default stays the heuristic
            self.reward = f"rm:{Path(reward_model).expanduser().resolve()}"


def main(argv: list[str]) -> int:
    return example_main(DialogueTrainer, argv, **{"--reward-model": "a reward model folder (rm:PATH)"})


if __name__ == "__main__":
    from common.logs import setup_logging

    setup_logging("example")
    raise SystemExit(main(sys.argv[1:]))
