"""The child side of ``actors/sandbox.py``: limit this process, then run ``solution.py`` and ``tests.py``.

Run as ``python -I -S -B sandbox_guard.py`` in a fresh scratch folder (the current directory), with a JSON
object on stdin: ``{"nonce": str, "cpu_s": int, "memory_mb": int, "output_kb": int}``. Standard library only.

1. Resource limits (soft = hard, so the code cannot raise them back without privileges): CPU seconds (SIGXCPU,
   then SIGKILL), address space (allocations past it raise MemoryError; Linux, ignored where the OS refuses it,
   e.g. macOS), file size (stdout/stderr included: SIGXFSZ), no core dumps, no new processes (RLIMIT_NPROC 0;
   not enforced for root).
2. An audit hook (PEP 578) that ends the process at once (exit code ``BLOCKED``, the event on stderr) on
   sockets, processes (``os.system``, ``subprocess``, ``fork``, ``exec``, ``kill``), ``ctypes``, and writes or
   deletions outside the scratch folder. Exiting, rather than raising, means ``try``/``except`` in the code
   cannot carry on.
3. The solution, then the tests, in one fresh namespace. Only when both finish does the nonce (from stdin, kept
   in a local of ``main``) go to stdout: exiting early, even with code 0 (``sys.exit``, ``os._exit``), is not
   a pass. Code that deliberately walks the interpreter's frames up into ``main`` could read the nonce: this
   guards against accidents and cheap tricks, not against code written to defeat this harness.
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


def main() -> None:
    settings = json.loads(sys.stdin.read())
    nonce = settings["nonce"]
    os.close(0)
    _set_limits(settings["cpu_s"], settings["memory_mb"], settings["output_kb"])
    scratch = os.path.realpath(os.getcwd())
    with open("solution.py", encoding="utf-8") as f:
        solution = compile(f.read(), "solution.py", "exec")
    with open("tests.py", encoding="utf-8") as f:
        tests = compile(f.read(), "tests.py", "exec")
    run, write, exit_now, stdout = exec, os.write, os._exit, sys.stdout  # locals: immune to monkeypatching
    sys.addaudithook(_make_hook(scratch))
    namespace = {"__name__": "solution", "__builtins__": __builtins__}
    try:
        run(solution, namespace)
        run(tests, namespace)
    except BaseException as e:  # SystemExit and KeyboardInterrupt included: anything that is not a pass
        write(2, f"sandbox: {type(e).__name__}: {e}\n".encode(errors="replace"))
        exit_now(1)
    stdout.flush()
    write(1, f"\n{nonce}\n".encode())
    exit_now(0)


if __name__ == "__main__":
    main()
