"""Live terminal view of a run, read only from its files (``metrics.jsonl``, ``config.toml``).

Reading files instead of talking to the learner means the view works the same on a running run, a finished
one and a run directory copied off another machine, and can never slow or break the run it watches.
``render_frame`` is a pure function of the rows, so tests check the numbers without a terminal.
"""

from __future__ import annotations

import logging
import sys
import time
import tomllib
from pathlib import Path
from typing import Any, Final, TextIO

from common.exit_codes import ExitCode
from learner.metrics import format_duration
from tools.metrics_file import MetricsTail

logger = logging.getLogger(__name__)

SPARK: Final = "▁▂▃▄▅▆▇█"
SPARK_WIDTH: Final = 40
HOME: Final = "\x1b[H"  # cursor to the top left
CLEAR_LINE: Final = "\x1b[K"  # clear to the end of the line
CLEAR_BELOW: Final = "\x1b[J"  # clear from the cursor to the end of the screen
CLEAR_SCREEN: Final = "\x1b[2J"
ACTORS_PER_LINE: Final = 6
ALIVE_FACTOR: Final = 3.0
"""A run is called silent when its last row is older than this many update intervals (plus ALIVE_SLACK_S)."""
ALIVE_SLACK_S: Final = 10.0
INTERVAL_WINDOW: Final = 10
"""Updates the interval (and so the ETA) is averaged over: recent enough to follow a change of pace."""


def load_config(run_dir: Path) -> dict[str, Any]:
    """``<run_dir>/config.toml`` as a dict; empty while the launcher has not written it yet."""
    try:
        return tomllib.loads((run_dir / "config.toml").read_text(encoding="utf-8"))
    except (FileNotFoundError, tomllib.TOMLDecodeError):
        return {}


# -- formatting (pure) ---------------------------------------------------------------------------------------


def sparkline(values: list[float | None], width: int = SPARK_WIDTH) -> str:
    """The last ``width`` values as bars scaled between their min and max; a missing value is a space."""
    recent = values[-width:]
    known = [v for v in recent if v is not None]
    if not known:
        return ""
    lo, hi = min(known), max(known)
    span = hi - lo
    top = len(SPARK) - 1
    return "".join(
        " " if v is None else SPARK[0 if span == 0 else round((v - lo) / span * top)] for v in recent
    )


def _num(value: Any, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def _fmt(row: dict[str, Any], key: str, fmt: str) -> str:
    """``row[key]`` formatted, ``-`` when absent or null (a non-finite value is written as null)."""
    return _num(row.get(key), fmt)


def _max_updates(config: dict[str, Any]) -> int | None:
    value = config.get("run", {}).get("max_updates")
    return int(value) if value is not None else None


def elapsed_s(rows: list[dict[str, Any]]) -> float:
    """Training time so far; ``time_s`` restarts with a resumed learner, so each restart adds a segment."""
    total, prev = 0.0, None
    for row in rows:
        t = row.get("time_s")
        if t is None:
            continue
        if prev is not None and t < prev:
            total += prev
        prev = t
    return total + (prev or 0.0)


def update_interval_s(rows: list[dict[str, Any]]) -> float | None:
    """Mean seconds between the last INTERVAL_WINDOW updates (a restart's first row is not counted)."""
    times = [r["time_s"] for r in rows[-INTERVAL_WINDOW - 1 :] if r.get("time_s") is not None]
    gaps = [b - a for a, b in zip(times, times[1:], strict=False) if b > a]
    if gaps:
        return sum(gaps) / len(gaps)
    return times[-1] if times else None  # one row: the time to the first update, start-up included


def is_finished(rows: list[dict[str, Any]], config: dict[str, Any]) -> bool:
    max_updates = _max_updates(config)
    return bool(rows) and max_updates is not None and rows[-1].get("step", 0) >= max_updates


def _title(config: dict[str, Any], source: str | None) -> str:
    run = config.get("run", {})
    parts = [f"run {source or run.get('run_dir', '?')}"]
    if "model" in config:
        parts.append(f"model {config['model'].get('name', '?')}")
    if "task" in run:
        parts.append(f"task {run['task']}")
    if "ppo" in config:
        parts.append(config["ppo"].get("algorithm", ""))
    return " | ".join(p for p in parts if p)


def _progress_lines(rows: list[dict[str, Any]], config: dict[str, Any], age_s: float | None) -> list[str]:
    last, max_updates = rows[-1], _max_updates(config)
    step = last.get("step", 0)
    interval = update_interval_s(rows)
    progress = f"update {step}" if max_updates is None else f"update {step}/{max_updates}"
    version = last.get("policy_version", "?")
    line = f"progress     {progress} v{version} | elapsed {format_duration(elapsed_s(rows))}"
    if max_updates is not None and interval is not None and step < max_updates:
        line += f" | ETA {format_duration(interval * max(max_updates - step, 0))}"
    return [line, f"status       {_status(rows, config, age_s, interval)}"]


def _status(
    rows: list[dict[str, Any]], config: dict[str, Any], age_s: float | None, interval: float | None
) -> str:
    """Whether the run looks alive: the age of its last row against the usual time between updates."""
    if is_finished(rows, config):
        return "finished"
    if age_s is None:
        return "?"
    every = "" if interval is None else f" (one every ~{format_duration(interval)})"
    if interval is None or age_s <= ALIVE_FACTOR * interval + ALIVE_SLACK_S:
        return f"alive: last update {format_duration(age_s)} ago{every}"
    return f"SILENT: no update for {format_duration(age_s)}{every}; stopped or stuck?"


def actor_token_keys(keys: Any) -> list[str]:
    """The ``actor/<id>/gen_tokens_per_s`` keys among ``keys``, in numeric id order ("2" before "10")."""
    found = {k for k in keys if k.startswith("actor/") and k.endswith("/gen_tokens_per_s")}
    return sorted(found, key=lambda k: (len(k), k))


def _actor_rates(last: dict[str, Any]) -> dict[str, float]:
    """``actor/<id>/gen_tokens_per_s`` by actor id, in numeric id order."""
    return {k.split("/")[1]: last[k] for k in actor_token_keys(last) if last[k] is not None}


def _throughput_lines(last: dict[str, Any]) -> list[str]:
    rates = _actor_rates(last)
    total = last.get("perf/gen_tokens_per_s", sum(rates.values()))
    busy = last.get("perf/learner_busy_frac")
    lines = [
        f"throughput   {_fmt(last, 'perf/samples_per_s', '.2f')} samples/s | train "
        f"{_fmt(last, 'perf/train_tokens_per_s', '.0f')} tok/s | learner busy "
        f"{'-' if busy is None else format(100 * busy, '.0f')}%",
        f"generation   {_num(total, '.0f')} tok/s from {len(rates)} actors"
        + (f" ({last['actors/connected']} connected)" if "actors/connected" in last else ""),
    ]
    items = [f"actor {a}: {r:.0f}" for a, r in rates.items()]
    for i in range(0, len(items), ACTORS_PER_LINE):
        lines.append("             " + " | ".join(items[i : i + ACTORS_PER_LINE]))
    return lines


def _lag_lines(last: dict[str, Any]) -> list[str]:
    sync_mb = last.get("sync/bytes")
    return [
        f"policy lag   mean {_fmt(last, 'lag/mean', '.2f')} max {_fmt(last, 'lag/max', '.0f')} | "
        f"dropped {_fmt(last, 'lag/dropped', '.0f')} | buffer {_fmt(last, 'buffer/depth', '.0f')} | "
        f"in flight {_fmt(last, 'rollout/in_flight', '.0f')}",
        f"sync         {_fmt(last, 'sync/ms', '.0f')} ms"
        + ("" if sync_mb is None else f" ({sync_mb / 1e6:.1f} MB)"),
    ]


def _learning_lines(rows: list[dict[str, Any]]) -> list[str]:
    last = rows[-1]
    scores = [r.get("rollout/score_mean") for r in rows]
    known = [s for s in scores[-SPARK_WIDTH:] if s is not None]
    history = (
        f"  {sparkline(scores)}  (last {len(known)}: {min(known):.3f} to {max(known):.3f})" if known else ""
    )
    return [
        f"score        {_fmt(last, 'rollout/score_mean', '.3f')} ± {_fmt(last, 'rollout/score_std', '.3f')}"
        + history,
        f"kl           {_fmt(last, 'kl/ref_mean', '.4f')} (coef {_fmt(last, 'kl/coef', '.3g')}) | "
        f"approx_kl {_fmt(last, 'policy/approx_kl', '.4f')}",
        f"loss         policy {_fmt(last, 'loss/policy', '.4f')} | value {_fmt(last, 'loss/value', '.4f')}"
        f" | entropy {_fmt(last, 'policy/entropy', '.3f')}",
    ]


def _reject_line(last: dict[str, Any]) -> str:
    counts = [
        f"{k.removeprefix('reject/')} {v}" for k, v in sorted(last.items()) if k.startswith("reject/") and v
    ]
    return "rejects      " + (", ".join(counts) if counts else "none")


def render_frame(
    rows: list[dict[str, Any]],
    config: dict[str, Any],
    *,
    age_s: float | None = None,
    source: str | None = None,
) -> str:
    """One screen of the monitor.

    Args:
        rows: the ``metrics.jsonl`` rows so far, oldest first.
        config: the run's ``config.toml`` as a dict (empty if not written yet).
        age_s: seconds since the last row was written (the file's age); without it, liveness is not judged.
        source: the run directory shown in the title (a copied run's ``config.toml`` names the original).
    """
    lines = [_title(config, source), ""]
    if not rows:
        return "\n".join([*lines, "waiting for the first update in metrics.jsonl ..."])
    last = rows[-1]
    lines += _progress_lines(rows, config, age_s)
    lines += _throughput_lines(last)
    lines += _lag_lines(last)
    lines += _learning_lines(rows)
    lines.append(_reject_line(last))
    return "\n".join(lines)


# -- the loop ------------------------------------------------------------------------------------------------


def _file_age_s(path: Path) -> float | None:
    try:
        return max(time.time() - path.stat().st_mtime, 0.0)
    except FileNotFoundError:
        return None


def _paint(out: TextIO, frame: str, tty: bool) -> None:
    """On a terminal, redraw in place (home, overwrite each line, clear the rest); else append a block."""
    if tty:
        out.write(HOME + "".join(f"{line}{CLEAR_LINE}\n" for line in frame.splitlines()) + CLEAR_BELOW)
    else:
        out.write(frame + "\n\n")
    out.flush()


def run_monitor(run_dir: Path, refresh_s: float = 2.0, once: bool = False, out: TextIO = sys.stdout) -> int:
    """Show a run's progress until it finishes (or Ctrl-C); returns the exit code
    (``BAD_SETUP`` if there is no such run).

    Waits for ``metrics.jsonl`` while the run starts. Not on a terminal (``out`` piped to a file), a new block
    is written only when a new update arrives, so logs do not fill with identical frames.
    """
    if not run_dir.is_dir():
        logger.error("no run directory %s: give the --run-dir of a started run", run_dir)
        return ExitCode.BAD_SETUP
    tail = MetricsTail(run_dir / "metrics.jsonl")
    tty = out.isatty()
    if tty and not once:
        out.write(CLEAR_SCREEN)
    shown = -1
    try:
        while True:
            rows, config = tail.read(), load_config(run_dir)
            if tty or once or len(rows) != shown:
                age = _file_age_s(tail.path)
                _paint(out, render_frame(rows, config, age_s=age, source=str(run_dir)), tty)
                shown = len(rows)
            if once or is_finished(rows, config):
                return ExitCode.OK
            time.sleep(refresh_s)  # a display refresh, not coordination: nothing waits on it
    except KeyboardInterrupt:
        return ExitCode.OK
