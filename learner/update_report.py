"""What an update reports: the statistics of its batch (``batch_stats``, the learner's) and the metrics row of
the service around it (``update_metrics``: throughput, lag, buffer, actors, counters)."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import numpy as np

from learner.buffer import ExperienceBuffer
from learner.experience import Experience
from learner.kl_estimators import kl_estimate
from learner.registry import ActorInfo


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


def update_metrics(
    stats: dict[str, Any],
    lags: np.ndarray,
    step: int,
    clock: tuple[float, float, float],
    actors: Iterable[ActorInfo],
    buffer: ExperienceBuffer,
    in_flight: int,
    sync: dict[str, float],
    counters: dict[str, int],
    curve_denied: int,
) -> dict[str, Any]:
    """The metrics row of update ``step``: the learner's ``stats``, the batch's ``lags`` ``[B]``, the buffer, the
    sequences granted but not received, the snapshot's ``sync`` cost, each actor's last heartbeat and the reject
    counters. ``clock``: ``(started, the last update's end, now)`` in ``time.monotonic`` seconds."""
    started, last_update_end, now = clock
    actors, wall = list(actors), max(now - last_update_end, 1e-9)
    out = {
        "step": step,
        "time_s": now - started,
        "perf/samples_per_s": len(lags) / wall,
        "perf/gen_tokens_per_s": sum(a.gen_tokens_per_s for a in actors),
        "perf/learner_busy_frac": min(stats["perf/update_s"] / wall, 1.0),
        "lag/mean": float(lags.mean()),
        "lag/max": int(lags.max()),
        "lag/dropped": buffer.counters["lag/dropped"],
        "buffer/depth": buffer.depth,
        "rollout/in_flight": in_flight,
        "actors/connected": sum(not a.gone for a in actors),
        **sync,
        **stats,
    }
    for a in actors:  # its own counters, then what the learner knows of it
        own = {"gen_tokens_per_s": a.gen_tokens_per_s, "policy_version": a.policy_version}
        own["heartbeat_age_s"] = now - a.last_seen
        out.update({f"actor/{a.actor_id}/{k}": v for k, v in (a.stats | own).items()})
    out.update(counters)
    out["reject/curve_denied"] = curve_denied
    out.update({k: v for k, v in buffer.counters.items() if k.startswith("reject/")})
    return out
