"""A whole run on this machine: supervised learner and actor processes.

``launch_local_run`` starts M learner ranks and N actors as fresh Python processes (``launch.py learner`` /
``launch.py actor``), each with BLAS threads capped to its share of the cores and without any inherited
``mlx.distributed`` variables (an actor that inherited them would try to join the learners' ring). Actor ``i``
belongs to learner rank ``i % M``. On a host of several CUDA GPUs each process gets its GPU by
``launcher/gpu_placement.py``'s rule (``CUDA_VISIBLE_DEVICES``), and M ranks may use the ``nccl`` backend when there
are M GPUs or more. Children run in their own sessions, so a Ctrl-C in the terminal reaches only the
launcher, which asks the learners to checkpoint and stop; children exit by themselves if the launcher dies
(``launcher/lifelines.py``).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from common.exit_codes import ExitCode
from launcher.defaults import ENTRY_POINT
from launcher.gpu_placement import Placement, describe, detect_gpus, place
from launcher.supervision import supervise

logger = logging.getLogger(__name__)

# What makes a process join a group. Other NCCL_ settings (NCCL_DEBUG, NCCL_SOCKET_IFNAME, NCCL_NVLS_ENABLE=0 on a
# host whose multicast must stay off) are the user's tuning and pass on to every child.
_DISTRIBUTED_ENV_PREFIXES = (
    "MLX_RANK", "MLX_HOSTFILE", "MLX_WORLD_SIZE", "MLX_RING", "MLX_JACCL", "NCCL_HOST_IP", "NCCL_PORT",
)  # fmt: skip


def split_threads(cores: int, num_actors: int, num_learners: int) -> tuple[int, int]:
    """BLAS threads per learner rank and per actor: the learners share half the cores, the actors the rest.

    In an async run the learner is the bottleneck once there are a few actors (BENCHMARKS.md, issue 4), and
    its GEMMs are the part of its step that threads speed up; an even split left it 3 of 16 cores.
    """
    learner = max(1, cores // (2 * num_learners))
    actor = max(1, (cores - learner * num_learners) // max(num_actors, 1))
    return learner, actor


def child_env(threads: int, distributed: dict[str, str] | None = None) -> dict[str, str]:
    """Environment for a child: this one (BLAS preload included), BLAS threads capped, no inherited MLX ranks."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(_DISTRIBUTED_ENV_PREFIXES)}
    env.update({"OPENBLAS_NUM_THREADS": str(threads), "OMP_NUM_THREADS": str(threads)})
    env.update(distributed or {})
    return env


def child_command(script: Path, role: str, config_path: Path, endpoints, extra: list[str]) -> list[str]:
    endpoint_json = json.dumps(endpoints.as_dict())
    common = ["--config", str(config_path), "--endpoints", endpoint_json, "--parent-pid", str(os.getpid())]
    return [sys.executable, str(script), role, *common, *extra]


def learner_rank_env(run_dir: Path, host: str, rank: int, num_learners: int) -> dict[str, str]:
    """mlx.distributed ring variables for one learner rank (none for a single learner)."""
    if num_learners == 1:
        return {}
    from common.transport import free_tcp_ports
    from learner.distributed import write_ring_hostfile

    hostfile = run_dir / "ring_hostfile.json"
    if rank == 0:
        write_ring_hostfile(hostfile, host, list(free_tcp_ports(host, num_learners)))
    return {"MLX_RANK": str(rank), "MLX_HOSTFILE": str(hostfile)}


def nccl_rank_env(port: int, rank: int, num_learners: int) -> dict[str, str]:
    """mlx.distributed's nccl variables for one rank of this host (MLX's "Distributed without mlx.launch" list;
    the rank's GPU comes from its placement). Rank 0 listens on loopback ``port`` for the others' rendezvous.
    NVLink multicast (NVLS) stays off: on shared hosts a program that uses it can take the GPUs out of service."""
    return {
        "MLX_RANK": str(rank),
        "MLX_WORLD_SIZE": str(num_learners),
        "NCCL_HOST_IP": "127.0.0.1",
        "NCCL_PORT": str(port),
        "NCCL_NVLS_ENABLE": "0",
    }


def rank_envs(cfg, num_learners: int) -> list[dict[str, str]]:
    """Every learner rank's ``mlx.distributed`` variables for ``run.backend`` (ring or nccl; none for one rank)."""
    if num_learners == 1:
        return [{}]
    if cfg.run.backend == "nccl":
        from common.transport import free_tcp_ports

        port = free_tcp_ports("127.0.0.1", 1)[0]
        return [nccl_rank_env(port, rank, num_learners) for rank in range(num_learners)]
    run_dir = Path(cfg.run.run_dir)
    return [learner_rank_env(run_dir, cfg.transport.host, rank, num_learners) for rank in range(num_learners)]


def child_envs(
    cfg, placement: Placement, learner_threads: int, actor_threads: int
) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """The whole environment of each learner rank and of each actor: ``child_env`` with its rank's distributed
    variables (learners), its GPU and its device share (``placement``)."""
    ranks = rank_envs(cfg, len(placement.learners))
    learners = [
        child_env(learner_threads, {**r, **p.env()}) for r, p in zip(ranks, placement.learners, strict=True)
    ]
    return learners, [child_env(actor_threads, p.env()) for p in placement.actors]


def with_local_keys(cfg, run_dir: Path):
    """``cfg`` with ``transport.keys_dir`` set to ``<run_dir>/keys`` (made once, kept for a resume) when it asks
    for ``transport.local_auth`` and names no keys of its own."""
    from common.transport import make_keys

    if not cfg.transport.local_auth or cfg.transport.keys_dir:
        return cfg
    keys = run_dir / "keys"
    if not (keys / "learner.key_secret").is_file():
        make_keys(keys)
    keys.chmod(0o700)
    return dataclasses.replace(cfg, transport=dataclasses.replace(cfg.transport, keys_dir=str(keys)))


def local_run_problems(cfg, num_actors: int, num_learners: int, gpus: list[str] | None = None) -> list[str]:
    """Why this run cannot start on this machine (checked once here, not in every actor after its model loads).

    ``gpus``: this host's CUDA GPUs (default: ``detect_gpus()``); nccl ranks need one each.
    """
    from actors.rewards import task_problems

    if problems := task_problems(cfg):
        return problems
    backend = cfg.run.backend
    if num_learners > 1 and backend not in ("ring", "nccl"):
        return [
            f"--learners {num_learners} on one machine uses the ring or nccl backend; start {backend} ranks with "
            f"mlx.launch and 'launch.py learner --backend {backend}' instead"
        ]
    if num_learners > 1 and backend == "nccl":
        found = len(detect_gpus() if gpus is None else gpus)
        if found < num_learners:
            fewer = f" or --learners {found}" if found > 1 else ""
            return [
                f"--learners {num_learners} with run.backend 'nccl' needs one CUDA GPU per rank; this host has "
                f"{found} (CUDA_VISIBLE_DEVICES, else nvidia-smi -L): use --backend ring{fewer}"
            ]
    if num_learners < 1 or num_actors < num_learners:
        return ["need --learners >= 1 and at least one actor per learner rank (--actors >= --learners)"]
    return []


def start_learners(
    config_path: Path, ranks: list, envs: list[dict[str, str]], resume: bool, script: Path
) -> dict:
    """One process per learner rank (rank ``r`` bound to ``ranks[r]``, environment ``envs[r]``), by name."""
    procs = {}
    for rank, (endpoints, env) in enumerate(zip(ranks, envs, strict=True)):
        extra = ["--rank", str(rank)] + ["--resume"] * resume
        procs[f"learner-{rank}"] = subprocess.Popen(
            child_command(script, "learner", config_path, endpoints, extra), env=env, start_new_session=True
        )
    return procs


def actor_starters(
    config_path: Path, ranks: list, envs: list[dict[str, str]], script: Path
) -> dict[str, Callable[[], subprocess.Popen]]:
    """How to start (and restart) each actor, by name; actor ``i`` connects to rank ``i % len(ranks)`` and runs
    with environment ``envs[i]``."""
    starters, num_actors = {}, len(envs)
    for i, env in enumerate(envs):
        extra = ["--actor-id", str(i), "--num-actors", str(num_actors)]
        command = child_command(script, "actor", config_path, ranks[i % len(ranks)], extra)
        starters[f"actor-{i}"] = functools.partial(subprocess.Popen, command, env=env, start_new_session=True)
    return starters


def launch_local_run(
    cfg, num_actors: int, num_learners: int, resume: bool = False, script: Path = ENTRY_POINT
) -> int:
    """Start the learner rank(s) and actors, supervise them, and return the run's exit code.

    ``resume``: the learners continue from the newest checkpoint in ``run.run_dir``.
    """
    from common.config import config_to_toml
    from common.transport import Endpoints, free_tcp_ports

    gpus = detect_gpus()
    if problems := local_run_problems(cfg, num_actors, num_learners, gpus):
        for problem in problems:
            logger.error("%s", problem)
        return ExitCode.BAD_SETUP
    run_dir = Path(cfg.run.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    cfg = with_local_keys(cfg, run_dir)
    config_path = run_dir / "config.toml"
    config_path.write_text(config_to_toml(cfg))
    host = cfg.transport.host
    ranks = [Endpoints.tcp(host, free_tcp_ports(host)) for _ in range(num_learners)]
    learner_threads, actor_threads = split_threads(os.cpu_count() or 1, num_actors, num_learners)
    placement = place(num_learners, num_actors, gpus)
    for line in describe(placement):
        logger.info("%s", line)
    learner_envs, actor_envs = child_envs(cfg, placement, learner_threads, actor_threads)
    procs = start_learners(config_path, ranks, learner_envs, resume, script)
    starters = actor_starters(config_path, ranks, actor_envs, script)
    procs.update({name: start() for name, start in starters.items()})
    logger.info(
        "run %s: %d learner rank(s) (%s), rank 0 at %s, %d BLAS thread(s) each; %d actor(s), %d each",
        run_dir, num_learners, cfg.run.backend, ranks[0].control, learner_threads, num_actors, actor_threads,
    )  # fmt: skip
    return supervise(procs, starters, cfg.run.max_actor_restarts)
