import dataclasses
import struct

import msgpack
import numpy as np
import pytest

from common import protocol as p
from tests.protocol_samples import (
    FIXTURES,
    PREVIOUS_VERSION_FIXTURES,
    pack_frames,
    samples,
    unpack_frames,
)


def assert_same(a: p.Message, b: p.Message) -> None:
    assert type(a) is type(b)
    for key, value in a.__dict__.items():
        other = b.__dict__[key]
        if isinstance(value, np.ndarray) or (
            isinstance(value, tuple) and value and isinstance(value[0], np.ndarray)
        ):
            for x, y in zip(
                np.atleast_1d(value) if isinstance(value, np.ndarray) else value, other, strict=True
            ):
                np.testing.assert_array_equal(x, y)
        else:
            assert value == other, key


@pytest.mark.parametrize("name", sorted(samples()))
def test_round_trip(name):
    msg = samples()[name]
    assert_same(p.decode([bytes(f) for f in p.encode(msg)]), msg)


@pytest.mark.parametrize("name", sorted(samples()))
def test_golden_bytes(name):
    golden = (FIXTURES / f"{name}.bin").read_bytes()
    assert pack_frames(p.encode(samples()[name])) == golden, "the wire format changed: bump PROTOCOL_VERSION"
    assert_same(p.decode(unpack_frames(golden)), samples()[name])


PREVIOUS = sorted(n for n in samples() if (PREVIOUS_VERSION_FIXTURES / f"{n}.bin").exists())


@pytest.mark.parametrize("name", PREVIOUS)
def test_messages_of_the_previous_version_are_refused_by_their_version(name):
    """v4 changed what an experience message means (per-turn rewards, which a v3 learner would ignore): a v3
    peer's message is refused by its header, before its body is read, with the reason counted."""
    with pytest.raises(p.ProtocolError) as refused:
        p.decode(unpack_frames((PREVIOUS_VERSION_FIXTURES / f"{name}.bin").read_bytes()))
    assert refused.value.reason == "bad_version"


def test_a_loss_mask_must_be_zeros_and_ones_over_the_response_tokens():
    sample = samples()["experience"]
    for bad in (
        np.array([1, 2, 1], np.uint8),
        np.array([1, 0], np.uint8),
        np.array([1.0, 0.0, 1.0], np.float32),
    ):
        with pytest.raises(p.ProtocolError):
            p.decode([bytes(f) for f in p.encode(dataclasses.replace(sample, loss_mask=bad))])
    plain = p.decode([bytes(f) for f in p.encode(dataclasses.replace(sample, loss_mask=None))])
    assert plain.loss_mask is None


TOKEN_REWARD_REFUSALS = {
    "bad_dtype": np.array([0.5, 0.0, 0.0, 1.0, 0.0], np.float64),
    "bad_lengths": np.array([0.5, 0.0, 0.0, 1.0], np.float32),  # one short: rows would shift
    "bad_rewards": np.array([0.5, 0.0, 0.0, np.nan, 0.0], np.float32),
}


@pytest.mark.parametrize("reason", [*sorted(TOKEN_REWARD_REFUSALS), "bad_rewards on an environment token"])
def test_token_rewards_are_refused_with_their_reason(reason):
    """Per-token rewards must be float32, one per response token, finite, and 0 where ``loss_mask`` is 0 (an
    environment's token: nothing the model did there earned a reward)."""
    sample = samples()["experience_turn_rewards"]
    bad = TOKEN_REWARD_REFUSALS.get(reason, np.array([0.5, 0.25, 0.0, 1.0, 0.0], np.float32))
    with pytest.raises(p.ProtocolError) as refused:
        p.decode([bytes(f) for f in p.encode(dataclasses.replace(sample, token_rewards=bad))])
    assert refused.value.reason == reason.split()[0]


def test_token_rewards_are_optional_and_need_no_loss_mask():
    sample = samples()["experience_turn_rewards"]
    plain = p.decode([bytes(f) for f in p.encode(dataclasses.replace(sample, token_rewards=None))])
    assert plain.token_rewards is None and plain.loss_mask is not None
    # a single-turn batch may carry rewards per token too: every token is the model's
    single = dataclasses.replace(sample, loss_mask=None, token_rewards=np.full(5, 0.25, np.float32))
    assert p.decode([bytes(f) for f in p.encode(single)]).token_rewards.tolist() == [0.25] * 5
    # the golden experience without token rewards decodes to None: the score alone
    golden = p.decode(unpack_frames((FIXTURES / "experience.bin").read_bytes()))
    assert golden.token_rewards is None


def test_large_arrays_arrive_intact():
    big = np.random.default_rng(0).normal(size=(1024, 1024)).astype(np.float32)
    msg = p.Weights(1, "x", ("w",), ((1024, 1024),), "float32", big.reshape(-1))
    out = p.decode([bytes(f) for f in p.encode(msg)])
    assert out.flat.dtype == np.float32 and out.shapes == ((1024, 1024),)
    np.testing.assert_array_equal(out.flat.reshape(1024, 1024), big)


def test_weights_whose_shapes_do_not_fill_the_buffer_are_refused():
    frames = frames_of("weights")
    body = msgpack.unpackb(frames[1])
    body["shapes"][1] = [2, 2]
    with pytest.raises(p.ProtocolError, match="bad_shape"):
        p.decode([frames[0], msgpack.packb(body), *frames[2:]])
    body["shapes"] = body["shapes"][:1]
    with pytest.raises(p.ProtocolError, match="bad_fields"):
        p.decode([frames[0], msgpack.packb(body), *frames[2:]])


def frames_of(name):
    return [bytes(f) for f in p.encode(samples()[name])]


def with_body(frames, **changes):
    body = msgpack.unpackb(frames[1])
    body.update(changes)
    return [frames[0], msgpack.packb(body), *frames[2:]]


REJECTIONS = {
    "bad_magic": lambda f: [b"XPPO" + f[0][4:], *f[1:]],
    "bad_version": lambda f: [struct.pack(">4sHB", b"MPPO", 99, 4), *f[1:]],
    "bad_type": lambda f: [struct.pack(">4sHB", b"MPPO", p.PROTOCOL_VERSION, 200), *f[1:]],
    "bad_header": lambda f: [f[0][:3], *f[1:]],
    "bad_frames": lambda f: f[:1],
    "bad_body": lambda f: [f[0], b"\xc1\xc1garbage", *f[2:]],
    "bad_arrays": lambda f: f[:-1],
    "bad_fields": lambda f: with_body(f, actor_id="one"),
    "bad_lengths": lambda f: with_body(f, sequences=[[3, 2, 0.5, "stop"], [2, 2, -1.0, "length"]]),
    "bad_dtype": lambda f: with_body(
        f, arrays=[{"name": "tokens", "dtype": "float32", "shape": [8]}, *msgpack.unpackb(f[1])["arrays"][1:]]
    ),
    "bad_shape": lambda f: with_body(
        f, arrays=[{"name": "tokens", "dtype": "int32", "shape": [9]}, *msgpack.unpackb(f[1])["arrays"][1:]]
    ),
}


@pytest.mark.parametrize("reason", sorted(REJECTIONS))
def test_rejections_name_their_reason(reason):
    frames = REJECTIONS[reason](frames_of("experience"))
    with pytest.raises(p.ProtocolError) as err:
        p.decode(frames)
    assert err.value.reason == reason


def test_unknown_dtype_name_and_body_not_a_map():
    frames = frames_of("weights")
    body = msgpack.unpackb(frames[1])
    body["arrays"][0]["dtype"] = "object"
    with pytest.raises(p.ProtocolError, match="bad_dtype"):
        p.decode([frames[0], msgpack.packb(body), *frames[2:]])
    with pytest.raises(p.ProtocolError, match="bad_body"):
        p.decode([frames[0], msgpack.packb([1, 2, 3])])


def test_oversized_messages_are_refused_before_parsing():
    frames = frames_of("experience")
    with pytest.raises(p.ProtocolError) as err:
        p.decode(frames, max_bytes=sum(len(f) for f in frames) - 1)
    assert err.value.reason == "too_large"


def test_heartbeat_stats_must_be_numbers():
    frames = with_body(frames_of("heartbeat"), stats={"x": "not a number"})
    with pytest.raises(p.ProtocolError, match="bad_fields"):
        p.decode(frames)


def test_an_empty_weights_buffer_is_only_an_announcement_with_a_chunk_size():
    announce = samples()["weights_announce"]
    frames = [bytes(f) for f in p.encode(dataclasses.replace(announce, chunk_size=0))]
    with pytest.raises(p.ProtocolError, match="bad_shape"):
        p.decode(frames)
    assert p.decode([bytes(f) for f in p.encode(announce)]).num_chunks() == 3


HOSTILE = {
    # an experience array whose declared shape overflows int64, or has more than 64 dimensions
    "overflowing shape": lambda f: with_body(
        f, arrays=[{"name": "tokens", "dtype": "int32", "shape": [2**40, 2**40, 2**40]}, *msgpack.unpackb(f[1])["arrays"][1:]]
    ),
    "65 dimensions": lambda f: with_body(
        f, arrays=[{"name": "tokens", "dtype": "int32", "shape": [1] * 65}, *msgpack.unpackb(f[1])["arrays"][1:]]
    ),
    "a boolean dimension": lambda f: with_body(
        f, arrays=[{"name": "tokens", "dtype": "int32", "shape": [True]}, *msgpack.unpackb(f[1])["arrays"][1:]]
    ),
}  # fmt: skip


@pytest.mark.parametrize("attack", sorted(HOSTILE))
def test_hostile_array_shapes_are_refused_not_raised(attack):
    """Attack table row 1 (issue 15): the error escaped ``decode`` and the learner exited."""
    with pytest.raises(p.ProtocolError) as err:
        p.decode(HOSTILE[attack](frames_of("experience")))
    assert err.value.reason == "bad_shape"


@pytest.mark.parametrize(
    ("name", "changes"),
    [
        ("hello", {"num_actors": 2**40}),  # the learner then listed 2**40 actors that never started
        ("hello", {"actor_id": -1}),
        ("rollout_request", {"returned": -(10**9)}),  # counted as received: every grant halted
        ("rollout_request", {"sequences": 0}),
        ("heartbeat", {"stats": {f"s{i}": 1.0 for i in range(10_000)}}),  # 10,000 metrics columns a row
        ("heartbeat", {"stats": {"x" * 1000: 1.0}}),
        ("heartbeat", {"stats": {"x": float("nan")}}),
    ],
)
def test_out_of_range_control_fields_are_refused(name, changes):
    with pytest.raises(p.ProtocolError) as err:
        p.decode(with_body(frames_of(name), **changes))
    assert err.value.reason == "bad_fields"
