"""Runtime benchmarks: weight sync to actors, transport overhead, end-to-end samples/s vs a synchronous loop.

    python bench/runtime.py [sync] [transport] [scaling] [--actors 1,2,4] [--updates 4] [--set KEY=VALUE]...

- sync: the learner publishes real SmolLM2-135M LoRA snapshots to 1/2/4 actor processes over TCP loopback;
  latency = publish until every actor has decoded, verified and applied it and said so (p50/p90 of 10).
- transport: one experience batch (16 x 128 tokens) encoded, sent over TCP, received and decoded, against the
  learner's update time from ``bench/results/learner.json``.
- scaling: samples/s of the whole system (learner + N actor processes) against the synchronous
  generate-then-train loop in one process (``--one-process``), same model, settings and cores. ``--set`` adds
  config overrides after ``SCALING_SETTINGS`` (e.g. larger batches on a GPU); each row also reports the learner's
  busy fraction over updates 2..N, the largest policy lag and the sequences dropped (from ``metrics.jsonl``).
  More layouts with ``--layout [NAME=]sync|N[:KEY=VALUE;...]`` (``bench/launch_runs.parse_layout``; e.g.
  ``--layout wide=1:sampling.batch_size=256``: one actor with a batch of its own), ``--no-sync-row``,
  ``--warmup N`` (updates left out of the rates; 1 by default), ``--run-timeout S`` (a run past it is stopped
  and counted with the updates it finished). Rows also carry seconds per update, the learner's median update
  time, generated tokens per update and peak memory; the JSON is rewritten after every row.

Prints markdown tables and writes ``bench/results/runtime.json``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402

from bench.launch_runs import Layout, bench_scaling, exit_on_sigterm, parse_layout  # noqa: E402
from bench.machine import describe_machine, run_record  # noqa: E402

RESULTS = Path(__file__).parent / "results"
SCALING_SETTINGS = [
    'ppo.algorithm="grpo"',
    'ppo.reference_on="actors"',
    "sampling.batch_size=8",
    "sampling.max_new_tokens=96",
    "ppo.batch_size=8",
    "ppo.group_size=4",
    "ppo.num_minibatches=1",
    "ppo.micro_batch_size=4",
    "ppo.update_epochs=1",
    'run.task="length"',
    "run.checkpoint_every=1000",
]


def _policy_model(name: str = "default"):
    from common.config import LoraConfig, ModelConfig
    from common.models import load_policy

    return load_policy(ModelConfig(name=name), LoraConfig()).model


def run_receiver(endpoints_json: str, actor_id: int, model_name: str) -> None:
    """An actor stand-in: apply every snapshot it gets and acknowledge its version over control."""
    from common import protocol
    from common.transport import ActorSockets, Endpoints, zmq_context
    from common.weights import AdapterSync, read_shared

    model = _policy_model(model_name)
    adapters = AdapterSync(model)
    with zmq_context() as ctx:
        sockets = ActorSockets(ctx, Endpoints(**json.loads(endpoints_json)))
        sockets.request(protocol.Hello(actor_id, "bench"))
        while True:
            for frames in sockets.receive_weights():
                msg = protocol.decode(frames)
                if isinstance(msg, protocol.Shutdown):
                    sockets.close()
                    return
                if msg.policy_version > 0:
                    adapters.apply(read_shared(msg) if msg.shared else msg)
                sockets.request(protocol.Heartbeat(f"actor-{actor_id}", msg.policy_version))
            if not sockets.weights.poll(1000):
                sockets.request(protocol.Hello(actor_id, "bench"))  # keep saying hello until probes arrive


def _await_acks(sockets, version: int, n: int, deadline_s: float = 120.0) -> None:
    from common import protocol

    acked, deadline = set(), time.monotonic() + deadline_s
    while len(acked) < n:
        if time.monotonic() > deadline:
            raise TimeoutError(f"only {len(acked)}/{n} actors acknowledged v{version}")
        for _, identity, frames in sockets.poll(100, read_experience=False):
            msg = protocol.decode(frames)
            if isinstance(msg, protocol.Heartbeat) and msg.policy_version == version:
                acked.add(identity)


def bench_sync(
    num_actors: int, repeats: int = 10, model_name: str = "default", hosts=None, shared: bool = False
) -> dict:
    """Sync latency to ``num_actors`` receivers: local processes, or one per namespace of ``hosts`` (over the bridge).
    ``shared``: snapshots go as shared-memory files (``transport.share_snapshots``), announced over the socket."""
    from bench.netns import BRIDGE_ADDRESS
    from common import protocol
    from common.transport import Endpoints, LearnerSockets, free_tcp_ports, zmq_context
    from common.weights import AdapterSync, SharedSnapshots, shared_announcement

    model = _policy_model(model_name)
    adapters = AdapterSync(model)
    files = SharedSnapshots("bench-sync") if shared else None
    address = "127.0.0.1" if hosts is None else BRIDGE_ADDRESS
    endpoints = Endpoints.tcp(address, free_tcp_ports(address))
    cmd = [sys.executable, __file__, "--receiver", "--model", model_name, json.dumps(endpoints.as_dict())]
    prefixes = [[] if hosts is None else hosts.prefix(f"a{i}") for i in range(num_actors)]
    procs = [subprocess.Popen([*prefix, *cmd, str(i)]) for i, prefix in enumerate(prefixes)]
    latencies = []
    with zmq_context() as ctx:
        sockets = LearnerSockets(ctx, endpoints)
        try:
            probe = protocol.Weights(0, "", (), (), "float32", np.zeros(0, np.float32))
            acked_probe = False
            while not acked_probe:  # subscriptions are live once every actor acknowledged a probe
                sockets.publish(probe)
                try:
                    _await_acks(sockets, 0, num_actors, deadline_s=1.0)
                    acked_probe = True
                except TimeoutError:
                    pass
            for version in range(1, repeats + 1):
                start = time.perf_counter()
                msg = adapters.snapshot(version)
                sockets.publish(msg if files is None else shared_announcement(msg, msg, files.share(msg)))
                _await_acks(sockets, version, num_actors)
                latencies.append(1000 * (time.perf_counter() - start))
            sockets.publish(protocol.Shutdown("bench done"))
        finally:
            sockets.close()
            if files is not None:
                files.close()
    for p in procs:
        p.wait(timeout=60)
    full_bytes = sum(v.nbytes for k, v in _flat(model).items())
    return {
        "actors": num_actors,
        "p50_ms": float(np.percentile(latencies, 50)),
        "p90_ms": float(np.percentile(latencies, 90)),
        "bytes": int(msg.flat.nbytes),
        "full_bytes": int(full_bytes),
    }


def run_sync(actor_counts: list[int], model: str, netns: bool) -> list[dict]:
    """Sync rows on loopback (the snapshot in the message, then as a shared-memory file as actors on the learner's
    machine get it), then (``netns``) with every actor in a namespace of its own behind a veth pair."""
    rows = [{"where": "loopback", **bench_sync(n, model_name=model)} for n in actor_counts]
    rows += [{"where": "shared file", **bench_sync(n, model_name=model, shared=True)} for n in actor_counts]
    if netns:
        from bench.netns import Hosts

        hosts = Hosts([f"a{i}" for i in range(max(actor_counts))])
        try:
            rows += [
                {"where": "namespaces", **bench_sync(n, model_name=model, hosts=hosts)} for n in actor_counts
            ]
        finally:
            hosts.close()
    return rows


def _flat(model) -> dict:
    from mlx.utils import tree_flatten

    return {k: v for k, v in tree_flatten(model.parameters()) if "lora" not in k}


def bench_transport(repeats: int = 30) -> dict:
    import zmq

    from common import protocol
    from common.transport import free_tcp_ports, zmq_context

    rng = np.random.default_rng(0)
    seqs = tuple(protocol.Sequence_(64, 64, 0.5, "stop", i) for i in range(16))
    batch = protocol.ExperienceBatch(
        0,
        0,
        0,
        seqs,
        rng.integers(0, 49152, 16 * 128).astype(np.int32),
        -rng.random(16 * 64).astype(np.float32),
    )
    port = free_tcp_ports(count=1)[0]
    times = []
    with zmq_context() as ctx:
        pull, push = ctx.socket(zmq.PULL), ctx.socket(zmq.PUSH)
        pull.bind(f"tcp://127.0.0.1:{port}")
        push.connect(f"tcp://127.0.0.1:{port}")
        for _ in range(repeats):
            start = time.perf_counter()
            push.send_multipart(protocol.encode(batch), copy=False)
            protocol.decode(pull.recv_multipart())
            times.append(1000 * (time.perf_counter() - start))
        pull.close(linger=0)
        push.close(linger=0)
    learner = RESULTS / "learner.json"
    update_s = json.loads(learner.read_text())["rows"][0]["update_s"] if learner.exists() else float("nan")
    size = sum(len(f) for f in protocol.encode(batch))
    return {"p50_ms": float(np.median(times)), "bytes": size, "update_s": update_s}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("parts", nargs="*", default=["sync", "transport", "scaling"])
    parser.add_argument("--actors", default="1,2,4", type=lambda s: [int(x) for x in s.split(",")])
    parser.add_argument("--updates", type=int, default=4)
    parser.add_argument("--workdir", default="/tmp/mlx-ppo-bench-runtime")
    parser.add_argument("--model", default="default", help="model for the sync and scaling runs")
    parser.add_argument(
        "--netns", action="store_true", help="sync: also to actors in network namespaces of their own (root)"
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        dest="overrides",
        help="scaling: extra config override KEY=VALUE",
    )
    parser.add_argument(
        "--layout",
        action="append",
        default=[],
        dest="layouts",
        help="scaling: one more layout after --actors' (parse_layout: e.g. wide=1:sampling.batch_size=64)",
    )
    parser.add_argument("--no-sync-row", action="store_true", help="scaling: leave out the one-process row")
    parser.add_argument("--warmup", type=int, default=1, help="scaling: updates left out of the rates")
    parser.add_argument("--run-timeout", type=float, default=3600.0, help="scaling: seconds per run")
    parser.add_argument("--output", default=str(RESULTS / "runtime.json"))
    parser.add_argument("--receiver", action="store_true", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def scaling_layouts(args: argparse.Namespace) -> list[Layout]:
    """The one-process row (unless ``--no-sync-row``), one row per ``--actors`` count, then ``--layout``'s."""
    layouts = [] if args.no_sync_row else [parse_layout("sync")]
    return layouts + [parse_layout(str(n)) for n in args.actors] + [parse_layout(s) for s in args.layouts]


def print_scaling(rows: list[dict]) -> None:
    base = rows[0]["samples_per_s"]
    print(
        "| layout | actors | samples/s | vs first row | s/update | learner busy | lag max | dropped |\n"
        "|---|---:|---:|---:|---:|---:|---:|---:|"
    )
    for r in rows:
        busy = "" if r["busy_min"] is None else f"{r['busy_min']:.2f}-{r['busy_max']:.2f}"
        rate, per = r["samples_per_s"], r["s_per_update"]
        cells = (
            ["-", "-", "-"]
            if rate is None
            else [f"{rate:.3f}", f"{rate / (base or rate):.2f}x", f"{per:.2f}"]
        )
        print(
            f"| {r['layout']} | {r['actors']} | {' | '.join(cells)} | {busy} | {r['lag_max']} | {r['dropped']} |"
        )


def print_sync(rows: list[dict]) -> None:
    print(
        "| actors | where | sync p50 ms | sync p90 ms | snapshot MB | share of full weights |\n"
        "|---:|---|---:|---:|---:|---:|"
    )
    for r in rows:
        print(
            f"| {r['actors']} | {r['where']} | {r['p50_ms']:.0f} | {r['p90_ms']:.0f} | {r['bytes'] / 1e6:.1f} | "
            f"{r['bytes'] / r['full_bytes']:.2%} |"
        )


def main() -> None:
    args = parse_args()
    exit_on_sigterm()
    if args.receiver:
        run_receiver(args.parts[0], int(args.parts[1]), args.model)
        return
    results: dict = {**run_record(), "machine": f"{describe_machine()}; date {date.today()}"}
    print(results["machine"])
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)

    def save(rows: list[dict] | None = None) -> None:  # after every part and scaling row: a kill keeps those
        if rows is not None:
            results["scaling"] = rows
        output.write_text(json.dumps(results, indent=2))

    if "sync" in args.parts:
        results["sync"] = run_sync(args.actors, args.model, args.netns)
        print_sync(results["sync"])
    if "transport" in args.parts:
        t = results["transport"] = bench_transport()
        print(
            f"transport: {t['bytes'] / 1e3:.0f} kB batch in {t['p50_ms']:.2f} ms p50 = "
            f"{t['p50_ms'] / 1000 / t['update_s']:.4%} of a {t['update_s']:.1f} s update"
        )
    if "scaling" in args.parts:
        settings = [*SCALING_SETTINGS, *args.overrides, f"model.name={json.dumps(args.model)}"]
        results["scaling_settings"] = settings
        limits = {"timeout_s": args.run_timeout, "warmup": args.warmup}
        rows = bench_scaling(
            scaling_layouts(args), args.updates, Path(args.workdir), settings, save, **limits
        )
        results["scaling"] = rows
        print_scaling(rows)
    save()


if __name__ == "__main__":
    main()
