"""Soak: a run of N actors for a fixed time, watching every process's memory and the learner's queues.

    python bench/soak.py [--minutes 10] [--actors 2] [--model tiny] [--sample-s 5] [--output bench/results/soak.json]

Starts ``launch.py`` (small settings, many short updates, so the runtime itself is what is exercised), samples
the RSS of the learner and every actor with psutil, and reads ``buffer/depth``, ``rollout/in_flight`` and the
counters from ``metrics.jsonl``. Reports each process's RSS after warm-up (the first fifth of the run) and at the
end, the growth in between, and the queue depths over time; stops the run with SIGINT. Writes
``bench/results/soak.json``. ``make bench`` runs it for 3 minutes (``SOAK_MINUTES``); the 10-minute soak of
BENCHMARKS.md is ``python -m common.blas -- python bench/soak.py --minutes 10 --sample-s 10``.
"""

from __future__ import annotations

import argparse
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import psutil  # noqa: E402

from bench.machine import describe_machine, run_record  # noqa: E402

SETTINGS = [
    "sampling.batch_size=8",
    "sampling.max_new_tokens=16",
    "ppo.batch_size=8",
    "ppo.group_size=2",
    "ppo.num_minibatches=1",
    "ppo.micro_batch_size=8",
    "ppo.update_epochs=1",
    "run.checkpoint_every=500",
    'run.task="letters"',
]


def role_of(proc: psutil.Process) -> str | None:
    cmd = proc.cmdline()
    if "learner" in cmd:
        return "learner"
    if "actor" in cmd and "--actor-id" in cmd:
        return f"actor-{cmd[cmd.index('--actor-id') + 1]}"
    return None


def sample(launcher: psutil.Process) -> dict[str, float]:
    out = {}
    for proc in launcher.children(recursive=True):
        try:
            role = role_of(proc)
            if role:
                out[role] = proc.memory_info().rss / 1e6
        except psutil.NoSuchProcess:
            pass
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--actors", type=int, default=2)
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--sample-s", type=float, default=5.0)
    parser.add_argument("--run-dir", default="/tmp/mlx-ppo-soak")
    parser.add_argument("--output", default=str(Path(__file__).parent / "results" / "soak.json"))
    opts = parser.parse_args()
    run_dir = Path(opts.run_dir)
    subprocess.run(["rm", "-rf", str(run_dir)], check=True)
    cmd = [sys.executable, str(ROOT / "launch.py"), "--actors", str(opts.actors), "--model", opts.model]
    cmd += ["--max-updates", "10000000", "--run-dir", str(run_dir)]
    for item in SETTINGS:
        cmd += ["--set", item]
    launcher = subprocess.Popen(cmd, stderr=subprocess.DEVNULL)
    handle, samples, start = psutil.Process(launcher.pid), [], time.monotonic()
    try:
        while time.monotonic() - start < opts.minutes * 60:
            time.sleep(opts.sample_s)  # the sampling interval
            assert launcher.poll() is None, "the run died"
            samples.append({"t": time.monotonic() - start, "rss_mb": sample(handle)})
    finally:
        launcher.send_signal(signal.SIGINT)
        launcher.wait(timeout=120)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    warm = next(s for s in samples if s["t"] >= opts.minutes * 60 / 5)
    last = samples[-1]
    report = {
        **run_record(),
        "machine": describe_machine(),
        "minutes": opts.minutes,
        "actors": opts.actors,
        "model": opts.model,
        "updates": rows[-1]["step"],
        "rss_mb_after_warmup": warm["rss_mb"],
        "rss_mb_end": last["rss_mb"],
        "rss_growth": {
            k: last["rss_mb"][k] / warm["rss_mb"][k] - 1 for k in warm["rss_mb"] if k in last["rss_mb"]
        },
        "buffer_depth_max": max(r["buffer/depth"] for r in rows),
        "in_flight_max": max(r["rollout/in_flight"] for r in rows),
        "lag_dropped": rows[-1]["lag/dropped"],
        "rejects": {k: v for k, v in rows[-1].items() if k.startswith("reject/") and v},
        "samples": samples,
    }
    print(
        f"{report['machine']}; {opts.minutes:g} min, {opts.actors} actors, model {opts.model}: {report['updates']} updates"
    )
    print("| process | RSS MB after warm-up | RSS MB at the end | growth |\n|---|---:|---:|---:|")
    for k, growth in sorted(report["rss_growth"].items()):
        print(f"| {k} | {warm['rss_mb'][k]:.0f} | {last['rss_mb'][k]:.0f} | {growth:+.1%} |")
    print(
        f"buffer depth max {report['buffer_depth_max']}, in flight max {report['in_flight_max']}, "
        f"dropped {report['lag_dropped']}, rejects {report['rejects']}"
    )
    output = Path(opts.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
