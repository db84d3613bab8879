"""The child side of ``actors/sandbox.py``: limit this process, run ``solution.py``, report what each case gave.

Run as ``python -I -S -B sandbox_guard.py`` in a fresh working folder (the current directory: bubblewrap's private
/tmp, or a scratch folder), with a JSON object on stdin: ``{"nonce": str, "code": str, "cases": [expr, ...],
"cpu_s": int, "memory_mb": int, "output_kb": int, "results_fd": int}``. Standard library only.

1. Resource limits (soft = hard, so the code cannot raise them back without privileges): CPU seconds (SIGXCPU,
   then SIGKILL), address space (allocations past it raise MemoryError; Linux, ignored where the OS refuses it,
   e.g. macOS), file size (stdout/stderr included: SIGXFSZ), no core dumps, no new processes (RLIMIT_NPROC 0;
   not enforced for root).
2. An audit hook (PEP 578) that ends the process at once (exit code ``BLOCKED``, the event on stderr) on
   sockets, processes (``os.system``, ``subprocess``, ``fork``, ``exec``, ``kill``), ``ctypes``, and writes or
   deletions outside the scratch folder: defence in depth; the operating system's isolation is the boundary.
3. The solution, then each case's expression in its namespace. Each value is turned into plain JSON by exact
   type (``int``, ``float``, ``str``, ``bool``, ``None``, ``list``/``tuple``, ``dict`` with ``str`` keys):
   anything else (a subclass, an object with its own ``__eq__``) is an error for that case. One results line goes
   to the results file; the parent compares with the expected values, which this process never sees.
"""

import contextlib
import json
import os
import sys

BLOCKED = 86
_PREFIXES = ("socket.", "subprocess.", "os.exec", "os.spawn", "os.posix_spawn", "ctypes.", "winreg.")
_EVENTS = frozenset(
    {"os.system", "os.fork", "os.forkpty", "os.kill", "os.killpg", "os.startfile", "signal.pthread_kill",
     "pty.spawn", "webbrowser.open"}
)  # fmt: skip
_PATH_EVENTS = frozenset(
    {"os.remove", "os.rmdir", "os.rename", "os.chmod", "os.chown", "os.truncate", "os.link", "os.symlink",
     "os.mkdir", "os.utime", "shutil.rmtree", "shutil.move", "shutil.copyfile"}
)  # fmt: skip
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_TRUNC


def _set_limits(cpu_s: int, memory_mb: int, output_kb: int) -> None:
    try:
        import resource
    except ImportError:  # not a Unix: only the parent's wall-clock timeout applies
        return
    limits = [("RLIMIT_CPU", cpu_s), ("RLIMIT_AS", memory_mb * 2**20), ("RLIMIT_FSIZE", output_kb * 1024)]
    limits += [("RLIMIT_CORE", 0), ("RLIMIT_NPROC", 0)]
    for name, value in limits:
        if hasattr(resource, name):
            # Some are refused on some systems (macOS: RLIMIT_AS below what is mapped); the rest still hold.
            with contextlib.suppress(ValueError, OSError):
                resource.setrlimit(getattr(resource, name), (value, value))


def _make_hook(scratch: str, write=os.write, exit_now=os._exit, realpath=os.path.realpath):
    """The audit hook. What it uses is bound here, at creation: code that monkeypatches ``os`` or this
    module's globals afterwards does not change what the hook does (and the hook itself is unreachable)."""
    fsdecode, commonpath = os.fsdecode, os.path.commonpath
    prefixes, events, path_events, write_flags = _PREFIXES, _EVENTS, _PATH_EVENTS, _WRITE_FLAGS

    def outside(path: object) -> bool:
        if isinstance(path, int):  # an open file descriptor: nothing new is reached through it
            return False
        try:
            return commonpath([scratch, realpath(fsdecode(path))]) != scratch
        except (TypeError, ValueError):
            return True

    def stop(what: str) -> None:
        write(2, f"\nsandbox: blocked {what}\n".encode(errors="replace"))
        exit_now(BLOCKED)

    def hook(event: str, args: tuple) -> None:
        if event in events or event.startswith(prefixes):
            stop(event)
        elif event == "open" and isinstance(args[2], int) and args[2] & write_flags and outside(args[0]):
            stop(f"open for writing {args[0]!r}")
        elif event in path_events and any(outside(a) for a in args[:2] if isinstance(a, str | bytes)):
            stop(f"{event} {args[:2]!r}")

    return hook


def _plain_maker():
    """``plain(value)``: ``value`` as plain JSON data, by exact type; raises TypeError for anything else. What it
    uses is bound here, before the candidate's code runs (which may replace builtins)."""
    kinds, type_, list_, dict_, tuple_, str_ = (
        (int, float, str, bool, type(None)),
        type,
        list,
        dict,
        tuple,
        str,
    )
    zip_, len_ = zip, len

    def plain(value, depth=0):
        kind = type_(value)
        if depth > 20:
            raise TypeError("nested too deeply")
        if kind in kinds:
            return value
        if kind is list_ or kind is tuple_:
            return [plain(v, depth + 1) for v in value]
        if kind is dict_ and all(type_(k) is str_ for k in value):
            keys = list_(value)
            return dict_(zip_(keys, [plain(value[k], depth + 1) for k in keys])) if len_(keys) else {}
        raise TypeError(f"{kind.__name__} is not a plain value")

    return plain


def main() -> None:
    settings = json.loads(sys.stdin.read())
    os.close(0)
    _set_limits(settings["cpu_s"], settings["memory_mb"], settings["output_kb"])
    scratch = os.path.realpath(os.getcwd())
    cases = [compile(expr, f"case {i}", "eval") for i, expr in enumerate(settings["cases"])]
    # Locals, bound before the candidate runs: immune to its monkeypatching of os, json, builtins.
    run, evaluate, write, exit_now, dumps = exec, eval, os.write, os._exit, json.dumps
    results_fd, nonce, plain, name_of = settings["results_fd"], settings["nonce"], _plain_maker(), type
    streams, suppress = (sys.stdout, sys.stderr), contextlib.suppress

    def flush() -> None:  # what the code printed, for logs and tools (os._exit does not flush)
        for stream in streams:
            with suppress(Exception):
                stream.flush()

    sys.addaudithook(_make_hook(scratch))
    namespace = {"__name__": "solution", "__builtins__": __builtins__}
    try:  # a syntax error too is reported as one line, not as a traceback through this file
        run(compile(settings["code"], "solution.py", "exec"), namespace)
    except BaseException as e:  # SystemExit and KeyboardInterrupt included: nothing is a pass then
        flush()
        write(2, f"sandbox: {name_of(e).__name__}: {e}\n".encode(errors="replace"))
        exit_now(1)
    results = []
    for case in cases:
        try:
            results.append({"value": plain(evaluate(case, namespace))})
        except BaseException as e:
            results.append({"error": f"{name_of(e).__name__}: {e}"[:300]})
    flush()
    write(results_fd, (dumps({"nonce": nonce, "results": results}) + "\n").encode())
    exit_now(0)


if __name__ == "__main__":
    main()
