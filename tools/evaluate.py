"""Evaluation of a policy on held-out prompts: mean reward, KL to the reference, sample completions.

Runs in one process with the actor's own parts (sampler, reward, reference pass), on a run's saved adapters or
on any adapter folder: ``mlx-ppo eval RUN_DIR --prompts held_out.jsonl``. Results go to
``<out_dir>/eval.json`` (numbers) and ``<out_dir>/samples.jsonl`` (every prompt, completion, reward, KL).
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from actors.actor import sequence_seed
from actors.reference import reference_logprobs
from actors.rewards import encode_prompts
from actors.sampler import SamplingParams, generate_completions
from common.config import Config

logger = logging.getLogger(__name__)

BatchScorer = Callable[[list[str], list[str]], list[float]]
EVAL_SEED = 7_919  # evaluation samples differ from training samples of the same run seed


def sequence_kl(logprobs: np.ndarray, ref_logprobs: np.ndarray) -> float:
    """KL(policy || reference) of one sampled sequence, estimated as sum_t (log pi - log pi_ref) (k1).

    Args:
        logprobs: ``[T]`` log-probs of the sampled tokens under the policy (the sampling distribution).
        ref_logprobs: ``[T]`` log-probs of the same tokens under the reference (adapters off).
    """
    return float(np.sum(logprobs - ref_logprobs))


def summarize(rewards: Sequence[float], kls: Sequence[float], lengths: Sequence[int]) -> dict[str, float]:
    """Mean/std reward over the finite rewards, KL per sequence and per token, response length."""
    finite = [r for r in rewards if math.isfinite(r)]
    tokens = max(sum(lengths), 1)
    return {
        "eval/n": float(len(rewards)),
        "eval/reward_mean": float(np.mean(finite)) if finite else math.nan,
        "eval/reward_std": float(np.std(finite)) if finite else math.nan,
        "eval/reward_failed": float(len(rewards) - len(finite)),
        "eval/kl_to_reference": float(np.mean(kls)) if kls else math.nan,
        "eval/kl_per_token": float(np.sum(kls) / tokens),
        "eval/response_tokens": float(np.mean(lengths)) if lengths else 0.0,
    }


def _load_policy(cfg: Config, adapters: str | Path | None):
    from common.cpu_ops import use_fast_cpu_ops
    from common.lora import attach_lora, load_adapters
    from common.models import load_model

    loaded = load_model(cfg.model)
    attach_lora(loaded.model, cfg.lora)
    if adapters:
        load_adapters(loaded.model, adapters)
    use_fast_cpu_ops(loaded.model)
    return loaded


def evaluate_batch(
    loaded, cfg: Config, start: int, batch: list[list[int]], texts: Sequence[str], score: BatchScorer
) -> list[dict[str, Any]]:
    """One batch of prompt ids (``batch``, the prompts from index ``start``): each prompt with its sampled
    completion, reward, KL to the base model and length."""
    stop_ids = set(loaded.tokenizer.eos_token_ids)
    params = SamplingParams.from_config(cfg.sampling)
    seeds = [sequence_seed(cfg.run.seed, EVAL_SEED, start, k) for k in range(len(batch))]
    completions = generate_completions(loaded.model, batch, params, stop_ids, seeds)
    responses = [c.response_ids for c in completions]
    ref = reference_logprobs(loaded.model, batch, responses, params.temperature)
    decoded = [loaded.tokenizer.decode([t for t in r if t not in stop_ids]) for r in responses]
    rewards = score(list(texts[start : start + len(batch)]), decoded)
    return [
        {
            "prompt": texts[start + i],
            "completion": decoded[i],
            "reward": float(rewards[i]),
            "kl": sequence_kl(c.logprobs, ref[i]),
            "tokens": len(c.response_ids),
        }
        for i, c in enumerate(completions)
    ]


def evaluate_policy(
    cfg: Config,
    prompts: Sequence[str],
    score: BatchScorer,
    adapters: str | Path | None = None,
    out_dir: Path | None = None,
) -> dict[str, Any]:
    """Sample one completion per prompt with ``cfg.sampling``, score it, and measure its KL to the base model.

    ``adapters``: an mlx-lm adapter folder (None: fresh adapters, i.e. the base model). Returns the summary
    numbers (``eval/...``) and, under ``"samples"``, each prompt with its completion, reward and KL.
    """
    loaded = _load_policy(cfg, adapters)
    ids, texts = encode_prompts(loaded.tokenizer, prompts, cfg.sampling.max_prompt_tokens)
    samples = []
    for start in range(0, len(ids), cfg.sampling.batch_size):
        batch = ids[start : start + cfg.sampling.batch_size]
        samples += evaluate_batch(loaded, cfg, start, batch, texts, score)
    summary = summarize(
        [s["reward"] for s in samples], [s["kl"] for s in samples], [s["tokens"] for s in samples]
    )
    if out_dir is not None:
        write_results(out_dir, summary, samples, adapters)
    logger.info(
        "evaluated %d prompts: reward %.3f, KL to reference %.3f",
        len(samples),
        summary["eval/reward_mean"],
        summary["eval/kl_to_reference"],
    )
    return {**summary, "samples": samples}


def write_results(out_dir: Path, summary: dict, samples: list[dict], adapters: str | Path | None) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in summary.items()}
    (out_dir / "eval.json").write_text(json.dumps({**clean, "adapters": str(adapters or "")}, indent=2))
    with (out_dir / "samples.jsonl").open("w", encoding="utf-8") as f:
        for sample in samples:
            f.write(json.dumps(sample, ensure_ascii=False) + "\n")
