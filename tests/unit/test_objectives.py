"""The objective menu (issue 14): each option's pure function against a plain loop written here, and the options
end to end through the learner (loss aggregation across micro-batches, truncation, dynamic sampling)."""

from __future__ import annotations

import math

import mlx.core as mx
import numpy as np
import pytest

from common.config import ModelConfig
from common.ragged import Ragged
from learner.advantages import group_advantages, masked_moments
from learner.aggregation import loss_weights, overlong_penalty
from learner.experience import Experience
from learner.loss import Clip, importance_weights, policy_loss, sequence_ratio, token_ratio
from tests.helpers import harness_with, make_learner, sample_experience


def arr(x) -> mx.array:
    return mx.array(np.asarray(x, dtype=np.float32))


def ragged(seed: int, batch: int = 6, steps: int = 7) -> tuple[np.ndarray, ...]:
    """new, proximal, behaviour log-probs, advantages and a prefix mask, ``[batch, steps]``."""
    rng = np.random.default_rng(seed)
    new, proximal, behaviour = (-1.5 + 0.4 * rng.standard_normal((batch, steps)) for _ in range(3))
    advantages = rng.standard_normal((batch, steps))
    lengths = rng.integers(1, steps + 1, batch)
    mask = (np.arange(steps)[None] < lengths[:, None]).astype(np.float32)
    return new, proximal, behaviour, advantages, mask


# -- advantages ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["grpo", "rloo"])
@pytest.mark.parametrize("norm", ["group", "batch", "none"])
def test_group_advantage_normalisations_against_a_loop(method, norm):
    scores = np.array([1.0, 0.0, 0.5, 0.5, 2.0, 2.0, 2.0, 2.0, 0.0, 3.0, 1.0, 1.0])
    size = 4
    batch_mean = scores.mean()
    batch_std = math.sqrt(sum((s - batch_mean) ** 2 for s in scores) / (len(scores) - 1))
    expected = []
    for g in range(0, len(scores), size):
        group = scores[g : g + size]
        mean = sum(group) / size
        std = math.sqrt(sum((s - mean) ** 2 for s in group) / (size - 1))
        for i, s in enumerate(group):
            others = [x for j, x in enumerate(group) if j != i]
            base = s - mean if method == "grpo" else s - sum(others) / (size - 1)
            scale = {"group": std + 1e-6, "batch": batch_std + 1e-6, "none": 1.0}[norm]
            expected.append(base / scale)
    got = group_advantages(scores, size, method, norm)
    np.testing.assert_allclose(got, expected, atol=1e-5)
    assert (got[4:8] == 0).all()  # a group of equal scores has no advantage under every normalisation


def test_batch_std_comes_from_every_rank():
    """LitePPO's std is the whole batch's: ``training_signal`` on one rank's half, with an all-reduce that adds
    the other half's moments, gives that half of one learner's advantages on the whole batch."""
    from common.config import PPOUpdateConfig
    from learner.advantages import training_signal

    scores = np.array([1.0, 0.0, 3.0, 1.0, 0.0, 0.0, 0.0, 1.0])
    cfg = PPOUpdateConfig(algorithm="grpo", group_size=4, batch_size=8, advantage_norm="batch", kl_coef=0.0)
    mask = np.ones((8, 3), np.float32)
    whole, _ = training_signal(cfg, scores, np.zeros_like(mask), mask, None, 0.0)
    other_half = masked_moments(scores[4:], np.ones(4))
    half, _ = training_signal(
        cfg, scores[:4], np.zeros_like(mask[:4]), mask[:4], None, 0.0, lambda m: m + other_half
    )
    np.testing.assert_allclose(half, whole[:4], atol=1e-6)
    alone, _ = training_signal(cfg, scores[:4], np.zeros_like(mask[:4]), mask[:4], None, 0.0)
    assert not np.allclose(alone, whole[:4])  # without the other rank the std differs


# -- loss aggregation ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm"])
def test_loss_aggregations_against_a_loop_and_across_micro_batches(mode):
    new, proximal, behaviour, advantages, mask = ragged(0)
    budget = 9
    per_token = -advantages * np.exp(new - proximal)  # unclipped surrogate: no clip binds at clip 10
    lengths = mask.sum(axis=1)
    if mode == "token_mean":
        expected = sum(per_token[b, t] for b in range(6) for t in range(7) if mask[b, t]) / lengths.sum()
    elif mode == "seq_mean_token_mean":
        expected = np.mean(
            [sum(per_token[b, t] for t in range(int(lengths[b]))) / lengths[b] for b in range(6)]
        )
    else:
        expected = sum(per_token[b, t] for b in range(6) for t in range(int(lengths[b]))) / (6 * budget)
    weights, units = loss_weights(mask, mode, budget)
    clip, ones = Clip(10.0, 10.0), mx.ones(mask.shape)

    def loss(rows, normaliser):
        ratio = token_ratio(arr(new[rows]), arr(proximal[rows]), arr(mask[rows]))
        return policy_loss(
            ratio, arr(advantages[rows]), ones[rows], arr(weights[rows]), normaliser, clip
        ).item()

    whole = loss(slice(None), float(units.sum()))
    assert whole == pytest.approx(expected, rel=1e-5)
    parts = sum(loss(slice(i, i + 2), float(units.sum())) for i in range(0, 6, 2))
    assert parts == pytest.approx(whole, rel=1e-5)  # micro-batches with the minibatch's normaliser add up


def test_an_empty_mask_weighs_nothing():
    mask = np.array([[1, 1, 0], [0, 0, 0]], np.float32)
    for mode in ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm"):
        weights, units = loss_weights(mask, mode, 4)
        assert (weights[1] == 0).all() and units[1] == 0


# -- clipping ------------------------------------------------------------------------------------------------


def reference_surrogate(ratio: float, advantage: float, low: float, high: float, dual: float) -> float:
    term = max(-advantage * ratio, -advantage * min(max(ratio, 1 - low), 1 + high))
    if dual and advantage < 0:
        term = min(term, -dual * advantage)
    return term


@pytest.mark.parametrize("low,high,dual", [(0.2, 0.2, 0.0), (0.2, 0.28, 0.0), (0.1, 0.3, 3.0)])
def test_asymmetric_and_dual_clip_against_a_loop(low, high, dual):
    ratios = np.array([0.5, 0.75, 0.95, 1.0, 1.1, 1.25, 1.4, 5.0])
    grid = [(r, a) for r in ratios for a in (-2.0, -0.5, 0.5, 2.0)]
    ratio = arr([[r for r, _ in grid]])
    advantages = arr([[a for _, a in grid]])
    ones = mx.ones(ratio.shape)
    got = policy_loss(ratio, advantages, ones, ones, len(grid), Clip(low, high, dual)).item()
    expected = np.mean([reference_surrogate(r, a, low, high, dual) for r, a in grid])
    assert got == pytest.approx(expected, rel=1e-6)


def test_clip_higher_lets_an_unlikely_token_grow_further():
    """DAPO: with A > 0 the gradient stops at 1 + clip_high, so a raised upper clip keeps pushing at 1.25."""
    grads = {}
    for high in (0.2, 0.28):

        def loss(log_ratio, high=high):
            ones = mx.ones(log_ratio.shape)
            return policy_loss(mx.exp(log_ratio), ones, ones, ones, 1.0, Clip(0.2, high))

        grads[high] = mx.grad(loss)(arr([[math.log(1.25)]])).item()
    assert grads[0.2] == 0.0 and grads[0.28] == pytest.approx(-1.25, rel=1e-6)


# -- GSPO ----------------------------------------------------------------------------------------------------


def test_sequence_ratio_value_and_gradient_against_a_loop():
    new, proximal, _, _, mask = ragged(1)
    seq_adv = np.random.default_rng(2).standard_normal(6)
    advantages = np.repeat(seq_adv[:, None], 7, axis=1)
    weights, units = loss_weights(mask, "seq_mean_token_mean", 7)
    lengths = mask.sum(axis=1)
    s = np.exp([((new[b] - proximal[b]) * mask[b]).sum() / lengths[b] for b in range(6)])
    ratio = sequence_ratio(arr(new), arr(proximal), arr(mask))
    np.testing.assert_allclose(np.array(ratio) * mask, s[:, None] * mask, rtol=1e-5)
    clip = Clip(10.0, 10.0)  # inside the clip: GSPO's gradient is -A_i s_i mean_t grad log pi(y_t) / B

    def loss(new_logprobs):
        r = sequence_ratio(new_logprobs, arr(proximal), arr(mask))
        return policy_loss(r, arr(advantages), mx.ones(r.shape), arr(weights), float(units.sum()), clip)

    grad = np.array(mx.grad(loss)(arr(new)))
    expected = np.zeros_like(new)
    for b in range(6):
        for t in range(int(lengths[b])):
            expected[b, t] = -seq_adv[b] * s[b] / lengths[b] / 6
    np.testing.assert_allclose(grad, expected, rtol=1e-4, atol=1e-7)


# -- off-policy corrections ----------------------------------------------------------------------------------


@pytest.mark.parametrize("correction", ["truncate", "token_mask", "sequence_mask"])
def test_importance_corrections_against_a_loop(correction):
    _, proximal, behaviour, _, mask = ragged(3)
    proximal = behaviour + np.random.default_rng(4).normal(0, 0.6, behaviour.shape)
    cap, low, high = 2.0, 0.5, 2.0
    expected_w, expected_kept = np.zeros_like(mask), np.zeros_like(mask)
    for b in range(mask.shape[0]):
        n = int(mask[b].sum())
        geometric = math.exp(sum(proximal[b, t] - behaviour[b, t] for t in range(n)) / n)
        for t in range(mask.shape[1]):
            w = math.exp(proximal[b, t] - behaviour[b, t])
            if correction == "truncate":
                kept, weight = 1.0, min(w, cap)
            elif correction == "token_mask":
                kept = float(low <= w <= high)
                weight = w * kept
            else:
                kept = float(low <= geometric <= high)
                weight = min(w, cap) * kept
            expected_w[b, t], expected_kept[b, t] = weight, kept
    weights, kept = importance_weights(arr(proximal), arr(behaviour), arr(mask), correction, cap, low, high)
    np.testing.assert_allclose(np.array(weights) * mask, expected_w * mask, rtol=1e-5)
    np.testing.assert_array_equal(np.array(kept) * mask, expected_kept * mask)
    if correction != "truncate":
        assert 0 < (expected_kept * mask).sum() < mask.sum()  # the data exercises both sides


def test_the_learner_counts_the_tokens_a_mask_leaves_out(model_cache):
    learner, loaded = make_learner(model_cache, is_correction="token_mask", is_low=0.9, is_high=1.1)
    exp = sample_experience(learner, loaded.tokenizer)
    exp.behaviour = Ragged.from_rows([b - 0.5 * (np.arange(len(b)) % 2) for b in exp.behaviour])  # w = e^0.5
    stats = learner.update(exp)
    assert 0.3 < stats["is/masked_frac"] < 0.7


# -- truncated responses ---------------------------------------------------------------------------------


def test_overlong_penalty_against_dapo():
    budget, buffer = 20, 5
    lengths = np.arange(0, 21)
    expected = [0.0 if n <= budget - buffer else ((budget - buffer) - n) / buffer for n in lengths]
    np.testing.assert_allclose(overlong_penalty(lengths, budget, buffer), expected, atol=1e-6)
    np.testing.assert_allclose(
        overlong_penalty(lengths, budget, buffer, 0.5), np.array(expected) * 0.5, atol=1e-6
    )


def test_masked_truncations_stay_in_the_baseline_but_out_of_the_loss(model_cache):
    learner, loaded = make_learner(
        model_cache, value_kind=None, algorithm="grpo", group_size=4, kl_coef=0.0, truncated="mask"
    )
    exp = sample_experience(learner, loaded.tokenizer)
    exp.truncated = np.array([True, False, False, False, False, True, False, False])
    arrays, stats = learner.prepare(exp)
    assert (arrays["mask"][[0, 5]] == 0).all() and (arrays["weights"][[0, 5]] == 0).all()
    assert arrays["mask"][[1, 2, 3, 4, 6, 7]].sum(axis=1).min() > 0
    expected = group_advantages(np.asarray(exp.scores, np.float64), 4, "grpo")  # with the cut-off ones
    np.testing.assert_allclose(arrays["advantages"][1:4, 0], expected[1:4], atol=1e-5)
    assert stats["rollout/truncated_frac"] == pytest.approx(0.25)


def test_the_overlong_penalty_reaches_the_advantages(model_cache):
    learner, loaded = make_learner(
        model_cache, value_kind=None, algorithm="grpo", group_size=4, kl_coef=0.0,
        truncated="overlong_penalty", overlong_buffer=4, advantage_norm="none",
    )  # fmt: skip
    learner.max_new_tokens = 6
    exp = sample_experience(learner, loaded.tokenizer, max_new=6)
    exp.scores[:] = 1.0
    keep = [6, 5, 3, 2, 6, 4, 1, 3]  # different lengths in each group: only the penalty tells them apart
    exp = Experience.from_rows(
        [exp.prompt(b) for b in range(exp.size)],
        [exp.response(b)[:n] for b, n in enumerate(keep)],
        [exp.behaviour[b][:n] for b, n in enumerate(keep)],
        exp.scores,
        exp.policy_versions,
    )
    lengths = np.array(keep)
    arrays, _ = learner.prepare(exp)
    penalised = 1.0 + overlong_penalty(lengths, 6, 4)
    expected = group_advantages(penalised, 4, "grpo", "none")
    assert np.abs(expected).max() > 0.1  # the penalty does differ within the groups
    np.testing.assert_allclose(arrays["advantages"][:, 0], expected, atol=1e-5)


# -- dynamic sampling ------------------------------------------------------------------------------------


def alike_when_describing(prompt: str, completion: str) -> float:
    """The same score for every answer to a 'Describe ...' prompt (no signal), letters' share otherwise."""
    if prompt.startswith("Describe"):
        return 0.5
    return sum("a" <= ch <= "z" for ch in completion) / max(len(completion), 1)


def test_dynamic_sampling_drops_groups_without_signal_and_still_trains_on_full_batches(model_cache, tmp_path):
    from actors.rewards import load_reward
    from actors.tasks import get_task

    # max_policy_lag 1: one batch in flight; a half-dropped batch must still get its successor granted.
    settings = (
        "run.max_updates=3",
        "ppo.algorithm=grpo",
        "ppo.dynamic_sampling=true",
        "ppo.kl_coef=0.0",
        "ppo.max_policy_lag=1",
    )
    with harness_with(model_cache, tmp_path, *settings) as h:
        worker = h.actor(0)
        h.join(worker)
        worker.rollout.scorer = load_reward(
            "tests.unit.test_objectives:alike_when_describing", get_task(h.cfg.run.task)
        )
        trained = []
        for _ in range(2000):
            if h.service.step_count >= 3:
                break
            worker.step(timeout_ms=0)
            metrics = h.service.step(timeout_ms=10)
            if metrics is not None:
                trained.append(metrics)
        assert len(trained) == 3
        counters = h.service.buffer.counters
        assert counters["reject/zero_variance"] > 0 and counters["reject/zero_variance"] % 2 == 0
        received = counters["batches/received"] * h.cfg.sampling.batch_size
        assert received >= 3 * h.cfg.ppo.batch_size + counters["reject/zero_variance"]  # more were granted


# -- float32 LM head ---------------------------------------------------------------------------------------


def test_a_float32_head_on_a_bf16_model(model_cache):
    from common.models import lm_head_logits, load_model

    plain = load_model(ModelConfig(name="tiny", cache_dir=str(model_cache), dtype="bfloat16"))
    marked = load_model(
        ModelConfig(name="tiny", cache_dir=str(model_cache), dtype="bfloat16", lm_head_fp32=True)
    )
    hidden = mx.random.normal((2, 3, plain.model.args.hidden_size)).astype(mx.bfloat16)
    assert lm_head_logits(plain.model, hidden).dtype == mx.bfloat16
    logits = lm_head_logits(marked.model, hidden)
    assert logits.dtype == mx.float32
    layer = marked.model.lm_head if "lm_head" in marked.model else marked.model.model.embed_tokens
    weight = np.array(layer.weight.astype(mx.float32))
    expected = np.array(hidden.astype(mx.float32)) @ weight.T
    np.testing.assert_allclose(np.array(logits), expected, rtol=1e-5, atol=1e-5)
    float32 = load_model(ModelConfig(name="tiny", cache_dir=str(model_cache), lm_head_fp32=True))
    assert not getattr(float32.model, "float32_head", False)  # nothing to do in float32
    from common.models import next_token_logits

    tokens = mx.array([[1, 5, 9]])
    sampled = next_token_logits(
        marked.model, tokens, cache=None
    )  # the sampler's path, its cached float32 head
    assert sampled.dtype == mx.float32
    trunk = marked.model.model(tokens)
    np.testing.assert_allclose(
        np.array(sampled), np.array(lm_head_logits(marked.model, trunk)), rtol=1e-5, atol=1e-5
    )
