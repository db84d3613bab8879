"""The launcher: the ``mlx-ppo`` command line and how a run's processes are started and kept.

- ``cli``: the entry point (``mlx-ppo``, ``python launch.py``, ``python -m launcher``) and subcommand dispatch
- ``arguments``: the command line's options and the config they resolve to; ``defaults``: shared defaults
- ``commands``: ``monitor``, ``plot``, ``eval``, ``train-rm``, ``keys``
- ``roles``: the ``learner`` and ``actor`` subcommands (one process of a run); ``lifelines``: no orphans
- ``local``: a run's processes on this machine; ``remote``: over SSH (``--hostfile``)
- ``supervision``: restarts, a clean stop, the run's exit code
- ``one_process``: learner and actors in one process (``--one-process``; the tests reuse it)
"""
