"""The learner as a service: talks to actors, fills the buffer, runs updates, publishes weights, logs metrics.

``LearnerService`` holds the state and is driven one ``step`` at a time (tests and the one-process mode call it
directly); ``run_learner`` is the process loop around it. Nothing an actor sends can crash it: every message is
decoded and validated, and a bad one is counted under ``reject/<reason>``, logged, and dropped.
"""

from __future__ import annotations

import logging
import socket
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from common import protocol
from common.config import Config, config_hash, config_to_dict
from common.models import vocab_size
from common.protocol import (
    ExperienceBatch,
    Heartbeat,
    Hello,
    ProtocolError,
    Refuse,
    RolloutGrant,
    RolloutRequest,
    Shutdown,
    WeightsChunkRequest,
    WeightsRequest,
    Welcome,
)
from common.transport import LearnerSockets
from common.weights import (
    AdapterSync,
    SharedSnapshots,
    announcement,
    shared_announcement,
    snapshot_chunk,
)
from learner.admission import RolloutAdmission
from learner.buffer import ExperienceBuffer, SequenceLimits
from learner.checkpoint import load_buffered, load_checkpoint, save_checkpoint
from learner.metrics import MetricsWriter, format_update_line
from learner.ppo_learner import PPOLearner
from learner.registry import ActorInfo, ActorRegistry

logger = logging.getLogger(__name__)
REJECT_LOG_INTERVAL_S = 10.0


class LearnerService:
    def __init__(self, cfg: Config, sockets: LearnerSockets, learner: PPOLearner, run_dir: Path):
        self.cfg, self.sockets, self.learner, self.run_dir = cfg, sockets, learner, run_dir
        learner.on_progress = self.heartbeat  # heartbeats go on during a long update
        limits = SequenceLimits(
            vocab_size(learner.container.policy), cfg.sampling.max_prompt_tokens, cfg.sampling.max_new_tokens
        )
        self.buffer = ExperienceBuffer(
            cfg.transport.buffer_batches * cfg.ppo.batch_size,
            cfg.ppo.group_size,
            cfg.ppo.max_policy_lag,
            cfg.ppo.dynamic_sampling,
            limits,
        )
        self.admission = RolloutAdmission(
            max(cfg.ppo.max_policy_lag, 1) * cfg.ppo.batch_size, cfg.ppo.batch_size
        )
        self.counters: Counter = Counter()
        self.registry = ActorRegistry()
        self.config_hash = config_hash(cfg)
        self.run_id = uuid.uuid4().hex[:12]
        # With several learner ranks, rank 0 alone writes metrics and checkpoints (the weights are identical).
        self.is_main = learner.group is None or learner.group.rank() == 0
        self.metrics = None
        if self.is_main:
            self.metrics = MetricsWriter(run_dir, cfg.run.metrics_sinks, config=config_to_dict(cfg))
        self.snapshot: protocol.Weights | None = None
        self.announce: protocol.Weights | None = None  # what actors get: the snapshot or its announcement
        self.shared = SharedSnapshots(self.run_id) if cfg.transport.share_snapshots and self.is_main else None
        self.hostname = socket.gethostname()
        self.chunk_bytes = int(cfg.transport.chunk_mb * 2**20)
        self.adapters = AdapterSync(learner.container.policy, full_weights=cfg.ppo.full_finetune)
        self.step_count = 0
        self.resumed_step = 0  # the update a resumed learner started from (its clock starts there)
        self.started = self.last_update_end = time.monotonic()
        self.sync = {"sync/ms": 0.0, "sync/bytes": 0}
        self.max_bytes = cfg.transport.max_message_mb * 2**20
        self.next_batch: dict[int, int] = {}  # actor id -> the batch after the newest one received
        self.resume_batch: dict[int, int] = {}  # from a checkpoint: where each actor continues on joining
        self.resumed_num_actors = 0
        self.never_started: set[int] = set()  # reported already
        self._next_heartbeat = 0.0
        self._actors_ready = False
        self.rejected_in_a_row = 0  # batches of which no group was accepted (stale ones aside)
        self._next_reject_log: dict[str, float] = {}

    @property
    def actors(self) -> dict[bytes, ActorInfo]:
        """The admitted actors by control identity (``learner/registry.py``)."""
        return self.registry.actors

    @property
    def finished(self) -> bool:
        return self.step_count >= self.cfg.run.max_updates

    # -- talking to actors ---------------------------------------------------------------------------------

    @property
    def expected_actors(self) -> int:
        """How many actors the run has, as their hellos say (0 before any)."""
        return max((a.num_actors for a in self.actors.values()), default=0)

    def publish_weights(self) -> None:
        start = time.perf_counter()
        self.snapshot = self.adapters.snapshot(self.learner.policy_version, self.run_id)
        self.announce = announcement(self.snapshot, self.chunk_bytes)
        if self.announce.flat.nbytes > self.max_bytes:  # actors would reject it as too large
            raise ValueError(
                f"a policy snapshot is {self.snapshot.flat.nbytes / 2**20:.0f} MB > transport.max_message_mb="
                f"{self.cfg.transport.max_message_mb}: raise it, or set transport.chunk_mb to send it in chunks"
            )
        local_actors = any(a.host == self.hostname and not a.gone for a in self.actors.values())
        if self.shared is not None and local_actors and (path := self.shared.share(self.snapshot)):
            self.announce = shared_announcement(self.snapshot, self.announce, path)
        self.sockets.publish(self.announce)
        self.sync = {
            "sync/ms": 1000 * (time.perf_counter() - start),
            "sync/bytes": int(self.snapshot.flat.nbytes),
        }

    def _reject(self, reason: str, detail: str) -> None:
        """Count a dropped message; log it at most every 10 s per reason (a flood must not flood the log)."""
        key = f"reject/{reason}"
        self.counters[key] += 1
        now = time.monotonic()
        if now >= self._next_reject_log.get(key, 0.0):
            self._next_reject_log[key] = now + REJECT_LOG_INTERVAL_S
            logger.warning("rejected a message (%s, %d so far): %s", reason, self.counters[key], detail)

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
        elif info is None and identity in self.registry.deferred:
            self._reject("deferred_peer", f"{type(msg).__name__} from a connection whose hello waits")
        elif info is None:
            self._reject("unknown_peer", f"{type(msg).__name__} before hello")
            # An actor of an earlier incarnation of this learner (restarted): ask it to say hello again.
            self.sockets.reply(identity, Refuse("unknown actor: say hello again", rejoin=True))
        elif isinstance(msg, WeightsRequest) and self.snapshot is not None:
            self.sockets.reply(identity, self.announce)
        elif isinstance(msg, WeightsChunkRequest) and self.snapshot is not None:
            self.sockets.reply(identity, snapshot_chunk(self.snapshot, self.announce, msg))
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
        """Report silent actors ("went silent": joined, then nothing for ``transport.actor_timeout_s``; their
        rollout grants are released) and absent ones ("never started": no hello within
        ``transport.startup_timeout_s`` while others of the run said there are that many)."""
        now = time.monotonic()
        for identity, info in self.actors.items():
            if not info.gone and now - info.last_seen > self.cfg.transport.actor_timeout_s:
                info.gone = True
                self.admission.forget(identity)
                logger.warning(
                    "actor %d went silent: nothing heard for %.1f s (its grant is released)",
                    info.actor_id,
                    now - info.last_seen,
                )
        if now - self.started > self.cfg.transport.startup_timeout_s:
            expected = self.expected_actors
            joined = {a.actor_id for a in self.actors.values()}
            if not self.actors and -1 not in self.never_started:
                self.never_started.add(-1)
                logger.warning(
                    "no actor has joined within %.0f s: are they running, and connecting to %s?",
                    self.cfg.transport.startup_timeout_s,
                    self.sockets.endpoints.control,
                )
            for actor_id in sorted(set(range(expected)) - joined - self.never_started):
                self.never_started.add(actor_id)
                logger.warning(
                    "actor %d never started: no hello within %.0f s (transport.startup_timeout_s)",
                    actor_id,
                    self.cfg.transport.startup_timeout_s,
                )
        self.grant_rollouts()

    def heartbeat(self) -> None:
        """Tell every actor this learner is alive (over control: a broadcast could push a snapshot out)."""
        if time.monotonic() < self._next_heartbeat:
            return
        self._next_heartbeat = time.monotonic() + self.cfg.transport.heartbeat_s
        checksum = self.snapshot.checksum if self.snapshot is not None else ""
        beat = Heartbeat("learner", self.learner.policy_version, checksum, {"step": float(self.step_count)})
        for identity, info in self.actors.items():
            if not info.gone:
                self.sockets.reply(identity, beat)

    def grant_rollouts(self) -> None:
        """Grant waiting actors a batch each while the in-flight bound allows (``learner/admission.py``)."""
        for identity in self.admission.grants(self.buffer.depth):
            self.sockets.reply(identity, RolloutGrant(self.learner.policy_version))

    def _hello(self, identity: bytes, msg: Hello) -> None:
        if msg.protocol_version != protocol.PROTOCOL_VERSION or msg.config_hash != self.config_hash:
            # The learner's own hash stays in its log: a peer that could read it could then say hello with it.
            logger.error(
                "refused actor %d: config %s, this learner's %s",
                msg.actor_id,
                msg.config_hash,
                self.config_hash,
            )
            self.counters["reject/config_mismatch"] += 1
            reason = (
                f"refused actor {msg.actor_id}: protocol v{msg.protocol_version} / config {msg.config_hash} do not "
                f"match the learner's protocol v{protocol.PROTOCOL_VERSION} and config (start both from the same config)"
            )
            self.sockets.reply(identity, Refuse(reason))
            return
        if self.registry.held_elsewhere(identity, msg.actor_id):
            self.registry.pending.append((identity, msg))  # decided once the control socket is drained
            return
        self._admit(identity, msg)

    def _decide_pending_hellos(self) -> None:
        """Hellos for an id another connection holds, decided after a whole poll's control messages (the
        holder's heartbeats queued during an update included) were read: a live holder keeps its id, the new
        connection asks again every 2 s; a quiet one (2.5 heartbeats: dead, restarted) is replaced."""
        quiet_s = 2.5 * self.cfg.transport.heartbeat_s
        for identity, msg in self.registry.take_pending():
            if self.registry.live_holder(identity, msg.actor_id, quiet_s):
                self.registry.defer(identity)
                self._reject("duplicate_actor", f"actor id {msg.actor_id} is held by a live connection")
            else:
                self._admit(identity, msg)

    def _admit(self, identity: bytes, msg: Hello) -> None:
        was_known = identity in self.actors
        info, replaced, restarted = self.registry.admit(identity, msg)
        for old in replaced:  # the same actor id, restarted: its old connection is dead
            logger.info("actor %d reconnected (pid %d -> %d)", msg.actor_id, old.pid, msg.pid)
        for other in [i for i in self.admission.in_flight if i not in self.actors]:
            self.admission.forget(other)
        if not was_known:
            logger.info("actor %d joined from %s (pid %d)", msg.actor_id, msg.host, msg.pid)
        self.admission.forget(identity)  # a (re)joining actor holds no grant
        next_batch = -1
        if msg.num_actors == self.resumed_num_actors:  # the same prompt shards as the checkpointed run
            next_batch = self.resume_batch.pop(msg.actor_id, -1)
        if next_batch < 0 and restarted:
            # A restarted actor continues after the newest batch its predecessor delivered (which it would
            # otherwise generate again from its first one): nothing trained twice, nothing undelivered skipped.
            next_batch = self.next_batch.get(msg.actor_id, -1)
        if next_batch >= 0:
            logger.info("actor %d continues at batch %d", msg.actor_id, next_batch)
        welcome = Welcome(self.learner.policy_version, self.run_id, self.config_hash, next_batch, info.token)
        self.sockets.reply(identity, welcome)

    def handle_experience(self, frames: list[bytes]) -> None:
        try:
            msg = protocol.decode(frames, self.max_bytes)
        except ProtocolError as e:
            return self._reject(e.reason, str(e))
        if not isinstance(msg, ExperienceBatch):
            return self._reject("bad_type", f"{type(msg).__name__} on the experience channel")
        found = self.registry.sender(msg.actor_id, msg.token)
        if found is None:  # not from an admission of this learner run: a stranger, or a dead predecessor's
            return self._reject(
                "unknown_sender", f"experience of actor {msg.actor_id} without its admission token"
            )
        identity, info = found
        info.gen_tokens_per_s = msg.gen_tokens_per_s
        self._seen(info)
        self.admission.received(identity, len(msg.sequences))
        if msg.policy_version > self.learner.policy_version:  # sampled for an earlier run of this learner
            self._reject("future_version", f"v{msg.policy_version} > learner v{self.learner.policy_version}")
        else:
            accepted = self.buffer.add(msg, self.learner.policy_version)
            self.next_batch[msg.actor_id] = max(self.next_batch.get(msg.actor_id, 0), msg.batch_id + 1)
            stale = self.buffer.is_stale(msg.policy_version, self.learner.policy_version)
            self._watch_rejections(rejected_whole=accepted == 0 and not stale)
        self.grant_rollouts()  # stale or rejected sequences free their slots at once

    def _watch_rejections(self, rejected_whole: bool) -> None:
        """A reward that fails on everything (or prompts that all go wrong) stalls a run without an update
        to report it: say so in the log after 3 fully rejected batches in a row, then every 10th."""
        self.rejected_in_a_row = self.rejected_in_a_row + 1 if rejected_whole else 0
        if self.rejected_in_a_row == 3 or (self.rejected_in_a_row and self.rejected_in_a_row % 10 == 0):
            reasons = {k: v for k, v in self.buffer.counters.items() if k.startswith("reject/")}
            hint = "check the reward function and the prompts"
            if set(reasons) == {"reject/zero_variance"}:
                hint = "every group scored alike (ppo.dynamic_sampling): the prompts are all too easy or too hard"
            logger.error(
                "the last %d batches were rejected whole (nothing to train on; %s): %s",
                self.rejected_in_a_row,
                reasons,
                hint,
            )

    def poll(self, timeout_ms: int) -> None:
        """Handle what arrives within ``timeout_ms``; experience is read only while the buffer has room."""
        for channel, identity, frames in self.sockets.poll(
            timeout_ms, read_experience=self.buffer.has_room()
        ):
            if channel == "control":
                self.handle_control(identity, frames)
            else:
                self.handle_experience(frames)
        self._decide_pending_hellos()

    # -- updating ------------------------------------------------------------------------------------------

    def waiting_for_actors(self) -> bool:
        """Whether training waits for ``run.min_actors`` to join (at most ``transport.startup_timeout_s``)."""
        ranks = 1 if self.learner.group is None else self.learner.group.size()
        needed = -(-self.cfg.run.min_actors // ranks)  # each rank serves its share of the actors
        if self._actors_ready or len(self.actors) >= needed:
            self._actors_ready = True
        elif time.monotonic() - self.started > self.cfg.transport.startup_timeout_s:
            logger.warning(
                "only %d of run.min_actors=%d actors joined: training anyway",
                len(self.actors),
                self.cfg.run.min_actors,
            )
            self._actors_ready = True
        return not self._actors_ready

    def maybe_update(self) -> dict[str, Any] | None:
        """Run an update when a full batch of fresh experience is buffered; returns its metrics."""
        if self.waiting_for_actors():
            return None
        taken = self.buffer.take(self.cfg.ppo.batch_size, self.learner.policy_version)
        if taken is None:
            return None
        exp, lags = taken
        if self.cfg.ppo.max_policy_lag > 0:  # the next batches generate while this one trains
            self.grant_rollouts()  # (with no lag allowed, only after: they must sample the new policy)
        stats = self.learner.update(exp)
        stats["trained/groups"] = [list(origin) for origin in exp.origins or []]  # for audits: exactly once
        self.step_count += 1
        if self.step_count % self.cfg.run.sync_every == 0:
            self.publish_weights()
        now = time.monotonic()
        metrics = self._metrics(stats, lags, now)
        self.last_update_end = now
        if not self.is_main:
            return metrics
        self.metrics.write(metrics)
        line = format_update_line(metrics, self.cfg.run.max_updates, resumed_step=self.resumed_step)
        logger.info("%s", line)
        if self.step_count % self.cfg.run.checkpoint_every == 0 or self.finished:
            self.save_checkpoint()
        return metrics

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
            actor_next_batch={str(k): v for k, v in sorted(self.next_batch.items())},
            counters={"service": dict(self.counters), "buffer": dict(self.buffer.counters)},
            num_actors=self.expected_actors,
            config=config_to_dict(self.cfg),
        )

    def resume(self, folder: Path) -> None:
        """Continue from the checkpoint ``folder``: learner state, update count, actors' prompt positions."""
        state = load_checkpoint(folder, self.learner)
        self.buffer.groups.extend(load_buffered(folder))
        self.step_count = self.resumed_step = int(state["step"])
        self.resume_batch = {int(k): int(v) for k, v in state.get("actor_next_batch", {}).items()}
        self.next_batch = dict(self.resume_batch)
        counters = state.get("counters", {})  # drops and rejects keep counting across the restart
        self.counters.update({str(k): int(v) for k, v in counters.get("service", {}).items()})
        self.buffer.counters.update({str(k): int(v) for k, v in counters.get("buffer", {}).items()})
        self.resumed_num_actors = int(state.get("num_actors", 0))
        if self.metrics is not None:
            self.metrics.drop_after(self.step_count)  # rows of updates the crash lost are done again

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
        self.heartbeat()
        return self.maybe_update()

    def shutdown(self, reason: str) -> None:
        """Tell every actor to stop (broadcast, and directly to each known one)."""
        if self.announce is not None and self.announce.shared:
            # Its file goes below, maybe before an actor read it: the last snapshot also travels inline.
            self.sockets.publish(announcement(self.snapshot, self.chunk_bytes))
        self.sockets.publish(Shutdown(reason))
        for identity in list(self.actors):
            self.sockets.reply(identity, Shutdown(reason))
        if self.shared is not None:
            self.shared.close()
        if self.metrics is not None:
            self.metrics.close()
