"""LoRA adapters through mlx-lm's tuner, saved in mlx-lm's adapter format.

``adapters.safetensors`` holds only ``lora_a``/``lora_b`` tensors and ``adapter_config.json`` the mlx-lm fields,
so ``mlx_lm.generate --adapter-path DIR`` and ``mlx_lm.fuse`` accept what we save. Anything else we train (a
value head) is saved in its own file beside it. The reference policy is the same model with its adapters
switched off (``adapters_disabled``): no second copy of the base weights.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from common.config import LoraConfig

ADAPTER_WEIGHTS = "adapters.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
_ADAPTER_LEAVES = ("lora_a", "lora_b")


def _lora_classes() -> tuple[type, ...]:
    from mlx_lm.tuner.lora import LoRAEmbedding, LoRALinear, LoRASwitchLinear

    return (LoRALinear, LoRASwitchLinear, LoRAEmbedding)


def adapter_config(cfg: LoraConfig, num_blocks: int) -> dict[str, Any]:
    """The ``adapter_config.json`` contents mlx-lm reads (it calls alpha/rank 'scale')."""
    return {
        "fine_tune_type": "lora",
        "num_layers": num_blocks if cfg.num_layers == -1 else cfg.num_layers,
        "lora_parameters": {
            "rank": cfg.rank,
            "scale": cfg.alpha / cfg.rank,
            "dropout": cfg.dropout,
            "keys": list(cfg.keys) or None,
        },
    }


def attach_lora(model: nn.Module, cfg: LoraConfig) -> None:
    """Freeze ``model`` and add trainable LoRA adapters in place (which blocks and layers: see LoraConfig)."""
    from mlx_lm.tuner.utils import linear_to_lora_layers

    config = adapter_config(cfg, len(model.layers))
    params = dict(config["lora_parameters"])
    if params["keys"] is None:
        del params["keys"]
    else:
        _check_keys(model, params["keys"])
    model.freeze()
    linear_to_lora_layers(model, config["num_layers"], params)


def _check_keys(model: nn.Module, keys: list[str]) -> None:
    names = {name for name, _ in model.layers[0].named_modules()}
    unknown = [k for k in keys if k not in names]
    if unknown:
        linears = sorted(
            n for n, m in model.layers[0].named_modules() if isinstance(m, nn.Linear | nn.QuantizedLinear)
        )
        raise ValueError(f"lora.keys {unknown} name no module in a block; linear layers there: {linears}")


def adapter_weights(model: nn.Module) -> dict[str, mx.array]:
    """The LoRA tensors of ``model`` by their dotted names (what gets saved and synced to actors)."""
    return {k: v for k, v in tree_flatten(model.parameters()) if k.rsplit(".", 1)[-1] in _ADAPTER_LEAVES}


def adapter_slots(model: nn.Module) -> dict[str, tuple[nn.Module, str]]:
    """Where every adapter tensor lives: dotted name -> (LoRA module, ``'lora_a'`` or ``'lora_b'``), sorted.

    The names are ``adapter_weights``' names. Walking the module tree costs milliseconds, so callers that load
    adapters often (actors, on every policy version) find the slots once and assign through them.
    """
    slots = {}
    for path, module in model.named_modules():
        if isinstance(module, _lora_classes()):
            for leaf in _ADAPTER_LEAVES:
                if leaf in module:
                    slots[f"{path}.{leaf}" if path else leaf] = (module, leaf)
    return dict(sorted(slots.items()))


def atomic_write(path: Path, write: Any) -> None:
    """``write(tmp_path)`` then rename over ``path``; the temporary name keeps the suffix safetensors wants."""
    tmp = path.with_name(f".tmp-{os.getpid()}-{path.name}")
    write(tmp)
    os.replace(tmp, path)


def save_adapters(model: nn.Module, folder: str | Path, cfg: LoraConfig) -> Path:
    """Write ``adapters.safetensors`` + ``adapter_config.json`` to ``folder`` (each file replaced atomically)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    weights = adapter_weights(model)
    if not weights:
        raise ValueError("the model has no LoRA adapters to save; call attach_lora first")
    config = json.dumps(adapter_config(cfg, len(model.layers)), indent=2)
    atomic_write(folder / ADAPTER_WEIGHTS, lambda p: mx.save_safetensors(str(p), weights))
    atomic_write(folder / ADAPTER_CONFIG, lambda p: p.write_text(config))
    return folder


def load_adapter_weights(model: nn.Module, weights: dict[str, mx.array]) -> None:
    """Load adapter tensors into a model that already has matching LoRA layers; mismatches raise ValueError."""
    current = adapter_weights(model)
    errors = [f"{k}: not an adapter of this model" for k in weights if k not in current]
    errors += [f"{k}: missing" for k in current if k not in weights]
    errors += [
        f"{k}: shape {tuple(v.shape)} != {tuple(current[k].shape)}"
        for k, v in weights.items()
        if k in current and v.shape != current[k].shape
    ]
    if errors:
        raise ValueError("adapter weights do not fit the model:\n  " + "\n  ".join(errors))
    model.load_weights([(k, v.astype(current[k].dtype)) for k, v in weights.items()], strict=False)


def load_adapters(model: nn.Module, folder: str | Path) -> None:
    """Load a saved adapter folder into a model that has the same LoRA layers attached."""
    load_adapter_weights(model, mx.load(str(Path(folder) / ADAPTER_WEIGHTS)))


@contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Run ``model`` as its frozen base (the reference policy): every LoRA layer's scale is 0 inside."""
    layers = [m for _, m in model.named_modules() if isinstance(m, _lora_classes())]
    scales = [m.scale for m in layers]
    for m in layers:
        m.scale = 0.0
    try:
        yield model
    finally:
        for m, s in zip(layers, scales, strict=True):
            m.scale = s
