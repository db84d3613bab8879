"""The wire protocol between actors and learners: versioned messages as ``[header, msgpack body, *array frames]``.

Header (7 bytes): magic ``b"MPPO"``, protocol version (uint16, big-endian), message type (uint8). It is checked
before the body is parsed; on PUB/SUB it doubles as the topic. The body is a msgpack map. Arrays travel as raw
little-endian frames after the body, each described in the body's ``"arrays"`` list by name, dtype and shape, in
frame order. Nothing is ever unpickled.

Rules: within a version, fields may only be added, with a dataclass default (decoding reads each field as its
dataclass declares it, ``common.wire.read_fields``: an older peer's message takes the defaults); renaming,
removing or changing the meaning of a field bumps ``PROTOCOL_VERSION``. ``tests/fixtures/protocol_v4`` holds
golden bytes.

``decode`` raises ``ProtocolError`` with a short ``reason`` (used as a ``reject/<reason>`` counter) for every
malformed input: the receiver counts, logs and drops it, and keeps running.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any, Final

import msgpack
import numpy as np

from common import wire
from common.per_token import PER_TOKEN, checked_per_token
from common.wire import DTYPES as DTYPES  # re-exported: the wire dtypes, where callers look for them
from common.wire import ProtocolError, check, read_fields

PROTOCOL_VERSION: Final = 4  # v2: Weights as one flat buffer; v3: ExperienceBatch.loss_mask (multi-turn);
# v4: ExperienceBatch.token_rewards (per-turn rewards: a v3 learner would ignore them and train on the score alone)
DEFAULT_MAX_MESSAGE_BYTES: Final = 256 * 1024 * 1024
MAX_ACTORS: Final = 4096
"""The most actors a hello may say its run has (the learner reports those that never start, one by one)."""
MAX_STATS: Final = 64
"""The most statistics a heartbeat may carry (each becomes a metrics column), names of at most 64 characters."""
MAX_BATCH_SEQUENCES: Final = 65536
"""The most sequences a rollout request may ask for (or say it returned)."""


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


@dataclass(frozen=True)
class Hello:
    """Actor -> learner over DEALER/ROUTER: who I am and what I run."""

    actor_id: int = field(metadata=wire.within(0, MAX_ACTORS - 1))
    config_hash: str
    protocol_version: int = field(default=PROTOCOL_VERSION, metadata=wire.WIRE_REQUIRED)
    host: str = ""
    pid: int = 0
    num_actors: int = field(default=0, metadata=wire.within(0, MAX_ACTORS))
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
    batch_id: int = field(metadata=wire.within(0))
    policy_version: int = field(metadata=wire.within(0))
    sequences: tuple[Sequence_, ...]
    tokens: np.ndarray
    behaviour_logprobs: np.ndarray
    ref_logprobs: np.ndarray | None = None
    gen_tokens_per_s: float = 0.0
    loss_mask: np.ndarray | None = None
    """uint8 per response token: 1 sampled by the model (trained on), 0 written by an environment between the
    turns of a multi-turn episode (context only). None: every response token is the model's (v3: a v2 learner
    would have trained on environment tokens, hence the version)."""
    token: str = ""
    """The token of the Welcome this actor process got (see ``Welcome.token``)."""
    token_rewards: np.ndarray | None = None
    """float32 per response token: rewards earned at a model token (a turn's reward on its last token); 0 on
    environment tokens. ``score`` stays the episode's return: the learner puts what these leave of it on the
    last model token. None: the score alone (v4: a v3 learner would have ignored them, hence the version)."""


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
    chunk_size: int = field(default=0, metadata=wire.within(0))
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
    index: int = field(metadata=wire.within(0))
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
    sequences: int = field(metadata=wire.within(1, MAX_BATCH_SEQUENCES))
    returned: int = field(default=0, metadata=wire.within(0, MAX_BATCH_SEQUENCES))


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
_TYPES: dict[type, MsgType] = dict(zip(typing.get_args(Message), MsgType, strict=True))
"""Each message class's type code: ``Message`` lists the classes in ``MsgType``'s order (the golden bytes,
whose headers carry the codes, check it)."""


def header_for(msg_type: MsgType) -> bytes:
    return wire.HEADER.pack(wire.MAGIC, PROTOCOL_VERSION, int(msg_type))


def encode(msg: Message) -> list[bytes | memoryview]:
    """``[header, body, *array frames]`` for ``msg``."""
    body, arrays = _to_body(msg)
    body["arrays"] = [wire.array_meta(name, a, dt) for name, a, dt in arrays]
    header = header_for(_TYPES[type(msg)])
    return [header, msgpack.packb(body, use_bin_type=True), *(wire.frame(a) for _, a, _ in arrays)]


def _to_body(msg: Message) -> tuple[dict[str, Any], list[tuple[str, np.ndarray, str | None]]]:
    """The msgpack body (the message's fields in declaration order) and the arrays that travel as frames."""
    body = dict(msg.__dict__)
    if isinstance(msg, ExperienceBatch):  # sequences go last, as lists; ref_logprobs only when there are some
        body["sequences"] = [dataclasses.astuple(s) for s in body.pop("sequences")]
        names = ("tokens", "behaviour_logprobs", "ref_logprobs", *PER_TOKEN)
        arrays = [(name, body.pop(name), None) for name in names]
        return body, [a for a in arrays if a[1] is not None]
    if isinstance(msg, Weights | WeightsChunk):  # one array, in the wire dtype ``dtype``
        name = "flat" if isinstance(msg, Weights) else "data"
        return body, [(name, body.pop(name), body.pop("dtype"))]
    return body, []


# -- decoding ---------------------------------------------------------------------------------------------------


def decode_header(frame: bytes) -> MsgType:
    """Validate the header frame alone (magic, version, type); raises ProtocolError."""
    type_code = wire.read_header(frame, PROTOCOL_VERSION)
    try:
        return MsgType(type_code)
    except ValueError:
        raise ProtocolError("bad_type", f"unknown message type {type_code}") from None


def decode(frames: Sequence[bytes | memoryview], max_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> Message:
    """Parse and validate one multipart message; raises ProtocolError (never anything else) on bad input."""
    check(len(frames) >= 2, "bad_frames", f"{len(frames)} frames, need at least header and body")
    total = sum(len(f) for f in frames)
    check(total <= max_bytes, "too_large", f"{total} bytes > limit {max_bytes}")
    msg_type = decode_header(bytes(frames[0]))
    body = wire.read_body(frames[1])
    try:
        arrays = wire.read_arrays(body.pop("arrays", []), frames[2:])
        build = _BUILDERS.get(msg_type)
        return build(body, arrays) if build else _CLASSES[msg_type](**read_fields(_CLASSES[msg_type], body))
    except ProtocolError:
        raise
    except Exception as e:  # whatever a hostile body provokes (overflow, recursion, ...) is a refusal
        raise ProtocolError("bad_fields", f"{msg_type.name}: {type(e).__name__}: {e}"[:200]) from None


def _sequence(entry: Any) -> Sequence_:
    """One ``[prompt_len, response_len, score, finish_reason(, prompt_index)]`` entry of an experience body."""
    check(isinstance(entry, list) and len(entry) >= 4, "bad_fields", f"sequence entry {entry!r:.80}")
    prompt_len, response_len, score, reason = entry[:4]
    lengths_ok = (
        isinstance(prompt_len, int) and isinstance(response_len, int) and min(prompt_len, response_len) >= 1
    )
    check(lengths_ok, "bad_lengths", f"prompt_len={prompt_len!r} response_len={response_len!r}")
    check(isinstance(score, int | float) and not isinstance(score, bool), "bad_fields", f"score {score!r}")
    has_index = len(entry) > 4 and isinstance(entry[4], int)
    prompt_index = entry[4] if has_index else wire.field_default(Sequence_, "prompt_index")
    check(prompt_index >= 0, "bad_fields", f"prompt index {prompt_index}")
    return Sequence_(prompt_len, response_len, float(score), str(reason), prompt_index)


def _experience_arrays(arrays: dict[str, np.ndarray], sequences: list[Sequence_]) -> dict[str, Any]:
    """The batch's token and log-prob arrays: 1-D, of their dtypes, as long as its sequences say (the optional
    per-token arrays: ``common/per_token.py``)."""
    tokens, behaviour, ref = (arrays.get(k) for k in ("tokens", "behaviour_logprobs", "ref_logprobs"))
    required = tokens is not None and behaviour is not None
    check(required, "bad_arrays", "tokens and behaviour_logprobs are required")
    check(tokens.dtype == np.int32 and tokens.ndim == 1, "bad_dtype", f"tokens {tokens.dtype} {tokens.shape}")
    check(behaviour.dtype == np.float32 and behaviour.ndim == 1, "bad_dtype", f"behaviour {behaviour.dtype}")
    n_response = sum(s.response_len for s in sequences)
    n_tokens = n_response + sum(s.prompt_len for s in sequences)
    check(len(tokens) == n_tokens, "bad_lengths", f"{len(tokens)} tokens, sequences say {n_tokens}")
    check(len(behaviour) == n_response, "bad_lengths", f"{len(behaviour)} log-probs, sequences: {n_response}")
    ref_ok = ref is None or (ref.dtype == np.float32 and ref.shape == behaviour.shape)
    check(ref_ok, "bad_dtype", f"ref_logprobs {getattr(ref, 'dtype', '')} {getattr(ref, 'shape', '')}")
    given = {"tokens": tokens, "behaviour_logprobs": behaviour, "ref_logprobs": ref}
    return given | checked_per_token(arrays, n_response)


def _build_experience(body: dict, arrays: dict[str, np.ndarray]) -> ExperienceBatch:
    raw = wire.read(body, "sequences", list)
    check(len(raw) <= MAX_BATCH_SEQUENCES, "bad_lengths", f"{len(raw)} sequences > {MAX_BATCH_SEQUENCES}")
    sequences = [_sequence(s) for s in raw]
    given = _experience_arrays(arrays, sequences)
    return ExperienceBatch(**read_fields(ExperienceBatch, body, sequences=tuple(sequences), **given))


def _build_weights(body: dict, arrays: dict[str, np.ndarray]) -> Weights:
    names, shapes = wire.read(body, "names", list), wire.read(body, "shapes", list)
    check(set(arrays) == {"flat"}, "bad_arrays", f"weights carry arrays {sorted(arrays)}, expected ['flat']")
    flat = arrays["flat"]
    names_ok = len(names) == len(shapes) and all(isinstance(n, str) for n in names)
    check(names_ok, "bad_fields", f"{len(names)} names for {len(shapes)} shapes")
    shapes_ok = all(isinstance(s, list) and all(isinstance(d, int) and d >= 0 for d in s) for s in shapes)
    check(shapes_ok, "bad_shape", f"shapes {shapes!r:.80}")
    shapes = tuple(tuple(s) for s in shapes)
    given = {
        "names": tuple(names),
        "shapes": shapes,
        "dtype": wire.wire_dtype(flat),
        "flat": flat.reshape(-1),
    }
    msg = Weights(**read_fields(Weights, body, **given))
    total = sum(msg.sizes())
    announced = msg.chunk_size > 0 and flat.size == 0  # the elements come as chunks
    check(
        total == flat.size or announced, "bad_shape", f"shapes hold {total} elements, the buffer {flat.size}"
    )
    return msg


def _build_chunk(body: dict, arrays: dict[str, np.ndarray]) -> WeightsChunk:
    check(set(arrays) == {"data"}, "bad_arrays", f"a chunk carries {sorted(arrays)}, expected ['data']")
    data = arrays["data"]
    check(data.ndim == 1, "bad_shape", f"chunk data of shape {data.shape}")
    return WeightsChunk(**read_fields(WeightsChunk, body, dtype=wire.wire_dtype(data), data=data))


def _build_hello(body: dict, _: dict) -> Hello:
    fields = read_fields(Hello, body)
    return Hello(**{**fields, "incarnation": fields["incarnation"][:64]})


def _build_heartbeat(body: dict, _: dict) -> Heartbeat:
    """A heartbeat whose statistics are at most ``MAX_STATS`` short names with finite numbers."""
    fields = read_fields(Heartbeat, body)
    raw = fields["stats"]
    check(len(raw) <= MAX_STATS, "bad_fields", f"{len(raw)} heartbeat stats > {MAX_STATS}")
    stats = {}
    for key, value in raw.items():
        check(isinstance(key, str) and len(key) <= 64, "bad_fields", f"heartbeat stat name {key!r:.80}")
        stats[key] = float(value)
        check(math.isfinite(stats[key]), "bad_fields", f"heartbeat stat {key} = {stats[key]}")
    return Heartbeat(**{**fields, "stats": stats})


_CLASSES = {msg_type: cls for cls, msg_type in _TYPES.items()}
_BUILDERS = {  # the messages checked beyond their fields' types; the others are ``read_fields`` alone
    MsgType.HELLO: _build_hello,
    MsgType.EXPERIENCE: _build_experience,
    MsgType.WEIGHTS: _build_weights,
    MsgType.WEIGHTS_CHUNK: _build_chunk,
    MsgType.HEARTBEAT: _build_heartbeat,
}
