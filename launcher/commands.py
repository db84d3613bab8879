"""The subcommands that work on a run directory or make files for a run: ``monitor``, ``plot``, ``eval``,
``train-rm`` and ``keys``. Each returns its exit code."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from common.exit_codes import ExitCode
from common.logs import setup_logging

logger = logging.getLogger(__name__)


def monitor(args: argparse.Namespace) -> int:
    from tools.monitor import run_monitor

    setup_logging("tools")
    return run_monitor(Path(args.run_dir), refresh_s=args.refresh, once=args.once)


def plot(args: argparse.Namespace) -> int:
    from tools.plot import run_plot

    setup_logging("tools")
    return run_plot(Path(args.run_dir), Path(args.out) if args.out else None)


def evaluate(args: argparse.Namespace) -> int:
    """``eval``: a run's (or any) adapters on held-out prompts; results into RUN_DIR/eval/<adapters>."""
    from actors.tasks import TaskSetupError, resolve_task
    from common.config import ConfigError, load_config
    from tools.evaluate import evaluate_policy

    setup_logging("tools")
    run_dir = Path(args.run_dir)
    prompts = [f"run.prompts={json.dumps(args.prompts)}"] if args.prompts else []
    try:
        cfg = load_config(run_dir / "config.toml", [*args.overrides, *prompts])
        if cfg.run.environment:  # it samples one completion a prompt and scores it with the reward
            raise TaskSetupError(f"eval scores single completions: run.environment={cfg.run.environment!r} is "
                                 "not evaluated yet (its episodes' returns are in the run's metrics)")  # fmt: skip
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
    return ExitCode.OK


def train_reward_model(argv: list[str]) -> int:
    """``train-rm``: its own command line (argparse cannot pass '--x' through a subcommand)."""
    from tools.reward_model_training import main

    setup_logging("train-rm")
    return main(argv)


def keys(args: argparse.Namespace) -> int:
    """``keys DIR``: learner and actor CURVE key pairs for a run that leaves this machine."""
    from common.transport import make_keys

    setup_logging("launcher")
    for path in make_keys(args.dir):
        logger.info("wrote %s", path)
    return ExitCode.OK
