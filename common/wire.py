"""The frame codec under ``common.protocol``: the header layout, array frames and typed body fields.

A message is ``[header, msgpack body, *array frames]``. Arrays travel as raw little-endian frames, each described
in the body's ``"arrays"`` list by name, dtype and shape, in frame order. Body fields are read against the
message dataclass's own annotations and defaults (``read_fields``), so a field's type and default are written
once, on the dataclass. Everything malformed raises ``ProtocolError`` with a short ``reason``.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import struct
import typing
from collections.abc import Sequence
from typing import Any, Final

import msgpack
import numpy as np

MAGIC: Final = b"MPPO"
HEADER = struct.Struct(">4sHB")
"""Magic, protocol version (uint16, big-endian), message type (uint8)."""
MAX_DIMS: Final = 8
"""Arrays on the wire have at most this many dimensions (ours are 1-D)."""
# Wire dtypes; bfloat16 travels as its raw 16-bit pattern (NumPy has no bfloat16).
DTYPES: Final = {
    "int32": np.int32,
    "int64": np.int64,
    "float32": np.float32,
    "float16": np.float16,
    "bfloat16": np.uint16,
    "uint32": np.uint32,
    "uint8": np.uint8,
}
WIRE_REQUIRED: Final = {"wire_required": True}
"""Field metadata: refuse a message that lacks this field although the dataclass has a default for it."""


class ProtocolError(ValueError):
    """A message that cannot be accepted; ``reason`` is a short counter name such as 'bad_magic'."""

    def __init__(self, reason: str, detail: str):
        self.reason = reason
        super().__init__(f"{reason}: {detail}")


def check(condition: bool, reason: str, detail: str) -> None:
    if not condition:
        raise ProtocolError(reason, detail)


def read_header(frame: bytes, version: int) -> int:
    """The message type code of a header frame of protocol ``version``; raises ProtocolError."""
    check(len(frame) == HEADER.size, "bad_header", f"header is {len(frame)} bytes, expected {HEADER.size}")
    magic, got, type_code = HEADER.unpack(frame)
    check(magic == MAGIC, "bad_magic", f"magic {magic!r} is not {MAGIC!r}")
    check(got == version, "bad_version", f"protocol version {got}, this side speaks {version}")
    return type_code


def read_body(frame: bytes | memoryview) -> dict:
    """The msgpack map of a body frame; raises ProtocolError."""
    try:
        body = msgpack.unpackb(frame, raw=False, strict_map_key=True)
    except Exception as e:  # msgpack raises several unrelated types on garbage
        raise ProtocolError("bad_body", f"body is not msgpack ({type(e).__name__})") from None
    check(isinstance(body, dict), "bad_body", f"body is {type(body).__name__}, not a map")
    return body


# -- arrays ---------------------------------------------------------------------------------------------------


def array_meta(name: str, array: np.ndarray, wire_dtype: str | None = None) -> dict[str, Any]:
    return {"name": name, "dtype": wire_dtype or array.dtype.name, "shape": list(array.shape)}


def frame(array: np.ndarray) -> memoryview:
    return memoryview(np.ascontiguousarray(array.astype(array.dtype.newbyteorder("<"), copy=False))).cast("B")


def wire_dtype(array: np.ndarray) -> str:
    return "bfloat16" if array.dtype == np.uint16 else array.dtype.name


def read_arrays(meta: Any, frames: Sequence[bytes | memoryview]) -> dict[str, np.ndarray]:
    """The arrays that ``meta`` (the body's ``"arrays"`` list) describes, viewed on their ``frames``."""
    check(
        isinstance(meta, list) and len(meta) == len(frames),
        "bad_arrays",
        f"{len(frames)} array frames, body lists {meta!r:.80}",
    )
    out = {}
    for m, data in zip(meta, frames, strict=True):
        check(
            isinstance(m, dict) and {"name", "dtype", "shape"} <= set(m),
            "bad_arrays",
            f"array entry {m!r:.80}",
        )
        dtype = DTYPES.get(m["dtype"]) if isinstance(m["dtype"], str) else None
        check(dtype is not None, "bad_dtype", f"dtype {m['dtype']!r} not in {sorted(DTYPES)}")
        shape = m["shape"]
        check(
            isinstance(shape, list)
            and len(shape) <= MAX_DIMS
            and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape),
            "bad_shape",
            f"shape {shape!r:.80}",
        )
        expected = math.prod(shape) * np.dtype(dtype).itemsize  # Python ints: no overflow
        check(
            len(data) == expected,
            "bad_shape",
            f"{m['name']}: {len(data)} bytes for shape {shape} {m['dtype']}",
        )
        out[str(m["name"])] = np.frombuffer(data, dtype=np.dtype(dtype).newbyteorder("<")).reshape(shape)
    return out


# -- body fields ----------------------------------------------------------------------------------------------


def read(body: dict, name: str, kind: type) -> Any:
    """The required body field ``name``, of type ``kind`` (an int is a float too; a bool is neither)."""
    check(name in body, "bad_fields", f"missing field {name!r}")
    value = body[name]
    if kind in (int, float):
        ok = isinstance(value, int if kind is int else int | float) and not isinstance(value, bool)
    else:
        ok = isinstance(value, kind)
    check(ok, "bad_fields", f"field {name!r} has type {type(value).__name__}")
    return float(value) if kind is float else value


@functools.cache
def _wire_fields(cls: type) -> tuple[tuple[dataclasses.Field, type], ...]:
    hints = typing.get_type_hints(cls)
    return tuple((f, typing.get_origin(hints[f.name]) or hints[f.name]) for f in dataclasses.fields(cls))


def within(low: float, high: float = math.inf) -> dict[str, Any]:
    """Field metadata: a number read from the wire must lie in ``[low, high]``."""
    return {"within": (low, high)}


def read_fields(cls: type, body: dict, **given: Any) -> dict[str, Any]:
    """Keyword arguments for the message dataclass ``cls``: ``given``, and every other field read from ``body``
    as its annotation's type (a float must be finite, a number ``within`` its bounds); a field missing from
    ``body`` takes the dataclass's default, one without a default (or marked ``WIRE_REQUIRED``) is refused."""
    out = dict(given)
    for f, kind in _wire_fields(cls):
        if f.name in given:
            continue
        if f.name not in body and _has_default(f) and not f.metadata.get("wire_required"):
            out[f.name] = _default(f)
            continue
        value = out[f.name] = read(body, f.name, kind)
        low, high = f.metadata.get("within", (-math.inf, math.inf))
        in_range = kind not in (int, float) or low <= value <= high
        check(in_range, "bad_fields", f"{f.name} {value} not in [{low}, {high}]")
        check(kind is not float or math.isfinite(value), "bad_fields", f"{f.name} {value}")
    return out


def _has_default(f: dataclasses.Field) -> bool:
    return f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING


def _default(f: dataclasses.Field) -> Any:
    return f.default if f.default is not dataclasses.MISSING else f.default_factory()


def field_default(cls: type, name: str) -> Any:
    """The default of field ``name`` of dataclass ``cls``."""
    return _default(next(f for f in dataclasses.fields(cls) if f.name == name))
