"""What one step of a SOAR env reports: a dataset's result and the step's wall-clock timings.

`SOARCore` produces a `DatasetResult` per dataset; the single and the vector env turn each
into the same ``info`` entries with `dataset_info`, so both report a dataset identically.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class StepTimings:
    """Wall-clock seconds of one reset or step (``time/...`` metrics).

    Timings are measurements, not part of the transition: every field is left out of
    equality, so two same-seed steps have equal ``info`` (Gymnasium's determinism check
    compares infos).
    """

    total: float = field(default=0.0, compare=False)
    """The whole call."""
    train: float = field(default=0.0, compare=False)
    """Inner RLOO runs."""
    eval: float = field(default=0.0, compare=False)
    """Scoring of trained students on Q_R (or intrinsic sampling)."""
    baseline_eval: float = field(default=0.0, compare=False)
    """Scoring of the baseline on Q_R where it was not already known."""
    baseline_cache_hits: int = field(default=0, compare=False)
    """Q_R problems whose baseline result came from the cache."""

    def to_dict(self) -> dict[str, float]:
        return {f"time/{k}": v for k, v in dataclasses.asdict(self).items()}


@dataclass
class DatasetResult:
    """What one dataset did to the student: the reward and everything behind it."""

    reward: float
    run_rewards: list[float] = field(default_factory=list)
    """Grounded mode: the estimated gain of each of the r runs (greedy: its Q_R accuracy gain)."""
    trained_accuracy: list[float] = field(default_factory=list)
    """Per run, the trained student's level on Q_R (`soar_env.estimators.qr_level`)."""
    trained_correct: list[list[int]] = field(default_factory=list)
    """Per run, correct answers per Q_R problem (greedy, sampled)."""
    trained_answer_logprob: list[list[float]] = field(default_factory=list)
    """Per run, mean per-token log-prob of each Q_R problem's reference answer (likelihood)."""
    trained_decoy_logprob: list[list[float]] = field(default_factory=list)
    """Per run, the same for each problem's decoy answer (likelihood)."""
    train_rewards: list[list[float]] = field(default_factory=list)
    """Per run, mean training reward at each inner step (the student's success on the batch)."""
    success_rates: list[float] = field(default_factory=list)
    """Intrinsic modes: the student's success rate s on each of the dataset's problems."""
    median_index: int | None = None
    median_state: Any = None
    tokens: int = 0
    train_seconds: float = 0.0
    eval_seconds: float = 0.0
    errors: list[str] = field(default_factory=list)
    """Why runs failed (non-finite loss, a worker that kept dying); such a run counts as no gain."""
    retried_runs: int = 0
    """Runs that needed more than one attempt because their worker failed (Ray backend)."""

    def info(self) -> dict[str, Any]:
        return {
            "run_rewards": list(self.run_rewards),
            "trained_accuracy": list(self.trained_accuracy),
            "trained_correct": [list(c) for c in self.trained_correct],
            "trained_answer_logprob": [list(x) for x in self.trained_answer_logprob],
            "trained_decoy_logprob": [list(x) for x in self.trained_decoy_logprob],
            "train_rewards": [list(r) for r in self.train_rewards],
            "success_rates": list(self.success_rates),
            "median_run": -1 if self.median_index is None else int(self.median_index),
            "errors": list(self.errors),
            "retried_runs": int(self.retried_runs),
        }


def invalid_reason(rejected: list[dict[str, Any]]) -> str:
    """One sentence for an action with no usable problem: how many, and the commonest reasons."""
    counts: dict[str, int] = {}
    for record in rejected:
        counts[record["reason"]] = counts.get(record["reason"], 0) + 1
    reasons = ", ".join(f"{reason} x{count}" for reason, count in sorted(counts.items(), key=lambda kv: -kv[1]))
    return f"no valid problem in the action ({reasons}); nothing was trained"


def dataset_info(result: DatasetResult | None, rejected: list[dict[str, Any]],
                 invalid_reward: float) -> tuple[float, dict[str, Any]]:
    """(reward, info entries) of one dataset; ``result`` None: it held no valid problem.

    Such a dataset trained nothing and gets ``invalid_reward`` (`SOARCore.invalid_reward`), with
    ``invalid_action`` True and the reason spelled out, so a teacher can leave it out of its update.
    """
    if result is None:
        empty = DatasetResult(reward=float(invalid_reward))
        return empty.reward, {"invalid_action": True, "reason": invalid_reason(rejected), "tokens": 0,
                              **empty.info()}
    return float(result.reward), {"invalid_action": False, "reason": None, "tokens": int(result.tokens),
                                  **result.info()}


__all__ = ["DatasetResult", "StepTimings", "dataset_info", "invalid_reason"]
