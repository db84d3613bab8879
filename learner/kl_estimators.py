"""Schulman's estimators of KL(p || q) from a log-ratio ``r = log p - log q`` at samples of p (Schulman 2020,
"Approximating KL Divergence"): written once, for NumPy and MLX arrays alike (any shape, elementwise).

- ``k1 = r``: unbiased, can be negative; the one to put in a *reward* (its score-function gradient is the KL's);
- ``k2 = r^2 / 2``: biased, >= 0; as a per-token *loss* its expected gradient is each token's KL(p || q)'s;
- ``k3 = (e^-r - 1) + r``: unbiased, >= 0, lower variance: the one to *report*. As a loss its expected gradient
  is that of the reverse KL(q || p). ``expm1`` keeps it exact for small ``r`` (no ``1 - 1`` cancellation).
"""

from __future__ import annotations

from typing import Literal, TypeVar

import mlx.core as mx
import numpy as np

KLEstimator = Literal["k1", "k2", "k3"]
Array = TypeVar("Array", np.ndarray, mx.array)


def k1(log_ratio: Array) -> Array:
    """``r`` itself."""
    return log_ratio


def k2(log_ratio: Array) -> Array:
    """``0.5 * r^2``."""
    return 0.5 * (log_ratio * log_ratio)


def k3(log_ratio: Array) -> Array:
    """``expm1(-r) + r`` (never negative)."""
    expm1 = mx.expm1 if isinstance(log_ratio, mx.array) else np.expm1
    return expm1(-log_ratio) + log_ratio


ESTIMATORS = {"k1": k1, "k2": k2, "k3": k3}


def kl_estimate(logprobs: np.ndarray, ref_logprobs: np.ndarray, estimator: KLEstimator = "k1") -> np.ndarray:
    """Per-token estimate of KL(policy || reference) at sampled tokens: ``[B, T]`` log-probs -> ``[B, T]`` float32
    (computed in float64), with ``r = log pi - log pi_ref``."""
    if estimator not in ESTIMATORS:
        raise ValueError(f"unknown KL estimator {estimator!r}: use 'k1', 'k2' or 'k3'")
    log_ratio = (np.asarray(logprobs) - np.asarray(ref_logprobs)).astype(np.float64)
    return ESTIMATORS[estimator](log_ratio).astype(np.float32)
