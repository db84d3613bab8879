"""Learner metrics: one JSON object per update in ``<run_dir>/metrics.jsonl`` and one human-readable log line."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any


class MetricsWriter:
    """Appends one JSON line per update (flushed, so ``monitor`` and ``tail -f`` see it at once)."""

    def __init__(self, run_dir: Path):
        run_dir.mkdir(parents=True, exist_ok=True)
        self.path = run_dir / "metrics.jsonl"
        self._file = self.path.open("a", encoding="utf-8")

    def drop_after(self, step: int) -> None:
        """Keep only the rows of updates up to ``step`` (a resumed run redoes the later ones)."""
        self._file.close()
        rows = self.path.read_text(encoding="utf-8").splitlines(keepends=True)
        kept = [row for row in rows if row.strip() and json.loads(row).get("step", 0) <= step]
        tmp = self.path.with_name(".tmp-metrics.jsonl")
        tmp.write_text("".join(kept), encoding="utf-8")
        tmp.replace(self.path)
        self._file = self.path.open("a", encoding="utf-8")

    def write(self, metrics: dict[str, Any]) -> None:
        clean = {
            k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in metrics.items()
        }
        self._file.write(json.dumps(clean, sort_keys=True) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def format_update_line(m: dict[str, Any]) -> str:
    """The per-update log line: throughput first, then learning signals."""
    return (
        f"update {m['step']} v{m['policy_version']} | {m['perf/samples_per_s']:.2f} samples/s "
        f"gen {m['perf/gen_tokens_per_s']:.0f} tok/s train {m['perf/train_tokens_per_s']:.0f} tok/s "
        f"busy {100 * m['perf/learner_busy_frac']:.0f}% | lag {m['lag/mean']:.2f}/{m['lag/max']:.0f} "
        f"buffer {m['buffer/depth']} dropped {m['lag/dropped']} | score {m['rollout/score_mean']:.3f} "
        f"kl {m['kl/ref_mean']:.4f} | sync {m['sync/ms']:.0f} ms"
    )
