"""Peak compute and memory bandwidth per chip, for MFU and MBU, and the bytes a decode step must read.

    MBU = achieved bytes/s / peak bandwidth, achieved bytes/s = tokens/s x bytes read per token.
    MFU = achieved FLOP/s / peak FLOP/s.

Bytes a decode step reads for a batch of ``B`` live sequences (``decode_step_bytes``): every weight once (the
whole batch shares one pass over them) plus each sequence's own KV cache,

    weight_bytes + sum over the B sequences of context_len_i x kv_bytes_per_position,
    kv_bytes_per_position = 2 (K and V) x layers x kv_heads x head_dim x dtype bytes,

where ``context_len_i`` counts the positions the new token attends to (its prompt and the tokens so far, not
padding). So per token: ``weight_bytes / B + context_len x kv_bytes_per_position``. Activations are ignored (a
few ``[B, hidden]`` rows a layer); so are the extra bytes an implementation reads for padding or masked columns,
which is what makes this a utilisation: useful bytes over what the chip could move.

Sources: NVIDIA's datasheets for the data-centre GPUs (dense bf16 tensor-core TFLOP/s, i.e. without the 2:4
sparsity doubling); Apple's press releases and tech specs for unified-memory bandwidth. Apple publishes no GPU
FLOP/s for most chips: the Apple rows' TFLOP/s are estimates marked as such (GPU cores x 128 FP32 lanes x 2 (FMA)
x clock, FP16/bf16 at the FP32 rate on these GPUs), or None where no clock is reliably known.
"""

from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass(frozen=True)
class Chip:
    name: str
    """As matched against the device name (case-insensitive substring; the longest match wins)."""
    bandwidth_gbs: float
    """Peak memory bandwidth, GB/s (10^9 bytes)."""
    tflops: float | None
    """Peak dense bf16/fp16 matmul TFLOP/s (None: not published and no reliable estimate)."""
    source: str
    estimate: bool = False
    """``tflops`` is an estimate, not a published figure."""
    measured_tflops: float | None = None
    """A bf16 GEMM peak we measured on this chip (bench/learner.py's probe), where we have one."""
    cpu_cores: int | None = None
    """For chips sold in two bins that differ in bandwidth: the CPU core count of this bin."""


CHIPS = (
    # NVIDIA (datasheets: dense bf16 tensor core; HBM bandwidth)
    # measured: our bf16 GEMM probe on the H200 host gave 770-800 TFLOP/s (the midpoint here)
    Chip(
        "H200", 4800, 989, "NVIDIA H200 datasheet (SXM: 989 bf16 dense, HBM3e 4.8 TB/s)", measured_tflops=785
    ),
    Chip("H200 NVL", 4800, 836, "NVIDIA H200 datasheet (NVL/PCIe: 836 bf16 dense, 4.8 TB/s)"),
    # 'NVIDIA H100 80GB HBM3' (the SXM5 part, as our H100 host reports it) and any other H100 name: SXM figures
    Chip("H100", 3350, 989, "NVIDIA H100 datasheet (SXM5: 989 bf16 dense, HBM3 3.35 TB/s)"),
    Chip("H100 PCIe", 2000, 756, "NVIDIA H100 datasheet (PCIe: 756 bf16 dense, HBM2e 2.0 TB/s)"),
    Chip("H100 NVL", 3900, 835, "NVIDIA H100 datasheet (NVL: 835 bf16 dense, 3.9 TB/s)"),
    Chip("A100-SXM4-80GB", 2039, 312, "NVIDIA A100 datasheet (80GB SXM: 312 bf16 dense, 2.039 TB/s)"),
    # Apple M1 family (bandwidth: Apple; M1's 68.25 GB/s is its LPDDR4X-4266 x 128-bit bus, Apple gave none;
    # GPU clock 1.278 GHz, which gives Apple's 2.6 TFLOPS for the 8-core M1)
    Chip("Apple M1", 68.25, 2.6, "Apple M1 launch (2.6 TFLOPS FP32); bandwidth from the memory bus"),
    Chip("Apple M1 Pro", 200, 5.2, "Apple (200 GB/s); 16-core GPU x 1.278 GHz", estimate=True),
    Chip("Apple M1 Max", 400, 10.5, "Apple (400 GB/s); 32-core GPU x 1.278 GHz", estimate=True),
    Chip("Apple M1 Ultra", 800, 20.9, "Apple (800 GB/s); 64-core GPU x 1.278 GHz", estimate=True),
    # Apple M2 family (bandwidth: Apple; GPU clock 1.398 GHz)
    Chip("Apple M2", 100, 3.6, "Apple (100 GB/s); 10-core GPU x 1.398 GHz", estimate=True),
    Chip("Apple M2 Pro", 200, 6.8, "Apple (200 GB/s); 19-core GPU x 1.398 GHz", estimate=True),
    Chip("Apple M2 Max", 400, 13.6, "Apple (400 GB/s); 38-core GPU x 1.398 GHz", estimate=True),
    Chip("Apple M2 Ultra", 800, 27.2, "Apple (800 GB/s); 76-core GPU x 1.398 GHz", estimate=True),
    # Apple M3 family (bandwidth: Apple; no GPU FLOP/s published)
    Chip("Apple M3", 100, None, "Apple (100 GB/s)"),
    Chip("Apple M3 Pro", 150, None, "Apple (150 GB/s)"),
    Chip("Apple M3 Max", 300, None, "Apple (14-core CPU / 30-core GPU bin: 300 GB/s)", cpu_cores=14),
    Chip("Apple M3 Max", 400, None, "Apple (16-core CPU / 40-core GPU bin: 400 GB/s)", cpu_cores=16),
    Chip("Apple M3 Ultra", 819, None, "Apple (819 GB/s)"),
    # Apple M4 family (bandwidth: Apple)
    Chip("Apple M4", 120, None, "Apple (120 GB/s)"),
    Chip("Apple M4 Pro", 273, None, "Apple (273 GB/s)"),
    Chip("Apple M4 Max", 410, None, "Apple (14-core CPU / 32-core GPU bin: 410 GB/s)", cpu_cores=14),
    Chip("Apple M4 Max", 546, None, "Apple (16-core CPU / 40-core GPU bin: 546 GB/s)", cpu_cores=16),
    Chip("Apple M5", 153, None, "Apple (153 GB/s)"),
)


def chip_for(device_name: str, cpu_cores: int | None = None) -> Chip | None:
    """The row for an MLX device name (``mx.device_info()['device_name']``: 'NVIDIA H200', 'Apple M2 Max'; on
    the CPU backend the CPU's name, e.g. 'AMD EPYC', which has no row). Of two bins, the one with ``cpu_cores``
    (default: this machine's count), else the faster one (a lower MBU, never an inflated one)."""
    name = device_name.lower()
    matches = [c for c in CHIPS if c.name.lower() in name and _word_end(name, c.name.lower())]
    if not matches:
        return None
    longest = max(len(c.name) for c in matches)
    matches = [c for c in matches if len(c.name) == longest]
    cores = os.cpu_count() if cpu_cores is None else cpu_cores
    binned = [c for c in matches if c.cpu_cores == cores]
    return (binned or sorted(matches, key=lambda c: c.bandwidth_gbs))[-1]


def _word_end(name: str, key: str) -> bool:
    """``key`` ends at a word boundary in ``name`` ('apple m2' must not match 'apple m2 max' as its own row)."""
    end = name.index(key) + len(key)
    return end == len(name) or not name[end].isalnum()


def this_chip() -> Chip | None:
    """The row for MLX's default device, or None (an unknown GPU, or the CPU backend)."""
    import mlx.core as mx

    info = mx.device_info() if hasattr(mx, "device_info") else mx.metal.device_info()
    return chip_for(str(info.get("device_name", "")))


def kv_bytes_per_position(layers: int, kv_heads: int, head_dim: int, dtype_bytes: int) -> int:
    """Bytes of K and V one cached position holds across all layers: ``2 x layers x kv_heads x head_dim x bytes``."""
    return 2 * layers * kv_heads * head_dim * dtype_bytes


def decode_step_bytes(weight_bytes: float, kv_per_position: float, contexts) -> float:
    """Bytes one decode step reads: the weights once, plus each live sequence's ``contexts[i]`` cached positions."""
    return weight_bytes + kv_per_position * float(sum(contexts))


def generation_bytes(
    weight_bytes: float, kv_per_position: float, prompt_lens, new_tokens
) -> tuple[float, int]:
    """(bytes, steps) of the decode steps of one batched generation, all sequences started together.

    Sequence ``i`` (``prompt_lens[i]`` prompt tokens, ``new_tokens[i]`` sampled) takes its first token from the
    prefill and token ``t + 1`` from a decode step attending to ``prompt_lens[i] + t`` positions; a step reads the
    weights once for all live sequences, and there are ``max(new_tokens) - 1`` steps.
    """
    steps = max(int(n) for n in new_tokens) - 1
    positions = sum(
        (n - 1) * p + (n - 1) * n // 2
        for p, n in zip(map(int, prompt_lens), map(int, new_tokens), strict=True)
    )  # sum over t = 1 .. n - 1 of (p + t)
    return steps * weight_bytes + positions * kv_per_position, steps


def mbu(tokens_per_s: float, bytes_per_token: float, bandwidth_gbs: float) -> float:
    """Memory-bandwidth utilisation: ``tokens_per_s x bytes_per_token`` over the peak, as a fraction."""
    return tokens_per_s * bytes_per_token / (bandwidth_gbs * 1e9)


def mfu(flops_per_s: float, chip: Chip) -> float | None:
    """Model FLOP/s utilisation against the chip's published (or estimated) peak; None without one."""
    return None if chip.tflops is None else flops_per_s / (chip.tflops * 1e12)


def markdown_table() -> str:
    """The peak table as BENCHMARKS.md shows it (``python bench/chips.py``)."""
    lines = ["| chip | memory GB/s | bf16 TFLOP/s | measured here | source |", "|---|---:|---:|---:|---|"]
    for c in CHIPS:
        tflops = "-" if c.tflops is None else f"{c.tflops:g}" + (" (estimate)" if c.estimate else "")
        measured = "-" if c.measured_tflops is None else f"{c.measured_tflops:g}"
        lines.append(f"| {c.name} | {c.bandwidth_gbs:g} | {tflops} | {measured} | {c.source} |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(markdown_table())
