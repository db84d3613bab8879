"""``mlx-ppo`` (= ``python launch.py`` = ``python -m launcher``): parse the command line, run the subcommand.

See ``launcher.arguments.USAGE`` (``mlx-ppo --help``) for the subcommands.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from common.blas import reexec_with_fast_blas
from common.config import ConfigError
from common.exit_codes import ExitCode
from common.logs import setup_logging
from common.machine_cache import keep_compiled_kernels
from launcher import commands, roles
from launcher.arguments import parse_args, resolve_config
from launcher.local import launch_local_run
from launcher.one_process import run_one_process
from launcher.remote import launch_over_ssh

logger = logging.getLogger(__name__)

TOOLS = {"monitor": commands.monitor, "plot": commands.plot, "eval": commands.evaluate, "keys": commands.keys}
"""Subcommands that start no run: they work on a run directory or make files for one."""


def main(argv: Sequence[str] | None = None, prog: str | None = None) -> int:
    """The launcher's entry point; returns the exit code (``common.exit_codes.ExitCode`` or a child's).

    ``prog``: the program name that help shows (default: the script's file name).
    """
    keep_compiled_kernels()  # before any process compiles a kernel; the re-exec and children inherit it
    reexec_with_fast_blas()  # nothing imported so far loads MLX or a BLAS
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["train-rm"]:  # its own options (argparse cannot pass '--x' through a subcommand)
        return commands.train_reward_model(argv[1:])
    args = parse_args(argv, prog)
    command = args.command or "run"
    if command in TOOLS:
        return TOOLS[command](args)
    return run_with_config(command, args)


def process_role(command: str, args: argparse.Namespace) -> str:
    """The role a process logs under: launcher, learner-RANK or actor-ID."""
    return {
        "run": "launcher",
        "learner": f"learner-{getattr(args, 'rank', 0)}",
        "actor": f"actor-{getattr(args, 'actor_id', 0)}",
    }[command]


def run_with_config(command: str, args: argparse.Namespace) -> int:
    """``run``, ``learner`` and ``actor``: resolve the config, then start the run or be one of its processes."""
    setup_logging(process_role(command, args))
    try:
        cfg = resolve_config(args)
    except ConfigError as e:
        logger.error("%s", e)
        return ExitCode.BAD_SETUP
    if command == "learner":
        return roles.learner(args, cfg)
    if command == "actor":
        return roles.actor(args, cfg)
    return start_run(cfg, args)


def start_run(cfg, args: argparse.Namespace) -> int:
    """``run``: the whole run, over SSH (``--hostfile``), in this process (``--one-process``) or local processes."""
    if args.resume_dir and (args.hostfile or args.one_process):
        logger.error(
            "--resume runs on this machine: for a run over several machines start its learner with "
            "'launch.py learner --resume --config RUN_DIR/config.toml ...' and its actors as before"
        )
        return ExitCode.BAD_SETUP
    if args.hostfile:
        return launch_over_ssh(
            cfg, args.hostfile, args.ssh_command, args.remote_dir, args.remote_python, args.port
        )
    if args.one_process:
        return one_process_run(cfg, args.actors)
    return launch_local_run(cfg, args.actors, args.learners, resume=args.resume_dir is not None)


def one_process_run(cfg, num_actors: int) -> int:
    """``--one-process``: OK when the run made all its updates."""
    from actors.tasks import TaskSetupError

    try:
        history = run_one_process(cfg, num_actors)
    except TaskSetupError as e:
        logger.error("%s", e)
        return ExitCode.BAD_SETUP
    return ExitCode.OK if len(history) == cfg.run.max_updates else ExitCode.FAILED
