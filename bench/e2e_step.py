"""One GRPO step end to end, ours against peers (issue 17 items 3 and 4): seconds per step from launch.py runs.

    python bench/e2e_step.py ours --model DIR --label 135m [--layout 1 --layout 2 --layout sync ...]
        [--updates 6] [--warmup 2] [--prompts 16] [--group 8] [--new-tokens 256] [--micro 32]
        [--lora-rank 16] [--lora-alpha 32] [--beta 0.04] [--run-timeout 150] [--set KEY=VALUE]... --output F.json
    python bench/e2e_step.py table DIR...        # every result JSON under DIR: s/step, ratios, targets

``ours``: one ``launch.py`` run per layout (``bench/launch_runs.parse_layout``: ``N`` actor processes beside the
learner, all on this machine's one GPU; ``sync``: ``--one-process``; ``NAME=N:KEY=VALUE;...``: N actors with
overrides of their own), each for ``--updates`` updates of the step ``step_settings`` describes: ``--prompts``
prompts x ``--group`` completions sampled per update (one actor batch), at most ``--new-tokens`` new tokens each
(fewer where the end-of-sequence token comes first), LoRA of rank ``--lora-rank`` on every linear layer of every
block, one optimizer step per update (one minibatch, one epoch), the ``arithmetic`` task's prompts and reward
(``actors.builtin_tasks.arithmetic_reward``, the function mlx-lm-lora's run scores with through
``bench.learning_rewards.arithmetic``), KL to the base model in the loss with weight ``--beta`` and mlx-lm-lora's
estimator (k3; 0 leaves the reference pass out). Measured, from the learner's ``metrics.jsonl``
(``bench/launch_runs._run_stats``): seconds per update from the end of update ``--warmup`` to the last one
(start-up and the first updates' kernel warm-up left out), samples/s, the learner's busy fraction and median
update time, generated tokens per update, largest lag and sequences dropped. The JSON is rewritten after every run.

``table`` reads ours (``"system": "ours"``) and peers' records: any JSON with ``system``, ``label`` and
``step_s`` (a list of seconds per step; ``warmup_steps``, default 1, of them left out; optional ``gen_tokens``,
tokens generated per step, or ``sequences_per_step`` with ``steps[i]["train_average_generated_tokens"]``), as ``bench/peer_mlx_lm_lora.py``
writes (``peer_run.json``) and as ``bench/peer_trl.py`` is to write with ``"system": "trl"``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402

from bench.launch_runs import bench_scaling, exit_on_sigterm, parse_layout  # noqa: E402

TARGETS = {"mlx-lm-lora": 10.0, "trl": 3.0}
"""Issue 17: ours at least this many times the peer's step rate, with 1 and with 2 actors, at both sizes."""


def step_settings(a: argparse.Namespace) -> list[str]:
    """``--set`` overrides of one issue-17 GRPO step (the peers get the same numbers)."""
    sequences = a.prompts * a.group
    return [
        f"model.name={json.dumps(a.model)}",
        'run.task="arithmetic"',
        "run.checkpoint_every=100000",  # one checkpoint, at the end (after the last update's metrics)
        'ppo.algorithm="grpo"',
        f"ppo.group_size={a.group}",
        f"ppo.batch_size={sequences}",
        f"sampling.batch_size={sequences}",
        f"sampling.max_new_tokens={a.new_tokens}",
        "sampling.temperature=1.0",
        "ppo.num_minibatches=1",
        "ppo.update_epochs=1",
        f"ppo.micro_batch_size={a.micro}",
        f"lora.rank={a.lora_rank}",
        f"lora.alpha={a.lora_alpha}",
        f"ppo.learning_rate={a.lr}",
        "ppo.kl_coef=0.0",  # the KL is in the loss, as mlx-lm-lora and TRL have it
        f"ppo.kl_loss_coef={a.beta}",
        'ppo.kl_loss_estimator="k3"',
        'ppo.loss_aggregation="seq_mean_token_mean"',  # mlx-lm-lora's "grpo" loss type
        *a.overrides,
    ]


def run_ours(a: argparse.Namespace) -> dict:
    """Every ``--layout`` in turn; the record (also written to ``--output`` after each run)."""
    from bench.machine import run_record

    settings = step_settings(a)
    layouts = [parse_layout(s) for s in (a.layouts or ["1", "2", "sync"])]
    output = Path(a.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    record = {"system": "ours", "label": a.label, "model": a.model, **run_record(), "settings": settings}
    record |= {"updates": a.updates, "warmup_updates": a.warmup, "rows": []}

    def save(rows: list[dict]) -> None:
        record["rows"] = rows
        output.write_text(json.dumps(record, indent=1))

    workdir = Path(a.workdir) / (a.label or "run")
    limits = {"timeout_s": a.run_timeout, "warmup": a.warmup}
    save(bench_scaling(layouts, a.updates, workdir, settings, save, **limits))
    return record


def load_records(dirs: list[Path]) -> list[dict]:
    """Every JSON file under ``dirs`` that names its ``system`` (ours or a peer's)."""
    records = []
    for path in sorted(p for d in dirs for p in d.rglob("*.json")):
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(data, dict) and "system" in data:
            records.append(data | {"path": str(path)})
    return records


def system_rows(record: dict) -> list[dict]:
    """One row per measured setup: ``label``, ``system``, ``layout``, ``s_per_step``, ``gen_tokens``, ``note``,
    and for ours the learner's ``busy`` fraction and median ``update_s``."""
    base = {"label": record.get("label", ""), "system": record["system"]}
    if record["system"] == "ours":
        return [
            base
            | {
                "layout": r["layout"],
                "s_per_step": r["s_per_update"],
                "gen_tokens": r["gen_tokens_per_update"],
            }
            | {"busy": r["busy_mean"], "update_s": r["update_s_median"], "note": _note(r, record["updates"])}
            for r in record["rows"]
        ]
    skip = record.get("warmup_steps", 1)
    measured = record["step_s"][skip:]
    gen = record.get("gen_tokens")  # per step, if the record has it; else mean lengths x sequences per step
    if gen is None and record.get("sequences_per_step"):
        lengths = [s.get("train_average_generated_tokens") for s in record.get("steps", [])]
        gen = [x * record["sequences_per_step"] for x in lengths if x is not None]
    gen = float(np.mean(gen[skip:])) if gen and gen[skip:] else None
    note = f"median of {len(measured)} step(s) after {skip}"
    s_per_step = float(np.median(measured)) if measured else None
    row = base | {"layout": "", "s_per_step": s_per_step, "gen_tokens": gen, "note": note}
    if not measured and record["step_s"]:  # shown, but no ratio: its warm-up makes the peer look slower
        row |= {"s_per_step": record["step_s"][0], "first_only": True}
        row["note"] = "FIRST STEP ONLY: holds the warm-up, overstates the time (no ratio taken)"
    return [row]


def _note(row: dict, updates: int) -> str:
    done = f"{row['updates_done']}/{updates} updates, lag max {row['lag_max']}, dropped {row['dropped']}"
    ended = ", timed out" if row["timed_out"] else ", interrupted" if row.get("interrupted") else ""
    return done + ended + (", FAILED" if "error" in row else "")


def _cell(value: float | None, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def render_table(rows: list[dict]) -> list[str]:
    """Markdown per label: every row's s/step and its step rate against each peer's, with the targets."""
    lines = []
    for label in sorted({r["label"] for r in rows}):
        mine = sorted((r for r in rows if r["label"] == label), key=lambda r: r["system"] != "ours")
        peers = {
            r["system"]: r["s_per_step"]
            for r in mine
            if r["system"] != "ours" and r["s_per_step"] and not r.get("first_only")
        }
        header = ["system", "layout", "s/step", "gen tokens/step", "learner busy", "learner update s"]
        header += [f"rate vs {name} (target {TARGETS.get(name, 0):g}x)" for name in peers] + ["note"]
        lines += [
            f"### {label}",
            "",
            "| " + " | ".join(header) + " |",
            "|---|---|" + "---:|" * (len(header) - 3),
        ]
        lines[-1] += "---|"
        for r in mine:
            cells = [r["system"], r["layout"], _cell(r["s_per_step"], ".2f"), _cell(r["gen_tokens"], ".0f")]
            cells += [_cell(r.get("busy"), ".2f"), _cell(r.get("update_s"), ".2f")]
            cells += [_ratio(r, name, s) for name, s in peers.items()] + [r["note"]]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    return lines


def _ratio(row: dict, peer: str, peer_s: float) -> str:
    if row["system"] != "ours" or row["s_per_step"] is None:
        return ""
    ratio = peer_s / row["s_per_step"]
    return f"{ratio:.1f}x" + (" (met)" if ratio >= TARGETS.get(peer, float("inf")) else "")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    ours = sub.add_parser("ours", help="our step time over layouts")
    ours.add_argument("--model", required=True, help="model.name: an mlx-lm folder, 'default' or 'tiny'")
    ours.add_argument("--label", default="", help="e.g. 135m or 1.7b: rows of one label share a table")
    ours.add_argument("--layout", action="append", default=[], dest="layouts", help="default: 1, 2, sync")
    for name, default in [("updates", 6), ("warmup", 2), ("prompts", 16), ("group", 8), ("new-tokens", 256)]:
        ours.add_argument(f"--{name}", type=int, default=default)
    ours.add_argument("--micro", type=int, default=32, help="ppo.micro_batch_size")
    ours.add_argument("--lora-rank", type=int, default=16)
    ours.add_argument("--lora-alpha", type=float, default=32.0, help="scale alpha / rank, as the peer's")
    ours.add_argument("--beta", type=float, default=0.04, help="KL-to-base weight in the loss (0: none)")
    ours.add_argument("--lr", type=float, default=1e-5, help="the peer script's default")
    ours.add_argument("--run-timeout", type=float, default=600.0, help="seconds per launch.py run")
    ours.add_argument("--workdir", default="/tmp/mlx-ppo-e2e")
    ours.add_argument("--set", action="append", default=[], dest="overrides", help="more KEY=VALUE")
    ours.add_argument("--output", required=True)
    table = sub.add_parser("table", help="render ours and the peers' records")
    table.add_argument("dirs", nargs="+", type=Path)
    table.add_argument("--output", help="also write the markdown here")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    exit_on_sigterm()
    if args.command == "ours":
        record = run_ours(args)
        return 1 if any("error" in r for r in record["rows"]) else 0
    rows = [row for record in load_records(args.dirs) for row in system_rows(record)]
    text = "\n".join(render_table(rows))
    print(text)
    if args.output:
        Path(args.output).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
