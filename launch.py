"""Start a training run: ``python launch.py [--actors N] [--learners M] [--model NAME] [--task NAME] ...``.

Subcommands (the launcher uses them to start its children; use them by hand to spread a run over machines):

    python launch.py [run] ...                       learner(s) + actors on this machine, supervised
    python launch.py learner --config F --bind tcp://HOST:PORT --run-dir D
    python launch.py actor --config F --connect tcp://HOST:PORT --actor-id I --num-actors N
    python launch.py keys DIR                        CURVE key pairs for a run that leaves this machine
    python launch.py --resume RUN_DIR                continue a run from its newest checkpoint
    python launch.py monitor RUN_DIR | plot RUN_DIR  watch a run live / chart its curves
    python launch.py eval RUN_DIR --prompts F.jsonl  mean reward, KL and samples on held-out prompts
    python launch.py train-rm --pairs P.jsonl ...    a reward model from preference pairs (--reward rm:PATH)
    python launch.py --hostfile hosts.json ...       learner and actors on other machines, over SSH

Settings come from the defaults, then ``--config FILE.toml``, then the shortcuts below and ``--set`` overrides.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from common.blas import reexec_with_fast_blas
from common.exit_codes import ExitCode
from remote_run import BASE_PORT as REMOTE_BASE_PORT

logger = logging.getLogger("launch")


def add_config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config", help="TOML file with settings (sections: model, lora, sampling, ppo, transport, run)"
    )
    parser.add_argument(
        "--model", help="default | tiny | a local mlx-lm folder | a Hugging Face id (model.name)"
    )
    parser.add_argument(
        "--task", help="built-in task: arithmetic, length, format, sentiment, letters (run.task)"
    )
    parser.add_argument("--prompts", help="prompts: FILE.jsonl, FILE.txt or hf:NAME (run.prompts)")
    parser.add_argument("--reward", help="reward: module:function or rm:PATH (run.reward)")
    parser.add_argument("--max-updates", type=int, help="stop after this many updates (run.max_updates)")
    parser.add_argument("--run-dir", help="where config, metrics, logs and checkpoints go (run.run_dir)")
    parser.add_argument(
        "--backend",
        choices=("ring", "mpi", "nccl", "jaccl"),
        help="learner ranks' mlx.distributed backend (run.backend)",
    )
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
        p.add_argument(
            "--resume",
            dest="resume_dir",
            metavar="RUN_DIR",
            help="continue the run in RUN_DIR from its newest checkpoint, with its config (+ --set overrides)",
        )
        p.add_argument(
            "--hostfile", help="JSON hosts (mlx.launch format + role/actors): start the run over SSH"
        )
        p.add_argument(
            "--ssh-command",
            default="ssh",
            help="how to reach a host (default: ssh); it must pass stdin on (no -n): processes stop when it closes",
        )
        p.add_argument(
            "--port",
            type=int,
            default=REMOTE_BASE_PORT,
            help="--hostfile: the learner's first port; it uses three (experience, weights, control; default 5555)",
        )
        p.add_argument(
            "--remote-dir", default=str(Path(__file__).resolve().parent), help="this checkout's path there"
        )
        p.add_argument("--remote-python", default=sys.executable, help="the Python to run there")
    learner = sub.add_parser("learner", help="one learner process (started by the launcher, or by hand)")
    actor = sub.add_parser("actor", help="one actor process (started by the launcher, or by hand)")
    for p in (learner, actor):
        add_config_args(p)
        where = p.add_mutually_exclusive_group(required=True)
        where.add_argument(
            "--bind" if p is learner else "--connect",
            dest="base",
            metavar="tcp://HOST:PORT",
            help="the learner's three ports: experience PORT, weights PORT+1, control PORT+2",
        )
        where.add_argument(
            "--endpoints", help="JSON with experience/weights/control addresses (the launcher's)"
        )
        p.add_argument("--parent-pid", type=int, default=0, help=argparse.SUPPRESS)
        p.add_argument("--stdin-lifeline", action="store_true", help=argparse.SUPPRESS)
    learner.add_argument("--rank", type=int, default=0, help="learner rank (set by the launcher)")
    learner.add_argument(
        "--resume", action="store_true", help="continue from the newest checkpoint in run.run_dir"
    )
    actor.add_argument("--actor-id", type=int, required=True)
    actor.add_argument("--num-actors", type=int, required=True)
    keys = sub.add_parser(
        "keys", help="write learner and actor CURVE key pairs into DIR (then set transport.keys_dir=DIR)"
    )
    keys.add_argument("dir", help="folder for the keys; copy it to every machine of the run")
    add_tool_parsers(sub)
    return parser.parse_args(argv)


def add_tool_parsers(sub) -> None:
    """Subcommands that work on a run directory (running, finished or copied from elsewhere)."""
    monitor = sub.add_parser("monitor", help="live terminal view of a run's throughput and learning curves")
    monitor.add_argument("run_dir")
    monitor.add_argument("--refresh", type=float, default=2.0, help="seconds between frames (default 2)")
    monitor.add_argument("--once", action="store_true", help="print one frame and exit")
    plot = sub.add_parser("plot", help="PNG charts of a run's curves (needs matplotlib)")
    plot.add_argument("run_dir")
    plot.add_argument("--out", help="folder for the charts (default RUN_DIR/plots)")
    evaluate = sub.add_parser(
        "eval", help="mean reward, KL to the base model and samples on held-out prompts"
    )
    evaluate.add_argument("run_dir")
    evaluate.add_argument(
        "--prompts", default="", help="held-out prompts: .jsonl, .txt or hf:NAME (run.prompts)"
    )
    evaluate.add_argument("--adapters", help="adapter folder to evaluate (default RUN_DIR/adapters)")
    evaluate.add_argument("--limit", type=int, default=0, help="evaluate at most this many prompts")
    evaluate.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")
    sub.add_parser(
        "train-rm", help="train a reward model on preference pairs (python launch.py train-rm --help)"
    )


def run_tool(args: argparse.Namespace) -> int:
    """``monitor``, ``plot`` and ``eval``."""
    if args.command == "monitor":
        from learner.monitor import run_monitor

        return run_monitor(Path(args.run_dir), refresh_s=args.refresh, once=args.once)
    if args.command == "plot":
        from learner.plot import run_plot

        return run_plot(Path(args.run_dir), Path(args.out) if args.out else None)
    return evaluate_run(args)


def evaluate_run(args: argparse.Namespace) -> int:
    """``eval``: a run's (or any) adapters on held-out prompts; results into RUN_DIR/eval/<adapters>."""
    from actors.evaluate import evaluate_policy
    from actors.tasks import TaskSetupError, resolve_task
    from common.config import ConfigError, load_config

    run_dir = Path(args.run_dir)
    prompts = [f"run.prompts={json.dumps(args.prompts)}"] if args.prompts else []
    try:
        cfg = load_config(run_dir / "config.toml", [*args.overrides, *prompts])
        task = resolve_task(cfg)
    except (ConfigError, TaskSetupError) as e:
        logger.error("%s", e)
        return ExitCode.BAD_SETUP
    if not args.prompts:
        logger.warning("no --prompts: evaluating on the training prompts, which are not held out")
    texts = task.prompts[: args.limit] if args.limit else task.prompts
    adapters = Path(args.adapters) if args.adapters else run_dir / "adapters"
    out_dir = run_dir / "eval" / (adapters.name if args.adapters else "latest")
    evaluate_policy(cfg, texts, task.scorer, adapters, out_dir)
    logger.info("wrote %s", out_dir)
    return 0


def resolve_config(args: argparse.Namespace):
    """Defaults < --config (or the resumed run's config.toml) < shortcuts < --set; raises ConfigError listing
    every problem."""
    from common.config import ConfigError, load_config

    config_file, shortcuts = args.config, []
    if resume_dir := getattr(args, "resume_dir", None):
        if args.config or args.run_dir:
            raise ConfigError(
                ["--resume RUN_DIR takes the run's own config.toml and run dir: drop --config/--run-dir"]
            )
        config_file = Path(resume_dir) / "config.toml"
        if not config_file.is_file():
            raise ConfigError([f"--resume {resume_dir}: no config.toml there (not a run directory?)"])
        shortcuts.append(f"run.run_dir={json.dumps(str(resume_dir))}")
    if args.model:
        shortcuts.append(f"model.name={json.dumps(args.model)}")
    for name in ("task", "prompts", "reward"):
        if getattr(args, name):
            shortcuts.append(f"run.{name}={json.dumps(getattr(args, name))}")
    if args.max_updates is not None:
        shortcuts.append(f"run.max_updates={args.max_updates}")
    if args.run_dir:
        shortcuts.append(f"run.run_dir={json.dumps(args.run_dir)}")
    if args.backend:
        shortcuts.append(f"run.backend={json.dumps(args.backend)}")
    return load_config(config_file, [*shortcuts, *args.overrides])


def main(argv: list[str] | None = None) -> int:
    reexec_with_fast_blas()
    from common.config import ConfigError
    from common.logs import setup_logging

    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["train-rm"]:  # its own options (argparse cannot pass '--x' through a subcommand)
        from learner.reward_model_training import main as train_reward_model

        setup_logging("train-rm")
        return train_reward_model(argv[1:])
    args = parse_args(argv)
    command = args.command or "run"
    if command in ("monitor", "plot", "eval"):
        setup_logging("tools")
        return run_tool(args)
    if command == "keys":
        from common.transport import make_keys

        setup_logging("launcher")
        for path in make_keys(args.dir):
            logger.info("wrote %s", path)
        return 0
    role = {
        "run": "launcher",
        "learner": f"learner-{getattr(args, 'rank', 0)}",
        "actor": f"actor-{getattr(args, 'actor_id', 0)}",
    }[command]
    setup_logging(role)
    try:
        cfg = resolve_config(args)
    except ConfigError as e:
        logger.error("%s", e)
        return ExitCode.BAD_SETUP
    if command in ("learner", "actor"):
        watch_parent(args.parent_pid)
        if args.stdin_lifeline:
            watch_stdin()
        try:
            endpoints = endpoints_of(args)
        except ValueError as e:
            logger.error("%s", e)
            return ExitCode.BAD_SETUP
    if command == "learner":
        from learner.process import run_learner

        if problem := unprotected_bind(endpoints, cfg.transport.keys_dir):
            logger.error("%s", problem)
            return ExitCode.BAD_SETUP
        return run_learner(cfg, endpoints, Path(cfg.run.run_dir), resume=args.resume)
    if command == "actor":
        from actors.actor import run_actor

        return run_actor(cfg, args.actor_id, args.num_actors, endpoints)
    from local_run import launch_local_run, run_one_process

    if args.resume_dir and (args.hostfile or args.one_process):
        logger.error(
            "--resume runs on this machine: for a run over several machines start its learner with "
            "'launch.py learner --resume --config RUN_DIR/config.toml ...' and its actors as before"
        )
        return ExitCode.BAD_SETUP
    if args.hostfile:
        return launch_over_ssh(cfg, args)
    if args.one_process:
        from actors.tasks import TaskSetupError

        try:
            history = run_one_process(cfg, args.actors)
        except TaskSetupError as e:
            logger.error("%s", e)
            return ExitCode.BAD_SETUP
        return 0 if len(history) == cfg.run.max_updates else 1
    resume = args.resume_dir is not None
    return launch_local_run(cfg, args.actors, args.learners, Path(__file__).resolve(), resume)


def launch_over_ssh(cfg, args: argparse.Namespace) -> int:
    """``--hostfile``: the run's processes on the listed machines (``remote_run.py``)."""
    import dataclasses
    import shlex

    from common.config import config_to_toml
    from remote_run import launch_remote_run, read_hostfile

    try:
        hosts = read_hostfile(args.hostfile)
    except ValueError as e:
        logger.error("%s", e)
        return ExitCode.BAD_SETUP
    run_dir = str(Path(cfg.run.run_dir).resolve())  # the same absolute path on every machine
    cfg = dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, run_dir=run_dir))
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    text = config_to_toml(cfg)
    (Path(run_dir) / "config.toml").write_text(text)
    ssh = shlex.split(args.ssh_command)
    return launch_remote_run(text, run_dir, hosts, ssh, args.remote_dir, args.remote_python, args.port)


def endpoints_of(args: argparse.Namespace):
    from common.transport import Endpoints

    if args.base:
        return Endpoints.from_base(args.base)
    return Endpoints(**json.loads(args.endpoints))


def unprotected_bind(endpoints, keys_dir: str) -> str | None:
    """Why the learner must not bind ``endpoints`` (reachable from other machines without CURVE keys), or None."""
    from urllib.parse import urlsplit

    from common.config_checks import is_loopback

    hosts = {
        urlsplit(address).hostname or ""
        for address in endpoints.as_dict().values()
        if address.startswith("tcp")
    }
    exposed = sorted(h for h in hosts if not is_loopback(h))
    if exposed and not keys_dir:
        return (
            f"binding {', '.join(exposed)} exposes the learner to other machines: it needs ZeroMQ CURVE keys; "
            "make them with 'python launch.py keys DIR', copy DIR to every machine and set transport.keys_dir=DIR"
        )
    return None


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
                os._exit(ExitCode.WRITE_FAILED)
            time.sleep(1.0)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def watch_stdin(grace_s: float = 30.0) -> None:
    """Stop when stdin closes: a process started over SSH by ``--hostfile`` reads the launcher's end of its
    connection, which closes when the launcher exits or dies (no remote process outlives its run).

    SIGTERM first (a learner checkpoints and stops, an actor stops), then exit after ``grace_s``.
    """
    import signal
    import threading
    import time

    def watch() -> None:
        while os.read(0, 4096):  # the raw descriptor: a buffered reader's lock would abort interpreter exit
            pass
        logging.getLogger("launch").warning("the launcher's connection closed; stopping")
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(grace_s)
        os._exit(ExitCode.WRITE_FAILED)

    threading.Thread(target=watch, name="stdin-lifeline", daemon=True).start()


if __name__ == "__main__":
    raise SystemExit(main())
