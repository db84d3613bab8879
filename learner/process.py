"""``run_learner``: the learner process loop around ``LearnerService``."""

from __future__ import annotations

import errno
import logging
import signal
from pathlib import Path

from common.config import Config
from common.exit_codes import ExitCode
from common.transport import Endpoints, LearnerSockets, curve_keys, zmq_context

logger = logging.getLogger(__name__)
SHUTDOWN_FLUSH_MS = 2000
_WRITE_ERRORS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EIO, errno.EFBIG}
"""The learner could not write its metrics or a checkpoint (a full disk): restarting it would not help."""  # how long the final shutdown may take to reach actors once the sockets close


def build_learner(cfg: Config, group=None):
    """Load the model and build the trainable container and ``PPOLearner`` for ``cfg`` (``group``: learner ranks)."""
    import mlx.core as mx

    from common.models import load_model
    from learner.models import build_policy_and_value
    from learner.ppo_learner import PPOLearner

    loaded = load_model(cfg.model)
    mx.random.seed(cfg.run.seed)
    value_kind = None if cfg.ppo.is_critic_free else cfg.ppo.value_model
    container = build_policy_and_value(loaded.model, cfg.lora, value_kind, cfg.ppo.full_finetune)
    if cfg.model.adapters:
        from common.lora import load_adapters

        load_adapters(container.policy, cfg.model.adapters)
        logger.info("policy starts from the adapters in %s", cfg.model.adapters)
    return PPOLearner(
        container,
        cfg.ppo,
        cfg.sampling.temperature,
        group=group,
        seed=cfg.run.seed,
        total_updates=cfg.run.max_updates,
        max_new_tokens=cfg.sampling.max_new_tokens,
    )


def run_learner(cfg: Config, endpoints: Endpoints, run_dir: Path, resume: bool = False) -> int:
    """Serve actors and train until ``run.max_updates`` (or SIGTERM/SIGINT), then checkpoint and stop actors.

    ``resume``: continue from the newest checkpoint in ``run_dir`` (exit code 2 if there is none).
    """
    from learner.checkpoint import latest_checkpoint
    from learner.distributed import init_group
    from learner.service import LearnerService

    stop = {"requested": False}

    def request_stop(signum, _frame):
        logger.info("signal %d: finishing the current step, then stopping", signum)
        stop["requested"] = True

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, request_stop)
    checkpoint = latest_checkpoint(run_dir) if resume else None
    if resume and checkpoint is None:
        logger.error("nothing to resume: no checkpoint in %s", run_dir / "checkpoints")
        return ExitCode.BAD_SETUP
    group = init_group(
        cfg.run.backend,
        timeout_s=cfg.run.collective_timeout_s,
        join_timeout_s=cfg.transport.startup_timeout_s,
    )
    learner = build_learner(cfg, group)
    with zmq_context() as ctx:
        sockets = LearnerSockets(
            ctx,
            endpoints,
            cfg.transport.experience_hwm,
            curve_keys(cfg.transport.keys_dir, "learner"),
            cfg.transport.max_message_mb * 2**20,
        )
        service = LearnerService(cfg, sockets, learner, run_dir)
        shutdown_sent = False
        try:
            if checkpoint is not None:
                service.resume(checkpoint)
            try:
                service.publish_weights()
            except ValueError as e:
                logger.error("%s", e)
                return ExitCode.BAD_SETUP
            logger.info(
                "learner ready at %s (policy v%d, %d compute thread(s))",
                endpoints.control,
                learner.policy_version,
                learner.pool.size,
            )
            try:
                while not service.finished and not stop["requested"]:
                    service.step(timeout_ms=100)
                if stop["requested"] and service.is_main and service.step_count % cfg.run.checkpoint_every:
                    service.save_checkpoint()
            except OSError as e:
                if e.errno not in _WRITE_ERRORS:
                    raise
                # A full disk or a failing drive under the run folder: stop, and say where the run stands.
                newest = latest_checkpoint(run_dir)
                logger.error(
                    "cannot write the run's files (%s): stopping after %d updates; resume with --resume from %s",
                    e,
                    service.step_count,
                    newest.name if newest else "the start (no checkpoint yet)",
                )
                service.shutdown("learner stopped: cannot write its files")
                shutdown_sent = True
                return ExitCode.WRITE_FAILED
            service.shutdown("run finished" if service.finished else "learner stopped")
            shutdown_sent = True
        finally:
            sockets.close(flush_ms=SHUTDOWN_FLUSH_MS if shutdown_sent else 0)
    logger.info("learner done after %d updates", service.step_count)
    return 0
