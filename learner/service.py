"""The learner as a service: talks to actors, fills the buffer, runs updates, publishes weights, logs metrics.

``LearnerService`` coordinates small parts that never call back into it: the intake (``learner/intake.py``:
hellos, heartbeats, rollout grants, experience into the buffer), the actor watch (``learner/registry.py``:
silent and absent actors, the heartbeat clock), the snapshot publisher (``learner/publisher.py``), the update
(``PPOLearner``) and its report (``learner/update_report.py``). It is driven one ``step`` at a time (tests and
the one-process mode call it directly); ``run_learner`` is the process loop around it.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

from common import protocol
from common.config import Config, config_to_dict, max_response_tokens
from common.models import vocab_size
from common.protocol import Heartbeat, Shutdown
from common.transport import LearnerSockets
from learner.admission import RolloutAdmission
from learner.buffer import ExperienceBuffer, SequenceLimits
from learner.busy_heartbeats import BusyHeartbeats
from learner.checkpoint import load_buffered, load_checkpoint, save_checkpoint
from learner.intake import Intake
from learner.metrics import MetricsWriter, format_update_line
from learner.ppo_learner import PPOLearner
from learner.publisher import SnapshotPublisher
from learner.registry import ActorInfo, ActorWatch
from learner.update_report import update_metrics

logger = logging.getLogger(__name__)


class LearnerService:
    def __init__(self, cfg: Config, sockets: LearnerSockets, learner: PPOLearner, run_dir: Path):
        self.cfg, self.sockets, self.learner, self.run_dir = cfg, sockets, learner, run_dir
        learner.while_busy = BusyHeartbeats(self.heartbeat, cfg.transport.heartbeat_s / 2).running
        # An episode's response holds all its turns: with run.environment, up to max_episode_tokens - 1.
        limits = SequenceLimits(
            vocab_size(learner.container.policy), cfg.sampling.max_prompt_tokens, max_response_tokens(cfg)
        )
        self.buffer = ExperienceBuffer(
            cfg.transport.buffer_batches * cfg.ppo.batch_size,
            cfg.ppo.group_size,
            cfg.ppo.max_policy_lag,
            cfg.ppo.dynamic_sampling,
            limits,
        )
        # With several learner ranks, rank 0 alone writes metrics and checkpoints (the weights are identical).
        config = config_to_dict(cfg)
        self.metrics = MetricsWriter(run_dir, cfg.run.metrics_sinks, config=config) if self.is_main else None
        share = cfg.transport.share_snapshots and self.is_main
        self.publisher = SnapshotPublisher(
            sockets,
            learner.container.policy,
            cfg.transport,
            uuid.uuid4().hex[:12],
            cfg.ppo.full_finetune,
            share,
        )
        self.intake = Intake(cfg, sockets, self.buffer, self.publisher, lambda: learner.policy_version)
        ranks = 1 if learner.group is None else learner.group.size()
        self.watch = ActorWatch(
            self.intake.registry, cfg.transport, cfg.run.min_actors, ranks, sockets.endpoints.control
        )
        self.step_count = 0
        self.resumed_step = 0  # the update a resumed learner started from (its clock starts there)
        self.last_update_end = self.watch.started

    # -- what tests and the process loop read ---------------------------------------------------------------

    @property
    def is_main(self) -> bool:
        return self.learner.group is None or self.learner.group.rank() == 0

    @property
    def finished(self) -> bool:
        return self.step_count >= self.cfg.run.max_updates

    @property
    def actors(self) -> dict[bytes, ActorInfo]:
        """The admitted actors by control identity (``learner/registry.py``)."""
        return self.intake.registry.actors

    @property
    def counters(self) -> Counter:
        """The intake's ``reject/...`` counters."""
        return self.intake.rejections.counters

    @property
    def admission(self) -> RolloutAdmission:
        return self.intake.admission

    @property
    def config_hash(self) -> str:
        return self.intake.hellos.config_hash

    @property
    def snapshot(self) -> protocol.Weights | None:
        return self.publisher.snapshot

    @property
    def announce(self) -> protocol.Weights | None:
        return self.publisher.announce

    # -- talking to actors ---------------------------------------------------------------------------------

    def publish_weights(self) -> None:
        hosts = (a.host for a in self.actors.values() if not a.gone)
        self.publisher.publish(self.learner.policy_version, hosts)

    def poll(self, timeout_ms: int) -> None:
        self.intake.poll(timeout_ms)

    def handle_experience(self, frames: list[bytes]) -> None:
        self.intake.experience(frames)

    def check_actors(self) -> None:
        """Release the grants of silent actors, report absent ones, grant what the bound allows."""
        for identity in self.watch.went_silent():
            self.admission.forget(identity)
        self.watch.report_absent()
        self.intake.grant_rollouts()

    def heartbeat(self) -> None:
        """Tell every actor this learner is alive (over control: a broadcast could push a snapshot out)."""
        if not self.watch.heartbeat_due():
            return
        step = {"step": float(self.step_count)}
        beat = Heartbeat("learner", self.learner.policy_version, self.publisher.checksum, step)
        for identity, info in self.actors.items():
            if not info.gone:
                self.sockets.reply(identity, beat)

    # -- updating ------------------------------------------------------------------------------------------

    def maybe_update(self) -> dict[str, Any] | None:
        """Run an update when a full batch of fresh experience is buffered; returns its metrics."""
        if self.watch.waiting():
            return None
        taken = self.buffer.take(self.cfg.ppo.batch_size, self.learner.policy_version)
        if taken is None:
            return None
        exp, lags = taken
        if self.cfg.ppo.max_policy_lag > 0:  # the next batches generate while this one trains
            self.intake.grant_rollouts()  # (with no lag allowed, only after: they must sample the new policy)
        stats = self.learner.update(exp)
        stats["trained/groups"] = [list(origin) for origin in exp.origins or []]  # for audits: exactly once
        self.step_count += 1
        if self.step_count % self.cfg.run.sync_every == 0:
            self.publish_weights()
        now = time.monotonic()
        clock = (self.watch.started, self.last_update_end, now)
        metrics = update_metrics(
            stats, lags, self.step_count, clock, self.actors.values(), self.buffer, self.admission.outstanding,
            self.publisher.sync, self.counters, self.sockets.denied_peers,
        )  # fmt: skip
        self.last_update_end = now
        if not self.is_main:
            return metrics
        self.metrics.write(metrics)
        logger.info(
            "%s", format_update_line(metrics, self.cfg.run.max_updates, resumed_step=self.resumed_step)
        )
        if self.step_count % self.cfg.run.checkpoint_every == 0 or self.finished:
            self.save_checkpoint()
        return metrics

    def step(self, timeout_ms: int = 100) -> dict[str, Any] | None:
        self.poll(timeout_ms)
        self.check_actors()
        self.heartbeat()
        return self.maybe_update()

    # -- checkpoints ---------------------------------------------------------------------------------------

    def save_checkpoint(self) -> Path:
        """Checkpoint the learner, the experience buffered but not trained yet, and where each actor continues:
        after its newest batch received (``learner/checkpoint.py``). A resumed run then trains every group
        exactly once: the buffered ones from the checkpoint, the ones granted or in flight regenerated."""
        return save_checkpoint(
            self.run_dir,
            self.learner,
            self.cfg.lora,
            self.step_count,
            keep=self.cfg.run.keep_checkpoints,
            buffered=list(self.buffer.groups),
            actor_next_batch=self.intake.positions.checkpointed(),
            counters={"service": dict(self.counters), "buffer": dict(self.buffer.counters)},
            num_actors=self.intake.registry.expected_actors,
            config=config_to_dict(self.cfg),
        )

    def resume(self, folder: Path) -> None:
        """Continue from the checkpoint ``folder``: learner state, update count, actors' prompt positions."""
        state = load_checkpoint(folder, self.learner)
        self.buffer.groups.extend(load_buffered(folder))
        self.step_count = self.resumed_step = int(state["step"])
        self.intake.positions.restore(state.get("actor_next_batch", {}), int(state.get("num_actors", 0)))
        counters = state.get("counters", {})  # drops and rejects keep counting across the restart
        self.counters.update({str(k): int(v) for k, v in counters.get("service", {}).items()})
        self.buffer.counters.update({str(k): int(v) for k, v in counters.get("buffer", {}).items()})
        if self.metrics is not None:
            self.metrics.drop_after(self.step_count)  # rows of updates the crash lost are done again

    def shutdown(self, reason: str) -> None:
        """Tell every actor to stop (broadcast, and directly to each known one)."""
        self.publisher.before_shutdown()
        self.sockets.publish(Shutdown(reason))
        for identity in list(self.actors):
            self.sockets.reply(identity, Shutdown(reason))
        self.publisher.close()
        if self.metrics is not None:
            self.metrics.close()
