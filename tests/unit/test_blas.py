import subprocess
import sys

import pytest

from common.blas import env_with_fast_blas, find_fast_blas, is_linux, openblas_coretype

needs_linux_blas = pytest.mark.skipif(
    not is_linux() or find_fast_blas() is None,
    reason="needs Linux with an optimized BLAS installed (make setup)",
)


def test_coretype_from_cpu_flags():
    assert openblas_coretype("flags\t\t: fpu avx avx2 fma avx512f avx512bw avx512vl avx512dq\n") == "SkylakeX"
    assert openblas_coretype("flags\t\t: fpu avx avx2 fma\n") == "Haswell"
    assert openblas_coretype("flags\t\t: fpu sse2\n") is None
    assert openblas_coretype("") is None


@needs_linux_blas
def test_env_preloads_and_keeps_a_chosen_coretype():
    env = env_with_fast_blas({"PATH": "/usr/bin", "OPENBLAS_CORETYPE": "Haswell"})
    assert find_fast_blas() in env["LD_PRELOAD"]
    assert env["OPENBLAS_CORETYPE"] == "Haswell"
    assert env_with_fast_blas(env) == env  # idempotent


@needs_linux_blas
def test_entry_point_reexecs_with_the_preload_and_matmul_is_right(tmp_path):
    script = tmp_path / "probe.py"
    script.write_text(
        "from common.blas import reexec_with_fast_blas\n"
        "reexec_with_fast_blas()\n"
        "import mlx.core as mx, numpy as np\n"
        "maps = open('/proc/self/maps').read()\n"
        "a = np.random.default_rng(0).normal(size=(300, 200)).astype(np.float32)\n"
        "b = np.random.default_rng(1).normal(size=(200, 100)).astype(np.float32)\n"
        "err = np.abs(np.array(mx.array(a) @ mx.array(b)) - a.astype(np.float64) @ b).max()\n"
        "print('openblas' in maps, err)\n"
    )
    env = {k: v for k, v in env_with_fast_blas().items() if k not in ("LD_PRELOAD", "OPENBLAS_CORETYPE")}
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=120)
    loaded, err = out.stdout.split()
    assert loaded == "True", out.stderr
    assert float(err) < 1e-3
