"""Run a command while busy processes compete for the cores: ``python tests/under_load.py [--busy N] -- CMD...``.

``make test-stress`` runs the whole suite this way (two busy processes on CI's 2 cores, as a shared machine
would be), so that a test that depends on which of two timings wins fails here rather than on someone's laptop.
Exits with the command's exit code; the busy processes are stopped whatever happens.
"""

from __future__ import annotations

import argparse
import multiprocessing
import subprocess
import sys


def spin() -> None:
    """Burn one core until killed (a little arithmetic and memory traffic, like a real neighbour)."""
    data = list(range(10_000))
    while True:
        data.reverse()
        sum(data)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--busy", type=int, default=2, help="busy processes (default 2)")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- then the command to run")
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("no command given")
    context = multiprocessing.get_context("spawn")
    spinners = [context.Process(target=spin, daemon=True) for _ in range(args.busy)]
    for proc in spinners:
        proc.start()
    try:
        return subprocess.run(command).returncode
    finally:
        for proc in spinners:
            proc.kill()
            proc.join()


if __name__ == "__main__":
    sys.exit(main())
