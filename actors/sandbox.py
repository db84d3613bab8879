"""Run untrusted Python (a model's answer) against test cases, isolated by the operating system; for code rewards.

The grader lives here, outside the candidate: each test case is an expression evaluated in the candidate's process
(``add(2, 3)``) and an expected value that never enters it. The child returns what each expression gave, as
plain JSON (exact ``int``/``float``/``str``/``bool``/``None``/``list``/``dict``: no subclass, no object with a
rigged ``__eq__``), and the comparison happens in this process. Reading the expected values from a frame, or an
object equal to everything, cannot pass.

Isolation, strongest available first (``isolation()``):

- ``bwrap`` (Linux, Debian package ``bubblewrap``, installed by ``make setup`` when root): a read-only view of
  the root file system, the scratch folder the only writable path (plus a private ``/tmp``), new PID, network,
  IPC, UTS, user and cgroup namespaces, uid 65534, every capability dropped, ``--die-with-parent``: a process the
  code starts, even with ``setsid``, dies with the sandbox, nothing outside is visible to signal, no file can be
  made outside the scratch folder whatever the system call (sqlite, ``mkfifo``, ``mknod``, xattrs, ...).
- ``sandbox-exec`` (macOS; deprecated by Apple but present): a profile that denies network and writes outside the
  scratch folder; no PID namespace (the process group is still killed at the limits).
- neither: the audit-hook guard alone (``sandbox_guard.py``, a Python-level defence that determined code can get
  around), with a warning in the log.

In every mode the child also gets resource limits (CPU, memory, file size, no core dumps, no processes where the
kernel enforces it), an audit hook as defence in depth, a minimal environment, and a wall-clock kill of its group.
"""

from __future__ import annotations

import ast
import functools
import json
import logging
import math
import os
import secrets
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

GUARD = Path(__file__).resolve().with_name("sandbox_guard.py")
GUARD_IN_BWRAP = "/.mlx-ppo/sandbox_guard.py"
"""Where bwrap shows the guard: a fixed path outside the private /tmp (a checkout under /tmp would be hidden)."""
BLOCKED = 86  # sandbox_guard.BLOCKED: the child tried something forbidden
MAX_RESULTS_BYTES = 1 << 20


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
class Check:
    """One check: ``expr`` evaluated after the candidate's code, compared here with ``expected``."""

    expr: str
    expected: Any
    compare: str = "eq"
    """'eq' (equal, numbers across int/float, ``bool`` only to ``bool``), 'is' (``True``/``False``/``None``
    exactly) or 'close' (a number within ``tol``)."""
    tol: float = 0.0


@dataclass(frozen=True)
class SandboxResult:
    passed: bool
    """Every case gave its expected value."""
    returncode: int | None
    """The child's exit code (negative: killed by that signal; None: killed at the wall-clock limit)."""
    timed_out: bool
    blocked: str
    """The forbidden action that ended the child, or ''."""
    output: str
    """The end of the child's stdout and stderr (for logs)."""
    workdir: str
    """The scratch folder it ran in (already deleted)."""
    results: list[Any] = field(default_factory=list)
    """What each case gave (``{"value": ...}`` or ``{"error": ...}``), as the child reported it."""
    isolation: str = ""


# -- test cases -------------------------------------------------------------------------------------------


def parse_asserts(tests: str) -> list[Check]:
    """``assert EXPR == LITERAL`` / ``assert EXPR is True|False|None`` / ``assert abs(EXPR - LITERAL) < TOL``
    lines as test cases; anything else raises ValueError (the grader never runs test code in the candidate)."""
    cases = []
    for node in ast.parse(tests).body:
        if not isinstance(node, ast.Assert) or not isinstance(node.test, ast.Compare):
            raise ValueError(f"unsupported test: {ast.unparse(node)!r}")
        cases.append(_case(node.test))
    return cases


def _case(test: ast.Compare) -> Check:
    if len(test.ops) != 1:
        raise ValueError(f"unsupported test: {ast.unparse(test)!r}")
    op, left, right = test.ops[0], test.left, test.comparators[0]
    if isinstance(op, ast.Eq):
        return Check(ast.unparse(left), ast.literal_eval(right), "eq")
    if isinstance(op, ast.Is) and isinstance(right, ast.Constant) and right.value in (True, False, None):
        return Check(ast.unparse(left), right.value, "is")
    is_abs = isinstance(left, ast.Call) and isinstance(left.func, ast.Name) and left.func.id == "abs"
    if isinstance(op, ast.Lt) and is_abs and len(left.args) == 1 and isinstance(left.args[0], ast.BinOp):
        diff = left.args[0]
        if isinstance(diff.op, ast.Sub):
            expected, tol = ast.literal_eval(diff.right), ast.literal_eval(right)
            return Check(ast.unparse(diff.left), expected, "close", float(tol))
    raise ValueError(f"unsupported test: {ast.unparse(test)!r}")


def _number(x: Any) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool)


def same(result: Any, expected: Any) -> bool:
    """Equality of plain JSON values as Python's ``==`` on the originals would be, but a ``bool`` only equals a
    ``bool`` (``True == 1`` is not a pass)."""
    if _number(result) and _number(expected):
        return result == expected
    if type(result) is not type(expected):
        return False
    if isinstance(result, list):
        return len(result) == len(expected) and all(same(a, b) for a, b in zip(result, expected, strict=True))
    if isinstance(result, dict):
        return result.keys() == expected.keys() and all(same(result[k], expected[k]) for k in result)
    return result == expected


def grade(case: Check, reported: Any) -> bool:
    """Whether the child's report for ``case`` (``{"value": v}``) is its expected value."""
    if not isinstance(reported, dict) or "value" not in reported:
        return False
    value = reported["value"]
    expected = json.loads(json.dumps(case.expected))  # tuples as lists, as the child's values come
    if case.compare == "is":
        return type(value) is type(expected) and value == expected
    if case.compare == "close":
        return (
            _number(value) and _number(expected) and math.isfinite(value) and abs(value - expected) < case.tol
        )
    return same(value, expected)


# -- isolation --------------------------------------------------------------------------------------------


@functools.cache
def isolation() -> str:
    """'bwrap', 'sandbox-exec' or 'audit-hook' (probed once per process; a warning when only the last)."""
    if sys.platform.startswith("linux") and (bwrap := shutil.which("bwrap")):
        probe = subprocess.run(
            [bwrap, *_bwrap_args(), "--", _python(), "-c", ""],
            capture_output=True,
            timeout=60,
            env=_environment(
                "/tmp"
            ),  # not the actor's LD_PRELOAD: OpenBLAS's threads in bwrap hang its setup
        )
        if probe.returncode == 0:
            return "bwrap"
        logger.warning("bubblewrap cannot make namespaces here (%s)", probe.stderr.decode().strip()[:200])
    if sys.platform == "darwin" and shutil.which("sandbox-exec"):
        return "sandbox-exec"
    logger.warning(
        "no OS sandbox for generated code (install bubblewrap: apt-get install bubblewrap): running it with the "
        "audit-hook guard only, which code written to escape can get around"
    )
    return "audit-hook"


SANDBOX_TMP_MB = 64
"""Size of the sandbox's private ``/tmp`` (its working folder under bubblewrap): RAM it may fill, at most."""


def _python() -> str:
    """The real interpreter (not a virtual environment's link to it: with ``-I -S`` no site-packages is used)."""
    return os.path.realpath(sys.executable)


def _bwrap_args() -> list[str]:
    """What the sandbox sees: the system's programs and libraries and the Python installation, read-only; a
    private /tmp of ``SANDBOX_TMP_MB`` as its working folder. Not /home, /root, /work, /etc: no run folder, no
    keys, no credentials, no prompt data with the tests' answers."""
    paths = ["/usr", "/bin", "/lib", "/lib64", "/sbin", os.path.realpath(sys.base_prefix)]
    binds = [a for path in dict.fromkeys(paths) for a in ("--ro-bind-try", path, path)]
    return [
        *binds, "--ro-bind", str(GUARD), GUARD_IN_BWRAP, "--dev", "/dev", "--proc", "/proc", "--size", str(SANDBOX_TMP_MB << 20), "--tmpfs", "/tmp",
        "--chdir", "/tmp", "--unshare-all", "--unshare-user", "--uid", "65534", "--gid", "65534",
        "--cap-drop", "ALL", "--die-with-parent", "--new-session", "--clearenv",
    ]  # fmt: skip


_MACOS_PROFILE = """(version 1)
(allow default)
(deny network*)
(deny file-write*)
(allow file-write* (subpath "{scratch}") (literal "/dev/null"))
"""


def _command(scratch: str) -> list[str]:
    python = [_python(), "-I", "-S", "-B", str(GUARD)]
    mode = isolation()
    if mode == "bwrap":
        env = [a for k, v in _environment("/tmp").items() for a in ("--setenv", k, v)]
        return [shutil.which("bwrap"), *_bwrap_args(), *env, "--", *python[:-1], GUARD_IN_BWRAP]
    if mode == "sandbox-exec":
        return ["sandbox-exec", "-p", _MACOS_PROFILE.format(scratch=scratch), *python]
    return python


def _environment(scratch: str) -> dict[str, str]:
    # Nothing of the actor's environment (proxies, credentials, LD_PRELOAD) reaches the child.
    return {
        "PATH": os.defpath,
        "HOME": scratch,
        "TMPDIR": scratch,
        "LANG": "C.UTF-8",
        "PYTHONIOENCODING": "utf-8",
    }


# -- running ----------------------------------------------------------------------------------------------


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


def _spawn(scratch: str, settings: dict, wall_s: float, stdout: Any, stderr: Any) -> int | None:
    """Run the guard in ``scratch`` with ``settings`` on its stdin and its output to ``stdout``/``stderr`` (open
    files outside scratch): its exit code, None when killed at ``wall_s``. Its process group is killed either way."""
    proc = subprocess.Popen(
        _command(scratch), cwd=scratch, env=_environment(scratch), stdin=subprocess.PIPE, stdout=stdout,
        stderr=stderr, start_new_session=True, pass_fds=(settings["results_fd"],),
    )  # fmt: skip
    try:
        proc.communicate(json.dumps(settings).encode(), timeout=wall_s)
        returncode = proc.returncode
    except subprocess.TimeoutExpired:
        returncode = None
    if returncode is not None and returncode > 128 and isolation() == "bwrap":
        returncode = 128 - returncode  # bwrap reports its child killed by signal N as 128 + N
    _kill_group(proc)  # what it started dies too (in bwrap the PID namespace is gone with it already)
    return returncode


def _run_child(scratch: str, settings: dict, wall_s: float) -> tuple[int | None, str, bytes]:
    """Run the guard in ``scratch``: (exit code or None when killed at ``wall_s``, the end of its output, what
    it wrote to the results file). Output and results go to files outside scratch, passed in as descriptors."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as results:
        settings = {**settings, "results_fd": results.fileno()}
        returncode = _spawn(scratch, settings, wall_s, out, subprocess.STDOUT)
        out.seek(max(0, out.seek(0, os.SEEK_END) - 4096))
        results.seek(0)
        return returncode, out.read().decode(errors="replace"), results.read(MAX_RESULTS_BYTES + 1)


def _settings(code: str, cases: list[str], limits: SandboxLimits, nonce: str) -> dict[str, Any]:
    return {"nonce": nonce, "code": code, "cases": cases, "cpu_s": limits.cpu_s, "memory_mb": limits.memory_mb,
            "output_kb": limits.output_kb}  # fmt: skip


def _blocked(returncode: int | None, output: str) -> str:
    """The forbidden action the guard reported in ``output`` when it ended the child for one, else ''."""
    _, marker, what = output.rpartition("sandbox: blocked ")
    return what.strip() if marker and returncode == BLOCKED else ""


def _reported(raw: bytes, count: int, nonce: str) -> list[Any] | None:
    """The child's one results line (tagged with this run's nonce), or None when there is not exactly one."""
    lines = [line for line in raw.split(b"\n") if line.strip()]
    if len(lines) != 1 or len(raw) > MAX_RESULTS_BYTES:
        return None
    try:
        report = json.loads(lines[0])
    except ValueError:
        return None
    if not isinstance(report, dict) or report.get("nonce") != nonce:
        return None
    results = report.get("results")
    return results if isinstance(results, list) and len(results) == count else None


def run_python_cases(code: str, cases: list[Check], limits: SandboxLimits | None = None) -> SandboxResult:
    """Run ``code``, then each case's expression, in a sandboxed child; grade the results here.

    Never raises for anything the code does: a crash, a timeout or a forbidden action is a result that did not
    pass. The scratch folder is removed before returning.
    """
    limits = limits or SandboxLimits()
    scratch = os.path.realpath(tempfile.mkdtemp(prefix="mlx-ppo-sandbox-"))
    nonce = secrets.token_hex(16)
    settings = _settings(code, [c.expr for c in cases], limits, nonce)
    try:  # the working folder: under bubblewrap its private /tmp; elsewhere this scratch folder
        returncode, output, raw = _run_child(scratch, settings, limits.wall_s)
    finally:
        _remove(scratch)
    results = _reported(raw, len(cases), nonce) if returncode == 0 else None
    passed = results is not None and all(grade(c, r) for c, r in zip(cases, results, strict=True))
    blocked = _blocked(returncode, output)
    return SandboxResult(
        passed, returncode, returncode is None, blocked, output, scratch, results or [], isolation()
    )


def run_python_tests(code: str, tests: str, limits: SandboxLimits | None = None) -> SandboxResult:
    """``run_python_cases`` with the cases of ``tests`` (assert lines, ``parse_asserts``)."""
    return run_python_cases(code, parse_asserts(tests), limits)


@dataclass(frozen=True)
class SnippetResult:
    """What a snippet run by ``run_python_snippet`` printed, and how it ended."""

    stdout: str
    stderr: str
    """Its standard error: a Python error raised by the code is one line ``sandbox: Type: message``."""
    returncode: int | None
    """0 when the code ran to its end; 1 when it raised; negative: killed by that signal; None: wall clock."""
    timed_out: bool
    """Killed at the wall-clock limit or at the CPU-time limit (SIGXCPU, then SIGKILL)."""
    blocked: str
    """The forbidden action that ended it (the audit hook), or ''."""
    isolation: str = ""


def _head(file: Any, limit: int) -> str:
    file.seek(0)
    return file.read(limit).decode(errors="replace")


def run_python_snippet(code: str, limits: SandboxLimits | None = None) -> SnippetResult:
    """Run ``code`` in the sandbox (the same isolation and limits as ``run_python_cases``) and return what it
    wrote: for a tool that runs a model's code and shows it the output.

    Each of stdout and stderr holds at most ``limits.output_kb`` KiB: past that a write fails in the child (file
    size limit), which stops code that prints without end. Never raises for anything the code does. Output still
    in the child's buffers when it is killed (a timeout) is lost.
    """
    limits = limits or SandboxLimits()
    scratch = os.path.realpath(tempfile.mkdtemp(prefix="mlx-ppo-snippet-"))
    settings = _settings(code, [], limits, secrets.token_hex(16))
    cap = limits.output_kb * 1024
    try:
        with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
            with tempfile.TemporaryFile() as results:  # the guard's (empty) results line: not read here
                returncode = _spawn(
                    scratch, {**settings, "results_fd": results.fileno()}, limits.wall_s, out, err
                )
            stdout, stderr = _head(out, cap), _head(err, cap)
    finally:
        _remove(scratch)
    timed_out = returncode is None or returncode in (-signal.SIGXCPU, -signal.SIGKILL)
    return SnippetResult(stdout, stderr, returncode, timed_out, _blocked(returncode, stderr), isolation())
