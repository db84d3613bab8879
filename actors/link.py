"""The actor's link to the learner: hello and welcome, saying hello again (with backoff) while the learner is
silent, heartbeats; and the rollout grants the learner hands out. Both only send; the actor reads the sockets and
hands them what arrived."""

from __future__ import annotations

import logging
import os
import socket
import time
import uuid
from typing import Protocol

from common import protocol
from common.config import Config, config_hash
from common.logs import RateLimitFilter
from common.protocol import Heartbeat, Hello, ProtocolError, RolloutGrant, RolloutRequest, Welcome
from common.transport import ActorSockets

logger = logging.getLogger(__name__)
logger.addFilter(RateLimitFilter())  # a learner (or an impostor) sending junk must not flood the log

HELLO_EVERY_S = 2.0
"""While joining, how often the hello goes out again (the learner may not be up yet)."""
MAX_RETRY_S = 30.0
"""The longest wait between two hellos to a silent learner."""


class ActorStopped(Exception):
    """The learner told this actor to stop (``refused``: it would not accept this actor at all)."""

    def __init__(self, reason: str, refused: bool = False):
        super().__init__(reason)
        self.refused = refused


class HasMetrics(Protocol):
    def as_dict(self) -> dict[str, float]: ...


class LearnerLink:
    """Who this actor is to the learner (its hello; the run and admission token of its welcome) and whether the
    learner still answers."""

    def __init__(self, cfg: Config, actor_id: int, num_actors: int, sockets: ActorSockets):
        self.transport, self.sockets = cfg.transport, sockets
        self.hello = Hello(
            actor_id,
            config_hash(cfg),
            host=socket.gethostname(),
            pid=os.getpid(),
            num_actors=num_actors,
            incarnation=uuid.uuid4().hex,  # this process's: tells the learner a restart from a repeated hello
        )
        self.run_id = ""  # the learner's, from its welcome
        self.token = ""  # this admission's, from the welcome: every experience batch carries it
        self.seen = time.monotonic()
        self.silent = False
        self._retry_backoff_s = 1.0
        self._next_retry = 0.0
        self._next_hello = 0.0
        self._last_heartbeat = 0.0

    @property
    def actor_id(self) -> int:
        return self.hello.actor_id

    def decode(self, frames: list[bytes]) -> object | None:
        """The learner's message in ``frames`` (it is heard from), or None for a bad one (logged, ignored)."""
        try:
            msg = protocol.decode(frames, self.transport.max_message_mb * 2**20)
        except ProtocolError as e:
            logger.warning("ignored a bad message from the learner: %s", e)
            return None
        self.seen = time.monotonic()
        if self.silent:
            logger.info("the learner answers again")
        self.silent, self._retry_backoff_s = False, 1.0
        return msg

    def say_hello(self) -> bool:
        return self.sockets.request(self.hello)

    def greet(self) -> bool:
        """While joining: say hello if ``HELLO_EVERY_S`` passed since the last one; whether one went out."""
        if time.monotonic() < self._next_hello:
            return False
        self._next_hello = time.monotonic() + HELLO_EVERY_S
        return self.say_hello()

    def welcomed(self, msg: Welcome) -> bool:
        """Take the learner's welcome; True when it comes from another learner run than the last one (a restart).
        Raises ActorStopped (refused) when the learner runs another config."""
        logger.info("welcomed by learner (run %s, policy v%d)", msg.run_id, msg.policy_version)
        if msg.config_hash and msg.config_hash != self.hello.config_hash:
            raise ActorStopped(
                f"learner run {msg.run_id} has config {msg.config_hash}, this actor {self.hello.config_hash}",
                refused=True,
            )
        restarted = bool(self.run_id) and msg.run_id != self.run_id
        if restarted:
            logger.info("the learner restarted (run %s -> %s): taking its snapshot", self.run_id, msg.run_id)
        self.run_id, self.token = msg.run_id, msg.token
        return restarted

    def watch(self) -> bool:
        """Whether the learner is silent past ``transport.learner_timeout_s``; if so, say hello again now and
        then (after 1, 2, 4 ... 30 s) until it answers (the same learner, or a restarted one)."""
        now = time.monotonic()
        if not self.run_id or now - self.seen <= self.transport.learner_timeout_s:
            return False
        if not self.silent:
            self.silent = True
            logger.warning(
                "the learner went silent: nothing heard for %.0f s; asking again with backoff",
                now - self.seen,
            )
        if now >= self._next_retry:
            self.say_hello()
            self._next_retry = now + self._retry_backoff_s
            self._retry_backoff_s = min(2 * self._retry_backoff_s, MAX_RETRY_S)
        return True

    def heartbeat(self, policy_version: int, checksum: str, stats: HasMetrics, force: bool = False) -> None:
        """Tell the learner this actor lives and what it runs, once per ``transport.heartbeat_s`` (or now)."""
        if self.silent:  # hellos go out instead (``watch``)
            return
        if force or time.monotonic() - self._last_heartbeat >= self.transport.heartbeat_s:
            name = f"actor-{self.actor_id}"
            self.sockets.request(Heartbeat(name, policy_version, checksum, stats.as_dict()))
            self._last_heartbeat = time.monotonic()


class Grants:
    """The learner's rollout grants: asked for (again every heartbeat interval while unanswered), counted until
    used, the newest policy version granted at, and the sequences this actor dropped itself to give back."""

    def __init__(self, sockets: ActorSockets, actor_id: int, batch_size: int, heartbeat_s: float):
        self.sockets, self.actor_id, self.batch_size, self.heartbeat_s = (
            sockets,
            actor_id,
            batch_size,
            heartbeat_s,
        )
        self.granted = 0  # batches the learner allowed and this actor has not generated yet
        self.version = 0  # generate only with at least the learner's version at the latest grant
        self._next_request = 0.0
        self._reported_drops = 0  # stale-dropped sequences already given back to the learner's admission

    def ask(self, stale_dropped: int) -> None:
        """Ask for a batch when none is granted and the last request went unanswered long enough; the request
        carries the sequences dropped since the last one (``stale_dropped`` counts them all)."""
        if self.granted or time.monotonic() < self._next_request:
            return
        returned = stale_dropped - self._reported_drops
        if self.sockets.request(RolloutRequest(self.actor_id, self.batch_size, returned)):
            self._reported_drops += returned
        self._next_request = time.monotonic() + self.heartbeat_s

    def take(self, msg: RolloutGrant) -> None:
        self.granted += 1
        self.version = max(self.version, msg.policy_version)
        self._next_request = 0.0  # answered: the next request goes out as soon as this grant is used

    def use(self) -> None:
        self.granted -= 1

    def reset(self, stale_dropped: int) -> None:
        """A (re)started learner knows no earlier request or grant (nor the drops already reported)."""
        self.granted, self.version, self._next_request, self._reported_drops = 0, 0, 0.0, stale_dropped
