"""Checkpoints restore the learner exactly: weights, optimizer moments, KL coefficient, version and RNGs."""

import json

import numpy as np
import pytest
from mlx.utils import tree_flatten

from common.config import LoraConfig
from learner.checkpoint import STATE_FILE, latest_checkpoint, load_checkpoint, save_checkpoint
from tests.helpers import LORA, make_learner, sample_experience

SETTINGS = dict(batch_size=8, num_minibatches=2, micro_batch_size=4, update_epochs=2, kl_target=0.1)


def flat(tree) -> dict[str, np.ndarray]:
    return {k: np.array(v) for k, v in tree_flatten(tree)}


def test_an_update_after_restoring_equals_the_update_without_a_break(model_cache, tmp_path):
    """Learner A: update, checkpoint, update. Learner B (other initial weights): restore, the same update."""
    a, loaded = make_learner(model_cache, seed=0, compile_step=True, **SETTINGS)
    a.update(sample_experience(a, loaded.tokenizer, seed=0))
    folder = save_checkpoint(tmp_path, a, LORA, step=1, actor_next_batch={"0": 3})
    second = sample_experience(a, loaded.tokenizer, seed=1)
    a.update(second)

    b, _ = make_learner(model_cache, seed=7, compile_step=True, **SETTINGS)
    state = load_checkpoint(folder, b)
    assert state["step"] == 1 and state["actor_next_batch"] == {"0": 3}
    assert b.policy_version == 1
    b.update(second)
    assert b.policy_version == a.policy_version == 2
    assert b.kl_controller.value == pytest.approx(a.kl_controller.value, rel=1e-6)
    weights_a, weights_b = flat(a.container.trainable_parameters()), flat(b.container.trainable_parameters())
    assert set(weights_a) == set(weights_b) and any("value" in k for k in weights_a)
    for name, value in weights_a.items():
        np.testing.assert_allclose(weights_b[name], value, atol=1e-6, err_msg=name)
    moments_a, moments_b = flat(a.optimizer.state), flat(b.optimizer.state)
    for name, value in moments_a.items():
        np.testing.assert_allclose(moments_b[name], value, atol=1e-6, err_msg=name)


def test_only_complete_checkpoints_count_and_the_newest_are_kept(model_cache, tmp_path):
    learner, _ = make_learner(model_cache, batch_size=8, num_minibatches=1, micro_batch_size=8)
    for step in (1, 2, 3, 4):
        save_checkpoint(tmp_path, learner, LORA, step=step, keep=2)
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == ["step-000003", "step-000004"]
    (tmp_path / "checkpoints" / "step-000009").mkdir()  # a crash before the rename leaves no such name, but
    (tmp_path / "checkpoints" / ".tmp-step-000010-1").mkdir()  # an incomplete folder must never be picked
    assert latest_checkpoint(tmp_path).name == "step-000004"
    assert json.loads((latest_checkpoint(tmp_path) / STATE_FILE).read_text())["step"] == 4
    assert latest_checkpoint(tmp_path / "nowhere") is None


def test_a_checkpoint_of_another_model_shape_is_refused(model_cache, tmp_path):
    learner, _ = make_learner(model_cache, batch_size=8, num_minibatches=1, micro_batch_size=8)
    folder = save_checkpoint(tmp_path, learner, LORA, step=1)
    other, _ = make_learner(model_cache, value_kind=None, batch_size=8, num_minibatches=1, micro_batch_size=8)
    with pytest.raises(ValueError, match="does not fit this model"):
        load_checkpoint(folder, other)
    assert LoraConfig  # the adapters' own format stays mlx-lm's (checked in test_lora)


def test_bf16_master_weights_survive_a_checkpoint(model_cache, tmp_path):
    """A bf16 full fine-tuning checkpoint keeps the float32 master weights (the model's bf16 casts would lose
    the steps smaller than their rounding), and a learner restored from it continues from them."""
    import mlx.core as mx

    from common.config import ModelConfig, PPOUpdateConfig
    from common.models import load_model
    from learner.models import build_policy_and_value
    from learner.ppo_learner import PPOLearner

    def bf16_learner(seed):
        loaded = load_model(ModelConfig(name="tiny", cache_dir=str(model_cache), dtype="bfloat16"))
        mx.random.seed(seed)
        container = build_policy_and_value(loaded.model, LoraConfig(), None, full_finetune=True)
        cfg = PPOUpdateConfig(
            algorithm="grpo", batch_size=8, num_minibatches=1, micro_batch_size=8, learning_rate=1e-5
        )
        return PPOLearner(container, cfg, 1.0, compile_step=True), loaded

    a, loaded = bf16_learner(0)
    a.update(sample_experience(a, loaded.tokenizer))
    folder = save_checkpoint(tmp_path, a, LoraConfig(), step=1)
    b, _ = bf16_learner(1)
    load_checkpoint(folder, b)
    masters_a, masters_b = flat(a.master.state["weights"]), flat(b.master.state["weights"])
    assert masters_a.keys() == masters_b.keys()
    for name, value in masters_a.items():
        np.testing.assert_array_equal(masters_b[name], value, err_msg=name)
    model_b = dict(tree_flatten(b.container.trainable_parameters()))
    assert all(v.dtype == mx.bfloat16 for v in model_b.values())
    for _, state in tree_flatten(b.optimizer.state):
        assert state.dtype in (mx.float32, mx.uint64)


DAMAGES = [
    (name, damage)
    for name in ("adapters.safetensors", "trainable.safetensors", "optimizer.safetensors", "buffer.npz")
    for damage in ("truncate", "flip a byte", "remove")
] + [(STATE_FILE, "break the state")]


@pytest.mark.parametrize(("name", "damage"), DAMAGES)
def test_a_damaged_newest_checkpoint_is_reported_and_the_one_before_used(
    model_cache, tmp_path, caplog, name, damage
):
    """Issue 15: a corrupt or truncated newest checkpoint is found before a resume loads it."""
    learner, _ = make_learner(model_cache, batch_size=8, num_minibatches=1, micro_batch_size=8)
    for step in (1, 2):
        save_checkpoint(tmp_path, learner, LORA, step=step)
    newest = tmp_path / "checkpoints" / "step-000002"
    target = newest / name
    data = target.read_bytes()
    if damage == "truncate":
        target.write_bytes(data[: len(data) // 2])
    elif damage == "flip a byte":
        target.write_bytes(data[:-1] + bytes([data[-1] ^ 0xFF]))
    elif damage == "remove":
        target.unlink()
    else:
        target.write_text(data.decode()[:20])
    assert latest_checkpoint(tmp_path).name == "step-000001"
    assert "checkpoint step-000002 is damaged" in caplog.text


FULL_DISK = """
import resource, signal, sys
from pathlib import Path
from tests.helpers import LORA, make_learner
from learner.checkpoint import checkpoint_problem, latest_checkpoint, save_checkpoint

run = Path(sys.argv[1])
learner, _ = make_learner(Path(sys.argv[2]), batch_size=8, num_minibatches=1, micro_batch_size=8)
save_checkpoint(run, learner, LORA, step=1)
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit then fails with EFBIG, as on a full disk
resource.setrlimit(resource.RLIMIT_FSIZE, (4096, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
try:
    save_checkpoint(run, learner, LORA, step=2)
except OSError as e:
    print("write failed:", e.strerror)
resource.setrlimit(resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
print("left:", sorted(p.name for p in (run / "checkpoints").iterdir()))
print("latest:", latest_checkpoint(run).name, checkpoint_problem(latest_checkpoint(run)))
"""


def test_a_full_disk_during_a_checkpoint_leaves_the_previous_one_whole(model_cache, tmp_path):
    import subprocess
    import sys

    from tests.helpers import ROOT

    out = subprocess.run(
        [sys.executable, "-c", FULL_DISK, str(tmp_path / "run"), str(model_cache)],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    assert "write failed:" in out.stdout
    assert "left: ['step-000001']" in out.stdout  # no half-written folder
    assert "latest: step-000001 None" in out.stdout
