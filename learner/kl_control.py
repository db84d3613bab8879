"""KL-penalty coefficient controllers (Ziegler et al. 2019, arXiv:1909.08593, section 2.2)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class FixedKLController:
    """A constant KL coefficient."""

    value: float

    def update(self, current_kl: float, n_steps: int) -> None:
        """No-op: the coefficient never changes."""


@dataclass
class AdaptiveKLController:
    """Proportional control of the KL coefficient towards ``target`` KL per sequence.

    ``e = clip(KL / target - 1, -0.2, 0.2)``; ``beta <- beta * (1 + e * n_steps / horizon)``, where ``n_steps``
    is the number of sequences (episodes) in the update that measured ``KL``.
    """

    value: float
    target: float
    horizon: float

    def update(self, current_kl: float, n_steps: int) -> None:
        proportional_error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + proportional_error * n_steps / self.horizon


def make_kl_controller(
    init_coef: float, target: float | None, horizon: float
) -> FixedKLController | AdaptiveKLController:
    """Adaptive when a ``target`` KL is given, fixed otherwise."""
    if target is None or target <= 0:
        return FixedKLController(init_coef)
    return AdaptiveKLController(init_coef, target, horizon)
