"""Logging setup for every process: one format carrying role, index and pid, because processes share a terminal."""

from __future__ import annotations

import logging
import os
import sys

LOG_FORMAT = "%(asctime)s [%(role)s][pid %(process)d] %(levelname)s %(name)s: %(message)s"


def setup_logging(role: str, level: int | str | None = None) -> None:
    """Configure the root logger for a process of ``role`` (e.g. 'learner-0', 'actor-3', 'launcher').

    Level comes from ``level``, else $MLX_PPO_LOG_LEVEL, else INFO. Only process entry points call this.
    """
    level = level or os.environ.get("MLX_PPO_LOG_LEVEL", "INFO")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(LOG_FORMAT, datefmt="%H:%M:%S"))
    handler.addFilter(_RoleFilter(role))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)


class _RoleFilter(logging.Filter):
    def __init__(self, role: str):
        super().__init__()
        self.role = role

    def filter(self, record: logging.LogRecord) -> bool:
        record.role = self.role
        return True


class RateLimitFilter(logging.Filter):
    """Lets at most ``burst`` records of one message template through per ``interval_s``; the next one let
    through says how many were held back. For loggers whose messages a peer's input can trigger at will (bad
    frames, dropped batches, refused keys): a flood must not become a flood of log lines."""

    def __init__(self, interval_s: float = 10.0, burst: int = 5):
        super().__init__()
        self.interval_s, self.burst = interval_s, burst
        self.windows: dict[str, list[float]] = {}  # template -> [window end, passed, held back]

    def filter(self, record: logging.LogRecord) -> bool:
        import time

        now = time.monotonic()
        key = str(record.msg)[:200]
        window = self.windows.get(key)
        if window is None or now >= window[0]:
            held = window[2] if window else 0
            if len(self.windows) > 1000:  # templates come from code, but be safe
                self.windows.clear()
            self.windows[key] = window = [now + self.interval_s, 0, 0]
            if held:
                record.msg = f"{record.msg} ({int(held)} more like this held back)"
        window[1] += 1
        if window[1] > self.burst:
            window[2] += 1
            return False
        return True
