"""The snapshot publisher: the policy weights actors sample with, one snapshot per policy version.

Each snapshot goes out over PUB as an announcement (inline, or its chunks' checksums when ``transport.chunk_mb``
cuts it, or a shared file's path for actors on this host, ``common/weights.py``), and is answered on request
(a whole ``Weights`` or one chunk). With several learner ranks every rank publishes (the weights are identical);
only rank 0 shares files.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Iterable

import mlx.nn as nn

from common import protocol
from common.config import TransportConfig
from common.protocol import WeightsChunkRequest, WeightsRequest
from common.transport import LearnerSockets
from common.weights import AdapterSync, SharedSnapshots, announcement, shared_announcement, snapshot_chunk


class SnapshotPublisher:
    """Builds, announces and serves the policy snapshots; ``sync`` holds the last one's cost (metrics)."""

    def __init__(
        self,
        sockets: LearnerSockets,
        policy: nn.Module,
        transport: TransportConfig,
        run_id: str,
        full_weights: bool = False,
        share_files: bool = False,
    ):
        self.sockets, self.run_id = sockets, run_id
        self.adapters = AdapterSync(policy, full_weights=full_weights)
        self.chunk_bytes = int(transport.chunk_mb * 2**20)
        self.max_message_mb = transport.max_message_mb
        self.max_bytes = transport.max_message_mb * 2**20  # the largest message actors accept
        self.shared = SharedSnapshots(run_id) if share_files else None
        self.hostname = socket.gethostname()
        self.snapshot: protocol.Weights | None = None
        self.announce: protocol.Weights | None = None  # what actors get: the snapshot or its announcement
        self.sync = {"sync/ms": 0.0, "sync/bytes": 0}

    @property
    def checksum(self) -> str:
        return self.snapshot.checksum if self.snapshot is not None else ""

    def publish(self, policy_version: int, actor_hosts: Iterable[str]) -> None:
        """Snapshot the policy as ``policy_version`` and announce it (``actor_hosts``: where live actors run)."""
        start = time.perf_counter()
        self.snapshot = self.adapters.snapshot(policy_version, self.run_id)
        self.announce = announcement(self.snapshot, self.chunk_bytes)
        if self.announce.flat.nbytes > self.max_bytes:  # actors would reject it as too large
            raise ValueError(
                f"a policy snapshot is {self.snapshot.flat.nbytes / 2**20:.0f} MB > transport.max_message_mb="
                f"{self.max_message_mb}: raise it, or set transport.chunk_mb to send it in chunks"
            )
        local_actors = self.hostname in set(actor_hosts)
        if self.shared is not None and local_actors and (path := self.shared.share(self.snapshot)):
            self.announce = shared_announcement(self.snapshot, self.announce, path)
        self.sockets.publish(self.announce)
        self.sync = {
            "sync/ms": 1000 * (time.perf_counter() - start),
            "sync/bytes": int(self.snapshot.flat.nbytes),
        }

    def answer(self, msg: WeightsRequest | WeightsChunkRequest) -> protocol.Weights | None:
        """The reply to a weights request: the announcement, or the chunk asked for (None before any snapshot)."""
        if self.snapshot is None:
            return None
        if isinstance(msg, WeightsChunkRequest):
            return snapshot_chunk(self.snapshot, self.announce, msg)
        return self.announce

    def before_shutdown(self) -> None:
        """A shared snapshot's file goes with ``close``, maybe before an actor read it: the last snapshot then
        also travels inline."""
        if self.announce is not None and self.announce.shared:
            self.sockets.publish(announcement(self.snapshot, self.chunk_bytes))

    def close(self) -> None:
        if self.shared is not None:
            self.shared.close()
