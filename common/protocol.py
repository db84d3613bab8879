"""The wire protocol between actors and learners: versioned messages as ``[header, msgpack body, *array frames]``.

Header (7 bytes): magic ``b"MPPO"``, protocol version (uint16, big-endian), message type (uint8). It is checked
before the body is parsed; on PUB/SUB it doubles as the topic. The body is a msgpack map. Arrays travel as raw
little-endian frames after the body, each described in the body's ``"arrays"`` list by name, dtype and shape, in
frame order. Nothing is ever unpickled.

Rules: within a version, fields may only be added (with defaults on decode); renaming, removing or changing the
meaning of a field bumps ``PROTOCOL_VERSION``. ``tests/fixtures/protocol_v2`` holds golden bytes.

``decode`` raises ``ProtocolError`` with a short ``reason`` (used as a ``reject/<reason>`` counter) for every
malformed input: the receiver counts, logs and drops it, and keeps running.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any, Final

import msgpack
import numpy as np

MAGIC: Final = b"MPPO"
PROTOCOL_VERSION: Final = 2  # v2: Weights as one flat buffer
HEADER = struct.Struct(">4sHB")
DEFAULT_MAX_MESSAGE_BYTES: Final = 256 * 1024 * 1024
MAX_DIMS: Final = 8
"""Arrays on the wire have at most this many dimensions (ours are 1-D)."""
MAX_ACTORS: Final = 4096
"""The most actors a hello may say its run has (the learner reports those that never start, one by one)."""
MAX_STATS: Final = 64
"""The most statistics a heartbeat may carry (each becomes a metrics column), names of at most 64 characters."""
MAX_BATCH_SEQUENCES: Final = 65536
"""The most sequences a rollout request may ask for (or say it returned)."""
# Wire dtypes; bfloat16 travels as its raw 16-bit pattern (NumPy has no bfloat16).
DTYPES: Final = {
    "int32": np.int32,
    "int64": np.int64,
    "float32": np.float32,
    "float16": np.float16,
    "bfloat16": np.uint16,
    "uint32": np.uint32,
}


class MsgType(IntEnum):
    HELLO = 1
    WELCOME = 2
    REFUSE = 3
    EXPERIENCE = 4
    WEIGHTS = 5
    WEIGHTS_REQUEST = 6
    HEARTBEAT = 7
    SHUTDOWN = 8
    ROLLOUT_REQUEST = 9
    ROLLOUT_GRANT = 10
    WEIGHTS_CHUNK_REQUEST = 11
    WEIGHTS_CHUNK = 12


class ProtocolError(ValueError):
    """A message that cannot be accepted; ``reason`` is a short counter name such as 'bad_magic'."""

    def __init__(self, reason: str, detail: str):
        self.reason = reason
        super().__init__(f"{reason}: {detail}")


@dataclass(frozen=True)
class Hello:
    """Actor -> learner over DEALER/ROUTER: who I am and what I run."""

    actor_id: int
    config_hash: str
    protocol_version: int = PROTOCOL_VERSION
    host: str = ""
    pid: int = 0
    num_actors: int = 0
    """Actors in this actor's run (the learner reports the ones that never start); 0: unknown."""
    incarnation: str = ""
    """Random per actor process: tells a restarted actor from the same one saying hello again."""


@dataclass(frozen=True)
class Welcome:
    """Learner -> actor: accepted; the current policy version, this learner run's id and config hash (the actor
    checks it too, and takes snapshots of this run only), and where the actor continues after a resume."""

    policy_version: int
    run_id: str
    config_hash: str = ""
    next_batch: int = -1
    """The actor's next batch id (its prompt cursor and seeds follow) from the checkpoint; -1: keep its own."""
    token: str = ""
    """Secret of this admission: the actor puts it in every experience batch (PUSH/PULL names no sender, so
    without it anyone who can reach the port could send as this actor), and batches of an earlier admission
    (a dead predecessor's, an earlier learner run's) carry another one and are dropped."""


@dataclass(frozen=True)
class Refuse:
    """Learner -> actor: not accepted, and why (the actor logs it and exits non-zero).

    ``rejoin``: not refused for good: this learner does not know the actor (it restarted), which should say hello.
    """

    reason: str
    rejoin: bool = False


@dataclass(frozen=True)
class Sequence_:
    """One sampled sequence inside an ``ExperienceBatch`` (its token arrays live in the batch's frames)."""

    prompt_len: int
    response_len: int
    score: float
    finish_reason: str
    prompt_index: int = 0


@dataclass(frozen=True)
class ExperienceBatch:
    """Actor -> learner over PUSH/PULL: scored sequences sampled with policy ``policy_version``.

    ``tokens`` concatenates every sequence's prompt then response ids; ``behaviour_logprobs`` (and the optional
    ``ref_logprobs``) concatenate the per-response-token values, in sequence order.
    """

    actor_id: int
    batch_id: int
    policy_version: int
    sequences: tuple[Sequence_, ...]
    tokens: np.ndarray
    behaviour_logprobs: np.ndarray
    ref_logprobs: np.ndarray | None = None
    gen_tokens_per_s: float = 0.0
    token: str = ""
    """The token of the Welcome this actor process got (see ``Welcome.token``)."""


@dataclass(frozen=True)
class Weights:
    """Learner -> actors over PUB (and as the reply to a request): the full adapter set of one policy version.

    All tensors travel as one flat buffer in one frame, in ``names`` order with ``shapes``: a per-tensor frame
    cost ~14 us of Python each way, 6 ms for SmolLM2's 420 adapter tensors (v1), more than the bytes themselves.
    """

    policy_version: int
    checksum: str
    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    dtype: str
    """Wire dtype of ``flat`` (bfloat16 travels as uint16)."""
    flat: np.ndarray
    """1-D, every tensor's elements back to back."""
    run_id: str = ""
    """The publishing learner run's id (actors take snapshots of the run that welcomed them only)."""
    chunk_size: int = 0
    """0: ``flat`` holds the snapshot. Else this is an announcement with an empty ``flat``: the snapshot is
    fetched as ``WeightsChunk``s of ``chunk_size`` elements (the last one shorter), a few at a time."""

    shared: str = ""
    """With an announcement: a file on the learner's machine holding the elements; actors there read it (one
    copy, no socket) and others fetch the chunks."""

    def sizes(self) -> list[int]:
        return [math.prod(shape) for shape in self.shapes]

    def num_chunks(self) -> int:
        return -(-sum(self.sizes()) // self.chunk_size) if self.chunk_size else 0


@dataclass(frozen=True)
class WeightsRequest:
    """Actor -> learner: send me the current snapshot (joining late, or having missed an update)."""

    actor_id: int
    have_version: int = -1


@dataclass(frozen=True)
class WeightsChunkRequest:
    """Actor -> learner: chunk ``index`` of the announced snapshot ``policy_version``."""

    actor_id: int
    policy_version: int
    index: int


@dataclass(frozen=True)
class WeightsChunk:
    """Learner -> actor: elements ``[index * chunk_size, (index + 1) * chunk_size)`` of snapshot ``policy_version``
    (the flat buffer, in its wire dtype)."""

    policy_version: int
    index: int
    dtype: str
    data: np.ndarray


@dataclass(frozen=True)
class Heartbeat:
    """Either direction: alive, with the sender's stats (actors echo the version and adapter checksum in use)."""

    sender: str
    policy_version: int
    checksum: str = ""
    stats: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class Shutdown:
    """Either direction: stop now, and why."""

    reason: str


@dataclass(frozen=True)
class RolloutRequest:
    """Actor -> learner: may I generate a batch of ``sequences``? (The learner bounds work in flight.)

    ``returned``: sequences of earlier grants this actor dropped itself (gone stale while it could not send),
    which will therefore never arrive.
    """

    actor_id: int
    sequences: int
    returned: int = 0


@dataclass(frozen=True)
class RolloutGrant:
    """Learner -> actor: generate one batch now; ``policy_version`` is the learner's at the time of the grant."""

    policy_version: int


Message = (
    Hello
    | Welcome
    | Refuse
    | ExperienceBatch
    | Weights
    | WeightsRequest
    | Heartbeat
    | Shutdown
    | RolloutRequest
    | RolloutGrant
    | WeightsChunkRequest
    | WeightsChunk
)
_TYPES: dict[type, MsgType] = {
    Hello: MsgType.HELLO,
    Welcome: MsgType.WELCOME,
    Refuse: MsgType.REFUSE,
    ExperienceBatch: MsgType.EXPERIENCE,
    Weights: MsgType.WEIGHTS,
    WeightsRequest: MsgType.WEIGHTS_REQUEST,
    Heartbeat: MsgType.HEARTBEAT,
    Shutdown: MsgType.SHUTDOWN,
    RolloutRequest: MsgType.ROLLOUT_REQUEST,
    RolloutGrant: MsgType.ROLLOUT_GRANT,
    WeightsChunkRequest: MsgType.WEIGHTS_CHUNK_REQUEST,
    WeightsChunk: MsgType.WEIGHTS_CHUNK,
}


def header_for(msg_type: MsgType) -> bytes:
    return HEADER.pack(MAGIC, PROTOCOL_VERSION, int(msg_type))


def _array_meta(name: str, array: np.ndarray, wire_dtype: str | None = None) -> dict[str, Any]:
    return {"name": name, "dtype": wire_dtype or array.dtype.name, "shape": list(array.shape)}


def _frame(array: np.ndarray) -> memoryview:
    return memoryview(np.ascontiguousarray(array.astype(array.dtype.newbyteorder("<"), copy=False))).cast("B")


def encode(msg: Message) -> list[bytes | memoryview]:
    """``[header, body, *array frames]`` for ``msg``."""
    msg_type = _TYPES[type(msg)]
    body, arrays = _to_body(msg)
    body["arrays"] = [_array_meta(name, a, dt) for name, a, dt in arrays]
    return [header_for(msg_type), msgpack.packb(body, use_bin_type=True), *(_frame(a) for _, a, _ in arrays)]


def _to_body(msg: Message) -> tuple[dict[str, Any], list[tuple[str, np.ndarray, str | None]]]:
    if isinstance(msg, ExperienceBatch):
        body = {
            "actor_id": msg.actor_id,
            "batch_id": msg.batch_id,
            "policy_version": msg.policy_version,
            "gen_tokens_per_s": msg.gen_tokens_per_s,
            "token": msg.token,
            "sequences": [
                [s.prompt_len, s.response_len, s.score, s.finish_reason, s.prompt_index]
                for s in msg.sequences
            ],
        }
        arrays = [("tokens", msg.tokens, None), ("behaviour_logprobs", msg.behaviour_logprobs, None)]
        if msg.ref_logprobs is not None:
            arrays.append(("ref_logprobs", msg.ref_logprobs, None))
        return body, arrays
    if isinstance(msg, Weights):
        body = {
            "policy_version": msg.policy_version,
            "checksum": msg.checksum,
            "names": list(msg.names),
            "shapes": [list(shape) for shape in msg.shapes],
            "run_id": msg.run_id,
            "chunk_size": msg.chunk_size,
            "shared": msg.shared,
        }
        return body, [("flat", msg.flat, msg.dtype)]
    if isinstance(msg, WeightsChunk):
        return {"policy_version": msg.policy_version, "index": msg.index}, [("data", msg.data, msg.dtype)]
    return dict(msg.__dict__), []


# -- decoding -------------------------------------------------------------------------------------------------


def _check(condition: bool, reason: str, detail: str) -> None:
    if not condition:
        raise ProtocolError(reason, detail)


def decode_header(frame: bytes) -> MsgType:
    """Validate the header frame alone (magic, version, type); raises ProtocolError."""
    _check(len(frame) == HEADER.size, "bad_header", f"header is {len(frame)} bytes, expected {HEADER.size}")
    magic, version, type_code = HEADER.unpack(frame)
    _check(magic == MAGIC, "bad_magic", f"magic {magic!r} is not {MAGIC!r}")
    _check(
        version == PROTOCOL_VERSION,
        "bad_version",
        f"protocol version {version}, this side speaks {PROTOCOL_VERSION}",
    )
    try:
        return MsgType(type_code)
    except ValueError:
        raise ProtocolError("bad_type", f"unknown message type {type_code}") from None


def _arrays(meta: Any, frames: Sequence[bytes | memoryview]) -> dict[str, np.ndarray]:
    _check(
        isinstance(meta, list) and len(meta) == len(frames),
        "bad_arrays",
        f"{len(frames)} array frames, body lists {meta!r:.80}",
    )
    out = {}
    for m, frame in zip(meta, frames, strict=True):
        _check(
            isinstance(m, dict) and {"name", "dtype", "shape"} <= set(m),
            "bad_arrays",
            f"array entry {m!r:.80}",
        )
        dtype = DTYPES.get(m["dtype"]) if isinstance(m["dtype"], str) else None
        _check(dtype is not None, "bad_dtype", f"dtype {m['dtype']!r} not in {sorted(DTYPES)}")
        shape = m["shape"]
        _check(
            isinstance(shape, list)
            and len(shape) <= MAX_DIMS
            and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape),
            "bad_shape",
            f"shape {shape!r:.80}",
        )
        expected = math.prod(shape) * np.dtype(dtype).itemsize  # Python ints: no overflow
        _check(
            len(frame) == expected,
            "bad_shape",
            f"{m['name']}: {len(frame)} bytes for shape {shape} {m['dtype']}",
        )
        out[str(m["name"])] = np.frombuffer(frame, dtype=np.dtype(dtype).newbyteorder("<")).reshape(shape)
    return out


def decode(frames: Sequence[bytes | memoryview], max_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> Message:
    """Parse and validate one multipart message; raises ProtocolError (never anything else) on bad input."""
    _check(len(frames) >= 2, "bad_frames", f"{len(frames)} frames, need at least header and body")
    total = sum(len(f) for f in frames)
    _check(total <= max_bytes, "too_large", f"{total} bytes > limit {max_bytes}")
    msg_type = decode_header(bytes(frames[0]))
    try:
        body = msgpack.unpackb(frames[1], raw=False, strict_map_key=True)
    except Exception as e:  # msgpack raises several unrelated types on garbage
        raise ProtocolError("bad_body", f"body is not msgpack ({type(e).__name__})") from None
    _check(isinstance(body, dict), "bad_body", f"body is {type(body).__name__}, not a map")
    try:
        arrays = _arrays(body.pop("arrays", []), frames[2:])
        return _BUILDERS[msg_type](body, arrays)
    except ProtocolError:
        raise
    except Exception as e:  # whatever a hostile body provokes (overflow, recursion, ...) is a refusal
        raise ProtocolError("bad_fields", f"{msg_type.name}: {type(e).__name__}: {e}"[:200]) from None


def _field(body: dict, name: str, kind: type | tuple[type, ...], default: Any = ...) -> Any:
    if name not in body:
        if default is ...:
            raise ProtocolError("bad_fields", f"missing field {name!r}")
        return default
    value = body[name]
    ok = isinstance(value, kind) and not (isinstance(value, bool) and kind in (int, float, (int, float)))
    _check(ok, "bad_fields", f"field {name!r} has type {type(value).__name__}")
    return value


def _build_experience(body: dict, arrays: dict[str, np.ndarray]) -> ExperienceBatch:
    raw = _field(body, "sequences", list)
    _check(len(raw) <= MAX_BATCH_SEQUENCES, "bad_lengths", f"{len(raw)} sequences > {MAX_BATCH_SEQUENCES}")
    sequences = []
    for s in raw:
        _check(isinstance(s, list) and len(s) >= 4, "bad_fields", f"sequence entry {s!r:.80}")
        prompt_len, response_len, score, reason = s[:4]
        _check(
            isinstance(prompt_len, int)
            and isinstance(response_len, int)
            and prompt_len >= 1
            and response_len >= 1,
            "bad_lengths",
            f"prompt_len={prompt_len!r} response_len={response_len!r}",
        )
        _check(
            isinstance(score, int | float) and not isinstance(score, bool), "bad_fields", f"score {score!r}"
        )
        prompt_index = s[4] if len(s) > 4 and isinstance(s[4], int) else 0
        _check(prompt_index >= 0, "bad_fields", f"prompt index {prompt_index}")
        sequences.append(Sequence_(prompt_len, response_len, float(score), str(reason), prompt_index))
    tokens, behaviour = arrays.get("tokens"), arrays.get("behaviour_logprobs")
    _check(
        tokens is not None and behaviour is not None,
        "bad_arrays",
        "tokens and behaviour_logprobs are required",
    )
    _check(
        tokens.dtype == np.int32 and tokens.ndim == 1, "bad_dtype", f"tokens {tokens.dtype} {tokens.shape}"
    )
    _check(
        behaviour.dtype == np.float32 and behaviour.ndim == 1,
        "bad_dtype",
        f"behaviour_logprobs {behaviour.dtype}",
    )
    n_tokens = sum(s.prompt_len + s.response_len for s in sequences)
    n_response = sum(s.response_len for s in sequences)
    _check(len(tokens) == n_tokens, "bad_lengths", f"{len(tokens)} tokens, sequences say {n_tokens}")
    _check(
        len(behaviour) == n_response, "bad_lengths", f"{len(behaviour)} log-probs, sequences say {n_response}"
    )
    ref = arrays.get("ref_logprobs")
    if ref is not None:
        _check(
            ref.dtype == np.float32 and ref.shape == behaviour.shape,
            "bad_dtype",
            f"ref_logprobs {ref.dtype} {ref.shape}",
        )
    msg = ExperienceBatch(
        _field(body, "actor_id", int),
        _field(body, "batch_id", int),
        _field(body, "policy_version", int),
        tuple(sequences),
        tokens,
        behaviour,
        ref,
        float(_field(body, "gen_tokens_per_s", (int, float), 0.0)),
        _field(body, "token", str, ""),
    )
    _check(
        msg.batch_id >= 0 and msg.policy_version >= 0,
        "bad_fields",
        f"batch {msg.batch_id} v{msg.policy_version}",
    )
    _check(math.isfinite(msg.gen_tokens_per_s), "bad_fields", f"gen_tokens_per_s {msg.gen_tokens_per_s}")
    return msg


def _build_weights(body: dict, arrays: dict[str, np.ndarray]) -> Weights:
    names, shapes = _field(body, "names", list), _field(body, "shapes", list)
    _check(set(arrays) == {"flat"}, "bad_arrays", f"weights carry arrays {sorted(arrays)}, expected ['flat']")
    flat = arrays["flat"]
    _check(
        len(names) == len(shapes) and all(isinstance(n, str) for n in names),
        "bad_fields",
        f"{len(names)} names for {len(shapes)} shapes",
    )
    _check(
        all(isinstance(s, list) and all(isinstance(d, int) and d >= 0 for d in s) for s in shapes),
        "bad_shape",
        f"shapes {shapes!r:.80}",
    )
    msg = Weights(
        _field(body, "policy_version", int),
        _field(body, "checksum", str),
        tuple(names),
        tuple(tuple(s) for s in shapes),
        _wire_dtype(flat),
        flat.reshape(-1),
        _field(body, "run_id", str, ""),
        _field(body, "chunk_size", int, 0),
        _field(body, "shared", str, ""),
    )
    total = sum(msg.sizes())
    _check(msg.chunk_size >= 0, "bad_fields", f"chunk_size {msg.chunk_size}")
    announced = msg.chunk_size > 0 and flat.size == 0  # the elements come as chunks
    _check(
        total == flat.size or announced, "bad_shape", f"shapes hold {total} elements, the buffer {flat.size}"
    )
    return msg


def _build_chunk(body: dict, arrays: dict[str, np.ndarray]) -> WeightsChunk:
    _check(
        set(arrays) == {"data"}, "bad_arrays", f"a chunk carries arrays {sorted(arrays)}, expected ['data']"
    )
    data = arrays["data"]
    _check(data.ndim == 1, "bad_shape", f"chunk data of shape {data.shape}")
    index = _field(body, "index", int)
    _check(index >= 0, "bad_fields", f"chunk index {index}")
    return WeightsChunk(_field(body, "policy_version", int), index, _wire_dtype(data), data)


def _build_hello(body: dict) -> Hello:
    msg = Hello(
        _field(body, "actor_id", int),
        _field(body, "config_hash", str),
        _field(body, "protocol_version", int),
        _field(body, "host", str, ""),
        _field(body, "pid", int, 0),
        _field(body, "num_actors", int, 0),
        _field(body, "incarnation", str, "")[:64],
    )
    _check(0 <= msg.actor_id < MAX_ACTORS, "bad_fields", f"actor id {msg.actor_id}")
    _check(0 <= msg.num_actors <= MAX_ACTORS, "bad_fields", f"num_actors {msg.num_actors} > {MAX_ACTORS}")
    return msg


def _stats(stats: dict) -> dict[str, float]:
    """A heartbeat's statistics: at most ``MAX_STATS`` short names with finite numbers."""
    _check(len(stats) <= MAX_STATS, "bad_fields", f"{len(stats)} heartbeat stats > {MAX_STATS}")
    out = {}
    for key, value in stats.items():
        _check(isinstance(key, str) and len(key) <= 64, "bad_fields", f"heartbeat stat name {key!r:.80}")
        number = float(value)
        _check(math.isfinite(number), "bad_fields", f"heartbeat stat {key} = {number}")
        out[key] = number
    return out


def _build_rollout_request(body: dict) -> RolloutRequest:
    msg = RolloutRequest(
        _field(body, "actor_id", int), _field(body, "sequences", int), _field(body, "returned", int, 0)
    )
    _check(0 < msg.sequences <= MAX_BATCH_SEQUENCES, "bad_fields", f"rollout request of {msg.sequences}")
    _check(
        0 <= msg.returned <= MAX_BATCH_SEQUENCES, "bad_fields", f"rollout request returning {msg.returned}"
    )
    return msg


def _wire_dtype(array: np.ndarray) -> str:
    return "bfloat16" if array.dtype == np.uint16 else array.dtype.name


_BUILDERS = {
    MsgType.HELLO: lambda b, _: _build_hello(b),
    MsgType.WELCOME: lambda b, _: Welcome(
        _field(b, "policy_version", int),
        _field(b, "run_id", str),
        _field(b, "config_hash", str, ""),
        _field(b, "next_batch", int, -1),
        _field(b, "token", str, ""),
    ),
    MsgType.REFUSE: lambda b, _: Refuse(_field(b, "reason", str), _field(b, "rejoin", bool, False)),
    MsgType.EXPERIENCE: _build_experience,
    MsgType.WEIGHTS: _build_weights,
    MsgType.WEIGHTS_REQUEST: lambda b, _: WeightsRequest(
        _field(b, "actor_id", int), _field(b, "have_version", int, -1)
    ),
    MsgType.HEARTBEAT: lambda b, _: Heartbeat(
        _field(b, "sender", str),
        _field(b, "policy_version", int),
        _field(b, "checksum", str, ""),
        _stats(_field(b, "stats", dict, {})),
    ),
    MsgType.SHUTDOWN: lambda b, _: Shutdown(_field(b, "reason", str)),
    MsgType.ROLLOUT_REQUEST: lambda b, _: _build_rollout_request(b),
    MsgType.ROLLOUT_GRANT: lambda b, _: RolloutGrant(_field(b, "policy_version", int)),
    MsgType.WEIGHTS_CHUNK_REQUEST: lambda b, _: WeightsChunkRequest(
        _field(b, "actor_id", int), _field(b, "policy_version", int), _field(b, "index", int)
    ),
    MsgType.WEIGHTS_CHUNK: _build_chunk,
}
