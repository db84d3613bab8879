"""mlx-ppo's Python API: ``PPOConfig`` and ``PPOTrainer`` (see README, "Python API")."""

from mlx_ppo.config import PPOConfig
from mlx_ppo.trainer import PPOTrainer

__all__ = ["PPOConfig", "PPOTrainer"]
