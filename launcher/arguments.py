"""The launcher's command line: its subcommands and options, and the config they resolve to."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from launcher.defaults import BASE_PORT, CHECKOUT

USAGE = """Start a training run: ``mlx-ppo [--actors N] [--learners M] [--model NAME] [--task NAME] ...``
(or ``python launch.py ...``, ``python -m launcher ...``: the same command line).

Subcommands (the launcher uses them to start its children; use them by hand to spread a run over machines):

    mlx-ppo [run] ...                        learner(s) + actors on this machine, supervised
    mlx-ppo learner --config F --bind tcp://HOST:PORT --run-dir D
    mlx-ppo actor --config F --connect tcp://HOST:PORT --actor-id I --num-actors N
    mlx-ppo keys DIR                         CURVE key pairs for a run that leaves this machine
    mlx-ppo --resume RUN_DIR                 continue a run from its newest checkpoint
    mlx-ppo monitor RUN_DIR | plot RUN_DIR   watch a run live / chart its curves
    mlx-ppo eval RUN_DIR --prompts F.jsonl   mean reward, KL and samples on held-out prompts
    mlx-ppo train-rm --pairs P.jsonl ...     a reward model from preference pairs (--reward rm:PATH)
    mlx-ppo --hostfile hosts.json ...        learner and actors on other machines, over SSH

Settings come from the defaults, then ``--config FILE.toml``, then the shortcuts below and ``--set`` overrides.
"""


def add_config_args(parser: argparse.ArgumentParser) -> None:
    """The options every process that reads a config takes: the file, shortcuts for common settings, ``--set``."""
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


def add_run_args(parser: argparse.ArgumentParser) -> None:
    """``run`` (the default command): how many processes, and where they run."""
    add_config_args(parser)
    parser.add_argument("--actors", type=int, default=2, help="actor processes to start (default 2)")
    parser.add_argument(
        "--learners",
        type=int,
        default=1,
        help="learner ranks (mlx.distributed ring, or nccl with a GPU per rank; default 1)",
    )
    parser.add_argument(
        "--one-process", action="store_true", help="learner and actors in this process (debugging)"
    )
    parser.add_argument(
        "--resume",
        dest="resume_dir",
        metavar="RUN_DIR",
        help="continue the run in RUN_DIR from its newest checkpoint, with its config (+ --set overrides)",
    )
    add_ssh_args(parser)


def add_ssh_args(parser: argparse.ArgumentParser) -> None:
    """``run --hostfile``: a run over SSH."""
    parser.add_argument(
        "--hostfile", help="JSON hosts (mlx.launch format + role/actors): start the run over SSH"
    )
    parser.add_argument(
        "--ssh-command",
        default="ssh",
        help="how to reach a host (default: ssh); it must pass stdin on (no -n): processes stop when it closes",
    )
    parser.add_argument(
        "--port",
        type=int,
        default=BASE_PORT,
        help="--hostfile: the learner's first port; it uses three (experience, weights, control; default 5555)",
    )
    parser.add_argument("--remote-dir", default=str(CHECKOUT), help="this checkout's path there")
    parser.add_argument("--remote-python", default=sys.executable, help="the Python to run there")


def add_process_parsers(sub) -> None:
    """``learner`` and ``actor``: one process of a run, started by the launcher or by hand."""
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


def add_tool_parsers(sub) -> None:
    """Subcommands that work on a run directory (running, finished or copied from elsewhere), and ``keys``."""
    keys = sub.add_parser(
        "keys", help="write learner and actor CURVE key pairs into DIR (then set transport.keys_dir=DIR)"
    )
    keys.add_argument("dir", help="folder for the keys; copy it to every machine of the run")
    monitor = sub.add_parser("monitor", help="live terminal view of a run's throughput and learning curves")
    monitor.add_argument("run_dir")
    monitor.add_argument("--refresh", type=float, default=2.0, help="seconds between frames (default 2)")
    monitor.add_argument("--once", action="store_true", help="print one frame and exit")
    plot = sub.add_parser("plot", help="PNG charts of a run's curves (needs matplotlib)")
    plot.add_argument("run_dir")
    plot.add_argument("--out", help="folder for the charts (default RUN_DIR/plots)")
    add_eval_parser(sub)
    sub.add_parser("train-rm", help="train a reward model on preference pairs (mlx-ppo train-rm --help)")


def add_eval_parser(sub) -> None:
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


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog, description=USAGE, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_run_args(parser)
    sub = parser.add_subparsers(dest="command")
    add_run_args(sub.add_parser("run", help="learner(s) and actors on this machine (the default)"))
    add_process_parsers(sub)
    add_tool_parsers(sub)
    return parser


def parse_args(argv: list[str], prog: str | None = None) -> argparse.Namespace:
    """``prog``: the program name help and errors show (default: the script's file name)."""
    return build_parser(prog).parse_args(argv)


def config_shortcuts(args: argparse.Namespace) -> list[str]:
    """The shortcut options (``--model``, ``--task`` ...) as ``--set`` overrides, in the order they apply."""
    shortcuts = []
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
    return shortcuts


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
    return load_config(config_file, [*shortcuts, *config_shortcuts(args), *args.overrides])
