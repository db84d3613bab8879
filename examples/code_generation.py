"""Code generation: function specs in, Python out; rewarded 1 when the code passes the spec's tests, else 0.

``python -m examples.code_generation [--model tiny] [--max-updates 2]``. Each prompt of
``examples/data/code.jsonl`` carries ``"tests"`` (assert lines). Every answer runs in its own sandboxed
process (``actors/sandbox.py``: CPU, memory, output and wall-clock limits, no network, no subprocesses, a
scratch folder deleted afterwards): whatever the code does, it scores 0 or 1 and cannot touch the run.
"""

from __future__ import annotations

import logging
import os
import re
import sys
from concurrent.futures import ThreadPoolExecutor

from actors.sandbox import SandboxLimits, run_python_tests
from examples.runner import ExampleTrainer, example_main

logger = logging.getLogger(__name__)

_FENCE = re.compile(r"```[ \t]*(?:python|py)?[ \t]*\n(.*?)(?:```|\Z)", re.DOTALL | re.IGNORECASE)
LIMITS = SandboxLimits(wall_s=5.0, cpu_s=2, memory_mb=256, output_kb=64)


def extract_code(completion: str) -> str:
    """The first fenced code block of the answer (models like fences), else the whole answer."""
    match = _FENCE.search(completion)
    return match.group(1) if match else completion


def test_score(completion: str, tests: str | None) -> float:
    """1.0 when the answer's code passes ``tests`` in the sandbox, else 0.0 (no tests: 0.0)."""
    if not tests:
        return 0.0
    result = run_python_tests(extract_code(completion), tests, LIMITS)
    if result.blocked or result.timed_out:
        logger.info("sandbox: %s", result.blocked or "timed out")
    return float(result.passed)


def code_reward(
    prompts: list[str], completions: list[str], tests: list[str | None] | None = None
) -> list[float]:
    """Batched: each completion against its prompt's tests, a few sandboxes at a time (threads only wait)."""
    tests = tests or [None] * len(completions)  # prompts without a "tests" field score 0, not NaN
    workers = max(1, min(4, os.cpu_count() or 1, len(completions)))
    with ThreadPoolExecutor(workers) as pool:
        return list(pool.map(test_score, completions, tests))


code_reward.batched = True  # run.reward calls it once per batch, with the "tests" field as a list


class CodeGenerationTrainer(ExampleTrainer):
    """Train a model to write small Python functions that pass their tests (sandboxed execution reward)."""

    name = "code_generation"
    data = "code.jsonl"
    reward = "examples.code_generation:code_reward"


def main(argv: list[str]) -> int:
    return example_main(CodeGenerationTrainer, argv)


if __name__ == "__main__":
    from common.logs import setup_logging

    setup_logging("example")
    raise SystemExit(main(sys.argv[1:]))
