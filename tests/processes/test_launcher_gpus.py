"""``launch.py`` as a user runs it on a host that reports several CUDA GPUs. This machine has none: the GPU list
comes from ``CUDA_VISIBLE_DEVICES`` (which CPU MLX ignores), so what runs is the placement and the children's
environment, not a GPU."""

import json
import os
import subprocess
import sys

from common.exit_codes import ExitCode
from tests.helpers import ROOT, SMALL


def launch(model_cache, run_dir, visible: str, *args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(ROOT / "launch.py"), "--model", "tiny", "--run-dir", str(run_dir), *args]
    for item in [*SMALL, f'model.cache_dir="{model_cache}"']:
        cmd += ["--set", item]
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": visible}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)


def test_two_ranks_on_two_listed_gpus_train_with_a_gpu_each(model_cache, tmp_path):
    out = launch(
        model_cache, tmp_path / "run", "0,1", "--learners", "2", "--actors", "3", "--max-updates", "2"
    )
    assert out.returncode == 0, out.stderr[-3000:]
    for line in (
        "learner-0: GPU 0, device share 1,2",
        "learner-1: GPU 1, device share 1,1",
        "actor-0: GPU 0, device share 1,2",
        "actor-1: GPU 1, device share 1,1",
        "actor-2: GPU 0, device share 1,2",
    ):
        assert line in out.stderr, out.stderr[-3000:]
    rows = [json.loads(r) for r in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["policy_version"] for r in rows] == [1, 2]


def test_nccl_ranks_without_a_gpu_each_stop_before_anything_starts(model_cache, tmp_path):
    out = launch(model_cache, tmp_path / "run", "0", "--learners", "2", "--actors", "2", "--backend", "nccl")
    assert out.returncode == ExitCode.BAD_SETUP, out.stderr[-3000:]
    assert "needs one CUDA GPU per rank; this host has 1" in out.stderr
    assert not (tmp_path / "run" / "config.toml").exists()
