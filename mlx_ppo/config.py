"""``PPOConfig``: the Python API's flat settings, each one naming the config-tree option it sets.

The names are the ones the product description documents (``model_name``, ``clip_epsilon``, ``lora_r`` ...);
``FIELD_MAP`` is the one table from each to the setting(s) of ``common.config.Config`` it sets, and ``extra``
takes any other setting as ``"section.key": value``. A field's default is that setting's default in the tree,
overlaid by ``API_PRESET``: the few settings where the API deliberately trains differently. Validation is the
config tree's own: every problem listed at once.
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
    "dynamic_sampling": ("ppo.dynamic_sampling",),  # set for grpo and rloo only (it needs groups)
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

API_PRESET: dict[str, dict[str, Any]] = {
    # DAPO (GRPO with dynamic sampling and clip-higher, no KL term, learning rate 1e-3): the best of our
    # configurations on every task of the learning benchmark (BENCHMARKS.md, "Learning").
    "ppo": {
        "algorithm": "grpo",
        "dynamic_sampling": True,
        "clip_high": 0.28,
        "kl_coef": 0.0,
        "learning_rate": 1e-3,
        "batch_size": 16,
        "update_epochs": 1,
        "num_minibatches": 1,
    },
    "sampling": {"max_new_tokens": 48},
}
"""Where the API's defaults differ from the config tree's; every other default is the tree's."""


def _default(name: str) -> Any:
    """The default of field ``name``: that of its (first) setting, the preset's over the tree's."""
    section, _, key = FIELD_MAP[name][0].partition(".")
    return API_PRESET.get(section, {}).get(key, getattr(getattr(Config(), section), key))


@dataclass
class PPOConfig:
    """Training settings for ``PPOTrainer`` (defaults: the bundled SmolLM2-135M-Instruct, DAPO).

    Each field's default is its tree setting's with ``API_PRESET`` (DAPO) over it; fields that are no tree
    setting (``num_actors``, ``num_learners``, ``run_dir``, ``extra``) are the API's own.
    Flat, one field per documented setting, so it holds more than a dozen fields.
    ``batch_size`` counts sampled sequences per update (``group_size`` completions of each prompt).
    ``dynamic_sampling`` applies to the critic-free algorithms (grpo, rloo) and is left out with ``ppo``.
    ``lora_dropout`` defaults to 0, not the description's 0.1: with dropout the learner's log-probs of a
    sequence differ from the sampler's, which PPO's importance ratio reads as policy change.
    """

    model_name: str = _default("model_name")
    max_new_tokens: int = _default("max_new_tokens")
    temperature: float = _default("temperature")
    batch_size: int = _default("batch_size")
    learning_rate: float = _default("learning_rate")
    kl_coef: float = _default("kl_coef")
    gamma: float = _default("gamma")
    lam: float = _default("lam")
    clip_epsilon: float = _default("clip_epsilon")
    clip_high: float = _default("clip_high")
    """The ratio's upper clip, 1 + clip_high (DAPO's clip-higher); 0: clip_epsilon on both sides."""
    dynamic_sampling: bool = _default("dynamic_sampling")
    """DAPO's dynamic sampling: groups whose completions all score alike are dropped and refilled."""
    ppo_epochs: int = _default("ppo_epochs")
    num_minibatches: int = _default("num_minibatches")
    algorithm: str = _default("algorithm")
    group_size: int = _default("group_size")
    lora_r: int = _default("lora_r")
    lora_alpha: float = _default("lora_alpha")
    lora_dropout: float = _default("lora_dropout")
    seed: int = _default("seed")
    task: str = _default("task")
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
            # With a critic there are no groups to drop: dynamic sampling keeps the tree's default (off).
            if name == "dynamic_sampling" and self.algorithm == "ppo":
                continue
            out += [f"{target}={json.dumps(getattr(self, name))}" for target in targets]
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
