"""The small table helpers every renderer of ``bench/report.py`` shares."""

from __future__ import annotations

BLAS = "python -m common.blas -- python"
"""How the benchmarks run on a CPU: with OpenBLAS preloaded (``common/blas.py``)."""
NOT_RECORDED = "not recorded"

Lines = list[str]


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
