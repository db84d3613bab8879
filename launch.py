"""Start a training run: ``python launch.py [--actors N] [--learners M] ...`` (``python launch.py --help``).

The launcher itself is the ``launcher`` package (``launcher/cli.py``); an installed package has the same command
line as ``mlx-ppo``. Learner and actor processes are started through this file.
"""

from launcher.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
