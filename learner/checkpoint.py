"""Checkpoints: everything a run needs to continue exactly where it was (``launch.py --resume RUN_DIR``).

A checkpoint ``<run_dir>/checkpoints/step-NNNNNN/`` holds

- ``adapters.safetensors`` + ``adapter_config.json``: the policy adapters in mlx-lm format,
- ``trainable.safetensors``: every trainable tensor (adapters or full weights, and the value model; the float32
  master copies when the model trains in bf16/fp16),
- ``optimizer.safetensors``: Adam's moments and step count,
- ``buffer.npz``: the experience accepted but not trained yet (restored into the buffer on resume),
- ``learner_state.json``: policy version, update count, KL coefficient, each actor's next batch (after its newest
  received one; its prompt cursor and sampling seeds follow from it), the drop and reject counters (a resumed run
  counts on) and the resolved config it ran with. The learner's random draws
  follow from (run seed, policy version) alone (``PPOLearner._reseed``), so there is no RNG state to save.

It is written into a temporary folder and renamed into place, so a crash never leaves a half checkpoint; the
newest ``keep`` are kept. ``<run_dir>/adapters`` always holds the latest policy adapters for
``mlx_lm.generate --adapter-path``.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import mlx.core as mx
from mlx.utils import tree_flatten, tree_unflatten

from common.config import LoraConfig
from common.lora import ADAPTER_CONFIG, ADAPTER_WEIGHTS, adapter_weights, atomic_write, save_adapters
from learner.buffer import Group, load_groups, save_groups
from learner.ppo_learner import PPOLearner

logger = logging.getLogger(__name__)

TRAINABLE = "trainable.safetensors"
OPTIMIZER = "optimizer.safetensors"
STATE_FILE = "learner_state.json"
BUFFER = "buffer.npz"


def _write_checkpoint(
    folder: Path, learner: PPOLearner, lora: LoraConfig, buffered: list[Group], extra: dict[str, Any]
) -> None:
    container = learner.container
    save_groups(buffered, folder / BUFFER)
    if adapter_weights(container.policy):  # full fine-tuning has none: trainable.safetensors holds all
        save_adapters(container.policy, folder, lora)
    mx.save_safetensors(str(folder / TRAINABLE), learner.trainable_weights())
    optimizer_state = dict(tree_flatten(learner.optimizer.state))
    mx.save_safetensors(str(folder / OPTIMIZER), optimizer_state)
    state = {
        "policy_version": learner.policy_version,
        "kl_coef": learner.kl_controller.value,
        "files": {p.name: _fingerprint(p) for p in sorted(folder.iterdir())},  # checked before a resume
        **extra,
    }
    # Written last: a folder with this file is complete (the rename makes that atomic anyway).
    (folder / STATE_FILE).write_text(json.dumps(state, indent=2))


def _fingerprint(path: Path) -> dict[str, Any]:
    digest = hashlib.blake2b(digest_size=16)
    with path.open("rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    return {"bytes": path.stat().st_size, "blake2b": digest.hexdigest()}


def checkpoint_problem(folder: Path) -> str | None:
    """What is wrong with the checkpoint ``folder`` (a missing, truncated or changed file), or None if it is
    whole. Checkpoints written before files were fingerprinted are checked for their state file only."""
    try:
        state = json.loads((folder / STATE_FILE).read_text())
    except (OSError, ValueError) as e:
        return f"{STATE_FILE} unreadable ({e})"
    for name, expected in state.get("files", {}).items():
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != expected["bytes"]:
            return f"{name} has {path.stat().st_size} bytes, {expected['bytes']} were written (truncated?)"
        if _fingerprint(path)["blake2b"] != expected["blake2b"]:
            return f"{name} changed since it was written (corrupt)"
    return None


def save_checkpoint(
    run_dir: Path,
    learner: PPOLearner,
    lora: LoraConfig,
    step: int,
    keep: int = 3,
    buffered: list[Group] | None = None,
    **extra: Any,
) -> Path:
    """Write ``checkpoints/step-NNNNNN`` atomically, refresh ``adapters/``, keep the newest ``keep``."""
    root = run_dir / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:06d}"
    tmp = root / f".tmp-step-{step:06d}-{os.getpid()}"
    for stale in root.glob(".tmp-step-*"):  # left by a learner that died while writing (or this one)
        shutil.rmtree(stale, ignore_errors=True)
    tmp.mkdir()
    try:
        _write_checkpoint(tmp, learner, lora, buffered or [], {"step": step, **extra})
    except (
        BaseException
    ) as e:  # a full disk, say: the half-written folder goes, the previous checkpoints stay
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, RuntimeError):  # MLX's writers say "[write] Unable to write ..." without an errno
            raise OSError(errno.EIO, f"cannot write checkpoint {final.name}: {e}") from e
        raise
    shutil.rmtree(final, ignore_errors=True)
    os.rename(tmp, final)
    _refresh_latest_adapters(final, run_dir / "adapters")
    for old in sorted(p for p in root.iterdir() if p.name.startswith("step-"))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _refresh_latest_adapters(checkpoint: Path, latest: Path) -> None:
    """Copy the checkpoint's adapter files to ``latest`` (each replaced atomically); none with full fine-tuning."""
    if not (checkpoint / ADAPTER_WEIGHTS).is_file():
        return
    latest.mkdir(parents=True, exist_ok=True)
    for name in (ADAPTER_WEIGHTS, ADAPTER_CONFIG):
        atomic_write(latest / name, lambda tmp, name=name: shutil.copyfile(checkpoint / name, tmp))


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest whole checkpoint of ``run_dir``, or None. A damaged newer one is reported and passed over."""
    root = run_dir / "checkpoints"
    if not root.is_dir():
        return None
    complete = [p for p in root.iterdir() if p.name.startswith("step-") and (p / STATE_FILE).is_file()]
    for folder in sorted(complete, key=lambda p: p.name, reverse=True):
        problem = checkpoint_problem(folder)
        if problem is None:
            return folder
        aside = folder.with_name(f"damaged-{folder.name}")  # kept for a look, out of the newest-N count
        logger.error(
            "checkpoint %s is damaged: %s; moved to %s, trying the one before it",
            folder.name,
            problem,
            aside.name,
        )
        shutil.rmtree(aside, ignore_errors=True)
        folder.rename(aside)
    return None


def _assign_in_place(target: Any, source: Any, where: str = "") -> None:
    """Copy ``source``'s arrays into the same places of ``target`` (a dict/list tree), keeping its containers.

    Compiled update functions hold the optimizer's state tree itself, so its containers must stay the same
    objects; only the leaves change.
    """
    items = source.items() if isinstance(source, dict) else enumerate(source)
    for key, value in items:
        name = f"{where}.{key}" if where else str(key)
        if isinstance(value, dict | list):
            _assign_in_place(target[key], value, name)
        else:
            if target[key].shape != value.shape:
                raise ValueError(f"checkpoint {name}: shape {value.shape} != {target[key].shape}")
            target[key] = value.astype(target[key].dtype)


def load_checkpoint(folder: Path, learner: PPOLearner) -> dict[str, Any]:
    """Restore ``learner`` (weights, optimizer, KL coefficient, version) from ``folder``; returns its state."""
    state = json.loads((folder / STATE_FILE).read_text())
    trainable = mx.load(str(folder / TRAINABLE))
    expected = learner.trainable_weights()
    if set(trainable) != set(expected):
        missing, unknown = sorted(set(expected) - set(trainable)), sorted(set(trainable) - set(expected))
        raise ValueError(
            f"checkpoint {folder} does not fit this model: missing {missing[:3]}, unknown {unknown[:3]}"
        )
    learner.load_trainable_weights({k: v.astype(expected[k].dtype) for k, v in trainable.items()})
    optimizer_state = tree_unflatten(list(mx.load(str(folder / OPTIMIZER)).items()))
    _assign_in_place(learner.optimizer.state, optimizer_state)
    if not learner.optimizer._schedulers:  # a constant rate: this run's setting, not the checkpoint's
        learner.optimizer.state["learning_rate"] = mx.array(learner.cfg.learning_rate)
    learner.policy_version = int(state["policy_version"])
    learner.kl_controller.value = float(state["kl_coef"])
    mx.eval(learner.container.parameters(), learner.optimizer.state)
    logger.info("resumed from %s (update %d, policy v%d)", folder, state["step"], learner.policy_version)
    return state


def load_buffered(folder: Path) -> list[Group]:
    """The untrained experience a checkpoint holds (none in checkpoints from before it was kept)."""
    path = folder / BUFFER
    return load_groups(path) if path.is_file() else []
