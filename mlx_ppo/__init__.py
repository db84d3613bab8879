"""mlx-ppo's Python API: ``PPOConfig`` and ``PPOTrainer`` (see README, "Python API"); ``launch_command`` and
``follow_run``, the trainer's own way to start a run from a config file and follow it epoch by epoch."""

from mlx_ppo.config import PPOConfig
from mlx_ppo.trainer import PPOTrainer, follow_run, launch_command

__all__ = ["PPOConfig", "PPOTrainer", "follow_run", "launch_command"]
