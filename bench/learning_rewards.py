"""Rewards of the learning benchmark (``bench/learning.py``): each built-in task's own reward, logged.

Every score is appended, with the wall-clock time it was computed at, to the JSONL file named by
``$MLX_PPO_REWARD_LOG`` (one ``{"t": unix seconds, "pid": ..., "scores": [...]}`` line per call). Our actors and
the peer trainers call the same functions, so reward-against-time curves are measured the same way for every
system: what the policy being trained sampled, scored when it was sampled.

Use as ``run.reward = "bench.learning_rewards:arithmetic"`` (batched: one log line per actor batch).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence
from typing import Any

from actors.builtin_tasks import arithmetic_reward, format_reward, length_reward

LOG_ENV = "MLX_PPO_REWARD_LOG"


def log_scores(scores: Sequence[float]) -> None:
    """Append ``scores`` with the current time to ``$MLX_PPO_REWARD_LOG`` (nothing when it is unset).

    One ``write`` of one line to a file opened for appending: lines from several processes do not interleave.
    """
    path = os.environ.get(LOG_ENV)
    if not path:
        return
    line = json.dumps({"t": time.time(), "pid": os.getpid(), "scores": [float(s) for s in scores]})
    with open(path, "a", encoding="utf-8") as f:
        f.write(line + "\n")


def arithmetic(prompts: Sequence[str], completions: Sequence[str]) -> list[float]:
    """``actors.builtin_tasks.arithmetic_reward`` of each sample, logged."""
    scores = [arithmetic_reward(p, c) for p, c in zip(prompts, completions, strict=True)]
    log_scores(scores)
    return scores


def length(prompts: Sequence[str], completions: Sequence[str]) -> list[float]:
    """``actors.builtin_tasks.length_reward`` of each sample, logged."""
    scores = [length_reward(p, c) for p, c in zip(prompts, completions, strict=True)]
    log_scores(scores)
    return scores


def format(
    prompts: Sequence[str],
    completions: Sequence[str],
    max_words: Sequence[Any] | None = None,
    json_keys: Sequence[Any] | None = None,
) -> list[float]:
    """``actors.builtin_tasks.format_reward`` of each sample with its prompt's extras (lists aligned with prompts)."""
    n = len(prompts)
    max_words, json_keys = max_words or [None] * n, json_keys or [None] * n
    scores = [
        format_reward(p, c, max_words=w or 0, json_keys=tuple(k or ()))
        for p, c, w, k in zip(prompts, completions, max_words, json_keys, strict=True)
    ]
    log_scores(scores)
    return scores


for _fn in (arithmetic, length, format):
    _fn.batched = True  # type: ignore[attr-defined]
