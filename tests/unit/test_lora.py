import json
import subprocess
import sys

import mlx.core as mx
import mlx.nn as nn
import pytest
from mlx.utils import tree_flatten
from mlx_lm import load as mlx_lm_load

from common.config import LoraConfig, ModelConfig
from common.lora import (
    adapter_weights,
    adapters_disabled,
    attach_lora,
    load_adapter_weights,
    load_adapters,
    save_adapters,
)
from common.models import load_model

TOKENS = mx.array([[1, 40, 41, 42, 43, 44, 2]])


SMALL_LORA = LoraConfig(rank=4, alpha=8.0)


def _adapted_model(model_cache, seed=0, cfg=SMALL_LORA):
    """The tiny model with LoRA whose B matrices are non-zero, so the adapters change the output."""
    loaded = load_model(ModelConfig(name="tiny", cache_dir=str(model_cache)))
    base_logits = loaded.model(TOKENS)
    attach_lora(loaded.model, cfg)
    mx.random.seed(seed)
    loaded.model.load_weights(
        [(k, mx.random.normal(v.shape) * 0.1) for k, v in adapter_weights(loaded.model).items()], strict=False
    )
    return loaded, base_logits


def test_only_adapters_are_trainable(model_cache):
    loaded, _ = _adapted_model(model_cache)
    trainable = dict(tree_flatten(loaded.model.trainable_parameters()))
    assert trainable and all(k.rsplit(".", 1)[-1] in ("lora_a", "lora_b") for k in trainable)
    # 2 blocks x 7 linear layers x (A and B)
    assert len(trainable) == 2 * 7 * 2
    assert trainable["model.layers.0.self_attn.q_proj.lora_a"].shape == (64, 4)


def test_keys_and_num_layers_select_layers(model_cache):
    loaded = load_model(ModelConfig(name="tiny", cache_dir=str(model_cache)))
    attach_lora(loaded.model, LoraConfig(rank=2, num_layers=1, keys=("self_attn.q_proj", "self_attn.v_proj")))
    names = sorted(adapter_weights(loaded.model))
    assert names == [f"model.layers.1.self_attn.{p}.lora_{m}" for p in ("q_proj", "v_proj") for m in "ab"]
    fresh = load_model(ModelConfig(name="tiny", cache_dir=str(model_cache)))
    with pytest.raises(ValueError, match="name no module"):
        attach_lora(fresh.model, LoraConfig(keys=("self_attn.nope",)))


def test_disabled_adapters_give_the_base_model(model_cache):
    loaded, base_logits = _adapted_model(model_cache)
    adapted = loaded.model(TOKENS)
    assert not mx.allclose(adapted, base_logits, atol=1e-4).item()
    with adapters_disabled(loaded.model):
        assert mx.allclose(loaded.model(TOKENS), base_logits, atol=1e-6).item()
    assert mx.allclose(loaded.model(TOKENS), adapted).item()  # scales restored


def test_save_load_round_trip(model_cache, tmp_path):
    cfg = LoraConfig(rank=4, alpha=8.0)
    loaded, _ = _adapted_model(model_cache, cfg=cfg)
    save_adapters(loaded.model, tmp_path, cfg)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["fine_tune_type"] == "lora" and saved["lora_parameters"]["scale"] == 2.0
    other = load_model(ModelConfig(name="tiny", cache_dir=str(model_cache)))
    attach_lora(other.model, cfg)
    load_adapters(other.model, tmp_path)
    assert mx.allclose(other.model(TOKENS), loaded.model(TOKENS)).item()
    with pytest.raises(ValueError, match="do not fit"):
        load_adapter_weights(other.model, {"model.layers.0.self_attn.q_proj.lora_a": mx.zeros((3, 3))})


def test_mlx_lm_loads_and_fuses_what_we_save(model_cache, tmp_path):
    cfg = LoraConfig(rank=4, alpha=8.0)
    loaded, _ = _adapted_model(model_cache, cfg=cfg)
    expected = loaded.model(TOKENS)
    adapter_dir = save_adapters(loaded.model, tmp_path / "adapters", cfg)
    theirs, _ = mlx_lm_load(str(loaded.path), adapter_path=str(adapter_dir))
    assert mx.allclose(theirs(TOKENS), expected, atol=1e-5).item()

    fused_dir = tmp_path / "fused"
    fuse = [sys.executable, "-m", "mlx_lm", "fuse", "--model", str(loaded.path)]
    fuse += ["--adapter-path", str(adapter_dir), "--save-path", str(fused_dir)]
    subprocess.run(fuse, check=True, capture_output=True, timeout=300)
    fused, _ = mlx_lm_load(str(fused_dir))
    assert mx.allclose(fused(TOKENS), expected, atol=1e-4).item()

    gen = [sys.executable, "-m", "mlx_lm", "generate", "--model", str(loaded.path), "--adapter-path"]
    gen += [str(adapter_dir), "--prompt", "hi", "--max-tokens", "4", "--temp", "0"]
    subprocess.run(gen, check=True, capture_output=True, timeout=300)


def test_lora_on_quantized_base(model_cache):
    loaded = load_model(ModelConfig(name="tiny", cache_dir=str(model_cache)))
    nn.quantize(loaded.model, group_size=32, bits=4)
    attach_lora(loaded.model, LoraConfig(rank=4))
    assert isinstance(loaded.model.layers[0].self_attn.q_proj.linear, nn.QuantizedLinear)

    def loss_fn(model):
        return nn.losses.cross_entropy(model(TOKENS[:, :-1]), TOKENS[:, 1:]).mean()

    loss, grads = nn.value_and_grad(loaded.model, loss_fn)(loaded.model)
    grads = dict(tree_flatten(grads))
    assert mx.isfinite(loss).item()
    assert set(grads) == set(adapter_weights(loaded.model))
    assert any(mx.abs(g).sum().item() > 0 for g in grads.values())
