"""Policy snapshots on the wire: a model's adapters <-> a ``Weights`` message, with a checksum both sides agree on.

The learner publishes a snapshot after every ``sync_every`` updates and every actor loads it, so both directions
are on the critical path of weight sync (BENCHMARKS.md, issue 4): the adapter layout is found once per model
(``AdapterSync``), all tensors travel as one flat buffer, and loading assigns slices of one array.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import re
import stat
import tempfile
from collections import deque
from itertools import accumulate
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import psutil

from common.lora import adapter_slots
from common.protocol import DTYPES, Weights, WeightsChunk, WeightsChunkRequest


def checksum(names: tuple[str, ...], shapes: tuple[tuple[int, ...], ...], flat: np.ndarray) -> str:
    """BLAKE2b (128-bit) over names, shapes and the buffer's bytes, as 32 hex digits.

    A cryptographic hash, not CRC-32: a snapshot file in shared memory rewritten to keep its CRC-32 was run by
    actors and trained on (issue 15). The learner announces the hash over the (CURVE-authenticated) socket; an
    actor applies only bytes that hash to it. ~1 GB/s: 10 ms for SmolLM2's 9.8 MB of rank-8 adapters.
    """
    digest = hashlib.blake2b(repr((names, shapes)).encode(), digest_size=16)
    digest.update(memoryview(np.ascontiguousarray(flat)).cast("B"))
    return digest.hexdigest()


def parameter_slots(model: nn.Module) -> dict[str, tuple[nn.Module, str]]:
    """Every parameter of ``model``: dotted name -> (module, leaf), sorted (full fine-tuning syncs them all)."""
    slots = {}
    for path, module in model.named_modules():
        for leaf, value in module.items():
            if isinstance(value, mx.array):
                slots[f"{path}.{leaf}" if path else leaf] = (module, leaf)
    return dict(sorted(slots.items()))


class AdapterSync:
    """Snapshots of one model's adapters (or, with ``full_weights``, all its weights) and loading them into it."""

    def __init__(self, model: nn.Module, full_weights: bool = False):
        self.slots = parameter_slots(model) if full_weights else adapter_slots(model)
        if not self.slots:
            raise ValueError("the model has no LoRA adapters to sync; call attach_lora first")
        self.names = tuple(self.slots)

    def shapes(self) -> tuple[tuple[int, ...], ...]:
        return tuple(tuple(module[leaf].shape) for module, leaf in self.slots.values())

    def snapshot(self, policy_version: int, run_id: str = "") -> Weights:
        """The adapters now, as one message (names sorted, so the checksum is reproducible)."""
        tensors = [module[leaf] for module, leaf in self.slots.values()]
        mx.eval(tensors)
        wire_dtype = "bfloat16" if tensors[0].dtype == mx.bfloat16 else None
        if wire_dtype:
            tensors = [t.view(mx.uint16) for t in tensors]
        # Zero-copy NumPy views of each tensor, one copy into the flat buffer (mx.concatenate is 4x slower here).
        host = np.concatenate([np.asarray(memoryview(t)).reshape(-1) for t in tensors])
        wire_dtype = wire_dtype or host.dtype.name
        shapes = self.shapes()
        digest = checksum(self.names, shapes, host)
        return Weights(policy_version, digest, self.names, shapes, wire_dtype, host, run_id)

    def apply(self, msg: Weights) -> None:
        """Load ``msg`` into the model; a checksum, name or shape mismatch raises ValueError and changes nothing."""
        actual = checksum(msg.names, msg.shapes, msg.flat)
        if actual != msg.checksum:
            raise ValueError(f"snapshot v{msg.policy_version} checksum {actual} != announced {msg.checksum}")
        self._check_layout(msg)
        flat = mx.array(msg.flat)
        if msg.dtype == "bfloat16":
            flat = flat.view(mx.bfloat16)
        first, leaf = next(iter(self.slots.values()))
        if flat.dtype != first[leaf].dtype:  # adapters share one dtype; convert once, not per tensor
            flat = flat.astype(first[leaf].dtype)
        parts = mx.split(flat, list(accumulate(msg.sizes()))[:-1]) if len(self.names) > 1 else [flat]
        loaded = [part.reshape(shape) for part, shape in zip(parts, msg.shapes, strict=True)]
        mx.eval(loaded)
        for (module, leaf), tensor in zip(self.slots.values(), loaded, strict=True):
            module[leaf] = tensor

    def _check_layout(self, msg: Weights) -> None:
        if msg.names == self.names and msg.shapes == self.shapes():
            return
        theirs = dict(zip(msg.names, msg.shapes, strict=True))
        ours = dict(zip(self.names, self.shapes(), strict=True))
        errors = [f"{k}: not an adapter of this model" for k in theirs if k not in ours]
        errors += [f"{k}: missing" for k in ours if k not in theirs]
        errors += [
            f"{k}: shape {theirs[k]} != {ours[k]}" for k in theirs if k in ours and theirs[k] != ours[k]
        ]
        errors += [] if errors else ["adapters arrive in a different order"]
        raise ValueError("snapshot does not fit the model:\n  " + "\n  ".join(errors))


def announcement(snapshot: Weights, chunk_bytes: int) -> Weights:
    """``snapshot`` itself, or, when it is over ``chunk_bytes`` (0: never), its announcement: names, shapes and
    checksum with an empty buffer, the elements to be fetched in chunks of ``chunk_bytes``."""
    if not chunk_bytes or snapshot.flat.nbytes <= chunk_bytes:
        return snapshot
    return dataclasses.replace(
        snapshot, flat=snapshot.flat[:0], chunk_size=chunk_bytes // snapshot.flat.itemsize
    )


def shared_announcement(snapshot: Weights, announce: Weights, path: str) -> Weights:
    """``announce`` (``snapshot`` or its announcement) as the announcement of the file ``path`` holding
    ``snapshot``: actors on other machines fetch its chunks (one chunk if it is small)."""
    chunk_size = announce.chunk_size or snapshot.flat.size
    return dataclasses.replace(announce, flat=snapshot.flat[:0], chunk_size=chunk_size, shared=path)


def snapshot_chunk(
    snapshot: Weights, announce: Weights, request: WeightsChunkRequest
) -> Weights | WeightsChunk:
    """The chunk asked for; the current announcement instead when the request is for an older snapshot (the
    actor starts over with the newest) or for no chunk of this one."""
    if request.policy_version != snapshot.policy_version or not 0 <= request.index < announce.num_chunks():
        return announce
    size = announce.chunk_size
    data = snapshot.flat[request.index * size : (request.index + 1) * size]
    return WeightsChunk(snapshot.policy_version, request.index, snapshot.dtype, data)


class SnapshotAssembly:
    """An announced snapshot fetched chunk by chunk, at most ``window`` chunks requested and not yet received
    (credit-based flow control, as in the ZeroMQ guide's file transfer): neither side queues the whole model,
    and no message is larger than a chunk."""

    def __init__(self, announce: Weights, window: int = 4):
        self.announce = announce
        self.flat = np.empty(sum(announce.sizes()), DTYPES[announce.dtype])
        self.count = announce.num_chunks()
        self.window = window
        self.received: set[int] = set()
        self.asked: set[int] = set()  # requested, not received yet
        self._next = 0

    def requests(self, actor_id: int, again: bool = False) -> list[WeightsChunkRequest]:
        """What to ask for now: new chunks while the window allows; with ``again`` also those asked for and
        not received (a reply lost to a reconnect, say)."""
        indices = sorted(self.asked) if again else []
        while len(self.asked) < self.window and self._next < self.count:
            self.asked.add(self._next)
            indices.append(self._next)
            self._next += 1
        return [WeightsChunkRequest(actor_id, self.announce.policy_version, i) for i in indices]

    def add(self, chunk: WeightsChunk) -> bool:
        """Store ``chunk``; True once every chunk is in. Chunks of another snapshot and repeats are ignored; a
        chunk of the wrong dtype or size raises ValueError."""
        if chunk.policy_version != self.announce.policy_version or chunk.index in self.received:
            return len(self.received) == self.count
        start = chunk.index * self.announce.chunk_size
        expected = min(self.announce.chunk_size, self.flat.size - start)
        if chunk.dtype != self.announce.dtype or chunk.data.size != expected or expected <= 0:
            raise ValueError(
                f"chunk {chunk.index} of snapshot v{chunk.policy_version}: {chunk.data.size} {chunk.dtype} "
                f"elements, expected {max(expected, 0)} {self.announce.dtype}"
            )
        self.flat[start : start + expected] = chunk.data
        self.received.add(chunk.index)
        self.asked.discard(chunk.index)
        return len(self.received) == self.count

    def snapshot(self) -> Weights:
        """The whole snapshot (its checksum is verified when it is applied)."""
        return dataclasses.replace(self.announce, flat=self.flat, chunk_size=0)


logger = logging.getLogger(__name__)
# RAM-backed where the OS has it (Linux); elsewhere the temporary folder, which the page cache keeps in memory.
SHARED_BASE = Path("/dev/shm") if Path("/dev/shm").is_dir() else Path(tempfile.gettempdir())
_SHARED_NAME = re.compile(r"mlx-ppo-snapshot-(\d+)-")
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)


def private_folder(base: Path = SHARED_BASE, create: bool = False) -> Path | None:
    """``base/mlx-ppo-<uid>``, this user's folder for shared snapshots (made 0700 with ``create``), or None when
    it is missing or is not a directory of this user that only this user can enter: ``/dev/shm`` is writable by
    everyone, and a symlink or folder planted there must not receive (or supply) snapshots."""
    folder = base / f"mlx-ppo-{os.getuid()}"
    if create:
        try:
            folder.mkdir(mode=0o700)
        except FileExistsError:
            pass
        except OSError:
            return None
    try:
        st = os.lstat(folder)
    except OSError:
        return None
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid() or st.st_mode & 0o077:
        if create:
            logger.warning("%s is not a private folder of this user: snapshots go over the sockets", folder)
        return None
    return folder


def _write_private(path: Path, flat: np.ndarray) -> None:
    """Write ``flat`` to a new file ``path`` (0600; never through a symlink or onto an existing file)."""
    path.unlink(missing_ok=True)  # a partial file left by a crash, in this user's own folder
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(memoryview(np.ascontiguousarray(flat)).cast("B"))


class SharedSnapshots:
    """The learner's newest snapshots as files that actors on its machine read instead of receiving the bytes
    over a socket (``Weights.shared``), in this user's private folder. The last ``keep`` stay (an actor may still
    be reading the one before); files of learners that died are removed at start, and this learner's at ``close``.
    """

    def __init__(self, run_id: str, keep: int = 2, base: Path = SHARED_BASE):
        self.keep = keep
        self.folder = private_folder(base, create=True)
        self.prefix = f"mlx-ppo-snapshot-{os.getpid()}-{run_id}"
        self.paths: deque[Path] = deque()
        self.failed = self.folder is None
        for path in [] if self.folder is None else self.folder.glob("mlx-ppo-snapshot-*"):
            owner = _SHARED_NAME.match(path.name)
            if owner and not psutil.pid_exists(int(owner.group(1))) and path.is_file():
                path.unlink(missing_ok=True)

    def share(self, snapshot: Weights) -> str | None:
        """Write ``snapshot``'s buffer to a file of its own (atomically); its path, or None when it cannot be
        written (a container's 64 MB ``/dev/shm``, say): the snapshot then travels over the sockets."""
        if self.failed:  # once is enough: a full folder stays full
            return None
        path = self.folder / f"{self.prefix}-v{snapshot.policy_version}.bin"
        partial = path.with_suffix(".partial")
        try:
            _write_private(partial, snapshot.flat)
            os.replace(partial, path)
        except OSError as e:
            partial.unlink(missing_ok=True)
            self.failed = True
            logger.warning(
                "cannot share snapshot v%d in %s (%s): sending it", snapshot.policy_version, self.folder, e
            )
            return None
        if path not in self.paths:  # the same version shared again (republished) is the same file
            self.paths.append(path)
        while len(self.paths) > self.keep:
            self.paths.popleft().unlink(missing_ok=True)
        return str(path)

    def close(self) -> None:
        while self.paths:
            self.paths.popleft().unlink(missing_ok=True)


def read_shared(announce: Weights, base: Path = SHARED_BASE) -> Weights | None:
    """The announced snapshot from its shared file (memory-mapped: one copy into the model), or None when the
    file is not on this machine, is not this user's private 0600 file, or does not hold it. Only a snapshot file
    in this user's private folder is read, whatever path the message names; the checksum (BLAKE2b) is verified
    when it is applied."""
    path, folder = Path(announce.shared), private_folder(base)
    if folder is None or path.parent != folder or not path.name.startswith("mlx-ppo-snapshot-"):
        return None
    expected = sum(announce.sizes()) * np.dtype(DTYPES[announce.dtype]).itemsize
    try:
        fd = os.open(path, os.O_RDONLY | _NOFOLLOW)
    except OSError:
        return None
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(fd)
        if (
            not stat.S_ISREG(st.st_mode)
            or st.st_uid != os.getuid()
            or st.st_mode & 0o077
            or st.st_size != expected
        ):
            return None
        try:
            flat = np.memmap(
                f, dtype=DTYPES[announce.dtype], mode="r"
            )  # the mapping outlives the file object
        except (OSError, ValueError):
            return None
    return dataclasses.replace(announce, flat=flat, chunk_size=0, shared="")
