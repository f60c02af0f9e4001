"""The vector form of SOAR-MATH-v0: g datasets per step, one shared student, joint promotion.

    envs = gym.make_vec("SOAR-MATH-v0", num_envs=4, preset="cpu")

This is the paper's outer step. The g sub-environments are not independent copies: they
are the g datasets X_1..X_g of one teacher step, judged against one baseline on one Q_R,
and promotion is decided for all of them at once. A `SyncVectorEnv` of g single envs would
hold g students and promote each on its own history, which is not SOAR.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from gymnasium import spaces
from gymnasium.utils import seeding
from gymnasium.vector import AutoresetMode, VectorEnv
from gymnasium.vector.utils import batch_space

from soar_env.config import EnvConfig, make_config
from soar_env.envs.checkpoint import CheckpointMixin, CoreStateMixin
from soar_env.envs.core import SOARCore
from soar_env.envs.results import StepTimings, dataset_info
from soar_env.envs.spaces import ProblemBatch, make_observation, observation_space
from soar_env.problems import Problem
from soar_env.rng import rng_from_state, rng_state
from soar_env.student import StudentLike


class SOARMathVectorEnv(CoreStateMixin, CheckpointMixin, VectorEnv):
    """
    ## Description

    One SOAR teacher step over ``num_envs`` = g datasets. Every dataset trains r copies of
    the *same* baseline student and is measured on the *same* Q_R, so the baseline's
    evaluation is done once per step (and cached per student state across steps). The mean
    of the g rewards enters the promotion window; when its average exceeds tau, the best
    dataset k* = argmax R_k is promoted: the median of its r runs becomes the baseline and
    X_k* joins PQ. Student runs are sequential in this process (``backend="local"``), or all
    g x r at once on Ray workers (``backend="ray"``, see `soar_env.ray_backend`).

    ## Action Space

    ``Tuple`` of g `ProblemBatch` spaces: one problem batch per dataset. A malformed batch
    only costs its own dataset: it gets ``invalid_penalty`` (see `SOARMathEnv`) and
    ``info["invalid_action"]`` True.

    ## Observation Space

    ``Box(g, 5)`` float32: row k is the single env's observation (baseline accuracy,
    promotions, step fraction, reward average) with dataset k's last reward in column 4.

    ## Rewards

    ``(g,)`` float array, R_k as in `SOARMathEnv`. Only valid datasets enter the promotion
    average.

    ## Starting State

    As `SOARMathEnv`: the episode-start student, an empty PQ, Q_R drawn with ``np_random``.

    ## Episode End

    All g datasets share one clock, so they truncate together after ``max_episode_steps``
    steps (from the registration, or ``episode_length`` when that is passed). Autoreset is
    next-step: the ``step`` after truncation resets every sub-env and ignores its actions.

    ## Arguments

    ```python
    >>> import gymnasium as gym
    >>> import soar_env
    >>> envs = gym.make_vec("SOAR-MATH-v0", num_envs=2, preset="tiny", repeats=1)
    >>> type(envs).__name__, envs.num_envs
    ('SOARMathVectorEnv', 2)
    >>> obs, infos = envs.reset(seed=0)
    >>> obs.shape
    (2, 5)
    >>> obs, rewards, terminations, truncations, infos = envs.step(envs.action_space.sample())
    >>> rewards.shape, bool(truncations.any())
    ((2,), False)

    ```

    ``num_envs`` defaults to the config's ``num_datasets``; other arguments as `SOARMathEnv`.

    ## Version History

    * v0: Initial version.
    """

    metadata = {"autoreset_mode": AutoresetMode.NEXT_STEP, "render_modes": []}

    def __init__(
        self,
        num_envs: int | None = None,
        preset: str | EnvConfig | None = None,
        *,
        config: EnvConfig | None = None,
        student: StudentLike | None = None,
        hard_pool: Sequence[Problem] | None = None,
        max_episode_steps: int | None = None,
        **overrides: Any,
    ) -> None:
        if num_envs is not None and "num_datasets" not in overrides:
            overrides["num_datasets"] = num_envs
        self.config = make_config(config if config is not None else preset, **overrides)
        self.num_envs = self.config.num_datasets if num_envs is None else int(num_envs)
        if self.num_envs < 1:
            raise ValueError(f"num_envs must be >= 1, got {num_envs}")
        # An explicit episode_length wins over the registration's max_episode_steps default.
        if "episode_length" in overrides or max_episode_steps is None:
            self.horizon = self.config.episode_length
        else:
            self.horizon = int(max_episode_steps)
        self.core = SOARCore(self.config, student=student, hard_pool=hard_pool)
        self.single_action_space = ProblemBatch(self.config.batch_limit, self.config.problems_per_dataset,
                                                difficulty=self.config.sample_difficulty)
        self.action_space = spaces.Tuple([
            ProblemBatch(self.config.batch_limit, self.config.problems_per_dataset,
                         difficulty=self.config.sample_difficulty) for _ in range(self.num_envs)])
        self.single_observation_space = observation_space(dataclasses.replace(self.config, episode_length=self.horizon))
        self.observation_space = batch_space(self.single_observation_space, self.num_envs)
        self._steps = 0
        self._last_rewards = np.zeros(self.num_envs, dtype=np.float64)
        self._baseline_accuracy = 0.0
        self._needs_reset = True

    # -- public state: see CoreStateMixin ------------------------------------------------------------

    @property
    def np_random(self) -> np.random.Generator:
        if self._np_random is None:
            self._np_random, self._np_random_seed = seeding.np_random()
        return self._np_random

    # -- vector API --------------------------------------------------------------------------------

    def reset(self, *, seed: int | Sequence[int | None] | None = None,
              options: dict[str, Any] | None = None) -> tuple[np.ndarray, dict[str, Any]]:
        # One shared clock and student, so one generator: a list of seeds uses its first.
        if isinstance(seed, (list, tuple)):
            seed = seed[0] if seed else None
        if seed is None and self._np_random is None and self.config.seed is not None:
            seed = self.config.seed
        if seed is not None:
            self._np_random, self._np_random_seed = seeding.np_random(seed)
        start = time.perf_counter()
        self.core.new_episode(self.np_random)
        self._steps = 0
        self._last_rewards = np.zeros(self.num_envs, dtype=np.float64)
        self._baseline_accuracy, timings = self.core.baseline_accuracy()
        self._needs_reset = False
        infos: dict[str, Any] = {}
        shared = {"baseline_accuracy": self._baseline_accuracy, "eval_problems": tuple(self.core.eval_subset),
                  "promotions": 0, "hardset_size": len(self.core.hard_pool)}
        for k in range(self.num_envs):
            self._add_info(infos, dict(shared), k)
        infos["timings"] = StepTimings(total=time.perf_counter() - start, baseline_eval=timings.baseline_eval,
                                       baseline_cache_hits=timings.baseline_cache_hits)
        return self._observations(), infos

    def step(self, actions: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, dict[str, Any]]:
        if self._needs_reset:
            # Next-step autoreset: every dataset ended together, so every one restarts.
            obs, infos = self.reset()
            zeros = np.zeros(self.num_envs, dtype=np.bool_)
            return obs, np.zeros(self.num_envs, dtype=np.float64), zeros, zeros.copy(), infos
        start = time.perf_counter()
        batches = _split_actions(actions, self.num_envs)
        self._steps += 1
        rewards = np.zeros(self.num_envs, dtype=np.float64)
        per_env: list[dict[str, Any]] = []
        train_s = eval_s = 0.0
        base_acc = self._baseline_accuracy
        inner_steps = self.core.inner_steps
        eval_problems = tuple(self.core.eval_subset)
        checked = [self.core.validate(batch) for batch in batches]
        valid_k = [k for k, (problems, _) in enumerate(checked) if problems]
        # All valid datasets go to the runner together, so a parallel backend runs g x r at once.
        dataset_results, best = self.core.run_datasets([checked[k][0] for k in valid_k], self.np_random)
        baseline_info = self.core.baseline_info()  # the baseline these datasets were judged against
        results = dict(zip(valid_k, dataset_results))
        best_k = valid_k[best] if best >= 0 else -1
        best_state = dataset_results[best].median_state if best >= 0 else None
        best_problems = checked[best_k][0] if best >= 0 else None
        del dataset_results  # only the best dataset's median student can be promoted
        invalid_reward = self.core.invalid_reward() if len(valid_k) < self.num_envs else 0.0
        for k, (problems, rejected) in enumerate(checked):
            info: dict[str, Any] = {"num_valid": len(problems), "num_rejected": len(rejected),
                                    "rejected": rejected, "problems": tuple(problems)}
            result = results.get(k)
            rewards[k], outcome = dataset_info(result, rejected, invalid_reward)
            if result is not None:
                train_s += result.train_seconds
                eval_s += result.eval_seconds
            info.update(outcome)
            info["reward"] = float(rewards[k])
            per_env.append(info)
        results.clear()

        promoted_k = -1
        # The g datasets are one teacher step: their mean reward enters the promotion window.
        if valid_k and self.core.maybe_promote(float(np.mean(rewards[valid_k])), best_state, best_problems):
            promoted_k = best_k
        self._last_rewards = rewards.copy()
        self.core.next_step(self.np_random)
        self._baseline_accuracy, timings = self.core.baseline_accuracy()
        truncated = self._steps >= self.horizon
        self._needs_reset = truncated
        infos: dict[str, Any] = {}
        shared = {"step": self._steps, "reward_mode": self.config.reward_mode, "baseline_accuracy": base_acc,
                  "next_baseline_accuracy": self._baseline_accuracy, "inner_steps": inner_steps,
                  "eval_problems": eval_problems, **baseline_info,
                  "promotions": self.core.promotions, "reward_average": self.core.tracker.moving_average,
                  "promoted_count": len(self.core.promoted_questions), "backend_events": self.core.backend_events()}
        for k, info in enumerate(per_env):
            self._add_info(infos, {**shared, **info, "promoted": k == promoted_k}, k)
        infos["promoted_dataset"] = promoted_k
        infos["timings"] = StepTimings(total=time.perf_counter() - start, train=train_s, eval=eval_s,
                                       baseline_eval=timings.baseline_eval,
                                       baseline_cache_hits=timings.baseline_cache_hits)
        terminations = np.zeros(self.num_envs, dtype=np.bool_)
        truncations = np.full(self.num_envs, truncated, dtype=np.bool_)
        return self._observations(), rewards, terminations, truncations, infos

    def close_extras(self, **kwargs: Any) -> None:
        # Drop the model so closed envs free its memory; a later reset would rebuild it.
        self.core.release()

    def _observations(self) -> np.ndarray:
        rows = [make_observation(self.single_observation_space, self._baseline_accuracy, self.core.promotions,
                                 self._steps / self.horizon, self.core.tracker.moving_average,
                                 float(self._last_rewards[k])) for k in range(self.num_envs)]
        return np.stack(rows).astype(np.float32)

    # -- checkpoints (save and restore: `CheckpointMixin`) ------------------------------------------

    checkpoint_kind = "vector"

    def load(self, path: str | os.PathLike[str]) -> np.ndarray:
        """Resume from ``save``; returns the observations the env had then."""
        self._load(path)
        return self._observations()

    def _check_checkpoint(self, payload: Mapping[str, Any], path: str | os.PathLike[str]) -> None:
        if payload.get("kind") != "vector" or payload["num_envs"] != self.num_envs:
            raise ValueError(f"{path} holds a {payload.get('kind')!r} checkpoint for {payload.get('num_envs')} "
                             f"envs; this is a vector env of {self.num_envs}")

    @classmethod
    def _restore_args(cls, payload: Mapping[str, Any]) -> tuple[Any, ...]:
        return (payload["num_envs"],)

    def _checkpoint_fields(self) -> dict[str, Any]:
        return {"num_envs": self.num_envs, "horizon": self.horizon, "steps": self._steps,
                "last_rewards": self._last_rewards.tolist(), "baseline_accuracy": self._baseline_accuracy,
                "needs_reset": self._needs_reset}

    def _load_checkpoint_fields(self, payload: Mapping[str, Any]) -> None:
        self.horizon = int(payload["horizon"])
        self._steps = int(payload["steps"])
        self._last_rewards = np.asarray(payload["last_rewards"], dtype=np.float64)
        self._baseline_accuracy = float(payload["baseline_accuracy"])
        self._needs_reset = bool(payload["needs_reset"])

    def _action_rng_state(self) -> Any:
        return [rng_state(space.np_random) for space in self.action_space.spaces]

    def _load_action_rng_state(self, state: Any) -> None:
        for space, space_state in zip(self.action_space.spaces, state):
            space._np_random = rng_from_state(space_state)


def _split_actions(actions: Any, num_envs: int) -> list[Any]:
    """The g per-dataset batches of a vector action; a wrong-length action leaves ``None`` gaps."""
    if isinstance(actions, (tuple, list)) and len(actions) == num_envs:
        return list(actions)
    if isinstance(actions, np.ndarray) and actions.dtype == object and len(actions) == num_envs:
        return list(actions)
    # Not one batch per dataset: each dataset gets the whole thing rejected as not a batch.
    return [_WrongVectorAction(actions, num_envs)] * num_envs


class _WrongVectorAction:
    """Stand-in for a vector action that is not one batch per sub-env (rejected as not a batch)."""

    def __init__(self, action: Any, num_envs: int) -> None:
        self.detail = f"expected a tuple of {num_envs} batches, got {type(action).__name__}"

    def __repr__(self) -> str:
        return f"<{self.detail}>"
