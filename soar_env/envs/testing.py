"""A model-free student for testing environments and teachers in milliseconds.

    from soar_env.envs.testing import ScriptedStudent, ranked_pool
    pool = ranked_pool(10)
    student = ScriptedStudent(pool, gains=[0.1, 0.3, 0.2])
    env = SOARMathEnv("tiny", student=student, hard_pool=pool, eval_subset_size=10, repeats=3)

The student's skill is one number s in [0, 1]. Greedy evaluation answers a hard-pool problem
correctly when its rank in the pool is below round(s * len(pool)), so with Q_R = the whole
pool the accuracy is exactly round(s * N) / N and rewards are known in advance. A training
run returns skill + gain, with gains from a list (in call order) or a function of the run's
seed (so a resumed env reproduces them). Every call is recorded for assertions.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from soar_env.problems import Problem

GainScript = Sequence[float] | Callable[[Sequence[Problem], int], float]


@dataclass
class ScriptedTrainResult:
    steps_done: int
    rewards: list[float] = field(default_factory=list)
    tokens: int = 0
    seconds: float = 0.0
    error: str | None = None
    state: dict[str, float] | None = None


@dataclass
class ScriptedEvalResult:
    correct: list[int]
    samples: int
    tokens: int = 0
    seconds: float = 0.0

    @property
    def accuracy(self) -> float:
        total = len(self.correct) * self.samples
        return sum(self.correct) / total if total else 0.0


def ranked_pool(n: int, prefix: str = "hard") -> list[Problem]:
    """``n`` distinct hard problems; a ScriptedStudent ranks them in this order."""
    return [Problem(f"{prefix} problem {i}: what is {i} * {i + 7}?", str(i * (i + 7)), source=prefix)
            for i in range(n)]


class ScriptedStudent:
    """Satisfies `soar_env.envs.soar_math.StudentLike` without a model (see module doc)."""

    def __init__(self, pool: Sequence[Problem], gains: GainScript = (0.0,), *, skill: float = 0.0,
                 success_rate: float | Callable[[Problem], float] = 0.5, fail_runs: Sequence[int] = ()) -> None:
        self.rank = {p.id: i for i, p in enumerate(pool)}
        self.size = len(pool)
        self.gains = gains
        self.success_rate = success_rate
        self.fail_runs = set(fail_runs)
        """Run numbers (0-based, in call order) that fail like a non-finite loss: no state."""
        self.baseline: dict[str, float] = {"skill": float(skill), "version": 0.0}
        self.promotions = 0
        self.train_calls: list[dict[str, Any]] = []
        self.eval_calls: list[dict[str, Any]] = []

    def _gain(self, problems: Sequence[Problem], seed: int) -> float:
        if callable(self.gains):
            return float(self.gains(problems, seed))
        return float(self.gains[len(self.train_calls) % len(self.gains)])

    def train(self, problems: Sequence[Problem], steps: int | None = None, batch_size: int | None = None,
              group_size: int | None = None, *, seed: int | None = None) -> ScriptedTrainResult:
        run = len(self.train_calls)
        gain = self._gain(problems, int(seed or 0))
        self.train_calls.append({"problems": list(problems), "steps": steps, "batch_size": batch_size,
                                 "group_size": group_size, "seed": seed, "gain": gain})
        steps_done = int(steps or 1)
        if run in self.fail_runs:
            return ScriptedTrainResult(steps_done=0, error="non_finite_loss at step 0: scripted")
        if gain == 0.0:
            # Nothing learned: the very same weights, as a skipped zero-advantage update gives.
            state = dict(self.baseline)
        else:
            state = {"skill": self.baseline["skill"] + gain, "version": float(run + 1)}
        return ScriptedTrainResult(steps_done=steps_done, rewards=[0.0] * steps_done, tokens=10 * steps_done,
                                   state=state)

    def evaluate(self, problems: Sequence[Problem], *, samples: int = 1, greedy: bool = True, state: Any = None,
                 max_new_tokens: int | None = None, seed: int | None = None) -> ScriptedEvalResult:
        self.eval_calls.append({"problems": list(problems), "samples": samples, "greedy": greedy,
                                "baseline": state is None})
        skill = (state if state is not None else self.baseline)["skill"]
        solved = round(min(max(skill, 0.0), 1.0) * self.size)
        correct = []
        for problem in problems:
            if problem.id in self.rank and samples == 1:
                correct.append(int(self.rank[problem.id] < solved))
            else:
                rate = self.success_rate(problem) if callable(self.success_rate) else self.success_rate
                correct.append(int(round(rate * samples)))
        return ScriptedEvalResult(correct=correct, samples=samples, tokens=len(problems) * samples)

    def promote(self, state: dict[str, float]) -> None:
        self.baseline = dict(state)
        self.promotions += 1

    def baseline_state(self) -> dict[str, float]:
        return dict(self.baseline)

    def reset(self) -> None:
        pass

    @property
    def baseline_evaluations(self) -> int:
        """How many problems were evaluated for the baseline (cache misses)."""
        return sum(len(call["problems"]) for call in self.eval_calls if call["baseline"])


CRASH_DIR_VARIABLE = "SOAR_TEST_CRASH_DIR"
"""Folder that `crashing_student` counts its crashes in (one file per crash)."""
CRASH_COUNT_VARIABLE = "SOAR_TEST_CRASH_COUNT"
"""How many training runs, over all processes, `crashing_student` kills (default 1)."""


def crashing_student(config: Any) -> Any:
    """The config's real student, whose process dies at the start of its first few ``train`` calls.

    A fault injector for the Ray backend (``ray_student_factory=
    "soar_env.envs.testing:crashing_student"``): a run claims a crash by creating the next
    numbered file in ``$SOAR_TEST_CRASH_DIR`` (exclusive create, so it is exact across worker
    processes) and then exits its process the way a killed worker does, mid-step.
    """
    import os

    from soar_env.envs.soar_math import build_student

    student = build_student(config)
    train = student.train
    folder = os.environ[CRASH_DIR_VARIABLE]
    budget = int(os.environ.get(CRASH_COUNT_VARIABLE, "1"))

    def train_or_die(*args: Any, **kwargs: Any) -> Any:
        for number in range(budget):
            try:
                os.close(os.open(os.path.join(folder, f"crash-{number}"), os.O_CREAT | os.O_EXCL | os.O_WRONLY))
            except FileExistsError:
                continue
            os._exit(17)  # no cleanup, no exception: as SIGKILL or an OOM kill leaves it
        return train(*args, **kwargs)

    student.train = train_or_die
    return student


def unbuildable_student(config: Any) -> Any:
    """A student factory that always fails, as a worker without the model files would (fault tests)."""
    raise RuntimeError(f"cannot build the student {config.student_model!r} on this worker (test fault)")
