"""The kept kernel cache: every process the launcher starts compiles MLX's GPU kernels into the machine cache
unless the user chose a folder."""

import subprocess
import sys
from importlib import metadata

from common.machine_cache import KERNEL_CACHE_ENV, keep_compiled_kernels
from tests.helpers import ROOT


def test_the_kernel_cache_defaults_to_the_machine_cache_per_mlx_release(tmp_path, monkeypatch):
    monkeypatch.setenv("MLX_PPO_CACHE", str(tmp_path))
    environ: dict[str, str] = {}
    folder = keep_compiled_kernels(environ)
    assert environ[KERNEL_CACHE_ENV] == folder == str(tmp_path / "kernels" / f"mlx-{metadata.version('mlx')}")


def test_a_kernel_cache_the_user_chose_is_kept(tmp_path):
    environ = {KERNEL_CACHE_ENV: str(tmp_path / "mine")}
    assert keep_compiled_kernels(environ) == str(tmp_path / "mine")
    assert environ == {KERNEL_CACHE_ENV: str(tmp_path / "mine")}


def test_the_launcher_sets_it_for_itself_and_every_process_it_starts(tmp_path):
    script = tmp_path / "probe.py"  # a file, not -c: the launcher re-executes its own command line
    script.write_text(
        f"import os, sys\nsys.path.insert(0, {str(ROOT)!r})\nfrom launcher.cli import main\n"
        f"code = main(['keys', sys.argv[1]])\nprint(os.environ[{KERNEL_CACHE_ENV!r}])\nsys.exit(code)\n"
    )
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "MLX_PPO_CACHE": str(tmp_path / "cache")}
    out = subprocess.run(
        [sys.executable, str(script), str(tmp_path / "keys")], cwd=ROOT, env=env, capture_output=True, text=True,
        timeout=120,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == str(
        tmp_path / "cache" / "kernels" / f"mlx-{metadata.version('mlx')}"
    )
