"""``launch.py --hostfile hosts.json``: one learner and actors on other machines, started over SSH and supervised.

The hostfile is a JSON list in ``mlx.launch``'s format, one entry per machine, extended with its part in the run:

    [{"ssh": "mac-studio", "ips": ["10.0.0.5"], "role": "learner"},
     {"ssh": "mac-mini-1", "ips": ["10.0.0.6"], "actors": 2},
     {"ssh": "mac-mini-2", "ips": ["10.0.0.7"], "actors": 2}]

Like ``mlx.launch``, every machine has this checkout at the same path (``--remote-dir``, default: this one) and
the same Python (``--remote-python``). The launcher copies the resolved config to each machine (over SSH's
stdin), starts the learner bound to its first IP (``--bind``) and the actors connected to it (``--connect``),
and supervises them as a local run: a failed process ends the run, Ctrl-C stops it cleanly, and a remote process
whose SSH connection closes stops too (``--stdin-lifeline``), so none outlives a launcher that died. Several learner
hosts are data-parallel ranks over mlx.distributed's ring (port 5600 between them), actors spread over them. A non-loopback
learner needs ``transport.keys_dir`` (a folder present on every machine); the learner refuses to start without.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shlex
import subprocess
from dataclasses import dataclass
from pathlib import Path

from common.exit_codes import ExitCode
from launcher.defaults import BASE_PORT, RING_PORT
from launcher.supervision import supervise

logger = logging.getLogger(__name__)


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
    if not learners:
        problems.append("0 hosts with role learner: one or more (one learner rank each) are needed")
    if hosts and not sum(h.actors for h in hosts):
        problems.append("no actors: give some host an 'actors' count")
    if problems:
        raise ValueError(f"hostfile {path}:\n  " + "\n  ".join(problems))
    return hosts


def _remote(ssh: list[str], host: Host, command: list[str]) -> list[str]:
    return [*ssh, host.ssh, " ".join(shlex.quote(part) for part in command)]


def _copy(ssh: list[str], host: Host, text: str, path: str) -> None:
    folder = shlex.quote(str(Path(path).parent))
    command = _remote(ssh, host, ["sh", "-c", f"mkdir -p {folder} && cat > {shlex.quote(path)}"])
    subprocess.run(command, input=text.encode(), check=True, timeout=120)


def _start(ssh: list[str], host: Host, command: list[str]) -> subprocess.Popen:
    """Start ``command`` on ``host``, its stdin a pipe this launcher holds: when the launcher exits or dies the
    pipe closes, SSH passes the end of input on, and the remote process stops (``--stdin-lifeline``)."""
    remote = _remote(ssh, host, [*command, "--stdin-lifeline"])
    return subprocess.Popen(remote, stdin=subprocess.PIPE, start_new_session=True)


def copy_run_files(ssh: list[str], hosts: list[Host], cfg_toml: str, run_dir: str) -> None:
    """The resolved config to every host, and the learner ranks' ring hostfile to each learner host."""
    learners = [h for h in hosts if h.role == "learner"]
    ring_text = json.dumps([[f"{h.ip}:{RING_PORT}"] for h in learners])
    for host in {h.ssh: h for h in hosts}.values():
        _copy(ssh, host, cfg_toml, f"{run_dir}/config.toml")
        if len(learners) > 1 and host.role == "learner":
            _copy(ssh, host, ring_text, f"{run_dir}/ring_hostfile.json")


def start_learner_ranks(
    ssh: list[str], learners: list[Host], bases: list[str], launch: list[str], run_dir: str
) -> dict[str, subprocess.Popen]:
    """One learner rank per learner host, bound to ``bases[rank]`` (ring variables when there are several)."""
    config, ring, procs = f"{run_dir}/config.toml", f"{run_dir}/ring_hostfile.json", {}
    for rank, (host, base) in enumerate(zip(learners, bases, strict=True)):
        ranks = ["env", f"MLX_RANK={rank}", f"MLX_HOSTFILE={ring}"] if len(learners) > 1 else []
        command = [*ranks, *launch, "learner", "--config", config, "--bind", base, "--rank", str(rank)]
        procs[f"learner-{rank}"] = _start(ssh, host, command)
    return procs


def start_remote_actors(
    ssh: list[str], hosts: list[Host], bases: list[str], launch: list[str], run_dir: str
) -> dict[str, subprocess.Popen]:
    """Each host's actors; actor ``i`` connects to learner rank ``i % len(bases)``."""
    total, actor_id, procs = sum(h.actors for h in hosts), 0, {}
    for host in hosts:
        for _ in range(host.actors):
            command = [*launch, "actor", "--config", f"{run_dir}/config.toml"]
            command += ["--connect", bases[actor_id % len(bases)]]
            command += ["--actor-id", str(actor_id), "--num-actors", str(total)]
            procs[f"actor-{actor_id}"] = _start(ssh, host, command)
            actor_id += 1
    return procs


def launch_remote_run(
    cfg_toml: str,
    run_dir: str,
    hosts: list[Host],
    ssh: list[str],
    remote_dir: str,
    python: str,
    base_port: int = BASE_PORT,
) -> int:
    """Copy the config to every host, start the learner rank(s) and the actors, supervise; returns the exit code.

    Each learner host is one rank (ring backend between their first IPs); actors go round-robin to the ranks.
    """
    learners = [h for h in hosts if h.role == "learner"]
    bases = [f"tcp://{h.ip}:{base_port}" for h in learners]
    copy_run_files(ssh, hosts, cfg_toml, run_dir)
    launch = [python, f"{remote_dir}/launch.py"]
    procs = start_learner_ranks(ssh, learners, bases, launch, run_dir)
    procs.update(start_remote_actors(ssh, hosts, bases, launch, run_dir))
    where = ", ".join(f"{h.ssh} at {b}" for h, b in zip(learners, bases, strict=True))
    total = sum(h.actors for h in hosts)
    logger.info(
        "run %s: %d learner rank(s) on %s; %d actor(s) on %d host(s)",
        run_dir,
        len(learners),
        where,
        total,
        len(hosts),
    )
    return supervise(procs)


def launch_over_ssh(
    cfg, hostfile: str, ssh_command: str, remote_dir: str, python: str, base_port: int
) -> int:
    """``--hostfile``: the run's processes on the listed machines; the run directory is made absolute (the
    same path on every machine) and its config written here too."""
    from common.config import config_to_toml

    try:
        hosts = read_hostfile(hostfile)
    except ValueError as e:
        logger.error("%s", e)
        return ExitCode.BAD_SETUP
    run_dir = str(Path(cfg.run.run_dir).resolve())
    cfg = dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, run_dir=run_dir))
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    text = config_to_toml(cfg)
    (Path(run_dir) / "config.toml").write_text(text)
    return launch_remote_run(text, run_dir, hosts, shlex.split(ssh_command), remote_dir, python, base_port)
