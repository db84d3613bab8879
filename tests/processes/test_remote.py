"""``launch.py --hostfile`` on this machine through a stand-in for ``ssh``: what must hold on real remote hosts."""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path

import psutil

from tests.helpers import metric_rows, start_tiny_launcher, wait_until

ROOT = Path(__file__).resolve().parents[2]


def three_free_ports() -> int:
    """A base port with the two after it also free on 127.0.0.1 (the learner binds base, base+1, base+2)."""
    for base in range(20000 + (time.monotonic_ns() // 1000) % 20000, 60000, 3):
        held = []
        try:
            for port in range(base, base + 3):
                s = socket.socket()
                held.append(s)
                s.bind(("127.0.0.1", port))
            return base
        except OSError:
            continue
        finally:
            for s in held:
                s.close()
    raise RuntimeError("no three consecutive free ports")


def run_processes(run_dir: Path) -> list[psutil.Process]:
    """The learner and actor processes of the run in ``run_dir`` (started over the stand-in ssh)."""
    config = str(run_dir / "config.toml")
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        cmdline = proc.info["cmdline"] or []
        if config in cmdline and any(role in cmdline for role in ("learner", "actor")):
            found.append(proc)
    return found


def test_processes_started_over_ssh_stop_when_their_launcher_dies(model_cache, tmp_path):
    fake_ssh = tmp_path / "ssh"
    fake_ssh.write_text('#!/bin/sh\nshift\nexec sh -c "$*"\n')  # "ssh HOST CMD": run CMD here
    fake_ssh.chmod(0o755)
    hostfile = tmp_path / "hosts.json"
    hostfile.write_text(json.dumps([{"ssh": "here", "ips": ["127.0.0.1"], "role": "learner", "actors": 2}]))
    run_dir = tmp_path / "run"
    args = ("--hostfile", str(hostfile), "--ssh-command", str(fake_ssh), "--port", str(three_free_ports()))
    args += ("--max-updates", "100000", "--run-dir", str(run_dir))
    launcher = start_tiny_launcher(model_cache, run_dir, "run.checkpoint_every=100000", args=args)
    try:
        wait_until(launcher, lambda: metric_rows(run_dir), "the run did not get going")
        remote = run_processes(run_dir)
        assert len(remote) == 3, [p.info["cmdline"] for p in remote]  # the learner and 2 actors
        launcher.kill()  # no chance to stop anything: only its end of the connections closes
        launcher.wait()
        gone, alive = psutil.wait_procs(remote, timeout=60)
        assert not alive, [p.pid for p in alive]
        text = Path(f"{run_dir}.log").read_text()
        assert text.count("the launcher's connection closed; stopping") == 3, text[-3000:]
        checkpoints = list((run_dir / "checkpoints").glob("step-*"))
        assert checkpoints, "the learner stops as on SIGTERM: with a final checkpoint"
    finally:
        for proc in run_processes(run_dir):
            proc.kill()
