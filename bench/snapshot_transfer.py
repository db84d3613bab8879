"""A full-weights snapshot to an actor: sent whole over TCP, fetched in chunks (``transport.chunk_mb``), or read
from a shared-memory file (an actor on the learner's machine, ``transport.share_snapshots``), end to end.

    python -m common.blas -- python bench/snapshot_transfer.py [--model default] [--chunk-mb 16,64] [--repeats 3]

A server thread plays the learner (a ROUTER on TCP loopback answering with ``protocol.encode``d messages: the
whole snapshot, or ``snapshot_chunk``s), the main thread the actor (a DEALER: asks, decodes, assembles with at
most 4 chunks in flight, applies to its model and checks the checksum). Times from the request until the model
holds the weights, best of ``--repeats``; the largest message either side holds is the snapshot or one chunk.
The shared row includes the learner writing the file (once per snapshot, whatever the number of local actors).
Writes ``bench/results/snapshot_transfer.json``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import zmq  # noqa: E402

from bench.machine import describe_machine, run_record  # noqa: E402
from common import protocol  # noqa: E402
from common.config import ModelConfig  # noqa: E402
from common.models import load_model  # noqa: E402
from common.weights import (  # noqa: E402
    AdapterSync,
    SharedSnapshots,
    SnapshotAssembly,
    announcement,
    read_shared,
    shared_announcement,
    snapshot_chunk,
)

LIMIT = 2**31  # decode limit: the whole-message case must fit


def serve(router: zmq.Socket, snapshot: protocol.Weights, announce: protocol.Weights, stop: threading.Event):
    """Answer requests until ``stop``: a WeightsRequest with ``announce`` (written to its shared file first if it
    has one), a chunk request with the chunk."""
    shared = SharedSnapshots("bench") if announce.shared else None
    while not stop.is_set():
        if not router.poll(50):
            continue
        identity, *frames = router.recv_multipart()
        msg = protocol.decode(frames, LIMIT)
        if isinstance(msg, protocol.WeightsRequest):
            reply = announce
            if shared is not None:
                reply = dataclasses.replace(announce, shared=shared.share(snapshot))
        else:
            reply = snapshot_chunk(snapshot, announce, msg)
        router.send_multipart([identity, *protocol.encode(reply)], copy=False)
    if shared is not None:
        shared.close()


def fetch(dealer: zmq.Socket, target: AdapterSync) -> float:
    """Seconds from asking until the snapshot is applied."""
    start = time.perf_counter()
    dealer.send_multipart(protocol.encode(protocol.WeightsRequest(0, -1)))
    msg = protocol.decode(dealer.recv_multipart(copy=False), LIMIT)
    if msg.shared:
        msg = read_shared(msg)
    elif msg.chunk_size:
        assembly, complete = SnapshotAssembly(msg), False
        for request in assembly.requests(0):
            dealer.send_multipart(protocol.encode(request))
        while not complete:
            complete = assembly.add(protocol.decode(dealer.recv_multipart(copy=False), LIMIT))
            for request in assembly.requests(0):
                dealer.send_multipart(protocol.encode(request))
        msg = assembly.snapshot()
    target.apply(msg)
    return time.perf_counter() - start


def measure(
    source: AdapterSync, target: AdapterSync, chunk_mb: float, repeats: int, shared: bool = False
) -> dict:
    snapshot = source.snapshot(1)
    announce = announcement(snapshot, int(chunk_mb * 2**20))
    if shared:
        announce = shared_announcement(snapshot, announce, "(written on request)")
    ctx, stop = zmq.Context(), threading.Event()
    router, dealer = ctx.socket(zmq.ROUTER), ctx.socket(zmq.DEALER)
    port = router.bind_to_random_port("tcp://127.0.0.1")
    dealer.connect(f"tcp://127.0.0.1:{port}")
    server = threading.Thread(target=serve, args=(router, snapshot, announce, stop))
    server.start()
    try:
        seconds = min(fetch(dealer, target) for _ in range(repeats))
    finally:
        stop.set()
        server.join()
        router.close(linger=0)
        dealer.close(linger=0)
        ctx.term()
    largest = announce.chunk_size * snapshot.flat.itemsize if announce.chunk_size else snapshot.flat.nbytes
    largest = 0 if shared else largest
    return {
        "shared": shared,
        "chunk_mb": chunk_mb,
        "chunks": announce.num_chunks(),
        "seconds": seconds,
        "snapshot_mb": snapshot.flat.nbytes / 2**20,
        "largest_message_mb": largest / 2**20,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="default")
    parser.add_argument(
        "--chunk-mb", default="16,64", help="comma-separated chunk sizes to compare with whole"
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--output", default=str(Path(__file__).parent / "results" / "snapshot_transfer.json"))
    opts = parser.parse_args()
    config = ModelConfig(name=opts.model)
    source = AdapterSync(load_model(config).model, full_weights=True)
    target = AdapterSync(load_model(config).model, full_weights=True)
    rows = [measure(source, target, 0.0, opts.repeats)]
    rows += [measure(source, target, float(mb), opts.repeats) for mb in opts.chunk_mb.split(",")]
    rows.append(measure(source, target, 0.0, opts.repeats, shared=True))
    header = f"{describe_machine()}; model {opts.model}, every weight; best of {opts.repeats}"
    print(header)
    print("| transfer | chunks | largest message MB | time vs whole |\n|---|---:|---:|---:|")
    for r in rows:
        name = "whole" if not r["chunks"] else f"chunks of {r['chunk_mb']:g} MB"
        name = "shared-memory file" if r["shared"] else name
        print(
            f"| {name} | {r['chunks']} | {r['largest_message_mb']:.0f} | {r['seconds'] / rows[0]['seconds']:.2f}x |"
        )
    output = Path(opts.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps({**run_record(), "machine": header, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
