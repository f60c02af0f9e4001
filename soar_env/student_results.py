"""What a student's calls return: a training run, an evaluation, a teacher-forced answer scoring.

Plain records, kept apart from `soar_env.student` so that scripted students and the env can
build them without the inner loop's imports.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from soar_env.metrics import mean_pass_at_k
from soar_env.problems import Rejection

@dataclass
class TrainResult:
    """What one inner run did. ``state`` is the trained copy; the baseline is never changed."""

    steps_done: int
    """RLOO steps completed (skipped zero-advantage updates included)."""
    rewards: list[float] = field(default_factory=list)
    """Mean training reward (fraction of correct samples) at each step."""
    tokens: int = 0
    """Completion tokens sampled over the run."""
    seconds: float = 0.0
    """Wall-clock time of the run."""
    num_problems: int = 0
    """Problems that passed validation and were trained on."""
    skipped: list[tuple[int, Rejection]] = field(default_factory=list)
    """(index in the input, reason) for every input entry that was not a usable problem."""
    error: str | None = None
    """None on success; otherwise why the run stopped (non-finite loss, no valid problems)."""
    state: dict[str, Any] | None = None
    """Trainable state after training; None when the run failed (evaluate it as the baseline)."""
    stats: list[dict[str, float]] = field(default_factory=list)
    """Per-step updater statistics plus sampling/grading timings."""

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclass
class EvalResult:
    """Per-problem correctness of one evaluation."""

    correct: list[int]
    """Correct samples per problem, in input order."""
    samples: int
    """Samples per problem."""
    statuses: dict[str, int] = field(default_factory=dict)
    """How many responses got each grade status (see ``verify.GRADE_STATUSES``)."""
    tokens: int = 0
    """Completion tokens generated."""
    seconds: float = 0.0
    """Wall-clock time of the evaluation."""

    @property
    def accuracy(self) -> float:
        """Fraction of correct samples over all problems (0.0 for no problems)."""
        total = len(self.correct) * self.samples
        return sum(self.correct) / total if total else 0.0

    def pass_at_k(self, ks: Sequence[int] = (1, 4, 8, 16, 32)) -> dict[int, float]:
        """Mean unbiased pass@k over the problems, for each k <= samples."""
        return mean_pass_at_k(self.correct, self.samples, ks)


@dataclass
class AnswerLogprobs:
    """Teacher-forced scores of given answers (``Student.answer_logprobs``)."""

    logprobs: list[float]
    """Per (problem, answer) pair, the mean log-probability per token of the answer given the problem's prompt."""
    tokens: int = 0
    """Answer tokens scored."""
    seconds: float = 0.0
    """Wall-clock time of the scoring."""


__all__ = ["AnswerLogprobs", "EvalResult", "TrainResult"]
