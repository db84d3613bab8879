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
from mlx.utils import tree_map

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


def world_size(group: Any | None) -> int:
    """Ranks in ``group`` (1 without one)."""
    return 1 if group is None else group.size()


def sum_gradients(grads: Any, group: Any | None) -> Any:
    """Sum of ``grads`` over the ranks (unchanged without a group).

    Each rank's loss is its token sum divided by the *whole* minibatch's normaliser (all ranks), so the gradient
    of the minibatch loss is the sum of the ranks' gradients, not their mean: with unequal lengths per rank a
    mean of per-rank means would weight a rank's tokens by how few it has.
    """
    if group is None:
        return grads
    size = group.size()
    return tree_map(lambda g: g * size, nn.average_gradients(grads, group=group))


def sum_over_ranks(values: np.ndarray, group: Any | None) -> np.ndarray:
    """Elementwise sum of a small float array over the ranks (unchanged without a group)."""
    if group is None:
        return values
    with collective("an all-reduce of statistics"):
        summed = mx.distributed.all_sum(mx.array(values.astype(np.float32)), group=group)
        return np.array(summed, dtype=np.float64)


def sum_stats_over_ranks(
    stats: dict[str, mx.array], group: Any | None, max_keys: tuple[str, ...] = (), local: tuple[str, ...] = ()
) -> dict[str, float]:
    """Scalar statistics as floats, summed over the ranks (``max_keys``: their maximum; ``local``: already the
    same on every rank). Token-sum statistics over the whole minibatch's count add up to the global mean."""
    if group is None:
        return {k: float(v.item()) for k, v in stats.items()}
    summed = [k for k in stats if k not in max_keys and k not in local]
    maxed = [k for k in stats if k in max_keys]
    with collective("an all-reduce of statistics"):
        totals = mx.distributed.all_sum(mx.stack([stats[k] for k in summed]), group=group) if summed else []
        peaks = mx.distributed.all_max(mx.stack([stats[k] for k in maxed]), group=group) if maxed else []
        out = dict(zip(summed, np.array(totals).tolist(), strict=True))
        out |= dict(zip(maxed, np.array(peaks).tolist(), strict=True))
    return out | {k: float(stats[k].item()) for k in local if k in stats}
