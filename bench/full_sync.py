"""Cost of one policy snapshot, LoRA adapters vs every weight (full fine-tuning), without the network.

    python -m common.blas -- python bench/full_sync.py [--model default]

Best of 3 of each stage: build the snapshot (learner), encode it into frames and copy them (as bytes; the
learner's ZeroMQ send does not copy), decode, and load it into a second model (actor).
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from common import protocol  # noqa: E402
from common.config import LoraConfig, ModelConfig  # noqa: E402
from common.models import load_policy  # noqa: E402
from common.weights import AdapterSync  # noqa: E402

logger = logging.getLogger("bench.full_sync")


def sync_stages(source: AdapterSync, target: AdapterSync, repeats: int = 3) -> tuple[float, dict[str, float]]:
    """Snapshot MB and the best seconds of each stage over ``repeats``."""
    best: dict[str, float] = {}
    for _ in range(repeats):
        start = time.perf_counter()
        msg = source.snapshot(1)
        built = time.perf_counter()
        frames = [bytes(f) for f in protocol.encode(msg)]
        encoded = time.perf_counter()
        received = protocol.decode(frames, 2**31)
        decoded = time.perf_counter()
        target.apply(received)
        applied = time.perf_counter()
        stages = {
            "snapshot": built - start,
            "encode+copy": encoded - built,
            "decode": decoded - encoded,
            "apply": applied - decoded,
        }
        best = {k: min(best.get(k, v), v) for k, v in stages.items()}
    return msg.flat.nbytes / 2**20, best


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="default")
    args = parser.parse_args()
    config, lora = ModelConfig(name=args.model), LoraConfig()
    learner_model, actor_model = (load_policy(config, lora).model for _ in range(2))
    rows = {"LoRA rank 8": sync_stages(AdapterSync(learner_model), AdapterSync(actor_model))}
    full_source, full_target = (load_policy(config, lora, full_finetune=True).model for _ in range(2))
    rows["every weight"] = sync_stages(
        AdapterSync(full_source, full_weights=True), AdapterSync(full_target, full_weights=True)
    )
    lines = ["| snapshot | MB | " + " | ".join(f"{k} ms" for k in rows["LoRA rank 8"][1]) + " |"]
    for name, (megabytes, best) in rows.items():
        lines.append(
            f"| {name} | {megabytes:.1f} | " + " | ".join(f"{1000 * v:.0f}" for v in best.values()) + " |"
        )
    logger.info("%s\n%s", args.model, "\n".join(lines))


if __name__ == "__main__":
    from common.logs import setup_logging

    setup_logging("bench")
    main()
