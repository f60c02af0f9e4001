"""One student run, the unit of work of a SOAR step, and the in-process runner that executes it.

    specs = [RunSpec(index=i, problems=batch, steps=10, ..., seed=s) for i, s in enumerate(seeds)]
    records = LocalRunner(student).run(specs, baseline_id=0, baseline=student.baseline_state())

A teacher step is g datasets x r repeats of "train a copy of the baseline on a batch, then
measure it on Q_R". Every such run is independent given the baseline weights and its seed, so
a run is described by a plain `RunSpec` and answered by a plain `RunRecord`. That is what lets
the same step execute sequentially here (`LocalRunner`) or spread over a cluster
(`soar_env.ray_backend.RayRunner`) with identical results for identical seeds.
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import torch

from soar_env.estimators import QRScores, score_qr
from soar_env.problems import Problem


@dataclass(frozen=True)
class RunSpec:
    """Train a copy of the baseline on ``problems`` for ``steps``, then evaluate it on ``eval_problems``.

    ``steps=0`` evaluates the baseline itself: the intrinsic reward modes sample the student
    on the teacher's own problems without training it.
    """

    index: int
    """Position of the run in its step (dataset-major: dataset k, repeat j is k * r + j)."""
    problems: tuple[Problem, ...]
    steps: int
    batch_size: int
    group_size: int
    seed: int
    """Seeds the inner run's problem order and sampling, and a sampled evaluation."""
    eval_problems: tuple[Problem, ...]
    eval_samples: int = 1
    """Answers per problem of a sampled evaluation."""
    estimator: str = "greedy"
    """How the run's student is scored on ``eval_problems`` (`soar_env.estimators.score_qr`): "greedy",
    "sampled" (also the intrinsic modes' sampling of the teacher's own problems) or "likelihood"."""
    eval_tokens: int = 1024
    eval_seed: int | None = None
    """Seed of a sampled evaluation instead of ``seed``: the step's seed that the baseline was
    evaluated with on the same problems (common random numbers), so a run that left the weights
    unchanged answers exactly as the baseline did and is not evaluated again."""

    @property
    def deterministic_eval(self) -> bool:
        """Whether the scores depend only on the weights (greedy, likelihood, or sampling with the
        step's seed): then a run that left the baseline's weights scores what the baseline scored."""
        return self.estimator != "sampled" or self.eval_seed is not None


@dataclass
class RunRecord:
    """What one run did. ``correct is None`` means "exactly the baseline's answers" (see `execute_run`)."""

    index: int
    train_rewards: list[float] = field(default_factory=list)
    """Mean training reward at each inner step."""
    scores: QRScores | None = None
    """The trained student's outputs on the evaluation problems; None when the run left the weights
    unchanged (its scores are the baseline's) or failed."""
    tokens: int = 0
    train_seconds: float = 0.0
    eval_seconds: float = 0.0
    error: str | None = None
    """Why the run produced no trained student (non-finite loss, a worker that kept dying, ...)."""
    state: Any = None
    """The trained weights (None: unchanged or failed). A remote runner leaves a `RemoteState` here."""
    attempts: int = 1
    """Executions this record took (more than 1 after a worker failure was retried)."""
    worker: str = "local"

    @property
    def correct(self) -> list[int] | None:
        """Correct samples per evaluation problem (greedy, sampled); None as for ``scores``."""
        return None if self.scores is None else self.scores.correct


ProgressKind = Literal["step_start", "run_start", "inner_step", "run_eval", "run_end", "step_end"]


@dataclass(frozen=True)
class ProgressEvent:
    """Where an env step is, reported while it runs (see `SOARCore.set_progress`).

    One step sends ``step_start``, then for each of its ``runs`` student runs ``run_start``,
    ``inner_step`` after each of its ``inner_steps`` RLOO steps, ``run_eval`` before the Q_R
    evaluation and ``run_end``; then ``step_end``. A runner that only learns of a run when it
    is over (the Ray backend) sends ``run_end`` alone.
    """

    kind: ProgressKind
    runs: int
    """Student runs in this step (g x r under grounded rewards; g under intrinsic ones)."""
    inner_steps: int
    """RLOO steps of each run (0: the runs only evaluate)."""
    run: int = -1
    """Index of the run (dataset-major, as `RunSpec.index`); -1 for step events."""
    inner_step: int = 0
    """RLOO steps the run has finished."""
    runs_done: int = 0
    """Runs of this step that have ended, this one included for ``run_end``."""
    time: float = field(default_factory=time.perf_counter)
    """``time.perf_counter()`` when it happened, for rates and ETAs."""


ProgressFn = Callable[[ProgressEvent], None]
"""A progress callback: called in the process that runs the env, never in a worker."""


class StudentRunner(Protocol):
    """Executes run specs against a baseline; ``parallel`` runners get a whole step at once."""

    parallel: bool

    def run(self, specs: Sequence[RunSpec], *, baseline_id: int, baseline: Any) -> list[RunRecord]: ...

    def keep_only(self, keep: Any) -> None: ...

    def events(self) -> list[dict[str, Any]]: ...

    def close(self) -> None: ...


def same_state(a: Any, b: Any) -> bool:
    """True when two trainable-state dicts hold identical tensors (False when unsure)."""
    if a is b:
        return True
    try:
        if not isinstance(a, Mapping) or not isinstance(b, Mapping) or a.keys() != b.keys():
            return False
        for key, value in a.items():
            other = b[key]
            if isinstance(value, torch.Tensor):
                if not isinstance(other, torch.Tensor) or not torch.equal(value, other):
                    return False
            elif value != other:
                return False
        return True
    except Exception:  # noqa: BLE001 - an exotic state just gets evaluated
        return False


def _accepts(function: Any, name: str) -> bool:
    try:
        parameters = inspect.signature(function).parameters
    except (TypeError, ValueError):
        return False
    return name in parameters or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())


def execute_run(student: Any, spec: RunSpec, baseline: Any,
                on_event: Callable[[str, int], None] | None = None) -> RunRecord:
    """Run ``spec`` on ``student``, whose policy holds ``baseline``; the student ends at baseline.

    ``on_event(kind, inner_steps_done)`` hears ``"inner_step"`` after each RLOO step (from a
    student whose ``train`` takes ``on_step``, as `Student` does) and ``"run_eval"`` before
    the evaluation.

    A failed run (no state) is not scored; nor is one whose every update was skipped (state
    equal to the baseline) when its scores are deterministic (`RunSpec.deterministic_eval`):
    they are the baseline's, which the caller holds, so ``scores`` stays None and the
    evaluation costs nothing.
    """
    record = RunRecord(index=spec.index)
    state = None
    t0 = time.perf_counter()
    if spec.steps > 0:
        hooks: dict[str, Any] = {}
        if on_event is not None and _accepts(student.train, "on_step"):
            hooks["on_step"] = lambda done, total: on_event("inner_step", done)
        trained = student.train(list(spec.problems), steps=spec.steps, batch_size=spec.batch_size,
                                group_size=spec.group_size, seed=spec.seed, **hooks)
        record.tokens += int(getattr(trained, "tokens", 0) or 0)
        record.train_rewards = [float(r) for r in getattr(trained, "rewards", [])]
        state = getattr(trained, "state", None)
        if getattr(trained, "error", None):
            record.error = str(trained.error)
        if state is None or (spec.deterministic_eval and same_state(state, baseline)):
            record.train_seconds = time.perf_counter() - t0
            return record
    if on_event is not None:
        on_event("run_eval", spec.steps)
    t1 = time.perf_counter()
    record.train_seconds = t1 - t0
    scores = score_qr(student, list(spec.eval_problems), spec.estimator, samples=spec.eval_samples,
                      max_new_tokens=spec.eval_tokens, seed=spec.seed if spec.eval_seed is None else spec.eval_seed,
                      state=state)
    record.scores = scores
    record.tokens += scores.tokens
    record.eval_seconds = time.perf_counter() - t1
    record.state = state
    return record


class LocalRunner:
    """Runs specs one after another on the env's own student (``backend="local"``).

    ``progress`` (set by `SOARCore`) hears run start, every inner RLOO step and run end; the
    events carry step-wide totals, so the core sets ``progress_context`` before each call.
    """

    parallel = False

    def __init__(self, student: Any, progress: ProgressFn | None = None) -> None:
        self.student = student
        self.progress = progress
        self.progress_context: dict[str, int] = {"runs": 0, "inner_steps": 0, "runs_done": 0}
        """Step totals for the events: ``runs``, ``inner_steps``, and ``runs_done`` (updated here)."""

    def run(self, specs: Sequence[RunSpec], *, baseline_id: int, baseline: Any) -> list[RunRecord]:
        if self.progress is None:
            return [execute_run(self.student, spec, baseline) for spec in specs]
        return [self._run_reporting(spec, baseline, self.progress) for spec in specs]

    def _run_reporting(self, spec: RunSpec, baseline: Any, progress: ProgressFn) -> RunRecord:
        context = self.progress_context
        runs, inner = context["runs"] or 1, context["inner_steps"]

        def event(kind: Any, done: int = 0) -> None:
            progress(ProgressEvent(kind, runs=runs, inner_steps=inner, run=spec.index, inner_step=done,
                                   runs_done=context["runs_done"]))

        event("run_start")
        record = execute_run(self.student, spec, baseline, on_event=event)
        context["runs_done"] += 1
        event("run_end", spec.steps)
        return record

    def keep_only(self, keep: Any) -> None:
        pass  # records hold their states; SOARCore drops all but the promotable one

    def events(self) -> list[dict[str, Any]]:
        return []

    def close(self) -> None:
        pass


__all__ = ["LocalRunner", "ProgressEvent", "ProgressFn", "RunRecord", "RunSpec", "StudentRunner", "execute_run",
           "same_state"]
