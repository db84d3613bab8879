"""Runs of ``launch.py`` for the end-to-end benchmarks, one layout each, and what their ``metrics.jsonl`` says.

A ``Layout`` places the processes of a run on this machine: N actor processes beside the learner, or the
synchronous one-process loop, with its own config overrides (``parse_layout``: ``sync``, ``2``,
``wide=1:sampling.batch_size=256``). ``run_layout`` starts the launcher for a number of updates under a time limit
and reads from the learner's ``metrics.jsonl`` the seconds per update after the first ``warmup`` updates, samples/s,
the learner's busy fraction and update time, generated tokens per update, lag and drops (``_run_stats``).
Used by ``bench/runtime.py scaling`` and ``bench/e2e_step.py``; not a command of its own.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

LAUNCH = Path(__file__).resolve().parent.parent / "launch.py"


@dataclass(frozen=True)
class Layout:
    """Where a run's processes go: ``actors`` actor processes beside one learner, or (``one_process``) the
    synchronous loop of ``launch.py --one-process``; ``settings`` are this layout's own config overrides."""

    name: str
    actors: int
    one_process: bool = False
    settings: tuple[str, ...] = ()

    @property
    def mode(self) -> str:
        return "sync" if self.one_process else "async"


def parse_layout(spec: str) -> Layout:
    """``sync`` (one process), ``N`` (N actor processes) or ``[NAME=]sync|N[:KEY=VALUE;KEY=VALUE...]``, e.g.
    ``wide=1:sampling.batch_size=256;sampling.max_rows=128`` (one actor with a larger continuous batch)."""
    head, _, overrides = spec.partition(":")
    name, _, where = head.rpartition("=")
    one_process = where == "sync"
    actors = 1 if one_process else int(where)
    label = name or ("sync" if one_process else f"{actors} actor{'s' * (actors > 1)}")
    return Layout(label, actors, one_process, tuple(o for o in overrides.split(";") if o))


def _metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def _run_stats(run_dir: Path, batch: int, warmup: int = 1) -> dict:
    """Seconds per update and samples/s from the end of update ``warmup`` to the last one; the learner's busy
    fraction and update time over those updates; largest lag and sequences dropped, from ``metrics.jsonl``.
    ``warmup=1`` keeps the numbers of the earlier scaling tables (start-up and the first update excluded)."""
    if warmup < 1:
        raise ValueError(f"warmup={warmup}: at least the first update (start-up) is left out")
    rows = _metrics(run_dir)
    measured = rows[warmup:]
    times = [r.get("time_s") for r in rows]
    busy = [r["perf/learner_busy_frac"] for r in measured if "perf/learner_busy_frac" in r]
    per_update = (times[-1] - times[warmup - 1]) / len(measured) if measured else None
    gen = [r["rollout/response_len_mean"] * batch for r in measured if "rollout/response_len_mean" in r]
    return {
        "updates_done": len(rows),
        "warmup_updates": warmup,
        "s_per_update": per_update,
        "samples_per_s": batch / per_update if per_update else None,
        "update_s_median": float(np.median([r["perf/update_s"] for r in measured])) if measured else None,
        "gen_tokens_per_update": float(np.mean(gen)) if gen else None,
        "busy_mean": float(np.mean(busy)) if busy else None,
        "busy_min": min(busy) if busy else None,
        "busy_max": max(busy) if busy else None,
        "lag_max": max((r.get("lag/max", 0) for r in rows), default=None),
        "dropped": rows[-1].get("lag/dropped") if rows else None,
        "peak_gb": max((r.get("memory/peak_gb", 0.0) for r in rows), default=None),
        "time_s": times,
    }


def _setting_value(settings: list[str], key: str) -> int:
    return int([s for s in settings if s.startswith(f"{key}=")][-1].split("=", 1)[1])


def exit_on_sigterm() -> None:
    """SIGTERM (``timeout``'s signal) ends this process through ``SystemExit``, so that ``launch_run`` stops the
    launcher it started: in a session of its own, the launcher would not get the signal and would run on."""
    signal.signal(signal.SIGTERM, lambda signum, _frame: sys.exit(128 + signum))


def _stop(proc: subprocess.Popen, grace_s: float = 30.0) -> None:
    """SIGTERM to the launcher (its learner checkpoints and stops, the actors follow), SIGKILL after ``grace_s``."""
    proc.terminate()
    try:
        proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    time.sleep(2)  # its children watch its pid once a second: let them go before the next run starts


def launch_run(layout: Layout, updates: int, run_dir: Path, settings: list[str], timeout_s: float) -> dict:
    """``launch.py`` with ``layout`` for ``updates`` updates into ``run_dir`` (emptied first: metrics.jsonl
    appends), its output in ``run_dir.log``. Past ``timeout_s``, or when this process is ended (``interrupted``),
    the launcher is stopped (``_stop``); the updates metrics.jsonl holds by then still count."""
    shutil.rmtree(run_dir, ignore_errors=True)
    cmd = [sys.executable, str(LAUNCH), "--actors", str(layout.actors), "--max-updates", str(updates)]
    cmd += ["--run-dir", str(run_dir)] + ["--one-process"] * layout.one_process
    for item in [*settings, *layout.settings]:
        cmd += ["--set", item]
    log = run_dir.with_name(run_dir.name + ".log")
    start, timed_out, interrupted = time.perf_counter(), False, False
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            timed_out = True
        except (SystemExit, KeyboardInterrupt):  # this process is being ended: the caller saves, then exits
            interrupted = True
        finally:
            if proc.poll() is None:
                _stop(proc)
    wall = time.perf_counter() - start
    return {
        "rc": proc.returncode,
        "timed_out": timed_out,
        "interrupted": interrupted,
        "wall_s": wall,
        "log": str(log),
    }


def run_layout(
    layout: Layout,
    updates: int,
    workdir: Path,
    settings: list[str],
    timeout_s: float = 3600.0,
    warmup: int = 1,
) -> dict:
    """One row: ``launch_run`` of ``layout`` into ``workdir/NAME`` and its ``_run_stats``."""
    run_dir = workdir / layout.name.replace(" ", "-")
    run = launch_run(layout, updates, run_dir, settings, timeout_s)
    batch = _setting_value([*settings, *layout.settings], "ppo.batch_size")
    row = {
        "mode": layout.mode,
        "actors": layout.actors,
        "layout": layout.name,
        "settings": list(layout.settings),
    }
    row |= run | _run_stats(run_dir, batch, warmup)
    if run["rc"] != 0 and not (run["timed_out"] or run["interrupted"]):
        row["error"] = Path(run["log"]).read_text()[-4000:]
    return row


def bench_scaling(
    layouts: list[Layout],
    updates: int,
    workdir: Path,
    settings: list[str],
    on_row: Callable[[list[dict]], None] | None = None,
    **limits: float,
) -> list[dict]:
    """A row per layout (``run_layout``; ``limits``: its ``timeout_s`` and ``warmup``), each printed and given
    to ``on_row`` with the rows so far (to save them as they come); ended by a signal, it saves the row of the
    run it stopped, then exits."""
    workdir.mkdir(parents=True, exist_ok=True)
    rows = []
    for layout in layouts:
        rows.append(run_layout(layout, updates, workdir, settings, **limits))
        r = rows[-1]
        rate = "no rate" if r["samples_per_s"] is None else f"{r['samples_per_s']:.3f} samples/s"
        problem = " (timed out)" if r["timed_out"] else " (FAILED: see its log)" if "error" in r else ""
        problem = " (interrupted)" if r["interrupted"] else problem
        print(
            f"  {layout.name}: {rate}, {r['updates_done']} updates in {r['wall_s']:.0f} s{problem}",
            flush=True,
        )
        if on_row is not None:
            on_row(rows)
        if r["interrupted"]:
            raise SystemExit(128 + signal.SIGTERM)
    return rows
