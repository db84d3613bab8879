"""Reading a run's ``metrics.jsonl`` while a learner appends to it: the rows so far, only new bytes each time.

The terminal monitor, the charts and the Python API (``mlx_ppo``) all read metrics through this.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)


class MetricsTail:
    """Reads ``metrics.jsonl`` as it grows, only the new bytes each time.

    A partially written last line is left for the next read. A file replaced by a resumed learner (which drops
    the rows of lost updates) or truncated is read again from the start.
    """

    def __init__(self, path: Path):
        self.path = path
        self.rows: list[dict[str, Any]] = []
        self._offset = 0
        self._inode: int | None = None

    def read(self) -> list[dict[str, Any]]:
        """All complete rows so far (an empty list while the file does not exist yet)."""
        try:
            st = self.path.stat()
            if st.st_ino != self._inode or st.st_size < self._offset:
                self.rows, self._offset, self._inode = [], 0, st.st_ino
            with self.path.open("rb") as f:
                f.seek(self._offset)
                data = f.read()
        except FileNotFoundError:
            return self.rows
        head, newline, _partial = data.rpartition(b"\n")
        if newline:
            self._offset += len(head) + 1
            self.rows.extend(_parse_lines(head))
        return self.rows


def _parse_lines(data: bytes) -> list[dict[str, Any]]:
    rows = []
    for line in data.splitlines():
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except ValueError:  # a row cut by a crash mid-write and then appended to: skip it, keep the rest
            logger.debug("skipping a malformed metrics row: %r", line[:80])
    return rows


def read_rows(path: Path) -> list[dict[str, Any]]:
    """The complete rows of a ``metrics.jsonl`` (a partial last line is left out)."""
    return MetricsTail(path).read()
