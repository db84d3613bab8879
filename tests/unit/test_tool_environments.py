"""The tool environments (issue 18): the calculator's evaluator and its refusals, tool calls answered before any
answer is graded, and Python snippets run in the real sandbox (small time limits: each run is a real process)."""

from __future__ import annotations

import math
import re
import time

import pytest

from actors.environments import load_environment
from actors.sandbox import SandboxLimits, SnippetResult, run_python_snippet
from actors.tool_environments import (
    MAX_CALLS_PER_TURN,
    CalcError,
    Calculator,
    PythonTool,
    evaluate,
    final_answer,
    is_correct,
    snippet_text,
)

FAST = SandboxLimits(wall_s=1.0, cpu_s=1, memory_mb=256, output_kb=64)


def calculator(answer: int | float = 408) -> Calculator:
    env = Calculator()
    env.reset({"prompt": "What is 12 × 34?", "answer": answer, "kind": "product"})
    return env


def python_tool(answer: int = 285, max_output_chars: int = 2000) -> PythonTool:
    env = PythonTool(FAST, max_output_chars)
    env.reset({"prompt": "Sum of squares 1..9?", "answer": answer, "kind": "sum_squares"})
    return env


def block(code: str) -> str:
    return f"Let me compute it.\n```python\n{code}\n```\n"


# -- the evaluator --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "expression, value",
    [
        ("2 + 3 * 4", 14), ("(2 + 3) * 4", 20), ("7 / 2", 3.5), ("7 // 2", 3), ("-7 % 3", 2), ("2 ** 10", 1024),
        ("2 ** -2", 0.25), ("-(3 - 5)", 2), ("+4", 4), ("1.5 * 4", 6.0), ("3 × 4 − 2", 10), ("9 ** 64", 9**64),
        ("12345678901234567890 * 98765432109876543210", 12345678901234567890 * 98765432109876543210),
    ],
)  # fmt: skip
def test_the_evaluator_computes_arithmetic_exactly(expression, value):
    result = evaluate(expression)
    assert result == value and type(result) is type(value)


@pytest.mark.parametrize(
    "expression, why",
    [
        ("x + 1", "names"), ("__import__('os')", "function calls"), ("abs(-3)", "function calls"),
        ("(1).real", "attributes"), ("2 ** 65", "exponent too large"), ("2 ** -65", "exponent too large"),
        ("2 ** 64.5", "exponent too large"), ("99 ** 64 * 99 ** 64", "result too large"),
        ("10 ** 64 * 10 ** 64 * 10 ** 64", "result too large"), ("1" * 151, "result too large"),
        ("1e149 * 100", "result too large"), ("1 / 0", "division by zero"), ("5 % 0", "division by zero"),
        ("7 // 0.0", "division by zero"), ("0 ** -1", "division by zero"), ("1 +", "invalid syntax"),
        ("", "empty"), ("1" + "+1" * 150, "too long"), ("1,000", "commas"), ("2 ^ 3", "write **"),
        ("True + 1", "not a number"), ("'a' * 3", "not a number"), ("1j", "not a number"),
        ("(-8) ** (1 / 3)", "not a real number"), ("1 if 1 else 2", "not allowed"), ("1 < 2", "not allowed"),
        ("[1][0]", "not allowed"), ("lambda: 1", "not allowed"),
    ],
)  # fmt: skip
def test_the_evaluator_refuses_anything_else_with_a_reason(expression, why):
    with pytest.raises(CalcError, match=re.escape(why)):
        evaluate(expression)


def test_every_intermediate_result_is_capped_not_just_the_last():
    with pytest.raises(CalcError, match="result too large"):
        evaluate("(10 ** 60) ** 3 // 10 ** 50 // 10 ** 50")  # the final value (10**80) alone would pass
    assert (
        evaluate(f"{10**149} * 9") == 9 * 10**149
        and evaluate("(10 ** 60) ** 2 // 10 ** 50 // 10 ** 50") == 10**20
    )


# -- answers ------------------------------------------------------------------------------------------------


def test_final_answers_are_read_and_compared_as_numbers():
    assert final_answer("so the total is\nAnswer: 1,234,567") == 1234567
    assert final_answer("**Answer:** -42.") == -42
    assert final_answer("answer: 2.5e3") == 2500.0
    assert final_answer("Answer: 3 ... Answer: 4") == 3  # only the first counts: listing answers does not pay
    assert final_answer("Answer: 1,2345") is None and final_answer("the answer is 5") is None
    assert is_correct(12, 12) and is_correct(12.0, 12) and is_correct(0.3333333, 1 / 3)
    assert not is_correct(0.33, 1 / 3) and is_correct(5, "5")
    big = 12345678901234567890 * 98765432109876543210
    assert is_correct(big, big) and not is_correct(big + 1, big)  # a float compare would call these equal


def test_a_correct_answer_scores_one_and_a_wrong_one_zero_and_both_end_the_episode():
    right, wrong = calculator().step("Answer: 408"), calculator().step("Answer: 407")
    assert (right.reward, right.done, wrong.reward, wrong.done) == (1.0, True, 0.0, True)
    assert calculator(answer=2.5).step("Answer: 2.5000001").reward == 1.0


def test_a_message_with_neither_a_call_nor_an_answer_is_answered_with_the_syntax():
    result = calculator().step("I think it is about four hundred. Answer: roughly 400")
    assert not result.done and result.reward == 0.0 and result.info["no_action"] == 1
    assert "<calc>" in result.observation and "Answer: N" in result.observation


# -- the calculator tool --------------------------------------------------------------------------------------


def test_a_calc_call_is_answered_with_its_result_and_its_answer_is_not_graded():
    env = calculator()
    result = env.step("Let me check: <calc>12 * 34</calc>\nAnswer: 408")
    assert result.observation == "<result>408</result>"
    assert not result.done and result.reward == 0.0  # the right answer, but the tool's result comes first
    assert result.info == {"tool_calls": 1, "tool_errors": 0, "no_action": 0, "tool_output_cut": 0}
    assert env.step("Answer: 408").reward == 1.0


def test_tool_errors_are_answered_as_text_and_counted():
    result = calculator().step("<calc>1/0</calc> <calc>os.sep</calc> <calc>2+2</calc> <calc>3*")
    assert result.observation.split("\n") == [
        "<result>error: division by zero</result>",
        "<result>error: attributes are not allowed: only numbers, + - * / // % ** and parentheses</result>",
        "<result>4</result>",
        "<result>error: <calc> not closed with </calc></result>",
    ]
    assert (result.info["tool_calls"], result.info["tool_errors"], result.done) == (4, 3, False)


def test_calls_past_the_limit_of_a_message_are_not_run_and_counted_as_cut():
    result = calculator().step("".join(f"<calc>{i}+1</calc>" for i in range(MAX_CALLS_PER_TURN + 3)))
    lines = result.observation.split("\n")
    assert lines[:MAX_CALLS_PER_TURN] == [f"<result>{i + 1}</result>" for i in range(MAX_CALLS_PER_TURN)]
    assert lines[-1] == f"[3 more calls not run: at most {MAX_CALLS_PER_TURN} a message]"
    assert result.info["tool_calls"] == MAX_CALLS_PER_TURN and result.info["tool_output_cut"] == 1


def test_reset_explains_the_tool_and_shows_the_problem():
    first = Calculator().reset({"prompt": "What is 12 × 34?", "answer": 408})
    assert "<calc>" in first and "Answer: N" in first and first.endswith("Problem: What is 12 × 34?")
    assert Calculator.max_turns == 4 and PythonTool.max_turns == 4


# -- the python tool (real sandbox runs) ----------------------------------------------------------------------


def test_a_snippet_runs_and_its_output_is_the_next_turn():
    env = python_tool()
    result = env.step(block("print(sum(i * i for i in range(1, 10)))") + "Answer: 285")
    assert result.observation == "<result>\n285\n</result>"
    assert not result.done and result.reward == 0.0  # not graded: the output comes first
    assert result.info == {"tool_calls": 1, "tool_errors": 0, "no_action": 0, "tool_output_cut": 0,
                           "tool_timeouts": 0}  # fmt: skip
    assert env.step("Answer: 285").reward == 1.0


def test_a_raising_snippet_returns_its_error_text_and_what_it_printed():
    result = python_tool().step(block("print('before')\nraise ValueError('bad input')"))
    assert result.observation == "<result>\nbefore\nsandbox: ValueError: bad input\n</result>"
    assert result.info["tool_errors"] == 1 and not result.done
    syntax = run_python_snippet("print(", FAST)
    assert syntax.returncode == 1 and syntax.stderr.startswith("sandbox: SyntaxError:")


@pytest.mark.parametrize(
    "code, limits",
    [
        ("import time\ntime.sleep(60)", FAST),  # the wall clock stops it
        ("while True:\n    pass", SandboxLimits(wall_s=4.0, cpu_s=1)),  # the CPU-time limit stops it first
    ],
)
def test_a_snippet_that_hangs_is_stopped_at_its_time_limit_and_counted(code, limits):
    env = python_tool()
    env.limits = limits
    start = time.monotonic()
    result = env.step(block(code))
    assert time.monotonic() - start < limits.wall_s + 2
    assert result.info["tool_timeouts"] == 1 and result.info["tool_errors"] == 0
    assert "ran past its time limit" in result.observation


def test_a_snippet_that_prints_megabytes_is_cut():
    raw = run_python_snippet("print('x' * 5_000_000)", FAST)
    assert len(raw.stdout) == FAST.output_kb * 1024  # the file size limit stopped the child's writes
    assert "File too large" in raw.stderr
    result = python_tool(max_output_chars=500).step(block("print('x' * 5_000_000)"))
    assert result.info["tool_output_cut"] == 1 and len(result.observation) < 800
    assert "File too large" in result.observation  # the error line survives the cut


def test_the_cut_keeps_the_head_of_stdout_and_the_tail_of_stderr():
    run = SnippetResult("a" * 1000, "trace\n" * 10 + "ZeroDivisionError\n", 1, False, "")
    text, cut = snippet_text(run, 100)
    assert cut and text.startswith("a" * 30) and text.endswith("ZeroDivisionError")
    assert snippet_text(SnippetResult("42\n", "", 0, False, ""), 100) == ("42", False)
    assert snippet_text(SnippetResult("", "", 0, False, ""), 100)[0].startswith("(no output")


def test_an_unclosed_block_is_an_error_and_a_blocked_action_is_one_too():
    unclosed = python_tool().step("```python\nprint(1)\nAnswer: 1")
    assert "not closed" in unclosed.observation and unclosed.info["tool_errors"] == 1 and not unclosed.done
    network = python_tool().step(block("import socket\nsocket.create_connection(('example.com', 80))"))
    assert network.info["tool_errors"] == 1 and "Answer" not in network.observation


# -- offline problems -----------------------------------------------------------------------------------------


def numbers(prompt: str) -> list[int]:
    return [int(n) for n in re.findall(r"\d+", prompt)]


def test_calculator_records_are_deterministic_and_their_answers_evaluate():
    records = Calculator.records(seed=3, count=40)
    assert records == Calculator.records(seed=3, count=40) and records != Calculator.records(seed=4, count=40)
    expressions = {
        "product": "{0} * {1}", "sum": None, "mod_product": "{0} * {1} % {2}", "mod_power": "{0} ** {1} % {2}",
    }  # fmt: skip
    assert {r["kind"] for r in records} == set(expressions)
    for record in records:
        found, template = numbers(record["prompt"]), expressions[record["kind"]]
        expression = " + ".join(map(str, found)) if template is None else template.format(*found)
        assert evaluate(expression) == record["answer"], record


def brute_force(kind: str, found: list[int]) -> int:
    if kind == "sum_squares":
        return sum(i * i for i in range(1, found[-1] + 1))  # from 1 to n
    if kind == "divisor_count":
        return sum(found[0] % d == 0 for d in range(1, found[0] + 1))
    if kind == "multiples":
        _, n, a, b = found  # "from 1 to n ... by a or by b"
        return sum(i % a == 0 or i % b == 0 for i in range(1, n + 1))
    if kind == "digit_sum":
        return sum(int(c) for c in str(found[0] ** found[1]))
    assert kind == "prime_count"
    return sum(all(n % p for p in range(2, math.isqrt(n) + 1)) for n in range(2, found[0]))


def test_python_records_are_deterministic_and_their_answers_are_right():
    records = PythonTool.records(seed=1, count=20)
    assert records == PythonTool.records(seed=1, count=20) and records != PythonTool.records(seed=2, count=20)
    assert len({r["kind"] for r in records}) == 5 and len(PythonTool.records()) == 400
    for record in records:
        assert brute_force(record["kind"], numbers(record["prompt"])) == record["answer"], record


def test_the_environments_load_by_name_and_build_with_no_arguments():
    for name, cls in (("Calculator", Calculator), ("PythonTool", PythonTool)):
        loaded = load_environment(f"actors.tool_environments:{name}")
        assert loaded is cls
        env = loaded()
        assert "Problem: 1 + 1?" in env.reset({"prompt": "1 + 1?", "answer": 2})
        assert env.step("Answer: 2").reward == 1.0
    assert PythonTool().limits.wall_s == 5.0
