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

import secrets
import time
from collections import OrderedDict
from dataclasses import dataclass, field

from common.protocol import Hello

MAX_DEFERRED = 1024
"""Connections remembered as waiting for a busy id (the oldest are forgotten: they ask again)."""


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
