"""Continuous batching: ``CompletionStream`` (actors/sampler.py) and continuous episodes (actors/episodes.py)."""

import logging
import threading
import time

import numpy as np
import pytest

from actors import decode
from actors.environments import StepResult
from actors.episodes import abandoned_steps, run_episodes, user_turn_ids
from actors.sampler import CompletionStream, SamplingParams, generate_completions
from tests.unit.test_sampler import PROMPTS, teacher_forced

PARAMS = SamplingParams(temperature=1.0, max_new_tokens=6)
PATHS = {
    "host-sampling": {"host_sampling": True, "compiled_decode": False},
    "device-sampling": {"host_sampling": False, "compiled_decode": False},
    "compiled": {"host_sampling": False, "compiled_decode": True},
}


def seed_of(i: int, turn: int) -> int:
    return 1000 * i + turn


class Scripted:
    """Answers turn n with ``turn n saw <characters of the action>``, reward n; done after ``done_at`` turns.
    ``gate``: its first step blocks until the gate is set (a slow tool); ``released`` says whether it was."""

    max_turns = 4

    def __init__(self, done_at: int = 9, gate: threading.Event | None = None):
        self.done_at, self.gate, self.n, self.released = done_at, gate, 0, None
        self.seen: list[str] = []

    @property
    def finished(self) -> bool:
        """Whether it answered the last step its episode will play."""
        return self.n >= min(self.done_at, self.max_turns)

    def reset(self, record):
        return f"start {record['x']}"

    def step(self, action_text):
        self.n += 1
        self.seen.append(action_text)
        if self.gate is not None and self.n == 1:
            self.released = self.gate.wait(
                timeout=20
            )  # a runner that blocks on this step never sets the gate
        return StepResult(
            f"turn {self.n} saw {len(action_text)}", reward=float(self.n), done=self.n >= self.done_at
        )


class BadReset(Scripted):
    def reset(self, record):
        raise RuntimeError("no sandbox today")


def play(tiny, envs, **kwargs):
    records = [{"x": i} for i in range(len(envs))]
    return run_episodes(tiny.model, tiny.tokenizer, envs, records, PARAMS, seed_of, **kwargs)


def assert_same_episodes(a, b):
    for x, y in zip(a, b, strict=True):
        assert (x.ids, x.prompt_len, x.loss_mask, x.rewards, x.ended) == (
            y.ids,
            y.prompt_len,
            y.loss_mask,
            y.rewards,
            y.ended,
        )
        np.testing.assert_allclose(x.logprobs, y.logprobs, atol=1e-5)


@pytest.mark.parametrize("path", list(PATHS))
def test_sequences_joining_a_running_stream_sample_what_they_sample_alone(tiny, path):
    """Three sequences decode; four more (a repeated prompt, a longer one, per-sequence limits) join while they
    run. Each samples what its seed samples alone; on the compiled path the joined width is a multiple of 8."""
    params = SamplingParams(temperature=1.0, max_new_tokens=10, kv_chunk=4, **PATHS[path])
    first = [("a", PROMPTS[0], 11, None), ("b", PROMPTS[1], 12, None), ("c", PROMPTS[2], 13, 7)]
    late = [("d", PROMPTS[3], 14, None), ("e", PROMPTS[3], 15, 4), ("f", PROMPTS[0] * 2, 16, None)]
    late.append(("g", PROMPTS[1], 17, 2))
    free = generate_completions(tiny.model, [PROMPTS[0], PROMPTS[3]], params, set(), [11, 14])
    stop = {free[0].response_ids[5], free[1].response_ids[6]}  # two rows stop early, at different steps
    stream = CompletionStream(tiny.model, params, stop)
    for key, prompt, seed, max_new in first:
        stream.submit(key, prompt, seed, max_new)
    done = {}
    for _ in range(3):
        done.update(stream.step())
    assert stream.width > 0  # still decoding when the others join
    for key, prompt, seed, max_new in late:
        stream.submit(key, prompt, seed, max_new)
    done.update(stream.step())
    if path == "compiled":
        assert stream.width % decode.ROW_MULTIPLE == 0 and stream.width > len(late)
    while stream.busy:
        done.update(stream.step())
    assert stream.step() == [] and set(done) == {k for k, *_ in first + late}
    for key, prompt, seed, max_new in first + late:
        limit = [max_new or params.max_new_tokens]
        alone = generate_completions(tiny.model, [prompt], params, stop, [seed], max_new=limit)[0]
        assert done[key].prompt_ids == prompt and done[key].response_ids == alone.response_ids, key
        assert done[key].finish_reason == alone.finish_reason
        np.testing.assert_allclose(done[key].logprobs, alone.logprobs, atol=1e-5)
        np.testing.assert_allclose(done[key].logprobs, teacher_forced(tiny.model, alone, params), atol=1e-4)
    assert {c.finish_reason for c in done.values()} == {"stop", "length"}


def test_a_stream_with_max_rows_keeps_at_most_that_many_rows(tiny):
    params = SamplingParams(max_new_tokens=5, host_sampling=True)
    stream = CompletionStream(tiny.model, params, set(), max_rows=2, refill_at=0)
    for k in range(5):
        stream.submit(k, PROMPTS[k % 4], seed=k)
    widths, done = [], {}
    while stream.busy:
        done.update(stream.step())
        widths.append(stream.width)
    assert max(widths) == 2 and sorted(done) == list(range(5))
    batch = generate_completions(
        tiny.model, [PROMPTS[k % 4] for k in range(5)], params, set(), list(range(5))
    )
    assert [done[k].response_ids for k in range(5)] == [c.response_ids for c in batch]
    with pytest.raises(ValueError, match="empty prompt"):
        stream.submit("x", [], seed=1)


def test_a_slow_environment_holds_up_only_its_own_episode(tiny):
    """The slow tool's first step blocks until ``on_step`` sees every other episode finished: a runner that waited
    for it (turn by turn) would never get there, and the gate would time out. The episodes are the ones a run
    without the slow tool makes, and the ones a run with at most 2 rows at a time makes."""
    gate = threading.Event()
    fast = [Scripted(done_at=2), Scripted(done_at=3), Scripted()]
    slow = Scripted(gate=gate)

    def on_step():
        if all(env.finished for env in fast):
            gate.set()

    blocked = play(tiny, [fast[0], slow, *fast[1:]], on_step=on_step)
    assert slow.released is True and slow.finished
    unblocked = play(tiny, [Scripted(done_at=2), Scripted(), Scripted(done_at=3), Scripted()])
    narrow = play(tiny, [Scripted(done_at=2), Scripted(), Scripted(done_at=3), Scripted()], max_rows=2)
    assert_same_episodes(blocked, unblocked)
    assert_same_episodes(blocked, narrow)
    assert [e.ended for e in blocked] == ["done", "turn_limit", "done", "turn_limit"]


def test_a_step_past_its_timeout_ends_only_its_episode(tiny, caplog):
    gate = threading.Event()
    before = abandoned_steps()
    try:
        with caplog.at_level(logging.WARNING, logger="actors.episodes"):
            episodes = play(
                tiny, [Scripted(done_at=2), Scripted(gate=gate), Scripted(done_at=3)], step_timeout_s=1.0
            )
        assert abandoned_steps() == before + 1  # still blocked in its step
    finally:
        gate.set()
    fast, slow, fast_too = episodes
    assert (fast.ended, slow.ended, fast_too.ended) == ("done", "timeout", "done")
    assert slow.rewards == [] and set(slow.loss_mask) == {1}  # its one model turn, no answer
    assert "did not answer step" in caplog.text
    alone = play(tiny, [Scripted(done_at=2), Scripted(), Scripted(done_at=3)])
    assert_same_episodes([fast, fast_too], [alone[0], alone[2]])
    deadline = time.monotonic() + 10
    while abandoned_steps() > before and time.monotonic() < deadline:  # the released thread ends
        threading.Event().wait(0.01)
    assert abandoned_steps() == before


def test_a_raising_reset_ends_only_its_episode(tiny, caplog):
    with caplog.at_level(logging.WARNING, logger="actors.episodes"):
        episodes = play(tiny, [Scripted(done_at=2), BadReset(), Scripted(done_at=3)])
    bad = episodes[1]
    assert bad.ended == "error" and bad.ids == [] and bad.loss_mask == [] and bad.rewards == []
    assert "raised on reset" in caplog.text and "no sandbox today" in caplog.text
    alone = play(tiny, [Scripted(done_at=2), Scripted(), Scripted(done_at=3)])
    assert_same_episodes([episodes[0], episodes[2]], [alone[0], alone[2]])


def test_each_model_turn_holds_the_ids_its_seed_samples_and_the_env_saw_their_text(tiny):
    """Split every episode at its loss mask: each model turn is what ``seed_of(episode, turn)`` samples alone from
    the ids before it (ids and log-probs), the environment saw that turn's decoded text, and each environment
    turn is its answer rendered once. ``on_step`` ran at least once per decoding step."""
    tok, stop = tiny.tokenizer, set(tiny.tokenizer.eos_token_ids)
    envs = [Scripted(done_at=2), Scripted(), Scripted(done_at=1)]
    calls = []
    episodes = play(tiny, envs, on_step=lambda: calls.append(1))
    for i, (episode, env) in enumerate(zip(episodes, envs, strict=True)):
        mask, pos = np.array(episode.loss_mask), episode.prompt_len
        starts = [k for k in range(len(mask)) if mask[k] == 1 and (k == 0 or mask[k - 1] == 0)]
        assert len(starts) == len(episode.rewards) == env.n
        for turn, start in enumerate(starts):
            end = next((k for k in range(start, len(mask)) if mask[k] == 0), len(mask))
            alone = generate_completions(
                tiny.model, [episode.ids[: pos + start]], PARAMS, stop, [seed_of(i, turn)]
            )[0]
            assert episode.ids[pos + start : pos + end] == alone.response_ids
            np.testing.assert_allclose(episode.logprobs[start:end], alone.logprobs, atol=1e-5)
            assert env.seen[turn] == tok.decode([t for t in alone.response_ids if t not in stop])
            if end < len(mask):  # the environment's answer follows
                answer = user_turn_ids(
                    tok, f"turn {turn + 1} saw {len(env.seen[turn])}", alone.finish_reason == "stop"
                )
                assert episode.ids[pos + end : pos + end + len(answer)] == answer
    assert len(calls) >= max(sum(e.loss_mask) for e in episodes)
