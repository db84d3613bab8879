"""Batched sampling with a KV cache that records the behaviour log-prob of every sampled token.

mlx-lm's generators report log-probs taken *before* temperature and ``batch_generate`` drops the stop token.
PPO needs the log-prob under the distribution that actually drew each token, stop token included, so this
module runs its own decode loop on mlx-lm models and caches:

- prompts are left-padded into one ``BatchKVCache`` (per-row RoPE offsets and masks, so padding is invisible);
- every sequence draws from its own seeded stream of uniforms (inverse-CDF sampling), so its tokens do not depend
  on which batch it was generated in;
- finished rows leave the batch at once; the next step is queued before the host reads the current one
  (``mx.async_eval``), as mlx-lm does, so the device never waits on Python.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from common.config import SamplingConfig
from common.logprobs import gather_token_logprobs, sample_from_logprobs, sample_on_host, sampling_logprobs
from common.models import next_token_logits


@dataclass(frozen=True)
class SamplingParams:
    """How to sample: plain temperature sampling from the whole distribution (the one the learner's ratio reads)."""

    temperature: float = 1.0
    max_new_tokens: int = 64
    prefill_step_size: int = 512
    """Prompt tokens per forward pass during prefill (bounds activation memory for long prompts)."""
    host_sampling: bool | None = None
    """Draw tokens with NumPy on the host (None: exactly when MLX runs on the CPU)."""

    @classmethod
    def from_config(cls, cfg: SamplingConfig) -> SamplingParams:
        return cls(temperature=cfg.temperature, max_new_tokens=cfg.max_new_tokens)


@dataclass
class Completion:
    prompt_ids: list[int]
    response_ids: list[int]
    """Sampled tokens, the stop token included when the sequence stopped on one."""
    logprobs: np.ndarray
    """``[len(response_ids)]`` float32 behaviour log-prob of each response token under the sampling distribution."""
    finish_reason: str
    """'stop' (a stop token was sampled) or 'length' (max_new_tokens reached)."""


def sequence_uniforms(seed: int, n: int) -> np.ndarray:
    """The ``[n]`` uniforms in (0, 1] a sequence with this seed samples with, one per new token.

    ``1 - u`` is taken in float64 and then cast: casting ``u`` in [0, 1) to float32 first rounds about one draw in
    3e7 up to 1.0, and a uniform of 0 would pick token 0 whatever its probability.
    """
    return (1.0 - np.random.default_rng(seed).random(n, dtype=np.float64)).astype(np.float32)


def make_batch_cache(model: nn.Module, left_padding: list[int]) -> list:
    """A batched KV cache for ``model`` whose rows are left-padded by ``left_padding`` tokens."""
    from mlx_lm.models.cache import BatchKVCache, BatchRotatingKVCache, KVCache, RotatingKVCache

    if not hasattr(model, "make_cache"):
        return [BatchKVCache(left_padding) for _ in model.layers]
    batch_cache = []
    for c in model.make_cache():
        if type(c) is KVCache:
            batch_cache.append(BatchKVCache(left_padding))
        elif type(c) is RotatingKVCache and c.keep == 0:
            batch_cache.append(BatchRotatingKVCache(c.max_size, left_padding))
        else:
            raise NotImplementedError(f"batched sampling does not support {type(c).__name__} caches yet")
    return batch_cache


def _prefill(model: nn.Module, tokens: mx.array, cache: list, step: int) -> mx.array:
    """Run the prompt through the cache and return ``[B, V]`` logits of the last position only.

    All but the last prompt token go through the trunk alone, so no ``[B, L, V]`` logits are ever built.
    """
    trunk = getattr(model, "model", None)
    head_start = tokens.shape[1] - 1
    for start in range(0, head_start, step):
        chunk = tokens[:, start : min(start + step, head_start)]
        (trunk or model)(chunk, cache=cache)
        mx.eval([c.state for c in cache])
    return next_token_logits(model, tokens[:, head_start:], cache)[:, -1, :]


def _unique_prompts(prompts: Sequence[Sequence[int]]) -> tuple[list[Sequence[int]], mx.array | None]:
    """Distinct prompts in first-seen order and, per sequence, its prompt's row (None when all differ)."""
    rows: dict[tuple[int, ...], int] = {}
    copies = [rows.setdefault(tuple(p), len(rows)) for p in prompts]
    if len(rows) == len(prompts):
        return list(prompts), None
    return [list(p) for p in rows], mx.array(copies)


def _left_pad(prompts: Sequence[Sequence[int]]) -> tuple[mx.array, list[int]]:
    longest = max(len(p) for p in prompts)
    padding = [longest - len(p) for p in prompts]
    rows = [[0] * pad + list(p) for p, pad in zip(prompts, padding, strict=True)]
    return mx.array(rows, dtype=mx.int32), padding


def _sample_step(logits: mx.array, uniforms: np.ndarray, params: SamplingParams) -> tuple[mx.array, mx.array]:
    """Draw one token per row: ``[B, V]`` logits, ``[B]`` uniforms -> ``[B]`` tokens and their log-probs.

    On the CPU backend the draw runs in NumPy (see ``sample_on_host``); on a GPU it stays on the device, lazy.
    """
    on_host = mx.default_device() == mx.cpu if params.host_sampling is None else params.host_sampling
    if on_host:
        tokens, logprobs = sample_on_host(np.array(logits.astype(mx.float32)), uniforms, params.temperature)
        return mx.array(tokens.astype(np.int32)), mx.array(logprobs)
    logprobs = sampling_logprobs(logits, params.temperature)
    tokens = sample_from_logprobs(logprobs, mx.array(uniforms))
    return tokens, gather_token_logprobs(logprobs, tokens)


def _start_rows(
    model: nn.Module,
    prompts: Sequence[Sequence[int]],
    uniforms: np.ndarray,
    params: SamplingParams,
    share: bool,
    seqs: list[int],
) -> tuple[list, mx.array, mx.array]:
    """Prefill the prompts of sequences ``seqs`` into a new batch cache and draw each row's first token with its
    first uniform: (cache, tokens, log-probs).

    ``share``: a prompt that appears several times (GRPO's group) is prefilled once and its cache rows copied.
    """
    chosen = [prompts[i] for i in seqs]
    unique, copies = _unique_prompts(chosen) if share else (chosen, None)
    padded, padding = _left_pad(unique)
    cache = make_batch_cache(model, padding)
    first_logits = _prefill(model, padded, cache, params.prefill_step_size)
    if copies is not None:  # one row per sequence again: copy each prompt's cache rows and logits
        for c in cache:
            c.filter(copies)
        first_logits = first_logits[copies]
    tokens, token_lp = _sample_step(first_logits, uniforms[seqs, 0], params)
    return cache, tokens, token_lp


def _join_rows(live: tuple, started: tuple) -> tuple[list, mx.array, mx.array]:
    """(cache, next tokens, their log-probs) of the live rows followed by the rows just started."""
    (cache, tokens, token_lp), (new_cache, new_tokens, new_lp) = live, started
    for c, extra in zip(cache, new_cache, strict=True):
        c.extend(extra)
    return cache, mx.concatenate([tokens, new_tokens]), mx.concatenate([token_lp, new_lp])


@dataclass
class _Outputs:
    """What each sequence sampled so far: its tokens, their log-probs, and why it ended."""

    responses: list[list[int]]
    logprobs: list[list[float]]
    finish: list[str]

    @classmethod
    def empty(cls, n: int) -> _Outputs:
        return cls([[] for _ in range(n)], [[] for _ in range(n)], ["length"] * n)

    def record(
        self, tokens: mx.array, token_lp: mx.array, rows: list[int], stop_ids, n_new: int
    ) -> list[int]:
        """Append each live row's token and log-prob to its sequence; the rows that go on (no stop, room left)."""
        keep = []
        for r, (tok, lp) in enumerate(zip(tokens.tolist(), token_lp.tolist(), strict=True)):
            seq = rows[r]
            self.responses[seq].append(tok)
            self.logprobs[seq].append(lp)
            if tok in stop_ids:
                self.finish[seq] = "stop"
            elif len(self.responses[seq]) < n_new:
                keep.append(r)
        return keep

    def completions(self, prompts: Sequence[Sequence[int]]) -> list[Completion]:
        return [
            Completion(
                list(p), self.responses[i], np.asarray(self.logprobs[i], dtype=np.float32), self.finish[i]
            )
            for i, p in enumerate(prompts)
        ]


def _queue_step(model, cache, tokens, uniforms, rows, responses, params: SamplingParams) -> tuple:
    """Queue the draw that follows ``tokens`` (the n-th of each row's own stream) before the host reads them:
    ``[R]`` next tokens and log-probs, both None when every live row ends with ``tokens``."""
    drawn = np.array([len(responses[seq]) + 1 for seq in rows])
    if not (drawn < params.max_new_tokens).any():
        return None, None
    logits = next_token_logits(model, tokens[:, None], cache)[:, -1, :]
    next_tokens, next_lp = _sample_step(logits, uniforms[rows, drawn], params)
    mx.async_eval(next_tokens, next_lp)
    return next_tokens, next_lp


def _keep_rows(live: tuple, rows: list[int], keep: list[int]) -> tuple[tuple, list[int]]:
    """The live batch (cache, next tokens, their log-probs) and its sequences, cut to the rows ``keep``."""
    if not keep:  # every live row finished: the cache goes with them
        return live, []
    if len(keep) == len(rows):
        return live, rows
    cache, next_tokens, next_lp = live
    keep_idx = mx.array(keep, dtype=mx.int32)
    for c in cache:
        c.filter(keep_idx)
    return (cache, next_tokens[keep_idx], next_lp[keep_idx]), [rows[r] for r in keep]


def _nothing() -> None:
    pass


def _check_inputs(prompts: Sequence[Sequence[int]], seeds: Sequence[int]) -> None:
    if len(seeds) != len(prompts):
        raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds")
    if any(len(p) == 0 for p in prompts):
        raise ValueError("empty prompt: every prompt needs at least one token")


def generate_completions(
    model: nn.Module,
    prompts: Sequence[Sequence[int]],
    params: SamplingParams,
    stop_ids: set[int] | frozenset[int],
    seeds: Sequence[int],
    on_step: Callable[[], None] | None = None,
    share_prompts: bool = True,
    max_rows: int = 0,
) -> list[Completion]:
    """Sample one completion per prompt; ``seeds[i]`` alone decides the randomness of sequence ``i``.

    ``on_step`` is called after every decoding step (the actor heartbeats from it during long generations).
    ``share_prompts``: a prompt repeated (GRPO's group) is prefilled once and its KV cache rows copied.
    ``max_rows`` > 0 keeps at most that many sequences in the batch and, once half of them finished, refills the
    free rows with the next waiting prompts, prefilled together (not row by row); the samples stay the same.
    """
    _check_inputs(prompts, seeds)
    if not prompts:
        return []
    n_new, width = params.max_new_tokens, max_rows if 0 < max_rows < len(prompts) else len(prompts)
    # One extra uniform per sequence: a step queued ahead may draw once past a row's max_new_tokens (discarded).
    uniforms = np.stack([sequence_uniforms(s, n_new + 1) for s in seeds])  # [B, n_new + 1]
    start = functools.partial(_start_rows, model, prompts, uniforms, params, share_prompts)
    out = _Outputs.empty(len(prompts))
    rows = list(range(width))  # live row r is sequence rows[r]
    waiting = list(range(width, len(prompts)))[::-1]  # popped from the end: next sequence last
    cache, tokens, token_lp = start(rows)
    mx.async_eval(tokens, token_lp)
    while rows:
        live = (cache, *_queue_step(model, cache, tokens, uniforms, rows, out.responses, params))
        keep = out.record(tokens, token_lp, rows, stop_ids, n_new)
        (on_step or _nothing)()
        live, rows = _keep_rows(live, rows, keep)
        if waiting and len(rows) <= width // 2:
            new = [waiting.pop() for _ in range(min(width - len(rows), len(waiting)))]
            live = _join_rows(live, start(new)) if rows else start(new)
            rows += new
        cache, tokens, token_lp = live
    return out.completions(prompts)
