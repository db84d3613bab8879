"""Fill an mlx-lm model folder that has only config and tokenizer files with random weights of the same shapes.

    python bench/random_weights.py SRC_FOLDER DST_FOLDER [DTYPE]

For throughput benchmarks on machines where the bundled model package is not installed (random weights cost the
same FLOPs; generations simply run to max_new_tokens). DTYPE (float32, bfloat16, float16) is the dtype the
weights are saved in, float32 by default; ``model.dtype = "auto"`` then runs them in it off the CPU (the CPU
backend always runs float32), so pass the checkpoint's own (bfloat16 for SmolLM2) for GPU benchmarks.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten


def main(src: Path, dst: Path, dtype: str = "float32") -> None:
    from mlx_lm.models import llama

    dst.mkdir(parents=True, exist_ok=True)
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(src / name, dst / name)
    config = json.loads((src / "config.json").read_text())
    mx.random.seed(0)
    model = llama.Model(llama.ModelArgs.from_dict(config))
    model.set_dtype(getattr(mx, dtype))
    mx.save_safetensors(str(dst / "model.safetensors"), dict(tree_flatten(model.parameters())))


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]), *sys.argv[3:4])
