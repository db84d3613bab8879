"""``PPOConfig``: the product description's flat settings, mapped onto the run's config tree.

The names are the ones the product description documents (``model_name``, ``clip_epsilon``, ``lora_r`` ...);
each maps onto one setting of ``common.config.Config`` (``FIELD_MAP``), and ``extra`` takes any other setting as
``"section.key": value``. Validation is the config tree's own: every problem listed at once.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from typing import Any

from common.config import Config, load_config

# PPOConfig field -> config tree setting(s).
FIELD_MAP: dict[str, tuple[str, ...]] = {
    "model_name": ("model.name",),
    "max_new_tokens": ("sampling.max_new_tokens",),
    "temperature": ("sampling.temperature",),
    "batch_size": ("ppo.batch_size", "sampling.batch_size"),
    "learning_rate": ("ppo.learning_rate",),
    "kl_coef": ("ppo.kl_coef",),
    "gamma": ("ppo.gamma",),
    "lam": ("ppo.lam",),
    "clip_epsilon": ("ppo.clip_coef",),
    "clip_high": ("ppo.clip_high",),
    "ppo_epochs": ("ppo.update_epochs",),
    "num_minibatches": ("ppo.num_minibatches",),
    "algorithm": ("ppo.algorithm",),
    "group_size": ("ppo.group_size",),
    "lora_r": ("lora.rank",),
    "lora_alpha": ("lora.alpha",),
    "lora_dropout": ("lora.dropout",),
    "seed": ("run.seed",),
    "task": ("run.task",),
}


@dataclass
class PPOConfig:
    """Training settings for ``PPOTrainer`` (defaults: the bundled SmolLM2-135M-Instruct, DAPO).

    The defaults are DAPO's (GRPO with dynamic sampling and clip-higher, no KL term, learning rate 1e-3), the
    best of our configurations on every task of the learning benchmark (BENCHMARKS.md, "Learning").
    ``batch_size`` counts sampled sequences per update (``group_size`` completions of each prompt).
    ``dynamic_sampling`` applies to the critic-free algorithms (grpo, rloo) and is left out with ``ppo``.
    ``lora_dropout`` defaults to 0, not the description's 0.1: with dropout the learner's log-probs of a
    sequence differ from the sampler's, which PPO's importance ratio reads as policy change.
    """

    model_name: str = "default"
    max_new_tokens: int = 48
    temperature: float = 1.0
    batch_size: int = 16
    learning_rate: float = 1e-3
    kl_coef: float = 0.0
    gamma: float = 1.0
    lam: float = 0.95
    clip_epsilon: float = 0.2
    clip_high: float = 0.28
    """The ratio's upper clip, 1 + clip_high (DAPO's clip-higher); 0: clip_epsilon on both sides."""
    dynamic_sampling: bool = True
    """DAPO's dynamic sampling: groups whose completions all score alike are dropped and refilled."""
    ppo_epochs: int = 1
    num_minibatches: int = 1
    algorithm: str = "grpo"
    group_size: int = 4
    lora_r: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    seed: int = 0
    task: str = "arithmetic"
    num_actors: int = 2
    """Actor processes generating in parallel with the learner."""
    num_learners: int = 1
    run_dir: str = ""
    """Where the run's config, metrics, logs and checkpoints go ('' : runs/api-<time>)."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Any other setting of the config tree, e.g. ``{"ppo.max_policy_lag": 1, "sampling.max_rows": 8}``."""

    def overrides(self) -> list[str]:
        """The settings as ``section.key=value`` overrides (TOML values)."""
        out = []
        for name, targets in FIELD_MAP.items():
            value = getattr(self, name)
            out += [f"{target}={json.dumps(value)}" for target in targets]
        if self.algorithm != "ppo":  # dynamic sampling needs group baselines (config validation says so)
            out.append(f"ppo.dynamic_sampling={json.dumps(self.dynamic_sampling)}")
        out += [f"{key}={json.dumps(value)}" for key, value in self.extra.items()]
        minibatch = self.batch_size // max(self.num_minibatches, 1)
        if "ppo.micro_batch_size" not in self.extra and minibatch > 0:  # a divisor, at most 8 (memory)
            out.append(f"ppo.micro_batch_size={math.gcd(minibatch, 8)}")
        return out

    def to_config(self, *more: str) -> Config:
        """The validated config tree (``ConfigError`` lists every problem); ``more`` overrides last."""
        return load_config(None, [*self.overrides(), *more])

    def replace(self, **changes: Any) -> PPOConfig:
        return dataclasses.replace(self, **changes)
