import math

import mlx.core as mx
import numpy as np
import pytest

from learner.kl_control import AdaptiveKLController, FixedKLController, make_kl_controller
from learner.loss import (
    Clip,
    entropy,
    explained_variance,
    importance_weights,
    policy_stats,
    token_ratio,
    value_loss,
)
from learner.loss import policy_loss as surrogate


def arr(x):
    return mx.array(np.asarray(x, dtype=np.float32))


def policy_loss(new, proximal, behaviour, advantages, mask, clip_coef, is_cap=2.0, num_tokens=None):
    """PPO's token-level loss and stats with truncated IS and token-mean aggregation (the default path)."""
    n = mask.sum() if num_tokens is None else num_tokens
    clip = Clip(clip_coef, clip_coef)
    ratio = token_ratio(new, proximal, mask)
    is_w, kept = importance_weights(proximal, behaviour, mask, "truncate", is_cap)
    loss = surrogate(ratio, advantages, is_w, mask, n, clip)
    return loss, policy_stats(ratio, advantages, is_w, kept, mask, n, clip)


def test_ratio_one_gives_no_clipping_and_minus_mean_advantage():
    rng = np.random.default_rng(0)
    logp = arr(rng.normal(size=(3, 5)))
    adv = arr(rng.normal(size=(3, 5)))
    mask = arr([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]])
    loss, stats = policy_loss(logp, logp, logp, adv, mask, clip_coef=0.2)
    expected = -(np.array(adv) * np.array(mask)).sum() / np.array(mask).sum()
    assert loss.item() == pytest.approx(expected, abs=1e-6)
    assert stats["policy/clipfrac"].item() == 0.0
    assert stats["policy/approx_kl"].item() == pytest.approx(0.0, abs=1e-7)
    assert stats["is/weight_mean"].item() == pytest.approx(1.0)


@pytest.mark.parametrize(
    "advantage,ratio,expected_loss,clipped",
    [
        (1.0, 1.5, -1.2, 1.0),
        (-1.0, 0.5, 0.8, 1.0),
        (1.0, 0.5, -0.5, 0.0),
        (-1.0, 1.5, 1.5, 0.0),
        (1.0, 1.1, -1.1, 0.0),
    ],
)
def test_clipped_surrogate_by_hand(advantage, ratio, expected_loss, clipped):
    new, old = arr([[math.log(ratio)]]), arr([[0.0]])
    loss, stats = policy_loss(new, old, old, arr([[advantage]]), arr([[1.0]]), clip_coef=0.2)
    assert loss.item() == pytest.approx(expected_loss, abs=1e-6)
    assert stats["policy/clipfrac"].item() == clipped


def test_truncated_importance_weight():
    new = proximal = arr([[0.0, 0.0]])
    behaviour = arr([[-math.log(3.0), -math.log(1.5)]])  # proximal/behaviour = 3 and 1.5
    loss, stats = policy_loss(new, proximal, behaviour, arr([[1.0, 1.0]]), arr([[1.0, 1.0]]), 0.2, is_cap=2.0)
    assert loss.item() == pytest.approx(-(2.0 + 1.5) / 2, abs=1e-6)  # weights min(3, 2) and 1.5
    assert stats["is/weight_max"].item() == pytest.approx(2.0)


def test_policy_gradient_by_hand():
    adv, mask = arr([[2.0, -1.0, 5.0]]), arr([[1.0, 1.0, 0.0]])
    old = arr([[0.0, 0.0, 0.0]])

    def f(new):
        return policy_loss(new, old, old, adv, mask, clip_coef=0.2)[0]

    grad = mx.grad(f)(arr([[0.05, -0.05, 0.0]]))
    # Unclipped region: d/dnew (-A * exp(new - old)) / N = -A * ratio / N; padded token gets none.
    expected = [-2.0 * math.exp(0.05) / 2, 1.0 * math.exp(-0.05) / 2, 0.0]
    np.testing.assert_allclose(np.array(grad)[0], expected, rtol=1e-5)


def test_micro_batches_sum_to_the_minibatch():
    rng = np.random.default_rng(1)
    new, old, beh, adv = (arr(rng.normal(size=(8, 6)) * 0.1) for _ in range(4))
    mask = arr((np.arange(6)[None] < rng.integers(1, 7, size=(8, 1))).astype(np.float32))
    full, _ = policy_loss(new, old, beh, adv, mask, 0.2)
    n = mask.sum()
    parts = sum(
        policy_loss(
            new[i : i + 1], old[i : i + 1], beh[i : i + 1], adv[i : i + 1], mask[i : i + 1], 0.2, num_tokens=n
        )[0]
        for i in range(8)
    )
    assert parts.item() == pytest.approx(full.item(), abs=1e-6)


def test_value_loss_by_hand():
    loss, stats = value_loss(arr([[2.0]]), arr([[1.0]]), arr([[3.0]]), arr([[1.0]]), clip_range=0.5)
    assert loss.item() == pytest.approx(0.5 * 2.25) and stats["value/clipfrac"].item() == 1.0
    loss, stats = value_loss(arr([[1.2]]), arr([[1.0]]), arr([[3.0]]), arr([[1.0]]), clip_range=0.5)
    assert loss.item() == pytest.approx(0.5 * 1.8**2, rel=1e-5) and stats["value/clipfrac"].item() == 0.0


def test_entropy_and_explained_variance():
    mask = arr([[1.0, 1.0]])
    uniform = mx.full((1, 2, 10), -math.log(10))
    assert entropy(uniform, mask).item() == pytest.approx(math.log(10), rel=1e-6)
    peaked = arr([[[0.0, -100.0, -100.0], [0.0, -100.0, -100.0]]])
    assert entropy(peaked, mask).item() == pytest.approx(0.0, abs=1e-6)
    returns = arr([[1.0, 2.0, 3.0]])
    full = arr([[1.0, 1.0, 1.0]])
    assert explained_variance(returns, returns, full).item() == pytest.approx(1.0)
    assert explained_variance(arr([[2.0, 2.0, 2.0]]), returns, full).item() == pytest.approx(0.0, abs=1e-6)


def test_kl_controllers():
    fixed = FixedKLController(0.1)
    fixed.update(10.0, 100)
    assert fixed.value == 0.1
    adaptive = AdaptiveKLController(0.1, target=6.0, horizon=10_000)
    adaptive.update(12.0, 1000)  # error clipped to +0.2
    assert adaptive.value == pytest.approx(0.1 * (1 + 0.2 * 0.1))
    adaptive.update(3.0, 1000)  # error -0.5 clipped to -0.2
    assert adaptive.value == pytest.approx(0.1 * 1.02 * 0.98)
    assert isinstance(make_kl_controller(0.1, None, 1.0), FixedKLController)
    assert isinstance(make_kl_controller(0.1, 6.0, 1.0), AdaptiveKLController)


@pytest.mark.parametrize("estimator", ["k2", "k3"])
def test_reference_kl_loss_by_hand(estimator):
    from learner.loss import reference_kl_loss

    rng = np.random.default_rng(3)
    new, ref = rng.normal(-2, 1, (3, 5)), rng.normal(-2, 1, (3, 5))
    mask = (rng.random((3, 5)) > 0.3).astype(np.float32)
    total, count = 0.0, 0
    for b in range(3):
        for t in range(5):
            if mask[b, t]:
                r = new[b, t] - ref[b, t]  # log pi / ref
                total += 0.5 * r * r if estimator == "k2" else min(math.exp(-r) - 1.0 + r, 10.0)
                count += 1
    loss = reference_kl_loss(mx.array(new), mx.array(ref), mx.array(mask), estimator=estimator)
    assert loss.item() == pytest.approx(total / count, rel=1e-5)
    same = reference_kl_loss(mx.array(new), mx.array(new), mx.array(mask), estimator=estimator)
    assert same.item() == pytest.approx(0.0, abs=1e-7)


def test_the_k3_loss_of_a_token_far_below_the_reference_is_capped_without_gradient():
    from learner.loss import reference_kl_loss

    ref, ones = mx.array([[-1.0, -1.0]]), mx.ones((1, 2))
    loss, grad = mx.value_and_grad(lambda new: reference_kl_loss(new, ref, ones, estimator="k3"))(
        mx.array([[-6.0, -1.1]])
    )  # r = -5: k3 = e^5 - 6 = 142 uncapped
    r = -0.1
    assert loss.item() == pytest.approx((10.0 + math.exp(-r) - 1 + r) / 2, rel=1e-5)
    assert grad[0, 0].item() == 0.0 and grad[0, 1].item() != 0.0
