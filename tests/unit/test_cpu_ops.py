"""The CPU fast paths compute what MLX's stock ops compute: values and gradients, op by op and for a whole model."""

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten

from common import cpu_ops
from common.config import LoraConfig, ModelConfig
from common.lora import adapter_weights, attach_lora
from common.models import load_model


def _close(a: mx.array, b: mx.array, tol: float) -> None:
    np.testing.assert_allclose(np.array(a), np.array(b), rtol=tol, atol=tol)


def test_exp_matches_float64_to_float32_precision():
    x = mx.linspace(-80.0, 80.0, 10001)
    reference = np.exp(np.array(x, np.float64))
    relative = np.abs(np.array(cpu_ops.exp(x), np.float64) - reference) / reference
    assert relative.max() < 1e-5
    assert np.array(cpu_ops.exp(mx.array([-mx.inf]))).tolist() == [0.0]


@pytest.mark.parametrize("scale", [1.0, 30.0])
def test_softmax_value_and_gradient(scale):
    x = mx.random.normal((3, 4, 17), key=mx.random.key(0)) * scale
    weights = mx.random.normal(x.shape, key=mx.random.key(1))
    _close(cpu_ops.softmax(x), mx.softmax(x, axis=-1), 1e-6)
    ours = mx.grad(lambda v: (cpu_ops.softmax(v) * weights).sum())(x)
    stock = mx.grad(lambda v: (mx.softmax(v, axis=-1) * weights).sum())(x)
    _close(ours, stock, 1e-5)


def test_logsumexp_value_gradient_and_masked_rows():
    x = mx.random.normal((5, 300), key=mx.random.key(2)) * 10
    weights = mx.random.normal((5, 1), key=mx.random.key(3))
    _close(cpu_ops.logsumexp(x), mx.logsumexp(x, axis=-1, keepdims=True), 1e-5)
    ours = mx.grad(lambda v: (cpu_ops.logsumexp(v) * weights).sum())(x)
    stock = mx.grad(lambda v: (mx.logsumexp(v, axis=-1, keepdims=True) * weights).sum())(x)
    _close(ours, stock, 1e-6)
    truncated = mx.where(mx.arange(300) < 10, x, -mx.inf)  # top-k style: most of the row is -inf
    _close(cpu_ops.logsumexp(truncated), mx.logsumexp(truncated, axis=-1, keepdims=True), 1e-5)
    assert np.isneginf(np.array(cpu_ops.logsumexp(mx.full((1, 4), -mx.inf)))).all()


def test_swiglu_value_and_gradients():
    gate = mx.random.normal((2, 7, 33), key=mx.random.key(4)) * 4
    up = mx.random.normal(gate.shape, key=mx.random.key(5))
    weights = mx.random.normal(gate.shape, key=mx.random.key(6))
    _close(cpu_ops.swiglu(gate, up), nn.silu(gate) * up, 1e-5)
    ours = mx.grad(lambda g, u: (cpu_ops.swiglu(g, u) * weights).sum(), argnums=(0, 1))(gate, up)
    stock = mx.grad(lambda g, u: (nn.silu(g) * u * weights).sum(), argnums=(0, 1))(gate, up)
    for a, b in zip(ours, stock, strict=True):
        _close(a, b, 1e-5)


def test_causal_attention_matches_mlx_fast_sdpa():
    keys = [mx.random.key(i) for i in range(7, 10)]
    q = mx.random.normal((2, 6, 9, 8), key=keys[0])
    k, v = (mx.random.normal((2, 2, 9, 8), key=key) for key in keys[1:])  # grouped KV heads (3 per group)
    stock = mx.fast.scaled_dot_product_attention(q, k, v, scale=0.35, mask="causal")
    _close(cpu_ops.causal_attention(q, k, v, 0.35), stock, 1e-5)


def _tiny_with_lora(model_cache, fast: bool):
    loaded = load_model(ModelConfig(name="tiny", cache_dir=str(model_cache)))
    attach_lora(loaded.model, LoraConfig(rank=4, alpha=8.0))
    mx.random.seed(11)
    loaded.model.load_weights(
        [(k, mx.random.normal(v.shape) * 0.1) for k, v in adapter_weights(loaded.model).items()], strict=False
    )
    switched = cpu_ops.use_fast_cpu_ops(loaded.model) if fast else 0
    return loaded.model, switched


@pytest.fixture
def cpu_device():
    """The fast ops are switched in on the CPU only; on a GPU host run these tests on its CPU."""
    before = mx.default_device()
    mx.set_default_device(mx.cpu)
    yield
    mx.set_default_device(before)


def test_switched_model_matches_the_stock_model_in_logits_and_adapter_gradients(model_cache, cpu_device):
    stock, _ = _tiny_with_lora(model_cache, fast=False)
    fast, switched = _tiny_with_lora(model_cache, fast=True)
    layers = len(fast.layers)
    assert switched == layers * (2 + 7)  # attention + MLP + seven LoRA linears per block
    tokens = mx.array([[1, 40, 41, 42, 43, 44, 45, 2], [1, 50, 51, 52, 53, 54, 55, 56]])
    _close(fast(tokens), stock(tokens), 1e-4)

    def loss(model, t):
        return nn.losses.cross_entropy(model(t[:, :-1]), t[:, 1:]).mean()

    grads_fast = dict(tree_flatten(nn.value_and_grad(fast, loss)(fast, tokens)[1]))
    grads_stock = dict(tree_flatten(nn.value_and_grad(stock, loss)(stock, tokens)[1]))
    assert grads_fast.keys() == grads_stock.keys() and grads_fast
    for name, g in grads_stock.items():
        _close(grads_fast[name], g, 1e-4)
    # Parameter names are untouched: what we save still loads into stock mlx-lm.
    assert adapter_weights(fast).keys() == adapter_weights(stock).keys()


def test_decoding_with_a_cache_keeps_the_stock_path(model_cache):
    from mlx_lm.models.cache import make_prompt_cache

    stock, _ = _tiny_with_lora(model_cache, fast=False)
    fast, _ = _tiny_with_lora(model_cache, fast=True)
    prompt = mx.array([[1, 40, 41, 42]])
    outs = []
    for model in (stock, fast):
        cache = make_prompt_cache(model)
        model(prompt, cache=cache)
        outs.append(model(mx.array([[43]]), cache=cache))
    _close(outs[1], outs[0], 1e-5)
