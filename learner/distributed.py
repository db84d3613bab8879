"""Data-parallel learner ranks over ``mlx.distributed`` (ring by default): gradient and statistic averaging.

Only learner processes ever join the group; actors talk to their rank over ZeroMQ. Every rank runs the same
number of minibatch steps per update (equal batch sizes are enforced by the config), so collectives line up.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np

logger = logging.getLogger(__name__)


def init_group(backend: str = "ring") -> Any | None:
    """The distributed group when this process was started as one of several ranks, else None."""
    if not os.environ.get("MLX_HOSTFILE") and not os.environ.get("MLX_WORLD_SIZE"):
        return None
    group = mx.distributed.init(strict=True, backend=backend)
    logger.info("learner rank %d of %d (%s backend)", group.rank(), group.size(), backend)
    return group


def write_ring_hostfile(path: Path, host: str, ports: list[int]) -> Path:
    """A ring hostfile (``mlx.launch``'s format) with one ``host:port`` per rank."""
    path.write_text(json.dumps([[f"{host}:{port}"] for port in ports]))
    return path


def average_gradients(grads: Any, group: Any | None) -> Any:
    """Mean of ``grads`` over the ranks (unchanged without a group)."""
    return grads if group is None else nn.average_gradients(grads, group=group)


def sum_over_ranks(values: np.ndarray, group: Any | None) -> np.ndarray:
    """Elementwise sum of a small float array over the ranks (unchanged without a group)."""
    if group is None:
        return values
    summed = mx.distributed.all_sum(mx.array(values.astype(np.float32)), group=group)
    return np.array(summed, dtype=np.float64)


def mean_over_ranks(value: float, group: Any | None) -> float:
    """Mean of a Python scalar over the ranks, e.g. so every rank takes the same early-stop decision."""
    if group is None:
        return value
    return (mx.distributed.all_sum(mx.array(value, dtype=mx.float32), group=group) / group.size()).item()
