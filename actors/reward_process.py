"""Reward plugins (``run.reward = "module:function"``) run in a child process of the actor.

A reward that loops inside C code (a regex that backtracks forever, a native library) cannot be interrupted by a
timer in the actor's own process: it hung the actor for good (issue 15). Here the plugin runs in a child that the
actor kills (with its whole process group) when a sample takes longer than ``run.reward_timeout_s``; that sample
scores NaN (its group is dropped by the learner), a fresh child takes the rest. What the plugin prints goes to the
actor's log, at most ``OUTPUT_LINES_PER_WINDOW`` lines per ``OUTPUT_WINDOW_S`` (a plugin printing a gigabyte wrote
1 GB of log in 26 s); the rest is counted and dropped.

The two processes speak JSON lines over the child's stdin/stdout (the plugin's own stdout is redirected to its
stderr first): ``{"batch": [[prompt, completion, extras], ...], "batched": bool}`` in, one ``{"i": k, "score": x}``
per sample (or ``{"scores": [...]}`` for a batched plugin) out. Scores are only ever parsed as JSON numbers.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import select
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from typing import Any

from common.exit_codes import ExitCode

logger = logging.getLogger(__name__)
STARTUP_TIMEOUT_S = 120.0
"""How long the child may take to import the plugin (a package with heavy imports)."""
KILL_GRACE_S = 2.0
"""Past a sample's time limit, how long before the child is killed (its own timer answers NaN first)."""
MAX_REPLY_BYTES = 16 << 20
OUTPUT_WINDOW_S = 10.0
OUTPUT_LINES_PER_WINDOW = 20


class ProcessScorer:
    """Scores batches with the plugin ``spec`` in a child process; NaN for a sample that fails, times out or
    gives a non-finite number. ``timeout_s`` limits each sample (0: no limit; a batched plugin gets
    ``timeout_s`` x the batch size)."""

    def __init__(self, spec: str, extras: Mapping[str, Mapping[str, Any]], timeout_s: float, batched: bool):
        self.spec, self.extras, self.timeout_s, self.batched = spec, extras, timeout_s, batched
        self.child: subprocess.Popen | None = None
        self.replies: _LineReader | None = None
        self.output = _OutputForwarder()
        self.log = RateLimitedLog(logger)
        self.killed = 0

    def __call__(self, prompts: Sequence[str], completions: Sequence[str]) -> list[float]:
        items = [[p, c, dict(self.extras.get(p, {}))] for p, c in zip(prompts, completions, strict=True)]
        if self.batched:
            return self._score(items, batched=True)
        scores: list[float] = []
        while len(scores) < len(items):  # after a kill, a fresh child scores what is left
            scores += self._score(items[len(scores) :], batched=False)
        return scores

    def _score(self, items: list[list[Any]], batched: bool) -> list[float]:
        """Scores of ``items``, in order; fewer when the child had to be killed (the hung sample is NaN)."""
        child = self._child()
        if child is None:
            return [math.nan] * len(items)
        try:
            child.stdin.write(json.dumps({"batch": items, "batched": batched}, default=str) + "\n")
            child.stdin.flush()
        except OSError:
            return self._lost(items, "ended", [], batched)
        # Its own timer catches a slow Python loop (NaN, no restart); this deadline, a hang in C code.
        limit = self.timeout_s * (len(items) if batched else 1) + (KILL_GRACE_S if self.timeout_s else 0.0)
        scores: list[float] = []
        while len(scores) < len(items):
            reply = self.replies.read(limit)
            if reply is None:
                return self._lost(items[len(scores) :], f"took longer than {limit:g} s", scores, batched)
            values = _scores_of(reply, batched, len(items))
            if values is None:
                return self._lost(items[len(scores) :], "answered nonsense", scores, batched)
            for message in reply.get("log", [])[:10]:  # what the scorer said in the child (a failure)
                self.log.warning("reward %s: %s", self.spec, str(message)[:500])
            scores += values
        return scores

    def _lost(
        self, items: list, why: str, done: list[float] | None = None, batched: bool = False
    ) -> list[float]:
        """Kill the child; the sample in progress (all of a batched call) scores NaN."""
        self.close()
        self.killed += 1
        self.log.warning("reward %s %s: killed it (%d so far); scored NaN", self.spec, why, self.killed)
        done = done or []
        return done + [math.nan] * (len(items) if batched else 1)

    def _child(self) -> subprocess.Popen | None:
        if self.child is not None and self.child.poll() is None:
            return self.child
        self.close()  # a child that died: its pipes closed, whatever it started killed
        command = [
            sys.executable,
            "-m",
            "actors.reward_process",
            self.spec,
            repr(self.timeout_s),
            str(os.getpid()),
        ]
        # The child imports what this process can: the same sys.path (a user's folder added at run time too).
        path = os.pathsep.join(p or os.getcwd() for p in sys.path)
        self.child = subprocess.Popen(
            command,
            env=os.environ | {"PYTHONPATH": path},
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            errors="replace",  # a plugin printing bytes that are not UTF-8 must not stop the output pump
            start_new_session=True,  # its own process group: a kill takes whatever it started too
        )
        self.output.follow(self.child.stderr, self.spec)
        self.replies = _LineReader(self.child.stdout.fileno())
        if self.replies.read(STARTUP_TIMEOUT_S) != {"ready": True}:
            logger.error("reward process for %s did not start (see the lines above)", self.spec)
            self.close()
            return None
        return self.child

    def close(self) -> None:
        if self.child is None:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):  # the group: what it started goes too
            os.killpg(self.child.pid, signal.SIGKILL)
        self.child.wait()
        for stream in (self.child.stdin, self.child.stdout):
            with contextlib.suppress(OSError):  # unflushed input to a dead child
                stream.close()
        self.child = None


class _LineReader:
    """JSON lines from a pipe with a deadline per line (its own buffer: select() cannot see Python's)."""

    def __init__(self, fd: int):
        self.fd, self.buffer = fd, bytearray()

    def read(self, timeout_s: float) -> dict | None:
        """The next JSON object within ``timeout_s`` (0: no limit), or None (timeout, end, not an object)."""
        deadline = time.monotonic() + timeout_s
        while b"\n" not in self.buffer:
            wait = deadline - time.monotonic() if timeout_s > 0 else None
            if wait is not None and wait <= 0:
                return None
            ready, _, _ = select.select([self.fd], [], [], wait)
            if not ready:
                return None
            chunk = os.read(self.fd, 1 << 16)
            if not chunk or len(self.buffer) > MAX_REPLY_BYTES:
                return None
            self.buffer += chunk
        line, _, rest = bytes(self.buffer).partition(b"\n")
        self.buffer = bytearray(rest)
        try:
            value = json.loads(line)
        except ValueError:
            return None
        return value if isinstance(value, dict) else None


def _scores_of(reply: dict, batched: bool, n: int) -> list[float] | None:
    if batched:
        scores = reply.get("scores")
        return [_finite(s) for s in scores] if isinstance(scores, list) and len(scores) == n else None
    return [_finite(reply.get("score"))] if "i" in reply else None


def _finite(value: Any) -> float:
    ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    return float(value) if ok else math.nan


class RateLimitedLog:
    """At most ``OUTPUT_LINES_PER_WINDOW`` records per ``OUTPUT_WINDOW_S``; then how many were dropped."""

    def __init__(self, log: logging.Logger):
        self.log, self.window_end, self.shown, self.dropped = log, 0.0, 0, 0

    def _allowed(self) -> bool:
        now = time.monotonic()
        if now >= self.window_end:
            if self.dropped:
                self.log.warning("... %d more reward messages dropped", self.dropped)
            self.window_end, self.shown, self.dropped = now + OUTPUT_WINDOW_S, 0, 0
        self.shown += 1
        self.dropped += self.shown > OUTPUT_LINES_PER_WINDOW
        return self.shown <= OUTPUT_LINES_PER_WINDOW

    def warning(self, message: str, *args: Any) -> None:
        if self._allowed():
            self.log.warning(message, *args)

    def info(self, message: str, *args: Any) -> None:
        if self._allowed():
            self.log.info(message, *args)


class _OutputForwarder:
    """Forwards a child's stderr to the log, rate-limited; always drains it (a full pipe would block the child)."""

    def __init__(self) -> None:
        self.log = RateLimitedLog(logger)

    def follow(self, stream: Any, spec: str) -> None:
        threading.Thread(target=self._pump, args=(stream, spec), daemon=True).start()

    def _pump(self, stream: Any, spec: str) -> None:
        for line in iter(lambda: stream.readline(4096), ""):  # bounded reads: a 1 GB line is not held whole
            self.log.info("reward %s: %s", spec, line.rstrip()[:500])
        stream.close()


def _die_with_the_actor(actor_pid: int) -> None:
    """Linux: SIGKILL this child when the actor dies (even by SIGKILL), so a plugin hung in C is not left."""
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    if os.getppid() != actor_pid:  # the actor died before that took effect (or this is not its child)
        os._exit(ExitCode.FAILED)


def _serve(spec: str, timeout_s: float, actor_pid: int) -> None:
    """The child: import the plugin, then score what arrives on stdin until it closes (the actor is gone)."""
    from actors.scoring import BatchedScorer, PerSampleScorer, import_function

    _die_with_the_actor(actor_pid)
    protocol_out = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # the plugin's prints go to stderr, which the actor forwards (rate-limited)
    sys.stdout = sys.stderr
    said = _Said()  # what the scorers log (a failure, a timeout) travels back with the score
    for name in ("actors.scoring",):
        logging.getLogger(name).addHandler(said)
        logging.getLogger(name).propagate = False  # said once, in the actor's log
    fn = import_function(spec)
    protocol_out.write(json.dumps({"ready": True}) + "\n")
    for line in sys.stdin:
        request = json.loads(line)
        items, batched = request["batch"], request["batched"]
        extras = {p: e for p, _, e in items}
        prompts, completions = [p for p, _, _ in items], [c for _, c, _ in items]
        if batched:
            scores = BatchedScorer(fn, extras, timeout_s)(prompts, completions)
            reply = {"scores": [_json_number(s) for s in scores], "log": said.take()}
            protocol_out.write(json.dumps(reply) + "\n")
            continue
        scorer = PerSampleScorer(fn, extras, timeout_s)
        for i, (prompt, completion) in enumerate(zip(prompts, completions, strict=True)):
            score = scorer([prompt], [completion])[0]
            protocol_out.write(json.dumps({"i": i, "score": _json_number(score), "log": said.take()}) + "\n")


class _Said(logging.Handler):
    """Collects log messages (warnings and up) between two replies."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage()[:500])

    def take(self) -> list[str]:
        taken, self.messages = self.messages, []
        return taken


def _json_number(value: float) -> float | None:
    return value if math.isfinite(value) else None


if __name__ == "__main__":
    _serve(sys.argv[1], float(sys.argv[2]), int(sys.argv[3]))
