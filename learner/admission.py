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
"""

from __future__ import annotations

from collections import deque


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
