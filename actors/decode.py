"""The GPU decode path of ``actors/sampler.py``: a fixed-shape batched KV cache and one compiled step.

Why: on a GPU a decode step of a small model is bound by the host, not the chip. Building one step of the bundled
135M model (30 layers, ~25 Python-level ops each) costs ~5 ms of Python on our CPUs (~10 ms with LoRA adapters on
every linear layer), and the H100 run in BENCHMARKS.md took ~8.7 ms a step at every batch size from 32 to 256. A
compiled step is replayed from its trace without running the Python again (~3x less host time per step here).

mlx-lm's ``BatchKVCache`` cannot be compiled: ``update_and_fetch`` returns ``keys[..., :idx, :]``, one column more
at every token, so a compiled step would retrace at every token (and its ``filter`` reads ``left_padding`` back to
the host, a device sync per layer whenever a row leaves). Here each layer keeps ``[W, Hkv, C, D]`` keys and values,
the step writes column ``pos`` (a device array) with a scatter (``put_along_axis``), and attention reads all ``C``
columns under a mask (masked columns add exact zeros to the softmax), so one trace serves up to ``chunk`` tokens:

- the rows are laid out again (finished rows dropped, common left padding cut, room for up to ``chunk`` more
  tokens) only when the buffer is full or half of its rows have finished; a finished row decodes filler until
  then and its tokens are never read (on a GPU an extra row costs almost nothing next to reading the weights);
- widths are multiples of 8 (finished rows, or copies of a row when rows join a running batch, as filler) and
  capacities multiples of ``chunk``, so shapes recur and ``mx.compile``'s cache serves them: a new (width,
  capacity) costs one trace (~10 plain steps of host time);
- each row's uniforms sit on the device ``[W, n + 1]`` with a per-row draw counter advanced inside the step: a step
  uploads nothing, and the host reads back only the sampled tokens and their log-probs (the stream's ``_record``).

The samples are those of the uncompiled path (tests/unit/test_decode.py).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from common.logprobs import gather_token_logprobs, sample_from_logprobs, sampling_logprobs
from common.models import float32_head_weight

ROW_MULTIPLE = 8
"""Widths after a re-layout are multiples of this (finished rows kept as filler), so compiled shapes recur."""
_traces = [0]


@mx.compile
def draw(logits: mx.array, uniforms: mx.array, temperature: float) -> tuple[mx.array, mx.array]:
    """The per-step sampling tail as one compiled function: ``[B, V]`` logits, ``[B]`` uniforms in (0, 1] ->
    ``[B]`` int32 tokens and ``[B]`` float32 log-probs of them under the tempered distribution.

    Exactly ``common.logprobs``' functions (the learner's definition); ``temperature`` is a Python float, which
    ``mx.compile`` keys its cache on, so a new temperature traces anew instead of reusing a stale constant. A new
    ``B`` (rows leaving) retraces too: a handful of ops, ~0.2 ms.
    """
    logprobs = sampling_logprobs(logits, temperature)
    tokens = sample_from_logprobs(logprobs, uniforms)
    return tokens, gather_token_logprobs(logprobs, tokens)


def trace_count() -> int:
    """How many times the decode step has been traced in this process (tests check it is replayed, not retraced)."""
    return _traces[0]


def round_up(n: int, multiple: int) -> int:
    return -(-int(n) // multiple) * multiple


class _LayerCache:
    """One layer's cache as an mlx-lm attention layer sees it inside the step (one new token per row).

    ``keys``/``values`` ``[W, Hkv, C, D]``; the step writes column ``pos`` (``[1]`` int32); row ``r`` holds its
    tokens in columns ``[left_pad[r], pos]``.
    """

    def __init__(self, keys: mx.array, values: mx.array, pos: mx.array, left_pad: mx.array):
        self.keys, self.values, self.pos, self.left_pad = keys, values, pos, left_pad
        self.offset = pos - left_pad  # [W]: RoPE position of each row's new token

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        # A scatter, not ``mx.slice_update`` at a device-array start: on CUDA (MLX 0.32.4) that one copied the
        # whole cache at every token whether or not its buffer could be reused (0.6 ms for a 0.2 GB layer cache,
        # 0.15 ms as a scatter); the 1.7B shape's step at 256 rows x 192 columns took 33.9 ms with it, 12.5 ms
        # like this (bench/decode_profile.py, bench/cache_write_probe.py, BENCHMARKS.md "One H200"). On the CPU
        # backend the scatter is the slower write (0.4 against 0.09 ms at 64 rows), but there tokens are drawn
        # on the host and this step is not taken unless forced.
        index = mx.broadcast_to(self.pos.reshape(1, 1, 1, 1), keys.shape)
        self.keys = mx.put_along_axis(self.keys, index, keys, axis=2)
        self.values = mx.put_along_axis(self.values, index, values, axis=2)
        return self.keys, self.values

    def make_mask(self, n: int, return_array: bool = False, window_size: int | None = None) -> mx.array:
        cols = mx.arange(self.keys.shape[2])
        return ((cols >= self.left_pad[:, None]) & (cols <= self.pos))[:, None, None, :]  # [W, 1, 1, C]


def _decode_step(
    model: nn.Module, temperature: float, head: list, tokens, keys, values, pos, left_pad, uniforms, drawn
):
    """One token per row (the function ``mx.compile`` traces).

    Args:
        tokens: ``[W]`` int32 last tokens. keys, values: per layer ``[W, Hkv, C, D]``. pos: ``[1]`` int32 column
        written. left_pad: ``[W]`` int32. uniforms: ``[W, n + 1]`` float32. drawn: ``[W]`` int32 index of each
        row's next uniform. head: ``[V, H]`` float32 copy of the vocabulary projection (float32-head models), or
        empty: the model's own ``__call__`` (as ``common.models.next_token_logits``).

    Returns:
        ``([W] next tokens, [W] their log-probs, keys, values, pos + 1, drawn + 1)``.
    """
    _traces[0] += 1  # Python runs here only while tracing
    caches = [_LayerCache(k, v, pos, left_pad) for k, v in zip(keys, values, strict=True)]
    if head:
        logits = model.model(tokens[:, None], cache=caches)[:, -1, :].astype(mx.float32) @ head[0].T
    else:
        logits = model(tokens[:, None], cache=caches)[:, -1, :]
    u = mx.take_along_axis(uniforms, mx.minimum(drawn, uniforms.shape[1] - 1)[:, None], axis=1)[:, 0]
    next_tokens, next_lp = draw(logits, u, temperature)
    return next_tokens, next_lp, [c.keys for c in caches], [c.values for c in caches], pos + 1, drawn + 1


def _compiled_step(model: nn.Module):
    """``_decode_step`` compiled for ``model``, made once per model object.

    The weights are inputs (``inputs=[model.state]``, read at every call), not constants of the trace, so weights
    synced into the model later (LoRA adapters, a full snapshot) are the ones used.
    """
    step = model.__dict__.get("_compiled_decode_step")
    if step is None:
        step = mx.compile(functools.partial(_decode_step, model), inputs=[model.state])
        object.__setattr__(model, "_compiled_decode_step", step)  # a plain attribute, not a parameter
    return step


def _float32_head(model: nn.Module) -> list:
    """``[float32 head weight]`` when ``model`` decodes with a float32 head it can cast, else ``[]``.

    Shares ``common.models.next_token_logits``' cached copy (same attribute, same rule: remade when the weight
    array changes), so one copy is held; passed to the step as an input so the trace never keeps a stale one.
    """
    weight = float32_head_weight(model)  # None: the model's own call (no float32 head, or quantized)
    return [] if weight is None else [weight]


def supports_fixed_layout(model: nn.Module) -> bool:
    """Whether every layer of ``model`` uses a plain growing KV cache (no sliding windows or other state)."""
    from mlx_lm.models.cache import KVCache

    if not hasattr(model, "make_cache"):
        return True
    return all(type(c) is KVCache for c in model.make_cache())


def _columns(
    arrays: list[mx.array], rows: mx.array | None, start: int, stop: int, left: int, width: int
) -> list:
    """Each ``[B, H, L, D]`` array cut to ``rows`` and columns ``[start, stop)``, placed at column ``left`` of a
    zero ``[b, H, width, D]`` array."""
    out = []
    for a in arrays:
        a = (a if rows is None else a[rows])[:, :, start:stop]
        out.append(mx.pad(a, [(0, 0), (0, 0), (left, width - left - (stop - start)), (0, 0)]))
    return out


@dataclass
class FixedBatch:
    """The live rows of a generation in the layout the compiled step reads; ``rows[r]`` is row ``r``'s sequence,
    -1 for a finished row kept as filler until the next re-layout."""

    keys: list[mx.array]
    values: list[mx.array]
    left_pad: np.ndarray
    """``[W]`` int, on the host: columns before each row's first token."""
    pos: int
    """The column the next step writes (the same for every row)."""
    rows: list[int]
    uniforms: mx.array
    drawn: mx.array
    tokens: mx.array
    token_lp: mx.array
    chunk: int
    device: tuple | None = None
    """``pos`` as ``[1]`` and ``left_pad`` as ``[W]`` int32 device arrays: made after a layout, then advanced by the
    step itself (no upload per token)."""

    @classmethod
    def from_prefill(
        cls, cache: list, left_pad: np.ndarray, first: tuple, rows: list[int], uniforms, chunk: int
    ):
        """Rows just prefilled into mlx-lm ``BatchKVCache``s (``left_pad``: their padding, on the host), with their
        first tokens and log-probs ``first`` and ``uniforms`` ``[b, n + 1]`` (the first already drawn)."""
        length = cache[0]._idx
        capacity = round_up(length + 1, chunk)
        keys = _columns([c.keys for c in cache], None, 0, length, 0, capacity)
        values = _columns([c.values for c in cache], None, 0, length, 0, capacity)
        drawn = mx.ones((len(rows),), mx.int32)
        return cls(keys, values, np.asarray(left_pad), length, list(rows), uniforms, drawn, *first, chunk)

    @property
    def live(self) -> int:
        return sum(s >= 0 for s in self.rows)

    @property
    def capacity(self) -> int:
        return self.keys[0].shape[2]

    def queue(self, model: nn.Module, params, *_) -> None:
        """Queue the next token of every row (``mx.async_eval``); ``tokens``/``token_lp`` become the new ones.

        ``params``: the ``SamplingParams``; each row's uniforms and draw counter are already on the device."""
        # retire() lays the rows out again before the buffer is full; a write past its end corrupts memory
        if self.pos >= self.capacity:
            raise RuntimeError(f"decode step at column {self.pos} of a {self.capacity}-column cache")
        if self.device is None:
            self.device = (mx.array([self.pos], mx.int32), mx.array(self.left_pad.astype(np.int32)))
        pos, left = self.device
        step = _compiled_step(model)
        head = _float32_head(model)
        out = step(
            params.temperature,
            head,
            self.tokens,
            self.keys,
            self.values,
            pos,
            left,
            self.uniforms,
            self.drawn,
        )
        self.tokens, self.token_lp, self.keys, self.values, pos, self.drawn = out
        self.pos, self.device = self.pos + 1, (pos, left)
        mx.async_eval(self.tokens, self.token_lp)

    def retire(self, keep: list[int]) -> None:
        """Rows not in ``keep`` finished and become filler. The rows are laid out again when the buffer is full, or
        when at most half of them are live and that makes the batch narrower."""
        kept = set(keep)
        self.rows = [s if r in kept else -1 for r, s in enumerate(self.rows)] if kept else []
        narrower = len(kept) <= len(self.rows) // 2 and _width(len(kept), len(self.rows)) < len(self.rows)
        if kept and (narrower or self.pos >= self.capacity):
            self.relayout()

    def relayout(self, filler: bool = True) -> None:
        """Drop finished rows (keeping filler up to a multiple of ``ROW_MULTIPLE`` unless ``filler`` is False),
        cut the left padding all rows share, and leave room for up to ``chunk`` more tokens."""
        live = [r for r, s in enumerate(self.rows) if s >= 0]
        dead = [r for r, s in enumerate(self.rows) if s < 0]
        keep = live + dead[: _width(len(live), len(self.rows)) - len(live)] if filler else live
        start = int(self.left_pad[keep].min())
        capacity = round_up(self.pos - start + 1, self.chunk)
        idx = None if keep == list(range(len(self.rows))) else mx.array(keep, mx.int32)
        if idx is None and start == 0 and capacity == self.capacity:
            return
        self.keys = _columns(self.keys, idx, start, self.pos, 0, capacity)
        self.values = _columns(self.values, idx, start, self.pos, 0, capacity)
        self.left_pad, self.pos, self.rows = (
            self.left_pad[keep] - start,
            self.pos - start,
            [self.rows[r] for r in keep],
        )
        self.device = None
        if idx is not None:
            self.uniforms, self.drawn = self.uniforms[idx], self.drawn[idx]
            self.tokens, self.token_lp = self.tokens[idx], self.token_lp[idx]

    def join(self, other: FixedBatch) -> FixedBatch:
        """These rows followed by ``other``'s, both right-aligned at the later of the two write columns, then filler
        rows up to a multiple of ``ROW_MULTIPLE``, so a join makes a width that recurs rather than a new trace.

        The filler rows are copies of ``other``'s first row, not zeros: an all-masked row would sample from NaN
        logits, and its tokens feed the next step's embedding lookup."""
        self.relayout(filler=False)
        other.relayout(filler=False)
        pos = max(self.pos, other.pos)
        capacity = round_up(pos + 1, self.chunk)
        n = len(self.rows) + len(other.rows)
        fill = round_up(n, ROW_MULTIPLE) - n
        parts = [(self, None), (other, None)] + ([(other, np.zeros(fill, np.int64))] if fill else [])

        def pick(b: FixedBatch, name: str, rows: np.ndarray | None):  # one per-row array, for parts' rows
            a = getattr(b, name)
            return a if rows is None else a[rows if isinstance(a, np.ndarray) else mx.array(rows, mx.int32)]

        def stack(name: str) -> list[mx.array]:
            layers = []
            for b, rows in parts:
                idx = None if rows is None else mx.array(rows, mx.int32)
                layers.append(_columns(getattr(b, name), idx, 0, b.pos, pos - b.pos, capacity))
            return [mx.concatenate(layer) for layer in zip(*layers, strict=True)]

        def cat(name: str) -> mx.array:
            return mx.concatenate([pick(b, name, rows) for b, rows in parts])

        left_pad = np.concatenate([pick(b, "left_pad", rows) + pos - b.pos for b, rows in parts])
        rows = self.rows + other.rows + [-1] * fill
        return FixedBatch(
            stack("keys"), stack("values"), left_pad, pos, rows, cat("uniforms"), cat("drawn"), cat("tokens"),
            cat("token_lp"), self.chunk,
        )  # fmt: skip


def _width(live: int, width: int) -> int:
    """The width a re-layout leaves for ``live`` rows out of ``width``: a multiple of ``ROW_MULTIPLE``."""
    return min(width, round_up(live, ROW_MULTIPLE))
