"""One fixed example of every message type, used by the protocol tests and to (re)write the golden fixtures.

Run ``python -m tests.protocol_samples`` only when the protocol version is bumped on purpose.
"""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np

from common import protocol as p

FIXTURES = Path(__file__).parent / "fixtures" / f"protocol_v{p.PROTOCOL_VERSION}"
# Version 3's last bytes (before v4 added ExperienceBatch.token_rewards): what a peer of an older release sends.
PREVIOUS_VERSION_FIXTURES = Path(__file__).parent / "fixtures" / "protocol_v3"


def samples() -> dict[str, p.Message]:
    return {
        "hello": p.Hello(
            actor_id=3,
            config_hash="0123456789abcdef",
            host="mac-mini",
            pid=4242,
            num_actors=4,
            incarnation="inc-1",
        ),
        "welcome": p.Welcome(
            policy_version=7, run_id="run-abc", config_hash="0123456789abcdef", next_batch=12, token="tok-9"
        ),
        "refuse": p.Refuse(reason="config hash mismatch"),
        "experience": p.ExperienceBatch(
            actor_id=1,
            batch_id=9,
            policy_version=4,
            sequences=(p.Sequence_(3, 2, 0.5, "stop", 0), p.Sequence_(2, 1, -1.0, "length", 1)),
            tokens=np.array([1, 2, 3, 4, 5, 6, 7, 8], np.int32),
            behaviour_logprobs=np.array([-0.5, -1.25, -2.0], np.float32),
            ref_logprobs=np.array([-0.75, -1.0, -2.5], np.float32),
            gen_tokens_per_s=123.5,
            token="tok-9",
            loss_mask=np.array([1, 0, 1], np.uint8),
        ),
        "experience_turn_rewards": p.ExperienceBatch(  # a multi-turn episode's per-turn rewards
            actor_id=1,
            batch_id=10,
            policy_version=4,
            sequences=(p.Sequence_(2, 4, 1.5, "stop", 0), p.Sequence_(2, 1, 0.0, "stop", 0)),
            tokens=np.array([1, 2, 3, 4, 5, 6, 1, 2, 7], np.int32),
            behaviour_logprobs=np.array([-0.5, 0.0, 0.0, -0.25, -1.0], np.float32),
            token="tok-9",
            loss_mask=np.array([1, 0, 0, 1, 1], np.uint8),
            token_rewards=np.array([0.5, 0.0, 0.0, 1.0, 0.0], np.float32),
        ),
        "weights": p.Weights(
            policy_version=5,
            checksum="c0ffee",
            names=("layers.0.q.lora_a", "layers.0.q.lora_b"),
            shapes=((2, 3), (1, 2)),
            dtype="bfloat16",
            flat=np.array([16256, 16384, 16448, 16512, 16544, 16576, 16592, 16608], np.uint16),
            run_id="run-abc",
        ),
        "weights_announce": p.Weights(
            policy_version=6,
            checksum="c0ffee",
            names=("layers.0.q.weight",),
            shapes=((3, 4),),
            dtype="float32",
            flat=np.zeros(0, np.float32),
            run_id="run-abc",
            chunk_size=5,
        ),
        "weights_chunk_request": p.WeightsChunkRequest(actor_id=2, policy_version=6, index=1),
        "weights_chunk": p.WeightsChunk(
            policy_version=6, index=1, dtype="float32", data=np.array([5.0, 6.0, 7.5, -8.0, 9.0], np.float32)
        ),
        "weights_request": p.WeightsRequest(actor_id=2, have_version=3),
        "heartbeat": p.Heartbeat(
            sender="actor-1", policy_version=4, checksum="c0ffee", stats={"gen_tokens_per_s": 10.5}
        ),
        "shutdown": p.Shutdown(reason="run finished"),
        "rollout_request": p.RolloutRequest(actor_id=2, sequences=16, returned=8),
        "rollout_grant": p.RolloutGrant(policy_version=6),
    }


def pack_frames(frames) -> bytes:
    """Frames as one file: each frame as a 4-byte little-endian length then its bytes."""
    return b"".join(struct.pack("<I", len(f)) + bytes(f) for f in frames)


def unpack_frames(data: bytes) -> list[bytes]:
    frames, offset = [], 0
    while offset < len(data):
        (size,) = struct.unpack_from("<I", data, offset)
        frames.append(data[offset + 4 : offset + 4 + size])
        offset += 4 + size
    return frames


if __name__ == "__main__":
    FIXTURES.mkdir(parents=True, exist_ok=True)
    for name, msg in samples().items():
        (FIXTURES / f"{name}.bin").write_bytes(pack_frames(p.encode(msg)))
