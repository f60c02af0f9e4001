"""The baseline's scores on Q_R, kept so that each is computed once.

Every dataset of a step is judged against the same baseline on the same Q_R, so the baseline
is scored once and the g datasets share it. What can be kept longer depends on the estimator:

- greedy answers of one student state never change, so they are kept per (state, problem)
  across steps: a later step that draws a problem again reuses its answer (the paper's setting);
- sampled answers are one draw with the step's seed, and likelihood scores depend on the whole
  Q_R (each decoy is another problem's answer), so those are kept for one (estimator, samples,
  state, seed, Q_R) at a time: a new step (new seed or Q_R) or a promotion scores afresh.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Any

from soar_env.envs.results import StepTimings
from soar_env.estimators import QRScores, sampling_for, score_qr
from soar_env.problems import Problem

StepKey = tuple[str, int, int, "int | None", tuple[str, ...]]
"""(estimator, samples, state id, seed, Q_R problem ids) of a per-step score."""


class BaselineScores:
    """The baseline's `QRScores` on Q_R under one estimator, computed only when not already known."""

    def __init__(self, estimator: str, samples: int, max_new_tokens: int) -> None:
        self.estimator = estimator
        self.samples = sampling_for(estimator, samples)[0]
        self.max_new_tokens = max_new_tokens
        self.greedy: dict[int, dict[str, int]] = {}
        """Greedy answers only: state id -> problem id -> correct."""
        self.step: tuple[StepKey, QRScores] | None = None
        """Sampled and likelihood: the key and scores of the last computed baseline."""

    def get(self, student: Any, state_id: int, problems: Sequence[Problem],
            seed: int | None) -> tuple[QRScores, StepTimings]:
        """The baseline's scores on ``problems`` (``seed``: the step's sampling seed), and how long it took."""
        start = time.perf_counter()
        if self.estimator == "greedy":
            cache = self.greedy.setdefault(state_id, {})
            missing = [p for p in problems if p.id not in cache]
            if missing:
                scored = score_qr(student, missing, "greedy", max_new_tokens=self.max_new_tokens)
                for problem, correct in zip(missing, scored.correct):
                    cache[problem.id] = int(correct)
            scores = QRScores("greedy", [cache[p.id] for p in problems], 1)
            hits = len(problems) - len(missing)
        else:
            key: StepKey = (self.estimator, self.samples, state_id, seed, tuple(p.id for p in problems))
            hit = self.step is not None and self.step[0] == key
            if not hit:
                self.step = (key, score_qr(student, problems, self.estimator, samples=self.samples,
                                           max_new_tokens=self.max_new_tokens, seed=seed))
            scores = self.step[1]  # type: ignore[index]
            hits = len(problems) if hit else 0
        return scores, StepTimings(baseline_eval=time.perf_counter() - start, baseline_cache_hits=hits)

    def keep_episode_start(self) -> None:
        """A new episode: only the episode-start student's greedy answers can be used again."""
        self.greedy = {0: self.greedy.get(0, {})}

    def clear(self) -> None:
        self.greedy = {}
        self.step = None

    def state_dict(self) -> dict[str, Any]:
        step = None
        if self.step is not None:
            (estimator, samples, state_id, seed, ids), scores = self.step
            step = {"key": [estimator, samples, state_id, seed, list(ids)], "scores": scores.to_dict()}
        return {"baseline_cache": {k: dict(v) for k, v in self.greedy.items()}, "step_baseline": step}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.greedy = {int(k): {str(i): int(c) for i, c in v.items()} for k, v in state["baseline_cache"].items()}
        self.step = None
        if state.get("step_baseline") is not None:
            estimator, samples, state_id, seed, ids = state["step_baseline"]["key"]
            key: StepKey = (str(estimator), int(samples), int(state_id), None if seed is None else int(seed),
                            tuple(str(i) for i in ids))
            self.step = (key, QRScores.from_dict(state["step_baseline"]["scores"]))
        elif state.get("sampled_baseline") is not None:
            # Checkpoints from before reward estimators: one sampled answer per problem (greedy_eval False).
            state_id, seed, ids = state["sampled_baseline"]["key"]
            correct = [int(c) for c in state["sampled_baseline"]["correct"]]
            key = ("sampled", 1, int(state_id), None if seed is None else int(seed), tuple(str(i) for i in ids))
            self.step = (key, QRScores("sampled", correct, 1))


__all__ = ["BaselineScores"]
