"""Two tool environments for multi-turn rollouts (issue 18), each with its own offline problems.

``Calculator``: the model writes ``<calc>EXPRESSION</calc>`` and the next user turn answers each call, in order,
with ``<result>VALUE</result>`` (or ``<result>error: WHY</result>``). Expressions are evaluated from their syntax
tree (``evaluate``), never by ``eval``: numbers, ``+ - * / // % **``, unary ``-``/``+`` and parentheses only.

``PythonTool``: the model writes a fenced ```` ```python ```` block; the environment runs it in the code sandbox
(``actors/sandbox.py``: no network, no files outside a scratch folder, CPU, memory, time and output limits) and
answers with what it printed, ``<result>...</result>``.

In both, the episode ends on a message with ``Answer: N`` and no tool call: reward 1.0 when N is the record's
answer (integers exactly, other numbers within a relative 1e-6), else 0.0. A message with a tool call is never
graded, whatever else it says: the tool's answer comes first. A message with neither is answered with the syntax
again. No reward shaping: every turn but the last earns 0. Each step's ``info`` counts ``tool_calls``,
``tool_errors``, ``no_action`` and ``tool_output_cut`` (``PythonTool`` also ``tool_timeouts``).

Records are ``{"prompt", "answer", "kind"}``; ``Calculator.records(seed, count)`` and ``PythonTool.records``
make them offline and deterministically (problems a tool helps with: long products, modular powers, divisor
counts), e.g. ``run.environment = "actors.tool_environments:Calculator"``.
"""

from __future__ import annotations

import ast
import logging
import math
import operator
import random
import re
from typing import Any

from actors.environments import StepResult
from actors.sandbox import SandboxLimits, SnippetResult, run_python_snippet

logger = logging.getLogger(__name__)

MAX_EXPRESSION_CHARS = 200
MAX_EXPONENT = 64
MAX_DIGITS = 150
"""Calculator results (and numbers) have at most this many digits; a float at most ``1e150`` in size."""
MAX_CALLS_PER_TURN = 8
"""Calculator calls answered per message; the rest are not run (``tool_output_cut``)."""


class CalcError(ValueError):
    """An expression the calculator refuses or cannot compute; the message is shown to the model."""


# -- the calculator's evaluator -------------------------------------------------------------------------------

_BINARY = {
    ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow,
}  # fmt: skip
_UNARY = {ast.USub: operator.neg, ast.UAdd: operator.pos}
_ALLOWED = "only numbers, + - * / // % ** and parentheses"
_REFUSED = {
    ast.Name: "names are not allowed", ast.Attribute: "attributes are not allowed",
    ast.Call: "function calls are not allowed", ast.Tuple: "commas are not allowed (write 1234, not 1,234)",
    ast.BitXor: "^ is not allowed (write ** for a power)",
}  # fmt: skip
_SPELLINGS = str.maketrans({"×": "*", "÷": "/", "−": "-"})


def evaluate(expression: str) -> int | float:
    """The value of an arithmetic ``expression``; raises ``CalcError`` (with a message for the model) for
    anything but numbers, ``+ - * / // % **``, unary minus/plus and parentheses, for division by zero, an
    exponent over ``MAX_EXPONENT`` in size, and any number or intermediate result over ``MAX_DIGITS`` digits.
    ``×``, ``÷`` and ``−`` are read as ``*``, ``/`` and ``-``."""
    text = expression.translate(_SPELLINGS).strip()
    if not text:
        raise CalcError("empty expression")
    if len(text) > MAX_EXPRESSION_CHARS:
        raise CalcError(f"expression too long (at most {MAX_EXPRESSION_CHARS} characters)")
    try:
        tree = ast.parse(text, mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError) as e:
        raise CalcError("invalid syntax") from e
    try:
        return _value(tree.body)
    except ZeroDivisionError as e:
        raise CalcError("division by zero") from e
    except OverflowError as e:
        raise CalcError(f"result too large (more than {MAX_DIGITS} digits)") from e
    except RecursionError as e:
        raise CalcError("expression nested too deeply") from e


def _value(node: ast.AST) -> int | float:
    if isinstance(node, ast.Constant):
        if isinstance(node.value, bool) or not isinstance(node.value, int | float):
            raise CalcError(f"{node.value!r} is not a number: {_ALLOWED}")
        return _checked(node.value)
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        return _checked(_UNARY[type(node.op)](_value(node.operand)))
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        left, right = _value(node.left), _value(node.right)
        if isinstance(node.op, ast.Pow):
            _check_power(left, right)
        return _checked(_BINARY[type(node.op)](left, right))
    op = getattr(node, "op", None)
    why = _REFUSED.get(type(op)) or _REFUSED.get(type(node)) or f"{type(op or node).__name__} is not allowed"
    raise CalcError(f"{why}: {_ALLOWED}")


def _check_power(base: int | float, exponent: int | float) -> None:
    """Refuse a power before computing it when the exponent is too large. With the base under ``MAX_DIGITS``
    digits that bounds the work: at most 150 x 64 digits are computed before ``_checked`` refuses the result."""
    if abs(exponent) > MAX_EXPONENT:
        raise CalcError(f"exponent too large (at most {MAX_EXPONENT} in size)")


def _checked(value: Any) -> int | float:
    if isinstance(value, complex):
        raise CalcError("the result is not a real number")
    if isinstance(value, float) and not math.isfinite(value):
        raise OverflowError
    if abs(value) >= (10**MAX_DIGITS if isinstance(value, int) else float(f"1e{MAX_DIGITS}")):
        raise OverflowError
    return value


def format_number(value: int | float) -> str:
    """How the calculator writes a value: integers in full, floats as Python's shortest round trip."""
    return str(value) if isinstance(value, int) else repr(value)


# -- answers ------------------------------------------------------------------------------------------------

_ANSWER = re.compile(
    r"\banswer\s*:\s*\**\s*([-+−]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:[eE][-+]?\d+)?)(?![\d,.]*\d)",
    re.IGNORECASE,
)


def parse_number(text: str) -> int | float | None:
    """``text`` as a number: an integer, a decimal or ``1e5``-style float, thousands commas allowed; None if not."""
    text = text.strip().replace(",", "").replace("−", "-")
    try:
        return int(text)
    except ValueError:
        pass
    try:
        value = float(text)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def final_answer(message: str) -> int | float | None:
    """N of the first ``Answer: N`` in ``message`` (case-insensitive, ``**Answer:**`` too), or None."""
    match = _ANSWER.search(message)
    return None if match is None else parse_number(match.group(1))


def is_correct(answer: int | float, expected: int | float | str) -> bool:
    """Integers compare exactly (products past 2**53 included); otherwise within a relative 1e-6."""
    target = parse_number(str(expected)) if isinstance(expected, str) else expected
    if target is None:
        raise ValueError(f"the record's answer {expected!r} is not a number")
    if isinstance(answer, int) and isinstance(target, int):
        return answer == target
    try:
        return math.isclose(float(answer), float(target), rel_tol=1e-6, abs_tol=1e-9)
    except OverflowError:
        return False


# -- the environments ---------------------------------------------------------------------------------------


class _ToolEnvironment:
    """The turn logic both tools share: tool calls are answered, else ``Answer: N`` is graded, else the syntax
    is repeated. Subclasses give ``instructions``, ``reminder``, ``_calls(text)`` and ``_answer(calls)``."""

    max_turns = 4
    instructions = ""
    reminder = ""
    counters: tuple[str, ...] = ("tool_calls", "tool_errors", "no_action", "tool_output_cut")
    """The keys of every step's ``info`` (0 unless counted), the same on every turn for metrics."""

    def _info(self, **counts: int) -> dict[str, int]:
        return {**dict.fromkeys(self.counters, 0), **counts}

    def reset(self, record: dict[str, Any]) -> str:
        self.expected = record["answer"]
        return f"{self.instructions}\n\nProblem: {record['prompt']}"

    def step(self, action_text: str) -> StepResult:
        calls = self._calls(action_text)
        if calls:
            observation, info = self._answer(calls)
            return StepResult(observation, info=info)
        answer = final_answer(action_text)
        if answer is None:
            return StepResult(self.reminder, info=self._info(no_action=1))
        correct = is_correct(answer, self.expected)
        return StepResult("Correct." if correct else "Wrong.", float(correct), done=True, info=self._info())

    def _calls(self, text: str) -> list[str | None]:
        raise NotImplementedError

    def _answer(self, calls: list[str | None]) -> tuple[str, dict[str, int]]:
        raise NotImplementedError


_CALC = re.compile(r"<calc>(.*?)(</calc>|$)", re.DOTALL)


class Calculator(_ToolEnvironment):
    """Arithmetic with a calculator tool: ``<calc>EXPR</calc>`` calls (up to ``MAX_CALLS_PER_TURN`` a message),
    each answered ``<result>VALUE</result>`` or ``<result>error: WHY</result>`` (``tool_errors``)."""

    instructions = (
        "Solve the problem below. You have a calculator: write <calc>EXPRESSION</calc> (numbers, + - * / // % ** "
        "and parentheses) and the next message gives <result>VALUE</result> for each call. When you know the "
        "answer, reply with 'Answer: N' and no <calc> in that message."
    )
    reminder = "Use <calc>EXPRESSION</calc> to calculate, or reply with 'Answer: N' when you know the answer."

    def _calls(self, text: str) -> list[str | None]:
        """Each call's expression, None for a ``<calc>`` never closed."""
        return [m.group(1) if m.group(2) else None for m in _CALC.finditer(text)]

    def _answer(self, calls: list[str | None]) -> tuple[str, dict[str, int]]:
        run, errors, lines = calls[:MAX_CALLS_PER_TURN], 0, []
        for expression in run:
            try:
                if expression is None:
                    raise CalcError("<calc> not closed with </calc>")
                lines.append(f"<result>{format_number(evaluate(expression))}</result>")
            except CalcError as e:
                errors += 1
                lines.append(f"<result>error: {e}</result>")
        cut = len(calls) - len(run)
        if cut:
            lines.append(f"[{cut} more calls not run: at most {MAX_CALLS_PER_TURN} a message]")
        return "\n".join(lines), self._info(
            tool_calls=len(run), tool_errors=errors, tool_output_cut=int(cut > 0)
        )

    @staticmethod
    def records(seed: int = 0, count: int = 400) -> list[dict[str, Any]]:
        """``count`` problems, kinds in turn: product, sum, mod_product, mod_power (deterministic in ``seed``)."""
        rng = random.Random(f"calculator-{seed}")
        kinds = (_product, _sum, _mod_product, _mod_power)
        return [dict(zip(("prompt", "answer", "kind"), kinds[i % 4](rng), strict=True)) for i in range(count)]


def _product(rng: random.Random) -> tuple[str, int, str]:
    a, b = rng.randint(1000, 99999), rng.randint(100, 9999)
    prompt = rng.choice(
        (
            "What is {a} × {b}?",
            "A warehouse has {a} boxes with {b} screws in each. How many screws are there in all?",
            "A machine makes {b} parts an hour. How many parts does it make in {a} hours?",
        )
    )
    return prompt.format(a=a, b=b), a * b, "product"


def _sum(rng: random.Random) -> tuple[str, int, str]:
    numbers = [rng.randint(100, 99999) for _ in range(rng.randint(4, 7))]
    listed = ", ".join(str(n) for n in numbers[:-1]) + f" and {numbers[-1]}"
    prompt = rng.choice(
        ("What is the sum of {listed}?", "A shop took in {listed} dollars. How much in total?")
    )
    return prompt.format(listed=listed), sum(numbers), "sum"


def _mod_product(rng: random.Random) -> tuple[str, int, str]:
    a, b, m = rng.randint(100, 9999), rng.randint(100, 9999), rng.randint(7, 97)
    return f"What is the remainder when {a} × {b} is divided by {m}?", a * b % m, "mod_product"


def _mod_power(rng: random.Random) -> tuple[str, int, str]:
    a, k, m = rng.randint(2, 99), rng.randint(5, 12), rng.randint(7, 97)
    return f"What is the remainder when {a} to the power {k} is divided by {m}?", pow(a, k, m), "mod_power"


_FENCE = re.compile(r"```(?:python|py)[ \t]*\n(.*?)(```|$)", re.DOTALL | re.IGNORECASE)
DEFAULT_LIMITS = SandboxLimits(wall_s=5.0, cpu_s=5, memory_mb=256, output_kb=64)


class PythonTool(_ToolEnvironment):
    """Problems solved with a Python tool: the first ```` ```python ```` block of a message runs in the sandbox
    (``limits``; alone each time: nothing is kept between runs) and the next user turn shows its output, cut to
    ``max_output_chars`` (``tool_output_cut``); a run killed at a time limit counts ``tool_timeouts``, one that
    raised (its error line shown) or was blocked counts ``tool_errors``."""

    reminder = "Write a ```python block to run code, or reply with 'Answer: N' when you know the answer."
    counters = (*_ToolEnvironment.counters, "tool_timeouts")

    def __init__(self, limits: SandboxLimits | None = None, max_output_chars: int = 2000):
        self.limits, self.max_output_chars = limits or DEFAULT_LIMITS, max_output_chars
        self.instructions = (
            "Solve the problem below. You can run Python: write a ```python code block that prints what you need "
            f"and the next message gives its output (each block runs alone, for at most {self.limits.wall_s:g} "
            "seconds, without network or files). When you know the answer, reply with 'Answer: N' and no code "
            "block in that message."
        )

    def _calls(self, text: str) -> list[str | None]:
        match = _FENCE.search(text)
        return [] if match is None else [match.group(1) if match.group(2) else None]

    def _answer(self, calls: list[str | None]) -> tuple[str, dict[str, int]]:
        code = calls[0]
        if code is None:
            observation = "<result>\nerror: the code block is not closed with ```\n</result>"
            return observation, self._info(tool_calls=1, tool_errors=1)
        result = run_python_snippet(code, self.limits)
        text, cut = snippet_text(result, self.max_output_chars)
        failed = result.returncode != 0 and not result.timed_out
        if result.timed_out:
            logger.debug("a snippet ran past its limits (exit %s)", result.returncode)
        counts = {
            "tool_errors": int(failed),
            "tool_output_cut": int(cut),
            "tool_timeouts": int(result.timed_out),
        }
        return f"<result>\n{text}\n</result>", self._info(tool_calls=1, **counts)

    @staticmethod
    def records(seed: int = 0, count: int = 400) -> list[dict[str, Any]]:
        """``count`` problems, kinds in turn: sum_squares, divisor_count, multiples, digit_sum, prime_count."""
        rng = random.Random(f"python-{seed}")
        kinds = (_sum_squares, _divisor_count, _multiples, _digit_sum, _prime_count)
        return [dict(zip(("prompt", "answer", "kind"), kinds[i % 5](rng), strict=True)) for i in range(count)]


def snippet_text(result: SnippetResult, max_chars: int) -> tuple[str, bool]:
    """What the model is shown of a run: the head of stdout, then the tail of stderr (where a Python error is),
    within ``max_chars`` together, and a note when it timed out; and whether anything was cut."""
    out, err = result.stdout, result.stderr.strip("\n")
    err_room = min(len(err), max(max_chars // 2, max_chars - len(out)))
    out_room = max_chars - err_room
    cut = len(out) > out_room or len(err) > err_room
    parts = [out[:out_room].rstrip("\n")] if out else []
    if len(out) > out_room:
        parts.append(f"[output cut: the first {out_room} of {len(out)} characters shown]")
    if len(err) > err_room:
        parts.append(f"[error output cut: the last {err_room} of {len(err)} characters shown]")
    if err:
        parts.append(err[len(err) - err_room :])
    if result.timed_out:
        parts.append("[stopped: the code ran past its time limit]")
    return "\n".join(parts) or "(no output: print the values you need)", cut


def _sum_squares(rng: random.Random) -> tuple[str, int, str]:
    n = rng.randint(50, 999)
    prompt = f"What is the sum of the squares of the whole numbers from 1 to {n}?"
    return prompt, n * (n + 1) * (2 * n + 1) // 6, "sum_squares"


def _divisor_count(rng: random.Random) -> tuple[str, int, str]:
    n = rng.randint(1000, 999999)
    count = sum(1 if d * d == n else 2 for d in range(1, math.isqrt(n) + 1) if n % d == 0)
    return f"How many positive divisors does {n} have?", count, "divisor_count"


def _multiples(rng: random.Random) -> tuple[str, int, str]:
    n, a, b = rng.randint(1000, 99999), rng.randint(3, 19), rng.randint(3, 19)
    answer = n // a + n // b - n // math.lcm(a, b)
    return f"How many whole numbers from 1 to {n} are divisible by {a} or by {b}?", answer, "multiples"


def _digit_sum(rng: random.Random) -> tuple[str, int, str]:
    a, k = rng.randint(2, 9), rng.randint(20, 80)
    return f"What is the sum of the digits of {a} to the power {k}?", sum(map(int, str(a**k))), "digit_sum"


def _prime_count(rng: random.Random) -> tuple[str, int, str]:
    n = rng.randint(100, 20000)
    sieve = bytearray([1]) * n
    sieve[:2] = b"\x00\x00"
    for p in range(2, math.isqrt(n - 1) + 1):
        if sieve[p]:
            sieve[p * p :: p] = bytes(len(range(p * p, n, p)))
    return f"How many prime numbers are there below {n}?", sum(sieve), "prime_count"
