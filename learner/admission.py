"""Rollout admission: how much generation may be in flight, so that nothing is too old when it is trained.

Without it every actor generates as fast as it can; with more actors than the learner can keep up with, batches
queue up, pass ``max_policy_lag`` while they wait and are dropped: wasted generation, and a learner that starves
while all actors regenerate (16-core runs in BENCHMARKS.md, issue 4: 40 of 64 sequences dropped with 4 actors).

Actors ask before generating a batch (``RolloutRequest``) and the learner grants (``RolloutGrant``) while

    sequences granted but not yet received + sequences waiting in the buffer <= limit,

with ``limit = max_policy_lag * ppo.batch_size``: every sequence is then trained within ``max_policy_lag``
updates of its grant, and a grant comes before its actor loads the weights it samples with. This is AReaL's
bound on in-flight rollouts (arXiv:2505.24298). One exception keeps the run going: while what is buffered and
in flight cannot fill the next update batch (``needed``), a request is always granted. Without it, groups dropped
on arrival (bad scores, dynamic sampling's equal scores) could leave, say, 12 of 16 sequences buffered with the
limit reached: no grant, no update, a stalled run.

Before any of that, an actor is admitted at all by its hello (``HelloAdmission``).
"""

from __future__ import annotations

import logging
from collections import deque

from common import protocol
from common.protocol import Hello, Refuse, Welcome
from common.transport import LearnerSockets
from learner.registry import ActorRegistry, BatchPositions
from learner.rejections import Rejections

logger = logging.getLogger(__name__)


class RolloutAdmission:
    """Grants in request order while the in-flight bound holds; keyed by the actor's control-socket identity."""

    def __init__(self, limit: int, needed: int = 1):
        """``limit``: sequences that may be granted-but-unreceived plus buffered (``max_policy_lag`` x batch);
        ``needed``: the update batch (ppo.batch_size), granted towards whatever the limit says."""
        if limit < 1:
            raise ValueError(f"admission limit {limit} must be >= 1")
        self.limit = limit
        self.needed = needed
        self.in_flight: dict[bytes, int] = {}
        self.waiting: deque[tuple[bytes, int]] = deque()

    @property
    def outstanding(self) -> int:
        """Sequences granted and not yet received."""
        return sum(self.in_flight.values())

    def request(self, identity: bytes, sequences: int) -> None:
        """Queue a request (an actor asks again only after its grant, so one per actor is waiting at most)."""
        if all(waiting != identity for waiting, _ in self.waiting):
            self.waiting.append((identity, sequences))

    def received(self, identity: bytes, sequences: int) -> None:
        """A batch from ``identity`` arrived (accepted or dropped): it no longer counts as outstanding."""
        left = self.in_flight.get(identity, 0) - sequences
        self.in_flight[identity] = max(left, 0)

    def forget(self, identity: bytes) -> None:
        """The actor (re)joined or left: whatever it was granted will not arrive."""
        self.in_flight.pop(identity, None)
        self.waiting = deque(w for w in self.waiting if w[0] != identity)

    def grants(self, buffered: int) -> list[bytes]:
        """Identities to grant one batch each now, given ``buffered`` sequences waiting to be trained."""
        out = []
        while self.waiting:
            identity, sequences = self.waiting[0]
            total = self.outstanding + buffered
            if total >= self.needed and total + sequences > self.limit:
                break
            self.waiting.popleft()
            self.in_flight[identity] = self.in_flight.get(identity, 0) + sequences
            out.append(identity)
        return out


class HelloAdmission:
    """Decides hellos: refused on another protocol or config, held while another connection has the actor id
    (``learner/registry.py``), else admitted with a ``Welcome`` (its token, and where its prompts continue)."""

    def __init__(
        self,
        sockets: LearnerSockets,
        registry: ActorRegistry,
        grants: RolloutAdmission,
        positions: BatchPositions,
        rejections: Rejections,
        config_hash: str,
        run_id: str,
        heartbeat_s: float,
    ):
        self.sockets, self.registry, self.grants, self.positions = sockets, registry, grants, positions
        self.rejections, self.config_hash, self.run_id = rejections, config_hash, run_id
        self.quiet_s = 2.5 * heartbeat_s  # a holder this quiet is taken for dead (2.5 heartbeats)

    def hello(self, identity: bytes, msg: Hello, version: int) -> None:
        """Answer ``msg`` (the learner is at policy ``version``), or hold it until ``decide_pending``."""
        if msg.protocol_version != protocol.PROTOCOL_VERSION or msg.config_hash != self.config_hash:
            # The learner's own hash stays in its log: a peer that could read it could then say hello with it.
            logger.error(
                "refused actor %d: config %s, this learner's %s",
                msg.actor_id,
                msg.config_hash,
                self.config_hash,
            )
            self.rejections.counters["reject/config_mismatch"] += 1
            reason = (
                f"refused actor {msg.actor_id}: protocol v{msg.protocol_version} / config {msg.config_hash} do not "
                f"match the learner's protocol v{protocol.PROTOCOL_VERSION} and config (start both from the same config)"
            )
            self.sockets.reply(identity, Refuse(reason))
            return
        if self.registry.held_elsewhere(identity, msg.actor_id):
            self.registry.pending.append((identity, msg))  # decided once the control socket is drained
            return
        self._admit(identity, msg, version)

    def decide_pending(self, version: int) -> None:
        """Hellos for an id another connection holds, decided after a whole poll's control messages (the
        holder's heartbeats queued during an update included) were read: a live holder keeps its id, the new
        connection asks again every 2 s; a quiet one (2.5 heartbeats: dead, restarted) is replaced."""
        for identity, msg in self.registry.take_pending():
            if self.registry.live_holder(identity, msg.actor_id, self.quiet_s):
                self.registry.defer(identity)
                self.rejections.reject(
                    "duplicate_actor", f"actor id {msg.actor_id} is held by a live connection"
                )
            else:
                self._admit(identity, msg, version)

    def _admit(self, identity: bytes, msg: Hello, version: int) -> None:
        was_known = identity in self.registry.actors
        info, replaced, restarted = self.registry.admit(identity, msg)
        for old in replaced:  # the same actor id, restarted: its old connection is dead
            logger.info("actor %d reconnected (pid %d -> %d)", msg.actor_id, old.pid, msg.pid)
        for other in [i for i in self.grants.in_flight if i not in self.registry.actors]:
            self.grants.forget(other)
        if not was_known:
            logger.info("actor %d joined from %s (pid %d)", msg.actor_id, msg.host, msg.pid)
        self.grants.forget(identity)  # a (re)joining actor holds no grant
        next_batch = self.positions.continue_at(msg.actor_id, msg.num_actors, restarted)
        if next_batch >= 0:
            logger.info("actor %d continues at batch %d", msg.actor_id, next_batch)
        welcome = Welcome(version, self.run_id, self.config_hash, next_batch, info.token)
        self.sockets.reply(identity, welcome)
