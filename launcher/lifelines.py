"""Lifelines: a learner or actor process stops when the launcher that started it is gone (no orphans).

A local child watches its parent's pid (``--parent-pid``); a child started over SSH watches its stdin
(``--stdin-lifeline``), the launcher's end of the connection.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time

from common.exit_codes import ExitCode

logger = logging.getLogger(__name__)


def watch_parent(parent_pid: int) -> None:
    """Exit when the launcher that started this process is gone (no orphans after a launcher crash)."""
    if not parent_pid:
        return

    def watch() -> None:
        while True:
            if os.getppid() != parent_pid:
                logger.error("launcher (pid %d) is gone; exiting", parent_pid)
                os._exit(ExitCode.WRITE_FAILED)
            time.sleep(1.0)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def watch_stdin(grace_s: float = 30.0) -> None:
    """Stop when stdin closes: a process started over SSH by ``--hostfile`` reads the launcher's end of its
    connection, which closes when the launcher exits or dies (no remote process outlives its run).

    SIGTERM first (a learner checkpoints and stops, an actor stops), then exit after ``grace_s``.
    """

    def watch() -> None:
        while os.read(0, 4096):  # the raw descriptor: a buffered reader's lock would abort interpreter exit
            pass
        logger.warning("the launcher's connection closed; stopping")
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(grace_s)
        os._exit(ExitCode.WRITE_FAILED)

    threading.Thread(target=watch, name="stdin-lifeline", daemon=True).start()
