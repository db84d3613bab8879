"""Supervising a run's child processes (local or over SSH): restarts, a clean stop, the run's exit code.

The learners decide when a run ends; the launcher waits for them. An actor that fails is started again after
1, 2, 4 ... s (at most 30), up to ``run.max_actor_restarts`` times in all, while the run goes on. A learner that
fails, an actor beyond its restarts, or any child that exits with ``ExitCode.BAD_SETUP`` (settings or prompts it
cannot work with: a restart would fail the same way) stops the run: the learners are asked to checkpoint and stop.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import subprocess
import time
from collections import Counter
from collections.abc import Callable

from common.exit_codes import ExitCode

logger = logging.getLogger(__name__)
MAX_RESTART_DELAY_S = 30.0


class Supervisor:
    """The children of one run and what the launcher knows about them: restarts so far, restarts due, whether
    the run is stopping and the exit code of the child that stopped it."""

    def __init__(
        self,
        procs: dict[str, subprocess.Popen],
        restarters: dict[str, Callable[[], subprocess.Popen]],
        max_restarts: int,
    ):
        self.procs, self.restarters, self.max_restarts = procs, restarters, max_restarts
        self.learners = [p for name, p in procs.items() if name.startswith("learner")]
        self.restarts: Counter[str] = Counter()
        self.due: dict[str, float] = {}  # child name -> when (monotonic) it is started again
        self.stopping = False
        self.failed = 0

    def stop_learners(self, signum: int | None = None, _frame=None) -> None:
        """Ask every running learner to checkpoint and stop (SIGTERM); also the handler of SIGINT/SIGTERM."""
        if signum is not None:
            logger.info("signal %d: asking the learner(s) to checkpoint and stop", signum)
        self.stopping = True
        for proc in self.learners:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)

    def may_restart(self, name: str, proc: subprocess.Popen) -> bool:
        return (
            name in self.restarters
            and self.restarts[name] < self.max_restarts
            and proc.returncode != ExitCode.BAD_SETUP
        )

    def check_children(self) -> None:
        """Schedule a restart for each failed child that may have one; stop the run for any other failure."""
        for name, proc in self.procs.items():
            if proc.poll() in (None, 0) or self.stopping or name in self.due:
                continue
            if self.may_restart(name, proc):
                self.restarts[name] += 1
                delay = min(2.0 ** (self.restarts[name] - 1), MAX_RESTART_DELAY_S)
                logger.warning(
                    "%s exited with code %d; restarting it in %.0f s (restart %d of at most %d)",
                    name, proc.returncode, delay, self.restarts[name], self.max_restarts,
                )  # fmt: skip
                self.due[name] = time.monotonic() + delay
                continue
            logger.error("%s exited with code %d; stopping the run", name, proc.returncode)
            self.failed = proc.returncode
            self.stop_learners()

    def start_due(self) -> None:
        for name, when in list(self.due.items()):
            if time.monotonic() >= when and not self.stopping:
                self.procs[name] = self.restarters[name]()
                del self.due[name]

    def run(self) -> int:
        """Supervise until the learners have exited; the run's exit code."""
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self.stop_learners)
        while any(p.poll() is None for p in self.learners):
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.learners[0].wait(timeout=0.5)
            self.check_children()
            self.start_due()
        stop_children(self.procs)
        return self.exit_code()

    def exit_code(self) -> int:
        """A failed learner's code, else the code of the child that stopped the run (1 for one killed by a
        signal), else 0."""
        codes = {
            name: p.returncode
            for name, p in self.procs.items()
            if name.startswith("learner") and p.returncode
        }
        if codes:
            logger.error("learner(s) failed: %s", codes)
            return next(iter(codes.values()))
        if self.failed > 0:
            return self.failed
        return ExitCode.FAILED if self.failed else ExitCode.OK


def supervise(
    procs: dict[str, subprocess.Popen],
    restarters: dict[str, Callable[[], subprocess.Popen]] | None = None,
    max_restarts: int = 0,
) -> int:
    """Wait for the learners; on a child failure or Ctrl-C ask them to checkpoint and stop. Returns the exit code.

    A child in ``restarters`` (the actors) that fails is started again, up to ``max_restarts`` times in all (see
    the module docstring).
    """
    return Supervisor(procs, restarters or {}, max_restarts).run()


def stop_children(procs: dict[str, subprocess.Popen], grace_s: float = 30.0) -> None:
    """Give children ``grace_s`` in all to exit on their own (they were told to stop), then terminate, then kill."""
    deadline = time.monotonic() + grace_s
    for proc in procs.values():
        try:
            proc.wait(timeout=max(deadline - time.monotonic(), 0.1))
        except subprocess.TimeoutExpired:
            proc.terminate()
    for proc in procs.values():
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
