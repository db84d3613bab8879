"""Runs launched as a user launches them (real processes): multi-process and multi-rank runs, Ctrl-C, a killed
actor, runs that cannot work, the hostfile and the core split."""

import json
import re
from pathlib import Path

import pytest

from common.transport import free_tcp_ports
from tests.helpers import (
    REQUIRED_KEYS,
    finish,
    launch_tiny_run,
    metric_rows,
    start_tiny_launcher,
    wait_until,
)


def test_multi_process_launch(model_cache, tmp_path):
    run_dir = tmp_path / "run"
    out = launch_tiny_run(model_cache, run_dir, actors=2, learners=1, updates=3)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["policy_version"] for r in rows] == [1, 2, 3]
    assert set(rows[-1]) >= REQUIRED_KEYS
    # Per-actor stats from heartbeats (an actor slow to start on a loaded machine may join after the last update).
    reporting = {
        k.split("/")[1] for k in rows[-1] if k.startswith("actor/") and k.endswith("/blocked_send_s")
    }
    assert reporting and all(f"actor/{a}/wait_weights_s" in rows[-1] for a in reporting)
    assert all(f"actor/{a}/policy_version" in rows[-1] for a in reporting)
    assert "actor 0 joined" in out.stderr or "actor 1 joined" in out.stderr
    assert "running policy v1" in out.stderr  # actors apply the published versions
    assert re.search(r"update 3(/3)? v3", out.stderr)


def test_free_ports_are_distinct():
    assert len(set(free_tcp_ports(count=3))) == 3


def test_two_learner_ranks_complete_updates(model_cache, tmp_path):
    """--learners 2: two ranks over mlx.distributed's ring on loopback, each with its own actor."""
    run_dir = tmp_path / "run"
    out = launch_tiny_run(model_cache, run_dir, actors=2, learners=2, updates=2)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "learner rank 0 of 2" in out.stderr and "learner rank 1 of 2" in out.stderr
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["policy_version"] for r in rows] == [1, 2]  # rank 0 alone writes metrics
    # Averaged gradients keep the ranks identical: both actors (one per rank) run the same adapters of every
    # version both applied (v1 at least: the run may end before an actor applies the last one it was sent).
    applied: dict[str, dict[str, set[str]]] = {}
    for actor, version, checksum in re.findall(
        r"\[actor-(\d)\].*running policy v(\d+) \(checksum (\w+)\)", out.stderr
    ):
        applied.setdefault(version, {}).setdefault(actor, set()).add(checksum)
    shared = [v for v, by_actor in applied.items() if v != "0" and len(by_actor) == 2]
    assert shared, out.stderr[-3000:]
    for version in shared:
        assert len(set().union(*applied[version].values())) == 1, (version, out.stderr[-3000:])


@pytest.mark.parametrize(
    "cores,actors,learners,expected",
    [(16, 4, 1, (8, 2)), (16, 8, 1, (8, 1)), (16, 4, 2, (4, 2)), (2, 2, 1, (1, 1)), (1, 3, 1, (1, 1))],
)
def test_learners_get_half_the_cores_and_actors_share_the_rest(cores, actors, learners, expected):
    from launcher.local import split_threads

    assert split_threads(cores, actors, learners) == expected


def test_a_bad_hostfile_lists_its_problems(tmp_path):
    from launcher.remote import read_hostfile

    path = tmp_path / "hosts.json"
    path.write_text(json.dumps([{"ssh": "a", "ips": ["10.0.0.1"]}, {"ips": []}]))
    with pytest.raises(ValueError) as err:
        read_hostfile(path)
    text = str(err.value)
    assert "host 0 (a): 'role' is learner or actors" in text and "host 1: needs 'ssh'" in text
    assert "0 hosts with role learner" in text


def test_ctrl_c_checkpoints_and_leaves_no_process_behind(model_cache, tmp_path):
    import signal

    import psutil

    run_dir = tmp_path / "run"
    launcher = start_tiny_launcher(model_cache, run_dir, "run.checkpoint_every=100000")
    wait_until(launcher, lambda: len(metric_rows(run_dir)) >= 2, "the run did not get going")
    family = psutil.Process(launcher.pid).children(recursive=True)
    assert len(family) >= 3  # learner + 2 actors
    launcher.send_signal(signal.SIGINT)
    stderr = finish(launcher, run_dir)
    assert launcher.returncode == 0, stderr[-3000:]
    steps = [row["step"] for row in metric_rows(run_dir)]
    assert (
        run_dir / "checkpoints" / f"step-{steps[-1]:06d}"
    ).is_dir()  # the final checkpoint, not a periodic one
    gone, alive = psutil.wait_procs(family, timeout=10)
    assert not alive, [p.pid for p in alive]


def test_a_killed_actor_is_restarted_rejoins_and_nothing_is_trained_twice(model_cache, tmp_path):
    """SIGKILL an actor mid-run: the launcher restarts it, it rejoins with a new pid and continues after the newest
    batch its predecessor delivered, and no group is trained twice. Every wait is on a condition (no race between
    the restart delay and the learner's silence timeout: which one comes first does not matter)."""
    import signal

    import psutil

    run_dir = tmp_path / "run"
    launcher = start_tiny_launcher(model_cache, run_dir)

    def log() -> str:
        return Path(f"{run_dir}.log").read_text()

    def trained() -> list[tuple[int, int, int]]:
        return [tuple(g) for row in metric_rows(run_dir) for g in row.get("trained/groups", [])]

    try:
        wait_until(launcher, lambda: any(a == 1 for a, _, _ in trained()), "actor 1's experience trained")
        family = psutil.Process(launcher.pid).children(recursive=True)
        victim = next(p for p in family if "--actor-id 1 " in " ".join(p.cmdline()) + " ")
        victim.send_signal(signal.SIGKILL)
        continued = re.compile(r"actor 1 continues at batch (\d+)")
        wait_until(launcher, lambda: continued.search(log()), "the restarted actor to rejoin")
        first_new = int(continued.search(log()).group(1))
        wait_until(
            launcher,
            lambda: any(a == 1 and b >= first_new for a, b, _ in trained()),
            "its new batches trained",
        )
    finally:
        launcher.send_signal(signal.SIGINT)
        stderr = finish(launcher, run_dir)
    assert launcher.returncode == 0, stderr[-3000:]
    assert "actor-1 exited with code -9; restarting it in 1 s (restart 1 of at most 3)" in stderr
    pids = re.findall(r"actor 1 joined from \S+ \(pid (\d+)\)", stderr)
    assert len(set(pids)) == 2 and int(pids[0]) == victim.pid, pids
    groups = trained()
    assert len(groups) == len(set(groups)), "a group was trained twice"
    assert first_new >= 1


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ('run.task="nope"', "unknown task 'nope': built-in tasks are"),
        ("sampling.max_prompt_tokens=1020", "max_new_tokens = 1028 > the model's context of 1024 tokens"),
    ],
)
def test_a_run_that_cannot_work_stops_with_the_reason_and_no_restarts(
    model_cache, tmp_path, setting, message
):
    run_dir = tmp_path / "run"
    launcher = start_tiny_launcher(model_cache, run_dir, setting)
    log = finish(launcher, run_dir, timeout_s=300)
    assert launcher.returncode == 2, log[-3000:]
    assert message in log and "restarting it" not in log


def test_the_console_script_resolves_and_every_entry_point_shows_the_same_help():
    """``mlx-ppo`` (pyproject's console script), ``python -m launcher`` and ``python launch.py`` are one CLI."""
    import importlib
    import subprocess
    import sys
    import tomllib

    root = Path(__file__).resolve().parents[2]
    project = tomllib.loads((root / "pyproject.toml").read_text())
    module, _, function = project["project"]["scripts"]["mlx-ppo"].partition(":")
    from launcher.cli import main

    assert getattr(importlib.import_module(module), function) is main
    setuptools = project["tool"]["setuptools"]
    assert all((root / name / "__init__.py").is_file() for name in setuptools["packages"])
    assert {"launcher", "tools"} <= set(setuptools["packages"]) and setuptools["py-modules"] == ["launch"]
    helps = []
    for command in (["-m", "launcher"], [str(root / "launch.py")]):
        out = subprocess.run(
            [sys.executable, *command, "--help"], cwd=root, capture_output=True, text=True, timeout=120
        )
        assert out.returncode == 0, out.stderr[-2000:]
        assert "monitor RUN_DIR" in out.stdout and "--hostfile" in out.stdout
        helps.append(out.stdout[out.stdout.index("Start a training run") :])  # usage names the program
    assert helps[0] == helps[1]
