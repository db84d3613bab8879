"""Running a whole job on this machine: supervised learner/actor processes, or everything in one process.

``launch_local_run`` starts M learner ranks and N actors as fresh Python processes (``launch.py learner`` /
``launch.py actor``), each with BLAS threads capped to its share of the cores and without any inherited
``mlx.distributed`` variables (an actor that inherited them would try to join the learners' ring). Actor ``i``
belongs to learner rank ``i % M``. Children run in their own sessions, so a Ctrl-C in the terminal reaches only the
launcher, which asks the learners to checkpoint and stop; children exit by themselves if the launcher dies.
``run_one_process`` runs the same logic over ``inproc://`` in this process.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

from common.exit_codes import ExitCode

logger = logging.getLogger("launch")

_DISTRIBUTED_ENV_PREFIXES = ("MLX_RANK", "MLX_HOSTFILE", "MLX_WORLD_SIZE", "MLX_RING", "MLX_JACCL", "NCCL_")


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


def with_local_keys(cfg, run_dir: Path):
    """``cfg`` with ``transport.keys_dir`` set to ``<run_dir>/keys`` (made once, kept for a resume) when it asks
    for ``transport.local_auth`` and names no keys of its own."""
    import dataclasses

    from common.transport import make_keys

    if not cfg.transport.local_auth or cfg.transport.keys_dir:
        return cfg
    keys = run_dir / "keys"
    if not (keys / "learner.key_secret").is_file():
        make_keys(keys)
    keys.chmod(0o700)
    return dataclasses.replace(cfg, transport=dataclasses.replace(cfg.transport, keys_dir=str(keys)))


def launch_local_run(cfg, num_actors: int, num_learners: int, script: Path, resume: bool = False) -> int:
    """Start the learner rank(s) and actors, supervise them, and return the run's exit code.

    ``resume``: the learners continue from the newest checkpoint in ``run.run_dir``.
    """
    from actors.rewards import task_problems
    from common.config import config_to_toml
    from common.transport import Endpoints, free_tcp_ports

    if problems := task_problems(cfg):  # once here, not in every actor after the model loads
        for problem in problems:
            logger.error("%s", problem)
        return ExitCode.BAD_SETUP
    if num_learners > 1 and cfg.run.backend != "ring":
        logger.error(
            "--learners %d on one machine uses the ring backend; start %s ranks with mlx.launch and "
            "'launch.py learner --backend %s' instead",
            num_learners,
            cfg.run.backend,
            cfg.run.backend,
        )
        return ExitCode.BAD_SETUP
    if num_learners < 1 or num_actors < num_learners:
        logger.error("need --learners >= 1 and at least one actor per learner rank (--actors >= --learners)")
        return ExitCode.BAD_SETUP
    run_dir = Path(cfg.run.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    cfg = with_local_keys(cfg, run_dir)
    config_path = run_dir / "config.toml"
    config_path.write_text(config_to_toml(cfg))
    host = cfg.transport.host
    ranks = [Endpoints.tcp(host, free_tcp_ports(host)) for _ in range(num_learners)]
    learner_threads, actor_threads = split_threads(os.cpu_count() or 1, num_actors, num_learners)
    procs: dict[str, subprocess.Popen] = {}
    for rank, endpoints in enumerate(ranks):
        env = child_env(learner_threads, learner_rank_env(run_dir, host, rank, num_learners))
        procs[f"learner-{rank}"] = subprocess.Popen(
            child_command(
                script, "learner", config_path, endpoints, ["--rank", str(rank)] + ["--resume"] * resume
            ),
            env=env,
            start_new_session=True,
        )
    starters = {}
    for i in range(num_actors):
        extra = ["--actor-id", str(i), "--num-actors", str(num_actors)]
        command = child_command(script, "actor", config_path, ranks[i % num_learners], extra)
        starters[f"actor-{i}"] = functools.partial(
            subprocess.Popen, command, env=child_env(actor_threads), start_new_session=True
        )
        procs[f"actor-{i}"] = starters[f"actor-{i}"]()
    logger.info(
        "run %s: %d learner rank(s), rank 0 at %s, %d BLAS thread(s) each; %d actor(s), %d each",
        run_dir,
        num_learners,
        ranks[0].control,
        learner_threads,
        num_actors,
        actor_threads,
    )
    return supervise(procs, starters, cfg.run.max_actor_restarts)


def supervise(
    procs: dict[str, subprocess.Popen],
    restarters: dict[str, Callable[[], subprocess.Popen]] | None = None,
    max_restarts: int = 0,
) -> int:
    """Wait for the learners; on a child failure or Ctrl-C ask them to checkpoint and stop. Returns the exit code.

    A child in ``restarters`` (the actors) that fails is started again after 1, 2, 4 ... s (at most 30), up to
    ``max_restarts`` times in all; the run goes on meanwhile. Beyond that, for a learner, or for exit code 2
    (settings or prompts it cannot work with: a restart would fail the same way), the run stops.
    """
    learners = [p for name, p in procs.items() if name.startswith("learner")]
    restarters, restarts, due = restarters or {}, Counter(), {}
    state = {"stopping": False, "failed": 0}

    def stop_learners(signum=None, _frame=None):
        if signum is not None:
            logger.info("signal %d: asking the learner(s) to checkpoint and stop", signum)
        state["stopping"] = True
        for proc in learners:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, stop_learners)
    while any(p.poll() is None for p in learners):
        with contextlib.suppress(subprocess.TimeoutExpired):
            learners[0].wait(timeout=0.5)
        for name, proc in procs.items():
            if proc.poll() in (None, 0) or state["stopping"] or name in due:
                continue
            if name in restarters and restarts[name] < max_restarts and proc.returncode != ExitCode.BAD_SETUP:
                restarts[name] += 1
                delay = min(2.0 ** (restarts[name] - 1), 30.0)
                logger.warning(
                    "%s exited with code %d; restarting it in %.0f s (restart %d of at most %d)",
                    name, proc.returncode, delay, restarts[name], max_restarts,
                )  # fmt: skip
                due[name] = time.monotonic() + delay
                continue
            logger.error("%s exited with code %d; stopping the run", name, proc.returncode)
            state["failed"] = proc.returncode
            stop_learners()
        for name, when in list(due.items()):
            if time.monotonic() >= when and not state["stopping"]:
                procs[name] = restarters[name]()
                del due[name]
    stop_children(procs)
    codes = {name: p.returncode for name, p in procs.items() if name.startswith("learner") and p.returncode}
    if codes:
        logger.error("learner(s) failed: %s", codes)
        return next(iter(codes.values()))
    failed = state["failed"]
    return failed if failed > 0 else int(failed != 0)  # a child killed by a signal: 1


def stop_children(procs: dict[str, subprocess.Popen], grace_s: float = 30.0) -> None:
    """Give children ``grace_s`` in all to exit on their own (they were told to stop), then terminate, then kill."""
    deadline = time.monotonic() + grace_s
    for proc in procs.values():
        try:
            proc.wait(timeout=max(deadline - time.monotonic(), 0.1))
        except subprocess.TimeoutExpired:
            proc.terminate()
    for proc in procs.values():
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def run_one_process(cfg, num_actors: int = 1, timeout_s: float = 600.0) -> list[dict]:
    """Learner and actors in this process over ``inproc://``, stepped in turn (the same ``LearnerService`` and
    ``Actor.step`` as a multi-process run): for tests and debugging with one stack trace. Each update's metrics."""
    from actors.actor import Actor, ActorStopped
    from actors.tasks import resolve_task
    from common.models import load_policy
    from common.transport import ActorSockets, Endpoints, LearnerSockets, zmq_context
    from learner.process import build_learner
    from learner.service import LearnerService

    endpoints, history, deadline = Endpoints.inproc(), [], time.monotonic() + timeout_s
    task = resolve_task(cfg)  # TaskSetupError: the caller reports it
    learner = build_learner(cfg)
    with zmq_context() as ctx:
        sockets = [LearnerSockets(ctx, endpoints, cfg.transport.experience_hwm)]
        service = LearnerService(cfg, sockets[0], learner, Path(cfg.run.run_dir))
        service.publish_weights()
        actors = []
        for i in range(num_actors):
            loaded = load_policy(cfg.model, cfg.lora, cfg.ppo.full_finetune)
            sockets.append(ActorSockets(ctx, endpoints, cfg.transport.experience_hwm))
            actors.append(Actor(cfg, i, num_actors, sockets[-1], loaded.model, loaded.tokenizer, task))
        try:
            while not all([a.join(0) for a in actors]):  # all of them before any work, then one step each
                service.poll(10)
                if time.monotonic() > deadline:
                    raise TimeoutError("actors did not join the in-process learner")
            while not service.finished and time.monotonic() < deadline:
                for actor in actors:
                    actor.step(timeout_ms=0)
                if (metrics := service.step(timeout_ms=10)) is not None:
                    history.append(metrics)
            service.shutdown("run finished")
            for actor in actors:  # let each actor see the shutdown, as a separate process would
                with contextlib.suppress(ActorStopped):
                    actor.take_messages()
        finally:
            for sock in sockets:
                sock.close()
    return history
