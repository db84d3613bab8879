"""Curves and the summary of the learning benchmark (``bench/learning.py``): from reward logs to learning.json.

A run's curve at time ``g`` is the mean of every score sampled in the trailing window ``(g - WINDOW_S, g]``
(seconds from the start of its process). A system's curve is the mean over seeds, its band their min and max.
Reward at the budget is the curve at the budget; "time to the peer's final reward" is the first grid point
where a system's seed-mean curve reaches the peer's reward at the budget.
"""

from __future__ import annotations

import json
import logging
import math
import warnings
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

import numpy as np

logger = logging.getLogger("bench.learning_curves")
WINDOW_S = 60.0
GRID_S = 10.0
PEER = "mlx-lm-lora"


def read_scores(rewards: Path, t0: float) -> tuple[np.ndarray, np.ndarray]:
    """``(seconds since t0, score)`` of every logged score (NaN scores, failed rewards, left out)."""
    times, scores = [], []
    if rewards.exists():
        for line in rewards.read_text().splitlines():
            row = json.loads(line)
            for s in row["scores"]:
                if math.isfinite(s):
                    times.append(row["t"] - t0)
                    scores.append(s)
    return np.array(times, np.float64), np.array(scores, np.float64)


def curve(times: np.ndarray, scores: np.ndarray, grid: np.ndarray, window_s: float = WINDOW_S) -> np.ndarray:
    """Trailing-window mean score at each grid time (NaN where the window holds no score)."""
    out = np.full(len(grid), np.nan)
    for i, g in enumerate(grid):
        inside = (times > g - window_s) & (times <= g)
        if inside.any():
            out[i] = scores[inside].mean()
    return out


def first_reaching(grid: np.ndarray, values: np.ndarray, target: float) -> float | None:
    """The first grid time where ``values`` >= ``target`` (None if never)."""
    hits = np.flatnonzero(np.nan_to_num(values, nan=-np.inf) >= target - 1e-12)
    return float(grid[hits[0]]) if len(hits) else None


def _system_summary(records: list[dict], results: Path, grid: np.ndarray) -> dict:
    per_seed = []
    for record in sorted(records, key=lambda r: r["seed"]):
        times, scores = read_scores(
            results / f"{record['task']}-{record['system']}-s{record['seed']}.rewards.jsonl", record["t0"]
        )
        per_seed.append({"seed": record["seed"], "curve": curve(times, scores, grid), "samples": len(scores),
                         "updates": record.get("updates", 0), "first_score_s": float(times.min()) if len(times) else None})  # fmt: skip
    curves = np.array([s["curve"] for s in per_seed])
    with warnings.catch_warnings():  # grid points before a run's first score are NaN in every seed
        warnings.simplefilter("ignore", RuntimeWarning)
        mean, lo, hi = np.nanmean(curves, axis=0), np.nanmin(curves, axis=0), np.nanmax(curves, axis=0)
    finals = [float(c[-1]) for c in curves]
    return {
        "curve_mean": mean.tolist(),
        "curve_lo": lo.tolist(),
        "curve_hi": hi.tolist(),
        "final_per_seed": finals,
        "final_mean": float(np.nanmean(finals)),
        "final_std": float(np.nanstd(finals)),
        "start_mean": float(np.nanmean([c[np.isfinite(c)][0] for c in curves if np.isfinite(c).any()])),
        "updates_per_seed": [s["updates"] for s in per_seed],
        "samples_per_seed": [s["samples"] for s in per_seed],
        "first_score_s": [s["first_score_s"] for s in per_seed],
        "seeds": [s["seed"] for s in per_seed],
    }


def summarise(results: Path) -> dict:
    """Per task and system: curves, reward at the budget, and time to reach the peer's final reward."""
    runs = sorted(results.glob("*-s[0-9]*.json"))  # run records, not a summary.json beside them
    records = [json.loads(p.read_text()) for p in runs]
    by_task: dict[str, dict[str, list[dict]]] = defaultdict(lambda: defaultdict(list))
    for record in records:
        by_task[record["task"]][record["system"]].append(record)
    tasks = {}
    for task, systems in sorted(by_task.items()):
        budget = max(r["budget_s"] for rs in systems.values() for r in rs)
        grid = np.arange(GRID_S, budget + 1e-9, GRID_S)
        summary = {name: _system_summary(rs, results, grid) for name, rs in sorted(systems.items())}
        entry = {"budget_s": budget, "grid_s": grid.tolist(), "systems": summary}
        if PEER in summary:  # the target (its final), and its best (its final can be below its start)
            for key, target in (
                ("final", summary[PEER]["final_mean"]),
                ("best", float(np.nanmax(summary[PEER]["curve_mean"]))),
            ):
                entry[f"peer_{key}"] = target
                entry[f"time_to_peer_{key}_s"] = {
                    name: first_reaching(grid, np.array(s["curve_mean"]), target)
                    for name, s in summary.items()
                }
        tasks[task] = entry
    return {"window_s": WINDOW_S, "tasks": tasks}


def write_plots(summary: dict, out_dir: Path) -> list[Path]:
    """One PNG per task: each system's seed-mean curve with its min-max band (matplotlib, Agg, no pyplot)."""
    from matplotlib.figure import Figure

    paths = []
    for task, entry in summary["tasks"].items():
        fig = Figure(figsize=(7, 4.2), dpi=110)
        ax = fig.add_subplot()
        grid = np.array(entry["grid_s"])
        for name, s in entry["systems"].items():
            (line,) = ax.plot(
                grid,
                s["curve_mean"],
                label=f"{name} ({len(s['seeds'])} seeds)",
                lw=2 if name != PEER else 2.5,
            )
            ax.fill_between(grid, s["curve_lo"], s["curve_hi"], color=line.get_color(), alpha=0.15)
        ax.set_xlabel("wall-clock seconds from launch (2-core CPU)")
        ax.set_ylabel(f"reward, mean of the last {summary['window_s']:.0f} s")
        ax.set_title(f"{task}: SmolLM2-135M-Instruct, {entry['budget_s']:.0f} s per run")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="best")
        fig.tight_layout()
        path = out_dir / f"learning-{task}.png"
        fig.savefig(path)
        paths.append(path)
    return paths


def analyse(results: Path, summary_path: Path, argv: Sequence[str] | None = None) -> dict:
    """Summarise every run in ``results`` into ``summary_path`` (with the run record) and draw the curves."""
    from bench.machine import run_record

    summary = run_record(list(argv) if argv is not None else None) | summarise(results)
    summary_path.write_text(json.dumps(summary, indent=1))
    for path in write_plots(summary, summary_path.parent):
        logger.info("wrote %s", path)
    return summary


def _seconds(value: float | None, budget: float) -> str:
    return "never" if value is None else f"{value:.0f} s ({value / budget:.2f} of the budget)"


def render_learning(result: dict) -> list[str]:
    """BENCHMARKS.md's block: per task, each system's reward at the start and at the budget (mean ± std over
    seeds), its updates per run, and when its seed-mean curve first reached the peer's reward at the budget."""
    lines = [
        f"Reward = mean score of the completions sampled in the trailing {result['window_s']:.0f} s; "
        "± = std over seeds; curves: `bench/results/learning-<task>.png`.",
        "",
    ]
    for task, entry in result["tasks"].items():
        budget = entry["budget_s"]
        peer = entry.get("peer_final")
        lines += [
            f"**{task}** ({budget:.0f} s per run"
            + (
                f"; the peer's reward at the budget {peer:.3f}, its best {entry['peer_best']:.3f})"
                if peer is not None
                else ")"
            ),
            "",
        ]
        header = [
            "system",
            "seeds",
            "first window",
            "at the budget",
            "updates per run",
            "reached the peer's final",
            "reached the peer's best",
        ]
        rows = []
        for name, s in sorted(entry["systems"].items(), key=lambda kv: -kv[1]["final_mean"]):
            reached = [entry.get(f"time_to_peer_{k}_s", {}).get(name) for k in ("final", "best")]
            rows.append([
                name, str(len(s["seeds"])), f"{s['start_mean']:.3f}", f"{s['final_mean']:.3f} ± {s['final_std']:.3f}",
                f"{np.mean(s['updates_per_seed']):.1f}", *(_seconds(r, budget) if peer is not None else "" for r in reached),
            ])  # fmt: skip
        rule = "|".join(["---", "---:", "---:", "---:", "---:", "---:", "---:"])
        lines += [f"| {' | '.join(header)} |", f"|{rule}|", *(f"| {' | '.join(r)} |" for r in rows), ""]
    return lines[:-1]
