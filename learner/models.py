"""The learner's trainable modules: the LoRA policy and a value model, over one shared frozen base.

- Policy: the loaded mlx-lm model with LoRA adapters (or, with full fine-tuning, every weight trainable).
- Value model, two kinds:
  - ``separate`` (default): its own trunk (the base weights, *shared*, not copied) with its own LoRA, plus a
    scalar head. Policy and critic do not fight over one set of features.
  - ``shared``: a scalar head on the policy's own trunk (cheaper; the value loss also shapes the policy LoRA).
- Reference policy: the policy with adapters switched off (``common.lora.adapters_disabled``).

Log-probs and values are computed only at response positions: the trunk runs over the whole sequence (attention
needs it), but the vocabulary projection is applied to the gathered response positions alone.
"""

from __future__ import annotations

import copy
from typing import Any

import mlx.core as mx
import mlx.nn as nn

from common.config import LoraConfig
from common.cpu_ops import use_fast_cpu_ops
from common.lora import attach_lora
from common.models import lm_head_logits


def share_weights_clone(module: Any) -> Any:
    """A structural copy of ``module`` whose arrays are the *same* arrays (MLX arrays are immutable: no copy)."""
    if isinstance(module, nn.Module):
        clone = copy.copy(module)
        clone.clear()
        for key, value in module.items():
            clone[key] = share_weights_clone(value)
        clone._no_grad = set(module._no_grad)  # freezing the clone must not freeze the original
        return clone
    if isinstance(module, list):
        return [share_weights_clone(v) for v in module]
    if isinstance(module, dict):
        return {k: share_weights_clone(v) for k, v in module.items()}
    return module


class ValueModel(nn.Module):
    """Scalar value per position: a head on either its own trunk (separate) or the policy's hidden states."""

    def __init__(self, hidden_size: int, trunk: nn.Module | None):
        super().__init__()
        if trunk is not None:
            self.trunk = trunk
        self.head = nn.Linear(hidden_size, 1)
        # Start from V = 0 everywhere: no arbitrary initial bias in the first advantages.
        self.head.weight = mx.zeros_like(self.head.weight)
        self.head.bias = mx.zeros_like(self.head.bias)

    @property
    def is_separate(self) -> bool:
        return "trunk" in self

    def __call__(self, tokens: mx.array, policy_hidden: mx.array | None = None) -> mx.array:
        """``[B, L]`` tokens (or the policy's ``[B, L, H]`` hidden states when shared) -> ``[B, L, H]`` features."""
        return self.trunk(tokens) if self.is_separate else policy_hidden


class PolicyAndValue(nn.Module):
    """The container the optimizer trains: ``policy`` (mlx-lm model with LoRA) and ``value``."""

    def __init__(self, policy: nn.Module, value: ValueModel | None):
        super().__init__()
        self.policy = policy
        if value is not None:  # critic-free algorithms train no value model
            self.value = value

    @property
    def has_value(self) -> bool:
        return "value" in self

    def response_outputs(self, tokens: mx.array, positions: mx.array) -> tuple[mx.array, mx.array | None]:
        """Policy logits and values at the positions that predict response tokens.

        Args:
            tokens: ``[B, L]`` prompt + response ids, right-padded.
            positions: ``[B, T]`` index in ``tokens`` of the hidden state that predicts each response token
                (prompt length - 1 + t).

        Returns:
            ``([B, T, V] logits, [B, T] values or None without a value model)``.
        """
        hidden, values = self.response_hidden(tokens, positions)
        return lm_head_logits(self.policy, hidden), values

    def response_hidden(self, tokens: mx.array, positions: mx.array) -> tuple[mx.array, mx.array | None]:
        """``response_outputs`` before the vocabulary projection: ``([B, T, H] policy trunk outputs, values)``."""
        hidden = self.policy.model(tokens)
        gather = positions[..., None]
        response_hidden = mx.take_along_axis(hidden, gather, axis=1)
        if not self.has_value:
            return response_hidden, None
        features = self.value(tokens, hidden)
        value_hidden = mx.take_along_axis(features, gather, axis=1)
        return response_hidden, self.value.head(value_hidden).squeeze(-1)


def build_policy_and_value(
    model: nn.Module, lora: LoraConfig, value_kind: str | None = "separate", full_finetune: bool = False
) -> PolicyAndValue:
    """Attach the policy's adapters (or unfreeze everything) and build the value model over the same base.

    ``value_kind``: 'separate', 'shared', or None for critic-free algorithms (no value model at all).
    """
    if value_kind not in ("separate", "shared", None):
        raise ValueError(f"value model kind {value_kind!r}: use 'separate' or 'shared'")
    value = None
    if value_kind == "separate":
        trunk = share_weights_clone(model.model)  # clone before the policy's LoRA goes in
        attach_lora(trunk, lora)
        value = ValueModel(model.args.hidden_size, trunk)
    elif value_kind == "shared":
        value = ValueModel(model.args.hidden_size, None)
    if full_finetune:
        model.unfreeze()
    else:
        attach_lora(model, lora)
    container = PolicyAndValue(model, value)
    use_fast_cpu_ops(container)  # a no-op off the CPU; after attach_lora, so the LoRA layers switch too
    return container
