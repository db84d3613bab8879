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


def test_a_reward_past_its_time_limit_scores_nan_and_the_timer_is_cleared():
    import signal
    import time

    def endless(prompt: str, completion: str) -> float:
        while True:
            time.sleep(0.01)

    handler_before = signal.getsignal(signal.SIGALRM)
    timer_before = signal.getitimer(signal.ITIMER_REAL)  # pytest-timeout may have one armed
    start = time.monotonic()
    assert math.isnan(safe_score(endless, PROMPT, "11", timeout_s=0.2))
    assert time.monotonic() - start < 5
    assert safe_score(arithmetic_reward, PROMPT, "11", timeout_s=0.2) == 1.0
    assert signal.getsignal(signal.SIGALRM) is handler_before
    delay_after, _ = signal.getitimer(signal.ITIMER_REAL)
    if timer_before[0] == 0:
        assert delay_after == 0  # no alarm of ours left armed to fire later
    else:
        assert 0 < delay_after <= timer_before[0]  # the other timer keeps running, not reset


def test_another_sigalrm_timer_survives_a_reward_time_limit():
    import signal

    fired = []
    previous = signal.signal(signal.SIGALRM, lambda *_: fired.append(True))
    try:
        signal.setitimer(signal.ITIMER_REAL, 30.0)
        assert safe_score(arithmetic_reward, PROMPT, "11", timeout_s=0.2) == 1.0
        delay, _ = signal.getitimer(signal.ITIMER_REAL)
        assert 25.0 < delay <= 30.0
        assert not fired
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def test_empty_and_overlong_prompts_are_left_out_and_none_usable_is_an_error(tiny, caplog):
    from actors.rewards import encode_prompts

    texts = ["", "   ", "what is 2 + 2?", "word " * 400]
    ids, kept = encode_prompts(tiny.tokenizer, texts, max_tokens=64)
    assert kept == ["what is 2 + 2?"] and len(ids) == 1 and 0 < len(ids[0]) <= 64
    assert "left out 2 empty prompt(s) and 1 longer than sampling.max_prompt_tokens=64" in caplog.text
    with pytest.raises(ValueError, match="no usable prompt among 2"):
        encode_prompts(tiny.tokenizer, ["", "word " * 400], max_tokens=64)
