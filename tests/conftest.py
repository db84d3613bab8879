"""Shared fixtures: real (tiny or bundled) MLX models, loaded once per test session."""

from __future__ import annotations

import os
from pathlib import Path

# MLX's CUDA backend multiplies float32 matrices in TF32 unless told otherwise (about 1e-3 relative error);
# the tests compare float32 results to 1e-4 and run exactly on a GPU as on the CPU. Child processes inherit it.
os.environ.setdefault("MLX_ENABLE_TF32", "0")

import pytest

from common.config import ModelConfig
from common.models import LoadedModel, load_model
from common.transport import zmq_context
from tests.helpers import Harness, small_config


@pytest.fixture(scope="session")
def model_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh cache for models the tests build themselves (the tiny model)."""
    return tmp_path_factory.mktemp("model-cache")


@pytest.fixture(scope="session")
def tiny(model_cache: Path) -> LoadedModel:
    return load_model(ModelConfig(name="tiny", cache_dir=str(model_cache)))


@pytest.fixture(scope="session")
def smollm() -> LoadedModel:
    """The bundled SmolLM2-135M-Instruct, converted into the user's cache once per machine."""
    return load_model(ModelConfig(name="default"))


@pytest.fixture
def harness(model_cache, tmp_path):
    """An in-process learner over the small config (10 updates); make actors with ``harness.actor(i)``."""
    with zmq_context() as ctx:
        h = Harness(small_config(model_cache, tmp_path, "run.max_updates=10"), ctx)
        yield h
        h.close()
