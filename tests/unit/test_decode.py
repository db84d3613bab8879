"""The compiled decode path (actors/decode.py): the same samples as the uncompiled one, replayed not retraced."""

import mlx.core as mx
import numpy as np
import pytest

from actors import decode
from actors.sampler import SamplingParams, generate_completions
from common.config import ModelConfig
from common.logprobs import gather_token_logprobs, sample_from_logprobs, sampling_logprobs
from common.models import load_model
from tests.unit.test_sampler import PROMPTS, teacher_forced

MIXED = [*PROMPTS, [1, 80, 81, 82, 83, 84, 85, 86, 87, 88, 89, 90, 91], [1, 92]]


def reference_draw(logits: mx.array, uniforms: mx.array, temperature: float):
    logprobs = sampling_logprobs(logits, temperature)
    tokens = sample_from_logprobs(logprobs, uniforms)
    return tokens, gather_token_logprobs(logprobs, tokens)


def test_compiled_draw_is_the_uncompiled_draw_at_every_temperature_and_width():
    """Temperatures in turn and rows leaving: a compiled tail that kept the first temperature (or shape) fails."""
    rng = np.random.default_rng(3)
    logits = mx.array((rng.normal(size=(16, 300)) * 4).astype(np.float32))
    uniforms = mx.array((1.0 - rng.random(16)).astype(np.float32))
    for temperature, rows in [(1.0, 16), (0.6, 16), (1.7, 5), (0.6, 5)]:
        tokens, lp = decode.draw(logits[:rows], uniforms[:rows], temperature)
        ref_tokens, ref_lp = reference_draw(logits[:rows], uniforms[:rows], temperature)
        np.testing.assert_array_equal(np.array(tokens), np.array(ref_tokens))
        np.testing.assert_array_equal(np.array(lp), np.array(ref_lp))
    cold, _ = decode.draw(logits, uniforms, 0.6)
    hot, _ = decode.draw(logits, uniforms, 1.7)
    assert (np.array(cold) != np.array(hot)).any()  # the temperature reaches the samples


def test_compiled_draw_follows_the_tempered_distribution():
    probs = np.array([0.1, 0.2, 0.3, 0.4, 1e-9])
    n, temperature = 40_000, 0.5
    logits = mx.array(np.tile(np.log(probs).astype(np.float32), (n, 1)))
    uniforms = mx.array((1.0 - np.random.default_rng(1).random(n)).astype(np.float32))
    tokens, lp = decode.draw(logits, uniforms, temperature)
    tempered = probs ** (1 / temperature) / (probs ** (1 / temperature)).sum()
    np.testing.assert_allclose(np.bincount(np.array(tokens), minlength=5) / n, tempered, atol=0.01)
    np.testing.assert_allclose(np.array(lp), np.log(tempered[np.array(tokens)]), atol=1e-5)


def both_paths(model, prompts, params, **kw):
    """(compiled, uncompiled) completions, tokens drawn on the device in both."""
    runs = []
    for compiled in (True, False):
        p = SamplingParams(**{**params.__dict__, "compiled_decode": compiled, "host_sampling": False})
        runs.append(generate_completions(model, prompts, p, **kw))
    return runs


def assert_same(compiled, plain, model, params):
    for a, b in zip(compiled, plain, strict=True):
        assert a.response_ids == b.response_ids and a.finish_reason == b.finish_reason
        # Same tokens always; log-probs to 1e-5 (with OpenBLAS preloaded the masked attention over the fixed cache
        # sums in another order than the growing cache's: ~1e-6 apart).
        np.testing.assert_allclose(a.logprobs, b.logprobs, atol=1e-5, rtol=0)
        np.testing.assert_allclose(a.logprobs, teacher_forced(model, a, params), atol=1e-4)


@pytest.mark.parametrize("row_multiple", [1, 8])
def test_compiled_decode_gives_the_uncompiled_samples(tiny, monkeypatch, row_multiple):
    """Mixed prompt lengths, stop tokens, per-sequence limits and a 4-column chunk: the rows are laid out again
    many times (dropped rows, cut padding, grown capacity) and sample what the uncompiled path samples."""
    monkeypatch.setattr(decode, "ROW_MULTIPLE", row_multiple)
    params = SamplingParams(temperature=0.8, max_new_tokens=14, kv_chunk=4)
    seeds = list(range(300, 300 + len(MIXED)))
    limits = [14, 3, 9, 14, 6, 11]
    free = generate_completions(tiny.model, MIXED, params, set(), seeds, max_new=limits)
    stop = {free[0].response_ids[5], free[3].response_ids[8]}  # two rows stop early, at different steps
    compiled, plain = both_paths(tiny.model, MIXED, params, stop_ids=stop, seeds=seeds, max_new=limits)
    assert_same(compiled, plain, tiny.model, params)
    assert all(len(c.response_ids) <= lim for c, lim in zip(compiled, limits, strict=True))
    assert {c.finish_reason for c in compiled} == {"stop", "length"}


@pytest.mark.parametrize("max_rows", [2, 3])
def test_compiled_decode_refills_and_shares_prompts_like_the_uncompiled_one(tiny, max_rows):
    params = SamplingParams(temperature=1.0, max_new_tokens=10, kv_chunk=8)
    prompts = [p for p in MIXED[:3] for _ in range(2)] + MIXED[3:]
    seeds = list(range(400, 400 + len(prompts)))
    kw = {"stop_ids": {40, 41}, "seeds": seeds, "max_rows": max_rows}
    compiled, plain = both_paths(tiny.model, prompts, params, **kw)
    assert_same(compiled, plain, tiny.model, params)


def test_the_bundled_model_samples_the_same_on_both_paths(smollm):
    tok = smollm.tokenizer
    chats = [
        tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True)
        for q in ("Hi there", "Why is the sky blue? Explain it to me.")
    ]
    params = SamplingParams(temperature=1.0, max_new_tokens=12)
    kw = {"stop_ids": set(tok.eos_token_ids), "seeds": [1, 2], "max_new": [12, 7]}
    compiled, plain = both_paths(smollm.model, chats, params, **kw)
    assert_same(compiled, plain, smollm.model, params)


def test_the_compiled_step_is_replayed_not_retraced(tiny):
    """Within one capacity the step is traced once; the same shapes again trace nothing."""
    params = SamplingParams(max_new_tokens=20, kv_chunk=64, compiled_decode=True, host_sampling=False)
    prompts = [[1, 50 + i, 60, 61] for i in range(4)]
    before = decode.trace_count()
    first = generate_completions(tiny.model, prompts, params, set(), seeds=[1, 2, 3, 4])
    traced = decode.trace_count() - before
    again = generate_completions(tiny.model, prompts, params, set(), seeds=[1, 2, 3, 4])
    assert traced == 1 and decode.trace_count() - before == 1
    assert [c.response_ids for c in first] == [c.response_ids for c in again]


def test_weights_changed_after_compiling_are_used(model_cache):
    """The weights are inputs of the compiled step, not constants of its trace (actors sync new weights)."""
    loaded = load_model(ModelConfig(name="tiny", cache_dir=str(model_cache)))
    model = loaded.model
    params = SamplingParams(temperature=1.0, max_new_tokens=8)
    kw = {"stop_ids": set(), "seeds": [5, 6, 7]}
    before, _ = both_paths(model, PROMPTS[:3], params, **kw)
    model.update({"model": {"norm": {"weight": model.model.norm.weight * 3.0}}})
    compiled, plain = both_paths(model, PROMPTS[:3], params, **kw)
    assert_same(compiled, plain, model, params)
    assert [c.response_ids for c in compiled] != [c.response_ids for c in before]


def test_a_float32_head_decodes_with_its_float32_copy(model_cache):
    loaded = load_model(ModelConfig(name="tiny", cache_dir=str(model_cache)))
    loaded.model.float32_head = True
    params = SamplingParams(temperature=0.9, max_new_tokens=8)
    compiled, plain = both_paths(loaded.model, PROMPTS, params, stop_ids=set(), seeds=[1, 2, 3, 4])
    assert_same(compiled, plain, loaded.model, params)
