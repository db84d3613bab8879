"""PNG charts of a run's ``metrics.jsonl`` against the update step (``mlx-ppo plot RUN_DIR``).

matplotlib is optional (the ``plot`` extra) and imported only here, inside ``write_plots``: training never
needs it. The charts are drawn with ``matplotlib.figure.Figure`` (Agg, no pyplot), so nothing opens a window
or touches global backend state.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from common.exit_codes import ExitCode
from tools.metrics_file import read_rows
from tools.monitor import actor_token_keys

logger = logging.getLogger(__name__)

ACTOR_TOKENS: Final = "actor/*/gen_tokens_per_s"
"""Stands for every actor's own ``actor/<id>/gen_tokens_per_s`` in a panel's keys."""


@dataclass(frozen=True)
class Panel:
    """One set of axes: the keys drawn on it and, for a mean, the key of its standard deviation band."""

    ylabel: str
    keys: tuple[str, ...]
    bands: dict[str, str] = field(default_factory=dict)


CHARTS: Final[dict[str, tuple[Panel, ...]]] = {
    "score": (Panel("score", ("rollout/score_mean",), {"rollout/score_mean": "rollout/score_std"}),),
    "kl": (Panel("KL", ("kl/ref_mean", "policy/approx_kl")),),
    "loss": (Panel("policy loss", ("loss/policy",)), Panel("value loss", ("loss/value",))),
    "throughput": (
        Panel("samples/s", ("perf/samples_per_s",)),
        Panel("tokens/s", ("perf/gen_tokens_per_s", ACTOR_TOKENS, "perf/train_tokens_per_s")),
    ),
    "lag": (Panel("policy lag", ("lag/mean", "lag/max")), Panel("dropped (total)", ("lag/dropped",))),
    "sync": (Panel("weight sync ms", ("sync/ms",)),),
}
"""File name (without ``.png``) -> its panels, stacked top to bottom over a shared update axis."""


def _by_step(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per update, the last written winning, in step order."""
    return sorted({row["step"]: row for row in rows if "step" in row}.values(), key=lambda r: r["step"])


def _expand(keys: tuple[str, ...], rows: list[dict[str, Any]]) -> list[str]:
    """The panel's keys with ACTOR_TOKENS replaced by each actor's key, in actor id order."""
    actors = actor_token_keys({k for row in rows for k in row})
    return [name for key in keys for name in (actors if key == ACTOR_TOKENS else [key])]


def series(rows: list[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of ``key``, leaving out updates where it is absent or null (non-finite)."""
    points = [(row["step"], row[key]) for row in rows if row.get(key) is not None]
    return [s for s, _ in points], [v for _, v in points]


def _draw_panel(ax: Any, panel: Panel, rows: list[dict[str, Any]]) -> None:
    """Draw one panel's lines on ``ax`` (the caller passes only panels with data)."""
    for key in _expand(panel.keys, rows):
        steps, values = series(rows, key)
        if not steps:
            continue
        ax.plot(steps, values, label=key, marker="." if len(steps) <= 50 else None, linewidth=1.2)
        band = panel.bands.get(key)
        if band is not None:
            _, spread = series([r for r in rows if r.get(key) is not None], band)
            if len(spread) == len(values):
                lo = [v - s for v, s in zip(values, spread, strict=True)]
                hi = [v + s for v, s in zip(values, spread, strict=True)]
                ax.fill_between(steps, lo, hi, alpha=0.2, label=f"± {band}")
    ax.set_ylabel(panel.ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")


def _write_chart(
    figure_class: type, name: str, panels: tuple[Panel, ...], rows: list[dict[str, Any]], out: Path, run: str
) -> Path | None:
    """One PNG of stacked panels; None (and no file) when the run has none of the chart's keys."""
    with_data = [p for p in panels if any(series(rows, k)[0] for k in _expand(p.keys, rows))]
    if not with_data:
        return None
    fig = figure_class(figsize=(8, 1.0 + 2.6 * len(with_data)), layout="constrained")
    axes = fig.subplots(len(with_data), 1, sharex=True, squeeze=False)[:, 0]
    for ax, panel in zip(axes, with_data, strict=True):
        _draw_panel(ax, panel, rows)
    axes[-1].set_xlabel("update")
    axes[-1].xaxis.get_major_locator().set_params(integer=True)  # updates are whole numbers
    fig.suptitle(f"{name}: {run}")
    path = out / f"{name}.png"
    fig.savefig(path, dpi=100)
    return path


def write_plots(run_dir: Path, out_dir: Path | None = None) -> list[Path]:
    """Write the run's charts as PNGs (default ``<run_dir>/plots/``); returns the files written.

    Raises:
        FileNotFoundError: no run directory or no ``metrics.jsonl`` in it.
        ValueError: no complete update row yet.
        ImportError: matplotlib is not installed (the message says how to install it).
    """
    try:
        from matplotlib.figure import Figure
    except ImportError as err:
        raise ImportError(
            "plots need matplotlib: pip install matplotlib (or pip install -e '.[plot]')"
        ) from err
    path = run_dir / "metrics.jsonl"
    if not run_dir.is_dir():
        raise FileNotFoundError(f"no run directory {run_dir}")
    if not path.is_file():
        raise FileNotFoundError(f"no {path}: the run has not finished an update yet")
    rows = _by_step(read_rows(path))
    if not rows:
        raise ValueError(f"{path} has no complete update row yet")
    out = out_dir if out_dir is not None else run_dir / "plots"
    out.mkdir(parents=True, exist_ok=True)
    written = [
        _write_chart(Figure, name, panels, rows, out, run_dir.resolve().name)
        for name, panels in CHARTS.items()
    ]
    return [p for p in written if p is not None]


def run_plot(run_dir: Path, out_dir: Path | None = None) -> int:
    """``mlx-ppo plot``: write the charts and log where they are; ``BAD_SETUP`` with the reason when it cannot."""
    try:
        paths = write_plots(run_dir, out_dir)
    except (FileNotFoundError, ValueError, ImportError) as err:
        logger.error("%s", err)
        return ExitCode.BAD_SETUP
    for path in paths:
        logger.info("wrote %s", path)
    return ExitCode.OK
