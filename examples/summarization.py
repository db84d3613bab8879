"""Summarization: short passages in, one-sentence summaries out; rewarded for grounded coverage and brevity.

``python -m examples.summarization [--model tiny] [--max-updates 2]``; the prompts are
``examples/data/summarization.jsonl`` (``"prompt"`` plus the ``"passage"`` and a ``"max_words"`` budget, which
the reward takes as keyword arguments).
"""

from __future__ import annotations

import logging
import re
import sys
from collections import Counter

from examples.runner import ExampleTrainer, example_main

logger = logging.getLogger(__name__)

_WORD = re.compile(r"[a-z]+")
_STOPWORD_TEXT = (
    "about above after again also among been before being below between both could does doing down during each "
    "every from further have having here into itself just more most much next only other over same should some "
    "such than that their them then there these they this those through under until very were what when where "
    "which while will with within would your year years"
)
_STOPWORDS = frozenset(_STOPWORD_TEXT.split())


def content_words(text: str) -> list[str]:
    """Lower-case words of four letters or more that carry meaning (a small stop-word list removed)."""
    return [w for w in _WORD.findall(text.lower()) if len(w) >= 4 and w not in _STOPWORDS]


def key_words(passage: str, count: int = 8) -> set[str]:
    """The passage's ``count`` most frequent content words (ties: first seen first)."""
    return {w for w, _ in Counter(content_words(passage)).most_common(count)}


def summary_reward(prompt: str, completion: str, passage: str = "", max_words: int = 30) -> float:
    """In [0, 1]: ``(coverage + precision) / 2 x brevity``.

    coverage: share of the passage's key words the summary uses; precision: share of the summary's content
    words found in the passage (words made up do not pay); brevity: 1 up to ``max_words`` words, then
    ``max_words / words`` (copying the passage is long, so it does not pay either). Empty: 0.
    """
    passage = passage or prompt
    summary = content_words(completion)
    if not summary:
        return 0.0
    source = set(content_words(passage))
    keys = key_words(passage)
    coverage = len(keys & set(summary)) / max(len(keys), 1)
    precision = sum(w in source for w in summary) / len(summary)
    words = len(completion.split())
    brevity = 1.0 if words <= max_words else max_words / words
    return (coverage + precision) / 2 * brevity


class SummarizationTrainer(ExampleTrainer):
    """Train a model to summarize passages in one short sentence (lexical-overlap + brevity reward)."""

    name = "summarization"
    data = "summarization.jsonl"
    reward = "examples.summarization:summary_reward"


def main(argv: list[str]) -> int:
    return example_main(SummarizationTrainer, argv)


if __name__ == "__main__":
    from common.logs import setup_logging

    setup_logging("example")
    raise SystemExit(main(sys.argv[1:]))
