"""Policy snapshots on the wire: adapter tensors <-> a ``Weights`` message, with a checksum both sides agree on."""

from __future__ import annotations

import zlib

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from common.lora import adapter_weights, load_adapter_weights
from common.protocol import Weights


def to_numpy(array: mx.array) -> tuple[np.ndarray, str]:
    """An MLX array as NumPy plus its wire dtype; bfloat16 travels as its raw 16-bit pattern."""
    if array.dtype == mx.bfloat16:
        return np.array(array.view(mx.uint16)), "bfloat16"
    out = np.array(array)
    return out, out.dtype.name


def from_numpy(array: np.ndarray, wire_dtype: str) -> mx.array:
    out = mx.array(array)
    return out.view(mx.bfloat16) if wire_dtype == "bfloat16" else out


def checksum(names: tuple[str, ...], tensors: tuple[np.ndarray, ...]) -> str:
    """CRC-32 over names, shapes and bytes, in order, as 8 hex digits.

    It guards against corruption and mix-ups (who is running what), not against an attacker: CURVE
    authentication does that. CRC-32 runs at several GB/s, so it costs little in the sync path.
    """
    crc = 0
    for name, tensor in zip(names, tensors, strict=True):
        crc = zlib.crc32(f"{name}{tensor.shape}".encode(), crc)
        crc = zlib.crc32(memoryview(np.ascontiguousarray(tensor)).cast("B"), crc)
    return f"{crc:08x}"


def snapshot(model: nn.Module, policy_version: int) -> Weights:
    """The model's adapters as a ``Weights`` message (names sorted, so the checksum is reproducible)."""
    weights = adapter_weights(model)
    names = tuple(sorted(weights))
    converted = [to_numpy(weights[n]) for n in names]
    tensors = tuple(t for t, _ in converted)
    return Weights(policy_version, checksum(names, tensors), names, tensors, tuple(d for _, d in converted))


def apply_snapshot(model: nn.Module, msg: Weights) -> None:
    """Load a snapshot into ``model``; a checksum or shape mismatch raises ValueError and changes nothing."""
    actual = checksum(msg.names, msg.tensors)
    if actual != msg.checksum:
        raise ValueError(f"snapshot v{msg.policy_version} checksum {actual} != announced {msg.checksum}")
    load_adapter_weights(
        model, {n: from_numpy(t, d) for n, t, d in zip(msg.names, msg.tensors, msg.dtypes, strict=True)}
    )
