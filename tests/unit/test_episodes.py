"""Multi-turn episodes (actors/episodes.py, actors/environments.py) on the tiny model."""

import mlx.core as mx
import numpy as np
import pytest

from actors.environments import GuessTheNumber, StepResult, load_environment
from actors.episodes import run_episodes, user_turn_ids
from actors.sampler import SamplingParams
from common.logprobs import pad_sequences, response_logprobs
from common.ragged import Ragged

PARAMS = SamplingParams(temperature=1.0, max_new_tokens=6)


def _episodes(tiny, envs, records, **kwargs):
    return run_episodes(
        tiny.model, tiny.tokenizer, envs, records, PARAMS, lambda i, t: 1000 * i + t, **kwargs
    )


def test_the_ids_trained_on_are_the_ids_sampled_in_their_contexts(tiny):
    """Recomputing the log-probs of each whole episode (what the learner does) gives, at every model token, the
    behaviour log-prob it was sampled with: the ids and their contexts are exactly the sampled ones. Environment
    tokens sit between the turns, masked out."""
    episodes = _episodes(tiny, [GuessTheNumber() for _ in range(3)], [{"secret": s} for s in (7, 50, 93)])
    for episode in episodes:
        assert len(episode.rewards) >= 2 and 0 in episode.loss_mask and 1 in episode.loss_mask
    tokens, positions, targets, mask = pad_sequences(
        Ragged.from_rows([e.ids for e in episodes]), np.array([e.prompt_len for e in episodes])
    )
    recomputed = np.array(response_logprobs(tiny.model, *map(mx.array, (tokens, positions, targets)), 1.0))
    for row, episode in enumerate(episodes):
        model_tokens = np.array(episode.loss_mask, bool)
        np.testing.assert_allclose(
            recomputed[row, : len(model_tokens)][model_tokens],
            np.array(episode.logprobs)[model_tokens],
            atol=1e-4,
        )


def test_an_environment_turn_is_the_chat_templates_next_user_turn(tiny):
    tok = tiny.tokenizer
    first = tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True)
    reply = tok.encode("yes", add_special_tokens=False) + tok.encode(tok.eos_token, add_special_tokens=False)
    ids = list(first) + reply + user_turn_ids(tok, "lower", model_stopped=True)
    conversation = [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "yes"},
        {"role": "user", "content": "lower"},
    ]
    assert tok.decode(ids) == tok.apply_chat_template(
        conversation, tokenize=False, add_generation_prompt=True
    )
    cut = user_turn_ids(
        tok, "lower", model_stopped=False
    )  # a turn cut at the limit: the end token is written
    assert cut[: len(cut) - len(user_turn_ids(tok, "lower", True))] == tok.encode(
        tok.eos_token, add_special_tokens=False
    )


class _Raises:
    max_turns = 3

    def reset(self, record):
        return "go"

    def step(self, action_text):
        raise RuntimeError("tool crashed")


class _Floods:
    max_turns = 2

    def reset(self, record):
        return "go"

    def step(self, action_text):
        return StepResult("x" * 1_000_000)


def test_a_failing_or_flooding_environment_ends_or_is_cut_and_the_others_go_on(tiny):
    raises, floods, game = _episodes(tiny, [_Raises(), _Floods(), GuessTheNumber()], [{}, {}, {"secret": 3}],
                                     max_observation_chars=50)  # fmt: skip
    assert raises.ended == "error" and raises.loss_mask and raises.rewards == []
    assert floods.ended == "turn_limit" and floods.loss_mask.count(0) < 100
    assert game.ended in ("turn_limit", "done") and len(game.rewards) >= 1


def test_an_episode_over_the_context_budget_ends_cleanly(tiny):
    (episode,) = _episodes(tiny, [GuessTheNumber()], [{"secret": 5}], max_context=1)
    assert episode.ended == "context" and episode.loss_mask == []


def test_the_guessing_game_answers_higher_lower_and_rewards_the_right_guess():
    env = GuessTheNumber()
    assert "between 1 and 100" in env.reset({"secret": 42})
    assert env.step("I guess 10").observation == "higher"
    assert env.step("maybe 77?").observation == "lower"
    assert env.step("no idea").info == {"no_number": 1}
    right = env.step("42")
    assert right.done and right.reward == 1.0


def test_environments_load_by_name_with_clear_errors():
    assert load_environment("actors.environments:GuessTheNumber") is GuessTheNumber
    for bad in (
        "actors.environments",
        "actors.environments:Nope",
        "no_such_module:X",
        "actors.environments:StepResult",
    ):
        with pytest.raises(ValueError):
            load_environment(bad)


def test_environment_tokens_are_context_only_in_the_update(model_cache, tiny):
    """An update does not depend on what the behaviour log-probs of environment tokens say (they have none: the
    model did not sample them); with the mask ignored, their importance ratios would enter the loss."""
    from mlx.utils import tree_flatten

    from learner.experience import Experience
    from tests.helpers import make_learner

    episodes = _episodes(tiny, [GuessTheNumber() for _ in range(4)], [{"secret": s} for s in (3, 9, 27, 81)])
    results = []
    for env_logprob in (-30.0, -1.0):
        exp = Experience.from_rows(
            [e.ids[: e.prompt_len] for e in episodes],
            [e.ids[e.prompt_len :] for e in episodes],
            [np.where(np.array(e.loss_mask) == 1, e.logprobs, env_logprob) for e in episodes],
            np.array([1.0, 0.0, 0.5, 0.0]),
            np.zeros(4),
        )
        exp.loss_mask = Ragged.from_rows([e.loss_mask for e in episodes], np.uint8)
        learner, _ = make_learner(model_cache, algorithm="grpo", group_size=2, value_kind=None, kl_coef=0.0,
                                  batch_size=4, micro_batch_size=4)  # fmt: skip
        stats = learner.update(exp)
        results.append(
            (stats["loss/total"], stats["is/weight_mean"], dict(tree_flatten(learner.trainable_weights())))
        )
    (loss_a, is_a, weights_a), (loss_b, is_b, weights_b) = results
    assert loss_a == pytest.approx(loss_b, abs=1e-6) and is_a == pytest.approx(is_b, abs=1e-6)
    for key in weights_a:
        assert np.allclose(np.array(weights_a[key]), np.array(weights_b[key]), atol=1e-6), key


def test_a_loss_mask_survives_the_message_the_batch_and_the_buffer_file(tmp_path):
    from common import protocol as p
    from learner.buffer import Group, load_groups, save_groups
    from learner.experience import Experience
    from tests.protocol_samples import samples

    msg = p.decode([bytes(f) for f in p.encode(samples()["experience"])])
    exp = Experience.from_message(msg)
    assert exp.loss_mask.values.tolist() == [1, 0, 1]
    both = Experience.concat([exp, exp.select(np.array([0]))])
    assert both.loss_mask.values.tolist() == [1, 0, 1, 1, 0]
    save_groups([Group(1, 9, 4, both, 0)], tmp_path / "b.npz")
    (group,) = load_groups(tmp_path / "b.npz")
    assert group.experience.loss_mask.values.tolist() == [1, 0, 1, 1, 0]
    assert exp.padded(pad_multiple=4)["model_tokens"].tolist() == [[1, 0, 0, 0], [1, 0, 0, 0]]


def test_a_single_turn_task_is_the_one_turn_episode(tiny):
    """``one_turn(reward)``: the episode of a prompt is exactly the single-turn completion of that prompt with
    the same seed (ids, log-probs), no environment tokens, and its return is the reward of the decoded answer."""
    from actors.environments import one_turn
    from actors.episodes import run_episodes
    from actors.sampler import SamplingParams, generate_completions
    from common.models import chat_prompt_ids

    def reward(prompt: str, completion: str) -> float:
        return len(completion) / (1 + len(prompt))

    prompts = ["Say hello.", "Name a colour, please."]
    params = SamplingParams(max_new_tokens=8)
    env_cls = one_turn(reward)
    episodes = run_episodes(tiny.model, tiny.tokenizer, [env_cls() for _ in prompts],
                            [{"prompt": p} for p in prompts], params, lambda i, t: 100 + i)  # fmt: skip
    stop = set(tiny.tokenizer.eos_token_ids)
    ids = [chat_prompt_ids(tiny.tokenizer, p) for p in prompts]
    completions = generate_completions(tiny.model, ids, params, stop, seeds=[100, 101])
    for prompt, episode, completion in zip(prompts, episodes, completions, strict=True):
        assert episode.ids[episode.prompt_len :] == list(completion.response_ids)
        assert episode.logprobs == pytest.approx(list(completion.logprobs), abs=1e-5)
        assert episode.loss_mask == [1] * len(completion.response_ids) and episode.ended == "done"
        text = tiny.tokenizer.decode([t for t in completion.response_ids if t not in stop])
        assert episode.rewards == [pytest.approx(reward(prompt, text))]
