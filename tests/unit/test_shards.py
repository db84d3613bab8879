"""The learner's shard pool: worker threads, each on its own MLX stream with its own view of the model."""

import gc
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from common.lora import adapter_weights
from learner.shards import ShardPool, auto_threads, split_rows
from tests.helpers import make_learner, sample_experience

ROOT = Path(__file__).resolve().parents[2]


def test_split_rows_keeps_order_and_never_makes_empty_pieces():
    pieces = split_rows(np.array([5, 3, 9, 1, 7]), 2)
    assert [p.tolist() for p in pieces] == [[5, 3, 9], [1, 7]]
    assert [p.tolist() for p in split_rows(np.array([4]), 3)] == [[4]]


def test_auto_threads_takes_the_launchers_share(monkeypatch):
    monkeypatch.setenv("OPENBLAS_NUM_THREADS", "3")
    assert auto_threads(0) == 3 and auto_threads(5) == 5
    monkeypatch.delenv("OPENBLAS_NUM_THREADS")
    assert auto_threads(0) >= 1


def test_workers_compute_what_the_caller_would_and_see_new_weights():
    layer = nn.Linear(8, 4)
    pool = ShardPool(layer, threads=2)
    inputs = [mx.random.normal((3, 8)), mx.random.normal((2, 8)), mx.random.normal((1, 8))]
    out = pool.map(lambda worker, x: worker.module(x), inputs)
    for x, y in zip(inputs, out, strict=True):
        np.testing.assert_allclose(np.array(y), np.array(layer(x)), atol=1e-6)
    assert {id(w.module) for w in pool.workers}.isdisjoint({id(layer)})  # views, not the module itself
    layer.weight = layer.weight * 2 + 1  # as an optimizer step replaces the arrays
    out = pool.map(lambda worker, x: worker.module(x), inputs)
    np.testing.assert_allclose(np.array(out[1]), np.array(layer(inputs[1])), atol=1e-6)


def test_a_failing_shard_raises_in_the_caller_and_the_pool_goes_on():
    pool = ShardPool(nn.Linear(2, 2), threads=2)

    def shape_error(worker, x):
        return worker.module(x)  # [3, 5] @ [2, 2]: raises inside the worker thread

    with pytest.raises(ValueError):
        pool.map(shape_error, [mx.zeros((3, 5)), mx.zeros((1, 2))])
    out = pool.map(lambda worker, x: worker.module(x), [mx.zeros((1, 2)), mx.ones((1, 2))])
    assert [o.shape for o in out] == [(1, 2), (1, 2)]


@pytest.mark.parametrize("value_kind", ["separate", None])
def test_an_update_on_two_threads_equals_one_on_the_callers_thread(model_cache, value_kind):
    """Shards add up exactly like micro-batches: the same losses and the same new adapters."""
    extra = {} if value_kind else {"algorithm": "grpo", "group_size": 2}
    one, loaded = make_learner(model_cache, value_kind=value_kind, compute_threads=1, **extra)
    two, _ = make_learner(model_cache, value_kind=value_kind, compute_threads=2, compile_step=True, **extra)
    assert two.pool.size == 2 and one.pool.size == 1
    exp = sample_experience(one, loaded.tokenizer)
    s1, s2 = one.update(exp), two.update(exp)
    for key in ("loss/policy", "loss/total", "policy/approx_kl", "grad/norm", "kl/ref_mean"):
        assert s1[key] == pytest.approx(s2[key], rel=1e-4, abs=1e-6), key
    a, b = adapter_weights(one.container.policy), adapter_weights(two.container.policy)
    for k in a:
        np.testing.assert_allclose(np.array(a[k]), np.array(b[k]), atol=1e-5)


def test_a_process_whose_learner_used_threads_exits_cleanly(model_cache, tmp_path):
    """MLX aborted at exit once a thread that made a stream had ended; the pool's threads never end."""
    script = tmp_path / "update.py"
    script.write_text(
        "import sys; from pathlib import Path\n"
        f"sys.path.insert(0, {str(ROOT)!r})\n"
        "from tests.helpers import make_learner, sample_experience\n"
        f"learner, loaded = make_learner(Path({str(model_cache)!r}), compute_threads=2, compile_step=True)\n"
        "learner.update(sample_experience(learner, loaded.tokenizer))\n"
        "print('updated')\n"
    )
    for _ in range(3):  # the abort came in 12 runs of 12
        out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300)
        assert out.returncode == 0 and "updated" in out.stdout, out.stderr[-2000:]


def test_idle_workers_keep_no_dropped_learner_alive(model_cache):
    """The worker threads outlive every learner; a learner dropped by its owner must free its model."""
    gc.collect()
    before = mx.get_active_memory()
    learner, loaded = make_learner(model_cache, compute_threads=2)
    learner.update(sample_experience(learner, loaded.tokenizer))
    assert mx.get_active_memory() - before > 1e5  # the tiny model's weights, at least
    del learner, loaded
    gc.collect()
    assert mx.get_active_memory() - before < 1e4
