"""The learner as a service: talks to actors, fills the buffer, runs updates, publishes weights, logs metrics.

``LearnerService`` holds the state and is driven one ``step`` at a time (tests and the one-process mode call it
directly); ``run_learner`` is the process loop around it. Nothing an actor sends can crash it: every message is
decoded and validated, and a bad one is counted under ``reject/<reason>``, logged, and dropped.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from common import protocol
from common.config import Config, config_hash
from common.protocol import (
    ExperienceBatch,
    Heartbeat,
    Hello,
    ProtocolError,
    Refuse,
    RolloutGrant,
    RolloutRequest,
    Shutdown,
    WeightsRequest,
    Welcome,
)
from common.transport import LearnerSockets
from common.weights import AdapterSync
from learner.admission import RolloutAdmission
from learner.buffer import ExperienceBuffer
from learner.checkpoint import save_checkpoint
from learner.metrics import MetricsWriter, format_update_line
from learner.ppo_learner import PPOLearner

logger = logging.getLogger(__name__)


@dataclass
class ActorInfo:
    actor_id: int
    host: str
    pid: int
    joined: float = field(default_factory=time.monotonic)
    last_seen: float = field(default_factory=time.monotonic)
    policy_version: int = -1
    checksum: str = ""
    gen_tokens_per_s: float = 0.0
    stats: dict[str, float] = field(default_factory=dict)
    """The actor's own counters from its last heartbeat (tokens/s, time waiting for weights, blocked on send)."""
    gone: bool = False
    """Silent for longer than ``transport.actor_timeout_s`` (it may come back)."""


class LearnerService:
    def __init__(self, cfg: Config, sockets: LearnerSockets, learner: PPOLearner, run_dir: Path):
        self.cfg, self.sockets, self.learner, self.run_dir = cfg, sockets, learner, run_dir
        self.buffer = ExperienceBuffer(
            cfg.transport.buffer_batches * cfg.ppo.batch_size, cfg.ppo.group_size, cfg.ppo.max_policy_lag
        )
        self.admission = RolloutAdmission(cfg.ppo.max_policy_lag * cfg.ppo.batch_size)
        self.counters: Counter = Counter()
        self.actors: dict[bytes, ActorInfo] = {}
        self.config_hash = config_hash(cfg)
        self.run_id = uuid.uuid4().hex[:12]
        # With several learner ranks, rank 0 alone writes metrics and checkpoints (the weights are identical).
        self.is_main = learner.group is None or learner.group.rank() == 0
        self.metrics = MetricsWriter(run_dir) if self.is_main else None
        self.snapshot: protocol.Weights | None = None
        self.adapters = AdapterSync(learner.container.policy)
        self.step_count = 0
        self.started = self.last_update_end = time.monotonic()
        self.sync = {"sync/ms": 0.0, "sync/bytes": 0}
        self.max_bytes = cfg.transport.max_message_mb * 2**20

    @property
    def finished(self) -> bool:
        return self.step_count >= self.cfg.run.max_updates

    # -- talking to actors ---------------------------------------------------------------------------------

    def publish_weights(self) -> None:
        start = time.perf_counter()
        self.snapshot = self.adapters.snapshot(self.learner.policy_version)
        self.sockets.publish(self.snapshot)
        self.sync = {
            "sync/ms": 1000 * (time.perf_counter() - start),
            "sync/bytes": int(self.snapshot.flat.nbytes),
        }

    def _reject(self, reason: str, detail: str) -> None:
        self.counters[f"reject/{reason}"] += 1
        logger.warning("rejected a message (%s): %s", reason, detail)

    def handle_control(self, identity: bytes, frames: list[bytes]) -> None:
        try:
            msg = protocol.decode(frames, self.max_bytes)
        except ProtocolError as e:
            return self._reject(e.reason, str(e))
        info = self.actors.get(identity)
        if info is not None:
            self._seen(info)
        if isinstance(msg, Hello):
            self._hello(identity, msg)
        elif info is None:
            self._reject("unknown_peer", f"{type(msg).__name__} before hello")
            # An actor of an earlier incarnation of this learner (restarted): ask it to say hello again.
            self.sockets.reply(identity, Refuse("unknown actor: say hello again", rejoin=True))
        elif isinstance(msg, WeightsRequest) and self.snapshot is not None:
            self.sockets.reply(identity, self.snapshot)
        elif isinstance(msg, Heartbeat):
            info.policy_version, info.checksum, info.stats = msg.policy_version, msg.checksum, msg.stats
            info.gen_tokens_per_s = msg.stats.get("gen_tokens_per_s", info.gen_tokens_per_s)
        elif isinstance(msg, RolloutRequest):
            self.admission.received(identity, msg.returned)  # dropped by the actor: will never arrive
            self.admission.request(identity, msg.sequences)
            self.grant_rollouts()

    def _seen(self, info: ActorInfo) -> None:
        info.last_seen = time.monotonic()
        if info.gone:
            info.gone = False
            logger.info("actor %d is back", info.actor_id)

    def check_actors(self) -> None:
        """Log actors silent past ``transport.actor_timeout_s`` as gone and release their rollout grants."""
        now = time.monotonic()
        for identity, info in self.actors.items():
            if not info.gone and now - info.last_seen > self.cfg.transport.actor_timeout_s:
                info.gone = True
                self.admission.forget(identity)
                logger.warning("actor %d is gone: silent for %.0f s", info.actor_id, now - info.last_seen)
        self.grant_rollouts()

    def grant_rollouts(self) -> None:
        """Grant waiting actors a batch each while the in-flight bound allows (``learner/admission.py``)."""
        for identity in self.admission.grants(self.buffer.depth):
            self.sockets.reply(identity, RolloutGrant(self.learner.policy_version))

    def _hello(self, identity: bytes, msg: Hello) -> None:
        if msg.protocol_version != protocol.PROTOCOL_VERSION or msg.config_hash != self.config_hash:
            reason = (
                f"refused actor {msg.actor_id}: protocol v{msg.protocol_version} config {msg.config_hash}, "
                f"learner has protocol v{protocol.PROTOCOL_VERSION} config {self.config_hash} (start both from the same config)"
            )
            self.counters["reject/config_mismatch"] += 1
            logger.error("%s", reason)
            self.sockets.reply(identity, Refuse(reason))
            return
        if identity not in self.actors:
            logger.info("actor %d joined from %s (pid %d)", msg.actor_id, msg.host, msg.pid)
        self.actors[identity] = ActorInfo(msg.actor_id, msg.host, msg.pid)
        self.admission.forget(identity)  # a (re)joining actor holds no grant
        self.sockets.reply(identity, Welcome(self.learner.policy_version, self.run_id))

    def handle_experience(self, frames: list[bytes]) -> None:
        try:
            msg = protocol.decode(frames, self.max_bytes)
        except ProtocolError as e:
            return self._reject(e.reason, str(e))
        if not isinstance(msg, ExperienceBatch):
            return self._reject("bad_type", f"{type(msg).__name__} on the experience channel")
        self.buffer.add(msg, self.learner.policy_version)
        for identity, info in self.actors.items():
            if info.actor_id == msg.actor_id:
                info.gen_tokens_per_s = msg.gen_tokens_per_s
                self._seen(info)
                self.admission.received(identity, len(msg.sequences))
        self.grant_rollouts()  # stale or rejected sequences free their slots at once

    def poll(self, timeout_ms: int) -> None:
        """Handle what arrives within ``timeout_ms``; experience is read only while the buffer has room."""
        for channel, identity, frames in self.sockets.poll(
            timeout_ms, read_experience=self.buffer.has_room()
        ):
            if channel == "control":
                self.handle_control(identity, frames)
            else:
                self.handle_experience(frames)

    # -- updating ------------------------------------------------------------------------------------------

    def maybe_update(self) -> dict[str, Any] | None:
        """Run an update when a full batch of fresh experience is buffered; returns its metrics."""
        taken = self.buffer.take(self.cfg.ppo.batch_size, self.learner.policy_version)
        if taken is None:
            return None
        exp, lags = taken
        self.grant_rollouts()  # the buffer has room again: the next batches generate while this one trains
        stats = self.learner.update(exp)
        self.step_count += 1
        if self.step_count % self.cfg.run.sync_every == 0:
            self.publish_weights()
        now = time.monotonic()
        metrics = self._metrics(stats, lags, now)
        self.last_update_end = now
        if not self.is_main:
            return metrics
        self.metrics.write(metrics)
        logger.info("%s", format_update_line(metrics))
        if self.step_count % self.cfg.run.checkpoint_every == 0 or self.finished:
            save_checkpoint(self.run_dir, self.learner, self.cfg.lora, self.step_count)
        return metrics

    def _metrics(self, stats: dict[str, Any], lags: np.ndarray, now: float) -> dict[str, Any]:
        wall = max(now - self.last_update_end, 1e-9)
        out = {
            "step": self.step_count,
            "time_s": now - self.started,
            "perf/samples_per_s": len(lags) / wall,
            "perf/gen_tokens_per_s": sum(a.gen_tokens_per_s for a in self.actors.values()),
            "perf/learner_busy_frac": min(stats["perf/update_s"] / wall, 1.0),
            "lag/mean": float(lags.mean()),
            "lag/max": int(lags.max()),
            "lag/dropped": self.buffer.counters["lag/dropped"],
            "buffer/depth": self.buffer.depth,
            "rollout/in_flight": self.admission.outstanding,
            "actors/connected": sum(not a.gone for a in self.actors.values()),
            **self.sync,
            **stats,
        }
        for a in self.actors.values():
            out.update({f"actor/{a.actor_id}/{k}": v for k, v in a.stats.items()})
            out[f"actor/{a.actor_id}/gen_tokens_per_s"] = a.gen_tokens_per_s
            out[f"actor/{a.actor_id}/policy_version"] = a.policy_version
            out[f"actor/{a.actor_id}/heartbeat_age_s"] = now - a.last_seen
        out.update(self.counters)
        out["reject/curve_denied"] = self.sockets.denied_peers
        out.update({k: v for k, v in self.buffer.counters.items() if k.startswith("reject/")})
        return out

    def step(self, timeout_ms: int = 100) -> dict[str, Any] | None:
        self.poll(timeout_ms)
        self.check_actors()
        return self.maybe_update()

    def shutdown(self, reason: str) -> None:
        """Tell every actor to stop (broadcast, and directly to each known one)."""
        self.sockets.publish(Shutdown(reason))
        for identity in list(self.actors):
            self.sockets.reply(identity, Shutdown(reason))
        if self.metrics is not None:
            self.metrics.close()
