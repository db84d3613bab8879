"""PPO losses on MLX arrays: pure functions, each returning ``(loss, stats)``; stats stay lazy ``mx.array``s.

Shapes: ``B`` sequences x ``T`` response tokens, ``mask`` 1 on real tokens. Losses are token sums divided by
``num_tokens`` (default: the mask's count), so that micro-batches of one minibatch can be summed to exactly the
minibatch loss when each is given the minibatch's token count.

Off-policy data uses the decoupled PPO objective (Hilton et al. 2022, arXiv:2110.00641): the clipped ratio is
``pi_new / pi_proximal`` where ``pi_proximal`` is the policy at the start of this update, and each token is
weighted by the truncated importance weight ``min(pi_proximal / pi_behaviour, is_cap)``. When the data is on
policy (behaviour = proximal) the weight is 1 and this is exactly PPO (Schulman et al. 2017, arXiv:1707.06347).
"""

from __future__ import annotations

import mlx.core as mx

from common import cpu_ops


def masked_sum_over(x: mx.array, mask: mx.array, num_tokens: mx.array | float | None = None) -> mx.array:
    """``sum(x * mask) / num_tokens`` (``num_tokens`` defaults to ``mask.sum()``, at least 1)."""
    denominator = mx.maximum(mask.sum(), 1.0) if num_tokens is None else num_tokens
    return (x * mask).sum() / denominator


def policy_loss(
    new_logprobs: mx.array,
    proximal_logprobs: mx.array,
    behaviour_logprobs: mx.array,
    advantages: mx.array,
    mask: mx.array,
    clip_coef: float,
    is_cap: float = 2.0,
    num_tokens: mx.array | float | None = None,
) -> tuple[mx.array, dict[str, mx.array]]:
    """Clipped surrogate loss (decoupled form); all inputs ``[B, T]``.

    ``loss = sum_t w_t * max(-A_t * rho_t, -A_t * clip(rho_t, 1 - eps, 1 + eps)) / num_tokens`` with
    ``rho_t = exp(new - proximal)`` and ``w_t = min(exp(proximal - behaviour), is_cap)``.

    Stats: ``policy/clipfrac`` (share of tokens where clipping bound), ``policy/approx_kl`` (k3 estimate of
    KL(proximal || new)), ``is/weight_mean``, ``is/weight_max``.
    """
    log_ratio = new_logprobs - proximal_logprobs
    ratio = mx.exp(log_ratio)
    weight = mx.stop_gradient(mx.minimum(mx.exp(proximal_logprobs - behaviour_logprobs), is_cap))
    unclipped = -advantages * ratio
    clipped = -advantages * mx.clip(ratio, 1.0 - clip_coef, 1.0 + clip_coef)
    loss = masked_sum_over(weight * mx.maximum(unclipped, clipped), mask, num_tokens)
    stats = {
        "policy/clipfrac": masked_sum_over((clipped > unclipped).astype(mx.float32), mask, num_tokens),
        "policy/approx_kl": masked_sum_over(mx.stop_gradient(k3(log_ratio)), mask, num_tokens),
        "is/weight_mean": masked_sum_over(weight, mask, num_tokens),
        "is/weight_max": mx.max(mx.where(mask > 0, weight, 0.0)),
    }
    return loss, stats


def k3(log_ratio: mx.array) -> mx.array:
    """Schulman's k3 term ``exp(r) - r - 1`` of a log-ratio ``r = log q/p`` on samples of p (any shape):
    unbiased for KL(p || q), never negative."""
    return mx.exp(log_ratio) - log_ratio - 1.0


def reference_kl_loss(
    new_logprobs: mx.array,
    ref_logprobs: mx.array,
    mask: mx.array,
    num_tokens: mx.array | float | None = None,
) -> mx.array:
    """KL(pi_new || pi_ref) as a loss term (GRPO, Shao et al. 2024, arXiv:2402.03300, eq. 4); inputs ``[B, T]``.

    Per token the unbiased, non-negative k3 estimator ``exp(ref - new) - (ref - new) - 1`` on tokens sampled
    from the policy. Unlike a KL penalty folded into the reward, it is not cancelled by group normalisation:
    every sample of a group that drifts from the reference pays for it.
    """
    return masked_sum_over(k3(ref_logprobs - new_logprobs), mask, num_tokens)


def value_loss(
    values: mx.array,
    old_values: mx.array,
    returns: mx.array,
    mask: mx.array,
    clip_range: float,
    num_tokens: mx.array | float | None = None,
) -> tuple[mx.array, dict[str, mx.array]]:
    """Clipped value loss ``0.5 * max((V - R)^2, (clip(V, V_old - c, V_old + c) - R)^2)``; inputs ``[B, T]``.

    Stats: ``value/clipfrac`` (share of tokens where the clipped term was larger).
    """
    clipped_values = old_values + mx.clip(values - old_values, -clip_range, clip_range)
    unclipped_error = mx.square(values - returns)
    clipped_error = mx.square(clipped_values - returns)
    loss = 0.5 * masked_sum_over(mx.maximum(unclipped_error, clipped_error), mask, num_tokens)
    stats = {
        "value/clipfrac": masked_sum_over(
            (clipped_error > unclipped_error).astype(mx.float32), mask, num_tokens
        )
    }
    return loss, stats


def token_entropy(logprobs: mx.array) -> mx.array:
    """Entropy of each token distribution: normalised ``[B, T, V]`` log-probs -> ``[B, T]``."""
    return -(cpu_ops.exp(logprobs) * logprobs).sum(axis=-1)


def entropy(logprobs: mx.array, mask: mx.array, num_tokens: mx.array | float | None = None) -> mx.array:
    """Mean entropy of token distributions given as normalised ``[B, T, V]`` log-probs -> scalar (masked)."""
    return masked_sum_over(token_entropy(logprobs), mask, num_tokens)


def explained_variance(values: mx.array, returns: mx.array, mask: mx.array) -> mx.array:
    """``1 - Var(R - V) / Var(R)`` over masked positions (1 = perfect critic, <= 0 = no better than a constant)."""
    count = mx.maximum(mask.sum(), 1.0)
    mean_r = (returns * mask).sum() / count
    var_r = (mx.square(returns - mean_r) * mask).sum() / count
    residual = returns - values
    mean_res = (residual * mask).sum() / count
    var_res = (mx.square(residual - mean_res) * mask).sum() / count
    return 1.0 - var_res / mx.maximum(var_r, 1e-8)
