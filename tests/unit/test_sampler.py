import math

import mlx.core as mx
import numpy as np
import pytest

from actors.sampler import SamplingParams, generate_completions
from common.logprobs import gather_token_logprobs, sample_from_logprobs, sample_on_host, sampling_logprobs

PROMPTS = [[1, 30, 31, 32, 33, 34, 35, 36, 37], [1, 50], [1, 60, 61, 62, 63], [1, 70, 71]]
SEEDS = [11, 22, 33, 44]


def teacher_forced(model, completion, params):
    """Log-probs of the response under the sampling distribution, recomputed with one plain forward pass."""
    ids = mx.array([completion.prompt_ids + completion.response_ids])
    logits = model(ids)[0, len(completion.prompt_ids) - 1 : -1]
    logprobs = sampling_logprobs(logits, params.temperature)
    return np.array(gather_token_logprobs(logprobs, mx.array(completion.response_ids)))


@pytest.mark.parametrize("host", [True, False], ids=["host-sampling", "device-sampling"])
def test_behaviour_logprobs_match_teacher_forcing(tiny, host):
    params = SamplingParams(temperature=0.7, max_new_tokens=12, host_sampling=host)
    batch = generate_completions(tiny.model, PROMPTS, params, stop_ids=set(), seeds=SEEDS)
    single = generate_completions(tiny.model, PROMPTS[:1], params, stop_ids=set(), seeds=SEEDS[:1])
    for completion in batch + single:
        assert len(completion.response_ids) == 12 and completion.finish_reason == "length"
        assert np.isfinite(completion.logprobs).all()
        np.testing.assert_allclose(
            completion.logprobs, teacher_forced(tiny.model, completion, params), atol=1e-4
        )


@pytest.mark.parametrize("host", [True, False], ids=["host-sampling", "device-sampling"])
def test_results_do_not_depend_on_the_batch(tiny, host):
    params = SamplingParams(temperature=1.0, max_new_tokens=10, host_sampling=host)
    batch = generate_completions(tiny.model, PROMPTS, params, stop_ids=set(), seeds=SEEDS)
    reordered = generate_completions(tiny.model, PROMPTS[::-1], params, stop_ids=set(), seeds=SEEDS[::-1])[
        ::-1
    ]
    for i, prompt in enumerate(PROMPTS):
        alone = generate_completions(tiny.model, [prompt], params, stop_ids=set(), seeds=[SEEDS[i]])[0]
        for other in (batch[i], reordered[i]):
            assert other.response_ids == alone.response_ids
            np.testing.assert_allclose(other.logprobs, alone.logprobs, atol=1e-4)
    assert len({tuple(c.response_ids) for c in batch}) == len(PROMPTS)  # seeds differ, samples differ


def test_stop_token_is_kept_with_its_logprob(tiny):
    params = SamplingParams(temperature=1.0, max_new_tokens=16)
    free = generate_completions(tiny.model, PROMPTS, params, stop_ids=set(), seeds=SEEDS)
    stop_id = free[0].response_ids[3]
    stopped = generate_completions(tiny.model, PROMPTS, params, stop_ids={stop_id}, seeds=SEEDS)
    first = stopped[0]
    cut = free[0].response_ids.index(stop_id) + 1
    assert first.finish_reason == "stop" and first.response_ids == free[0].response_ids[:cut]
    assert first.response_ids[-1] == stop_id and len(first.logprobs) == cut
    np.testing.assert_allclose(first.logprobs, teacher_forced(tiny.model, first, params), atol=1e-4)
    for c, f in zip(stopped[1:], free[1:], strict=True):  # the others run on, unaffected, until they stop too
        n = len(c.response_ids)
        assert c.response_ids == f.response_ids[:n]
        assert c.finish_reason == ("stop" if c.response_ids[-1] == stop_id else "length")


def test_bad_inputs_are_refused(tiny):
    params = SamplingParams(max_new_tokens=2)
    with pytest.raises(ValueError, match="empty prompt"):
        generate_completions(tiny.model, [[1], []], params, set(), seeds=[1, 2])
    with pytest.raises(ValueError, match="seeds"):
        generate_completions(tiny.model, [[1]], params, set(), seeds=[1, 2])
    assert generate_completions(tiny.model, [], params, set(), seeds=[]) == []


def test_tempered_distribution_by_hand():
    probs = np.array([0.5, 0.3, 0.15, 0.05])
    logits = mx.array(np.log(probs)[None].astype(np.float32))
    tempered = np.exp(np.array(sampling_logprobs(logits, temperature=2.0)))[0]
    np.testing.assert_allclose(tempered, np.sqrt(probs) / np.sqrt(probs).sum(), atol=1e-6)


def test_host_and_device_samplers_agree():
    rng = np.random.default_rng(0)
    logits = (rng.normal(size=(64, 50)) * 3).astype(np.float32)
    uniforms = 1.0 - rng.random(64).astype(np.float32)
    host_tokens, host_lp = sample_on_host(logits, uniforms, 0.8)
    device_lp = sampling_logprobs(mx.array(logits), 0.8)
    device_tokens = sample_from_logprobs(device_lp, mx.array(uniforms))
    assert (np.array(device_tokens) == host_tokens).mean() > 0.95  # ties at a CDF boundary may differ
    picked = np.array(gather_token_logprobs(device_lp, mx.array(host_tokens)))
    np.testing.assert_allclose(host_lp, picked, atol=1e-5)
    assert np.isfinite(host_lp).all()


def test_samples_follow_the_distribution():
    logits = np.log(np.array([0.1, 0.2, 0.3, 0.4, 1e-9], dtype=np.float32))
    n = 40_000
    uniforms = 1.0 - np.random.default_rng(1).random(n).astype(np.float32)
    tokens, _ = sample_on_host(np.tile(logits, (n, 1)), uniforms, temperature=1.0)
    freq = np.bincount(tokens, minlength=5) / n
    np.testing.assert_allclose(freq, [0.1, 0.2, 0.3, 0.4, 0.0], atol=0.01)
    device = np.array(
        sample_from_logprobs(sampling_logprobs(mx.array(np.tile(logits, (n, 1)))), mx.array(uniforms))
    )
    assert (device == tokens).mean() > 0.999


def test_bundled_model_logprobs_and_stop(smollm):
    tok = smollm.tokenizer
    chat = [
        tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True)
        for q in ("What is the capital of France?", "Say something about rivers.")
    ]
    params = SamplingParams(temperature=1.0, max_new_tokens=12)
    for completion in generate_completions(smollm.model, chat, params, set(tok.eos_token_ids), seeds=[5, 6]):
        np.testing.assert_allclose(
            completion.logprobs, teacher_forced(smollm.model, completion, params), atol=1e-4
        )
    cold = SamplingParams(temperature=0.05, max_new_tokens=24)
    answer = generate_completions(smollm.model, chat[:1], cold, set(tok.eos_token_ids), seeds=[7])[0]
    assert "Paris" in tok.decode(answer.response_ids)
    assert answer.finish_reason == "stop" and answer.response_ids[-1] in tok.eos_token_ids
    assert math.isfinite(answer.logprobs[-1]) and answer.logprobs[-1] <= 0


def test_on_step_is_called_once_per_decoding_step(tiny):
    calls = []
    params = SamplingParams(max_new_tokens=5)
    completions = generate_completions(
        tiny.model, [[1, 40, 41], [1, 42]], params, set(), seeds=[0, 1], on_step=lambda: calls.append(1)
    )
    assert len(calls) == max(len(c.response_ids) for c in completions) == 5


@pytest.mark.parametrize("host", [True, False], ids=["host-sampling", "device-sampling"])
def test_a_shared_prompt_is_prefilled_once_with_the_same_samples(tiny, host):
    """GRPO groups: each prompt 3 times, interleaved with a stop token so rows leave the batch at different
    steps. Prefilling each distinct prompt once gives what prefilling every copy gives."""
    params = SamplingParams(temperature=1.0, max_new_tokens=10, host_sampling=host)
    grouped = [p for p in PROMPTS[:3] for _ in range(3)][::-1] + [PROMPTS[0]]
    seeds = list(range(100, 100 + len(grouped)))
    stop = {40}
    shared = generate_completions(tiny.model, grouped, params, stop, seeds, share_prompts=True)
    each = generate_completions(tiny.model, grouped, params, stop, seeds, share_prompts=False)
    for a, b in zip(shared, each, strict=True):
        assert a.prompt_ids == b.prompt_ids and a.response_ids == b.response_ids
        assert a.finish_reason == b.finish_reason
        np.testing.assert_allclose(a.logprobs, b.logprobs, atol=1e-4)
        np.testing.assert_allclose(a.logprobs, teacher_forced(tiny.model, a, params), atol=1e-4)
    assert len({tuple(c.response_ids) for c in shared}) > 3  # copies of a prompt still sample apart


@pytest.mark.parametrize("host", [True, False], ids=["host-sampling", "device-sampling"])
@pytest.mark.parametrize("max_rows", [1, 3, 5])
def test_refilling_finished_rows_gives_the_same_samples(tiny, host, max_rows):
    """With at most ``max_rows`` live, each finished row is refilled with the next prompt (continuous batching);
    every sequence samples what it samples in one batch, stop tokens and max_new_tokens included."""
    params = SamplingParams(temperature=1.0, max_new_tokens=9, host_sampling=host)
    prompts = [p for p in PROMPTS[:3] for _ in range(2)] + PROMPTS[:2]  # groups of 2, then two more
    seeds = list(range(200, 200 + len(prompts)))
    stop = {40, 41}  # rows stop at different steps and their slots are refilled
    steps = []
    refilled = generate_completions(
        tiny.model, prompts, params, stop, seeds, on_step=lambda: steps.append(1), max_rows=max_rows
    )
    batch = generate_completions(tiny.model, prompts, params, stop, seeds)
    for a, b in zip(refilled, batch, strict=True):
        assert a.response_ids == b.response_ids and a.finish_reason == b.finish_reason
        np.testing.assert_allclose(a.logprobs, b.logprobs, atol=1e-4)
        np.testing.assert_allclose(a.logprobs, teacher_forced(tiny.model, a, params), atol=1e-4)
    assert {c.finish_reason for c in batch} == {"stop", "length"}
    tokens = sum(len(c.response_ids) for c in batch)
    assert len(steps) >= -(-tokens // max_rows)  # never more than max_rows sequences a step
