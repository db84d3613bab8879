"""Checkpoints: the policy adapters (mlx-lm format), the value model (its own file) and the learner's counters.

Each checkpoint is written into a temporary folder and renamed into place, so a crash never leaves a half
checkpoint; the newest ``keep`` are kept. ``<run_dir>/adapters`` always holds the latest policy adapters for
``mlx_lm.generate --adapter-path``.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import mlx.core as mx
from mlx.utils import tree_flatten

from common.config import LoraConfig
from common.lora import save_adapters
from learner.ppo_learner import PPOLearner

VALUE_WEIGHTS = "value.safetensors"
STATE_FILE = "learner_state.json"


def _write_checkpoint(folder: Path, learner: PPOLearner, lora: LoraConfig, extra: dict[str, Any]) -> None:
    save_adapters(learner.container.policy, folder, lora)
    if learner.container.has_value:
        value = dict(tree_flatten(learner.container.value.trainable_parameters()))
        mx.save_safetensors(str(folder / VALUE_WEIGHTS), value)
    state = {"policy_version": learner.policy_version, "kl_coef": learner.kl_controller.value, **extra}
    (folder / STATE_FILE).write_text(json.dumps(state, indent=2))


def save_checkpoint(
    run_dir: Path, learner: PPOLearner, lora: LoraConfig, step: int, keep: int = 3, **extra: Any
) -> Path:
    """Write ``checkpoints/step-NNNNNN`` atomically, refresh ``adapters/``, prune old checkpoints."""
    root = run_dir / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:06d}"
    tmp = root / f".tmp-step-{step:06d}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    _write_checkpoint(tmp, learner, lora, {"step": step, **extra})
    shutil.rmtree(final, ignore_errors=True)
    os.rename(tmp, final)
    save_adapters(learner.container.policy, run_dir / "adapters", lora)
    for old in sorted(p for p in root.iterdir() if p.name.startswith("step-"))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final
