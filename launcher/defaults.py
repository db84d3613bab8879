"""Defaults that several parts of the launcher read: the learner's ports and where the entry point lives."""

from pathlib import Path

BASE_PORT = 5555
"""A learner's first port with ``--hostfile``; it uses three (experience, weights, control)."""
RING_PORT = 5600
"""mlx.distributed's ring between learner ranks on different hosts."""
CHECKOUT = Path(__file__).resolve().parent.parent
"""This checkout (or the installed packages' folder): the same path on every machine of a run over SSH."""
ENTRY_POINT = CHECKOUT / "launch.py"
"""The script every learner and actor process is started with (``launch.py learner`` / ``launch.py actor``)."""
