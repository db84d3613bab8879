"""One loading path for every model: a name is resolved to an mlx-lm folder, then ``mlx_lm.load`` reads it.

Names: ``default`` (the bundled SmolLM2-135M-Instruct, converted once into the cache), ``tiny`` (a random-init
test llama written into the cache), a local mlx-lm folder, or a Hugging Face id (``org/name``, downloaded by
mlx-lm when a network is there). On the CPU backend floating weights run in float32: bf16/fp16 matmuls have no
fast path there; elsewhere the checkpoint's own dtype is kept.

``load_policy`` is the one set-up of a policy that samples (an actor's, an evaluation's): the model, its LoRA
adapters (unless every weight is trained), saved adapters if given, and the CPU fast paths.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn

from common.config import LoraConfig, ModelConfig
from common.cpu_ops import use_fast_cpu_ops
from common.gguf_import import CONVERTER_VERSION, BundledModelMissing, bundled_gguf_path, convert_gguf
from common.lora import attach_lora, load_adapters
from common.machine_cache import machine_cache_dir
from common.tiny_model import TINY_VERSION, write_tiny_model

logger = logging.getLogger(__name__)

_HF_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_DTYPES = {"float32": mx.float32, "bfloat16": mx.bfloat16, "float16": mx.float16}


class ModelLoadError(RuntimeError):
    """A model name that could not be turned into a loaded model; the message says what was tried and the fix."""


@dataclass
class LoadedModel:
    model: nn.Module
    tokenizer: Any  # mlx_lm TokenizerWrapper
    path: Path | None
    """The mlx-lm folder it came from (None for a hub id mlx-lm resolved itself)."""
    dtype: mx.Dtype


def resolve_model_folder(name: str, cache_dir: str | Path = "") -> Path | str:
    """The folder (or hub id) that ``name`` stands for, building cached folders for 'default' and 'tiny'."""
    cache = Path(cache_dir) if cache_dir else machine_cache_dir()
    if name == "default":
        try:
            gguf = bundled_gguf_path()
        except BundledModelMissing as e:
            raise ModelLoadError(str(e)) from e
        return convert_gguf(gguf, cache / "models" / f"smollm2-135m-instruct-v{CONVERTER_VERSION}")
    if name == "tiny":
        return write_tiny_model(cache / "models" / f"tiny-llama-v{TINY_VERSION}", seed=0)
    path = Path(name).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ModelLoadError(f"model {name!r} is a file; pass the mlx-lm model folder that contains it")
        return path
    if _HF_ID.match(name) and not name.startswith((".", "~")):
        return name
    raise ModelLoadError(
        f"unknown model {name!r}: it is not 'default' or 'tiny', no folder {path.resolve()} exists, and it is not "
        "a Hugging Face id of the form org/name. Use --model default (bundled SmolLM2-135M-Instruct), "
        "--model tiny, a local mlx-lm folder, or an org/name id."
    )


def compute_dtype(requested: str, checkpoint_dtype: mx.Dtype) -> mx.Dtype:
    """The dtype floating weights should run in on this device."""
    if requested != "auto":
        return _DTYPES[requested]
    if mx.default_device() == mx.cpu:
        return mx.float32
    return checkpoint_dtype


def _checkpoint_dtype(model: nn.Module) -> mx.Dtype:
    from mlx.utils import tree_flatten

    for _, p in tree_flatten(model.parameters()):
        if mx.issubdtype(p.dtype, mx.floating):
            return p.dtype
    return mx.float32


def _load_folder(target: Path | str) -> tuple[nn.Module, Any]:
    from mlx_lm import load as mlx_lm_load

    try:
        return mlx_lm_load(str(target))
    except Exception as e:  # mlx-lm raises many kinds (OSError, ValueError, hub errors, JSON errors)
        if isinstance(target, Path):
            raise ModelLoadError(
                f"could not load the model folder {target}: {type(e).__name__}: {e}. A model folder needs "
                "config.json, *.safetensors weights and tokenizer files (as mlx_lm.convert writes them); "
                "re-create it, or delete it if it is a cached copy so it is rebuilt."
            ) from e
        raise ModelLoadError(
            f"could not fetch {target!r} from the Hugging Face hub: {type(e).__name__}: {e}. If this machine is "
            "offline, download the model where there is a network (mlx_lm.convert --hf-path ...) and pass the "
            "folder, or use --model default."
        ) from e


def load_model(cfg: ModelConfig) -> LoadedModel:
    """Resolve ``cfg.name`` and load model + tokenizer in the dtype for this device (see module docstring)."""
    target = resolve_model_folder(cfg.name, cfg.cache_dir)
    model, tokenizer = _load_folder(target)
    dtype = compute_dtype(cfg.dtype, _checkpoint_dtype(model))
    # set_dtype casts floating parameters only, so quantized (uint32) weights stay quantized.
    model.set_dtype(dtype)
    mx.eval(model.parameters())
    if cfg.lm_head_fp32 and dtype != mx.float32:
        model.float32_head = True  # read by lm_head_logits and next_token_logits
    logger.info("loaded model %s (%s) as %s", cfg.name, target, dtype)
    return LoadedModel(model, tokenizer, target if isinstance(target, Path) else None, dtype)


def load_policy(
    model_cfg: ModelConfig,
    lora_cfg: LoraConfig,
    full_finetune: bool = False,
    adapters: str | Path | None = None,
) -> LoadedModel:
    """The policy a sampler runs: ``model_cfg``'s model with fresh LoRA adapters of ``lora_cfg`` (none with
    ``full_finetune``: every weight is synced instead), the mlx-lm adapter folder ``adapters`` loaded into them
    when given, and the CPU fast paths switched on (after the adapters, so the LoRA layers switch too)."""
    loaded = load_model(model_cfg)
    if not full_finetune:
        attach_lora(loaded.model, lora_cfg)
    if adapters:
        load_adapters(loaded.model, adapters)
    use_fast_cpu_ops(loaded.model)  # a no-op off the CPU
    return loaded


def chat_prompt_ids(tokenizer: Any, text: str) -> list[int]:
    """``text`` as one user turn in the model's chat template, ready for the answer: the ids actors sample from."""
    return list(
        tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True)
    )


def vocab_size(model: nn.Module) -> int:
    """Token ids ``model`` can embed: ``[0, vocab_size)`` (mlx-lm's model args, else the embedding's rows)."""
    args = getattr(model, "args", None)
    if getattr(args, "vocab_size", None):
        return int(args.vocab_size)
    return int(model.model.embed_tokens.weight.shape[0])


def head_layer(model: nn.Module) -> nn.Module:
    """``model``'s vocabulary projection: its ``lm_head``, or the embedding it is tied to."""
    return model.lm_head if "lm_head" in model else model.model.embed_tokens


def lm_head_logits(model: nn.Module, hidden: mx.array) -> mx.array:
    """Apply ``model``'s vocabulary projection to trunk outputs ``[..., H]`` -> ``[..., V]``.

    With ``model.lm_head_fp32`` (``load_model`` marks the model ``float32_head``) a bf16/fp16 model's projection
    runs in float32: logits, and so the log-probs of PPO's ratio, carry no low-precision rounding (MiniMax-M1,
    arXiv:2506.13585, found the head the main source of sampler/trainer mismatch). Quantized heads run as they are.
    """
    layer = head_layer(model)
    if getattr(model, "float32_head", False) and "scales" not in layer:
        return hidden.astype(mx.float32) @ layer.weight.astype(mx.float32).T
    return layer(hidden) if "lm_head" in model else layer.as_linear(hidden)


def next_token_logits(model: nn.Module, tokens: mx.array, cache: list) -> mx.array:
    """``model(tokens, cache=cache)``, with the float32 head when the model is marked for it: ``[B, L, V]``.

    The sampler's path (not compiled): the float32 copy of the head is made once per weight array, not at every
    decoding step (a [V, H] cast per token would cost more than the step)."""
    if not getattr(model, "float32_head", False):
        return model(tokens, cache=cache)
    hidden = model.model(tokens, cache=cache)
    weight = float32_head_weight(model)
    return lm_head_logits(model, hidden) if weight is None else hidden.astype(mx.float32) @ weight.T


def float32_head_weight(model: nn.Module) -> mx.array | None:
    """The float32 copy of a ``float32_head`` model's head weight, made once per weight array (remade when a
    full fine-tuning snapshot replaces it); None for a quantized head or a model without ``float32_head``."""
    layer = head_layer(model)
    if not getattr(model, "float32_head", False) or "scales" in layer:
        return None
    cached = getattr(model, "_float32_head_cache", None)
    if cached is None or cached[0] is not layer.weight:
        cached = (layer.weight, layer.weight.astype(mx.float32))
        object.__setattr__(model, "_float32_head_cache", cached)  # a plain attribute, not a parameter
    return cached[1]
