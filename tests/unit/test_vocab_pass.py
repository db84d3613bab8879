"""The chunked vocabulary pass (learner/vocab_pass.py) against the plain one: values and gradients."""

import mlx.core as mx
import numpy as np
import pytest

from common.logprobs import sampling_logprobs, token_logprobs
from learner.loss import token_entropy
from learner.vocab_pass import chunked_logprobs_and_entropy, chunked_token_logprobs


def _inputs(n=13, hidden=8, vocab=50, seed=0):
    mx.random.seed(seed)
    h = mx.random.normal((n, hidden))
    w = mx.random.normal((vocab, hidden)) * 0.5
    t = mx.random.randint(0, vocab, (n,)).astype(mx.int32)
    t = mx.concatenate([t[:-1], t[:1]])  # a repeated target: the scatter into dW must add, not overwrite
    g = mx.random.normal((n,))
    return h, w, t, g


@pytest.mark.parametrize(("temperature", "chunk"), [(1.0, 4), (0.7, 5), (1.3, 64)])
def test_chunked_logprobs_and_their_gradients_equal_the_plain_pass(temperature, chunk):
    h, w, t, g = _inputs()

    def plain(h, w):
        return (token_logprobs(h @ w.T, t, temperature) * g).sum()

    def chunked(h, w):
        return (chunked_token_logprobs(temperature, chunk)(h, w, t)[0] * g).sum()

    np.testing.assert_allclose(
        np.array(chunked_token_logprobs(temperature, chunk)(h, w, t)[0]),
        np.array(token_logprobs(h @ w.T, t, temperature)),
        atol=1e-5,
    )
    for plain_grad, chunked_grad in zip(
        mx.grad(plain, argnums=(0, 1))(h, w), mx.grad(chunked, argnums=(0, 1))(h, w), strict=True
    ):
        np.testing.assert_allclose(np.array(chunked_grad), np.array(plain_grad), atol=1e-5)


def test_chunked_entropy_equals_the_plain_one():
    h, w, t, _ = _inputs(n=9)
    logprobs, entropy = chunked_logprobs_and_entropy(h, w, t, 0.8, chunk=4)
    full = sampling_logprobs(h @ w.T, 0.8)
    np.testing.assert_allclose(np.array(entropy), np.array(token_entropy(full)), atol=1e-5)
    np.testing.assert_allclose(np.array(logprobs), np.array(token_logprobs(h @ w.T, t, 0.8)), atol=1e-5)
