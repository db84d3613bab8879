"""Optimized BLAS for the Linux CPU backend.

The ``mlx[cpu]`` wheel links a reference BLAS: a float32 1024^3 matmul runs at ~8 GFLOP/s on our machines and at
~257 GFLOP/s with Debian's OpenBLAS preloaded (BENCHMARKS.md measures it). A library can only be preloaded when a process
starts, so every process we launch gets ``LD_PRELOAD`` in its environment, and entry points re-exec themselves
once when they were started without it. macOS (Accelerate) and CUDA need none of this: every function here is a
no-op off Linux.

Run ``python -m common.blas -- CMD ...`` to run any command with the preload (the Makefile runs pytest this way).
"""

from __future__ import annotations

import ctypes
import logging
import os
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

logger = logging.getLogger(__name__)

_LIB_NAMES = ("libopenblas.so.0", "libopenblas.so", "libblis.so.4", "libmkl_rt.so")
_SEARCH_DIRS = (
    "/usr/lib/x86_64-linux-gnu/openblas-pthread",
    "/usr/lib/aarch64-linux-gnu/openblas-pthread",
    "/usr/lib/x86_64-linux-gnu",
    "/usr/lib/aarch64-linux-gnu",
    "/usr/lib64",
    "/usr/lib",
)
# Set by us on re-exec so a process whose preload failed to take never loops.
_REEXEC_MARK = "MLX_PPO_BLAS_REEXEC"
INSTALL_HINT = (
    "no optimized BLAS found: MLX on this Linux CPU will be ~30x slower. "
    "Install one with: apt-get install libopenblas0-pthread (or run 'make setup' as root)"
)


def is_linux() -> bool:
    return sys.platform.startswith("linux")


def find_fast_blas() -> str | None:
    """Path of an optimized BLAS shared library on this Linux machine, or None (always None off Linux)."""
    if not is_linux():
        return None
    try:
        listing = subprocess.run(["ldconfig", "-p"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        listing = ""
    for name in _LIB_NAMES:
        for line in listing.splitlines():
            parts = line.strip().split(" => ")
            if len(parts) == 2 and parts[0].split(" ")[0] == name and Path(parts[1]).exists():
                return parts[1]
    for directory in _SEARCH_DIRS:
        for name in _LIB_NAMES:
            candidate = Path(directory) / name
            if candidate.exists():
                return str(candidate)
    return None


def is_preloaded(env: Mapping[str, str] | None = None) -> bool:
    """Whether ``env`` (default: this process's) already preloads an optimized BLAS."""
    preload = (os.environ if env is None else env).get("LD_PRELOAD", "")
    return any(name.split(".so")[0] in preload for name in _LIB_NAMES)


def openblas_coretype(cpuinfo: str | None = None) -> str | None:
    """The OpenBLAS kernel family this x86 CPU supports, from its /proc/cpuinfo flags (None: let OpenBLAS decide).

    OpenBLAS falls back to its slowest kernels ("Prescott") on CPUs newer than the build knows: Debian 12's
    0.3.21 does so on our Sapphire Rapids VMs, 33 GFLOP/s instead of 184 with SkylakeX kernels.
    """
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return None
    flags_line = next((line for line in cpuinfo.splitlines() if line.startswith("flags")), "")
    flags = set(flags_line.partition(":")[2].split())
    if {"avx512f", "avx512bw", "avx512vl", "avx512dq"} <= flags:
        return "SkylakeX"
    if {"avx2", "fma"} <= flags:
        return "Haswell"
    return None


# glibc's malloc returns every block over 128 KiB to the kernel on free, so each new MLX buffer of an update
# (activations of a few MB) is fresh memory again: page faults and zeroing took ~9% of a LoRA layer's
# forward+backward in a profile, and keeping freed memory in the heap made it 14% faster (BENCHMARKS.md).
MALLOC_TUNING = {"MALLOC_MMAP_THRESHOLD_": str(32 << 20), "MALLOC_TRIM_THRESHOLD_": str(1 << 30)}


def env_with_fast_blas(env: Mapping[str, str] | None = None) -> dict[str, str]:
    """A copy of ``env`` (default: os.environ) that preloads the optimized BLAS when this is Linux and one exists.

    An OPENBLAS_CORETYPE already set (some machines set a safe one) is kept; otherwise the CPU's is set. On
    Linux the glibc malloc settings of ``MALLOC_TUNING`` are added unless the environment sets them already.
    """
    out = dict(os.environ if env is None else env)
    if is_linux():
        for key, value in MALLOC_TUNING.items():
            out.setdefault(key, value)
    lib = find_fast_blas()
    if lib is None or is_preloaded(out):
        return out
    out["LD_PRELOAD"] = f"{lib} {out['LD_PRELOAD']}".strip() if out.get("LD_PRELOAD") else lib
    coretype = openblas_coretype() if "openblas" in lib else None
    if coretype and not out.get("OPENBLAS_CORETYPE"):
        out["OPENBLAS_CORETYPE"] = coretype
    return out


def reexec_with_fast_blas(argv: Sequence[str] | None = None) -> None:
    """Re-exec this Python process with the BLAS preloaded, once; warn in one line when none is available.

    Call first thing in a ``__main__``, before MLX is imported. Returns normally when nothing needs doing.
    """
    if not is_linux() or is_preloaded() or os.environ.get(_REEXEC_MARK):
        return
    env = env_with_fast_blas()
    if not is_preloaded(env):
        logger.warning(INSTALL_HINT)
        return
    env[_REEXEC_MARK] = "1"
    args = [sys.executable, *(sys.argv if argv is None else argv)]
    os.execve(sys.executable, args, env)


def set_blas_threads(threads: int) -> bool:
    """Set the preloaded OpenBLAS's thread count in this running process; False where there is none to set.

    For a process that runs several GEMMs at once from its own threads (``learner/shards.py``): OpenBLAS's
    worker threads spin between calls and then take cores from the other callers. Accelerate (macOS) and BLIS
    have no such call; nothing is done there.
    """
    if not is_linux():
        return False
    try:
        setter = ctypes.CDLL(None).openblas_set_num_threads  # global symbols include the preloaded library's
    except (OSError, AttributeError):
        return False
    setter.argtypes = [ctypes.c_int]
    setter(max(1, threads))
    return True


def main(argv: Sequence[str]) -> int:
    """``python -m common.blas [--] CMD ARGS...``: run CMD with the optimized BLAS preloaded when available."""
    args = list(argv[1:] if argv[:1] == ["--"] else argv)
    if not args:
        print(f"fast BLAS: {find_fast_blas() or 'none'}; preloaded here: {is_preloaded()}")
        return 0
    env = env_with_fast_blas()
    if is_linux() and not is_preloaded(env):
        print(f"warning: {INSTALL_HINT}", file=sys.stderr)
    os.execvpe(args[0], args, env)
    return 127  # unreachable: execvpe replaces this process or raises


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
