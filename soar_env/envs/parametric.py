"""SOAR-MATH-Param-v0: the same inner loop and reward, driven by a numeric curriculum action.

    from stable_baselines3 import PPO
    model = PPO("MlpPolicy", gym.make("SOAR-MATH-Param-v0", preset="cpu")).learn(64)

A text-writing teacher needs an LLM; this env lets any Box agent (stable-baselines3, CleanRL)
act as a curriculum designer instead: it picks how much of each procedural problem family
to serve and how hard, and the env draws the n problems itself. Everything after that is
`SOARMathEnv`: r inner runs, the grounded (or intrinsic) reward, promotion and PQ.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from gymnasium import spaces

from soar_env.config import EnvConfig
from soar_env.data.generators import MAX_DIFFICULTY, MIN_DIFFICULTY, checked_families, sample_problems
from soar_env.envs.soar_math import SOARMathEnv
from soar_env.problems import Problem
from soar_env.student import StudentLike


def decode_action(action: Any, families: Sequence[str], min_level: int, max_level: int) -> tuple[np.ndarray, int]:
    """(family probabilities, difficulty level) from a Box action in [-1, 1]^(F+1).

    The first F entries map linearly to weights in [0, 1] (so a family can be switched off
    entirely), normalised to sum 1; all zeros means uniform. The last entry maps [-1, 1] to
    the levels ``min_level..max_level``. Out-of-range or non-finite numbers are clipped or
    zeroed, so any array of the right size is an action.
    """
    values = np.nan_to_num(np.asarray(action, dtype=np.float64).reshape(-1), nan=0.0, posinf=1.0, neginf=-1.0)
    if values.shape != (len(families) + 1,):
        raise ValueError(f"expected an action of {len(families) + 1} numbers, got shape {np.shape(action)}")
    values = np.clip(values, -1.0, 1.0)
    weights = (values[:-1] + 1.0) / 2.0
    total = weights.sum()
    weights = weights / total if total > 1e-8 else np.full(len(families), 1.0 / len(families))
    fraction = (values[-1] + 1.0) / 2.0
    level = int(min_level + round(fraction * (max_level - min_level)))
    return weights, level


class SOARMathParamEnv(SOARMathEnv):
    """
    ## Description

    `SOARMathEnv` with a numeric action: a mixture over the procedural problem families of
    `soar_env.data.generators` and a difficulty level. Each step draws ``problems_per_dataset``
    problems from that mixture with ``np_random`` and runs the same inner loop, reward and
    promotion. Made for standard RL libraries: it passes stable-baselines3's ``check_env``.

    ## Action Space

    ``Box(-1, 1, (F + 1,), float32)`` with F the number of families (``families`` argument,
    default all). Entry i < F is family i's weight, mapped to [0, 1] and normalised (all
    zero: uniform); the last entry is the difficulty, mapped to levels 1..5. The range is
    symmetric because SB3's Gaussian policies assume it.

    ## Observation Space

    As `SOARMathEnv`: ``Box(5,)`` float32 (baseline accuracy, promotions, step fraction,
    reward average, last reward).

    ## Rewards

    As `SOARMathEnv`; generated problems are always valid, so there is no penalty.

    ## Starting State

    As `SOARMathEnv`.

    ## Episode End

    As `SOARMathEnv`: truncation after ``episode_length`` steps.

    ## Arguments

    ```python
    >>> import gymnasium as gym
    >>> import soar_env
    >>> env = gym.make("SOAR-MATH-Param-v0", preset="tiny", families=("addition", "multiplication"))
    >>> env.action_space
    Box(-1.0, 1.0, (3,), float32)
    >>> obs, info = env.reset(seed=0)
    >>> obs, reward, terminated, truncated, info = env.step(env.action_space.sample())
    >>> info["difficulty"] in range(1, 6), len(info["problems"])
    (True, 4)

    ```

    ``families`` restricts the mixture; the other arguments are `SOARMathEnv`'s.

    ## Version History

    * v0: Initial version.
    """

    def __init__(
        self,
        preset: str | EnvConfig | None = None,
        *,
        families: Sequence[str] | None = None,
        config: EnvConfig | None = None,
        student: StudentLike | None = None,
        hard_pool: Sequence[Problem] | None = None,
        render_mode: str | None = None,
        **overrides: Any,
    ) -> None:
        super().__init__(preset, config=config, student=student, hard_pool=hard_pool,
                         render_mode=render_mode, **overrides)
        self.families = checked_families(families)
        self.min_level, self.max_level = MIN_DIFFICULTY, MAX_DIFFICULTY
        self.action_space = spaces.Box(-1.0, 1.0, shape=(len(self.families) + 1,), dtype=np.float32)

    def problems_for(self, action: Any) -> tuple[list[Problem], np.ndarray, int]:
        """The problems a numeric action draws (with ``np_random``), its weights and level."""
        weights, level = decode_action(action, self.families, self.min_level, self.max_level)
        problems = sample_problems(self.config.problems_per_dataset, self.np_random, families=self.families,
                                   weights=weights, difficulty=level)
        return problems, weights, level

    def step(self, action: Any) -> tuple[np.ndarray, float, bool, bool, dict[str, Any]]:
        problems, weights, level = self.problems_for(action)
        obs, reward, terminated, truncated, info = super().step(tuple(problems))
        info["family_weights"] = {name: float(w) for name, w in zip(self.families, weights)}
        info["difficulty"] = level
        return obs, reward, terminated, truncated, info
