"""Learner metrics: one JSON object per update in ``<run_dir>/metrics.jsonl`` and one human-readable log line.

TensorBoard and W&B are optional extra sinks, imported only when a run asks for them, so neither is a
dependency: ``MetricsWriter(run_dir, sinks=("tensorboard", "wandb"))``.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Sequence
from numbers import Real
from pathlib import Path
from typing import Any, Final, Protocol

logger = logging.getLogger(__name__)
SINKS: Final = ("tensorboard", "wandb")
"""Names ``MetricsWriter(sinks=...)`` accepts besides the JSONL file, which is always written."""


class MetricsSink(Protocol):
    """Somewhere else the per-update scalars go (mlx-lm's ``TrainingCallback`` dict interface)."""

    def log(self, step: int, metrics: dict[str, float]) -> None: ...

    def drop_after(self, step: int) -> None: ...

    def close(self) -> None: ...


def _scalars(metrics: dict[str, Any]) -> dict[str, float]:
    """The finite numbers of one row, without ``step`` (the sinks take it as their x axis)."""
    return {
        k: float(v)
        for k, v in metrics.items()
        if k != "step" and isinstance(v, Real) and not isinstance(v, bool) and math.isfinite(v)
    }


def _row(line: str) -> dict[str, Any] | None:
    """One metrics row, or None for a line that is not one (torn by a crash or a full disk)."""
    try:
        row = json.loads(line)
    except ValueError:
        return None
    return row if isinstance(row, dict) else None


def _cut_torn_tail(path: Path) -> None:
    """Cut a last line that has no newline (a write interrupted by a crash or a full disk): appending after it
    would glue the next row onto it."""
    if not path.exists() or path.stat().st_size == 0:
        return
    with path.open("rb+") as f:
        data = f.read()
        if not data.endswith(b"\n"):
            cut = data.rfind(b"\n") + 1
            logger.warning("%s: cut a torn last line of %d bytes", path, len(data) - cut)
            f.truncate(cut)


def _summary_writer_class() -> type:
    """tensorboardX's ``SummaryWriter`` (small), else PyTorch's; both take the same arguments."""
    try:
        from tensorboardX import SummaryWriter

        return SummaryWriter
    except ImportError:
        pass
    try:
        from torch.utils.tensorboard import SummaryWriter

        return SummaryWriter
    except ImportError as err:
        raise ImportError(
            "metrics sink 'tensorboard' needs tensorboardX (or PyTorch with tensorboard): "
            "pip install tensorboardX"
        ) from err


class TensorBoardSink:
    """Scalars as TensorBoard event files in ``<run_dir>/tensorboard`` (``tensorboard --logdir`` it)."""

    def __init__(self, run_dir: Path):
        self._writer_class = _summary_writer_class()
        self.logdir = run_dir / "tensorboard"
        self._writer = self._writer_class(str(self.logdir))

    def log(self, step: int, metrics: dict[str, float]) -> None:
        for key, value in metrics.items():
            self._writer.add_scalar(key, value, step)
        self._writer.flush()  # updates are seconds apart: a live TensorBoard should see each one

    def drop_after(self, step: int) -> None:
        """A resumed run redoes later updates: ``purge_step`` makes TensorBoard hide their old points."""
        self._writer.close()
        self._writer = self._writer_class(str(self.logdir), purge_step=step + 1)

    def close(self) -> None:
        self._writer.close()


class WandbSink:
    """Scalars to W&B, one W&B run per learner start (``WANDB_MODE=offline`` keeps them local)."""

    def __init__(self, run_dir: Path, config: dict[str, Any] | None, project: str):
        try:
            import wandb
        except ImportError as err:
            raise ImportError("metrics sink 'wandb' needs the wandb package: pip install wandb") from err
        self._run = wandb.init(project=project, dir=str(run_dir), name=run_dir.name, config=config or {})

    def log(self, step: int, metrics: dict[str, float]) -> None:
        self._run.log(metrics, step=step)

    def drop_after(self, step: int) -> None:
        """Nothing to do: W&B cannot rewrite history, and a resumed learner starts a new W&B run anyway."""

    def close(self) -> None:
        self._run.finish()


def _make_sink(name: str, run_dir: Path, config: dict[str, Any] | None, project: str) -> MetricsSink:
    if name == "tensorboard":
        return TensorBoardSink(run_dir)
    return WandbSink(run_dir, config, project)


class MetricsWriter:
    """Appends one JSON line per update (flushed, so ``monitor`` and ``tail -f`` see it at once).

    Args:
        sinks: extra destinations from ``SINKS``; a missing package raises ``ImportError`` naming it here, at
            start-up, not at the first update.
        config: the resolved config as a dict, recorded by W&B with the run.
        project: the W&B project.
    """

    def __init__(
        self,
        run_dir: Path,
        sinks: Sequence[str] = (),
        config: dict[str, Any] | None = None,
        project: str = "mlx-ppo",
    ):
        unknown = sorted(set(sinks) - set(SINKS))
        if unknown:
            raise ValueError(f"unknown metrics sinks {unknown}; choose from {list(SINKS)}")
        run_dir.mkdir(parents=True, exist_ok=True)
        self.sinks: list[MetricsSink] = []
        try:
            for name in dict.fromkeys(sinks):  # each once, in the order given
                self.sinks.append(_make_sink(name, run_dir, config, project))
        except BaseException:
            self._close_sinks()
            raise
        self.path = run_dir / "metrics.jsonl"
        _cut_torn_tail(self.path)
        self._file = self.path.open("a", encoding="utf-8")

    def drop_after(self, step: int) -> None:
        """Keep only the rows of updates up to ``step`` (a resumed run redoes the later ones)."""
        self._file.close()
        rows = [_row(line) for line in self.path.read_text(encoding="utf-8", errors="replace").splitlines()]
        kept = [
            json.dumps(r, sort_keys=True) + "\n" for r in rows if r is not None and r.get("step", 0) <= step
        ]
        tmp = self.path.with_name(".tmp-metrics.jsonl")
        tmp.write_text("".join(kept), encoding="utf-8")
        tmp.replace(self.path)
        self._file = self.path.open("a", encoding="utf-8")
        for sink in self.sinks:
            sink.drop_after(step)

    def write(self, metrics: dict[str, Any]) -> None:
        clean = {
            k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in metrics.items()
        }
        self._file.write(json.dumps(clean, sort_keys=True) + "\n")
        self._file.flush()
        if self.sinks:
            scalars = _scalars(metrics)
            for sink in self.sinks:
                sink.log(int(metrics["step"]), scalars)

    def close(self) -> None:
        self._file.close()
        self._close_sinks()

    def _close_sinks(self) -> None:
        for sink in self.sinks:
            sink.close()


def format_duration(seconds: float) -> str:
    """``42s``, ``5m07s``, ``3h05m``: short enough for a log line, exact enough for an ETA."""
    s = round(max(seconds, 0.0))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def eta_s(m: dict[str, Any], max_updates: int, resumed_step: int = 0) -> float | None:
    """Seconds left at this process's mean time per update; ``None`` before there is one to go by.

    ``time_s`` counts from this learner's start, so a resumed learner's rate counts only its own updates.
    """
    done = m["step"] - resumed_step
    if done <= 0 or m.get("time_s") is None:
        return None
    return m["time_s"] / done * max(max_updates - m["step"], 0)


def format_update_line(m: dict[str, Any], max_updates: int | None = None, resumed_step: int = 0) -> str:
    """The per-update log line: progress, throughput, then learning signals, then the ETA.

    Args:
        max_updates: ``run.max_updates``; with it the line reads ``update 3/20`` and ends with an ETA.
        resumed_step: the update count a resumed learner started from (its ETA uses only its own updates).
    """
    progress = f"update {m['step']}" if max_updates is None else f"update {m['step']}/{max_updates}"
    kl = f"{m['kl/ref_mean']:.4f}" if "kl/ref_mean" in m else "-"  # no reference pass when no KL term is on
    line = (
        f"{progress} v{m['policy_version']} | {m['perf/samples_per_s']:.2f} samples/s "
        f"gen {m['perf/gen_tokens_per_s']:.0f} tok/s train {m['perf/train_tokens_per_s']:.0f} tok/s "
        f"busy {100 * m['perf/learner_busy_frac']:.0f}% | lag {m['lag/mean']:.2f}/{m['lag/max']:.0f} "
        f"buffer {m['buffer/depth']} dropped {m['lag/dropped']} | score {m['rollout/score_mean']:.3f} "
        f"kl {kl} | sync {m['sync/ms']:.0f} ms"
    )
    if max_updates is None:
        return line
    eta = eta_s(m, max_updates, resumed_step)
    return f"{line} | ETA {'?' if eta is None else format_duration(eta)}"
