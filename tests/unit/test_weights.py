"""Policy snapshots: what the learner publishes is exactly what an actor ends up running, or a clear error."""

import dataclasses
import os
import stat
import zlib
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from common import protocol
from common.config import LoraConfig, ModelConfig
from common.lora import adapter_weights, attach_lora
from common.models import load_model
from common.weights import (
    AdapterSync,
    SharedSnapshots,
    SnapshotAssembly,
    announcement,
    checksum,
    private_folder,
    read_shared,
    shared_announcement,
    snapshot_chunk,
)

TOKENS = mx.array([[1, 40, 41, 42, 43, 2]])


def _model(model_cache, seed: int, rank: int = 4):
    loaded = load_model(ModelConfig(name="tiny", cache_dir=str(model_cache)))
    attach_lora(loaded.model, LoraConfig(rank=rank, alpha=2.0 * rank))
    mx.random.seed(seed)
    loaded.model.load_weights(
        [(k, mx.random.normal(v.shape) * 0.1) for k, v in adapter_weights(loaded.model).items()], strict=False
    )
    return loaded.model


def _over_the_wire(msg: protocol.Weights) -> protocol.Weights:
    return protocol.decode([bytes(f) for f in protocol.encode(msg)])


def test_a_snapshot_applied_elsewhere_reproduces_adapters_and_outputs(model_cache):
    learner, actor = _model(model_cache, seed=1), _model(model_cache, seed=2)
    assert not np.allclose(np.array(learner(TOKENS)), np.array(actor(TOKENS)))
    msg = _over_the_wire(AdapterSync(learner).snapshot(policy_version=3))
    assert msg.policy_version == 3 and msg.names == tuple(sorted(adapter_weights(learner)))
    AdapterSync(actor).apply(msg)
    theirs, ours = adapter_weights(learner), adapter_weights(actor)
    for name, value in theirs.items():
        np.testing.assert_array_equal(np.array(ours[name]), np.array(value))
    np.testing.assert_array_equal(np.array(actor(TOKENS)), np.array(learner(TOKENS)))
    # The same adapters give the same checksum on both sides (what heartbeats echo).
    assert AdapterSync(actor).snapshot(3).checksum == msg.checksum


def test_bfloat16_adapters_travel_as_bfloat16(model_cache):
    learner, actor = _model(model_cache, seed=1), _model(model_cache, seed=2)
    for model in (learner, actor):
        model.load_weights(
            [(k, v.astype(mx.bfloat16)) for k, v in adapter_weights(model).items()], strict=False
        )
    msg = _over_the_wire(AdapterSync(learner).snapshot(1))
    assert msg.dtype == "bfloat16" and msg.flat.dtype == np.uint16
    AdapterSync(actor).apply(msg)
    for name, value in adapter_weights(learner).items():
        got = adapter_weights(actor)[name]
        assert got.dtype == mx.bfloat16 and mx.array_equal(got, value).item()


def test_a_corrupted_snapshot_is_refused_and_changes_nothing(model_cache):
    learner, actor = _model(model_cache, seed=1), _model(model_cache, seed=2)
    before = {k: np.array(v) for k, v in adapter_weights(actor).items()}
    msg = AdapterSync(learner).snapshot(1)
    corrupted = msg.flat.copy()
    corrupted[7] += 1.0
    with pytest.raises(ValueError, match="checksum"):
        AdapterSync(actor).apply(dataclasses.replace(msg, flat=corrupted))
    for name, value in adapter_weights(actor).items():
        np.testing.assert_array_equal(np.array(value), before[name])


def test_a_snapshot_of_another_shape_names_every_mismatch(model_cache):
    rank8 = AdapterSync(_model(model_cache, seed=1, rank=8)).snapshot(1)
    with pytest.raises(ValueError, match=r"lora_a: shape \(\d+, 8\) != \(\d+, 4\)"):
        AdapterSync(_model(model_cache, seed=2, rank=4)).apply(rank8)


def test_a_model_without_adapters_cannot_sync(model_cache):
    plain = load_model(ModelConfig(name="tiny", cache_dir=str(model_cache))).model
    with pytest.raises(ValueError, match="no LoRA adapters"):
        AdapterSync(plain)


def _snapshot(n: int = 10) -> protocol.Weights:
    flat = np.arange(n, dtype=np.float32)
    return protocol.Weights(3, "c0ffee", ("w",), ((n,),), "float32", flat, "run")


def test_a_snapshot_over_the_chunk_size_is_announced_and_served_in_chunks():
    snap = _snapshot(10)
    assert announcement(snap, 0) is snap and announcement(snap, 40) is snap  # 40 bytes fit whole
    announce = announcement(snap, 16)  # 4 float32 per chunk: 3 chunks, the last one of 2
    assert announce.flat.size == 0 and announce.chunk_size == 4 and announce.num_chunks() == 3
    assembly = SnapshotAssembly(announce, window=2)
    asked = [r.index for r in assembly.requests(actor_id=1)]
    assert asked == [0, 1]  # the window
    done = [
        assembly.add(snapshot_chunk(snap, announce, protocol.WeightsChunkRequest(1, 3, i))) for i in asked
    ]
    assert done == [False, False] and [r.index for r in assembly.requests(1)] == [2]
    last = snapshot_chunk(snap, announce, protocol.WeightsChunkRequest(1, 3, 2))
    assert last.data.size == 2 and assembly.add(last)
    whole = assembly.snapshot()
    assert whole.chunk_size == 0 and np.array_equal(whole.flat, snap.flat) and whole.checksum == snap.checksum


def test_chunks_of_another_snapshot_or_size_are_not_taken():
    snap = _snapshot(10)
    announce = announcement(snap, 16)
    assembly = SnapshotAssembly(announce)
    # A request for a snapshot the learner no longer has is answered with the current announcement.
    assert snapshot_chunk(snap, announce, protocol.WeightsChunkRequest(1, 2, 0)) is announce
    assert snapshot_chunk(snap, announce, protocol.WeightsChunkRequest(1, 3, 3)) is announce
    older = protocol.WeightsChunk(2, 0, "float32", np.zeros(4, np.float32))
    assert not assembly.add(older) and not assembly.received
    with pytest.raises(ValueError, match="expected 4 float32"):
        assembly.add(protocol.WeightsChunk(3, 0, "float32", np.zeros(3, np.float32)))


def test_shared_snapshots_are_files_the_newest_two_kept_and_removed_at_close(tmp_path):
    folder = private_folder(tmp_path, create=True)
    assert folder is not None and stat.S_IMODE(folder.stat().st_mode) == 0o700
    dead = folder / "mlx-ppo-snapshot-999999999-oldrun-v3.bin"  # of a learner that died: no such pid
    dead.write_bytes(b"x")
    shared = SharedSnapshots("run", keep=2, base=tmp_path)
    assert not dead.exists()
    paths = [shared.share(dataclasses.replace(_snapshot(), policy_version=v)) for v in (1, 2, 3, 3, 3)][:3]
    assert [Path(p).exists() for p in paths] == [False, True, True]
    assert stat.S_IMODE(Path(paths[-1]).stat().st_mode) == 0o600
    announce = shared_announcement(_snapshot(), _snapshot(), paths[-1])
    assert announce.flat.size == 0 and announce.num_chunks() == 1  # elsewhere: one chunk to fetch
    assert read_shared(announce) is None  # a path outside this user's shared-memory folder is not read
    assert read_shared(dataclasses.replace(announce, shared="/etc/passwd"), base=Path("/etc")) is None
    local = read_shared(announce, base=tmp_path)
    assert local is not None and local.chunk_size == 0 and np.array_equal(local.flat, _snapshot().flat)
    shared.close()
    assert not any(folder.iterdir())
    assert read_shared(announce, base=tmp_path) is None  # gone (or elsewhere): the actor fetches the chunks


def test_a_snapshot_that_cannot_be_written_is_not_shared(tmp_path):
    shared = SharedSnapshots("run", base=tmp_path / "missing")  # no such folder: as a full /dev/shm fails
    assert shared.share(_snapshot()) is None and not shared.paths
    (tmp_path / "missing").mkdir()
    assert shared.share(_snapshot()) is None  # not tried again: the snapshots go over the sockets


def test_a_planted_folder_or_symlink_never_receives_a_snapshot(tmp_path):
    """Attack table row 8 (issue 15): a symlink planted at the snapshot's path in /dev/shm was written through
    (another owner's file overwritten), and a directory planted there stopped every later learner."""
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    folder = tmp_path / f"mlx-ppo-{os.getuid()}"
    folder.symlink_to(tmp_path, target_is_directory=True)  # the folder itself planted as a symlink
    assert private_folder(tmp_path, create=True) is None
    assert SharedSnapshots("run", base=tmp_path).share(_snapshot()) is None  # over the sockets instead
    folder.unlink()
    folder.mkdir(mode=0o777)
    os.chmod(folder, 0o777)  # a folder others can write into
    assert SharedSnapshots("run", base=tmp_path).share(_snapshot()) is None
    os.chmod(folder, 0o700)
    shared = SharedSnapshots("run", base=tmp_path)
    target = folder / f"{shared.prefix}-v{_snapshot().policy_version}"
    target.with_suffix(".partial").symlink_to(victim)  # planted where the partial file goes
    target.with_suffix(".bin").mkdir()  # and a directory where the snapshot goes
    assert shared.share(_snapshot()) is None  # refused, not written through
    assert victim.read_bytes() == b"precious"


def test_a_shared_file_others_could_write_is_not_read(tmp_path):
    shared = SharedSnapshots("run", base=tmp_path)
    path = shared.share(_snapshot())
    announce = shared_announcement(_snapshot(), _snapshot(), path)
    assert read_shared(announce, base=tmp_path) is not None
    os.chmod(path, 0o666)
    assert read_shared(announce, base=tmp_path) is None


def _crc32_suffix(prefix_crc: int, data: bytes, target: int) -> bytes:
    """4 bytes that, appended to ``data``, make zlib's CRC-32 (started from ``prefix_crc``) equal ``target``."""
    table = []
    for i in range(256):
        c = i
        for _ in range(8):
            c = (c >> 1) ^ 0xEDB88320 if c & 1 else c >> 1
        table.append(c)
    top = {t >> 24: i for i, t in enumerate(table)}
    indices, want = [], target ^ 0xFFFFFFFF
    for _ in range(4):  # walk back from the wanted register: each step's table index from its top byte
        i = top[want >> 24]
        indices.insert(0, i)
        want = ((want ^ table[i]) << 8) & 0xFFFFFFFF
    register, out = zlib.crc32(data, prefix_crc) ^ 0xFFFFFFFF, bytearray()
    for i in indices:
        out.append((register ^ i) & 0xFF)
        register = (register >> 8) ^ table[i]
    return bytes(out)


def test_a_rewrite_that_keeps_the_crc32_is_refused():
    """Attack table row 9 (issue 15): a same-user rewrite of a snapshot file keeping its CRC-32 was applied by
    actors (and trained on). The checksum is BLAKE2b now: a forged buffer no longer passes."""
    snapshot = _snapshot()
    raw = bytearray(memoryview(np.ascontiguousarray(snapshot.flat)).cast("B"))
    prefix = zlib.crc32(repr((snapshot.names, snapshot.shapes)).encode())
    target = zlib.crc32(bytes(raw), prefix)
    raw[:4] = np.float32(7.0).tobytes()  # the attacker's weights
    forged = bytes(raw[:-4]) + _crc32_suffix(prefix, bytes(raw[:-4]), target)
    assert zlib.crc32(forged, prefix) == target  # CRC-32 cannot tell
    original = checksum(snapshot.names, snapshot.shapes, snapshot.flat)
    flat = np.frombuffer(forged, snapshot.flat.dtype)
    assert checksum(snapshot.names, snapshot.shapes, flat) != original
