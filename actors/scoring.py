"""Scoring with a reward function: a time limit per sample, NaN for a failure, per-sample and batched scorers.

Every reward is used through a ``Scorer`` (``(prompts, completions) -> list[float]``): NaN where the reward raised,
ran past its time limit or gave a non-finite number (logged; the learner drops that group). Both the actor and a
reward plugin's child process (``actors/reward_process.py``) score through these.
"""

from __future__ import annotations

import importlib
import inspect
import logging
import math
import signal
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

from actors.builtin_tasks import RewardFn, TaskSetupError

logger = logging.getLogger(__name__)


class RewardTimeout(Exception):
    pass


@contextmanager
def time_limit(seconds: float) -> Iterator[None]:
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
        with time_limit(timeout_s):
            value = float(reward(prompt, completion))
    except (
        Exception
    ) as e:  # a user reward function may fail in any way; the sequence is dropped, not the actor
        logger.warning(
            "reward function failed (%s: %s); sequence scored NaN and will be dropped", type(e).__name__, e
        )
        return math.nan
    if not math.isfinite(value):
        logger.warning("reward function returned %r; sequence scored NaN and will be dropped", value)
        return math.nan
    return value


def import_function(spec: str) -> Callable[..., Any]:
    """The function ``module:function`` names; a clear TaskSetupError when it cannot be had."""
    module_name, _, name = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except Exception as e:  # a user module may fail to import in any way
        raise TaskSetupError(
            f"run.reward={spec!r}: cannot import {module_name!r} ({type(e).__name__}: {e}); the actors must be "
            "able to import it: install it, keep it in this repository, or put its folder on PYTHONPATH"
        ) from e
    fn = getattr(module, name, None)
    if not callable(fn):
        raise TaskSetupError(f"run.reward={spec!r}: {module_name} has no function {name!r}")
    return fn


def _extra_names(fn: Callable[..., Any]) -> set[str] | None:
    """The extras ``fn`` takes by name beyond its first two arguments; None: all (it has ``**kwargs``)."""
    try:
        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):  # some builtins have no signature: give them nothing extra
        return set()
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return None
    return {p.name for p in params[2:] if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}


def _finite(value: Any) -> float:
    try:
        value = float(value)
    except (TypeError, ValueError):
        return math.nan
    return value if math.isfinite(value) else math.nan


class PerSampleScorer:
    """Scores a batch one sample at a time through ``safe_score`` (its time limit, NaN on failure)."""

    def __init__(self, fn: RewardFn, extras: Mapping[str, Mapping[str, Any]], timeout_s: float):
        self.fn, self.extras, self.timeout_s, self.names = fn, extras, timeout_s, _extra_names(fn)

    def _kwargs(self, prompt: str) -> dict[str, Any]:
        fields = self.extras.get(prompt, {})
        return {k: v for k, v in fields.items() if self.names is None or k in self.names}

    def __call__(self, prompts: Sequence[str], completions: Sequence[str]) -> list[float]:
        scores = []
        for prompt, completion in zip(prompts, completions, strict=True):
            kwargs = self._kwargs(prompt)
            reward = (lambda p, c, kw=kwargs: self.fn(p, c, **kw)) if kwargs else self.fn
            scores.append(safe_score(reward, prompt, completion, self.timeout_s))
        return scores


class BatchedScorer:
    """Scores a batch in one call; the call failing, running past ``timeout_s`` x batch size or returning the
    wrong number of scores makes the whole batch NaN (logged), a non-finite score only its own sample."""

    def __init__(self, fn: Callable[..., Any], extras: Mapping[str, Mapping[str, Any]], timeout_s: float):
        self.fn, self.extras, self.timeout_s, self.names = fn, extras, timeout_s, _extra_names(fn)

    def _kwargs(self, prompts: Sequence[str]) -> dict[str, list[Any]]:
        present = {k for p in prompts for k in self.extras.get(p, {})}
        wanted = present if self.names is None else present & self.names
        return {k: [self.extras.get(p, {}).get(k) for p in prompts] for k in sorted(wanted)}

    def __call__(self, prompts: Sequence[str], completions: Sequence[str]) -> list[float]:
        n = len(prompts)
        try:
            with time_limit(self.timeout_s * n):
                values = list(self.fn(list(prompts), list(completions), **self._kwargs(prompts)))
            if len(values) != n:
                raise ValueError(f"returned {len(values)} scores for {n} completions")
        except Exception as e:  # a user reward may fail in any way: the batch is dropped, not the actor
            logger.warning("batched reward failed (%s: %s); %d sequences scored NaN", type(e).__name__, e, n)
            return [math.nan] * n
        scores = [_finite(v) for v in values]
        if bad := sum(math.isnan(s) for s in scores):
            logger.warning("batched reward gave %d non-finite score(s) of %d; scored NaN", bad, n)
        return scores
