"""Data-parallel learner ranks over ``mlx.distributed`` (ring by default): gradient and statistic averaging.

Only learner processes ever join the group; actors talk to their rank over ZeroMQ. Every rank runs the same
number of minibatch steps per update (equal batch sizes are enforced by the config), so collectives line up.
"""

from __future__ import annotations

import faulthandler
import json
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np

logger = logging.getLogger(__name__)


_timeout_s: float | None = None  # set by init_group: this process is one of several ranks


@contextmanager
def collective(what: str, timeout_s: float | None = None) -> Iterator[None]:
    """Guard a section that waits on other ranks: past the timeout, print every thread's stack and exit 1.

    A blocked MLX collective holds the GIL, so no Python thread or signal handler could step in; faulthandler's
    C-level watchdog can (the stack it prints names the section). The launcher then stops the run. A no-op
    without a group.
    """
    if _timeout_s is None:
        yield
        return
    faulthandler.dump_traceback_later(timeout_s or _timeout_s, exit=True)
    try:
        yield
    except BaseException:
        logger.error("%s failed", what)
        raise
    finally:
        faulthandler.cancel_dump_traceback_later()


def init_group(backend: str = "ring", timeout_s: float = 120.0, join_timeout_s: float = 300.0) -> Any | None:
    """The distributed group when this process was started as one of several ranks, else None.

    Joining waits up to ``join_timeout_s`` for the other ranks; later collectives up to ``timeout_s`` each.
    """
    global _timeout_s
    if not os.environ.get("MLX_HOSTFILE") and not os.environ.get("MLX_WORLD_SIZE"):
        return None
    _timeout_s = timeout_s
    logger.info("joining the other learner ranks (up to %.0f s)", join_timeout_s)
    with collective("joining the learner ranks", join_timeout_s):
        group = mx.distributed.init(strict=True, backend=backend)
        mx.eval(mx.distributed.all_sum(mx.array(1.0), group=group))  # every rank is really there
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
    with collective("an all-reduce of statistics"):
        summed = mx.distributed.all_sum(mx.array(values.astype(np.float32)), group=group)
        return np.array(summed, dtype=np.float64)


def mean_over_ranks(value: float, group: Any | None) -> float:
    """Mean of a Python scalar over the ranks, e.g. so every rank takes the same early-stop decision."""
    if group is None:
        return value
    with collective("an all-reduce of statistics"):
        return (mx.distributed.all_sum(mx.array(value, dtype=mx.float32), group=group) / group.size()).item()
