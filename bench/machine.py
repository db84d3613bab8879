"""One line describing the machine a benchmark ran on (CPU model, cores, OS, accelerator)."""

from __future__ import annotations

import os
import platform
from pathlib import Path


def describe_machine() -> str:
    cpu = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        names = [
            ln.split(":", 1)[1].strip()
            for ln in cpuinfo.read_text().splitlines()
            if ln.startswith("model name")
        ]
        cpu = names[0] if names else cpu
    import mlx.core as mx

    device = (
        "CPU backend"
        if mx.default_device() == mx.cpu
        else f"GPU backend ({mx.device_info().get('device_name', 'gpu')})"
    )
    return f"{cpu}, {os.cpu_count()} cores, {platform.system()} {platform.machine()}, MLX {mx.__version__} {device}"
