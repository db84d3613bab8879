import numpy as np
import pytest

from learner.advantages import (
    broadcast_to_tokens,
    compute_gae,
    group_advantages,
    masked_mean,
    masked_whiten,
    shape_rewards,
)
from learner.kl_estimators import kl_estimate


def random_batch(seed=0, batch=5, steps=7):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, steps + 1, size=batch)
    mask = (np.arange(steps)[None] < lengths[:, None]).astype(np.float32)
    rewards = rng.normal(size=(batch, steps)).astype(np.float32) * mask
    values = rng.normal(size=(batch, steps)).astype(np.float32) * mask
    return rewards, values, mask, lengths


def reference_gae(rewards, values, length, gamma, lam):
    """The textbook loop over one sequence of ``length`` tokens."""
    adv = [0.0] * length
    last = 0.0
    for t in reversed(range(length)):
        next_value = values[t + 1] if t + 1 < length else 0.0
        delta = rewards[t] + gamma * next_value - values[t]
        last = delta + gamma * lam * last
        adv[t] = last
    return np.array(adv)


@pytest.mark.parametrize("gamma,lam", [(1.0, 1.0), (0.99, 0.95), (0.9, 0.0), (1.0, 0.5)])
def test_gae_matches_reference_loop(gamma, lam):
    rewards, values, mask, lengths = random_batch()
    advantages, returns = compute_gae(rewards, values, mask, gamma, lam)
    for b, n in enumerate(lengths):
        expected = reference_gae(rewards[b], values[b], n, gamma, lam)
        np.testing.assert_allclose(advantages[b, :n], expected, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(returns[b, :n], expected + values[b, :n], rtol=1e-5, atol=1e-5)
    assert (advantages[mask == 0] == 0).all() and (returns[mask == 0] == 0).all()


def test_gamma_lambda_one_is_reward_to_go_minus_values():
    rewards, values, mask, lengths = random_batch(seed=1)
    advantages, returns = compute_gae(rewards, values, mask, 1.0, 1.0)
    reward_to_go = np.cumsum(rewards[:, ::-1], axis=1)[:, ::-1] * mask
    np.testing.assert_allclose(advantages, (reward_to_go - values) * mask, atol=1e-5)
    np.testing.assert_allclose(returns, reward_to_go, atol=1e-5)


def test_gae_is_padding_invariant():
    rewards, values, mask, _ = random_batch(seed=2)
    pad = lambda a: np.pad(a, ((0, 0), (0, 4)), constant_values=3.0)  # noqa: E731 garbage in the padding
    padded = compute_gae(pad(rewards), pad(values), np.pad(mask, ((0, 0), (0, 4))), 0.99, 0.95)
    plain = compute_gae(rewards, values, mask, 0.99, 0.95)
    for p, q in zip(padded, plain, strict=True):
        np.testing.assert_allclose(p[:, :7], q, atol=1e-6)
        assert (p[:, 7:] == 0).all()


def test_masked_whiten():
    rewards, _, mask, _ = random_batch(seed=3)
    white = masked_whiten(rewards * 5 + 2, mask)
    values = white[mask == 1]
    assert abs(values.mean()) < 1e-5 and abs(values.std(ddof=1) - 1) < 1e-4
    assert (white[mask == 0] == 0).all()
    kept = masked_whiten(rewards + 2, mask, shift_mean=False)
    assert abs(masked_mean(kept, mask) - masked_mean(rewards + 2, mask)) < 1e-5


def test_shape_rewards_by_hand():
    kl = np.array([[0.1, 0.2, 0.3], [0.5, 9.0, 9.0]], dtype=np.float32)
    mask = np.array([[1, 1, 1], [1, 0, 0]], dtype=np.float32)
    rewards = shape_rewards(np.array([1.0, -2.0]), kl, mask, kl_coef=0.5)
    np.testing.assert_allclose(rewards, [[-0.05, -0.1, 0.85], [-2.25, 0, 0]], atol=1e-6)
    with pytest.raises(ValueError, match="at least one response token"):
        shape_rewards(np.array([1.0]), kl[:1], np.zeros((1, 3)), 0.1)


def test_kl_estimators():
    logp = np.array([[np.log(0.5), np.log(0.2)]])
    ref = np.array([[np.log(0.25), np.log(0.4)]])
    np.testing.assert_allclose(kl_estimate(logp, ref, "k1"), [[np.log(2), np.log(0.5)]], atol=1e-6)
    # k3 = r - 1 - log r with r = ref / pi
    np.testing.assert_allclose(
        kl_estimate(logp, ref, "k3"), [[0.5 - 1 + np.log(2), 2 - 1 - np.log(2)]], atol=1e-6
    )
    np.testing.assert_allclose(
        kl_estimate(logp, ref, "k2"), [[0.5 * np.log(2) ** 2, 0.5 * np.log(0.5) ** 2]], atol=1e-6
    )
    assert (kl_estimate(np.random.randn(4, 4), np.random.randn(4, 4), "k3") >= 0).all()
    with pytest.raises(ValueError, match="unknown KL estimator"):
        kl_estimate(logp, ref, "k4")


def test_group_advantages_by_hand():
    scores = np.array([1.0, 2.0, 3.0, 5.0, 5.0, 5.0])
    np.testing.assert_allclose(group_advantages(scores, 3, "rloo"), [-1.5, 0, 1.5, 0, 0, 0], atol=1e-6)
    np.testing.assert_allclose(group_advantages(scores, 3, "grpo"), [-1, 0, 1, 0, 0, 0], atol=1e-5)
    with pytest.raises(ValueError, match="groups of 4"):
        group_advantages(scores, 4, "grpo")
    mask = np.array([[1, 1, 0], [1, 0, 0]], dtype=np.float32)
    np.testing.assert_allclose(broadcast_to_tokens(np.array([2.0, -1.0]), mask), [[2, 2, 0], [-1, 0, 0]])
