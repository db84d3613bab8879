"""Batched sampling with a KV cache that records the behaviour log-prob of every sampled token.

mlx-lm's generators report log-probs taken *before* temperature and ``batch_generate`` drops the stop token.
PPO needs the log-prob under the distribution that actually drew each token, stop token included, so this
module runs its own decode loop on mlx-lm models and caches:

- prompts are left-padded into one ``BatchKVCache`` (per-row RoPE offsets and masks, so padding is invisible);
- every sequence draws from its own seeded stream of uniforms (inverse-CDF sampling), so its tokens do not depend
  on which batch it was generated in, nor on when it joined a running one (``CompletionStream``, continuous
  batching: ``generate_completions`` is one loop over it; multi-turn episodes submit each turn as it comes);
- the next step is queued before the host reads the current one (``mx.async_eval``), as mlx-lm does, so the
  device never waits on Python; per step the host reads back only the sampled tokens and their log-probs;
- two decode paths with the same samples: on the CPU (tokens drawn in NumPy) the uncompiled step over mlx-lm's
  ``BatchKVCache``, finished rows leaving at once; on a GPU the compiled step of ``actors/decode.py`` over a
  fixed-shape cache (the host, not the chip, bounds an uncompiled step there; see that module).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from actors.decode import FixedBatch, draw, supports_fixed_layout
from common.config import SamplingConfig
from common.logprobs import sample_on_host
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
    compiled_decode: bool | None = None
    """Decode with ``actors/decode.py``'s compiled step over a fixed-shape cache (None: when tokens are drawn on
    the device and the model's caches allow it, i.e. on a GPU). The samples are the same either way."""
    kv_chunk: int = 32
    """Compiled decode: cache columns added at a time (one trace per width and capacity; larger reads more
    masked columns per step, smaller re-lays out and retraces more often)."""

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


def _unique_prompts(prompts: Sequence[Sequence[int]]) -> tuple[list[Sequence[int]], list[int] | None]:
    """Distinct prompts in first-seen order and, per sequence, its prompt's row (None when all differ)."""
    rows: dict[tuple[int, ...], int] = {}
    copies = [rows.setdefault(tuple(p), len(rows)) for p in prompts]
    if len(rows) == len(prompts):
        return list(prompts), None
    return [list(p) for p in rows], copies


def _left_pad(prompts: Sequence[Sequence[int]]) -> tuple[mx.array, list[int]]:
    longest = max(len(p) for p in prompts)
    padding = [longest - len(p) for p in prompts]
    rows = [[0] * pad + list(p) for p, pad in zip(prompts, padding, strict=True)]
    return mx.array(rows, dtype=mx.int32), padding


def _draws_on_host(params: SamplingParams) -> bool:
    return mx.default_device() == mx.cpu if params.host_sampling is None else params.host_sampling


def _sample_step(logits: mx.array, uniforms: np.ndarray, params: SamplingParams) -> tuple[mx.array, mx.array]:
    """Draw one token per row: ``[B, V]`` logits, ``[B]`` uniforms -> ``[B]`` tokens and their log-probs.

    On the CPU backend the draw runs in NumPy (see ``sample_on_host``); on a GPU it stays on the device, lazy, as
    one compiled function (``actors.decode.draw``).
    """
    if _draws_on_host(params):
        tokens, logprobs = sample_on_host(np.array(logits.astype(mx.float32)), uniforms, params.temperature)
        return mx.array(tokens.astype(np.int32)), mx.array(logprobs)
    return draw(logits, mx.array(uniforms), params.temperature)


def _prefill_rows(model, prompts, first_uniforms: np.ndarray, params: SamplingParams, share: bool) -> tuple:
    """Prefill ``prompts`` into a new batch cache and draw each row's first token with ``first_uniforms`` ``[b]``:
    (cache, ``[b]`` left padding of each row on the host, (tokens, log-probs)).

    ``share``: a prompt that appears several times (GRPO's group) is prefilled once and its cache rows copied.
    """
    unique, copies = _unique_prompts(prompts) if share else (prompts, None)
    padded, padding = _left_pad(unique)
    cache = make_batch_cache(model, padding)
    first_logits = _prefill(model, padded, cache, params.prefill_step_size)
    left = np.asarray(padding)
    if copies is not None:  # one row per sequence again: copy each prompt's cache rows and logits
        index = mx.array(copies)
        for c in cache:
            c.filter(index)
        first_logits = first_logits[index]
        # mlx-lm's filter also cuts the padding every row shares
        left = left[copies] - (padded.shape[1] - getattr(cache[0], "_idx", padded.shape[1]))
    return cache, left, _sample_step(first_logits, first_uniforms, params)


class _CacheRows:
    """The live rows over mlx-lm's ``BatchKVCache`` (the uncompiled path): finished rows leave at once (on the CPU
    a step costs in proportion to its rows). ``uniforms`` ``[b, n + 1]``: each row's seeded uniforms, on the host."""

    def __init__(self, cache: list, first: tuple[mx.array, mx.array], rows: list[int], uniforms: np.ndarray):
        self.cache, (self.tokens, self.token_lp), self.rows, self.uniforms = cache, first, rows, uniforms

    @property
    def live(self) -> int:
        return len(self.rows)

    def queue(self, model: nn.Module, params: SamplingParams, drawn: np.ndarray) -> None:
        """Queue the draw that follows ``tokens`` (uniform ``drawn[r]`` of row ``r``); ``tokens`` become it."""
        logits = next_token_logits(model, self.tokens[:, None], self.cache)[:, -1, :]
        u = self.uniforms[np.arange(len(self.rows)), drawn]
        self.tokens, self.token_lp = _sample_step(logits, u, params)
        mx.async_eval(self.tokens, self.token_lp)

    def retire(self, keep: list[int]) -> None:
        if not keep:  # every live row finished: the cache goes with them
            self.rows = []
        elif len(keep) < len(self.rows):
            keep_idx = mx.array(keep, dtype=mx.int32)
            for c in self.cache:
                c.filter(keep_idx)
            self.tokens, self.token_lp = self.tokens[keep_idx], self.token_lp[keep_idx]
            self.rows, self.uniforms = [self.rows[r] for r in keep], self.uniforms[keep]

    def join(self, other: _CacheRows) -> _CacheRows:
        """These rows followed by ``other``'s."""
        for c, extra in zip(self.cache, other.cache, strict=True):
            c.extend(extra)
        first = mx.concatenate([self.tokens, other.tokens]), mx.concatenate([self.token_lp, other.token_lp])
        return _CacheRows(
            self.cache, first, self.rows + other.rows, np.concatenate([self.uniforms, other.uniforms])
        )


@dataclass
class _Sequence:
    """One submitted sequence: its prompt, its seeded uniforms, its limit and what it sampled so far."""

    key: Hashable
    prompt: list[int]
    uniforms: np.ndarray
    """``[max_new_tokens + 1]``: one per new token, and one for a step queued past the limit (discarded)."""
    limit: int
    response: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)

    def completion(self, finish_reason: str) -> Completion:
        return Completion(self.prompt, self.response, np.asarray(self.logprobs, np.float32), finish_reason)


class CompletionStream:
    """Continuous batching: sequences submitted at any time join the running batch, and each ``step()`` decodes one
    token of every live row and hands back the sequences that finished.

    A sequence's samples depend on its prompt and seed alone, not on when it joined or with whom (each draws from
    its own seeded uniforms; padding and row order are invisible to attention). ``max_rows`` > 0: at most that many
    sequences decode at once. Waiting sequences join, prefilled together, once at most ``refill_at`` rows are live
    (None: half of ``max_rows``, or at once without ``max_rows``): joining copies the live cache, so joining in
    groups copies it less often. ``share_prompts``: a prompt repeated among those joining is prefilled once.
    """

    def __init__(
        self,
        model: nn.Module,
        params: SamplingParams,
        stop_ids: set[int] | frozenset[int],
        max_rows: int = 0,
        refill_at: int | None = None,
        share_prompts: bool = True,
    ):
        if max_rows < 0 or (refill_at is not None and refill_at < 0):
            raise ValueError(f"max_rows and refill_at must be >= 0, got {max_rows=} {refill_at=}")
        self.model, self.params, self.stop_ids = model, params, frozenset(stop_ids)
        self.max_rows, self.share_prompts = max_rows, share_prompts
        self.refill_at = refill_at if refill_at is not None or max_rows == 0 else max_rows // 2
        self._fixed = _use_fixed_layout(model, params)
        self._seqs: dict[int, _Sequence] = {}
        self._waiting: deque[int] = deque()
        self._live: _CacheRows | FixedBatch | None = None
        self._next = 0

    @property
    def busy(self) -> bool:
        """Whether a submitted sequence has not been handed back yet (waiting or decoding)."""
        return bool(self._seqs)

    @property
    def width(self) -> int:
        """Rows of the running batch, filler rows of the compiled path included (0 when none runs)."""
        return 0 if self._live is None else len(self._live.rows)

    def submit(self, key: Hashable, prompt_ids: Sequence[int], seed: int, max_new: int | None = None) -> None:
        """Queue one sequence; ``step()`` hands back ``(key, its Completion)`` once it finished. ``seed`` alone
        decides its randomness; ``max_new``: at most this many new tokens (capped at ``params.max_new_tokens``)."""
        if len(prompt_ids) == 0:
            raise ValueError("empty prompt: every prompt needs at least one token")
        if max_new is not None and max_new < 1:
            raise ValueError(f"max_new must be >= 1, got {max_new}")
        n_new = self.params.max_new_tokens
        limit = n_new if max_new is None else min(n_new, int(max_new))
        seq = _Sequence(key, [int(t) for t in prompt_ids], sequence_uniforms(seed, n_new + 1), limit)
        self._seqs[self._next] = seq
        self._waiting.append(self._next)
        self._next += 1

    def step(self) -> list[tuple[Hashable, Completion]]:
        """Let waiting sequences join if there is room, decode one token per live row, and return the sequences
        that finished with it (stop token or limit), in row order."""
        self._refill()
        live = self._live
        if live is None:
            return []
        tokens, token_lp = live.tokens, live.token_lp  # this step's, maybe still computing
        drawn = self._room(live.rows)
        if (drawn >= 0).any():  # queue the next step before reading this one
            live.queue(self.model, self.params, drawn)
        keep, finished = self._record(tokens, token_lp, live.rows)
        live.retire(keep)
        if not live.rows:
            self._live = None
        return finished

    def _refill(self) -> None:
        live = 0 if self._live is None else self._live.live
        if not self._waiting or (live and self.refill_at is not None and live > self.refill_at):
            return
        room = self.max_rows - live if self.max_rows else len(self._waiting)
        new = [self._waiting.popleft() for _ in range(min(room, len(self._waiting)))]
        if new:
            rows = self._start(new)
            self._live = self._live.join(rows) if live else rows

    def _start(self, seqs: list[int]) -> _CacheRows | FixedBatch:
        """The rows of sequences ``seqs`` prefilled, with their first tokens queued."""
        uniforms = np.stack([self._seqs[s].uniforms for s in seqs])  # [b, n_new + 1]
        prompts = [self._seqs[s].prompt for s in seqs]
        cache, left, first = _prefill_rows(
            self.model, prompts, uniforms[:, 0], self.params, self.share_prompts
        )
        mx.async_eval(*first)
        if self._fixed:
            return FixedBatch.from_prefill(cache, left, first, seqs, mx.array(uniforms), self.params.kv_chunk)
        return _CacheRows(cache, first, seqs, uniforms)

    def _room(self, rows: list[int]) -> np.ndarray:
        """For each row, the index of its next uniform when it has room for one more token after the current one,
        else -1 (-1 rows are filler)."""
        drawn = [len(self._seqs[s].response) + 1 if s >= 0 else -1 for s in rows]
        return np.array(
            [d if s >= 0 and d < self._seqs[s].limit else -1 for s, d in zip(rows, drawn, strict=True)]
        )

    def _record(self, tokens: mx.array, token_lp: mx.array, rows: list[int]) -> tuple[list[int], list]:
        """Append each live row's token and log-prob to its sequence: (rows that go on, finished completions)."""
        keep, finished = [], []
        for r, (tok, lp) in enumerate(zip(tokens.tolist(), token_lp.tolist(), strict=True)):
            if rows[r] < 0:  # filler
                continue
            seq = self._seqs[rows[r]]
            seq.response.append(tok)
            seq.logprobs.append(lp)
            if tok in self.stop_ids or len(seq.response) >= seq.limit:
                del self._seqs[rows[r]]
                finished.append((seq.key, seq.completion("stop" if tok in self.stop_ids else "length")))
            else:
                keep.append(r)
        return keep, finished


def _nothing() -> None:
    pass


def _check_inputs(prompts: Sequence[Sequence[int]], seeds: Sequence[int], max_new) -> None:
    if len(seeds) != len(prompts):
        raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds")
    if any(len(p) == 0 for p in prompts):
        raise ValueError("empty prompt: every prompt needs at least one token")
    if max_new is not None and (len(max_new) != len(prompts) or min(max_new, default=1) < 1):
        raise ValueError(f"max_new needs one limit >= 1 per prompt, got {len(max_new)} for {len(prompts)}")


def _use_fixed_layout(model: nn.Module, params: SamplingParams) -> bool:
    if params.compiled_decode is not None:
        return params.compiled_decode
    # Measured on an H200 (bench/results/h200/h200-generation-135m.json): 1.28x the uncompiled step at batch 32,
    # 1.26x at 256, the same samples; where tokens are drawn on the host (the CPU backend) it would not pay.
    return not _draws_on_host(params) and supports_fixed_layout(model)


def generate_completions(
    model: nn.Module,
    prompts: Sequence[Sequence[int]],
    params: SamplingParams,
    stop_ids: set[int] | frozenset[int],
    seeds: Sequence[int],
    on_step: Callable[[], None] | None = None,
    share_prompts: bool = True,
    max_rows: int = 0,
    max_new: Sequence[int] | None = None,
) -> list[Completion]:
    """Sample one completion per prompt; ``seeds[i]`` alone decides the randomness of sequence ``i``.

    ``on_step`` is called after every decoding step (the actor heartbeats from it during long generations).
    ``share_prompts``: a prompt repeated (GRPO's group) is prefilled once and its KV cache rows copied.
    ``max_rows`` > 0 keeps at most that many sequences in the batch and, once half of them finished, refills the
    free rows with the next waiting prompts, prefilled together (not row by row); the samples stay the same.
    ``max_new``: per sequence, at most this many new tokens (each capped at ``params.max_new_tokens``).
    """
    _check_inputs(prompts, seeds, max_new)
    stream = CompletionStream(model, params, stop_ids, max_rows=max_rows, share_prompts=share_prompts)
    for i, (prompt, seed) in enumerate(zip(prompts, seeds, strict=True)):
        stream.submit(i, prompt, seed, None if max_new is None else max_new[i])
    completions: list[Completion | None] = [None] * len(prompts)
    while stream.busy:
        for i, completion in stream.step():
            completions[i] = completion
        (on_step or _nothing)()
    return completions  # type: ignore[return-value]
