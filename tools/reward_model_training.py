"""Train a reward model on preference pairs with the Bradley-Terry loss.

Pairs are JSONL, one ``{"prompt": ..., "chosen": ..., "rejected": ...}`` object a line: for the prompt, the
``chosen`` completion is preferred over the ``rejected`` one. The model (``common/reward_model.py``) is the base
LM's trunk with its own LoRA (``[lora]`` of the config) and a scalar head; only those train.

``python launch.py train-rm --model tiny --pairs examples/data/preference_pairs.jsonl --out runs/rm`` runs
``main``; ``run.reward = "rm:runs/rm"`` then scores rollouts with it.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np

from common.config import Config
from common.exit_codes import ExitCode
from common.reward_model import RewardModel, build_reward_model, save_reward_model
from learner.optimizer import make_adam

logger = logging.getLogger(__name__)


def bradley_terry_loss(r_chosen: mx.array, r_rejected: mx.array) -> mx.array:
    """Mean negative log-likelihood that each chosen completion beats its rejected one.

    Under the Bradley-Terry model ``P(chosen > rejected) = sigmoid(r_chosen - r_rejected)``, so the loss is
    ``mean(-log sigmoid(r_chosen - r_rejected))``, computed as ``mean(log(1 + exp(r_rejected - r_chosen)))``
    (``logaddexp``) so that large margins neither overflow nor round to log(0).

    Args:
        r_chosen: ``[B]`` rewards of the preferred completions.
        r_rejected: ``[B]`` rewards of the other completions, pair by pair.

    Returns:
        A scalar: 0 when every margin is large and positive, ``log 2`` at ties.
    """
    return mx.mean(mx.logaddexp(mx.zeros_like(r_chosen), r_rejected - r_chosen))


@dataclass(frozen=True)
class PreferencePair:
    prompt: str
    chosen: str
    rejected: str


def load_pairs(path: str | Path) -> list[PreferencePair]:
    """The pairs in a JSONL file; ValueError naming every bad line (OSError when it cannot be read)."""
    pairs, problems = [], []
    for number, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            pairs.append(PreferencePair(*(_text(record, key) for key in ("prompt", "chosen", "rejected"))))
        except (ValueError, TypeError) as e:
            problems.append(f"line {number}: {e}")
    if problems:
        raise ValueError(f"{path}: {len(problems)} bad line(s):\n  " + "\n  ".join(problems[:10]))
    if not pairs:
        raise ValueError(f"{path}: no preference pairs in it")
    return pairs


def _text(record: object, key: str) -> str:
    if not isinstance(record, dict) or not isinstance(record.get(key), str):
        raise ValueError(f'expected an object with a "{key}" string')
    return record[key]


def evaluate_pairs(model: RewardModel, pairs: Sequence[PreferencePair]) -> dict[str, float]:
    """``accuracy``: share of pairs scored chosen > rejected; ``margin``: mean r_chosen - r_rejected."""
    chosen = model.score([p.prompt for p in pairs], [p.chosen for p in pairs])
    rejected = model.score([p.prompt for p in pairs], [p.rejected for p in pairs])
    margin = chosen - rejected
    return {"accuracy": float(np.mean(margin > 0)), "margin": float(np.mean(margin))}


def _epoch(model, step, pairs_ids, batch_size: int, rng: np.random.Generator) -> float:
    """One shuffled pass; returns the mean loss. ``pairs_ids``: (chosen ids, rejected ids) per pair."""
    losses = []
    order = rng.permutation(len(pairs_ids))
    for start in range(0, len(order), batch_size):
        chunk = [pairs_ids[i] for i in order[start : start + batch_size]]
        # Chosen then rejected in one forward pass: [2B, L].
        tokens, lengths = model.collate([c for c, _ in chunk] + [r for _, r in chunk])
        losses.append(step(tokens, lengths, len(chunk)))
    return float(np.mean(losses))


def _optimizer_step(model: RewardModel, lr: float) -> Callable[[mx.array, mx.array, int], float]:
    """``step(tokens, lengths, n)``: one Adam step (gradient norm clipped to 1) on a batch whose first ``n``
    rows are the chosen completions and the last ``n`` the rejected ones; returns the batch's loss."""
    optimizer = make_adam(lr)  # bias-corrected: MLX's default Adam steps 3-6x the rate early on

    def loss_fn(net, tokens, lengths, n):
        rewards = net(tokens, lengths)
        return bradley_terry_loss(rewards[:n], rewards[n:])

    loss_and_grad = nn.value_and_grad(model.net, loss_fn)

    def step(tokens: mx.array, lengths: mx.array, n: int) -> float:
        loss, grads = loss_and_grad(model.net, tokens, lengths, n)
        grads, _ = optim.clip_grad_norm(grads, 1.0)
        optimizer.update(model.net, grads)
        mx.eval(model.net.parameters(), optimizer.state, loss)
        return loss.item()

    return step


def train_reward_model(
    cfg: Config,
    pairs_path: str | Path,
    out_path: str | Path,
    epochs: int = 3,
    lr: float = 1e-4,
    batch: int = 8,
) -> dict[str, float | int | str]:
    """Train a reward model over ``cfg.model`` with ``cfg.lora`` adapters on the pairs; save it to ``out_path``.

    Adam with gradient norm clipped to 1; pairs shuffled each epoch from ``cfg.run.seed``. Returns the summary:
    pairs, epochs, steps, first and last epoch's mean loss, accuracy and margin on the training pairs after.
    """
    if epochs < 1 or batch < 1 or not lr > 0:
        raise ValueError(f"need epochs >= 1, batch >= 1 and lr > 0 (got {epochs}, {batch}, {lr})")
    pairs = load_pairs(pairs_path)
    mx.random.seed(cfg.run.seed)  # the head's initialisation
    model = build_reward_model(cfg.model, cfg.lora)
    ids = [(model.encode(p.prompt, p.chosen), model.encode(p.prompt, p.rejected)) for p in pairs]
    step = _optimizer_step(model, lr)
    rng, start, losses = np.random.default_rng(cfg.run.seed), time.perf_counter(), []
    for epoch in range(epochs):
        losses.append(_epoch(model, step, ids, batch, rng))
        logger.info("epoch %d/%d: mean Bradley-Terry loss %.4f", epoch + 1, epochs, losses[-1])
    save_reward_model(model, out_path)
    summary = {
        "pairs": len(pairs),
        "epochs": epochs,
        "steps": epochs * -(-len(pairs) // batch),
        "loss_first": losses[0],
        "loss_last": losses[-1],
        **evaluate_pairs(model, pairs),
        "seconds": round(time.perf_counter() - start, 2),
        "path": str(out_path),
    }
    logger.info("saved reward model to %s: %s", out_path, json.dumps(summary))
    return summary


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="launch.py train-rm", description="Train a reward model on preference pairs (Bradley-Terry)."
    )
    parser.add_argument("--config", help="TOML config; [model] and [lora] are used")
    parser.add_argument("--model", help="base model: default, tiny, a folder or a hub id (model.name)")
    parser.add_argument("--pairs", required=True, help='JSONL of {"prompt", "chosen", "rejected"}')
    parser.add_argument("--out", required=True, help="folder to save the reward model into")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--lr", type=float, default=1e-4, help="Adam learning rate")
    parser.add_argument("--batch-size", type=int, default=8, help="pairs per optimizer step")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")
    return parser.parse_args(argv)


def main(argv: list[str]) -> int:
    """``launch.py train-rm``: ``OK`` when trained and saved, ``BAD_SETUP`` for a bad config, pairs file or setting."""
    from common.config import ConfigError, load_config

    args = parse_args(argv)
    overrides = ([f"model.name={json.dumps(args.model)}"] if args.model else []) + args.overrides
    try:
        cfg = load_config(args.config, overrides)
        train_reward_model(cfg, args.pairs, args.out, args.epochs, args.lr, args.batch_size)
    except (ConfigError, OSError, ValueError) as e:
        logger.error("%s", e)
        return ExitCode.BAD_SETUP
    return ExitCode.OK


if __name__ == "__main__":
    import sys

    from common.logs import setup_logging

    setup_logging("train-rm")
    raise SystemExit(main(sys.argv[1:]))
