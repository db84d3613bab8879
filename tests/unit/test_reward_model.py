"""The learned reward model: Bradley-Terry loss, save/load, training on the shipped pairs, use as run.reward."""

import json
import math
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from actors.rewards import load_reward
from actors.tasks import get_task
from common.config import LoraConfig, ModelConfig, load_config
from common.reward_model import RM_CONFIG, build_reward_model, load_reward_model, save_reward_model
from tools.reward_model_training import (
    bradley_terry_loss,
    evaluate_pairs,
    load_pairs,
    main,
    train_reward_model,
)

PAIRS = Path(__file__).resolve().parents[2] / "examples" / "data" / "preference_pairs.jsonl"


def test_bradley_terry_loss_matches_a_plain_loop():
    rng = np.random.default_rng(0)
    chosen = rng.normal(0, 3, 64).astype(np.float32)
    rejected = rng.normal(0, 3, 64).astype(np.float32)
    chosen[:2], rejected[:2] = [60.0, -60.0], [-60.0, 60.0]  # huge margins both ways: no overflow, no log(0)
    expected = sum(
        -math.log(1.0 / (1.0 + math.exp(-(c - r)))) for c, r in zip(chosen[2:], rejected[2:], strict=True)
    )
    expected = (expected + 0.0 + 120.0) / 64  # -log sigmoid(120) ~ 0, -log sigmoid(-120) ~ 120
    got = bradley_terry_loss(mx.array(chosen), mx.array(rejected)).item()
    assert got == pytest.approx(expected, rel=1e-5)
    assert bradley_terry_loss(mx.zeros(3), mx.zeros(3)).item() == pytest.approx(math.log(2))


@pytest.fixture(scope="module")
def tiny_cfg(model_cache):
    return ModelConfig(name="tiny", cache_dir=str(model_cache))


def test_save_load_round_trip_and_padding_never_changes_a_score(tiny_cfg, tmp_path):
    mx.random.seed(3)
    model = build_reward_model(tiny_cfg, LoraConfig(rank=4), max_tokens=128)
    prompts, completions = ["Hi!", "Tell me about cats." * 3], ["Hello, happy to help.", "Cats purr."]
    together = model.score(prompts, completions)
    alone = np.concatenate([model.score([p], [c]) for p, c in zip(prompts, completions, strict=True)])
    np.testing.assert_allclose(together, alone, rtol=1e-5, atol=1e-6)
    save_reward_model(model, tmp_path / "rm")
    assert json.loads((tmp_path / "rm" / RM_CONFIG).read_text())["base_model"] == "tiny"
    again = load_reward_model(tmp_path / "rm", tiny_cfg)
    np.testing.assert_allclose(again.score(prompts, completions), together, rtol=1e-6)
    assert len(model.encode("x", "y" * 500)) == 128  # long pairs keep their end


def _split_by_prompt(tmp_path):
    """Held-out pairs share no prompt (nor chosen answer) with the training pairs."""
    pairs = load_pairs(PAIRS)
    held = set(sorted({p.prompt for p in pairs})[::4])
    train = [p for p in pairs if p.prompt not in held]
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(p.__dict__) + "\n" for p in train))
    return path, [p for p in pairs if p.prompt in held]


def test_training_on_the_shipped_pairs_ranks_held_out_pairs_better(model_cache, tmp_path):
    train_path, held_out = _split_by_prompt(tmp_path)
    assert len(held_out) >= 12
    cfg = load_config(None, ['model.name="tiny"', f'model.cache_dir="{model_cache}"', "lora.rank=8"])
    mx.random.seed(cfg.run.seed)  # the same head initialisation training starts from
    before = evaluate_pairs(build_reward_model(cfg.model, cfg.lora), held_out)
    summary = train_reward_model(cfg, train_path, tmp_path / "rm", epochs=2, lr=1e-3, batch=8)
    after = evaluate_pairs(load_reward_model(tmp_path / "rm", cfg.model), held_out)
    assert summary["pairs"] == 48 and summary["loss_last"] < summary["loss_first"] < math.log(2) + 0.5
    assert after["margin"] > before["margin"] + 1.0
    assert after["accuracy"] >= max(before["accuracy"], 0.8)
    # And as a run's reward: rm:PATH scores a batch, the polite answer above the rude one.
    scorer = load_reward(f"rm:{tmp_path / 'rm'}", get_task("letters"), model_cfg=cfg.model)
    pair = held_out[0]
    polite, rude = scorer([pair.prompt] * 2, [pair.chosen, pair.rejected])
    assert polite > rude


def test_train_rm_command_line(model_cache, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "p", "chosen": "c"}\n')
    assert main(["--model", "tiny", "--pairs", str(bad), "--out", str(tmp_path / "rm")]) == 2
    small = tmp_path / "small.jsonl"
    small.write_text("".join(PAIRS.read_text().splitlines(keepends=True)[:8]))
    argv = ["--model", "tiny", "--pairs", str(small), "--out", str(tmp_path / "rm"), "--epochs", "1"]
    argv += ["--batch-size", "4", "--lr", "1e-3", "--set", f'model.cache_dir="{model_cache}"']
    launch = [sys.executable, str(Path(__file__).resolve().parents[2] / "launch.py"), "train-rm"]
    out = subprocess.run([*launch, *argv], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]  # as the README says: python launch.py train-rm ...
    assert (tmp_path / "rm" / RM_CONFIG).is_file() and (
        tmp_path / "rm" / "reward_model.safetensors"
    ).is_file()
