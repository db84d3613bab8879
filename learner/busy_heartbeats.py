"""Heartbeats that go on while the learner is inside one long call.

An update can outlast the actors' patience: a micro-batch of a large model takes seconds, and on MLX's CUDA
backend the first update of a fresh machine compiles its kernels (minutes, ``bench/results/h200-warmup.md``).
One ``mx.eval`` can then run for longer than ``learner_timeout_s``. MLX releases the GIL inside ``eval``, so a
thread can beat meanwhile. The socket stays single-user: the service's own loop does not touch it while an update
runs, and the thread is joined before the loop goes on (ZeroMQ allows a socket to move between threads behind a
full memory barrier, which starting and joining the thread provide).
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable, Iterator

logger = logging.getLogger(__name__)


class BusyHeartbeats:
    """``beat`` (the service's heartbeat, which itself sends only when one is due) every ``interval_s`` from a
    thread while ``running()`` is entered."""

    def __init__(self, beat: Callable[[], None], interval_s: float):
        self._beat, self.interval_s = beat, interval_s

    @contextlib.contextmanager
    def running(self) -> Iterator[None]:
        stop = threading.Event()
        thread = threading.Thread(target=self._beat_until, args=(stop,), name="busy-heartbeats", daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join()  # before the caller's loop uses the socket again

    def _beat_until(self, stop: threading.Event) -> None:
        while not stop.wait(self.interval_s):
            try:
                self._beat()
            except Exception:  # a failed send must not end the update; the caller's loop sees the socket next
                logger.exception("heartbeat during the update failed; no more until it ends")
                return
