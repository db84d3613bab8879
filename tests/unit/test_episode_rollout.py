"""The actor's episode path (actors/episode_rollout.py): episodes as batch rows, rewards on tokens, the guard
around an environment, a batch of episodes on the tiny model within its token budget."""

import math
import threading

import pytest

from actors.environments import GuessTheNumber, StepResult
from actors.episode_rollout import (
    EpisodeCounts,
    EpisodeLimits,
    GuardedEnvironment,
    episode_row,
    play_episodes,
    token_rewards,
)
from actors.episodes import Episode
from actors.sampler import SamplingParams


def test_each_turns_reward_sits_on_the_last_token_of_that_model_turn():
    mask = [1, 1, 0, 0, 1, 0, 1, 1, 1]
    assert token_rewards(mask, [0.5, -0.1, 1.0]) == [0, 0.5, 0, 0, -0.1, 0, 0, 0, 1.0]
    assert token_rewards(mask, [0.5, 2.0]) == [
        0,
        0.5,
        0,
        0,
        2.0,
        0,
        0,
        0,
        0,
    ]  # the last turn failed: no reward
    with pytest.raises(ValueError):
        token_rewards([1, 0, 1], [1.0, 1.0, 1.0])


def _episode(mask, ended, rewards):
    return Episode(ids=[7, 8] + list(range(10, 10 + len(mask))), prompt_len=2,
                   logprobs=[-1.0 if m else 0.0 for m in mask], loss_mask=list(mask), rewards=rewards, ended=ended)  # fmt: skip


def test_an_episode_becomes_a_row_up_to_its_last_model_turn():
    row = episode_row(_episode([1, 1, 0, 0, 1, 0, 0], "context", [0.25, 0.5]), end_token=2)
    assert row.prompt == [7, 8] and row.response == [10, 11, 12, 13, 14]  # the unread last answer left out
    assert row.loss_mask == [1, 1, 0, 0, 1] and row.logprobs == [-1, -1, 0, 0, -1]
    assert row.score == 0.75 and row.finish_reason == "length"
    assert episode_row(_episode([1, 0, 1], "done", [0.0, 1.0]), 2).finish_reason == "stop"
    assert episode_row(_episode([1, 0, 1], "turn_limit", [0.0, 0.0]), 2).finish_reason == "stop"
    for failed in ("error", "timeout"):  # dropped by the learner, whatever the turns before earned
        assert math.isnan(episode_row(_episode([1, 0, 1], failed, [1.0]), 2).score)
    empty = episode_row(_episode([], "context", []), end_token=2)  # no room for a turn: not an empty response
    assert empty.response == [2] and empty.loss_mask == [0] and math.isnan(empty.score)


class _Slow:
    max_turns = 3
    release = threading.Event()

    def reset(self, record):
        if record.get("hang_reset"):
            self.release.wait(30)
        return "go"

    def step(self, action_text):
        if action_text == "hang":
            self.release.wait(30)
        if action_text == "exit":
            raise SystemExit(3)
        if action_text == "nan":
            return StepResult("ok", reward=float("nan"))
        return StepResult("y" * 100, reward=0.5)


def test_the_guard_times_out_a_hanging_call_and_checks_and_cuts_what_comes_back():
    beats = []
    guard = GuardedEnvironment(_Slow, 0.2, 10, on_wait=lambda: beats.append(1))
    assert guard.reset({}) == "go" and guard.reset({"hang_reset": True}) == "go"  # reset once per episode
    result = guard.step("fine")
    assert result.observation == "y" * 10 and result.reward == 0.5 and guard.cuts == 1
    for bad in ("nan", "exit"):  # a non-finite reward, a SystemExit: errors of the episode, not the actor's
        with pytest.raises(Exception) as err:
            guard.step(bad)
        assert not isinstance(err.value, SystemExit)
    with pytest.raises(Exception, match="took longer than 0.2 s"):
        guard.step("hang")
    assert guard.failed == "timeout" and len(beats) >= 2  # heartbeats while it waited
    late = GuardedEnvironment(_Slow, 0.2, 10, on_wait=lambda: None)
    assert late.reset({"hang_reset": True}) != "go" and late.failed == "timeout"
    with pytest.raises(RuntimeError):  # an episode that did not start ends at its first step
        late.step("fine")


def test_a_batch_of_episodes_stays_within_its_token_budget(tiny):
    """Prompts of different lengths, one budget: every response (all turns) holds at most the budget's ids
    (max_episode_tokens - 1) and ends on a model token; the counters add up."""
    records = [{"secret": 5, "low": 1, "high": 10}, {"secret": 5, "low": 1, "high": 10**12}] * 2
    counts, multi_turn = EpisodeCounts(), 0
    for budget in (47, 64, 90, 120, 150):
        limits = EpisodeLimits(5.0, 100, budget)
        params = SamplingParams(max_new_tokens=6)
        rows = play_episodes(tiny.model, tiny.tokenizer, GuessTheNumber, records, params,
                             lambda i, t, b=budget: 1000 * b + 100 * i + t, limits, counts)  # fmt: skip
        assert len({len(r.prompt) for r in rows}) == 2
        assert all(len(r.response) <= budget and r.loss_mask[-1] == 1 for r in rows), budget
        multi_turn += sum(0 in r.loss_mask for r in rows)
    assert multi_turn and counts.episodes == 20 and counts.env_errors == counts.env_timeouts == 0
    assert counts.context_ends + counts.turn_limit_ends <= 20 and counts.as_dict()["turns_per_episode"] > 1


def test_turn_rewards_go_on_the_wire_on_their_turns_last_tokens_and_a_failed_row_sends_zeros():
    """What the actor sends for PPO's per-token returns: each turn's reward where ``token_rewards`` puts it, the
    protocol's checks pass (nonzero on model tokens only, finite), and a NaN-scored row carries zeros (a
    non-finite value would make the learner refuse the whole batch, the good rows with it)."""
    import numpy as np

    from actors.episode_rollout import row_token_rewards

    good = episode_row(_episode([1, 1, 0, 0, 1, 0, 1], "done", [0.25, -0.1, 1.0]), end_token=2)
    failed = episode_row(_episode([1, 0, 1], "error", [1.0]), end_token=2)
    sent = row_token_rewards(good)
    assert sent.dtype == np.float32 and sent.tolist() == pytest.approx([0, 0.25, 0, 0, -0.1, 0, 1.0])
    assert sent.sum() == pytest.approx(good.score)  # the learner's remainder on the last token is then 0
    assert math.isnan(failed.score) and row_token_rewards(failed).tolist() == [0.0] * len(failed.response)


def test_the_guard_heartbeats_from_its_own_thread_only():
    """Heartbeats go out on the actor's sockets, which only the actor's thread may use: a guard stepped on the
    episode runner's threads must not call them."""
    beats = []
    guard = GuardedEnvironment(_Slow, 5.0, 100, on_wait=lambda: beats.append(threading.current_thread()))
    guard.reset({})
    worker = threading.Thread(target=guard.step, args=("fine",))
    worker.start()
    worker.join(10)
    assert beats and all(t is threading.current_thread() for t in beats)


def test_a_first_message_over_the_prompt_limit_is_not_played_and_is_counted(tiny):
    """An episode whose first message exceeds sampling.max_prompt_tokens would be refused by the learner: the
    actor spends no generation on it (no model turn, NaN score, masked) and counts it; the others are played."""
    from common.models import chat_prompt_ids

    records = [{"secret": 5, "low": 1, "high": 10}, {"secret": 5, "low": 1, "high": 10**12}]
    lens = [len(chat_prompt_ids(tiny.tokenizer, GuessTheNumber().reset(r))) for r in records]
    assert lens[0] < lens[1]
    counts = EpisodeCounts()
    limits = EpisodeLimits(5.0, 100, 40, max_prompt_tokens=lens[0])
    rows = play_episodes(tiny.model, tiny.tokenizer, GuessTheNumber, records, SamplingParams(max_new_tokens=6),
                         lambda i, t: 10 * i + t, limits, counts)  # fmt: skip
    assert 1 in rows[0].loss_mask and math.isfinite(rows[0].score)
    assert rows[1].loss_mask == [0] and math.isnan(rows[1].score) and len(rows[1].prompt) == lens[0]
    assert counts.prompt_too_long == 1 and counts.episodes == 2


def test_the_environments_info_counters_are_summed_into_the_heartbeat_and_bounded():
    """``StepResult.info`` numbers (a tool's calls and errors) add up per episode and over episodes, reach the
    heartbeat as ``env/<key>``, and an environment that invents a new key every step cannot flood it."""
    from actors.episode_rollout import MAX_INFO_KEYS

    class Tool:
        max_turns = 3

        def __init__(self):
            self.n = 0

        def reset(self, record):
            return "go"

        def step(self, action_text):
            self.n += 1
            return StepResult("ok", info={"tool_calls": 2, "tool_errors": 1, f"key{self.n}": 1, "text": "x"})

    counts = EpisodeCounts()
    for _ in range(2):
        guard = GuardedEnvironment(Tool, 5.0, 100, on_wait=lambda: None)
        guard.reset({})
        for _ in range(2):
            guard.step("a")
        counts.add(_episode([1, 0, 1], "turn_limit", [0.0, 0.0]), guard)
    stats = counts.as_dict()
    assert stats["env/tool_calls"] == 8 and stats["env/tool_errors"] == 4 and "env/text" not in stats
    flood = GuardedEnvironment(Tool, 5.0, 100, on_wait=lambda: None)
    flood.reset({})
    for _ in range(3 * MAX_INFO_KEYS):
        flood.step("a")
    counts.add(_episode([1], "turn_limit", [0.0]), flood)
    assert len(flood.info) <= MAX_INFO_KEYS and len(counts.info) <= MAX_INFO_KEYS
