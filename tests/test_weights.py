"""Policy snapshots: what the learner publishes is exactly what an actor ends up running, or a clear error."""

import dataclasses

import mlx.core as mx
import numpy as np
import pytest

from common import protocol
from common.config import LoraConfig, ModelConfig
from common.lora import adapter_weights, attach_lora
from common.models import load_model
from common.weights import AdapterSync

TOKENS = mx.array([[1, 40, 41, 42, 43, 2]])


def _model(model_cache, seed: int, rank: int = 4):
    loaded = load_model(ModelConfig(name="tiny", cache_dir=str(model_cache)))
    attach_lora(loaded.model, LoraConfig(rank=rank, alpha=2.0 * rank))
    mx.random.seed(seed)
    loaded.model.load_weights(
        [(k, mx.random.normal(v.shape) * 0.1) for k, v in adapter_weights(loaded.model).items()], strict=False
    )
    return loaded.model


def _over_the_wire(msg: protocol.Weights) -> protocol.Weights:
    return protocol.decode([bytes(f) for f in protocol.encode(msg)])


def test_a_snapshot_applied_elsewhere_reproduces_adapters_and_outputs(model_cache):
    learner, actor = _model(model_cache, seed=1), _model(model_cache, seed=2)
    assert not np.allclose(np.array(learner(TOKENS)), np.array(actor(TOKENS)))
    msg = _over_the_wire(AdapterSync(learner).snapshot(policy_version=3))
    assert msg.policy_version == 3 and msg.names == tuple(sorted(adapter_weights(learner)))
    AdapterSync(actor).apply(msg)
    theirs, ours = adapter_weights(learner), adapter_weights(actor)
    for name, value in theirs.items():
        np.testing.assert_array_equal(np.array(ours[name]), np.array(value))
    np.testing.assert_array_equal(np.array(actor(TOKENS)), np.array(learner(TOKENS)))
    # The same adapters give the same checksum on both sides (what heartbeats echo).
    assert AdapterSync(actor).snapshot(3).checksum == msg.checksum


def test_bfloat16_adapters_travel_as_bfloat16(model_cache):
    learner, actor = _model(model_cache, seed=1), _model(model_cache, seed=2)
    for model in (learner, actor):
        model.load_weights(
            [(k, v.astype(mx.bfloat16)) for k, v in adapter_weights(model).items()], strict=False
        )
    msg = _over_the_wire(AdapterSync(learner).snapshot(1))
    assert msg.dtype == "bfloat16" and msg.flat.dtype == np.uint16
    AdapterSync(actor).apply(msg)
    for name, value in adapter_weights(learner).items():
        got = adapter_weights(actor)[name]
        assert got.dtype == mx.bfloat16 and mx.array_equal(got, value).item()


def test_a_corrupted_snapshot_is_refused_and_changes_nothing(model_cache):
    learner, actor = _model(model_cache, seed=1), _model(model_cache, seed=2)
    before = {k: np.array(v) for k, v in adapter_weights(actor).items()}
    msg = AdapterSync(learner).snapshot(1)
    corrupted = msg.flat.copy()
    corrupted[7] += 1.0
    with pytest.raises(ValueError, match="checksum"):
        AdapterSync(actor).apply(dataclasses.replace(msg, flat=corrupted))
    for name, value in adapter_weights(actor).items():
        np.testing.assert_array_equal(np.array(value), before[name])


def test_a_snapshot_of_another_shape_names_every_mismatch(model_cache):
    rank8 = AdapterSync(_model(model_cache, seed=1, rank=8)).snapshot(1)
    with pytest.raises(ValueError, match=r"lora_a: shape \(\d+, 8\) != \(\d+, 4\)"):
        AdapterSync(_model(model_cache, seed=2, rank=4)).apply(rank8)


def test_a_model_without_adapters_cannot_sync(model_cache):
    plain = load_model(ModelConfig(name="tiny", cache_dir=str(model_cache))).model
    with pytest.raises(ValueError, match="no LoRA adapters"):
        AdapterSync(plain)
