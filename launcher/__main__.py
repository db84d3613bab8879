"""``python -m launcher ...``: the launcher's command line (the same as ``mlx-ppo`` and ``python launch.py``)."""

import sys

from common.blas import reexec_with_fast_blas

# Re-executed as a module again: this file run as a script could not import its own package.
reexec_with_fast_blas(["-m", "launcher", *sys.argv[1:]])

from launcher.cli import main  # noqa: E402  (after the re-exec)

raise SystemExit(main(prog="python -m launcher"))
