"""``Ragged``: rows of different lengths as one flat NumPy array and its offsets (how the wire carries them).

An experience message concatenates every sequence's tokens (and per-token log-probs) into one array; ``Ragged``
keeps them that way, so no row is ever copied into a Python list, and pads them into ``[B, width]`` only where a
model needs a rectangle.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Ragged:
    """``B`` rows: row ``b`` is ``values[offsets[b] : offsets[b + 1]]``; ``offsets`` is ``[B + 1]`` int64 from 0."""

    values: np.ndarray
    offsets: np.ndarray

    @classmethod
    def from_lengths(cls, values: np.ndarray, lengths: Sequence[int] | np.ndarray) -> Ragged:
        """Rows of ``lengths`` laid end to end in ``values`` (which holds exactly ``sum(lengths)``)."""
        offsets = np.concatenate([[0], np.cumsum(np.asarray(lengths, np.int64))]).astype(np.int64)
        if offsets[-1] != len(values):
            raise ValueError(f"{len(values)} values do not split into rows of {int(offsets[-1])} in all")
        return cls(np.asarray(values), offsets)

    @classmethod
    def from_rows(cls, rows: Sequence[Sequence], dtype: type = np.float32) -> Ragged:
        """Rows given one by one (lists or arrays), stored as ``dtype``."""
        lengths = [len(r) for r in rows]
        parts = [np.asarray(r, dtype) for r in rows]
        return cls.from_lengths(np.concatenate(parts) if parts else np.zeros(0, dtype), lengths)

    @classmethod
    def concat(cls, parts: Sequence[Ragged]) -> Ragged:
        """The rows of ``parts``, in order."""
        lengths = np.concatenate([p.lengths for p in parts])
        return cls.from_lengths(np.concatenate([p.values for p in parts]), lengths)

    @property
    def lengths(self) -> np.ndarray:
        """``[B]`` int64 row lengths."""
        return np.diff(self.offsets)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, row: int) -> np.ndarray:
        """Row ``row`` (a view of ``values``)."""
        return self.values[self.offsets[row] : self.offsets[row + 1]]

    def __iter__(self) -> Iterator[np.ndarray]:
        return (self[b] for b in range(len(self)))

    def select(self, rows: np.ndarray | slice) -> Ragged:
        """The rows ``rows`` (an index array or a slice), in that order."""
        picked = np.arange(len(self))[rows]
        starts, lengths = self.offsets[picked], self.lengths[picked]
        within = np.arange(int(lengths.sum())) - np.repeat(np.cumsum(lengths) - lengths, lengths)
        return Ragged.from_lengths(self.values[np.repeat(starts, lengths) + within], lengths)

    def with_values(self, values: np.ndarray) -> Ragged:
        """The same rows holding ``values`` instead (``values`` as long as ``self.values``)."""
        if len(values) != len(self.values):
            raise ValueError(f"{len(values)} values for rows of {len(self.values)}")
        return Ragged(np.asarray(values), self.offsets)

    def padded(self, width: int, start: np.ndarray | None = None, fill: float = 0) -> np.ndarray:
        """``[B, width]``: each row from its ``start[b]``-th value (default 0) on, cut at ``width``, then ``fill``."""
        start = np.zeros(len(self), np.int64) if start is None else np.asarray(start, np.int64)
        steps = np.arange(width)
        inside = steps[None] < (self.lengths - start)[:, None]
        at = np.where(inside, self.offsets[:-1, None] + start[:, None] + steps[None], 0)
        out = np.full((len(self), width), fill, self.values.dtype)
        out[inside] = self.values[at[inside]]
        return out
