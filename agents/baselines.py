"""Baseline teachers of the paper, behind the same protocol as SOAR's teacher.

- `RandomTeacher`: procedural problems, families and difficulty levels drawn uniformly; no model.
- `BaseTeacher` (Base-T): the LLM teacher as it is, never trained: what SOAR starts from.
- `IntrinsicTeacher` (Intrinsic-T): SOAR's learner on the env's learnability reward instead
  of the grounded one.
- `HardOnlyTeacher` (Hard-Only): proposes the hard train problems themselves, so the student
  does plain RLOO on the hard set through the same env, and gets the same zero-reward plateau
  the paper describes. It leaves out the problems of the current Q_R, which the reward is
  measured on: like every other teacher, it never trains the student on them.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from agents.base import Teacher
from agents.driver import env_config, env_core
from agents.rloo_teacher import RLOOTeacher
from soar_env.data.generators import MAX_DIFFICULTY, MIN_DIFFICULTY, checked_families, sample_problems
from soar_env.data.hardset import load_hard_pool
from soar_env.problems import Problem
from soar_env.rng import rng_from_state, rng_state


class RandomTeacher(Teacher):
    """Uniformly random generated problems (`soar_env.data.generators`); learns nothing.

    ``families`` (default: all) and ``difficulty`` (levels drawn uniformly per problem) narrow
    the draw. A floor for every teacher: anything that learns should beat it.
    """

    def __init__(self, families: Sequence[str] | None = None, difficulty: Sequence[int] | int = (1, 2, 3, 4, 5),
                 seed: int | None = 0) -> None:
        super().__init__()
        self.families = checked_families(families)
        levels = [difficulty] if isinstance(difficulty, int) else list(difficulty)
        if not levels or any(not MIN_DIFFICULTY <= int(d) <= MAX_DIFFICULTY for d in levels):
            raise ValueError(f"difficulty levels must be in {MIN_DIFFICULTY}..{MAX_DIFFICULTY}, got {difficulty!r}")
        self.difficulty = tuple(int(d) for d in levels)
        self.rng = np.random.default_rng(seed)

    def propose(self, num_datasets: int, problems_per_dataset: int) -> list[list[Problem]]:
        return [sample_problems(problems_per_dataset, self.rng, families=self.families, difficulty=self.difficulty)
                for _ in range(num_datasets)]

    def state_dict(self) -> dict[str, Any]:
        return {"rng": rng_state(self.rng)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.rng = rng_from_state(state["rng"])


class BaseTeacher(RLOOTeacher):
    """Base-T: the untrained LLM teacher, sampling exactly as `RLOOTeacher` does but never updating.

    Checkpoints hold its sampling RNG only: its weights are the model's own.
    """

    learns = False


class IntrinsicTeacher(RLOOTeacher):
    """Intrinsic-T: the same teacher trained on the env's learnability reward instead of grounded gains.

    The paper's baseline: 32 student samples per question give a success rate s, the question
    scores 0 if s = 0 else 1 - s, the dataset scores the mean. The env computes it
    (``reward_mode="learnability"``), so the comparison with Grounded-T changes nothing else.
    """

    env_overrides = {"reward_mode": "learnability"}

    def check_env(self, config: Any) -> None:
        super().check_env(config)
        if config is not None and config.reward_mode == "grounded":
            raise ValueError("IntrinsicTeacher needs an intrinsic reward: make the env with "
                             "reward_mode='learnability' (or 'variance')")


class HardOnlyTeacher(Teacher):
    """Hard-Only: each dataset is n problems of the hard train split (shuffled, cycled without repeats).

    The problems come from the env's own hard pool, its train split (``setup``), or from
    ``problems`` when given. Problems of the env's current Q_R are skipped, so the reward is
    a gain on problems the student did not train on, as for SOAR's teacher (the paper's
    Hard-Only trains on hard train and is tested on hard test). ``exclude_eval_subset=False``
    trains on Q_R too; so does a pool no larger than Q_R, with a warning, since then nothing
    else is left.
    """

    def __init__(self, problems: Sequence[Problem] | None = None, seed: int | None = 0,
                 exclude_eval_subset: bool = True) -> None:
        super().__init__()
        self.problems = list(problems) if problems is not None else None
        self.exclude_eval_subset = exclude_eval_subset
        self.rng = np.random.default_rng(seed)
        self._order: list[int] = []
        self._position = 0
        self._core: Any = None
        self._warned = False

    def setup(self, env: Any, total_steps: int) -> None:
        self._core = env_core(env)
        if self.problems is not None:
            return
        if self._core is not None:
            self.problems = list(self._core.hard_pool)
            return
        config = env_config(env)
        if config is None:
            raise ValueError("HardOnlyTeacher needs a SOAR env (for its hard set) or problems=[...]")
        self.problems = load_hard_pool(config)

    def _excluded(self) -> set[str]:
        """Questions of the env's current Q_R (empty when not excluding, or without a SOAR core)."""
        if not self.exclude_eval_subset or self._core is None:
            return set()
        excluded = {p.question for p in getattr(self._core, "eval_subset", None) or []}
        if excluded and self.problems and all(p.question in excluded for p in self.problems):
            if not self._warned:
                warnings.warn("HardOnlyTeacher: every hard-train problem is in Q_R (the pool is no larger than "
                              "eval_subset_size), so it trains on the problems its reward is measured on",
                              stacklevel=3)
                self._warned = True
            return set()
        return excluded

    def _next(self, excluded: set[str]) -> Problem:
        assert self.problems, "HardOnlyTeacher has no problems: call setup(env) or pass problems=[...]"
        while True:  # ends: _excluded never covers the whole pool, so each permutation holds a kept problem
            if self._position >= len(self._order):
                self._order = [int(i) for i in self.rng.permutation(len(self.problems))]
                self._position = 0
            problem = self.problems[self._order[self._position]]
            self._position += 1
            if problem.question not in excluded:
                return problem

    def propose(self, num_datasets: int, problems_per_dataset: int) -> list[list[Problem]]:
        if self.problems is None:
            raise RuntimeError("HardOnlyTeacher.propose before setup(env): it does not know the hard set yet")
        excluded = self._excluded()
        return [[self._next(excluded) for _ in range(problems_per_dataset)] for _ in range(num_datasets)]

    def state_dict(self) -> dict[str, Any]:
        return {"rng": rng_state(self.rng), "order": list(self._order), "position": self._position}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.rng = rng_from_state(state["rng"])
        self._order = [int(i) for i in state["order"]]
        self._position = int(state["position"])
