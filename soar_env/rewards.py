"""Teacher rewards and the promotion rule, as plain functions testable without a model.

SOAR rewards a dataset by what it *did* to the student: the gain on a subset Q_R of hard
problems, averaged over r independent inner trainings. The gain of one run is an estimator's
(`soar_env.estimators.estimate`): the paper's greedy accuracy gain, a sampled success-rate gain,
or a likelihood contrast; `run_mean` averages the runs whatever the estimator. The intrinsic
modes score a dataset by how the current student does on the dataset's own questions (a
success rate s per question, from sampled answers), as the paper's Intrinsic-T baseline.

Promotion decides when a trained student replaces the baseline: a moving average of the
last m step rewards must exceed tau. `PromotionTracker` holds that window so the single
env, the vector env and tests share one implementation.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np


def grounded_reward(trained_accuracy: Sequence[float], baseline_accuracy: float) -> float:
    """Mean over the r inner runs of (accuracy after training - baseline accuracy) on Q_R."""
    if len(trained_accuracy) == 0:
        raise ValueError("grounded_reward needs at least one trained run")
    return float(np.mean(np.asarray(trained_accuracy, dtype=np.float64) - float(baseline_accuracy)))


def run_mean(run_rewards: Sequence[float]) -> float:
    """A dataset's grounded reward: the mean over its r inner runs of each run's estimated gain."""
    if len(run_rewards) == 0:
        raise ValueError("a grounded reward needs at least one trained run")
    return float(np.mean(np.asarray(run_rewards, dtype=np.float64)))


def learnability(success_rate: float) -> float:
    """Paper's Intrinsic-T score of one question: 0 if never solved (s = 0), else 1 - s.

    Unsolvable questions teach nothing; among solvable ones, the rarely solved score highest.
    """
    s = float(success_rate)
    return 0.0 if s <= 0.0 else 1.0 - s


def variance(success_rate: float) -> float:
    """s(1 - s): the variance of a Bernoulli reward, largest at s = 1/2 where RLOO's signal is."""
    s = float(success_rate)
    return s * (1.0 - s)


def learnability_reward(success_rates: Sequence[float]) -> float:
    """Dataset reward of the learnability mode: mean per-question learnability."""
    return float(np.mean([learnability(s) for s in success_rates])) if len(success_rates) else 0.0


def variance_reward(success_rates: Sequence[float]) -> float:
    """Dataset reward of the variance mode: mean per-question s(1 - s)."""
    return float(np.mean([variance(s) for s in success_rates])) if len(success_rates) else 0.0


INTRINSIC_REWARDS = {"learnability": learnability_reward, "variance": variance_reward}
"""Intrinsic reward modes by name: ``(success_rates) -> float``."""


def intrinsic_reward(mode: str, success_rates: Sequence[float]) -> float:
    """Dataset reward of intrinsic ``mode`` ("learnability" or "variance")."""
    try:
        return INTRINSIC_REWARDS[mode](success_rates)
    except KeyError:
        raise ValueError(f"unknown intrinsic reward mode {mode!r}; valid: {sorted(INTRINSIC_REWARDS)}") from None


def median_run(rewards: Sequence[float]) -> int:
    """Index of the run whose reward is the median of the r runs.

    For even r there are two middle runs; we take the lower one (ties keep run order). A
    promoted student should be typical of what the dataset does, and the lower middle
    errs against promoting a lucky run.
    """
    if len(rewards) == 0:
        raise ValueError("median_run needs at least one reward")
    order = np.argsort(np.asarray(rewards, dtype=np.float64), kind="stable")
    return int(order[(len(rewards) - 1) // 2])


class PromotionTracker:
    """Moving average of step rewards over a window of m steps, compared with tau.

    ``update(step_reward)`` appends one step's reward (for the vector env: the mean of the g
    dataset rewards) and returns True when the student should be promoted: the window holds m
    rewards and their mean exceeds tau. A part-filled window never promotes (the paper does
    not say): one lucky first step should not replace the baseline when m = 3 was asked for.
    After a promotion the window is emptied when ``restart`` is set, because the rewards in it
    were measured against the old baseline; the next promotion then needs m new steps.
    """

    def __init__(self, window: int, threshold: float, restart: bool = True) -> None:
        if window < 1:
            raise ValueError(f"window must be >= 1, got {window}")
        self.window = int(window)
        self.threshold = float(threshold)
        self.restart = bool(restart)
        self.recent: list[float] = []
        """The last (at most m) step rewards since the last restart, oldest first."""
        self.history: list[float] = []
        """Every step reward of the episode, for logs."""

    @property
    def moving_average(self) -> float:
        """Mean of the current window (0 when empty)."""
        return float(np.mean(self.recent)) if self.recent else 0.0

    def update(self, step_reward: float) -> bool:
        """Record one step's reward; True when a full window's average now exceeds tau."""
        self.recent.append(float(step_reward))
        self.recent = self.recent[-self.window :]
        self.history.append(float(step_reward))
        return len(self.recent) == self.window and self.moving_average > self.threshold

    def promoted(self) -> None:
        """Tell the tracker a promotion happened (restarts the window when configured)."""
        if self.restart:
            self.recent = []

    def clear(self) -> None:
        """Forget everything (a new episode)."""
        self.recent = []
        self.history = []

    def state_dict(self) -> dict[str, Any]:
        return {"window": self.window, "threshold": self.threshold, "restart": self.restart,
                "recent": list(self.recent), "history": list(self.history)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.recent = [float(x) for x in state["recent"]]
        self.history = [float(x) for x in state["history"]]
