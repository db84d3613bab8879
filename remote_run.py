"""``launch.py --hostfile hosts.json``: one learner and actors on other machines, started over SSH and supervised.

The hostfile is a JSON list in ``mlx.launch``'s format, one entry per machine, extended with its part in the run:

    [{"ssh": "mac-studio", "ips": ["10.0.0.5"], "role": "learner"},
     {"ssh": "mac-mini-1", "ips": ["10.0.0.6"], "actors": 2},
     {"ssh": "mac-mini-2", "ips": ["10.0.0.7"], "actors": 2}]

Like ``mlx.launch``, every machine has this checkout at the same path (``--remote-dir``, default: this one) and
the same Python (``--remote-python``). The launcher copies the resolved config to each machine (over SSH's
stdin), starts the learner bound to its first IP (``--bind``) and the actors connected to it (``--connect``),
and supervises them as a local run: a failed process ends the run, Ctrl-C stops it cleanly. A non-loopback
learner needs ``transport.keys_dir`` (a folder present on every machine); the learner refuses to start without.
"""

from __future__ import annotations

import json
import logging
import shlex
import subprocess
from dataclasses import dataclass
from pathlib import Path

from local_run import supervise

logger = logging.getLogger("launch")
BASE_PORT = 5555


@dataclass(frozen=True)
class Host:
    ssh: str
    ip: str
    role: str
    actors: int


def read_hostfile(path: str | Path) -> list[Host]:
    """Parse and check a hostfile; raises ValueError listing every problem."""
    try:
        entries = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"hostfile {path}: {e}") from None
    problems, hosts = [], []
    if not isinstance(entries, list) or not entries:
        raise ValueError(f"hostfile {path}: expected a non-empty JSON list of hosts")
    for i, entry in enumerate(entries):
        ips = entry.get("ips") if isinstance(entry, dict) else None
        if not isinstance(entry, dict) or not isinstance(entry.get("ssh"), str) or not ips:
            problems.append(f"host {i}: needs 'ssh' (a name) and 'ips' (a non-empty list)")
            continue
        role = entry.get("role", "actors" if entry.get("actors") else "")
        actors = entry.get("actors", 0)
        if role not in ("learner", "actors") or not isinstance(actors, int) or actors < 0:
            problems.append(f"host {i} ({entry['ssh']}): 'role' is learner or actors; 'actors' a count >= 0")
            continue
        hosts.append(Host(entry["ssh"], str(ips[0]), role, actors))
    learners = [h for h in hosts if h.role == "learner"]
    if len(learners) != 1:
        problems.append(f"{len(learners)} hosts with role learner: exactly one is supported")
    if hosts and not sum(h.actors for h in hosts):
        problems.append("no actors: give some host an 'actors' count")
    if problems:
        raise ValueError(f"hostfile {path}:\n  " + "\n  ".join(problems))
    return hosts


def _remote(ssh: list[str], host: Host, command: list[str]) -> list[str]:
    return [*ssh, host.ssh, " ".join(shlex.quote(part) for part in command)]


def launch_remote_run(
    cfg_toml: str, run_dir: str, hosts: list[Host], ssh: list[str], remote_dir: str, python: str
) -> int:
    """Copy the config to every host, start the learner and the actors, supervise; returns the exit code."""
    learner = next(h for h in hosts if h.role == "learner")
    base = f"tcp://{learner.ip}:{BASE_PORT}"
    config = f"{run_dir}/config.toml"
    for host in {h.ssh: h for h in hosts}.values():
        copy = _remote(
            ssh, host, ["sh", "-c", f"mkdir -p {shlex.quote(run_dir)} && cat > {shlex.quote(config)}"]
        )
        subprocess.run(copy, input=cfg_toml.encode(), check=True, timeout=120)
    launch = [python, f"{remote_dir}/launch.py"]
    procs = {
        "learner-0": subprocess.Popen(
            _remote(ssh, learner, [*launch, "learner", "--config", config, "--bind", base]),
            start_new_session=True,
        )
    }
    total = sum(h.actors for h in hosts)
    actor_id = 0
    for host in hosts:
        for _ in range(host.actors):
            command = [*launch, "actor", "--config", config, "--connect", base]
            command += ["--actor-id", str(actor_id), "--num-actors", str(total)]
            procs[f"actor-{actor_id}"] = subprocess.Popen(_remote(ssh, host, command), start_new_session=True)
            actor_id += 1
    logger.info(
        "run %s: learner on %s at %s; %d actor(s) on %d host(s)",
        run_dir,
        learner.ssh,
        base,
        total,
        len(hosts),
    )
    return supervise(procs)
