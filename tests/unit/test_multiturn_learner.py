"""The learner on multi-turn episodes: environment tokens (loss mask 0) are context only, per-turn rewards (PPO)
land on their tokens, GAE runs over model tokens alone, and the critic and every algorithm see model tokens only."""

import dataclasses

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

from common import protocol
from common.ragged import Ragged
from learner.advantages import compute_gae, group_advantages, shape_rewards
from learner.buffer import ExperienceBuffer, Group, load_groups, save_groups
from learner.experience import Experience, rows_cut_to_length
from learner.loss import ppo_objective
from tests.helpers import make_learner
from tests.protocol_samples import samples

# -- GAE over model tokens ---------------------------------------------------------------------------------------


def reference_gae_over_model_tokens(rewards, values, mask, gamma, lam):
    """Plain Python: the textbook loop over the list of a row's model tokens (environment tokens and padding
    dropped first), written back at their positions; 0 elsewhere."""
    steps = [t for t, m in enumerate(mask) if m]
    advantages, last = [0.0] * len(mask), 0.0
    for i in reversed(range(len(steps))):
        t = steps[i]
        next_value = values[steps[i + 1]] if i + 1 < len(steps) else 0.0
        last = rewards[t] + gamma * next_value - values[t] + gamma * lam * last
        advantages[t] = last
    return np.array(advantages)


def turn_masks(rng, batch, steps):
    """``[batch, steps]`` masks of model turns (1) and environment turns (0) in a random order, then padding."""
    masks = np.zeros((batch, steps), np.float32)
    for b in range(batch):
        t, model = 0, True
        end = rng.integers(1, steps + 1)
        while t < end:
            n = int(rng.integers(1, 4))
            masks[b, t : min(t + n, end)] = model
            t, model = t + n, not model
    return masks


@pytest.mark.parametrize("gamma,lam", [(1.0, 1.0), (0.99, 0.95), (0.9, 0.0), (0.8, 0.5)])
def test_gae_over_model_tokens_matches_a_reference_loop(gamma, lam):
    rng = np.random.default_rng(0)
    mask = turn_masks(rng, batch=12, steps=15)
    # garbage rewards and values where the mask is 0: they must never be read
    rewards = np.where(mask > 0, rng.normal(size=mask.shape), 50.0).astype(np.float32)
    values = np.where(mask > 0, rng.normal(size=mask.shape), -70.0).astype(np.float32)
    advantages, returns = compute_gae(rewards, values, mask, gamma, lam)
    for b in range(len(mask)):
        expected = reference_gae_over_model_tokens(rewards[b], values[b], mask[b], gamma, lam)
        np.testing.assert_allclose(advantages[b], expected, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(returns[b], (expected + values[b]) * mask[b], rtol=1e-5, atol=1e-5)
    assert (advantages[mask == 0] == 0).all() and (returns[mask == 0] == 0).all()


def test_gae_does_not_take_environment_tokens_for_steps():
    """Model token 0, an environment turn of two tokens, model token 3 (the reward). Token 0 bootstraps from
    token 3's value, discounted once: A_3 = 1 - 0.2 = 0.8, A_0 = (0.9 * 0.2 - 0.5) + 0.9 * 0.8 * 0.8 = 0.256.
    Taken for steps, the environment tokens would discount three times (and their values would be read)."""
    mask = np.array([[1, 0, 0, 1]], np.float32)
    rewards = np.array([[0.0, 0.0, 0.0, 1.0]], np.float32)
    values = np.array([[0.5, 9.0, 9.0, 0.2]], np.float32)
    advantages, returns = compute_gae(rewards, values, mask, gamma=0.9, lam=0.8)
    np.testing.assert_allclose(advantages, [[0.256, 0.0, 0.0, 0.8]], atol=1e-6)
    np.testing.assert_allclose(returns, [[0.756, 0.0, 0.0, 1.0]], atol=1e-6)


# -- per-turn rewards ---------------------------------------------------------------------------------------------


def test_token_rewards_land_on_their_tokens_and_the_rest_of_the_score_on_the_last_model_token():
    mask = np.array([[1, 1, 0, 1, 0], [1, 0, 0, 0, 0]], np.float32)  # row 1 ends on an environment turn
    kl = np.full((2, 5), 0.1, np.float32)
    token_rewards = np.array([[0.5, 0.0, 0.0, 0.25, 0.0], [0.0] * 5], np.float32)
    rewards = shape_rewards(np.array([2.0, -1.0]), kl, mask, 0.5, token_rewards)
    np.testing.assert_allclose(rewards, [[0.45, -0.05, 0, 1.45, 0], [-1.05, 0, 0, 0, 0]], atol=1e-6)
    # without them the score is on the last model token, which all zeros mean too
    plain = shape_rewards(np.array([2.0, -1.0]), kl, mask, 0.5)
    np.testing.assert_array_equal(
        plain, shape_rewards(np.array([2.0, -1.0]), kl, mask, 0.5, 0 * token_rewards)
    )
    np.testing.assert_allclose(plain[0], [-0.05, -0.05, 0, 1.95, 0], atol=1e-6)


def test_the_rewards_of_a_sequence_add_up_to_its_score():
    rng = np.random.default_rng(1)
    mask = turn_masks(rng, batch=10, steps=12)
    scores = rng.normal(size=10)
    token_rewards = (rng.normal(size=mask.shape) * mask).astype(np.float32)
    rewards = shape_rewards(scores, np.zeros_like(mask), mask, 0.1, token_rewards)
    np.testing.assert_allclose(rewards.sum(axis=1), scores, atol=1e-5)
    assert (rewards[mask == 0] == 0).all()


# -- a real update on multi-turn experience -----------------------------------------------------------------------


def multi_turn_experience(seed=0, token_rewards=None, env_ref=None, model_ref=-1.5):
    """4 episodes (2 groups of 2): a model turn of 3 tokens, an environment turn of 4, a model turn of 2 or 3;
    behaviour log-probs only on model tokens. ``env_ref``: reference log-probs sent, this on environment tokens."""
    rng = np.random.default_rng(seed)
    masks = [[1] * 3 + [0] * 4 + [1] * (2 + b % 2) for b in range(4)]
    responses = [rng.integers(3, 250, len(m)).tolist() for m in masks]
    return Experience.from_rows(
        [rng.integers(3, 250, 4).tolist() for _ in range(4)],
        responses,
        [np.where(np.array(m) == 1, -3.0, 0.0) for m in masks],
        np.array([1.0, 0.0, 0.5, 2.0], np.float32),
        np.zeros(4, np.int64),
        ref=None if env_ref is None else [np.where(np.array(m) == 1, model_ref, env_ref) for m in masks],
        loss_mask=masks,
        token_rewards=token_rewards(masks) if token_rewards else None,
    )


def score_at_the_end(masks, scores=(1.0, 0.0, 0.5, 2.0)):
    return [[0.0] * (len(m) - 1) + [s] for m, s in zip(masks, scores, strict=True)]


def split_over_turns(masks, scores=(1.0, 0.0, 0.5, 2.0)):
    """1.0 at the end of the first turn, the rest of the score at the end of the second: they add up to it."""
    return [[0.0, 0.0, 1.0] + [0.0] * (len(m) - 4) + [s - 1.0] for m, s in zip(masks, scores, strict=True)]


SMALL_UPDATE = dict(batch_size=4, micro_batch_size=4, group_size=2, lam=0.9)


def updated_weights(model_cache, exp, **settings):
    learner, _ = make_learner(model_cache, **(SMALL_UPDATE | settings))
    advantages = learner.prepare(exp)[0]["advantages"]
    learner.update(exp)
    return advantages, {k: np.array(v) for k, v in tree_flatten(learner.trainable_weights())}


def test_per_turn_rewards_change_a_ppo_update_and_a_score_on_the_last_token_does_not(model_cache):
    plain_adv, plain = updated_weights(model_cache, multi_turn_experience())
    end_adv, at_end = updated_weights(model_cache, multi_turn_experience(token_rewards=score_at_the_end))
    turn_adv, per_turn = updated_weights(model_cache, multi_turn_experience(token_rewards=split_over_turns))
    np.testing.assert_array_equal(end_adv, plain_adv)
    for key in plain:
        np.testing.assert_allclose(at_end[key], plain[key], atol=1e-7, err_msg=key)
    assert not np.allclose(turn_adv, plain_adv, atol=1e-3)
    assert any(not np.allclose(per_turn[k], plain[k], atol=1e-6) for k in plain)


def objective_stat(learner, arrays, name, **replaced):
    """``ppo_objective``'s statistic ``name`` on the prepared ``arrays`` (one micro-batch: the whole batch), as
    a function of the arrays ``replaced`` names (for its gradient)."""
    mb = {k: mx.array(v) for k, v in arrays.items() if k != "units"}
    mb["normaliser"] = mx.array(max(float(arrays["units"].sum()), 1.0))
    mb["num_tokens"] = mx.array(max(float(arrays["mask"].sum()), 1.0))
    return ppo_objective(learner.container, mb | replaced, learner.minibatches.settings)[1][name]


def test_the_critic_and_the_policy_are_trained_on_every_model_token_and_no_other(model_cache):
    """The value loss's gradient with respect to the returns (and the policy loss's with respect to the
    advantages) is nonzero at every model token and exactly 0 at environment tokens and padding: an environment
    token in the value loss would pull the critic towards a return nobody earned there."""
    learner, _ = make_learner(model_cache, **SMALL_UPDATE)
    exp = multi_turn_experience(token_rewards=split_over_turns)
    arrays, stats = learner.prepare(exp)
    padded = exp.padded(learner.pad_multiple)
    model = (padded["mask"] * padded["model_tokens"]) > 0
    for key, stat in (("returns", "loss/value"), ("advantages", "loss/policy")):
        grad = mx.grad(lambda x, k=key, s=stat: objective_stat(learner, arrays, s, **{k: x}))(
            mx.array(arrays[key])
        )
        grad = np.array(grad)
        assert (grad[model] != 0).all() and (grad[~model] == 0).all(), key
    env = (padded["mask"] > 0) & ~model
    far_off = dict(arrays, returns=arrays["returns"] + 100 * env, old_values=arrays["old_values"] - 100 * env)
    assert float(objective_stat(learner, far_off, "loss/value")) == pytest.approx(
        float(objective_stat(learner, arrays, "loss/value")), abs=1e-6
    )
    # the batch's statistics count model tokens: 3 + 2 or 3 per episode
    assert stats["rollout/response_len_mean"] == pytest.approx(5.5)


@pytest.mark.parametrize("algorithm", ["ppo", "grpo", "rloo"])
def test_environment_tokens_do_not_enter_the_kl_penalty(model_cache, algorithm):
    """The actors' reference log-probs of environment tokens (meaningless: the model did not sample them) change
    nothing; those of a model token do (the penalty is there)."""
    settings = SMALL_UPDATE | dict(algorithm=algorithm, kl_coef=0.1)
    learner, _ = make_learner(model_cache, value_kind="separate" if algorithm == "ppo" else None, **settings)
    runs = [learner.prepare(multi_turn_experience(env_ref=x)) for x in (-1.0, -40.0)]
    (a, stats_a), (b, stats_b) = runs
    np.testing.assert_array_equal(a["advantages"], b["advantages"])
    assert stats_a["kl/ref_mean"] == stats_b["kl/ref_mean"]
    if algorithm == "ppo":
        np.testing.assert_array_equal(a["returns"], b["returns"])
    moved = learner.prepare(multi_turn_experience(env_ref=-1.0, model_ref=-4.0))[0]
    assert not np.allclose(moved["advantages"], a["advantages"], atol=1e-4)


@pytest.mark.parametrize("algorithm", ["grpo", "rloo"])
def test_group_advantages_are_the_episode_returns_on_model_tokens_only(model_cache, algorithm):
    learner, _ = make_learner(model_cache, value_kind=None, algorithm=algorithm, kl_coef=0.0, **SMALL_UPDATE)
    exp = multi_turn_experience()
    arrays, _ = learner.prepare(exp)
    padded = exp.padded(learner.pad_multiple)
    model = padded["mask"] * padded["model_tokens"]
    expected = group_advantages(exp.scores, 2, algorithm)[:, None] * model
    np.testing.assert_allclose(arrays["advantages"], expected, atol=1e-6)
    assert (arrays["mask"] == model).all()
    # per-turn rewards only say where a return was earned: a group baseline of returns does not look
    with_turns = learner.prepare(multi_turn_experience(token_rewards=split_over_turns))[0]
    np.testing.assert_array_equal(with_turns["advantages"], arrays["advantages"])


def test_micro_batches_keep_the_model_tokens_after_an_environment_turn():
    """Cutting a micro-batch's padding keeps every column up to each row's last model token: 5 model tokens, 30
    environment tokens, 5 model tokens is 40 columns, not 10 rounded up."""
    mask = np.zeros((2, 64), np.float32)
    mask[0, :5] = mask[0, 35:40] = 1
    mask[1, :3] = 1
    arrays = {
        "tokens": np.zeros((2, 80), np.int32),
        "mask": mask,
        "positions": np.tile(np.arange(64) + 3, (2, 1)),
    }
    cut = rows_cut_to_length(arrays, np.arange(2), multiple=8)
    assert cut["mask"].shape[1] == 40 and cut["mask"].sum() == mask.sum()
    assert cut["tokens"].shape[1] >= 3 + 40


# -- experience, buffer, intake -----------------------------------------------------------------------------------


def test_token_rewards_survive_the_message_the_batch_and_the_buffer_file(tmp_path):
    msg = protocol.decode([bytes(f) for f in protocol.encode(samples()["experience_turn_rewards"])])
    exp = Experience.from_message(msg)
    assert [r.tolist() for r in exp.token_rewards] == [[0.5, 0.0, 0.0, 1.0], [0.0]]
    plain = Experience.from_message(dataclasses.replace(msg, token_rewards=None))
    both = Experience.concat([exp, plain.select(np.array([1, 0]))])  # a part without: zeros, the same as none
    assert both.token_rewards.values.tolist() == [0.5, 0, 0, 1, 0, 0, 0, 0, 0, 0]
    save_groups([Group(1, 10, 4, both, 0)], tmp_path / "b.npz")
    (group,) = load_groups(tmp_path / "b.npz")
    assert group.experience.token_rewards.values.tolist() == both.token_rewards.values.tolist()
    assert group.experience.loss_mask.values.tolist() == both.loss_mask.values.tolist()
    assert exp.padded(pad_multiple=4)["token_rewards"].tolist() == [[0.5, 0, 0, 1], [0, 0, 0, 0]]


def test_a_buffer_file_written_before_token_rewards_still_loads(tmp_path):
    msg = protocol.decode([bytes(f) for f in protocol.encode(samples()["experience_turn_rewards"])])
    save_groups([Group(1, 10, 4, Experience.from_message(msg), 0)], tmp_path / "new.npz")
    with np.load(tmp_path / "new.npz") as data:
        older = {k: data[k] for k in data.files if k not in ("token_rewards", "loss_mask")}
    with (tmp_path / "old.npz").open("wb") as f:
        np.savez(f, **older)
    (group,) = load_groups(tmp_path / "old.npz")
    assert group.experience.token_rewards is None and group.experience.loss_mask is None
    assert group.experience.size == 2 and group.experience.scores.tolist() == [1.5, 0.0]


def test_a_response_without_a_model_token_drops_its_group_counted():
    msg = samples()["experience_turn_rewards"]  # sequences of 4 and 1 response tokens: one group of 2
    two_groups = dataclasses.replace(
        msg,
        sequences=msg.sequences * 2,
        tokens=np.tile(msg.tokens, 2),
        behaviour_logprobs=np.tile(msg.behaviour_logprobs, 2),
        loss_mask=np.array(
            [1, 0, 0, 1, 1, 0, 0, 0, 0, 0], np.uint8
        ),  # the 2nd group: environment tokens only
        token_rewards=np.array([0.5, 0, 0, 1, 0, 0, 0, 0, 0, 0], np.float32),
    )
    buf = ExperienceBuffer(capacity=16, group_size=2, max_policy_lag=1)
    assert buf.add(protocol.decode([bytes(f) for f in protocol.encode(two_groups)]), current_version=4) == 2
    assert buf.counters["reject/no_model_tokens"] == 2
    exp, _ = buf.take(2, current_version=4)
    assert exp.token_rewards.values.tolist() == [0.5, 0, 0, 1, 0]


def test_from_rows_takes_a_loss_mask_and_token_rewards():
    exp = Experience.from_rows([[1, 2]], [[3, 4, 5]], [[-1.0, 0.0, -1.0]], np.zeros(1), np.zeros(1),
                               loss_mask=[[1, 0, 1]], token_rewards=[[0.5, 0.0, 1.0]])  # fmt: skip
    assert exp.loss_mask.values.dtype == np.uint8 and exp.token_rewards.values.dtype == np.float32
    assert exp.select(np.array([0])).token_rewards.values.tolist() == [0.5, 0.0, 1.0]
    assert isinstance(exp.token_reward_rows(), Ragged)
