"""One GPU shared by a run's learner and actors: each process gets its part of the device's memory.

MLX lets a process use nearly the whole device and keeps freed buffers cached up to that limit. Alone that is
right; but a learner and actors on one GPU (a Mac's unified memory, or one CUDA device) each cache up to it, and
the one that allocates last fails: seen on an H200 with the 1.7B shape, 1 learner + 1 or 2 actors,
``cudaMallocAsync ... out of memory`` in the learner after its first update and in an actor mid-decode. The
launcher tells each local child how many learners and actors share its device (``MLX_PPO_DEVICE_SHARE``,
"learners,actors": on a host of several GPUs, only those on the child's own GPU, ``launcher/gpu_placement.py``);
each then sets MLX's memory limit to its part of ``SHARED_USABLE`` of the device, so MLX returns cached buffers
before crossing it, and the learner sizes its automatic micro-batches from its part (``learner/micro_batches.py``). Nothing changes on the CPU backend
or for a process alone on its device.
"""

from __future__ import annotations

import logging
import os

import mlx.core as mx

logger = logging.getLogger(__name__)

SHARE_ENV = "MLX_PPO_DEVICE_SHARE"
LEARNER_PART = 0.6
"""Of the device's memory, the learners' part when actors share it (split evenly between learner ranks); the
actors split the rest. The learner's gradient step is the large user (76 GB peak at 64 x 512 tokens on the 1.7B
shape with the automatic budget); an actor needs its weights, KV cache and sampling buffers."""
SHARED_USABLE = 0.85
"""Of a shared device's memory, what the processes' limits add up to. MLX's limit bounds what it allocates and
caches, not the CUDA context, cuBLAS/cuDNN workspaces or the allocator's fragmentation of each process, and it is
a guideline (past it MLX frees its cache and allocates anyway). With limits adding up to the whole H200, 1 learner
+ 2 actors on the 1.7B shape ran out of memory in the learner's first update
(``bench/results/h200/finish/oom-1.7b-2x128-shares.log``); the 15% left out is ~22 GB there."""


def share_value(num_learners: int, num_actors: int) -> str:
    """The ``"learners,actors"`` value of ``SHARE_ENV`` for the processes on one device (``memory_part`` reads it)."""
    return f"{num_learners},{num_actors}"


def share_env(num_learners: int, num_actors: int) -> dict[str, str]:
    """The variable the launcher gives each child that runs on this machine's device."""
    return {SHARE_ENV: share_value(num_learners, num_actors)}


def memory_part(role: str, share: str | None) -> float:
    """This process's part of the device memory (1.0 alone) for ``role`` 'learner' or 'actor', from the
    ``"learners,actors"`` string; a malformed value counts as alone (logged)."""
    if not share:
        return 1.0
    try:
        learners, actors = (int(x) for x in share.split(","))
    except ValueError:
        logger.warning("%s=%r is not 'learners,actors': using the whole device", SHARE_ENV, share)
        return 1.0
    if learners < 0 or actors < 0 or learners + actors <= 1:
        return 1.0
    if actors == 0:
        return 1.0 / learners
    if learners == 0:  # a GPU of actors only (launcher/gpu_placement.py): they split all of it
        return 1.0 / actors
    return LEARNER_PART / learners if role == "learner" else (1.0 - LEARNER_PART) / actors


def device_memory_bytes(info: dict) -> int:
    """The device's memory as MLX reports it (CUDA ``total_memory``, Metal its recommended working set); 0 on
    the CPU backend or when unknown."""
    return int(info.get("total_memory") or info.get("max_recommended_working_set_size") or 0)


def shared_limit(part: float, total: int) -> int:
    """The memory limit, in bytes, of a process holding ``part`` (< 1) of a shared device of ``total`` bytes."""
    return int(part * SHARED_USABLE * total)


_applied = {"limit": 0}


def applied_limit() -> int:
    """The memory limit ``apply_device_share`` set in this process (0: none, the device is not shared)."""
    return _applied["limit"]


def apply_device_share(role: str) -> int:
    """Set MLX's memory limit to this process's part of a shared device; returns the limit (0: none set)."""
    part = memory_part(role, os.environ.get(SHARE_ENV))
    if part >= 1.0 or mx.default_device() == mx.cpu:
        return 0
    total = device_memory_bytes(mx.device_info())
    if total <= 0:
        return 0
    limit = shared_limit(part, total)
    mx.set_memory_limit(limit)
    _applied["limit"] = limit
    logger.info("%s: %.0f%% of the %.0f%% the processes share of the device's %.1f GB (memory limit %.1f GB)",
                role, 100 * part, 100 * SHARED_USABLE, total / 1e9, limit / 1e9)  # fmt: skip
    return limit
