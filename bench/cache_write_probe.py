"""What writing one column into a KV cache costs, by how it is written (the decode step's write, in isolation).

    python bench/cache_write_probe.py [--shape 256,32,192,64] [--repeats 20]

One layer's ``[W, H, C, D]`` bfloat16 cache (the 1.7B shape at 256 rows x 192 columns: 0.2 GB) gets one column
``[W, H, 1, D]`` per call, each call evaluated, milliseconds per write: ``mx.slice_update`` at a device-array
start (what the compiled decode step did before), the same with the previous cache still referenced (a copy is
then forced), ``mx.put_along_axis`` (the step's scatter now), eager and compiled, and a Python slice assignment at a
fixed column (in place where MLX can reuse the buffer; not usable in a compiled step, whose column moves). A write
that takes about what a copy of the whole cache takes is copying it. Measured on an H200: BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import time

import mlx.core as mx


def _slice_update(cache, column, pos):
    return mx.slice_update(cache, column, pos, axes=(2,))


def _scatter(cache, column, pos):
    return mx.put_along_axis(cache, mx.broadcast_to(pos.reshape(1, 1, 1, 1), column.shape), column, axis=2)


def _assign_fixed(cache, column, pos):
    cache[:, :, 5:6, :] = column
    return cache


def time_writes(write, shape: tuple[int, ...], repeats: int, keep_previous: bool, compiled: bool) -> float:
    """Milliseconds per write of ``write(cache, column, pos) -> cache`` over ``repeats`` evaluated calls."""
    cache = mx.zeros(shape, mx.bfloat16)
    column = mx.ones((*shape[:2], 1, shape[3]), mx.bfloat16)
    pos = mx.array([5], mx.int32)
    fn = mx.compile(write) if compiled else write
    for _ in range(3):
        cache = fn(cache, column, pos)
        mx.eval(cache)
    held = []
    mx.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        if keep_previous:
            held = [cache]
        cache = fn(cache, column, pos)
        mx.eval(cache)
    mx.synchronize()
    del held
    return (time.perf_counter() - start) / repeats * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="256,32,192,64", type=lambda s: tuple(map(int, s.split(","))))
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    cases = [
        ("slice_update, device-array start", _slice_update, False, False),
        ("slice_update, compiled", _slice_update, False, True),
        ("slice_update, previous cache kept", _slice_update, True, False),
        ("put_along_axis", _scatter, False, False),
        ("put_along_axis, compiled", _scatter, False, True),
        ("put_along_axis, previous cache kept", _scatter, True, False),
        ("slice assignment at a fixed column", _assign_fixed, False, False),
    ]
    size = mx.zeros(args.shape, mx.bfloat16).nbytes
    print(f"{mx.default_device()}: cache {args.shape} bfloat16, {size / 1e9:.2f} GB")
    print("| write | ms |\n|---|---:|")
    for name, write, keep, compiled in cases:
        print(f"| {name} | {time_writes(write, args.shape, args.repeats, keep, compiled):.3f} |", flush=True)


if __name__ == "__main__":
    main()
