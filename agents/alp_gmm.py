"""ALP-GMM: a curriculum teacher that serves the generator tasks where the grounded reward is changing.

    envs = gym.make_vec("SOAR-MATH-v0", num_envs=2, preset="tiny")
    ALPGMMTeacher(seed=0).learn(envs, total_steps=8)
    soar train --teacher alp-gmm --preset cpu

Absolute learning progress over a Gaussian mixture (Portelas et al., CoRL 2019), written in
numpy (`agents.gmm`). A task is a point of SOAR-MATH-Param-v0's action box [-1, 1]^(F+1):
F family weights and a difficulty, which `soar_env.envs.parametric.decode_action` turns into
a mixture, and `sample_problems` into n well-posed problems. A task's return is the grounded
reward of its dataset. Its absolute learning progress (ALP) is |its reward - the reward of
the nearest task of an earlier step| (Euclidean, in the box): where the reward is changing,
the student is learning. Every ``fit_every`` tasks, mixtures of 2..``max_components``
Gaussians are fitted on the recent (task, ALP) points and the one with the lowest AIC (or BIC)
kept; a task is then drawn from one of its Gaussians, chosen in proportion to the Gaussian's
mean ALP. With probability ``random_fraction``, and for the first ``bootstrap`` tasks, the
task is drawn uniformly from the box instead, so new regions keep being tried.

Deviations from the paper, each a setting: the paper refits every 250 tasks on the last 250;
a SOAR task costs minutes, so this teacher refits every ``fit_every`` = 8 tasks on the last
``window`` = 64. The paper normalises rewards by known bounds; grounded rewards are small
(a few problems of M), so the ALP coordinate is scaled by its largest value in the window.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from agents.base import Teacher
from agents.gmm import COVARIANCE_TYPES, CRITERIA, GaussianMixture, select_mixture
from soar_env.data.generators import MAX_DIFFICULTY, MIN_DIFFICULTY, checked_families, sample_problems
from soar_env.problems import Problem
from soar_env.rng import rng_from_state, rng_state


def nearest_alp(task: np.ndarray, reward: float, past_tasks: np.ndarray, past_rewards: np.ndarray) -> float:
    """|reward - the reward of the nearest past task with a finite reward|; 0 without one, NaN for a NaN reward."""
    if not np.isfinite(reward):
        return float("nan")
    known = np.isfinite(past_rewards)
    if not known.any():
        return 0.0
    candidates, rewards = past_tasks[known], past_rewards[known]
    nearest = int(np.argmin(((candidates - task) ** 2).sum(axis=1)))
    return float(abs(reward - rewards[nearest]))


class ALPGMMTeacher(Teacher):
    """ALP-GMM over the procedural generators' (family mixture, difficulty) box (see the module doc).

    ``families`` (default: all) are the generator families the box spans; ``covariance``
    (full or diag) and ``criterion`` (aic or bic) shape the mixtures; ``reg_covar`` is added
    to every covariance's diagonal, so a Gaussian on a few identical points stays usable.
    """

    def __init__(self, families: Sequence[str] | None = None, *, fit_every: int = 8, window: int = 64,
                 max_components: int = 10, random_fraction: float = 0.2, bootstrap: int | None = None,
                 covariance: str = "full", criterion: str = "aic", reg_covar: float = 1e-4, seed: int = 0) -> None:
        super().__init__()
        self.families = checked_families(families)
        for name, value, low in (("fit_every", fit_every, 1), ("window", window, 2),
                                 ("max_components", max_components, 2)):
            if int(value) != value or value < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
        if not 0.0 <= random_fraction <= 1.0:
            raise ValueError(f"random_fraction must be in [0, 1], got {random_fraction!r}")
        if bootstrap is not None and (int(bootstrap) != bootstrap or bootstrap < 0):
            raise ValueError(f"bootstrap must be an integer >= 0, got {bootstrap!r}")
        if covariance not in COVARIANCE_TYPES:
            raise ValueError(f"covariance must be one of {', '.join(COVARIANCE_TYPES)}, got {covariance!r}")
        if criterion not in CRITERIA:
            raise ValueError(f"criterion must be one of {', '.join(CRITERIA)}, got {criterion!r}")
        if not reg_covar > 0:
            raise ValueError(f"reg_covar must be > 0, got {reg_covar!r}")
        self.fit_every = int(fit_every)
        self.window = int(window)
        self.max_components = int(max_components)
        self.random_fraction = float(random_fraction)
        self.bootstrap = int(bootstrap) if bootstrap is not None else self.fit_every
        self.covariance = covariance
        self.criterion = criterion
        self.reg_covar = float(reg_covar)
        self.dim = len(self.families) + 1
        self.rng = np.random.default_rng(seed)
        self.tasks = np.zeros((0, self.dim))
        """Every task proposed and rewarded so far, in order: (N, F + 1)."""
        self.rewards = np.zeros(0)
        """Their rewards (NaN/inf kept as NaN: recorded, never compared or fitted)."""
        self.alps = np.zeros(0)
        """Their absolute learning progress (NaN where the reward was not finite)."""
        self.mixture: GaussianMixture | None = None
        self.num_fits = 0
        self._since_fit = 0
        self._pending: np.ndarray | None = None

    # -- proposing -------------------------------------------------------------------------------

    def _draw_task(self) -> tuple[np.ndarray, bool]:
        """(a task in the box, whether it was drawn uniformly)."""
        uniform = (self.mixture is None or len(self.tasks) < self.bootstrap
                   or self.rng.random() < self.random_fraction)
        if uniform:
            return self.rng.uniform(-1.0, 1.0, self.dim), True
        mixture = self.mixture
        # Choose a Gaussian by its mean ALP (the last coordinate); one holding under half a point is no region.
        progress = np.maximum(mixture.means[:, -1], 0.0) * (mixture.weights * mixture.num_points >= 0.5)
        if progress.sum() > 0:
            component = int(self.rng.choice(len(progress), p=progress / progress.sum()))
        else:
            component = int(self.rng.integers(len(progress)))
        return np.clip(mixture.sample(component, self.rng)[:-1], -1.0, 1.0), False

    def propose(self, num_datasets: int, problems_per_dataset: int) -> list[list[Problem]]:
        # Lazy: the Param env's module loads the env and its student (torch); only the decoder is needed.
        from soar_env.envs.parametric import decode_action

        tasks, uniform, levels, batches = [], 0, [], []
        for _ in range(num_datasets):
            task, drawn_uniformly = self._draw_task()
            weights, level = decode_action(task, self.families, MIN_DIFFICULTY, MAX_DIFFICULTY)
            batches.append(sample_problems(problems_per_dataset, self.rng, families=self.families, weights=weights,
                                           difficulty=level))
            tasks.append(task)
            uniform += drawn_uniformly
            levels.append(level)
        self._pending = np.asarray(tasks, dtype=np.float64).reshape(num_datasets, self.dim)
        self.record("teacher/difficulty_mean", float(np.mean(levels)))
        self.record("teacher/uniform_fraction", uniform / max(num_datasets, 1))
        return batches

    # -- learning --------------------------------------------------------------------------------

    def update(self, rewards: np.ndarray, infos: Sequence[Mapping[str, Any]] = ()) -> dict[str, float]:
        """Record each task's reward and ALP (against tasks of earlier steps); refit every ``fit_every`` tasks."""
        if self._pending is None:
            raise RuntimeError("update() needs a propose() first")
        tasks, self._pending = self._pending, None
        values = np.asarray(rewards, dtype=np.float64).reshape(-1)
        if len(values) != len(tasks):
            raise ValueError(f"update got {len(values)} rewards for {len(tasks)} proposed datasets")
        values = np.where(np.isfinite(values), values, np.nan)
        # Datasets of one step share the baseline student: only earlier steps tell progress.
        alps = np.array([nearest_alp(task, reward, self.tasks, self.rewards) for task, reward in zip(tasks, values)])
        self.tasks = np.vstack([self.tasks, tasks])
        self.rewards = np.concatenate([self.rewards, values])
        self.alps = np.concatenate([self.alps, alps])
        self._since_fit += len(tasks)
        if self._since_fit >= self.fit_every and len(self.tasks) >= self.bootstrap:
            self._fit()
        finite = alps[np.isfinite(alps)]
        return {"alp_mean": float(finite.mean()) if len(finite) else 0.0,
                "nonfinite_rewards": float(np.sum(~np.isfinite(values))),
                "gmm_components": float(self.mixture.num_components if self.mixture is not None else 0),
                "gmm_fits": float(self.num_fits)}

    def _fit(self) -> None:
        """Mixtures on the last ``window`` finite (task, scaled ALP) points; the old one stays if none fits."""
        self._since_fit = 0
        keep = np.isfinite(self.alps)
        tasks, alps = self.tasks[keep][-self.window:], self.alps[keep][-self.window:]
        if len(tasks) < 2:
            return
        top = float(alps.max())
        scaled = alps / top if top > 0 else np.zeros_like(alps)
        points = np.hstack([tasks, scaled[:, None]])
        mixture = select_mixture(points, range(2, self.max_components + 1), self.rng, criterion=self.criterion,
                                 covariance_type=self.covariance, reg_covar=self.reg_covar)
        if mixture is not None:
            self.mixture = mixture
            self.num_fits += 1

    # -- state -----------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {"families": list(self.families), "tasks": self.tasks.copy(), "rewards": self.rewards.copy(),
                "alps": self.alps.copy(), "mixture": None if self.mixture is None else self.mixture.to_dict(),
                "num_fits": self.num_fits, "since_fit": self._since_fit, "rng": rng_state(self.rng),
                "pending": None if self._pending is None else self._pending.copy()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if tuple(state["families"]) != self.families:
            raise ValueError(f"checkpoint spans families {list(state['families'])}, this teacher {list(self.families)}")
        self.tasks = np.asarray(state["tasks"], dtype=np.float64).reshape(-1, self.dim)
        self.rewards = np.asarray(state["rewards"], dtype=np.float64)
        self.alps = np.asarray(state["alps"], dtype=np.float64)
        self.mixture = None if state["mixture"] is None else GaussianMixture.from_dict(state["mixture"])
        self.num_fits = int(state["num_fits"])
        self._since_fit = int(state["since_fit"])
        self.rng = rng_from_state(state["rng"])
        self._pending = None if state["pending"] is None else np.asarray(state["pending"], dtype=np.float64)
