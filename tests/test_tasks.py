"""Built-in rewards on hand-written completions."""

import math

import pytest

from actors.tasks import arithmetic_reward, safe_score

PROMPT = "What is 9 + 2? Answer with the number."


@pytest.mark.parametrize(
    "completion,score",
    [
        ("11", 1.0),
        ("9 + 2 = 11.", 1.0),  # restating the question is fine
        ("The answer is 11, not 12.", 1.0),
        ("9 + 2 = 12, or maybe 11", 0.0),  # the first answer counts, not a later guess
        ("It is 13.", 0.0),
        ("nine plus two", 0.0),
        ("9 and 2", 0.0),
    ],
)
def test_arithmetic_reward_reads_the_first_answer(completion, score):
    assert arithmetic_reward(PROMPT, completion) == score


def test_a_failing_reward_scores_nan():
    def broken(prompt: str, completion: str) -> float:
        raise RuntimeError("reward server down")

    assert math.isnan(safe_score(broken, PROMPT, "11"))
