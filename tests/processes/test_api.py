"""The Python API (``mlx_ppo``): the README's snippet runs, and the trainer trains, evaluates, saves, loads."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from common.config import Config, ConfigError
from mlx_ppo import PPOConfig, PPOTrainer
from mlx_ppo.config import API_PRESET, FIELD_MAP
from mlx_ppo.trainer import MetricsFollower, reward_spec

ROOT = Path(__file__).resolve().parents[2]
PROMPTS = ["say hello", "name a colour", "count to three", "describe the sea"]


def readme_snippet() -> str:
    text = (ROOT / "README.md").read_text()
    match = re.search(r"<!-- api-snippet -->\s*```python\n(.*?)```", text, re.S)
    assert match, "README has no api-snippet block"
    return match.group(1)


def test_the_readme_snippet_runs(model_cache, tmp_path):
    script = tmp_path / "train_letters.py"
    script.write_text(readme_snippet())
    env = {**os.environ, "MLX_PPO_CACHE": str(model_cache)}
    out = subprocess.run(
        [sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert re.search(r"epoch 2: reward \d\.\d{3}", out.stdout), out.stdout
    assert (tmp_path / "my-adapters" / "adapters.safetensors").is_file()


def tiny_config(model_cache, tmp_path, **changes) -> PPOConfig:
    settings = dict(
        model_name="tiny",
        max_new_tokens=8,
        batch_size=8,
        group_size=2,
        learning_rate=1e-3,
        lora_r=4,
        task="letters",
        num_actors=1,
        run_dir=str(tmp_path / "run"),
        extra={"model.cache_dir": str(model_cache)},
    )
    return PPOConfig(**{**settings, **changes})


def test_train_calls_back_each_epoch_evaluates_saves_and_continues_from_saved(model_cache, tmp_path):
    trainer = PPOTrainer(tiny_config(model_cache, tmp_path))
    seen = []
    result = trainer.train(PROMPTS, num_epochs=2, callbacks=[lambda epoch, m: seen.append((epoch, m))])
    assert [epoch for epoch, _ in seen] == [1, 2]  # 4 prompts x 2 samples = one update of 8 per epoch
    assert all(0.0 <= m["avg_reward"] <= 1.0 for _, m in seen) and result["updates"] == 2.0
    report = trainer.evaluate(PROMPTS)
    assert report["eval/n"] == 4 and 0.0 <= report["eval/reward_mean"] <= 1.0
    assert len(report["samples"]) == 4 and report["eval/kl_to_reference"] == pytest.approx(
        sum(s["kl"] for s in report["samples"]) / 4
    )
    trainer.save_model(tmp_path / "saved")
    again = PPOTrainer(tiny_config(model_cache, tmp_path, run_dir=str(tmp_path / "run2")))
    again.load_model(tmp_path / "saved")
    again.train(PROMPTS, num_epochs=1)
    config = (tmp_path / "run2" / "train-0" / "config.toml").read_text()
    assert f'adapters = "{(tmp_path / "saved").resolve()}"' in config  # started from the saved policy


def test_a_callback_returning_false_stops_training_early(model_cache, tmp_path):
    trainer = PPOTrainer(tiny_config(model_cache, tmp_path))
    result = trainer.train(PROMPTS, num_epochs=50, callbacks=[lambda epoch, m: epoch < 2])
    assert 2 <= len(result["epochs"]) < 50


def test_bad_settings_are_listed_at_once_before_any_process_starts(tmp_path):
    with pytest.raises(ConfigError) as err:
        PPOTrainer(PPOConfig(batch_size=6, group_size=4, learning_rate=-1.0, run_dir=str(tmp_path)))
    assert "learning_rate" in str(err.value) and "group_size" in str(err.value)


def test_the_defaults_are_dapo_and_every_algorithm_validates_with_them():
    dapo = PPOConfig().to_config().ppo
    assert (dapo.algorithm, dapo.dynamic_sampling, dapo.clip_high, dapo.kl_coef) == ("grpo", True, 0.28, 0.0)
    for algorithm in ("ppo", "grpo", "rloo"):  # dynamic sampling is left out where it cannot apply
        ppo = PPOConfig(algorithm=algorithm).to_config().ppo
        assert ppo.dynamic_sampling == (algorithm != "ppo") and ppo.learning_rate == 1e-3


def test_each_default_is_the_config_trees_unless_the_preset_says_otherwise():
    tree, api = Config(), PPOConfig()
    for name, targets in FIELD_MAP.items():
        for target in targets:
            section, key = target.split(".")
            expected = API_PRESET.get(section, {}).get(key, getattr(getattr(tree, section), key))
            assert getattr(api, name) == expected, (name, target)
    resolved = api.to_config()
    for section, values in API_PRESET.items():
        assert {k: getattr(getattr(resolved, section), k) for k in values} == values


def module_level_reward(prompt: str, completion: str) -> float:
    return float(len(completion) < 10)


def test_rewards_reach_actors_by_name_and_closures_are_refused():
    assert reward_spec(module_level_reward) == ("tests.processes.test_api:module_level_reward", "")
    assert reward_spec("rm:/models/rm") == ("rm:/models/rm", "")
    with pytest.raises(TypeError, match="cannot reach the actor processes"):
        reward_spec(lambda p, c: 0.0)


def test_epochs_close_only_on_complete_rows(tmp_path):
    path = tmp_path / "metrics.jsonl"
    rows = [{"step": i, "rollout/score_mean": i / 10} for i in (1, 2, 3)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 4, "rollout/sc')
    follower, calls = MetricsFollower(path, per_epoch=2), []
    assert follower.poll([lambda epoch, m: calls.append((epoch, m["avg_reward"]))])
    assert calls == [(1, pytest.approx(0.15))]  # rows 1-2; row 3 waits for row 4, still being written
