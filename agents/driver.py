"""One interface over SOAR's single env (g = 1) and vector env (g datasets per step).

The training loop steps either with g batches and gets back (g,) rewards and one info dict per
dataset, whatever the env's shape; it also finds the env's config and core through wrappers.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from gymnasium.vector import VectorEnv

from soar_env.problems import Problem

if TYPE_CHECKING:  # for the annotation only: the core's module loads the student (torch)
    from soar_env.envs.core import SOARCore


def env_config(env: Any) -> Any:
    """The `EnvConfig` of a SOAR env, vector env or wrapped env (None for other envs)."""
    for candidate in (env, getattr(env, "unwrapped", None)):
        config = getattr(candidate, "config", None)
        if config is not None and hasattr(config, "problems_per_dataset"):
            return config
    return None


def env_core(env: Any) -> SOARCore | None:
    """The `SOARCore` (student, hard pool, PQ) behind a SOAR env, or None."""
    for candidate in (env, getattr(env, "unwrapped", None)):
        core = getattr(candidate, "core", None)
        if core is not None:
            return core
    return None


def is_vector_env(env: Any) -> bool:
    return isinstance(env, VectorEnv) or isinstance(getattr(env, "unwrapped", None), VectorEnv)


def unbatch_infos(infos: Mapping[str, Any], num_envs: int) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Gymnasium's batched info dict -> one dict per sub-env, plus the keys that are not per-env.

    A vector env stores ``info[key]`` as an array of length ``num_envs`` next to a boolean
    mask ``info["_" + key]``; anything else (timings, the promoted dataset) is shared.
    """
    per_env: list[dict[str, Any]] = [{} for _ in range(num_envs)]
    shared: dict[str, Any] = {}
    for key, value in infos.items():
        if key.startswith("_"):
            continue
        mask = infos.get("_" + key)
        if mask is not None and isinstance(value, np.ndarray) and len(value) == num_envs:
            for k in range(num_envs):
                if bool(mask[k]):
                    item = value[k]
                    per_env[k][key] = item.item() if isinstance(item, np.generic) else item
        else:
            shared[key] = value
    return per_env, shared


class EnvDriver:
    """Steps a single env (g = 1) or a vector env (g = num_envs) with g batches; unbatches infos."""

    def __init__(self, env: Any) -> None:
        self.env = env
        self.vector = is_vector_env(env)
        self.config = env_config(env)
        self.num_datasets = int(env.num_envs) if self.vector else 1
        if self.config is not None:
            self.problems_per_dataset = int(self.config.problems_per_dataset)
        else:
            space = env.single_action_space if self.vector else env.action_space
            self.problems_per_dataset = int(getattr(space, "sample_size", 1))

    @property
    def target(self) -> Any:
        """The object that owns save/load (the unwrapped env for gym.make envs)."""
        return self.env if self.vector else getattr(self.env, "unwrapped", self.env)

    @property
    def can_checkpoint(self) -> bool:
        return hasattr(self.target, "save") and hasattr(self.target, "load")

    def reset(self, seed: int | None = None) -> tuple[np.ndarray, dict[str, Any]]:
        obs, info = self.env.reset(seed=seed)
        return self._obs(obs), info

    def step(self, batches: Sequence[Sequence[Any]]
             ) -> tuple[np.ndarray, np.ndarray, bool, list[dict[str, Any]], dict[str, Any]]:
        """(obs (g, d), rewards (g,), episode over, per-dataset infos, shared info)."""
        if self.vector:
            obs, rewards, terminated, truncated, infos = self.env.step(tuple(tuple(b) for b in batches))
            per_dataset, shared = unbatch_infos(infos, self.num_datasets)
            done = bool(np.any(terminated) or np.any(truncated))
            return self._obs(obs), np.asarray(rewards, dtype=np.float64), done, per_dataset, shared
        obs, reward, terminated, truncated, info = self.env.step(tuple(batches[0]))
        info = dict(info)
        shared = {"timings": info.get("timings"), "promoted_dataset": 0 if info.get("promoted") else -1}
        return self._obs(obs), np.array([float(reward)]), bool(terminated or truncated), [info], shared

    def save(self, path: Path) -> None:
        self.target.save(path)

    def load(self, path: Path) -> np.ndarray:
        if not self.vector:
            # Gymnasium's wrappers insist on a reset before anything else; load then overwrites it.
            self.env.reset()
            obs, _ = self.target.load(path)
            return self._obs(obs)
        return self._obs(self.target.load(path))

    @property
    def promoted_questions(self) -> list[Problem]:
        return list(getattr(self.target, "promoted_questions", []) or [])

    def _obs(self, obs: Any) -> np.ndarray:
        array = np.asarray(obs)
        return array if self.vector else array[None]
