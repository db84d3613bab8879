"""Data-parallel learners: an update on 2 ranks (mlx.distributed ring on loopback) equals one rank's update on
the union of their batches, to float32 tolerance (atol 2e-5 on every trainable weight), with unequal response
lengths on the two ranks (long answers on rank 0, short ones on rank 1): losses are normalised by the whole
minibatch's token count, not each rank's, and the adaptive KL controller sees the whole batch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

from common.blas import env_with_fast_blas
from common.config import LoraConfig, ModelConfig, PPOUpdateConfig
from common.lora import adapter_weights
from common.models import load_model
from launcher.local import child_env, learner_rank_env
from learner.experience import Experience
from learner.models import build_policy_and_value
from learner.ppo_learner import PPOLearner

ROOT = Path(__file__).resolve().parents[2]
SEQUENCES, PROMPT = 8, 5
RESPONSE_LENGTHS = [12, 11, 12, 10, 2, 3, 2, 1]  # rank 0 gets the long answers, rank 1 the short ones


def dp_learner(cache: str, batch: int, group=None) -> PPOLearner:
    """The same initial learner in every process: tiny model, separate critic, seeded non-zero adapters."""
    loaded = load_model(ModelConfig(name="tiny", cache_dir=cache))
    mx.random.seed(0)
    container = build_policy_and_value(loaded.model, LoraConfig(rank=4, alpha=8.0), "separate")
    mx.random.seed(1)
    container.policy.load_weights(
        [(k, mx.random.normal(v.shape) * 0.05) for k, v in adapter_weights(container.policy).items()],
        strict=False,
    )
    cfg = PPOUpdateConfig(
        batch_size=batch,
        num_minibatches=1,
        micro_batch_size=2,
        update_epochs=2,
        learning_rate=1e-3,
        group_size=1,
        kl_target=0.5,  # adaptive: its update must count every rank's sequences
        kl_horizon=20.0,
    )
    return PPOLearner(container, cfg, 1.0, group=group)


def dp_experience(part: slice = slice(None)) -> Experience:
    rng = np.random.default_rng(0)
    prompts = rng.integers(3, 250, (SEQUENCES, PROMPT)).tolist()
    responses = [rng.integers(3, 250, n).tolist() for n in RESPONSE_LENGTHS]
    behaviour = [-2.0 + 0.1 * rng.standard_normal(n).astype(np.float32) for n in RESPONSE_LENGTHS]
    scores = rng.standard_normal(SEQUENCES).astype(np.float32)
    return Experience.from_rows(
        prompts[part], responses[part], behaviour[part], scores[part], np.zeros(SEQUENCES)[part]
    )


def trained_weights(learner: PPOLearner) -> dict[str, np.ndarray]:
    return {k: np.array(v) for k, v in tree_flatten(learner.container.trainable_parameters())}


def rank_main(out_dir: str, cache: str) -> None:
    """Run by each rank: update on its half of the batch, save what it trained."""
    from learner.distributed import init_group

    group = init_group()
    rank, half = group.rank(), SEQUENCES // group.size()
    learner = dp_learner(cache, half, group)
    stats = learner.update(dp_experience(slice(rank * half, (rank + 1) * half)))
    np.savez(Path(out_dir) / f"rank{rank}.npz", **trained_weights(learner))
    logged = {k: stats[k] for k in LOGGED}
    (Path(out_dir) / f"rank{rank}.json").write_text(
        json.dumps(logged | {"kl_coef": learner.kl_controller.value})
    )


LOGGED = ("loss/policy", "loss/value", "policy/approx_kl", "kl/ref_mean", "rollout/score_mean", "grad/norm")


def test_two_ranks_equal_one_rank_on_the_union_of_their_batches(model_cache, tmp_path):
    single = dp_learner(str(model_cache), SEQUENCES)
    before = trained_weights(single)
    single_stats = single.update(dp_experience())
    expected = trained_weights(single)
    code = f"from tests.processes.test_distributed import rank_main; rank_main({str(tmp_path)!r}, {str(model_cache)!r})"
    procs = []
    for rank in range(2):
        env = child_env(1, learner_rank_env(tmp_path, "127.0.0.1", rank, 2))
        env["LD_PRELOAD"] = env_with_fast_blas(env).get("LD_PRELOAD", "")
        env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
        procs.append(
            subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, env=env, stderr=subprocess.PIPE)
        )
    errors = [p.communicate(timeout=300)[1].decode()[-2000:] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], json.dumps(errors)
    ranks = [dict(np.load(tmp_path / f"rank{r}.npz")) for r in range(2)]
    assert ranks[0].keys() == expected.keys()
    moved = [k for k in expected if not np.allclose(expected[k], before[k])]
    assert any("lora" in k for k in moved) and any(k.startswith("value") for k in moved)
    for name, value in expected.items():
        np.testing.assert_array_equal(ranks[0][name], ranks[1][name])  # the ranks stay identical
        np.testing.assert_allclose(ranks[0][name], value, atol=2e-5, err_msg=name)
    for rank in range(2):  # every rank logs the statistics of the whole batch, and adapts the KL alike
        logged = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert logged["kl_coef"] == pytest.approx(single.kl_controller.value, rel=1e-6)
        for key in LOGGED:
            assert logged[key] == pytest.approx(single_stats[key], rel=1e-3, abs=1e-6), key
    assert single.kl_controller.value != pytest.approx(0.05)  # the controller did move


def test_a_rank_whose_peer_never_comes_exits_with_a_clear_error(tmp_path):
    """Rank 0 of 2 alone: joining the ring would wait forever; the watchdog ends it, showing where it hung."""
    env = child_env(1, learner_rank_env(tmp_path, "127.0.0.1", 0, 2))
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    code = "from learner.distributed import init_group; init_group(timeout_s=2, join_timeout_s=2)"
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 1, out.stderr[-2000:]
    assert "Timeout" in out.stderr and "in init_group" in out.stderr
