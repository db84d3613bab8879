"""A learned reward model: the base LM's trunk with its own LoRA and a scalar head on the last token.

A (prompt, completion) pair is tokenised exactly as the policy sees it (the chat-formatted prompt with the
generation prompt, then the completion's tokens) and scored from the trunk's hidden state at the last real
token. Sequences are right-padded: attention is causal, so padding after a sequence's last token never changes
its score. Trained with the Bradley-Terry loss by ``tools/reward_model_training.py``; actors score with it
when ``run.reward = "rm:PATH"``.

Saved as a folder: ``reward_model.json`` (base model name, LoRA settings, token limit) and
``reward_model.safetensors`` (the LoRA tensors and the head, nothing else: the base comes from ``base_model``).
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten

from common.config import LoraConfig, ModelConfig
from common.cpu_ops import use_fast_cpu_ops
from common.lora import atomic_write, attach_lora
from common.models import chat_prompt_ids, load_model

logger = logging.getLogger(__name__)

RM_CONFIG = "reward_model.json"
RM_WEIGHTS = "reward_model.safetensors"
RM_FORMAT = "mlx-ppo-reward-model"
RM_VERSION = 1


@dataclass(frozen=True)
class RewardModelSpec:
    """What ``reward_model.json`` holds: enough to rebuild the model around the saved tensors."""

    base_model: str
    """``model.name`` of the base whose trunk it adapts ('tiny', 'default', a folder, a hub id)."""
    lora: LoraConfig
    hidden_size: int
    max_tokens: int = 512
    """Longer (prompt, completion) pairs keep their last ``max_tokens`` tokens: the score reads the last one."""


class RewardNet(nn.Module):
    """Trunk (frozen base + LoRA) and a scalar head on the hidden state of each sequence's last real token."""

    def __init__(self, trunk: nn.Module, hidden_size: int):
        super().__init__()
        self.trunk = trunk
        self.head = nn.Linear(hidden_size, 1)
        self.head.bias = mx.zeros_like(self.head.bias)  # no offset to start from; scores are only compared

    def __call__(self, tokens: mx.array, lengths: mx.array) -> mx.array:
        """``[B, L]`` right-padded ids and ``[B]`` real lengths (>= 1) -> ``[B]`` rewards."""
        hidden = self.trunk(tokens)  # [B, L, H]
        last = mx.take_along_axis(hidden, (lengths - 1)[:, None, None], axis=1)  # [B, 1, H]
        return self.head(last[:, 0]).squeeze(-1)


class RewardModel:
    """A ``RewardNet`` with its tokenizer and spec: scores text, batched."""

    def __init__(self, net: RewardNet, tokenizer: Any, spec: RewardModelSpec):
        self.net, self.tokenizer, self.spec = net, tokenizer, spec

    def encode(self, prompt: str, completion: str) -> list[int]:
        """The pair's token ids as the policy saw them, cut to the last ``spec.max_tokens``."""
        ids = chat_prompt_ids(self.tokenizer, prompt)
        ids += self.tokenizer.encode(completion, add_special_tokens=False)
        return ids[-self.spec.max_tokens :]

    @staticmethod
    def collate(sequences: Sequence[Sequence[int]]) -> tuple[mx.array, mx.array]:
        """Right-pad ids into ``([B, L] tokens, [B] lengths)``; the pad id (0) is never read (causal attention)."""
        lengths = [max(len(s), 1) for s in sequences]
        tokens = np.zeros((len(sequences), max(lengths)), np.int32)
        for row, seq in zip(tokens, sequences, strict=True):
            row[: len(seq)] = seq
        return mx.array(tokens), mx.array(lengths)

    def score(self, prompts: Sequence[str], completions: Sequence[str], batch_size: int = 16) -> np.ndarray:
        """``[N]`` float32 rewards of each (prompt, completion), ``batch_size`` sequences a forward pass."""
        ids = [self.encode(p, c) for p, c in zip(prompts, completions, strict=True)]
        out = []
        for start in range(0, len(ids), batch_size):
            rewards = self.net(*self.collate(ids[start : start + batch_size]))
            out.append(np.array(rewards.astype(mx.float32)))
        return np.concatenate(out) if out else np.zeros(0, np.float32)


def build_reward_model(model_cfg: ModelConfig, lora: LoraConfig, max_tokens: int = 512) -> RewardModel:
    """A fresh reward model over ``model_cfg``'s base: new LoRA (zero update) and a randomly initialised head."""
    loaded = load_model(model_cfg)
    trunk = loaded.model.model  # the transformer without its vocabulary projection
    attach_lora(trunk, lora)
    hidden = loaded.model.args.hidden_size
    net = RewardNet(trunk, hidden)
    use_fast_cpu_ops(net)  # a no-op off the CPU; after attach_lora, so the LoRA layers switch too
    mx.eval(net.parameters())
    return RewardModel(net, loaded.tokenizer, RewardModelSpec(model_cfg.name, lora, hidden, max_tokens))


def trainable_weights(model: RewardModel) -> dict[str, mx.array]:
    """The tensors a reward model saves: its LoRA and its head, by dotted name."""
    return dict(tree_flatten(model.net.trainable_parameters()))


def save_reward_model(model: RewardModel, path: str | Path) -> Path:
    """Write ``reward_model.json`` + ``reward_model.safetensors`` into folder ``path`` (each replaced atomically)."""
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    spec = dataclasses.asdict(model.spec)
    config = json.dumps({"format": RM_FORMAT, "version": RM_VERSION, **spec}, indent=2)
    weights = trainable_weights(model)
    atomic_write(folder / RM_WEIGHTS, lambda p: mx.save_safetensors(str(p), weights))
    atomic_write(folder / RM_CONFIG, lambda p: p.write_text(config))
    return folder


def read_spec(path: str | Path) -> RewardModelSpec:
    """The spec in ``path/reward_model.json``; ValueError when it is not one of ours."""
    config_path = Path(path) / RM_CONFIG
    try:
        raw = json.loads(config_path.read_text())
    except FileNotFoundError as e:
        raise ValueError(f"no reward model at {path}: {config_path} does not exist") from e
    except json.JSONDecodeError as e:
        raise ValueError(f"{config_path} is not valid JSON: {e}") from e
    if raw.get("format") != RM_FORMAT or raw.get("version") != RM_VERSION:
        raise ValueError(f"{config_path}: not a version-{RM_VERSION} {RM_FORMAT} config")
    lora = raw["lora"]
    lora["keys"] = tuple(lora.get("keys") or ())
    return RewardModelSpec(raw["base_model"], LoraConfig(**lora), raw["hidden_size"], raw["max_tokens"])


def load_reward_model(path: str | Path, model_cfg: ModelConfig) -> RewardModel:
    """The reward model saved in folder ``path``; its base is ``model_cfg`` renamed to the saved base model
    (``model_cfg`` gives the cache folder and dtype). ValueError when the tensors do not fit."""
    spec = read_spec(path)
    base = ModelConfig(name=spec.base_model, dtype=model_cfg.dtype, cache_dir=model_cfg.cache_dir)
    model = build_reward_model(base, spec.lora, spec.max_tokens)
    saved = mx.load(str(Path(path) / RM_WEIGHTS))
    current = trainable_weights(model)
    wrong = sorted(set(saved) ^ set(current)) + [
        k for k in saved if k in current and saved[k].shape != current[k].shape
    ]
    if wrong:
        raise ValueError(f"{path}/{RM_WEIGHTS} does not fit its base {spec.base_model!r}: {wrong[:5]}")
    model.net.load_weights([(k, v.astype(current[k].dtype)) for k, v in saved.items()], strict=False)
    mx.eval(model.net.parameters())
    logger.info("loaded reward model %s (base %s)", path, spec.base_model)
    return model
