"""bench/report.py on synthetic result files: only the marked blocks change, ratios are right, nothing is invented."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from bench import machine, report, report_runtime

CPU = {"cpu": "Test CPU", "cores": 2, "system": "Linux x86_64", "gpu": None, "mlx": "0.0", "backend": "CPU"}
GPU = {**CPU, "gpu": "Test GPU", "backend": "GPU"}
HAND_WRITTEN = """# Benchmarks

Hand-written intro that must survive.

## Generation
<!-- bench:generation -->
stale generated text
<!-- /bench:generation -->

History: | 32 | openblas | 119.2 | 93.3 | 1.28x |

## Learner
<!-- bench:learner -->
<!-- /bench:learner -->
## Runtime
<!-- bench:runtime -->
old
<!-- /bench:runtime -->
<!-- bench:distributed -->
<!-- /bench:distributed -->
Analysis between blocks.
<!-- bench:soak -->
<!-- /bench:soak -->
Trailing text.
"""


def generation_result(info: dict, blas: str) -> dict:
    rows = [  # ours 32 tok/s (best of two repeats), mlx_lm 16 tok/s; the stock BLAS 8 tok/s
        {"blas": blas, "batch": 8, "sampler": "ours", "tokens": 64, "seconds": 4.0},
        {"blas": blas, "batch": 8, "sampler": "ours", "tokens": 64, "seconds": 2.0},
        {"blas": blas, "batch": 8, "sampler": "mlx_lm.batch_generate", "tokens": 64, "seconds": 4.0},
    ]
    if blas == "openblas":
        rows += [
            {"blas": "stock", "batch": 8, "sampler": "ours", "tokens": 64, "seconds": 8.0},
            {"blas": "stock", "batch": 8, "sampler": "mlx_lm.batch_generate", "tokens": 64, "seconds": 16.0},
        ]
    record = {"command": "python bench/generation.py --batch-sizes 8", "date": "2031-01-02"}
    return {**record, "machine_info": info, "rows": rows}


RESULTS = {
    "generation.json": generation_result(CPU, "openblas"),
    "learner.json": {  # legacy: no command, date or machine_info
        "machine": "Machine: Old CPU, 2 cores; date 2030-05-06; float32 matmul peak 200 GFLOP/s.",
        "peak_gflops": 200.0,
        "rows": [
            {
                "value_model": "separate",
                "update_s": 40.0,
                "tokens_per_s": 50.0,
                "gflops": 60.0,
                "peak_gb": 2.3,
            },
            {
                "value_model": "shared",
                "update_s": 20.0,
                "tokens_per_s": 100.0,
                "gflops": 70.0,
                "peak_gb": 1.5,
            },
        ],
    },
    "distributed.json": {
        "command": "python bench/distributed.py",
        "date": "2031-01-02",
        "machine_info": CPU,
        "batch": 16,
        "rows": [{"ranks": 1, "update_s": 30.0}, {"ranks": 2, "update_s": 20.0}],
        "max_weight_diff": 1.5e-8,
    },
    "soak.json": {
        "machine": "Old CPU, 2 cores",
        "minutes": 3.0,
        "updates": 100,
        "rss_mb_after_warmup": {"learner": 100.0, "actor-0": 50.0},
        "rss_mb_end": {"learner": 110.0, "actor-0": 49.0},
        "rss_growth": {"learner": 0.1, "actor-0": -0.02},
        "buffer_depth_max": 0,
        "in_flight_max": 16,
        "lag_dropped": 3,
        "rejects": {},
    },
}


def outside_blocks(text: str) -> str:
    return re.sub(r"(<!-- bench:(\w+) -->\n).*?(<!-- /bench:\2 -->)", r"\1\3", text, flags=re.DOTALL)


def block(text: str, name: str) -> str:
    return re.search(rf"<!-- bench:{name} -->\n(.*?)<!-- /bench:{name} -->", text, re.DOTALL).group(1)


@pytest.fixture
def rewritten(tmp_path: Path) -> tuple[Path, Path]:
    """BENCHMARKS.md with every block and result files for all but the runtime benchmark, rewritten once."""
    results = tmp_path / "results"
    results.mkdir()
    for name, result in RESULTS.items():
        (results / name).write_text(json.dumps(result))
    doc = tmp_path / "BENCHMARKS.md"
    doc.write_text(HAND_WRITTEN)
    assert report.rewrite(doc, results) == ["generation", "learner", "runtime", "distributed", "soak"]
    return doc, results


def test_only_marked_blocks_change_and_a_second_run_changes_nothing(rewritten: tuple[Path, Path]) -> None:
    doc, results = rewritten
    first = doc.read_text()
    assert outside_blocks(first) == outside_blocks(HAND_WRITTEN)
    assert "stale generated text" not in first
    report.rewrite(doc, results)
    assert doc.read_text() == first


def test_missing_result_names_the_command_that_produces_it(rewritten: tuple[Path, Path]) -> None:
    runtime = block(rewritten[0].read_text(), "runtime")
    assert "No result yet: run `python -m common.blas -- python bench/runtime.py` to produce it." in runtime
    assert "|" not in runtime


def test_generation_ratios_and_no_absolute_rates_on_cpu(rewritten: tuple[Path, Path]) -> None:
    generation = block(rewritten[0].read_text(), "generation")
    assert "- command: `python bench/generation.py --batch-sizes 8`" in generation
    assert "- machine: Test CPU, 2 cores, Linux x86_64, no GPU, MLX 0.0 CPU backend" in generation
    assert "- date: 2031-01-02" in generation
    assert "| 8 | openblas | 2.00x | 4.00x |" in generation  # best repeat 32 tok/s vs 16; vs stock 8
    assert "| 8 | stock | 2.00x |  |" in generation
    assert "tok/s |" not in generation  # no absolute-rate columns


def test_gpu_rows_carry_absolute_rates(tmp_path: Path) -> None:
    (tmp_path / "generation.json").write_text(json.dumps(generation_result(GPU, "gpu")))
    lines = report.render_block(report.BENCHMARKS[0], tmp_path)
    assert "| 8 | gpu | 2.00x |  | 32.0 | 16.0 |" in lines
    assert any("GPU Test GPU" in line for line in lines)


def test_legacy_result_says_not_recorded_and_learner_ratios(rewritten: tuple[Path, Path]) -> None:
    learner = block(rewritten[0].read_text(), "learner")
    assert "- command: not recorded" in learner
    assert "- date: 2030-05-06" in learner  # from the older file's own machine line
    assert "float32 GEMM peak" in learner
    assert "| separate | 1.00x | 30.0% | 2.30 |" in learner  # MFU = 60 / 200
    assert "| shared | 2.00x | 35.0% | 1.50 |" in learner
    assert "40.00" not in learner  # CPU: no update seconds


def test_distributed_and_soak_ratios(rewritten: tuple[Path, Path]) -> None:
    text = rewritten[0].read_text()
    distributed, soak = block(text, "distributed"), block(text, "soak")
    assert "| 2 | 8 | 1.50x |" in distributed
    assert "1.5e-08" in distributed
    assert "| learner | 100 | 110 | +10.0% |" in soak
    assert "| actor-0 | 50 | 49 | -2.0% |" in soak
    assert "- command: not recorded" in soak and "- date: not recorded" in soak


def test_missing_markers_leave_the_file_as_it_was(tmp_path: Path) -> None:
    doc = tmp_path / "BENCHMARKS.md"
    doc.write_text("# Benchmarks\n\nNo markers here.\n")
    assert report.rewrite(doc, tmp_path) == []
    assert doc.read_text() == "# Benchmarks\n\nNo markers here.\n"


def test_command_line_is_relative_to_the_repository(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LD_PRELOAD", raising=False)
    script = str(machine.ROOT / "bench" / "soak.py")
    assert machine.command_line([script, "--minutes", "3"]) == "python bench/soak.py --minutes 3"
    monkeypatch.setenv("LD_PRELOAD", "/usr/lib/libopenblas.so.0")
    assert machine.command_line([script]).startswith("python -m common.blas -- python bench/soak.py")


def test_scaling_chart_bars_are_proportional_to_samples_per_s() -> None:
    rows = [
        {"mode": "sync", "actors": 1, "samples_per_s": 0.5},
        {"mode": "async", "actors": 2, "samples_per_s": 1.0},
        {"mode": "async", "actors": 4, "samples_per_s": 0.75},
    ]
    chart = report_runtime.scaling_chart(rows, width=40)
    bars = {line.split("|")[0].strip(): line.split("|")[1].split() for line in chart if "|" in line}
    assert bars["sync"] == ["#" * 20, "1.00x"]
    assert bars["2 actors"] == ["#" * 40, "2.00x"]
    assert bars["4 actors"] == ["#" * 30, "1.50x"]


def test_the_episode_curve_reports_its_thirds_and_a_running_mean() -> None:
    from bench.episode_curve import render_episode_curve, thirds

    rows = [
        {"version": v, "time_s": 10.0 * v, "score_mean": s} for v, s in enumerate([-0.3, 0.0, 0.3, 0.6], 1)
    ]
    assert thirds(rows) == (pytest.approx(-0.3), pytest.approx(0.6))
    text = "\n".join(render_episode_curve({"rows": rows}))
    assert "first third of the updates: -0.300; last third: 0.600 (4 updates in 40 s)" in text
    assert "| 4 | 40 | 0.600 | 0.150 |" in text  # the mean of the 4 so far
