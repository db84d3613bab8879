"""``learner`` and ``actor``: one process of a run, started by the launcher (local or over SSH) or by hand."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from urllib.parse import urlsplit

from common.exit_codes import ExitCode
from common.network import exposed_without_keys, needs_keys_message
from launcher.lifelines import watch_parent, watch_stdin

logger = logging.getLogger(__name__)


def endpoints_of(args: argparse.Namespace):
    """The learner's addresses from ``--bind``/``--connect`` (a base port) or ``--endpoints`` (JSON)."""
    from common.transport import Endpoints

    if args.base:
        return Endpoints.from_base(args.base)
    return Endpoints(**json.loads(args.endpoints))


def unprotected_bind(endpoints, keys_dir: str) -> str | None:
    """Why the learner must not bind ``endpoints`` (reachable from other machines without CURVE keys), or None."""
    hosts = [urlsplit(a).hostname or "" for a in endpoints.as_dict().values() if a.startswith("tcp")]
    if exposed := exposed_without_keys(hosts, keys_dir):
        return needs_keys_message(f"binding {', '.join(exposed)} exposes the learner to other machines")
    return None


def process_endpoints(args: argparse.Namespace):
    """Start this process's lifelines and read its endpoints; None (after saying why) for bad ones."""
    watch_parent(args.parent_pid)
    if args.stdin_lifeline:
        watch_stdin()
    try:
        return endpoints_of(args)
    except ValueError as e:
        logger.error("%s", e)
        return None


def learner(args: argparse.Namespace, cfg) -> int:
    from learner.process import run_learner

    if (endpoints := process_endpoints(args)) is None:
        return ExitCode.BAD_SETUP
    if problem := unprotected_bind(endpoints, cfg.transport.keys_dir):
        logger.error("%s", problem)
        return ExitCode.BAD_SETUP
    return run_learner(cfg, endpoints, Path(cfg.run.run_dir), resume=args.resume)


def actor(args: argparse.Namespace, cfg) -> int:
    from actors.actor import run_actor

    if (endpoints := process_endpoints(args)) is None:
        return ExitCode.BAD_SETUP
    return run_actor(cfg, args.actor_id, args.num_actors, endpoints)
