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
import math
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

RESULTS = Path(__file__).parent / "results"
BLAS = "python -m common.blas -- python"
NOT_RECORDED = "not recorded"
OFFLINE = "bash bench/offline_host.sh .whl .devmodel python3 "
CUDA = "bash bench/cuda_host.sh run .whl .devmodel bash bench/cuda_bench.sh "
H200 = "bash bench/cuda_host.sh run .whl .devmodel bash bench/h200_17.sh "

logger = logging.getLogger("bench.report")

Lines = list[str]


@dataclass(frozen=True)
class Benchmark:
    """One generated block: the result file it reads, the command that writes it, how its tables look."""

    name: str
    result_file: str
    command: str
    render: Callable[[dict], Lines]


def ratio(numerator: float, denominator: float) -> str:
    return f"{numerator / denominator:.2f}x" if denominator else ""


def table(header: list[str], aligns: str, rows: list[list[str]]) -> Lines:
    """A markdown table; ``aligns`` has one letter per column: ``r`` right-aligned, anything else left."""
    rule = "|".join("---:" if a == "r" else "---" for a in aligns)
    return [f"| {' | '.join(header)} |", f"|{rule}|", *(f"| {' | '.join(cells)} |" for cells in rows)]


def on_gpu(result: dict) -> bool:
    """Whether the run was measured on a GPU (older files only say so in their machine line)."""
    info = result.get("machine_info")
    if info is not None:
        return bool(info.get("gpu"))
    return "GPU backend" in str(result.get("machine", ""))


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


def render_sync(rows: list[dict], gpu: bool) -> Lines:
    one_actor = {r["where"]: r["p50_ms"] for r in rows if r["actors"] == 1}
    loopback = {r["actors"]: r["p50_ms"] for r in rows if r["where"] == "loopback"}
    header = [
        "actors",
        "where",
        "p50 / p50 with 1 actor",
        "p50 / loopback p50",
        "snapshot MB",
        "of full weights",
    ]
    header += ["p50 ms", "p90 ms"] if gpu else []
    cells = []
    for r in rows:
        vs_loopback = ratio(r["p50_ms"], loopback[r["actors"]]) if r["actors"] in loopback else ""
        row = [str(r["actors"]), r["where"], ratio(r["p50_ms"], one_actor.get(r["where"], 0.0)), vs_loopback]
        row += [f"{r['bytes'] / 1e6:.1f}", f"{r['bytes'] / r['full_bytes']:.2%}"]
        row += [f"{r['p50_ms']:.0f}", f"{r['p90_ms']:.0f}"] if gpu else []
        cells.append(row)
    return [
        "Weight sync (`sync`), publish to every actor applied:",
        "",
        *table(header, "rlrrrr" + "rr" * gpu, cells),
    ]


def render_transport(t: dict, gpu: bool) -> Lines:
    absolute = f" ({t['p50_ms']:.2f} ms p50)" if gpu else ""
    sent = f"Transport (`transport`): one {t['bytes'] / 1e3:.0f} kB experience batch over TCP{absolute}"
    if not math.isfinite(t["update_s"]):
        return [f"{sent}; no learner update time (`learner.json`) was there to compare it with."]
    return [
        f"{sent} = {t['p50_ms'] / 1000 / t['update_s']:.4%} of a learner update (time from `learner.json`)."
    ]


def render_scaling(rows: list[dict], gpu: bool) -> Lines:
    base = rows[0]["samples_per_s"]
    header = [
        "mode",
        "actors",
        "samples/s vs synchronous",
        "learner busy (updates 2-N)",
        "lag max",
        "dropped",
    ]
    header += ["samples/s"] if gpu else []
    cells = []
    for r in rows:
        busy = "" if r.get("busy_min") is None else f"{r['busy_min']:.2f}-{r['busy_max']:.2f}"
        row = [r["mode"], str(r["actors"]), ratio(r["samples_per_s"], base), busy]
        row += [str(r.get("lag_max", "")), str(r.get("dropped", ""))]
        row += [f"{r['samples_per_s']:.3f}"] if gpu else []
        cells.append(row)
    return [
        "End-to-end (`scaling`):",
        "",
        *table(header, "lrrrrr" + "r" * gpu, cells),
        "",
        *scaling_chart(rows),
    ]


def scaling_chart(rows: list[dict], width: int = 40) -> Lines:
    """The scaling curve as a text bar chart: one bar per row, its length samples/s over the fastest row's."""
    base, best = rows[0]["samples_per_s"], max(r["samples_per_s"] for r in rows)
    bars = []
    for r in rows:
        label = "sync" if r["mode"] == "sync" else f"{r['actors']} actor{'s' * (r['actors'] > 1)}"
        bar = "#" * max(1, round(width * r["samples_per_s"] / best))
        bars.append(f"{label:>9} | {bar:<{width}} {ratio(r['samples_per_s'], base)}")
    return ["```text", "samples/s, relative to the synchronous loop", *bars, "```"]


def render_runtime(result: dict) -> Lines:
    gpu, parts = on_gpu(result), []
    renderers = {"sync": render_sync, "transport": render_transport, "scaling": render_scaling}
    for part, render in renderers.items():
        if part in result:
            parts += [*render(result[part], gpu), ""]
        else:
            parts += [
                f"`{part}`: not in this result; run `{BLAS} bench/runtime.py {part}` to produce it.",
                "",
            ]
    return parts[:-1]


def render_scaling_run(result: dict) -> Lines:
    """A result of ``bench/runtime.py scaling`` alone (a run on another machine)."""
    return render_scaling(result["scaling"], on_gpu(result))


def render_distributed(result: dict) -> Lines:
    gpu, rows = on_gpu(result), result["rows"]
    batch = result.get("batch")
    measured = "mfu" in rows[0]  # older files have the speed ratio alone
    header = ["ranks", "sequences per rank", "update speed vs 1 rank"]
    header += ["MFU", "peak memory GB, all ranks"] if measured else []
    header += ["update s"] if gpu else []
    cells = []
    for r in rows:
        per_rank = str(batch // r["ranks"]) if batch else NOT_RECORDED
        row = [str(r["ranks"]), per_rank, ratio(rows[0]["update_s"], r["update_s"])]
        row += [f"{r['mfu']:.1%}", f"{r['peak_gb']:.2f}"] if measured else []
        cells.append(row + ([f"{r['update_s']:.2f}"] if gpu else []))
    diff = f"Largest difference between the weights trained by 1 and by 2 ranks: {result['max_weight_diff']:.1e}."
    micro = f" Micro-batches of {result['micro']} sequences on each rank." if "micro" in result else ""
    return [*table(header, "rrr" + "rr" * measured + "r" * gpu, cells), "", diff + micro]


def render_soak(result: dict) -> Lines:
    warm, end = result["rss_mb_after_warmup"], result["rss_mb_end"]
    header = ["process", "RSS MB after warm-up", "RSS MB at the end", "growth"]
    cells = [
        [name, f"{warm[name]:.0f}", f"{end[name]:.0f}", f"{growth:+.1%}"]
        for name, growth in sorted(result["rss_growth"].items())
    ]
    setup = f", {result['actors']} actors, model {result['model']}" if "actors" in result else ""
    summary = (
        f"{result['minutes']:g} minutes{setup}, {result['updates']} updates; warm-up = the first fifth. Buffer depth max "
        f"{result['buffer_depth_max']}, sequences in flight max {result['in_flight_max']}, dropped as stale "
        f"{result['lag_dropped']}, rejects {result.get('rejects') or 'none'}."
    )
    return [*table(header, "lrrr", cells), "", summary]


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
