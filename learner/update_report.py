"""What an update reports: the statistics of its batch (``batch_stats``, the learner's) and the metrics row of
the service around it (``update_metrics``: throughput, lag, buffer, actors, counters)."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from learner.experience import Experience
from learner.kl_estimators import kl_estimate


def batch_stats(
    exp: Experience,
    mask: np.ndarray,
    behaviour: np.ndarray,
    recomputed: dict[str, np.ndarray],
    ref: np.ndarray | None,
    scores: np.ndarray,
    sum_over_ranks: Callable[[np.ndarray], np.ndarray],
    with_no_grad_stats: bool,
) -> tuple[dict[str, float], float]:
    """Statistics of the whole batch (every rank's) and its number of sequences (every rank's).

    KL to the reference (k3 per sequence, when there is a reference), scores (``scores``: the shaped ones),
    lengths, truncation and, ``with_no_grad_stats``, the behaviour/proximal mismatch and entropy of the no-grad
    pass (``recomputed``; otherwise the step reports them from its forward). ``mask``, ``behaviour``, ``ref``
    and the recomputed arrays are ``[B, T]``.
    """
    proximal = recomputed["proximal"]
    k3_sum = 0.0 if ref is None else (kl_estimate(proximal, ref, "k3") * mask).sum()
    truncated = 0.0 if exp.truncated is None else float(np.sum(exp.truncated))
    sums = [k3_sum, np.sum(exp.scores), np.sum(np.square(exp.scores)), mask.sum(), truncated, exp.size]
    if with_no_grad_stats:
        mismatch = kl_estimate(behaviour, proximal, "k3") * mask
        sums += [mismatch.sum(), (recomputed["entropy"] * mask).sum()]
    sums = sum_over_ranks(np.array(sums, np.float64))
    size, tokens = max(sums[5], 1.0), max(sums[3], 1.0)
    stats = {
        "rollout/score_mean": float(sums[1] / size),
        "rollout/score_std": float(np.sqrt(max(sums[2] / size - (sums[1] / size) ** 2, 0.0))),
        "rollout/response_len_mean": float(sums[3] / size),
        "rollout/truncated_frac": float(sums[4] / size),
        "rollout/shaped_score_mean": float(sum_over_ranks(np.array([scores.sum()]))[0] / size),
    }
    if ref is not None:
        stats["kl/ref_mean"] = float(sums[0] / size)
    if with_no_grad_stats:
        stats["mismatch/behaviour_proximal_kl"] = float(sums[6] / tokens)
        stats["policy/entropy"] = float(sums[7] / tokens)
    return stats, float(sums[5])
