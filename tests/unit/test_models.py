import json
import os
import subprocess
import sys

import mlx.core as mx
import pytest
from mlx_lm import generate

from common.config import ModelConfig
from common.models import ModelLoadError, load_model, resolve_model_folder


def test_tiny_model_builds_deterministically(tiny, model_cache, tmp_path):
    tokens = mx.array([[1, 5, 9, 200]])
    logits = tiny.model(tokens)
    assert logits.shape == (1, 4, tiny.model.args.vocab_size)
    assert tiny.dtype == mx.float32
    # A second build from scratch (another cache) gives the same weights: seeded.
    other = load_model(ModelConfig(name="tiny", cache_dir=str(tmp_path)))
    assert mx.allclose(other.model(tokens), logits).item()


@pytest.mark.parametrize("which", ["tiny", "smollm"])
def test_tokenizer_round_trip_and_chat_template(which, request):
    tok = request.getfixturevalue(which).tokenizer
    text = "Hello, world! 12345 café\nnew line"
    assert tok.decode(tok.encode(text)) == text
    ids = tok.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True)
    rendered = tok.decode(ids)
    assert "<|im_start|>user\nHi<|im_end|>" in rendered
    assert rendered.endswith("<|im_start|>assistant\n")
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    assert im_end in tok.eos_token_ids
    assert tok.encode("<|im_end|>") == [im_end]  # special tokens are single tokens


def test_bundled_tokenizer_matches_smollm2(smollm):
    tok = smollm.tokenizer
    # Digits are split one by one, as in SmolLM2's own tokenizer.
    assert len(tok.encode("12345")) == 5
    assert tok.convert_tokens_to_ids("<|im_start|>") == 1 and tok.eos_token_id == 2


def test_bundled_model_answers_paris(smollm):
    tok = smollm.tokenizer
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}], add_generation_prompt=True
    )
    answer = generate(smollm.model, tok, prompt, max_tokens=24)
    assert "Paris" in answer
    assert smollm.dtype == mx.float32  # CPU runs float32


def test_unknown_name_says_what_was_tried():
    with pytest.raises(ModelLoadError) as err:
        resolve_model_folder("no-such-model")
    message = str(err.value)
    assert "no-such-model" in message and "--model default" in message and "org/name" in message


def test_file_instead_of_folder(tmp_path):
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(b"x")
    with pytest.raises(ModelLoadError, match="pass the mlx-lm model folder"):
        load_model(ModelConfig(name=str(weights)))


def test_corrupt_folder_is_explained(tiny, tmp_path):
    folder = tmp_path / "broken"
    folder.mkdir()
    for f in tiny.path.iterdir():
        (folder / f.name).write_bytes(f.read_bytes())
    (folder / "model.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(ModelLoadError, match="could not load the model folder"):
        load_model(ModelConfig(name=str(folder)))
    (folder / "config.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match="config.json"):
        load_model(ModelConfig(name=str(folder)))


def test_empty_folder_is_explained(tmp_path):
    with pytest.raises(ModelLoadError, match="needs config.json"):
        load_model(ModelConfig(name=str(tmp_path)))


def test_unreachable_hub_id_is_explained(tmp_path):
    # Offline mode makes the hub refuse at once; the message must point at the offline fixes.
    code = (
        "from common.config import ModelConfig\n"
        "from common.models import ModelLoadError, load_model\n"
        "try:\n    load_model(ModelConfig(name='nobody-here/no-model'))\n"
        "except ModelLoadError as e:\n    print('ERR', e)\n"
    )
    env = {"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path), "PATH": "/usr/bin:/bin"}
    env |= {
        k: os.environ[k] for k in ("PYTHONPATH", "MLX_ENABLE_TF32") if k in os.environ
    }  # as run on a GPU host
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert "ERR could not fetch 'nobody-here/no-model'" in out.stdout, out.stderr
    assert "--model default" in out.stdout


def test_converted_folder_is_plain_mlx_lm(smollm):
    config = json.loads((smollm.path / "config.json").read_text())
    assert config["model_type"] == "llama" and config["num_hidden_layers"] == 30
    assert config["tie_word_embeddings"] is True and config["rope_theta"] == 100000.0
