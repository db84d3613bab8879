"""The renderers of the runtime benchmarks' blocks (``bench/runtime.py``, ``bench/distributed.py``,
``bench/soak.py``) for ``bench/report.py``: sync latency, transport, actor scaling, ranks, soak."""

from __future__ import annotations

import math

from bench.report_tables import BLAS, NOT_RECORDED, Lines, on_gpu, ratio, table


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
