"""Data parallelism inside one learner process on the CPU: the shards of each micro-batch on worker threads.

Why: MLX's CPU backend runs every elementwise op on one thread (its stream's), and in a LoRA update those ops
take most of the time (BENCHMARKS.md, issue 3): BLAS threads speed up only the GEMMs. ``ShardPool`` gives each
of N worker threads its own CPU stream and its own *view* of the model (a structural clone whose arrays are the
model's own, not copies) and runs one shard of a micro-batch on each at once; the caller sums the shards'
gradients exactly as it sums micro-batches. Peak memory stays that of one micro-batch.

Why threads and not N streams driven from one thread: one ``mx.eval`` over several streams' graphs overlaps
forward passes, but a backward pass into parameters ran serially (measured: 1.05 CPU cores busy of 2), while
one eval per thread, each on its own stream, overlaps both (1.75). Why a view per worker: ``nn.value_and_grad``
writes tracer arrays into the module it differentiates, so two threads on one module would mix their graphs.

With one thread (the default off the CPU, where a GPU runs the elementwise work) everything runs in the
caller's thread on the default stream, exactly as without a pool.
"""

from __future__ import annotations

import os
import queue
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten

from common.blas import set_blas_threads
from learner.models import share_weights_clone

T = TypeVar("T")


def auto_threads(requested: int) -> int:
    """Worker threads for ``ppo.compute_threads``: ``requested`` if > 0; 0 picks the cores this process may use
    (``OPENBLAS_NUM_THREADS`` when the launcher set it: its share of the machine) on the CPU backend, 1 on a GPU."""
    if requested > 0:
        return requested
    if mx.default_device() != mx.cpu:
        return 1
    budget = os.environ.get("OPENBLAS_NUM_THREADS", "")
    if budget.isdigit() and int(budget) > 0:
        return int(budget)
    if hasattr(os, "sched_getaffinity"):  # Linux: the cores this process may run on (containers, taskset)
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def split_rows(rows: np.ndarray, parts: int) -> list[np.ndarray]:
    """``rows`` in at most ``parts`` contiguous, non-empty, near-equal pieces (order kept)."""
    return np.array_split(rows, min(parts, len(rows))) if len(rows) else []


def micro_batch_shards(micro_batches: list[np.ndarray], parts: int) -> list[np.ndarray]:
    """Each of ``micro_batches`` split over ``parts`` workers (``split_rows``), in order."""
    return [piece for rows in micro_batches for piece in split_rows(rows, parts)]


@dataclass
class Worker:
    """What a job sees: the worker's view of the model and a cache for what it builds once (compiled steps)."""

    index: int
    module: nn.Module
    cache: dict[str, Any] = field(default_factory=dict)


class _Executor(threading.Thread):
    """A worker thread with its own MLX stream, running ``(index, worker, fn, shard, results)`` jobs in order.

    Executors live as long as the process and are shared by every pool in it: MLX (0.32) aborts the process at
    exit ("terminate called without an active exception") once a thread that made a stream has ended, which a
    pool stopping its threads did in 12 runs of 12.
    """

    def __init__(self, index: int, device: mx.Device):
        super().__init__(name=f"learner-shard-{index}", daemon=True)
        self.device = device
        self.jobs: queue.Queue = queue.Queue()

    def run(self) -> None:
        stream = mx.new_stream(self.device)  # streams belong to the thread that made them
        while True:
            # The job's names go out of scope with _run: an idle executor keeps no model view (of a learner that
            # may be gone) alive.
            self._run(stream, *self.jobs.get())

    @staticmethod
    def _run(
        stream: mx.Stream, index: int, worker: Worker, fn: Callable, shard: Any, results: queue.Queue
    ) -> None:
        try:
            with mx.stream(stream):
                out = fn(worker, shard)
                mx.eval(out)
            results.put((index, True, out))
        except BaseException as exc:  # handed to the caller, which raises it
            results.put((index, False, exc))


_executors: dict[str, list[_Executor]] = {}
_executors_lock = threading.Lock()


def _executors_for(device: mx.Device, count: int) -> list[_Executor]:
    with _executors_lock:
        pool = _executors.setdefault(str(device), [])
        while len(pool) < count:
            pool.append(_Executor(len(pool), device))
            pool[-1].start()
        return pool[:count]


class ShardPool:
    """Runs ``fn(worker, shard)`` for a list of shards on worker threads and returns the evaluated results."""

    def __init__(self, module: nn.Module, threads: int = 1):
        if threads < 1:
            raise ValueError(f"threads={threads}: need at least 1")
        self.module = module
        self.size = threads
        if threads == 1:
            self._executors: list[_Executor] = []
            self.workers = [Worker(0, module)]
            return
        # Several GEMMs now run at once, one per worker: OpenBLAS threads would only spin against each other.
        set_blas_threads(1)
        self.workers = [Worker(i, share_weights_clone(module)) for i in range(threads)]
        self._executors = _executors_for(mx.default_device(), threads)

    def map(self, fn: Callable[[Worker, Any], T], shards: Sequence[Any]) -> list[T]:
        """``[fn(worker, shard) for shard in shards]``, evaluated (see ``imap``)."""
        return list(self.imap(fn, shards))

    def imap(self, fn: Callable[[Worker, Any], T], shards: Sequence[Any]) -> Iterator[T]:
        """Yield ``fn(worker, shard)`` for each shard, evaluated, in the order of ``shards``.

        Shard ``i`` runs on worker ``i % size`` (its shards in order, no barrier between micro-batches): at most
        ``size`` shards' activations are in memory at once, and a result is handed on once it and those before it
        are done. A shard that raised is raised once every shard finished.
        """
        if not self._executors:
            for shard in shards:
                out = fn(self.workers[0], shard)
                mx.eval(out)  # one shard's activations alive at a time
                yield out
            return
        # The optimizer replaced the model's arrays since the last call: point every view at the current ones.
        weights = self.module.parameters()
        # Lazy arrays (weights cast on load, fresh adapters, the caller's inputs) belong to this thread's stream:
        # a worker could not evaluate them. A no-op for what is evaluated already.
        mx.eval(weights, [leaf for _, leaf in tree_flatten(list(shards)) if isinstance(leaf, mx.array)])
        for worker in self.workers:
            worker.module.update(weights)
        results: queue.Queue = queue.Queue()
        for index, shard in enumerate(shards):
            slot = index % self.size  # a view is only ever used by its own executor
            self._executors[slot].jobs.put((index, self.workers[slot], fn, shard, results))
        ready, next_index, failure = {}, 0, None
        for _ in shards:
            index, ok, value = results.get()
            if not ok:
                failure = failure or value
                continue
            ready[index] = value
            while failure is None and next_index in ready:
                yield ready.pop(next_index)
                next_index += 1
        if failure is not None:
            raise failure
