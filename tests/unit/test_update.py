import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

from common.lora import adapter_weights
from learner.experience import Experience
from tests.helpers import make_learner, sample_experience


def test_padding_and_positions():
    exp = Experience.from_rows(
        [[1, 2, 3], [4]],
        [[5, 6], [7, 8, 9]],
        [np.array([-1.0, -2.0]), np.array([-3.0, -4.0, -5.0])],
        np.zeros(2),
        np.zeros(2),
    )
    batch = exp.padded(pad_multiple=4)
    assert batch["tokens"].shape == (2, 8) and batch["response"].shape == (2, 4)
    assert batch["tokens"][0, :5].tolist() == [1, 2, 3, 5, 6] and batch["tokens"][1, :4].tolist() == [
        4,
        7,
        8,
        9,
    ]
    assert batch["positions"][0, :2].tolist() == [2, 3] and batch["positions"][1, :3].tolist() == [0, 1, 2]
    assert batch["mask"].tolist() == [[1, 1, 0, 0], [1, 1, 1, 0]]
    assert batch["behaviour"][1].tolist() == [-3, -4, -5, 0]


def test_proximal_logprobs_match_behaviour_on_policy(model_cache):
    learner, loaded = make_learner(model_cache)
    exp = sample_experience(learner, loaded.tokenizer)
    arrays, stats = learner.prepare(exp)
    mask = arrays["mask"]
    np.testing.assert_allclose(arrays["proximal"] * mask, exp.padded()["behaviour"], atol=1e-4)
    assert stats["mismatch/behaviour_proximal_kl"] < 1e-6
    assert stats["kl/ref_mean"] != 0.0  # adapters are non-zero: the policy differs from the reference


def test_padding_does_not_change_the_batch(model_cache):
    learner, loaded = make_learner(model_cache)
    exp = sample_experience(learner, loaded.tokenizer)
    learner.pad_multiple = 8
    a, _ = learner.prepare(exp)
    learner.pad_multiple = 96
    b, _ = learner.prepare(exp)
    steps = a["mask"].shape[1]
    assert b["mask"].shape[1] == 96 and b["mask"][:, steps:].sum() == 0
    for key in ("proximal", "advantages", "returns", "old_values"):
        np.testing.assert_allclose(b[key][:, :steps], a[key], atol=1e-5, err_msg=key)


def test_importance_weight_is_one_on_policy_and_update_changes_only_adapters(model_cache):
    learner, loaded = make_learner(model_cache)
    base_before = {k: v for k, v in tree_flatten(learner.container.policy.parameters()) if "lora" not in k}
    lora_before = {k: np.array(v) for k, v in adapter_weights(learner.container.policy).items()}
    value_before = {k: np.array(v) for k, v in tree_flatten(learner.container.value.trainable_parameters())}
    stats = learner.update(sample_experience(learner, loaded.tokenizer))
    assert stats["is/weight_mean"] == pytest.approx(1.0, abs=1e-4)
    assert stats["policy_version"] == 1 and learner.policy_version == 1
    for k, v in adapter_weights(learner.container.policy).items():
        if k.endswith("lora_a"):
            assert not np.allclose(np.array(v), lora_before[k]), k
    value_after = dict(tree_flatten(learner.container.value.trainable_parameters()))
    assert any(not np.allclose(np.array(value_after[k]), value_before[k]) for k in value_before)
    for k, v in tree_flatten(learner.container.policy.parameters()):
        if "lora" not in k:
            assert v is base_before[k] or mx.array_equal(v, base_before[k]).item(), k


def test_one_minibatch_equals_accumulated_micro_batches(model_cache):
    whole, loaded = make_learner(model_cache, micro_batch_size=8)
    pieces, _ = make_learner(model_cache, micro_batch_size=1)
    exp = sample_experience(whole, loaded.tokenizer)
    s1, s2 = whole.update(exp), pieces.update(exp)
    for key in ("loss/policy", "loss/value", "policy/clipfrac", "grad/norm"):
        assert s1[key] == pytest.approx(s2[key], rel=1e-4, abs=1e-6), key
    a, b = adapter_weights(whole.container.policy), adapter_weights(pieces.container.policy)
    for k in a:
        np.testing.assert_allclose(np.array(a[k]), np.array(b[k]), atol=1e-5)


def test_value_trunk_shares_the_base_but_not_the_adapters(model_cache):
    learner, _ = make_learner(model_cache)
    policy_q = learner.container.policy.model.layers[0].self_attn.q_proj
    value_q = learner.container.value.trunk.layers[0].self_attn.q_proj
    assert policy_q.linear.weight is value_q.linear.weight  # one copy of the base weights
    assert policy_q is not value_q and policy_q.lora_a is not value_q.lora_a


def test_compiled_step_matches_eager(model_cache):
    eager, loaded = make_learner(model_cache)
    compiled, _ = make_learner(model_cache, compile_step=True)
    exp = sample_experience(eager, loaded.tokenizer)
    s1, s2 = eager.update(exp), compiled.update(exp)
    assert s1["loss/total"] == pytest.approx(s2["loss/total"], rel=1e-4)
    a, b = adapter_weights(eager.container.policy), adapter_weights(compiled.container.policy)
    for k in a:
        np.testing.assert_allclose(np.array(a[k]), np.array(b[k]), atol=1e-5)


def test_compiled_no_grad_passes_match_eager_and_read_the_updated_weights(model_cache):
    """The compiled policy and reference passes (learner/recompute.py) give the eager arrays before and after an
    update: a trace that froze the adapters, or the reference's scale of 0 into the policy, would differ."""
    eager, loaded = make_learner(model_cache)
    compiled, _ = make_learner(model_cache, compile_step=True)
    exp = sample_experience(eager, loaded.tokenizer)
    for round_ in range(2):
        a, b = eager.prepare(exp)[0], compiled.prepare(exp)[0]
        for key in ("proximal", "old_values", "advantages"):
            np.testing.assert_allclose(a[key], b[key], atol=2e-5, err_msg=f"{key}, round {round_}")
        ref = {
            k: c.recompute.run(c.prepare(exp)[0], ("ref",))["ref"] for k, c in (("e", eager), ("c", compiled))
        }
        np.testing.assert_allclose(ref["e"], ref["c"], atol=2e-5)
        assert not np.allclose(a["proximal"] * a["mask"], ref["e"] * a["mask"], atol=1e-3)  # adapters matter
        eager.update(exp), compiled.update(exp)


def test_single_step_update_takes_the_proximal_policy_from_its_own_forward(model_cache):
    """GRPO with one epoch and one minibatch skips the no-grad policy pass; the update is the same. Not with a KL
    in the reward: its k1 needs the proximal log-probs before the step."""
    grpo = dict(algorithm="grpo", group_size=2, kl_coef=0.0, kl_loss_coef=0.05)
    in_step, loaded = make_learner(model_cache, value_kind=None, **grpo)
    two_pass, _ = make_learner(model_cache, value_kind=None, proximal_in_step=False, **grpo)
    assert in_step.proximal_in_step and not two_pass.proximal_in_step
    assert not make_learner(model_cache, value_kind=None, **(grpo | {"kl_coef": 0.05}))[0].proximal_in_step
    exp = sample_experience(in_step, loaded.tokenizer)
    s1, s2 = in_step.update(exp), two_pass.update(exp)
    for key in (
        "loss/policy",
        "policy/clipfrac",
        "is/weight_mean",
        "kl/ref_mean",
        "grad/norm",
        "policy/entropy",
    ):
        assert s1[key] == pytest.approx(s2[key], rel=1e-3, abs=1e-5), key
    assert s1["mismatch/behaviour_proximal_kl"] == pytest.approx(
        s2["mismatch/behaviour_proximal_kl"], abs=1e-5
    )
    a, b = adapter_weights(in_step.container.policy), adapter_weights(two_pass.container.policy)
    for k in a:
        np.testing.assert_allclose(np.array(a[k]), np.array(b[k]), atol=1e-5)
    with pytest.raises(ValueError, match="one epoch and one minibatch"):
        make_learner(model_cache, value_kind=None, proximal_in_step=True, update_epochs=2, **grpo)


def test_the_kl_loss_pulls_the_policy_back_to_the_reference(model_cache):
    """Equal scores: GRPO advantages are zero, so only the KL term moves the adapters, towards the base."""
    learner, loaded = make_learner(
        model_cache, value_kind=None, algorithm="grpo", group_size=4, kl_coef=0.0, kl_loss_coef=1.0,
        learning_rate=1e-3,
    )  # fmt: skip
    exp = sample_experience(learner, loaded.tokenizer)
    exp.scores[:] = 1.0
    kls = [learner.update(exp)["loss/ref_kl"] for _ in range(4)]
    assert kls[0] > 0 and kls[-1] < kls[0] / 2


def _mixed_lengths() -> Experience:
    """8 sequences from 1 to 70 response tokens after prompts of 3 to 60: the batch pads to 128 tokens."""
    rng = np.random.default_rng(1)
    prompt_lens, response_lens = [3, 40, 5, 7, 60, 4, 9, 6], [2, 70, 3, 1, 5, 66, 4, 2]
    return Experience.from_rows(
        [rng.integers(3, 250, n).tolist() for n in prompt_lens],
        [rng.integers(3, 250, n).tolist() for n in response_lens],
        [rng.uniform(-6.0, -1.0, n).astype(np.float32) for n in response_lens],
        rng.normal(size=8).astype(np.float32),
        np.zeros(8),
    )


def test_rows_are_cut_to_their_own_length_and_keep_every_real_token():
    from learner.experience import by_length, rows_cut_to_length, sequence_lengths

    arrays = _mixed_lengths().padded(pad_multiple=8)
    assert sequence_lengths(arrays, np.arange(8)).tolist() == [5, 110, 8, 8, 65, 70, 13, 8]
    rows = by_length(arrays, np.arange(8))
    assert rows.tolist() == [0, 2, 3, 7, 6, 4, 5, 1]
    cut = rows_cut_to_length(arrays, rows[:4], multiple=8)  # the four shortest: 8 tokens, 8 steps at most
    assert cut["tokens"].shape == (4, 8) and cut["mask"].shape == (4, 8) and cut["behaviour"].shape == (4, 8)
    assert cut["mask"].sum() == arrays["mask"][rows[:4]].sum()
    assert (cut["behaviour"] * cut["mask"]).sum() == pytest.approx(
        (arrays["behaviour"] * arrays["mask"]).sum(1)[rows[:4]].sum()
    )
    assert cut["positions"].max() <= 7 and np.array_equal(cut["tokens"], arrays["tokens"][rows[:4], :8])


@pytest.mark.parametrize("algorithm", ["ppo", "grpo"])
def test_micro_batches_cut_to_their_own_length_train_as_one_batch_padded_to_the_longest(
    model_cache, algorithm
):
    """Small micro-batches of similar lengths (cut, and for PPO values recomputed per cut piece, then put back in
    order), fixed in size or filled to a token budget, give the update of one micro-batch holding the whole batch.
    """
    settings = {"algorithm": "grpo", "group_size": 4, "value_kind": None} if algorithm == "grpo" else {}
    exp = _mixed_lengths()
    results = []
    # 96 tokens (padding to 32): micro-batches of 3, 2, 1, 1 and 1 sequences (test_micro_batches.py); the last
    # takes the vocabulary 7 tokens at a time (learner/vocab_pass.py) in the no-grad pass and the step.
    for micro, tokens, chunk in ((8, 0, 0), (2, 0, 0), (8, 96, 0), (8, 0, 7)):
        learner, _ = make_learner(
            model_cache, micro_batch_size=micro, micro_batch_tokens=tokens, vocab_chunk=chunk, **settings
        )
        stats = learner.update(exp)
        results.append((stats, dict(tree_flatten(learner.trainable_weights()))))
    whole, whole_weights = results[0]
    for cut, cut_weights in results[1:]:
        for stat in ("loss/total", "grad/norm", "policy/entropy"):
            assert whole[stat] == pytest.approx(cut[stat], rel=1e-4, abs=1e-6), stat
        for key in whole_weights:
            # Adam's first step is about lr * sign(gradient): an element whose gradient is ~0 moves by up to 1e-6
            # when its float32 sum is taken in another order (seen with OpenBLAS); 1e-5 is 1% of a step.
            assert np.allclose(np.array(whole_weights[key]), np.array(cut_weights[key]), atol=1e-5), key
