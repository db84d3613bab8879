"""Which addresses keep a run's sockets on this machine, and the one check that a learner reachable from other
machines has ZeroMQ CURVE keys (the config's ``transport.host`` and a learner's ``--bind`` address alike)."""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable

KEYS_HINT = (
    "make them with 'python launch.py keys DIR', copy DIR to every machine and set transport.keys_dir=DIR"
)


def is_loopback(host: str) -> bool:
    """Whether ``host`` (a name or address) keeps sockets on this machine."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def exposed_without_keys(hosts: Iterable[str], keys_dir: str) -> list[str]:
    """The hosts of ``hosts`` reachable from other machines when there are no CURVE keys (``keys_dir`` empty),
    sorted; none when there are keys."""
    if keys_dir:
        return []
    return sorted({h for h in hosts if not is_loopback(h)})


def needs_keys_message(what: str) -> str:
    """Why ``what`` (e.g. ``"binding 10.0.0.5 exposes the learner to other machines"``) needs keys, and how."""
    return f"{what}: it needs ZeroMQ CURVE keys; {KEYS_HINT}"
