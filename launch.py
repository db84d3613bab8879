"""Start a training run: ``python launch.py [--actors N] [--learners M] [--model NAME] [--task NAME] ...``.

Subcommands (the launcher uses them to start its children; use them by hand to spread a run over machines):

    python launch.py [run] ...                       learner(s) + actors on this machine, supervised
    python launch.py learner --config F --endpoints JSON --run-dir D
    python launch.py actor --config F --endpoints JSON --actor-id I --num-actors N

Settings come from the defaults, then ``--config FILE.toml``, then the shortcuts below and ``--set`` overrides.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
from pathlib import Path

from common.blas import reexec_with_fast_blas

logger = logging.getLogger("launch")


def add_config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config", help="TOML file with settings (sections: model, lora, sampling, ppo, transport, run)"
    )
    parser.add_argument(
        "--model", help="default | tiny | a local mlx-lm folder | a Hugging Face id (model.name)"
    )
    parser.add_argument("--task", help="built-in task: arithmetic, length, letters (run.task)")
    parser.add_argument("--max-updates", type=int, help="stop after this many updates (run.max_updates)")
    parser.add_argument("--run-dir", help="where config, metrics, logs and checkpoints go (run.run_dir)")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override one setting, e.g. --set ppo.learning_rate=1e-4 (repeatable)",
    )


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command")
    run = sub.add_parser("run", help="learner(s) and actors on this machine (the default)")
    for p in (parser, run):
        add_config_args(p)
        p.add_argument("--actors", type=int, default=2, help="actor processes to start (default 2)")
        p.add_argument(
            "--learners", type=int, default=1, help="learner ranks (mlx.distributed ring; default 1)"
        )
        p.add_argument(
            "--one-process", action="store_true", help="learner and actors in this process (debugging)"
        )
    learner = sub.add_parser("learner", help="one learner process (started by the launcher, or by hand)")
    actor = sub.add_parser("actor", help="one actor process (started by the launcher, or by hand)")
    for p in (learner, actor):
        add_config_args(p)
        p.add_argument("--endpoints", required=True, help="JSON with experience/weights/control addresses")
        p.add_argument("--parent-pid", type=int, default=0, help=argparse.SUPPRESS)
    actor.add_argument("--actor-id", type=int, required=True)
    actor.add_argument("--num-actors", type=int, required=True)
    return parser.parse_args(argv)


def resolve_config(args: argparse.Namespace):
    """Defaults < --config < shortcuts < --set; raises ConfigError listing every problem."""
    from common.config import load_config

    shortcuts = []
    if args.model:
        shortcuts.append(f"model.name={json.dumps(args.model)}")
    if args.task:
        shortcuts.append(f"run.task={json.dumps(args.task)}")
    if args.max_updates is not None:
        shortcuts.append(f"run.max_updates={args.max_updates}")
    if args.run_dir:
        shortcuts.append(f"run.run_dir={json.dumps(args.run_dir)}")
    return load_config(args.config, [*shortcuts, *args.overrides])


def main(argv: list[str] | None = None) -> int:
    reexec_with_fast_blas()
    from common.config import ConfigError
    from common.logs import setup_logging

    args = parse_args(sys.argv[1:] if argv is None else argv)
    command = args.command or "run"
    role = {"run": "launcher", "learner": "learner-0", "actor": f"actor-{getattr(args, 'actor_id', 0)}"}[
        command
    ]
    setup_logging(role)
    try:
        cfg = resolve_config(args)
    except ConfigError as e:
        logger.error("%s", e)
        return 2
    if command == "learner":
        from common.transport import Endpoints
        from learner.process import run_learner

        watch_parent(args.parent_pid)
        return run_learner(cfg, Endpoints(**json.loads(args.endpoints)), Path(cfg.run.run_dir))
    if command == "actor":
        from actors.actor import run_actor
        from common.transport import Endpoints

        watch_parent(args.parent_pid)
        return run_actor(cfg, args.actor_id, args.num_actors, Endpoints(**json.loads(args.endpoints)))
    if args.one_process:
        history = run_one_process(cfg, args.actors)
        return 0 if len(history) == cfg.run.max_updates else 1
    return launch_local_run(cfg, args.actors, args.learners)


def run_one_process(cfg, num_actors: int = 1, timeout_s: float = 600.0) -> list[dict]:
    """Learner and actors in this process over ``inproc://``, stepped in turn; returns each update's metrics.

    The same ``LearnerService`` and ``ActorWorker`` logic as the multi-process run, without process plumbing:
    for tests and for debugging with one stack trace.
    """
    import time

    from actors.actor import ActorStopped, ActorWorker
    from actors.tasks import get_task
    from common.lora import attach_lora
    from common.models import load_model
    from common.transport import ActorSockets, Endpoints, LearnerSockets, zmq_context
    from learner.process import build_learner
    from learner.service import LearnerService

    endpoints, history = Endpoints.inproc(), []
    deadline = time.monotonic() + timeout_s
    learner = build_learner(cfg)
    with zmq_context() as ctx:
        sockets = [LearnerSockets(ctx, endpoints, cfg.transport.experience_hwm)]
        service = LearnerService(cfg, sockets[0], learner, Path(cfg.run.run_dir))
        service.publish_weights()
        workers = []
        for i in range(num_actors):
            loaded = load_model(cfg.model)
            attach_lora(loaded.model, cfg.lora)
            sockets.append(ActorSockets(ctx, endpoints, cfg.transport.experience_hwm))
            workers.append(
                ActorWorker(
                    cfg, i, num_actors, sockets[-1], loaded.model, loaded.tokenizer, get_task(cfg.run.task)
                )
            )
        try:
            while not all([w.poll_connect(0) for w in workers]):
                service.poll(10)
                if time.monotonic() > deadline:
                    raise TimeoutError("actors did not join the in-process learner")
            while not service.finished and time.monotonic() < deadline:
                for worker in workers:
                    worker.step_nonblocking()
                if (metrics := service.step(timeout_ms=10)) is not None:
                    history.append(metrics)
            service.shutdown("run finished")
            for worker in workers:  # let each actor see the shutdown, as a separate process would
                with contextlib.suppress(ActorStopped):
                    worker.apply_newer_weights()
        finally:
            for sock in sockets:
                sock.close()
    return history


# -- the local launcher -----------------------------------------------------------------------------------------

# Variables a learner started by mlx.launch may carry; an actor that inherits them would try to join the ring.
_DISTRIBUTED_ENV_PREFIXES = ("MLX_RANK", "MLX_HOSTFILE", "MLX_WORLD_SIZE", "MLX_RING", "MLX_JACCL", "NCCL_")


def child_env(threads: int, distributed: dict[str, str] | None = None) -> dict[str, str]:
    """Environment for a child: this one (BLAS preload included), BLAS threads capped, no inherited MLX ranks."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(_DISTRIBUTED_ENV_PREFIXES)}
    env.update({"OPENBLAS_NUM_THREADS": str(threads), "OMP_NUM_THREADS": str(threads)})
    env.update(distributed or {})
    return env


def child_command(role: str, config_path: Path, endpoints, extra: list[str]) -> list[str]:
    script = str(Path(__file__).resolve())
    return [
        sys.executable,
        script,
        role,
        "--config",
        str(config_path),
        "--endpoints",
        json.dumps(endpoints.as_dict()),
        "--parent-pid",
        str(os.getpid()),
        *extra,
    ]


def launch_local_run(cfg, num_actors: int, num_learners: int) -> int:
    """Start the learner and ``num_actors`` actors on this machine, supervise them, return the run's exit code."""
    import subprocess

    from actors.tasks import get_task
    from common.config import config_to_toml
    from common.transport import Endpoints, free_tcp_ports

    try:
        get_task(cfg.run.task)
    except ValueError as e:
        logger.error("%s", e)
        return 2
    if num_actors < 1 or num_learners != 1:
        logger.error("--actors must be >= 1; --learners > 1 is not supported yet")
        return 2
    run_dir = Path(cfg.run.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    config_path = run_dir / "config.toml"
    config_path.write_text(config_to_toml(cfg))
    endpoints = Endpoints.tcp(cfg.transport.host, free_tcp_ports(cfg.transport.host))
    threads = max(1, (os.cpu_count() or 1) // (num_actors + num_learners))
    procs = {
        "learner-0": subprocess.Popen(
            child_command("learner", config_path, endpoints, []), env=child_env(threads)
        )
    }
    for i in range(num_actors):
        extra = ["--actor-id", str(i), "--num-actors", str(num_actors)]
        procs[f"actor-{i}"] = subprocess.Popen(
            child_command("actor", config_path, endpoints, extra), env=child_env(threads)
        )
    logger.info(
        "run %s: learner at %s, %d actor(s), %d BLAS thread(s) each",
        run_dir,
        endpoints.control,
        num_actors,
        threads,
    )
    return supervise(procs)


def supervise(procs: dict) -> int:
    """Wait for the learner; stop everything on a failure or Ctrl-C. Returns the run's exit code."""
    import signal
    import subprocess

    learner = procs["learner-0"]
    state = {"stopping": False, "failed": 0}

    def on_signal(signum, _frame):
        logger.info("signal %d: asking the learner to checkpoint and stop", signum)
        state["stopping"] = True
        learner.send_signal(signal.SIGTERM)

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, on_signal)
    while True:
        try:
            code = learner.wait(timeout=0.5)
            break
        except subprocess.TimeoutExpired:
            pass
        for name, proc in procs.items():
            if name != "learner-0" and proc.poll() not in (None, 0) and not state["stopping"]:
                logger.error("%s exited with code %d; stopping the run", name, proc.returncode)
                state["failed"], state["stopping"] = proc.returncode, True
                learner.send_signal(signal.SIGTERM)
    stop_children(procs)
    if code != 0:
        logger.error("learner exited with code %d", code)
        return code
    return 1 if state["failed"] else 0


def stop_children(procs: dict, grace_s: float = 30.0) -> None:
    """Give children ``grace_s`` in all to exit on their own (they were told to stop), then terminate, then kill."""
    import subprocess
    import time

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


def watch_parent(parent_pid: int) -> None:
    """Exit when the launcher that started this process is gone (no orphans after a launcher crash)."""
    if not parent_pid:
        return
    import threading
    import time

    def watch() -> None:
        while True:
            if os.getppid() != parent_pid:
                logging.getLogger("launch").error("launcher (pid %d) is gone; exiting", parent_pid)
                os._exit(4)
            time.sleep(1.0)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


if __name__ == "__main__":
    raise SystemExit(main())
