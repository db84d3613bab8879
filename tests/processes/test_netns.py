"""A run over separate hosts, simulated with network namespaces: each has its own address behind a veth pair.

The learner binds 10.231.0.1 in one namespace with CURVE keys; two actors run in two others; an outsider with
a key pair of its own is refused. Mid-run one actor's link goes down: the learner keeps training with the other,
and after the link comes back the first actor resumes contributing. Skips where namespaces cannot be made
(not Linux, not root, no ``ip``).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from bench.netns import Hosts, namespaces_unavailable
from common.blas import env_with_fast_blas
from common.config import config_to_toml, load_config
from common.transport import make_keys
from tests.helpers import SMALL, metric_rows, poll_until

ROOT = Path(__file__).resolve().parents[2]


pytestmark = pytest.mark.skipif(namespaces_unavailable() is not None, reason=str(namespaces_unavailable()))


def _sent(run_dir: Path, actor: int) -> float:
    rows = metric_rows(run_dir)
    return rows[-1].get(f"actor/{actor}/batches_sent", 0.0) if rows else 0.0


def test_a_run_across_hosts_survives_a_link_cut_and_refuses_outsiders(model_cache, tmp_path):
    hosts = Hosts(["learner", "a", "b", "outsider"])
    procs: dict[str, subprocess.Popen] = {}
    try:
        make_keys(tmp_path / "keys")
        make_keys(tmp_path / "other")
        shutil.copy(tmp_path / "keys" / "learner.key", tmp_path / "other" / "learner.key")
        run_dir = tmp_path / "run"
        settings = [
            *SMALL,
            'model.name="tiny"',
            f'model.cache_dir="{model_cache}"',
            f'run.run_dir="{run_dir}"',
            "run.max_updates=1000",
            f'transport.host="{hosts.address["learner"]}"',
            f'transport.keys_dir="{tmp_path / "keys"}"',
            "transport.heartbeat_s=0.5",
            "transport.startup_timeout_s=20",
        ]
        configs = {}
        for name, keys in (("run", "keys"), ("outsider", "other")):
            cfg = load_config(None, [*settings, f'transport.keys_dir="{tmp_path / keys}"'])
            configs[name] = tmp_path / f"{name}.toml"
            configs[name].write_text(config_to_toml(cfg))
        base = f"tcp://{hosts.address['learner']}:5555"  # a fresh namespace: every port is free
        launch = [sys.executable, str(ROOT / "launch.py")]
        procs["learner"] = hosts.run(
            "learner",
            [*launch, "learner", "--config", str(configs["run"]), "--bind", base],
            tmp_path / "learner.log",
        )
        for i, name in enumerate(("a", "b")):
            cmd = [*launch, "actor", "--config", str(configs["run"]), "--connect", base]
            procs[name] = hosts.run(
                name, [*cmd, "--actor-id", str(i), "--num-actors", "2"], tmp_path / f"{name}.log"
            )
        cmd = [*launch, "actor", "--config", str(configs["outsider"]), "--connect", base]
        procs["outsider"] = hosts.run(
            "outsider", [*cmd, "--actor-id", "7", "--num-actors", "2"], tmp_path / "x.log"
        )

        insiders = [p for name, p in procs.items() if name != "outsider"]  # the outsider is meant to exit
        poll_until(
            lambda: _sent(run_dir, 0) >= 1 and _sent(run_dir, 1) >= 1, "both actors' batches", 240, insiders
        )
        hosts.set_link("a", up=False)
        cut_at = len(metric_rows(run_dir))
        poll_until(lambda: len(metric_rows(run_dir)) >= cut_at + 4, "updates without actor a", 240, insiders)
        sent_while_cut = _sent(run_dir, 0)
        hosts.set_link("a", up=True)
        poll_until(lambda: _sent(run_dir, 0) > sent_while_cut, "actor a to resume", 240, insiders)

        procs["learner"].terminate()  # SIGTERM: checkpoint, tell the actors to stop
        codes = {name: p.wait(timeout=120) for name, p in procs.items()}
        learner_log = (tmp_path / "learner.log").read_text()
        assert codes["learner"] == 0 and codes["a"] == 0 and codes["b"] == 0, (codes, learner_log[-3000:])
        assert codes["outsider"] != 0  # never admitted: it gave up after startup_timeout_s
        assert "refused a CURVE client" in learner_log
        assert "actor 0 joined" in learner_log and "actor 1 joined" in learner_log
        assert metric_rows(run_dir)[-1]["reject/curve_denied"] >= 1
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.kill()
        hosts.close()


def test_launch_with_a_hostfile_starts_the_run_on_its_hosts(model_cache, tmp_path):
    """``launch.py --hostfile`` over an ssh stand-in that runs the command in the host's namespace."""
    hosts = Hosts(["learner", "a", "b"])
    try:
        make_keys(tmp_path / "keys")
        fake_ssh = tmp_path / "ssh"
        fake_ssh.write_text('#!/bin/sh\nhost="$1"; shift\nexec ip netns exec "$host" sh -c "$*"\n')
        fake_ssh.chmod(0o755)
        hostfile = tmp_path / "hosts.json"
        entries = [{"ssh": hosts.ns["learner"], "ips": [hosts.address["learner"]], "role": "learner"}]
        entries += [{"ssh": hosts.ns[n], "ips": [hosts.address[n]], "actors": 1} for n in ("a", "b")]
        hostfile.write_text(json.dumps(entries))
        run_dir = tmp_path / "run"
        cmd = [
            sys.executable,
            str(ROOT / "launch.py"),
            "--hostfile",
            str(hostfile),
            "--ssh-command",
            str(fake_ssh),
        ]
        cmd += ["--model", "tiny", "--max-updates", "3", "--run-dir", str(run_dir)]
        settings = [*SMALL, f'model.cache_dir="{model_cache}"', f'transport.keys_dir="{tmp_path / "keys"}"']
        for item in [*settings, "run.min_actors=2"]:  # both hosts' actors join before the 3 updates
            cmd += ["--set", item]
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env_with_fast_blas())
        assert out.returncode == 0, out.stderr[-3000:]
        rows = metric_rows(run_dir)
        assert [r["policy_version"] for r in rows] == [1, 2, 3]
        assert (
            f"learner rank(s) on {hosts.ns['learner']} at tcp://{hosts.address['learner']}:5555" in out.stderr
        )
        assert "actor 0 joined" in out.stderr and "actor 1 joined" in out.stderr
    finally:
        hosts.close()


def test_a_hostfile_with_two_learner_hosts_trains_as_two_ranks(model_cache, tmp_path):
    hosts = Hosts(["l0", "l1", "a", "b"])
    try:
        fake_ssh = tmp_path / "ssh"
        fake_ssh.write_text('#!/bin/sh\nhost="$1"; shift\nexec ip netns exec "$host" sh -c "$*"\n')
        fake_ssh.chmod(0o755)
        make_keys(tmp_path / "keys")
        entries = [{"ssh": hosts.ns[n], "ips": [hosts.address[n]], "role": "learner"} for n in ("l0", "l1")]
        entries += [{"ssh": hosts.ns[n], "ips": [hosts.address[n]], "actors": 1} for n in ("a", "b")]
        (tmp_path / "hosts.json").write_text(json.dumps(entries))
        run_dir = tmp_path / "run"
        cmd = [sys.executable, str(ROOT / "launch.py"), "--hostfile", str(tmp_path / "hosts.json")]
        cmd += [
            "--ssh-command",
            str(fake_ssh),
            "--model",
            "tiny",
            "--max-updates",
            "2",
            "--run-dir",
            str(run_dir),
        ]
        for item in [*SMALL, f'model.cache_dir="{model_cache}"', f'transport.keys_dir="{tmp_path / "keys"}"']:
            cmd += ["--set", item]
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env_with_fast_blas())
        assert out.returncode == 0, out.stderr[-3000:]
        assert "learner rank 0 of 2" in out.stderr and "learner rank 1 of 2" in out.stderr
        assert [r["policy_version"] for r in metric_rows(run_dir)] == [1, 2]  # rank 0 writes the metrics
    finally:
        hosts.close()
