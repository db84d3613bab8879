"""The actor's side of weight sync: whole snapshots, announced ones fetched a few chunks at a time, ones read from
a shared file on the learner's machine; only a newer policy version is applied."""

from __future__ import annotations

import logging
import time

import mlx.nn as nn

from common import protocol
from common.logs import RateLimitFilter
from common.protocol import Weights, WeightsChunk
from common.transport import ActorSockets
from common.weights import AdapterSync, SnapshotAssembly, read_shared

logger = logging.getLogger(__name__)
logger.addFilter(RateLimitFilter())  # what the learner (or an impostor) sends must not flood the log


class WeightsClient:
    """The policy version and checksum this actor runs, and the snapshot arriving in chunks (``fetch``)."""

    def __init__(
        self, model: nn.Module, sockets: ActorSockets, actor_id: int, full_weights: bool, heartbeat_s: float
    ):
        self.adapters = AdapterSync(model, full_weights=full_weights)
        self.sockets, self.actor_id, self.heartbeat_s = sockets, actor_id, heartbeat_s
        self.fetch: SnapshotAssembly | None = None  # an announced snapshot arriving in chunks
        self.policy_version = -1
        self.checksum = ""
        self._next_request = 0.0

    def take(self, msg: Weights | WeightsChunk) -> None:
        """A snapshot (applied when newer), its announcement (fetched in chunks) or one of its chunks."""
        if isinstance(msg, Weights) and msg.policy_version > self.policy_version:
            self._take_snapshot(msg)
        elif isinstance(msg, WeightsChunk) and self.fetch is not None:
            self._take_chunk(msg)

    def request(self) -> None:
        """Ask the learner for its current snapshot."""
        self.sockets.request(protocol.WeightsRequest(self.actor_id, self.policy_version))

    def forget(self) -> None:
        """A new learner run: its snapshot replaces ours, whatever its version."""
        self.policy_version, self.fetch = -1, None

    def ask_later(self) -> None:
        """Give the learner a heartbeat interval to send the snapshot of a new grant before asking for it."""
        self._next_request = time.monotonic() + self.heartbeat_s

    def arriving(self):
        """The socket the next piece of a snapshot comes on: chunks are answers on control, the rest broadcast."""
        return self.sockets.weights if self.fetch is None else self.sockets.control

    def ask_if_late(self, version: int) -> None:
        """Still below ``version`` a heartbeat interval after the last ask: ask again (chunks, or the snapshot)."""
        if self.policy_version >= version or time.monotonic() < self._next_request:
            return
        if self.fetch is not None:
            self._ask_for_chunks(again=True)
        else:
            self.request()
        self.ask_later()

    def _take_snapshot(self, msg: Weights) -> None:
        if msg.shared and (local := read_shared(msg)) is not None:  # on the learner's machine: read its file
            try:
                return self._take_snapshot(local)
            except ValueError as e:  # replaced or damaged meanwhile: fetch the chunks instead
                logger.warning("shared snapshot v%d unusable (%s); fetching it", msg.policy_version, e)
        if msg.chunk_size:  # announced: fetch it in chunks (unless already fetching this one or a newer one)
            if self.fetch is None or self.fetch.announce.policy_version < msg.policy_version:
                self.fetch = SnapshotAssembly(msg)
                self._ask_for_chunks()
            return
        self.adapters.apply(msg)
        self.policy_version, self.checksum = msg.policy_version, msg.checksum
        logger.info("running policy v%d (checksum %s)", msg.policy_version, msg.checksum)

    def _take_chunk(self, chunk: WeightsChunk) -> None:
        try:
            complete = self.fetch.add(chunk)
        except ValueError as e:
            logger.warning("dropped snapshot v%d: %s", chunk.policy_version, e)
            self.fetch = None  # asked for again when the grant needs it
            return
        if not complete:
            return self._ask_for_chunks()
        snapshot, self.fetch = self.fetch.snapshot(), None
        if snapshot.policy_version > self.policy_version:
            self._take_snapshot(snapshot)

    def _ask_for_chunks(self, again: bool = False) -> None:
        for request in self.fetch.requests(self.actor_id, again):
            self.sockets.request(request)
