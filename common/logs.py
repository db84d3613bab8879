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
