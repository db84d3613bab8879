"""The learner's intake: everything actors send, decoded, checked and handed on; nothing they send can crash it.

Control messages (DEALER/ROUTER): hellos (``learner/admission.py``'s ``HelloAdmission``), heartbeats (the
registry's entry), rollout requests (``RolloutAdmission``'s grants), weights requests (the snapshot publisher).
Experience (PUSH/PULL): a batch whose token names its admitted sender goes to the buffer. Every message that
does not decode or fit is counted under ``reject/<reason>`` (``learner/rejections.py``), logged, and dropped.
"""

from __future__ import annotations

from collections.abc import Callable

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
    WeightsChunkRequest,
    WeightsRequest,
)
from common.transport import LearnerSockets
from learner.admission import HelloAdmission, RolloutAdmission
from learner.buffer import ExperienceBuffer
from learner.publisher import SnapshotPublisher
from learner.registry import ActorRegistry, BatchPositions
from learner.rejections import Rejections


class Intake:
    """Reads the learner's sockets; ``version`` says the learner's policy version now."""

    def __init__(
        self,
        cfg: Config,
        sockets: LearnerSockets,
        buffer: ExperienceBuffer,
        publisher: SnapshotPublisher,
        version: Callable[[], int],
    ):
        self.sockets, self.buffer, self.publisher, self.version = sockets, buffer, publisher, version
        self.registry, self.positions, self.rejections = ActorRegistry(), BatchPositions(), Rejections()
        self.admission = RolloutAdmission(
            max(cfg.ppo.max_policy_lag, 1) * cfg.ppo.batch_size, cfg.ppo.batch_size
        )
        self.hellos = HelloAdmission(
            sockets,
            self.registry,
            self.admission,
            self.positions,
            self.rejections,
            config_hash(cfg),
            publisher.run_id,
            cfg.transport.heartbeat_s,
        )
        self.max_bytes = cfg.transport.max_message_mb * 2**20

    def poll(self, timeout_ms: int) -> None:
        """Handle what arrives within ``timeout_ms``; experience is read only while the buffer has room."""
        for channel, identity, frames in self.sockets.poll(
            timeout_ms, read_experience=self.buffer.has_room()
        ):
            if channel == "control":
                self.control(identity, frames)
            else:
                self.experience(frames)
        self.hellos.decide_pending(self.version())

    def grant_rollouts(self) -> None:
        """Grant waiting actors a batch each while the in-flight bound allows (``learner/admission.py``)."""
        for identity in self.admission.grants(self.buffer.depth):
            self.sockets.reply(identity, RolloutGrant(self.version()))

    def control(self, identity: bytes, frames: list[bytes]) -> None:
        try:
            msg = protocol.decode(frames, self.max_bytes)
        except ProtocolError as e:
            return self.rejections.reject(e.reason, str(e))
        info = self.registry.actors.get(identity)
        if info is not None:
            self.registry.seen(info)
        if isinstance(msg, Hello):
            self.hellos.hello(identity, msg, self.version())
        elif info is None and identity in self.registry.deferred:
            self.rejections.reject(
                "deferred_peer", f"{type(msg).__name__} from a connection whose hello waits"
            )
        elif info is None:
            self.rejections.reject("unknown_peer", f"{type(msg).__name__} before hello")
            # An actor of an earlier incarnation of this learner (restarted): ask it to say hello again.
            self.sockets.reply(identity, Refuse("unknown actor: say hello again", rejoin=True))
        elif isinstance(msg, WeightsRequest | WeightsChunkRequest):
            if (reply := self.publisher.answer(msg)) is not None:
                self.sockets.reply(identity, reply)
        elif isinstance(msg, Heartbeat):
            info.policy_version, info.checksum, info.stats = msg.policy_version, msg.checksum, msg.stats
            info.gen_tokens_per_s = msg.stats.get("gen_tokens_per_s", info.gen_tokens_per_s)
        elif isinstance(msg, RolloutRequest):
            self.admission.received(identity, msg.returned)  # dropped by the actor: will never arrive
            self.admission.request(identity, msg.sequences)
            self.grant_rollouts()

    def experience(self, frames: list[bytes]) -> None:
        try:
            msg = protocol.decode(frames, self.max_bytes)
        except ProtocolError as e:
            return self.rejections.reject(e.reason, str(e))
        if not isinstance(msg, ExperienceBatch):
            return self.rejections.reject("bad_type", f"{type(msg).__name__} on the experience channel")
        found = self.registry.sender(msg.actor_id, msg.token)
        if found is None:  # not from an admission of this learner run: a stranger, or a dead predecessor's
            return self.rejections.reject(
                "unknown_sender", f"experience of actor {msg.actor_id} without its admission token"
            )
        identity, info = found
        info.gen_tokens_per_s = msg.gen_tokens_per_s
        self.registry.seen(info)
        self.admission.received(identity, len(msg.sequences))
        version = self.version()
        if msg.policy_version > version:  # sampled for an earlier run of this learner
            self.rejections.reject("future_version", f"v{msg.policy_version} > learner v{version}")
        else:
            accepted = self.buffer.add(msg, version)
            self.positions.delivered(msg.actor_id, msg.batch_id)
            stale = self.buffer.is_stale(msg.policy_version, version)
            self.rejections.watch(accepted == 0 and not stale, self.buffer.counters)
        self.grant_rollouts()  # stale or rejected sequences free their slots at once
