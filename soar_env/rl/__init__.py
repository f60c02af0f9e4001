"""Reinforcement learning shared by the student and the teacher: RLOO advantages, loss, updater."""

from soar_env.rl.rloo import (
    NonFiniteLossError,
    RLOOConfig,
    RLOOUpdater,
    cosine_schedule,
    rloo_advantages,
    rloo_loss,
)

__all__ = [
    "NonFiniteLossError",
    "RLOOConfig",
    "RLOOUpdater",
    "cosine_schedule",
    "rloo_advantages",
    "rloo_loss",
]
