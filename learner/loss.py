"""The PPO loss on MLX arrays: pure functions, each returning ``(loss, stats)`` (stats stay lazy ``mx.array``s),
and ``ppo_objective``, the minibatch loss they make up, with its ``LossSettings``.

Shapes: ``B`` sequences x ``T`` response tokens. ``mask`` is 1 on real tokens; ``weights`` are the loss
aggregation's per-token weights (``learner/aggregation.py``: the mask, or the mask over each sequence's length).
A loss is ``sum(per_token * weights) / normaliser``, the normaliser being the *whole minibatch's* (every
micro-batch of every rank), so that micro-batches and ranks add up to exactly the minibatch loss.

Off-policy data uses the decoupled PPO objective (Hilton et al. 2022, arXiv:2110.00641): the clipped ratio is
``pi_new / pi_proximal`` where ``pi_proximal`` is the policy at the start of this update, and each token is
weighted by a correction of the importance weight ``pi_proximal / pi_behaviour`` (``importance_weights``).
When the data is on policy (behaviour = proximal) the weight is 1 and this is exactly PPO (Schulman et al. 2017,
arXiv:1707.06347).
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx

from common import cpu_ops
from common.config import PPOUpdateConfig
from common.logprobs import sampling_logprobs, token_logprobs
from learner.kl_estimators import k2, k3
from learner.models import PolicyAndValue
from learner.vocab_pass import chunked_logprobs_and_entropy, chunked_token_logprobs, flat, head_weight


def masked_sum_over(x: mx.array, mask: mx.array, num_tokens: mx.array | float | None = None) -> mx.array:
    """``sum(x * mask) / num_tokens`` (``num_tokens`` defaults to ``mask.sum()``, at least 1); positions outside
    the mask count 0 even where ``x`` is inf or NaN there (padding)."""
    denominator = mx.maximum(mask.sum(), 1.0) if num_tokens is None else num_tokens
    return mx.where(mask != 0, x * mask, 0.0).sum() / denominator


@dataclass(frozen=True)
class Clip:
    """The surrogate's clip: ratio kept in ``[1 - low, 1 + high]``; ``dual`` > 1 bounds negative-advantage
    tokens' loss by ``dual * |A|`` (dual-clip PPO, Ye et al. 2020, arXiv:1912.09729); 0 leaves it off."""

    low: float = 0.2
    high: float = 0.2
    dual: float = 0.0


def token_ratio(new_logprobs: mx.array, proximal_logprobs: mx.array, mask: mx.array) -> mx.array:
    """PPO's per-token ratio ``exp(new - proximal)``: ``[B, T]`` -> ``[B, T]``."""
    return mx.exp(new_logprobs - proximal_logprobs)


def sequence_ratio(new_logprobs: mx.array, proximal_logprobs: mx.array, mask: mx.array) -> mx.array:
    """GSPO's ratio (Zheng et al. 2025, arXiv:2507.18071, GSPO-token form), ``[B, T]`` -> ``[B, T]``.

    ``s_i = exp(mean_t (new - proximal))`` over each sequence's tokens; token ``t`` carries
    ``sg(s_i) * pi(y_t) / sg(pi(y_t))``: its value is ``s_i`` (clipped per sequence) and its gradient is
    ``s_i * grad log pi(y_t)``, so with a sequence-level advantage and the ``seq_mean_token_mean`` aggregation the
    gradient is GSPO's ``s_i * A_i * mean_t grad log pi(y_t)``.
    """
    lengths = mx.maximum(mask.sum(axis=1, keepdims=True), 1.0)
    mean_log_ratio = ((new_logprobs - proximal_logprobs) * mask).sum(axis=1, keepdims=True) / lengths
    return mx.stop_gradient(mx.exp(mean_log_ratio)) * mx.exp(new_logprobs - mx.stop_gradient(new_logprobs))


def importance_weights(
    proximal_logprobs: mx.array,
    behaviour_logprobs: mx.array,
    mask: mx.array,
    correction: str = "truncate",
    cap: float = 2.0,
    low: float = 0.5,
    high: float = 2.0,
    per_sequence: bool = False,
) -> tuple[mx.array, mx.array]:
    """Per-token off-policy weights from ``w = pi_proximal / pi_behaviour``: ``[B, T]`` -> ``(weights, kept)``.

    - ``truncate``: ``min(w, cap)`` (truncated IS, as in IMPALA's V-trace and verl's TIS; AReaL drops tokens past the cap), every token kept;
    - ``token_mask``: ``w`` where ``low <= w <= high``, else 0 (IcePop, Ling team 2025: tokens whose sampler and
      trainer disagree too much are left out rather than reweighted);
    - ``sequence_mask``: a sequence whose geometric-mean ``w`` (``exp(mean_t log w)``, length-neutral) is outside
      ``[low, high]`` is left out whole; kept tokens weigh ``min(w, cap)``.

    ``kept`` is 1 where a token stays in the loss. Both are constants for the gradient. ``per_sequence`` (GSPO's
    sequence-level ratio) replaces each token's ``w`` by its sequence's geometric mean first, so the correction
    adds no token-level variance back.
    """
    log_w = proximal_logprobs - behaviour_logprobs
    if per_sequence:
        lengths = mx.maximum(mask.sum(axis=1, keepdims=True), 1.0)
        log_w = mx.broadcast_to((log_w * mask).sum(axis=1, keepdims=True) / lengths, log_w.shape)
    w = mx.exp(log_w)
    if correction == "truncate":
        return mx.stop_gradient(mx.minimum(w, cap)), mx.ones_like(w)
    if correction == "token_mask":
        kept = ((w >= low) & (w <= high)).astype(mx.float32)
        return mx.stop_gradient(w * kept), kept
    if correction == "sequence_mask":
        lengths = mx.maximum(mask.sum(axis=1, keepdims=True), 1.0)
        geometric = mx.exp((log_w * mask).sum(axis=1, keepdims=True) / lengths)
        kept = mx.broadcast_to(((geometric >= low) & (geometric <= high)).astype(mx.float32), w.shape)
        return mx.stop_gradient(mx.minimum(w, cap) * kept), kept
    raise ValueError(f"unknown importance correction {correction!r}")


def policy_loss(
    ratio: mx.array,
    advantages: mx.array,
    is_weights: mx.array,
    weights: mx.array,
    normaliser: mx.array | float,
    clip: Clip = Clip(),
) -> mx.array:
    """Clipped surrogate (decoupled form); inputs ``[B, T]`` (``ratio`` from ``token_ratio`` or ``sequence_ratio``).

    ``loss = sum_t is_w_t * weights_t * max(-A_t * rho_t, -A_t * clip(rho_t, 1 - low, 1 + high)) / normaliser``,
    and with a dual clip ``c``: for ``A_t < 0`` the per-token term is ``min(that, -c * A_t)``.
    """
    unclipped = -advantages * ratio
    clipped = -advantages * mx.clip(ratio, 1.0 - clip.low, 1.0 + clip.high)
    per_token = mx.maximum(unclipped, clipped)
    if clip.dual > 0:
        per_token = mx.where(advantages < 0, mx.minimum(per_token, -clip.dual * advantages), per_token)
    return masked_sum_over(is_weights * per_token, weights, normaliser)


def policy_stats(
    ratio: mx.array,
    advantages: mx.array,
    is_weights: mx.array,
    kept: mx.array,
    mask: mx.array,
    num_tokens: mx.array | float,
    clip: Clip = Clip(),
) -> dict[str, mx.array]:
    """Token means (token sums / ``num_tokens``): ``policy/clipfrac`` (share of tokens where a clip bound),
    ``policy/approx_kl`` (k3 estimate of KL(proximal || new)), ``is/weight_mean``, ``is/masked_frac`` (share
    of tokens the correction left out), and ``is/weight_max``."""
    ratio = mx.stop_gradient(ratio)
    bounded = (ratio < 1.0 - clip.low) & (advantages < 0) | (ratio > 1.0 + clip.high) & (advantages > 0)
    stats = {}
    if clip.dual > 0:  # negative-advantage tokens whose loss the dual clip bounded (verl's pg_clipfrac_lower)
        dual = (advantages < 0) & (ratio > clip.dual)
        stats["policy/dual_clipfrac"] = masked_sum_over(dual.astype(mx.float32), mask, num_tokens)
    return stats | {
        "policy/clipfrac": masked_sum_over(bounded.astype(mx.float32), mask, num_tokens),
        "policy/approx_kl": masked_sum_over(k3(-mx.log(ratio)), mask, num_tokens),
        "is/weight_mean": masked_sum_over(is_weights, mask, num_tokens),
        "is/masked_frac": masked_sum_over(1.0 - kept, mask, num_tokens),
        "is/weight_max": mx.max(mx.where(mask > 0, is_weights, 0.0)),
    }


K3_LOSS_CAP = 10.0
"""The largest per-token k3 of the KL loss (verl clamps ``low_var_kl`` to [-10, 10]; k3 is never negative)."""


def reference_kl_loss(
    new_logprobs: mx.array,
    ref_logprobs: mx.array,
    weights: mx.array,
    normaliser: mx.array | float | None = None,
    estimator: str = "k2",
) -> mx.array:
    """KL(pi_new || pi_ref) as a loss term (GRPO, Shao et al. 2024, arXiv:2402.03300, eq. 4); inputs ``[B, T]``.

    Per token ``k2`` or ``k3`` of ``r = new - ref`` on tokens sampled from the policy (docs/algorithms.md:
    k2's gradient is the exact KL gradient, k3's the reverse KL's; k1 has none). Unlike a KL penalty in the
    reward it is not cancelled by group normalisation: every sample that drifts from the reference pays.
    k3 is capped at ``K3_LOSS_CAP`` as in verl (``low_var_kl``): ``exp(-r)`` of a token far below the reference
    would otherwise dominate the loss (r = -5: 142) with a gradient to match.
    """
    per_token = {"k2": k2, "k3": k3}[estimator](new_logprobs - ref_logprobs)
    if estimator == "k3":
        per_token = mx.minimum(per_token, K3_LOSS_CAP)
    return masked_sum_over(per_token, weights, normaliser)


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


@dataclass(frozen=True)
class LossSettings:
    """The objective's settings (``[ppo]``), as the compiled step reads them: a frozen record of one field per
    option the loss reads (14), no behaviour."""

    temperature: float
    clip: Clip
    value_clip: float
    vf_coef: float
    ent_coef: float
    is_cap: float
    kl_loss_coef: float = 0.0
    """Weight of ``reference_kl_loss`` in the loss (needs ``mb["ref"]``); 0 leaves it out."""
    proximal_in_step: bool = False
    """The update is one gradient step, so the proximal policy (the weights at the start of the update) is the
    policy of this very forward pass: use its log-probs, detached, instead of a separate no-grad pass."""
    kl_loss_estimator: str = "k2"
    policy_ratio: str = "token"
    """'token' (PPO) or 'sequence' (GSPO)."""
    is_correction: str = "truncate"
    is_low: float = 0.5
    is_high: float = 2.0
    vocab_chunk: int = 0
    """Response tokens per chunk of the vocabulary pass (learner/vocab_pass.py); 0: the plain pass."""

    @classmethod
    def from_config(cls, cfg: PPOUpdateConfig, temperature: float, proximal_in_step: bool) -> LossSettings:
        """The settings of ``cfg`` (``[ppo]``) at the sampling ``temperature``."""
        return cls(
            temperature,
            Clip(cfg.clip_low or cfg.clip_coef, cfg.clip_high or cfg.clip_coef, cfg.dual_clip),
            cfg.value_clip,
            cfg.vf_coef,
            cfg.ent_coef,
            cfg.is_cap,
            cfg.kl_loss_coef,
            proximal_in_step,
            cfg.kl_loss_estimator,
            cfg.policy_ratio,
            cfg.is_correction,
            cfg.is_low,
            cfg.is_high,
            cfg.vocab_chunk,
        )


def proximal_stats(entropies: mx.array, proximal: mx.array, mb: dict[str, mx.array]) -> dict[str, mx.array]:
    """Entropy of the proximal policy and its k3 KL to the behaviour policy, as token sums / ``num_tokens``."""
    n, mask = mb["num_tokens"], mb["mask"]
    return {
        "policy/entropy": masked_sum_over(entropies, mask, n),
        "mismatch/behaviour_proximal_kl": masked_sum_over(k3(mb["behaviour"] - proximal), mask, n),
    }


def policy_outputs(container: PolicyAndValue, mb: dict[str, mx.array], w: LossSettings):
    """``([b, T] log-probs of the responses, values or None, () -> [b, T] detached entropies, [b, T, V] logits or
    None)``: through the chunked vocabulary pass when ``w.vocab_chunk`` > 0 and nothing needs the whole logits
    (the entropy bonus does), else the plain one."""
    weight = head_weight(container.policy) if w.vocab_chunk > 0 and w.ent_coef == 0 else None
    if weight is None:
        logits, values = container.response_outputs(mb["tokens"], mb["positions"])

        def plain_entropy() -> mx.array:
            return token_entropy(sampling_logprobs(mx.stop_gradient(logits), w.temperature))

        return token_logprobs(logits, mb["response"], w.temperature), values, plain_entropy, logits
    hidden, values = container.response_hidden(mb["tokens"], mb["positions"])
    shape, h, targets = mb["response"].shape, flat(hidden), flat(mb["response"]).astype(mx.int32)
    logprobs = chunked_token_logprobs(w.temperature, w.vocab_chunk)(h, weight, targets)[0].reshape(shape)

    def chunked_entropy() -> mx.array:
        detached = mx.stop_gradient(h), mx.stop_gradient(weight)
        return chunked_logprobs_and_entropy(*detached, targets, w.temperature, w.vocab_chunk)[1].reshape(
            shape
        )

    return logprobs, values, chunked_entropy, None


def ppo_objective(
    container: PolicyAndValue, mb: dict[str, mx.array], w: LossSettings
) -> tuple[mx.array, dict[str, mx.array]]:
    """The minibatch loss: clipped surrogate + kl_loss_coef * KL loss - ent_coef * entropy + vf_coef * value loss.

    ``mb`` holds one micro-batch's ``[b, T]`` arrays and two scalars of its whole minibatch: ``normaliser`` (the
    aggregation's, for the policy, KL and entropy terms, whose per-token ``weights`` it also holds) and
    ``num_tokens`` (for the value loss and the token-mean statistics). Full-vocabulary work is kept to what the
    gradient needs: the entropy term (a second pass over ``[B, T, V]``) is only built when ``ent_coef > 0``.
    """
    new_logprobs, values, proximal_entropy, logits = policy_outputs(container, mb, w)
    mask, n, weights, norm = mb["mask"], mb["num_tokens"], mb["weights"], mb["normaliser"]
    proximal = mx.stop_gradient(new_logprobs) if w.proximal_in_step else mb["proximal"]
    ratio = (sequence_ratio if w.policy_ratio == "sequence" else token_ratio)(new_logprobs, proximal, mask)
    sequence_level = w.policy_ratio == "sequence"
    is_weights, kept = importance_weights(
        proximal, mb["behaviour"], mask, w.is_correction, w.is_cap, w.is_low, w.is_high, sequence_level
    )
    loss = policy_loss(ratio, mb["advantages"], is_weights, weights, norm, w.clip)
    stats = policy_stats(ratio, mb["advantages"], is_weights, kept, mask, n, w.clip)
    stats["loss/policy"] = loss
    if w.proximal_in_step:  # what the skipped no-grad pass would have reported
        stats.update(proximal_stats(proximal_entropy(), proximal, mb))
    if w.kl_loss_coef > 0:
        stats["loss/ref_kl"] = reference_kl_loss(new_logprobs, mb["ref"], weights, norm, w.kl_loss_estimator)
        loss = loss + w.kl_loss_coef * stats["loss/ref_kl"]
    if w.ent_coef > 0:
        stats["loss/entropy"] = entropy(sampling_logprobs(logits, w.temperature), weights, norm)
        loss = loss - w.ent_coef * stats["loss/entropy"]
    if values is not None:
        v_loss, v_stats = value_loss(values, mb["old_values"], mb["returns"], mask, w.value_clip, n)
        stats.update(v_stats)
        stats["loss/value"] = v_loss
        loss = loss + w.vf_coef * v_loss
    stats["loss/total"] = loss
    return loss, stats
