"""A multi-turn environment's reward curve through ``launch.py``: the guessing game on the bundled model.

    python -m common.blas -- python bench/episode_curve.py [--config examples/configs/guess_number.toml]
        [--updates 30] [--run-dir runs/guess-curve] [--analyse-only] [--output bench/results/episode-curve.json]

Runs the example config as a user does (1 learner and 2 actor processes), with ``ppo.dynamic_sampling`` off so
that every update's ``rollout/score_mean`` is the mean return of all the episodes it trained on (with dynamic
sampling the kept groups are only the mixed ones). Then reads ``metrics.jsonl``: per update its time, mean
return and the actors' episode counters, and the mean return of the first and last thirds of the run.
``--analyse-only`` reads an existing run. ``render_episode_curve`` is ``bench/report.py``'s table.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.machine import run_record  # noqa: E402
from tools.metrics_file import read_rows  # noqa: E402


def launch(config: str, updates: int, run_dir: Path) -> int:
    """The run, as ``launch.py`` starts it; returns its exit code."""
    cmd = [sys.executable, str(ROOT / "launch.py"), "--config", config, "--max-updates", str(updates)]
    cmd += ["--run-dir", str(run_dir), "--set", "ppo.dynamic_sampling=false"]
    return subprocess.run(cmd, cwd=ROOT).returncode


def curve(run_dir: Path) -> list[dict]:
    """One row per update: version, seconds since the start, mean return, mean response and turns."""
    rows = []
    for r in read_rows(run_dir / "metrics.jsonl"):
        if "rollout/score_mean" not in r:
            continue
        turns = [v for k, v in r.items() if k.startswith("actor/") and k.endswith("/turns_per_episode")]
        rows.append({"version": r["policy_version"], "time_s": r.get("time_s", 0.0),
                     "score_mean": r["rollout/score_mean"], "response_len": r.get("rollout/response_len_mean"),
                     "turns_per_episode": sum(turns) / len(turns) if turns else None})  # fmt: skip
    return rows


def thirds(rows: list[dict]) -> tuple[float, float]:
    """Mean return over the first and the last third of the updates."""
    k = max(len(rows) // 3, 1)
    first, last = rows[:k], rows[-k:]
    return sum(r["score_mean"] for r in first) / len(first), sum(r["score_mean"] for r in last) / len(last)


def render_episode_curve(result: dict) -> list[str]:
    rows = result["rows"]
    first, last = thirds(rows)
    lines = [f"Mean return, first third of the updates: {first:.3f}; last third: {last:.3f} "
             f"({len(rows)} updates in {rows[-1]['time_s']:.0f} s).", "",
             "| update | s since start | mean return | running mean (5) |", "|---:|---:|---:|---:|"]  # fmt: skip
    for i, r in enumerate(rows):
        window = rows[max(0, i - 4) : i + 1]
        running = sum(w["score_mean"] for w in window) / len(window)
        lines.append(f"| {r['version']} | {r['time_s']:.0f} | {r['score_mean']:.3f} | {running:.3f} |")
    return lines


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="examples/configs/guess_number.toml")
    p.add_argument("--updates", type=int, default=30)
    p.add_argument("--run-dir", type=Path, default=ROOT / "runs" / "guess-curve")
    p.add_argument("--analyse-only", action="store_true", help="read an existing run")
    p.add_argument("--output", type=Path, default=ROOT / "bench" / "results" / "episode-curve.json")
    args = p.parse_args()
    if not args.analyse_only and launch(args.config, args.updates, args.run_dir) != 0:
        raise SystemExit("the run failed: see its log above")
    result = {**run_record(), "config": args.config, "rows": curve(args.run_dir)}
    args.output.write_text(json.dumps(result, indent=1) + "\n")
    print("\n".join(render_episode_curve(result)))


if __name__ == "__main__":
    main()
