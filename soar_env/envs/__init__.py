"""SOAR environments and their registration with Gymnasium.

    import gymnasium as gym
    import soar_env                                   # registers the ids below
    env = gym.make("SOAR-MATH-v0", preset="tiny")     # or gym.make("soar_env:SOAR-MATH-v0")
    envs = gym.make_vec("SOAR-MATH-v0", num_envs=4)   # g datasets, one shared student
    env = gym.make("SOAR-MATH-Param-v0")              # Box action, for stable-baselines3

Entry points are strings, so importing ``soar_env`` loads no model and no torch code; the
classes load on the first ``gym.make``.
"""

from __future__ import annotations

from typing import Any

import gymnasium as gym

from soar_env.config import EnvConfig

ENV_IDS = ("SOAR-MATH-v0", "SOAR-MATH-Param-v0")
"""Every environment id soar-gym registers."""


def register_envs() -> None:
    """Register the SOAR ids (idempotent). The episode length is ``EnvConfig.episode_length``."""
    steps = EnvConfig().episode_length
    if "SOAR-MATH-v0" not in gym.registry:
        gym.register(
            id="SOAR-MATH-v0",
            entry_point="soar_env.envs.soar_math:SOARMathEnv",
            vector_entry_point="soar_env.envs.vector:SOARMathVectorEnv",
            max_episode_steps=steps,
        )
    if "SOAR-MATH-Param-v0" not in gym.registry:
        gym.register(
            id="SOAR-MATH-Param-v0",
            entry_point="soar_env.envs.parametric:SOARMathParamEnv",
            max_episode_steps=steps,
        )


def __getattr__(name: str) -> Any:
    # The classes import torch-heavy modules; load them only when asked for.
    if name == "SOARMathEnv":
        from soar_env.envs.soar_math import SOARMathEnv

        return SOARMathEnv
    if name == "SOARCore":
        from soar_env.envs.core import SOARCore

        return SOARCore
    if name == "SOARMathVectorEnv":
        from soar_env.envs.vector import SOARMathVectorEnv

        return SOARMathVectorEnv
    if name == "SOARMathParamEnv":
        from soar_env.envs.parametric import SOARMathParamEnv

        return SOARMathParamEnv
    if name == "ProblemBatch":
        from soar_env.envs.spaces import ProblemBatch

        return ProblemBatch
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["ENV_IDS", "ProblemBatch", "SOARCore", "SOARMathEnv", "SOARMathParamEnv", "SOARMathVectorEnv",
           "register_envs"]
