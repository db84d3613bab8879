"""``run_learner``: the learner process loop around ``LearnerService``."""

from __future__ import annotations

import errno
import logging
import signal
from pathlib import Path

from common.config import Config, max_response_tokens
from common.exit_codes import ExitCode
from common.transport import Endpoints, LearnerSockets, curve_keys, zmq_context

logger = logging.getLogger(__name__)
SHUTDOWN_FLUSH_MS = 2000
"""How long the final shutdown may take to reach actors once the sockets close."""
_WRITE_ERRORS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EIO, errno.EFBIG}
"""The learner could not write its metrics or a checkpoint (a full disk): restarting it would not help."""


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
        max_new_tokens=max_response_tokens(cfg),  # an episode's budget with run.environment
    )


def _stop_flag() -> dict[str, bool]:
    """A flag SIGTERM and SIGINT set: the loop finishes its step, checkpoints and stops."""
    stop = {"requested": False}

    def request_stop(signum, _frame):
        logger.info("signal %d: finishing the current step, then stopping", signum)
        stop["requested"] = True

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, request_stop)
    return stop


def _learner_sockets(ctx, cfg: Config, endpoints: Endpoints) -> LearnerSockets:
    keys = curve_keys(cfg.transport.keys_dir, "learner")
    max_bytes = cfg.transport.max_message_mb * 2**20
    return LearnerSockets(ctx, endpoints, cfg.transport.experience_hwm, keys, max_bytes)


def _start(service, checkpoint: Path | None) -> bool:
    """Resume from ``checkpoint`` (if any) and publish the first snapshot; False if it is too large to send."""
    if checkpoint is not None:
        service.resume(checkpoint)
    try:
        service.publish_weights()
    except ValueError as e:
        logger.error("%s", e)
        return False
    logger.info(
        "learner ready at %s (policy v%d, %d compute thread(s))",
        service.sockets.endpoints.control,
        service.learner.policy_version,
        service.learner.pool.size,
    )
    return True


def _serve(service, stop: dict[str, bool]) -> None:
    """Step until the run is finished or a stop is requested (then checkpoint, unless one was just written)."""
    while not service.finished and not stop["requested"]:
        service.step(timeout_ms=100)
    if stop["requested"] and service.is_main and service.step_count % service.cfg.run.checkpoint_every:
        service.save_checkpoint()


def _report_write_failure(error: OSError, service, run_dir: Path) -> None:
    """A full disk or a failing drive under the run folder: say where the run stands, stop the actors."""
    from learner.checkpoint import latest_checkpoint

    newest = latest_checkpoint(run_dir)
    logger.error(
        "cannot write the run's files (%s): stopping after %d updates; resume with --resume from %s",
        error,
        service.step_count,
        newest.name if newest else "the start (no checkpoint yet)",
    )
    service.shutdown("learner stopped: cannot write its files")


def run_learner(cfg: Config, endpoints: Endpoints, run_dir: Path, resume: bool = False) -> int:
    """Serve actors and train until ``run.max_updates`` (or SIGTERM/SIGINT), then checkpoint and stop actors.

    ``resume``: continue from the newest checkpoint in ``run_dir`` (``ExitCode.BAD_SETUP`` if there is none).
    """
    from common.device_share import apply_device_share
    from learner.checkpoint import latest_checkpoint
    from learner.distributed import init_group
    from learner.service import LearnerService

    stop = _stop_flag()
    apply_device_share("learner")  # before the model loads: its part of a GPU shared with actors
    checkpoint = latest_checkpoint(run_dir) if resume else None
    if resume and checkpoint is None:
        logger.error("nothing to resume: no checkpoint in %s", run_dir / "checkpoints")
        return ExitCode.BAD_SETUP
    timeouts = {"timeout_s": cfg.run.collective_timeout_s, "join_timeout_s": cfg.transport.startup_timeout_s}
    learner = build_learner(cfg, init_group(cfg.run.backend, **timeouts))
    with zmq_context() as ctx:
        sockets = _learner_sockets(ctx, cfg, endpoints)
        service, shutdown_sent = LearnerService(cfg, sockets, learner, run_dir), False
        try:
            if not _start(service, checkpoint):
                return ExitCode.BAD_SETUP
            try:
                _serve(service, stop)
            except OSError as e:
                if e.errno not in _WRITE_ERRORS:
                    raise
                _report_write_failure(e, service, run_dir)
                shutdown_sent = True
                return ExitCode.WRITE_FAILED
            service.shutdown("run finished" if service.finished else "learner stopped")
            shutdown_sent = True
        finally:
            sockets.close(flush_ms=SHUTDOWN_FLUSH_MS if shutdown_sent else 0)
    logger.info("learner done after %d updates", service.step_count)
    return 0
