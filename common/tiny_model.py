"""A tiny random-initialised llama with a byte-level tokenizer, written as an ordinary mlx-lm model folder.

Tests and smoke runs use it through the same loading path as real models (``--model tiny``). It is deterministic
for a given seed, float32 and small enough that a forward pass takes milliseconds on one CPU core.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import mlx.core as mx
from mlx.utils import tree_flatten

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
CHAT_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# Bump when the folder's contents change, so cached copies are rebuilt.
TINY_VERSION = 1


def tiny_model_config(vocab_size: int) -> dict[str, Any]:
    return {
        "model_type": "llama",
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "max_position_embeddings": 1024,
        "vocab_size": vocab_size,
        "tie_word_embeddings": True,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": 2,
    }


def _write_byte_tokenizer(out_dir: Path) -> int:
    """Byte-level BPE with no merges: every byte is one token. Returns the vocabulary size."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from tokenizers.pre_tokenizers import ByteLevel

    vocab = {t: i for i, t in enumerate(SPECIAL_TOKENS)}
    for char in sorted(ByteLevel.alphabet()):
        vocab[char] = len(vocab)
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[], fuse_unk=False))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    tokenizer.save(str(out_dir / "tokenizer.json"))
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<|im_start|>",
        "eos_token": "<|im_end|>",
        "pad_token": "<|im_end|>",
        "unk_token": "<|endoftext|>",
        "chat_template": CHAT_TEMPLATE,
        "add_bos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 1024,
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2))
    return len(vocab)


def write_tiny_model(out_dir: Path, seed: int = 0) -> Path:
    """Write the tiny model folder at ``out_dir`` (atomically; an existing folder is kept as is)."""
    from mlx_lm.models import llama

    if out_dir.exists():
        return out_dir
    tmp_dir = out_dir.with_name(f"{out_dir.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp_dir, ignore_errors=True)
    tmp_dir.mkdir(parents=True)
    try:
        config = tiny_model_config(_write_byte_tokenizer(tmp_dir))
        mx.random.seed(seed)
        model = llama.Model(llama.ModelArgs.from_dict(config))
        weights = dict(tree_flatten(model.parameters()))
        mx.save_safetensors(str(tmp_dir / "model.safetensors"), weights, {"format": "mlx"})
        (tmp_dir / "config.json").write_text(json.dumps(config, indent=2))
        os.rename(tmp_dir, out_dir)
    except OSError:
        if not out_dir.exists():
            raise
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    return out_dir
