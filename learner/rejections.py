"""What the learner drops and why: every refused message counted under ``reject/<reason>`` and logged at most
every 10 s per reason (a flood must not flood the log), and a watch on batches of which nothing was accepted."""

from __future__ import annotations

import logging
import time
from collections import Counter

logger = logging.getLogger(__name__)
REJECT_LOG_INTERVAL_S = 10.0


class Rejections:
    """The learner's ``reject/...`` counters (checkpointed with it) and the rejected-whole watch."""

    def __init__(self) -> None:
        self.counters: Counter = Counter()
        self.rejected_in_a_row = 0  # batches of which no group was accepted (stale ones aside)
        self._next_log: dict[str, float] = {}

    def reject(self, reason: str, detail: str) -> None:
        """Count a dropped message; log it at most every ``REJECT_LOG_INTERVAL_S`` per reason."""
        key = f"reject/{reason}"
        self.counters[key] += 1
        now = time.monotonic()
        if now >= self._next_log.get(key, 0.0):
            self._next_log[key] = now + REJECT_LOG_INTERVAL_S
            logger.warning("rejected a message (%s, %d so far): %s", reason, self.counters[key], detail)

    def watch(self, rejected_whole: bool, buffer_counters: Counter) -> None:
        """A reward that fails on everything (or prompts that all go wrong) stalls a run without an update
        to report it: say so in the log after 3 fully rejected batches in a row, then every 10th."""
        self.rejected_in_a_row = self.rejected_in_a_row + 1 if rejected_whole else 0
        if self.rejected_in_a_row == 3 or (self.rejected_in_a_row and self.rejected_in_a_row % 10 == 0):
            reasons = {k: v for k, v in buffer_counters.items() if k.startswith("reject/")}
            hint = "check the reward function and the prompts"
            if set(reasons) == {"reject/zero_variance"}:
                hint = "every group scored alike (ppo.dynamic_sampling): the prompts are all too easy or too hard"
            logger.error(
                "the last %d batches were rejected whole (nothing to train on; %s): %s",
                self.rejected_in_a_row,
                reasons,
                hint,
            )
