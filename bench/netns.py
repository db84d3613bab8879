"""Hosts simulated with Linux network namespaces: each its own address on one bridge (tests and benchmarks).

Needs root and iproute2; ``namespaces_unavailable()`` says why not where they cannot be made.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

SUBNET = "10.231.0"
BRIDGE_ADDRESS = f"{SUBNET}.254"  # this (root) namespace's address on the bridge


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check, timeout=30)


def namespaces_unavailable() -> str | None:
    if not sys.platform.startswith("linux"):
        return "network namespaces are Linux-only"
    if shutil.which("ip") is None:
        return "the ip command (iproute2) is not installed"
    if os.geteuid() != 0:
        return "creating network namespaces needs root"
    probe = f"mppo-probe-{uuid.uuid4().hex[:6]}"
    out = _ip("netns", "add", probe, check=False)
    if out.returncode != 0:
        return f"ip netns add failed: {out.stderr.strip()}"
    _ip("netns", "del", probe, check=False)
    return None


class Hosts:
    """Namespaces ``<tag><name>`` on one bridge, host i at ``10.231.0.<i>``."""

    def __init__(self, names: list[str]):
        self.tag = uuid.uuid4().hex[:4]
        self.bridge = f"br{self.tag}"
        self.ns: dict[str, str] = {}
        self.link: dict[str, str] = {}
        self.address: dict[str, str] = {}
        _ip("link", "add", self.bridge, "type", "bridge")
        _ip("addr", "add", f"{BRIDGE_ADDRESS}/24", "dev", self.bridge)
        _ip("link", "set", self.bridge, "up")
        for i, name in enumerate(names, start=1):
            ns, outside, inside = f"m{self.tag}{name}", f"v{self.tag}{i}", f"p{self.tag}{i}"
            _ip("netns", "add", ns)
            _ip("link", "add", outside, "type", "veth", "peer", "name", inside)
            _ip("link", "set", inside, "netns", ns)
            _ip("link", "set", outside, "master", self.bridge)
            _ip("link", "set", outside, "up")
            _ip("-n", ns, "addr", "add", f"{SUBNET}.{i}/24", "dev", inside)
            _ip("-n", ns, "link", "set", inside, "up")
            _ip("-n", ns, "link", "set", "lo", "up")
            self.ns[name], self.link[name], self.address[name] = ns, outside, f"{SUBNET}.{i}"

    def prefix(self, name: str) -> list[str]:
        """Run a command on host ``name``: prepend this."""
        return ["ip", "netns", "exec", self.ns[name]]

    def run(self, name: str, cmd: list[str], log: Path) -> subprocess.Popen:
        from common.blas import env_with_fast_blas

        env = env_with_fast_blas()
        env["OPENBLAS_NUM_THREADS"] = "1"
        return subprocess.Popen(
            ["ip", "netns", "exec", self.ns[name], *cmd],
            stdout=log.open("w"),
            stderr=subprocess.STDOUT,
            env=env,
        )

    def set_link(self, name: str, up: bool) -> None:
        _ip("link", "set", self.link[name], "up" if up else "down")

    def close(self) -> None:
        for ns in self.ns.values():
            _ip("netns", "del", ns, check=False)
        _ip("link", "del", self.bridge, check=False)
