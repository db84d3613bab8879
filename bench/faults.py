"""Faults, garbage and escapes against a live run, counted (issue 15): the R-figures of BENCHMARKS.md.

    python -m common.blas -- python bench/faults.py [--garbage 2000] [--kills 3] [--output bench/results/faults.json]

A tiny-model run of 2 actors (``max_policy_lag`` 2) is attacked while it trains: ``--garbage`` hostile messages
of every kind the review tried, from sockets that never said hello (random bytes, bad headers and bodies, shapes
that overflow, too many dimensions, hostile hellos, rollout requests and heartbeats, experience with a forged
token, out-of-vocabulary ids, NaN reference log-probs, a 60,000-token sequence); ``--kills`` SIGKILLs of an
actor (each waited out until it rejoined); then a SIGKILL of every process and a ``--resume``. Afterwards: the
learner's ``reject/*`` counters against what was sent, no group trained twice or skipped, the learner's memory
growth, and ``tests/unit/test_sandbox.py`` (the escapes) run once. Writes ``bench/results/faults.json``.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import signal
import struct
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import msgpack  # noqa: E402
import numpy as np  # noqa: E402
import psutil  # noqa: E402
import zmq  # noqa: E402

from bench.machine import run_record  # noqa: E402
from common import protocol  # noqa: E402

SETTINGS = [
    "sampling.batch_size=8", "sampling.max_new_tokens=16", "ppo.batch_size=10", "ppo.group_size=2",
    "ppo.num_minibatches=1", "ppo.micro_batch_size=10", "ppo.update_epochs=1", "run.checkpoint_every=5",
    'run.task="letters"', "lora.rank=4", "transport.heartbeat_s=0.5",
]  # fmt: skip


def launch(run_dir: Path, resume: bool = False) -> subprocess.Popen:
    cmd = [sys.executable, str(ROOT / "launch.py"), "--model", "tiny", "--actors", "2"]
    cmd += ["--resume", str(run_dir)] if resume else ["--max-updates", "100000", "--run-dir", str(run_dir)]
    for item in SETTINGS:
        cmd += ["--set", item]
    log = open(f"{run_dir}.log", "a")  # noqa: SIM115 (the child writes it; closed when the run ends)
    return subprocess.Popen(cmd, stderr=log, stdout=log)


def rows(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    lines = path.read_text().splitlines() if path.exists() else []
    return [json.loads(line) for line in lines if line.endswith("}")]


def settle(condition, seconds: float) -> bool:
    """Poll ``condition`` until it holds or ``seconds`` pass; whether it held."""
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.2)  # polling files the run writes
    return True


def wait(condition, what: str, seconds: float = 300) -> None:
    if not settle(condition, seconds):
        raise TimeoutError(what)


def family(launcher: subprocess.Popen) -> list[psutil.Process]:
    return psutil.Process(launcher.pid).children(recursive=True)


def endpoints_of(launcher: subprocess.Popen) -> dict:
    learner = next(p for p in family(launcher) if "learner" in p.cmdline())
    cmd = learner.cmdline()
    return json.loads(cmd[cmd.index("--endpoints") + 1])


def hostile_messages(rng: random.Random, n: int) -> list[tuple[str, str, list[bytes]]]:
    """``(kind, channel, frames)`` of ``n`` hostile messages, each kind in turn."""
    sample = protocol.ExperienceBatch(
        0, 3, 0, (protocol.Sequence_(3, 2, 0.5, "stop"), protocol.Sequence_(3, 2, 0.2, "stop")),
        np.array([1, 2, 3, 4, 5, 1, 2, 3, 4, 5], np.int32), np.full(4, -1.0, np.float32), None, 1.0, "0" * 32,
    )  # fmt: skip
    good = [bytes(f) for f in protocol.encode(sample)]
    body = msgpack.unpackb(good[1])

    def with_body(**changes) -> list[bytes]:
        return [good[0], msgpack.packb(body | changes), *good[2:]]

    def control(msg) -> list[bytes]:
        return [bytes(f) for f in protocol.encode(msg)]

    kinds = {
        "random bytes": lambda: [rng.randbytes(rng.randint(1, 64)) for _ in range(rng.randint(1, 4))],
        "bad header": lambda: [struct.pack(">4sHB", b"MPPO", 99, 4), good[1], *good[2:]],
        "bad body": lambda: [good[0], b"\xc1" + rng.randbytes(20), *good[2:]],
        "overflowing shape": lambda: with_body(arrays=[{"name": "tokens", "dtype": "int32", "shape": [2**40] * 3}, *body["arrays"][1:]]),
        "65 dimensions": lambda: with_body(arrays=[{"name": "tokens", "dtype": "int32", "shape": [1] * 65}, *body["arrays"][1:]]),
        "forged token": lambda: good,
        "token id 2**31-1": lambda: [good[0], good[1], np.array([2**31 - 1] * 10, np.int32).tobytes(), good[3]],
        "NaN log-probs": lambda: [good[0], good[1], good[2], np.full(4, np.nan, np.float32).tobytes()],
        "hello of 2**40 actors": lambda: control(protocol.Hello(9, "x", num_actors=2**40)),
        "rollout request returning -1e9": lambda: control(protocol.RolloutRequest(9, 8, -(10**9))),
        "heartbeat of 10,000 stats": lambda: control(protocol.Heartbeat("x", 0, "", {f"s{i}": 1.0 for i in range(10_000)})),
        "request before hello": lambda: control(protocol.WeightsRequest(9)),
    }  # fmt: skip
    names = sorted(kinds)
    out = []
    for i in range(n):
        kind = names[i % len(names)]
        channel = "control" if kind.startswith(("hello", "rollout", "heartbeat", "request")) else "experience"
        out.append((kind, channel, kinds[kind]()))
    return out


def send_garbage(endpoints: dict, n: int) -> tuple[Counter, zmq.Context, zmq.Socket]:
    """Send ``n`` hostile messages; the sockets stay open (returned: the context and the control socket, whose
    replies must be read) until the learner has read them: it reads experience only while its buffer has room,
    and a closed socket drops what it still holds."""
    rng, sent = random.Random(0), Counter()
    ctx = zmq.Context()
    pusher, dealer = ctx.socket(zmq.PUSH), ctx.socket(zmq.DEALER)
    pusher.connect(endpoints["experience"])
    dealer.connect(endpoints["control"])
    for kind, channel, frames in hostile_messages(rng, n):
        (dealer if channel == "control" else pusher).send_multipart(frames)
        sent[kind] += 1
    return sent, ctx, dealer


def drain(sock: zmq.Socket) -> None:
    """Read and discard what the learner answered (refusals): unread replies stall the hostile connection."""
    while sock.poll(0):
        sock.recv_multipart()


def rejects_since(before: dict, run_dir: Path) -> dict:
    after = rows(run_dir)[-1]
    return {
        k: after[k] - before.get(k, 0)
        for k in after
        if k.startswith("reject/") and after[k] - before.get(k, 0)
    }


def kill_actor(launcher: subprocess.Popen, run_dir: Path) -> None:
    """SIGKILL actor 1 and wait until the launcher restarted it and it rejoined (its next batches trained)."""
    victim = next(
        p
        for p in family(launcher)
        if "--actor-id" in p.cmdline() and p.cmdline()[p.cmdline().index("--actor-id") + 1] == "1"
    )
    before = Path(f"{run_dir}.log").read_text().count("actor 1 continues at batch")
    victim.send_signal(signal.SIGKILL)
    wait(lambda: Path(f"{run_dir}.log").read_text().count("actor 1 continues at batch") > before, "a rejoin")
    done = len(rows(run_dir))
    wait(lambda: len(rows(run_dir)) >= done + 2, "two more updates")


def audit(run_dir: Path) -> dict:
    groups = [tuple(g) for r in rows(run_dir) for g in r["trained/groups"]]
    gaps = 0
    for actor in {a for a, _, _ in groups}:
        batches = sorted({b for a, b, _ in groups if a == actor})
        gaps += len(set(range(batches[-1] + 1)) - set(batches)) if batches else 0
    return {"groups": len(groups), "trained_twice": len(groups) - len(set(groups)), "batches_skipped": gaps}


def sandbox_escapes() -> dict:
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", str(ROOT / "tests" / "unit" / "test_sandbox.py")],
                         capture_output=True, text=True, cwd=ROOT)  # fmt: skip
    counts = dict((k, int(v)) for v, k in re.findall(r"(\d+) (passed|failed|skipped)", out.stdout))
    return {"tests": counts, "returncode": out.returncode}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--garbage", type=int, default=2000)
    p.add_argument("--kills", type=int, default=3)
    p.add_argument("--run-dir", type=Path, default=Path("/tmp/mlx-ppo-faults"))
    p.add_argument("--output", type=Path, default=ROOT / "bench" / "results" / "faults.json")
    args = p.parse_args(argv)
    subprocess.run(["rm", "-rf", str(args.run_dir), f"{args.run_dir}.log"], check=True)
    launcher = launch(args.run_dir)
    wait(lambda: len(rows(args.run_dir)) >= 10, "the first updates")  # memory is measured after the warm-up
    learner = next(p for p in family(launcher) if "learner" in p.cmdline())
    rss_before = learner.memory_info().rss
    before = {k: v for k, v in rows(args.run_dir)[-1].items() if k.startswith("reject/")}
    sent, hostile, replies = send_garbage(endpoints_of(launcher), args.garbage)
    counted_all = settle(
        lambda: drain(replies) or sum(rejects_since(before, args.run_dir).values()) >= args.garbage, 120
    )
    hostile.destroy(linger=0)
    done = len(rows(args.run_dir))
    wait(lambda: len(rows(args.run_dir)) >= done + 3, "updates after the garbage")
    rss_growth_mb = (learner.memory_info().rss - rss_before) / 2**20
    counted = rejects_since(before, args.run_dir)
    for _ in range(args.kills):
        kill_actor(launcher, args.run_dir)
    for proc in [psutil.Process(launcher.pid), *family(launcher)]:
        proc.kill()
    wait(lambda: launcher.poll() is not None, "the kill")
    resumed = launch(args.run_dir, resume=True)
    done = len(rows(args.run_dir))
    wait(lambda: len(rows(args.run_dir)) >= done + 5, "updates after the resume")
    resumed.send_signal(signal.SIGINT)
    resumed.wait(timeout=120)
    result = run_record(argv) | {
        "garbage_sent": dict(sent), "garbage_total": sum(sent.values()), "rejects_counted": counted,
        "counted_within_120_s": counted_all, "lag_dropped_sequences": rows(args.run_dir)[-1].get("lag/dropped", 0),  # counted across the resume
        "rejects_total": sum(counted.values()), "learner_rss_growth_mb": rss_growth_mb,
        "actor_kills": args.kills, "resume_returncode": resumed.returncode, "updates": rows(args.run_dir)[-1]["step"],
        "exactly_once": audit(args.run_dir), "sandbox": sandbox_escapes(),
    }  # fmt: skip
    args.output.write_text(json.dumps(result, indent=1))
    print(json.dumps({k: v for k, v in result.items() if k not in ("garbage_sent",)}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())


def render_faults(result: dict) -> list[str]:
    """BENCHMARKS.md's block: what was done to the run and what happened."""
    once = result["exactly_once"]
    sandbox = result["sandbox"]["tests"]
    rows = [
        ["hostile messages from peers that never said hello", f"{result['garbage_total']} sent",
         f"{result['rejects_total']} counted under reject/*; learner memory {result['learner_rss_growth_mb']:+.0f} MiB"],
        ["SIGKILL of an actor, restarted by the launcher", f"{result['actor_kills']}",
         "each rejoined and continued after its newest delivered batch"],
        ["SIGKILL of every process, then --resume", "1", f"resume exit {result['resume_returncode']}"],
        ["groups trained (the whole run)", f"{once['groups']}",
         f"{once['trained_twice']} trained twice, {once['batches_skipped']} batches not trained"
         f" ({result.get('lag_dropped_sequences', 0)} sequences dropped by the lag bound, counted)"],
        ["sandbox escapes and reward hacks (tests/unit/test_sandbox.py)", f"{sum(sandbox.values())}",
         f"{sandbox.get('passed', 0)} contained, {sandbox.get('failed', 0)} not, {sandbox.get('skipped', 0)} skipped"],
    ]  # fmt: skip
    lines = ["| what was done | how many | what happened |", "|---|---:|---|"]
    lines += [f"| {' | '.join(r)} |" for r in rows]
    kinds = ", ".join(f"{k} {v}" for k, v in sorted(result["garbage_sent"].items()))
    counted = ", ".join(f"`{k}` {v}" for k, v in sorted(result["rejects_counted"].items()))
    if not result.get("counted_within_120_s", True):
        counted += " (not every message was counted within 120 s)"
    return [*lines, "", f"Sent: {kinds}.", "", f"Counted: {counted}; {result['updates']} updates in all."]
