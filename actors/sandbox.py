"""Run untrusted Python (a model's answer) against tests in a separate, limited process; for code rewards.

Each call gets a fresh scratch folder (its working directory, deleted afterwards, whatever the code left
there) and a child ``python -I -S -B actors/sandbox_guard.py``: isolated mode (no user site, no PYTHON*
variables, the script's folder not on ``sys.path``), no site-packages (standard library only), no .pyc writes,
and a minimal environment. What is enforced where:

========================  =================================================  ===============================
limit                     how                                                where
========================  =================================================  ===============================
wall clock                parent kills the child's process group             everywhere
CPU time                  ``RLIMIT_CPU`` (SIGXCPU/SIGKILL)                    Linux, macOS
memory                    ``RLIMIT_AS`` (MemoryError)                         Linux (macOS refuses it)
output size               ``RLIMIT_FSIZE`` on the captured stdout/stderr      Linux, macOS
new processes             ``RLIMIT_NPROC`` 0 + audit hook                     Linux, macOS (rlimit: not root)
network                   audit hook ends the child on any socket call;      everywhere
                          plus its own empty network namespace               Linux where ``unshare -rn`` works
files outside scratch     audit hook ends the child on writes/deletions      everywhere
========================  =================================================  ===============================

The audit hook (PEP 578, ``sandbox_guard.py``) guards the Python level; C extensions could get around it,
which is why ``ctypes`` is blocked and the kernel limits stay. This contains accidents and the usual
misbehaviour of generated code (endless loops, memory bombs, shell calls, stray files); it is not a boundary
for a determined attacker: run actors of untrusted workloads in a container or VM as well.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import secrets
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

GUARD = Path(__file__).resolve().with_name("sandbox_guard.py")
BLOCKED = 86  # sandbox_guard.BLOCKED: the child tried something forbidden


@dataclass(frozen=True)
class SandboxLimits:
    wall_s: float = 5.0
    """The child is killed after this long, whatever it does."""
    cpu_s: int = 2
    """CPU seconds (RLIMIT_CPU)."""
    memory_mb: int = 256
    """Address space in MiB (RLIMIT_AS, Linux)."""
    output_kb: int = 256
    """Most stdout + stderr (and any file) the child may write, in KiB."""


@dataclass(frozen=True)
class SandboxResult:
    passed: bool
    """The solution and the tests ran to their end without an error."""
    returncode: int | None
    """The child's exit code (negative: killed by that signal; None: killed at the wall-clock limit)."""
    timed_out: bool
    blocked: str
    """The forbidden action that ended the child, or ''."""
    output: str
    """The end of the child's stdout and stderr (for logs)."""
    workdir: str
    """The scratch folder it ran in (already deleted)."""


@functools.cache
def network_isolation() -> tuple[str, ...]:
    """The command prefix that gives the child an empty network namespace, or () where that is not possible
    (not Linux, no ``unshare``, unprivileged user namespaces disabled). Probed once per process."""
    unshare = shutil.which("unshare")
    if not sys.platform.startswith("linux") or unshare is None:
        return ()
    prefix = (unshare, "--net", "--map-root-user")
    try:
        probe = subprocess.run([*prefix, "true"], capture_output=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return ()
    if probe.returncode != 0:
        logger.info("no network namespace for sandboxed code (unshare: %s)", probe.stderr.decode().strip())
        return ()
    return prefix


def _environment(scratch: str) -> dict[str, str]:
    # Nothing of the actor's environment (proxies, credentials, LD_PRELOAD) reaches the child.
    return {
        "PATH": os.defpath,
        "HOME": scratch,
        "TMPDIR": scratch,
        "LANG": "C.UTF-8",
        "PYTHONIOENCODING": "utf-8",
    }


def _remove(scratch: str) -> None:
    def make_writable_and_retry(function, path, _exc):
        os.chmod(os.path.dirname(path), stat.S_IRWXU)  # the code may have made its folders read-only
        if os.path.isdir(path) and not os.path.islink(path):
            os.chmod(path, stat.S_IRWXU)
        function(path)

    # Python 3.12 renamed the error callback (same arguments as far as this one reads them).
    callback = "onexc" if sys.version_info >= (3, 12) else "onerror"
    shutil.rmtree(scratch, **{callback: make_writable_and_retry})


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        proc.kill()
    proc.communicate()  # reaps it and closes its stdin pipe


def _run_child(scratch: str, settings: dict, wall_s: float) -> tuple[int | None, str]:
    """Run the guard in ``scratch``; (exit code or None when killed at ``wall_s``, the end of its output)."""
    with tempfile.TemporaryFile() as out:  # not in scratch: the code cannot reach or replace it
        command = [*network_isolation(), sys.executable, "-I", "-S", "-B", str(GUARD)]
        proc = subprocess.Popen(
            command, cwd=scratch, env=_environment(scratch), stdin=subprocess.PIPE, stdout=out,
            stderr=subprocess.STDOUT, start_new_session=True,  # its own group: killed as a whole
        )  # fmt: skip
        try:
            proc.communicate(json.dumps(settings).encode(), timeout=wall_s)
            returncode = proc.returncode
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            returncode = None
        out.seek(max(0, out.seek(0, os.SEEK_END) - 4096))
        return returncode, out.read().decode(errors="replace")


def run_python_tests(code: str, tests: str, limits: SandboxLimits | None = None) -> SandboxResult:
    """Run ``code`` then ``tests`` (e.g. ``assert`` lines) in a sandboxed child; see the module docstring.

    Never raises for anything the code does: a crash, a timeout or a forbidden action is a result that did not
    pass. The scratch folder is removed before returning.
    """
    limits = limits or SandboxLimits()
    scratch = os.path.realpath(tempfile.mkdtemp(prefix="mlx-ppo-sandbox-"))
    nonce = secrets.token_hex(16)
    settings = {
        "nonce": nonce,
        "cpu_s": limits.cpu_s,
        "memory_mb": limits.memory_mb,
        "output_kb": limits.output_kb,
    }
    try:
        Path(scratch, "solution.py").write_text(code, encoding="utf-8")
        Path(scratch, "tests.py").write_text(tests, encoding="utf-8")
        returncode, output = _run_child(scratch, settings, limits.wall_s)
    finally:
        _remove(scratch)
    passed = returncode == 0 and f"\n{nonce}\n" in output
    _, marker, what = output.rpartition("sandbox: blocked ")
    blocked = what.strip() if marker and returncode == BLOCKED else ""
    return SandboxResult(
        passed, returncode, returncode is None, blocked, output.replace(nonce, "<pass>"), scratch
    )
