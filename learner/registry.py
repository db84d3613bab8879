"""Who the learner's actors are: one entry per admitted connection, with the token its experience must carry.

A ZeroMQ ROUTER knows each control connection by an identity; the experience channel (PUSH/PULL) names no sender
at all. So each admission gets a random token (in the Welcome) that the actor puts in every experience batch: a
batch with another token (a stranger's, a dead predecessor's still queued, one of an earlier learner run) is not
this actor's. The same actor process saying hello again (after a silent spell) keeps its token; a restarted one
(another ``incarnation``) gets a new one.

A hello that reuses an actor id held by another connection is decided only once the control socket has been
drained (``take_pending``): the holder's heartbeats queued meanwhile are read first, so a holder that is alive is
never kicked off, and a restarted actor's dead predecessor is replaced once it has fallen quiet.
"""

from __future__ import annotations

import logging
import secrets
import time
from collections import OrderedDict
from dataclasses import dataclass, field

from common.config import TransportConfig
from common.protocol import Hello

logger = logging.getLogger(__name__)

MAX_DEFERRED = 1024
"""Connections remembered as waiting for a busy id (the oldest are forgotten: they ask again)."""


@dataclass
class ActorInfo:
    """What the learner knows of one admitted actor: a plain record (13 fields) of its hello and heartbeats."""

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
    num_actors: int = 0
    """How many actors its run has (from its hello): the learner reports those that never start."""
    gone: bool = False
    """Silent for longer than ``transport.actor_timeout_s`` (it may come back)."""
    token: str = ""
    """What its experience batches must carry (sent in its Welcome)."""
    incarnation: str = ""
    """Its process's random id (its hello's); '' from actors that send none (host and pid stand in)."""


def incarnation_of(msg: Hello) -> str:
    return msg.incarnation or f"{msg.host}:{msg.pid}"


class ActorRegistry:
    """The admitted actors by control identity, hellos waiting for a busy id, each id's latest incarnation."""

    def __init__(self) -> None:
        self.actors: dict[bytes, ActorInfo] = {}
        self.pending: list[tuple[bytes, Hello]] = []
        self.deferred: OrderedDict[bytes, None] = OrderedDict()
        self.incarnations: dict[int, str] = {}

    @property
    def expected_actors(self) -> int:
        """How many actors the run has, as their hellos say (0 before any)."""
        return max((a.num_actors for a in self.actors.values()), default=0)

    def seen(self, info: ActorInfo) -> None:
        """``info``'s actor was just heard from (a silent one is back)."""
        info.last_seen = time.monotonic()
        if info.gone:
            info.gone = False
            logger.info("actor %d is back", info.actor_id)

    def held_elsewhere(self, identity: bytes, actor_id: int) -> bool:
        """Whether another connection holds ``actor_id`` (the hello then waits for ``take_pending``)."""
        return any(a.actor_id == actor_id and i != identity for i, a in self.actors.items())

    def live_holder(self, identity: bytes, actor_id: int, quiet_s: float) -> bool:
        """Whether another connection holds ``actor_id`` and was heard from within ``quiet_s``."""
        now = time.monotonic()
        return any(
            a.actor_id == actor_id and i != identity and not a.gone and now - a.last_seen < quiet_s
            for i, a in self.actors.items()
        )

    def take_pending(self) -> list[tuple[bytes, Hello]]:
        taken, self.pending = self.pending, []
        return taken

    def defer(self, identity: bytes) -> None:
        self.deferred[identity] = None
        self.deferred.move_to_end(identity)
        while len(self.deferred) > MAX_DEFERRED:
            self.deferred.popitem(last=False)

    def admit(self, identity: bytes, msg: Hello) -> tuple[ActorInfo, list[ActorInfo], bool]:
        """Register ``msg``'s actor on ``identity``: ``(its entry, entries it replaced, restarted)``, where
        ``restarted`` says an earlier process of this actor id had said hello to this learner run."""
        self.deferred.pop(identity, None)
        replaced = [self.actors.pop(i) for i in [i for i, a in self.actors.items() if a.actor_id == msg.actor_id and i != identity]]  # fmt: skip
        incarnation = incarnation_of(msg)
        same_process = [
            a for a in [self.actors.get(identity), *replaced] if a and a.incarnation == incarnation
        ]
        token = same_process[0].token if same_process else secrets.token_hex(16)
        info = ActorInfo(msg.actor_id, msg.host, msg.pid, num_actors=msg.num_actors, token=token,
                         incarnation=incarnation)  # fmt: skip
        self.actors[identity] = info
        restarted = self.incarnations.get(msg.actor_id) not in (None, incarnation)
        self.incarnations[msg.actor_id] = incarnation
        return info, replaced, restarted

    def sender(self, actor_id: int, token: str) -> tuple[bytes, ActorInfo] | None:
        """The admitted connection whose experience carries ``token`` for ``actor_id``, or None."""
        for identity, info in self.actors.items():
            if info.actor_id == actor_id and token and secrets.compare_digest(info.token, token):
                return identity, info
        return None


@dataclass
class BatchPositions:
    """Where each actor's prompt stream continues (its prompt cursor and sampling seeds follow from the batch id):
    after the newest batch received from it, or, joining a resumed learner, where the checkpoint says."""

    next_batch: dict[int, int] = field(default_factory=dict)
    """Actor id -> the batch after the newest one received."""
    resume_batch: dict[int, int] = field(default_factory=dict)
    """From a checkpoint: where each actor continues on joining (taken once)."""
    resumed_num_actors: int = 0
    """The number of actors of the checkpointed run (other prompt shards when it differs)."""

    def delivered(self, actor_id: int, batch_id: int) -> None:
        self.next_batch[actor_id] = max(self.next_batch.get(actor_id, 0), batch_id + 1)

    def continue_at(self, actor_id: int, num_actors: int, restarted: bool) -> int:
        """The batch a (re)joining actor continues at, or -1 (from its own start)."""
        next_batch = -1
        if num_actors == self.resumed_num_actors:  # the same prompt shards as the checkpointed run
            next_batch = self.resume_batch.pop(actor_id, -1)
        if next_batch < 0 and restarted:
            # A restarted actor continues after the newest batch its predecessor delivered (which it would
            # otherwise generate again from its first one): nothing trained twice, nothing undelivered skipped.
            next_batch = self.next_batch.get(actor_id, -1)
        return next_batch

    def checkpointed(self) -> dict[str, int]:
        return {str(k): v for k, v in sorted(self.next_batch.items())}

    def restore(self, actor_next_batch: dict[str, int], num_actors: int) -> None:
        self.resume_batch = {int(k): int(v) for k, v in actor_next_batch.items()}
        self.next_batch = dict(self.resume_batch)
        self.resumed_num_actors = num_actors


class ActorWatch:
    """The registry's actors over time: silent ones ("went silent": joined, then nothing for ``actor_timeout_s``),
    absent ones ("never started": no hello within ``startup_timeout_s`` while others of the run said there are
    that many), whether training may start (``min_actors``), and when the next learner heartbeat is due."""

    def __init__(
        self, registry: ActorRegistry, transport: TransportConfig, min_actors: int, ranks: int, control: str
    ):
        """``min_actors``: run.min_actors, of which each of the ``ranks`` learner ranks waits for its share;
        ``control``: this learner's control address (for the log)."""
        self.registry, self.transport, self.control = registry, transport, control
        self.min_actors, self.needed = min_actors, -(-min_actors // ranks)
        self.started = time.monotonic()
        self.never_started: set[int] = set()  # reported already (-1: no actor at all)
        self._ready = False
        self._next_heartbeat = 0.0

    def went_silent(self) -> list[bytes]:
        """Mark (and report) the actors silent for too long; returns their identities (grants to release)."""
        now, silent = time.monotonic(), []
        for identity, info in self.registry.actors.items():
            if not info.gone and now - info.last_seen > self.transport.actor_timeout_s:
                info.gone = True
                silent.append(identity)
                logger.warning(
                    "actor %d went silent: nothing heard for %.1f s (its grant is released)",
                    info.actor_id,
                    now - info.last_seen,
                )
        return silent

    def report_absent(self) -> None:
        """Report, once each, the actors that never said hello within ``startup_timeout_s``."""
        timeout = self.transport.startup_timeout_s
        if time.monotonic() - self.started <= timeout:
            return
        actors = self.registry.actors
        if not actors and -1 not in self.never_started:
            self.never_started.add(-1)
            logger.warning(
                "no actor has joined within %.0f s: are they running, and connecting to %s?",
                timeout,
                self.control,
            )
        joined = {a.actor_id for a in actors.values()}
        for actor_id in sorted(set(range(self.registry.expected_actors)) - joined - self.never_started):
            self.never_started.add(actor_id)
            logger.warning(
                "actor %d never started: no hello within %.0f s (transport.startup_timeout_s)",
                actor_id,
                timeout,
            )

    def waiting(self) -> bool:
        """Whether training still waits for ``min_actors`` to join (at most ``startup_timeout_s``)."""
        if self._ready or len(self.registry.actors) >= self.needed:
            self._ready = True
        elif time.monotonic() - self.started > self.transport.startup_timeout_s:
            joined = len(self.registry.actors)
            logger.warning(
                "only %d of run.min_actors=%d actors joined: training anyway", joined, self.min_actors
            )
            self._ready = True
        return not self._ready

    def heartbeat_due(self) -> bool:
        """Whether a heartbeat is due now (every ``transport.heartbeat_s``); if so, the next one is scheduled."""
        if time.monotonic() < self._next_heartbeat:
            return False
        self._next_heartbeat = time.monotonic() + self.transport.heartbeat_s
        return True
