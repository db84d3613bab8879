"""Rewrite the generated blocks of BENCHMARKS.md from the JSON results in ``bench/results/``.

    python bench/report.py [--results bench/results] [--benchmarks BENCHMARKS.md]

Each benchmark owns one block, ``<!-- bench:NAME -->`` ... ``<!-- /bench:NAME -->``; only the text between a pair
of markers is replaced, everything outside them (the analysis, the history of earlier runs) is left as it is.
A block names the command, the machine and the date its result file recorded ("not recorded" where an older file
lacks them), then tables of ratios measured side by side in that run. Absolute times and rates appear only for
rows measured on a GPU: on shared CPU machines they swing too much to compare across runs. A missing result
file gives the command that would produce it. ``make bench`` runs every benchmark and then this script.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script: the repository's packages
    sys.path.insert(0, str(ROOT))

from bench.episode_curve import render_episode_curve  # noqa: E402
from bench.faults import render_faults  # noqa: E402
from bench.first_update import render_first_updates  # noqa: E402
from bench.learning_curves import render_learning  # noqa: E402
from bench.report_runtime import (  # noqa: E402
    render_distributed,
    render_runtime,
    render_scaling_run,
    render_soak,
)
from bench.report_tables import BLAS, NOT_RECORDED, Lines, on_gpu, ratio, table  # noqa: E402

RESULTS = Path(__file__).parent / "results"
OFFLINE = "bash bench/offline_host.sh .whl .devmodel python3 "
CUDA = "bash bench/cuda_host.sh run .whl .devmodel bash bench/cuda_bench.sh "
H200 = "bash bench/cuda_host.sh run .whl .devmodel bash bench/h200_17.sh "

logger = logging.getLogger("bench.report")


@dataclass(frozen=True)
class Benchmark:
    """One generated block: the result file it reads, the command that writes it, how its tables look."""

    name: str
    result_file: str
    command: str
    render: Callable[[dict], Lines]


def describe(info: dict) -> str:
    gpu = f"GPU {info['gpu']}" if info.get("gpu") else "no GPU"
    return (
        f"{info.get('cpu', '?')}, {info.get('cores', '?')} cores, {info.get('system', '?')}, {gpu}, "
        f"MLX {info.get('mlx', '?')} {info.get('backend', '?')} backend"
    )


def provenance(result: dict) -> Lines:
    """Command, machine and date as the result file recorded them; older files only have a machine line."""
    command = f"`{result['command']}`" if result.get("command") else NOT_RECORDED
    if "machine_info" in result:
        machine = describe(result["machine_info"])
    elif result.get("machine"):
        machine = (
            f"{NOT_RECORDED} in detail; the run's own line: {result['machine'].removeprefix('Machine: ')}"
        )
    else:
        machine = NOT_RECORDED
    legacy_date = re.search(r"\bdate (\d{4}-\d{2}-\d{2})", str(result.get("machine", "")))
    day = result.get("date") or (legacy_date.group(1) if legacy_date else NOT_RECORDED)
    return [f"- command: {command}", f"- machine: {machine}", f"- date: {day}"]


def best_rates(rows: list[dict]) -> dict[tuple, float]:
    """Tokens/s of the fastest repeat per (BLAS, batch, sampler)."""
    rates: dict[tuple, float] = {}
    for r in rows:
        key = (r["blas"], r["batch"], r["sampler"])
        rates[key] = max(rates.get(key, 0.0), r["tokens"] / r["seconds"])
    return rates


def best_ours(rates: dict[tuple, float], blas: str, batch: int) -> float | None:
    """Our fastest sampler at (BLAS, batch): 'ours', or its variants ('ours (compiled step)', ...)."""
    mine = [
        v for (b, n, sampler), v in rates.items() if (b, n) == (blas, batch) and sampler.startswith("ours")
    ]
    return max(mine, default=None)


def render_generation(result: dict) -> Lines:
    rates = best_rates(result["rows"])
    gpu_rows = any(blas == "gpu" for blas, _, _ in rates)
    header = ["batch", "BLAS", "ours / mlx_lm.batch_generate tokens/s", "ours: openblas / stock"]
    if gpu_rows:
        header += ["ours tok/s", "mlx_lm.batch_generate tok/s"]
    rows = []
    for batch in sorted({b for _, b, _ in rates}):
        for blas in ("openblas", "stock", "gpu"):
            ours, theirs = best_ours(rates, blas, batch), rates.get((blas, batch, "mlx_lm.batch_generate"))
            if ours is None or theirs is None:
                continue
            stock = rates.get(("stock", batch, "ours"))
            cells = [str(batch), blas, ratio(ours, theirs), ratio(ours, stock) if blas == "openblas" else ""]
            if gpu_rows:
                cells += [f"{ours:.1f}", f"{theirs:.1f}"] if blas == "gpu" else ["", ""]
            rows.append(cells)
    return table(header, "rlrr" + "rr" * gpu_rows, rows)


def learner_row(r: dict, first: dict, peak: float, gpu: bool) -> list[str]:
    row = [r["value_model"]] + ([str(r["threads"])] if "threads" in first else [])
    row += [ratio(first["update_s"], r["update_s"]), f"{r['gflops'] / peak:.1%}", f"{r['peak_gb']:.2f}"]
    return row + ([f"{r['update_s']:.2f}", f"{r['tokens_per_s']:.0f}", f"{r['gflops']:.1f}"] if gpu else [])


def mfu_note(result: dict, gpu: bool) -> str:
    """What MFU is measured against: the GEMM peak of the same run (its dtype from older files' machine line)."""
    legacy_dtype = re.search(r"(\w+) matmul peak", str(result.get("machine", "")))
    dtype = result.get("peak_dtype") or (legacy_dtype.group(1) if legacy_dtype else "")
    gemm = f"{dtype} GEMM" if dtype else "GEMM"
    peak = f" ({result['peak_gflops']:.0f} GFLOP/s)" if gpu else ""
    return f"MFU: the update's matmul FLOP/s over the {gemm} peak measured in the same run{peak}."


def render_learner(result: dict) -> Lines:
    gpu, rows = on_gpu(result), result["rows"]
    first = rows[0]
    threads = "threads" in first  # learner threads (ppo.compute_threads), recorded since session 5
    plural = "" if first.get("threads") == 1 else "s"
    baseline = first["value_model"] + (f", {first['threads']} thread{plural}" if threads else "")
    header = ["value model"] + (["threads"] if threads else [])
    header += [f"update speed vs {baseline}", "MFU", "peak memory GB"]
    header += ["update s", "train tokens/s", "achieved GFLOP/s"] if gpu else []
    cells = [learner_row(r, first, result["peak_gflops"], gpu) for r in rows]
    return [mfu_note(result, gpu), "", *table(header, "l" + "r" * threads + "rrr" + "rrr" * gpu, cells)]


def render_snapshot_transfer(result: dict) -> Lines:
    rows = result["rows"]
    whole = next(r["seconds"] for r in rows if not r["chunks"] and not r.get("shared"))
    header = ["transfer", "chunks", "largest message MB", "time vs whole"]
    cells = []
    for r in rows:
        name = (
            "shared-memory file"
            if r.get("shared")
            else "whole"
            if not r["chunks"]
            else f"chunks of {r['chunk_mb']:g} MB"
        )
        chunks = "" if r.get("shared") or not r["chunks"] else str(r["chunks"])
        cells.append([name, chunks, f"{r['largest_message_mb']:.0f}", ratio(r["seconds"], whole)])
    size = f"Snapshot {rows[0]['snapshot_mb']:.0f} MB, request to applied in the actor's model, best of the repeats."
    return [size, "", *table(header, "lrrr", cells)]


def render_refill(result: dict) -> Lines:
    rows = {r["variant"]: r["seconds"] for r in result["rows"]}
    names = {
        "chunks": f"chunks of {result['max_rows']}, each until its longest sequence ends",
        "refill": f"at most {result['max_rows']} live, finished rows refilled (`sampling.max_rows`)",
        "all": "every sequence in one batch",
    }
    cells = [[names[v], ratio(rows["chunks"], seconds)] for v, seconds in rows.items()]
    return table(["variant", "tokens/s vs chunks"], "lr", cells)


BENCHMARKS = [
    Benchmark("generation", "generation.json", f"{BLAS} bench/generation.py", render_generation),
    Benchmark("learner", "learner.json", f"{BLAS} bench/learner.py --repeats 2", render_learner),
    Benchmark("runtime", "runtime.json", f"{BLAS} bench/runtime.py", render_runtime),
    Benchmark("distributed", "distributed.json", f"{BLAS} bench/distributed.py", render_distributed),
    Benchmark("soak", "soak.json", f"{BLAS} bench/soak.py --minutes 3", render_soak),
    Benchmark("refill", "refill.json", f"{BLAS} bench/refill.py", render_refill),
    Benchmark("learning", "learning.json", "python bench/learning.py --peer mlx-lm-lora", render_learning),
    Benchmark("faults", "faults.json", f"{BLAS} bench/faults.py", render_faults),
    Benchmark(
        "snapshot-transfer",
        "snapshot_transfer.json",
        f"{BLAS} bench/snapshot_transfer.py",
        render_snapshot_transfer,
    ),
    # Runs on other machines (bench/offline_host.sh, bench/cuda_bench.sh); make bench only re-renders them.
    Benchmark(
        "scaling-16core", "scaling-16core.json", OFFLINE + "bench/runtime.py scaling", render_scaling_run
    ),
    Benchmark(
        "learner-16core-m16",
        "learner-16core-m16.json",
        OFFLINE + "bench/learner.py --model /tmp/smollm-random --repeats 2 --threads 1,0 --micro 16",
        render_learner,
    ),
    Benchmark(
        "learner-16core-m8",
        "learner-16core-m8.json",
        OFFLINE + "bench/learner.py --model /tmp/smollm-random --repeats 2 --threads 0 --micro 8",
        render_learner,
    ),
    Benchmark("h100-generation", "h100-generation.json", CUDA + "bench", render_generation),
    Benchmark("h100-learner-b16", "h100-learner-b16.json", CUDA + "bench", render_learner),
    Benchmark("h100-learner-b64", "h100-learner-b64.json", CUDA + "bench", render_learner),
    Benchmark("h100-runtime", "h100-runtime.json", CUDA + "runtime", render_scaling_run),
    Benchmark("episode-curve", "episode-curve.json", BLAS + " bench/episode_curve.py", render_episode_curve),
    Benchmark(
        "h200-learner",
        "h200/finish/learner17.json",
        H200 + "finish-a OUT; ... finish-b OUT",
        render_first_updates,
    ),
    Benchmark(
        "h200-generation-1.7b",
        "h200/finish/h200-generation-1.7b.json",
        H200 + "finish-b OUT",
        render_generation,
    ),
    *(
        Benchmark(f"h200-{name}", f"h200/finish2/{name}.json", H200 + mode, render_generation)
        for name, mode in (("generation-1.7b-scatter", "decode3 OUT"), ("generation-135m-b32", "decode OUT"))
    ),
]


def shown_path(path: Path) -> str:
    resolved = path.resolve()
    return str(resolved.relative_to(ROOT)) if resolved.is_relative_to(ROOT) else str(path)


def render_block(bench: Benchmark, results_dir: Path) -> Lines:
    """The text between the markers of ``bench``: provenance and tables, or how to produce the missing result."""
    path = results_dir / bench.result_file
    intro = f"_Generated by `bench/report.py` from `{shown_path(path)}`; `make bench` rewrites this block._"
    if not path.exists():
        return [intro, "", f"No result yet: run `{bench.command}` to produce it."]
    result = json.loads(path.read_text())
    try:
        tables = bench.render(result)
    except KeyError as missing:
        tables = [f"The result lacks the field {missing}: run `{bench.command}` to produce a complete one."]
    return [intro, "", *provenance(result), "", *tables]


def replace_block(text: str, name: str, body: Lines) -> tuple[str, bool]:
    """``text`` with the inside of the ``name`` markers replaced by ``body``; False when the markers are absent."""
    pattern = re.compile(rf"(<!-- bench:{name} -->\n).*?(<!-- /bench:{name} -->)", re.DOTALL)
    inner = "\n".join(body) + "\n"
    new, count = pattern.subn(lambda m: m.group(1) + inner + m.group(2), text)
    return new, count > 0


def rewrite(benchmarks_md: Path, results_dir: Path) -> list[str]:
    """Rewrite every marked block of ``benchmarks_md``; returns the names of the blocks rewritten."""
    text = benchmarks_md.read_text()
    rewritten = []
    for bench in BENCHMARKS:
        text, found = replace_block(text, bench.name, render_block(bench, results_dir))
        if found:
            rewritten.append(bench.name)
        else:
            logger.warning("no <!-- bench:%s --> block in %s: left out", bench.name, benchmarks_md)
    benchmarks_md.write_text(text)
    return rewritten


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--results", type=Path, default=RESULTS, help="folder of the JSON result files")
    parser.add_argument("--benchmarks", type=Path, default=ROOT / "BENCHMARKS.md", help="file to rewrite")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    rewritten = rewrite(args.benchmarks, args.results)
    logger.info("rewrote %d block(s) of %s: %s", len(rewritten), args.benchmarks, ", ".join(rewritten))


if __name__ == "__main__":
    main()
