"""The exit codes of every process of a run (launcher, learner ranks, actors, tools), in one place.

The launcher reads them: a process that exits with ``BAD_SETUP`` is not restarted (a bad config or model will fail
the same way again), ``REFUSED`` means the learner turned the actor away (another run's config), and
``WRITE_FAILED`` stops the run with the last checkpoint whole (a full disk). Signals show as negative codes.
"""

from enum import IntEnum


class ExitCode(IntEnum):
    OK = 0
    FAILED = 1
    """An unexpected error (a traceback is in the log)."""
    BAD_SETUP = 2
    """Bad arguments, config, model or task: said before anything ran; restarting would fail the same way."""
    REFUSED = 3
    """The learner refused this actor (a config that differs from the learner's)."""
    WRITE_FAILED = 4
    """A checkpoint or metrics write failed (a full disk), or the process's launcher went away."""
