"""What mlx-ppo makes once per machine and keeps: converted models and MLX's compiled GPU kernels.

Both live under ``$MLX_PPO_CACHE`` (default ``~/.cache/mlx-ppo``). The kernels matter on MLX's CUDA backend: it
compiles its fused and elementwise kernels at run time (NVRTC) and keeps them in ``$MLX_PTX_CACHE_DIR``, by
default under ``/tmp``, which a fresh or rebooted machine has empty. Measured on an H200
(``bench/results/h200-warmup.md``): the first learner update took 174 s with an empty cache and 1.5 s in a process
that found the cache filled. Metal keeps its own compiled kernels and the CPU backend compiles none, so there the
setting is unused and harmless; it is set the same way everywhere (no backend-specific path).
"""

from __future__ import annotations

import os
from collections.abc import MutableMapping
from importlib import metadata
from pathlib import Path

KERNEL_CACHE_ENV = "MLX_PTX_CACHE_DIR"
"""The variable MLX's CUDA backend reads for its on-disk kernel cache."""


def machine_cache_dir() -> Path:
    return Path(os.environ.get("MLX_PPO_CACHE") or Path.home() / ".cache" / "mlx-ppo")


def kernel_cache_dir() -> Path:
    """``<machine cache>/kernels/mlx-<version>``: kernels compiled by one MLX release are not reused by another."""
    try:
        version = metadata.version("mlx")
    except metadata.PackageNotFoundError:
        version = "unknown"
    return machine_cache_dir() / "kernels" / f"mlx-{version}"


def keep_compiled_kernels(environ: MutableMapping[str, str] = os.environ) -> str:
    """Point MLX's kernel cache at ``kernel_cache_dir()`` unless the user chose one; returns the folder in use.

    Call it before MLX compiles anything (the launcher does, first thing, so every process it starts inherits
    it)."""
    if not environ.get(KERNEL_CACHE_ENV):
        environ[KERNEL_CACHE_ENV] = str(kernel_cache_dir())
    return environ[KERNEL_CACHE_ENV]
