"""What a benchmark ran on and how it was started: machine facts, the command line and the date.

``run_record()`` is what every bench script stores in its JSON result (``command``, ``date``, ``machine_info``),
and what ``bench/report.py`` prints above each generated table in BENCHMARKS.md.
"""

from __future__ import annotations

import os
import platform
import shlex
import sys
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo where there is one, else what ``platform`` knows."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def gpu_name() -> str | None:
    """Name of the GPU that MLX's default device is, or None when MLX computes on the CPU."""
    import mlx.core as mx

    if mx.default_device() == mx.cpu:
        return None
    for info_fn in (
        getattr(mx, "device_info", None),
        getattr(getattr(mx, "metal", None), "device_info", None),
    ):
        try:
            name = info_fn().get("device_name") if info_fn else None
        except Exception:  # noqa: BLE001 - a missing or failing query only costs the name
            name = None
        if name:
            return str(name)
    cuda = getattr(mx, "cuda", None)
    return "CUDA GPU" if cuda is not None and cuda.is_available() else "GPU"


def machine_info() -> dict:
    """CPU model, core count, OS, GPU (None on the CPU backend), MLX version and backend, BLAS preload."""
    import mlx.core as mx

    from common.blas import is_preloaded

    gpu = gpu_name()
    return {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "system": f"{platform.system()} {platform.machine()}",
        "gpu": gpu,
        "mlx": mx.__version__,
        "backend": "GPU" if gpu else "CPU",
        "blas_preloaded": is_preloaded(),
    }


def describe_machine() -> str:
    """One line: CPU model, cores, OS, MLX version and backend (with the GPU's name)."""
    info = machine_info()
    device = f"GPU backend ({info['gpu']})" if info["gpu"] else "CPU backend"
    return f"{info['cpu']}, {info['cores']} cores, {info['system']}, MLX {info['mlx']} {device}"


def command_line(argv: list[str] | None = None) -> str:
    """The command that reproduces this run from the repository root: ``python SCRIPT ARGS``, behind
    ``python -m common.blas --`` when the optimized BLAS is preloaded (as ``make bench`` runs it)."""
    from common.blas import is_preloaded

    args = list(sys.argv if argv is None else argv)
    script = Path(args[0]).resolve()
    shown = str(script.relative_to(ROOT)) if script.is_relative_to(ROOT) else args[0]
    prefix = ["python", "-m", "common.blas", "--", "python"] if is_preloaded() else ["python"]
    return shlex.join([*prefix, shown, *args[1:]])


def run_record(argv: list[str] | None = None) -> dict:
    """The ``command``, ``date`` and ``machine_info`` fields every bench result JSON carries."""
    return {"command": command_line(argv), "date": date.today().isoformat(), "machine_info": machine_info()}
