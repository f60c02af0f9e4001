"""The paper's evaluation protocols: PQ, PS, pass@k on the hard test split (CIs: benchmarks.bootstrap).

    from soar_env.data.hardset import hard_splits
    from benchmarks.evaluation import EvalConfig, run_pq, run_ps
    from benchmarks.bootstrap import bootstrap_ci
    hard_train, hard_test = hard_splits(env_config)
    result = run_pq(env_config, promoted_questions, hard_train, hard_test, EvalConfig(mode="curriculum"), seed=0)
    print(result.pass_at_k)                          # {1: 0.017, 4: 0.053, ...}
    mean, low, high = bootstrap_ci([r.pass_at_k[32] for r in results_over_seeds])

- **PQ**: a *fresh* base student is trained with RLOO on the promoted questions plus the hard
  train split, then tested on the hard test split. ``curriculum`` mode trains
  ``synthetic_steps`` steps on PQ first, then on hard train (paper, MATH); ``mixed`` mode
  trains on the shuffled union (paper, HARP / OlympiadBench).
- **PS**: of the students promoted during meta-training, the one with the best greedy accuracy
  on hard train is tested on hard test.
- Testing: ``samples`` (32) sampled solutions per hard-test problem at the student temperature,
  unbiased pass@k for k = 1, 4, 8, 16, 32 (`soar_env.metrics.mean_pass_at_k`).
- Early stop (a setting): every ``eval_every`` steps the greedy accuracy on ``curve_size``
  hard-train problems is measured; training stops once the least-squares slope of the last
  ``slope_window`` points is <= ``min_slope`` (the paper: "slope-based", details not stated).
  By default those problems are trained on too, so the training set is all of hard train;
  ``heldout_size`` > 0 holds that many out of training instead (the paper does not say which).

Training is one run (``schedule="one-run"``, the paper's): one AdamW and one cosine over
``max_steps``, measured between chunks of ``eval_every`` steps without restarting either
(`benchmarks.fresh_student.OneRun`). ``schedule="per-chunk"`` is the earlier protocol, kept to
reproduce studies made with it: each chunk is a `Student.train` call, so AdamW and the cosine
restart at every chunk.
"""

from __future__ import annotations

import dataclasses
import random
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np

from agents import BaseCallback, env_core
from soar_env.options import check_minimum
from soar_env.metrics import mean_pass_at_k

DEFAULT_KS = (1, 4, 8, 16, 32)
MODES = ("curriculum", "mixed")
SCHEDULES = ("one-run", "per-chunk")


@dataclass
class EvalConfig:
    """Settings of the PQ / PS protocols (paper values where the paper gives them)."""

    mode: str = "curriculum"
    """How PQ and hard train are combined: curriculum (PQ first, then hard train) or mixed (shuffled union)."""
    synthetic_steps: int = 64
    """Curriculum mode: RLOO steps on the promoted questions before switching to hard train (paper: 64)."""
    max_steps: int = 1500
    """Most RLOO steps of a fresh PQ student (paper: <= 1500)."""
    batch_size: int | None = None
    """Problems per RLOO step (None: the env config's batch_size)."""
    group_size: int | None = None
    """Samples per problem in an RLOO step (None: the env config's group_size)."""
    samples: int = 32
    """Sampled solutions per hard-test problem for pass@k (paper: 32)."""
    test_size: int | None = None
    """Hard-test problems used (None: all)."""
    early_stop: bool = True
    """Stop a PQ student when its early-stop curve stops rising (slope-based)."""
    eval_every: int = 50
    """RLOO steps between two points of the early-stop curve (the chunk length of training)."""
    slope_window: int = 3
    """Points of the early-stop curve the slope is fitted on."""
    min_slope: float = 0.0
    """Stop when the fitted slope (accuracy per step) is <= this."""
    schedule: str = "one-run"
    """one-run: one AdamW and one cosine over max_steps, untouched by the measurements between
    chunks (paper: one run of <= 1500 steps); per-chunk: every eval_every-step chunk restarts both
    (the earlier protocol, kept to reproduce its studies)."""
    heldout_size: int = 0
    """Hard-train problems held out of training for the early-stop curve (at most a quarter of hard
    train); 0: none are, the curve is measured on curve_size training problems (not stated in the paper)."""
    curve_size: int = 32
    """With heldout_size 0: hard-train problems (a seeded sample, also trained on) whose greedy
    accuracy is the early-stop curve."""
    eval_max_new_tokens: int | None = None
    """Generation limit when testing (None: the env config's eval limit)."""

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        check_minimum(self, ("max_steps", "samples", "eval_every", "slope_window", "curve_size"), 1)
        check_minimum(self, ("synthetic_steps", "heldout_size"), 0)

    @property
    def ks(self) -> tuple[int, ...]:
        return tuple(k for k in DEFAULT_KS if k <= self.samples)


@dataclass
class ProtocolResult:
    """One protocol run for one seed: pass@k on hard test plus the compute it took."""

    protocol: str
    """"PQ", "PS" or "base" (the untrained student)."""
    seed: int
    pass_at_k: dict[int, float]
    """Mean unbiased pass@k over the hard-test problems."""
    correct: list[int]
    """Correct samples per hard-test problem (out of ``samples``)."""
    samples: int
    student_steps: int = 0
    """RLOO steps of the student trained for this protocol (0 for PS: its steps belong to meta-training)."""
    tokens: int = 0
    """Completion tokens sampled for training and testing."""
    seconds: float = 0.0
    train_seconds: float = 0.0
    """Part of ``seconds`` spent in RLOO training (the rest: held-out curve and testing)."""
    curve: list[tuple[int, float]] = field(default_factory=list)
    """(steps done, greedy accuracy) points of the early-stop curve."""
    train_problems: int = 0
    """Problems the student was trained on (PQ and hard train, less any held out)."""
    heldout: int = 0
    """Hard-train problems held out of training for the early-stop curve."""
    stopped_early: bool = False
    selected: int | None = None
    """PS: index of the chosen promoted student."""
    selection_accuracy: list[float] = field(default_factory=list)
    """PS: greedy hard-train accuracy of every promoted student."""
    note: str = ""
    problem_ids: list[str] = field(default_factory=list)
    """Id of each hard-test problem, in the order of ``correct``: paired comparisons match problems by it."""

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["pass_at_k"] = {str(k): v for k, v in self.pass_at_k.items()}
        return out


def curve_slope(points: Sequence[tuple[int, float]]) -> float:
    """Least-squares slope (accuracy per step) of (step, accuracy) points; 0.0 for fewer than 2."""
    if len(points) < 2:
        return 0.0
    x = np.array([p[0] for p in points], dtype=float)
    y = np.array([p[1] for p in points], dtype=float)
    if np.ptp(x) == 0:
        return 0.0
    return float(np.polyfit(x, y, 1)[0])


def should_stop(points: Sequence[tuple[int, float]], window: int, min_slope: float) -> bool:
    """The slope rule: a full window whose fitted slope is <= ``min_slope``."""
    # The tolerance keeps a flat curve's round-off slope (~1e-18) from counting as a rise.
    return len(points) >= max(window, 2) and curve_slope(points[-window:]) <= min_slope + 1e-12


# ---------------------------------------------------------------------------------------------
# Protocols
# ---------------------------------------------------------------------------------------------


def hard_test_problems(hard_test: Sequence[Any], evaluation: EvalConfig) -> list[Any]:
    """The hard-test problems every method is tested on (the first ``test_size``), in order."""
    return list(hard_test)[: evaluation.test_size] if evaluation.test_size else list(hard_test)


def hard_test_ids(hard_test: Sequence[Any], evaluation: EvalConfig) -> list[str]:
    """Ids of `hard_test_problems`, kept beside the counts so that paired comparisons match problems by id."""
    return [str(getattr(p, "id", "") or f"#{i}") for i, p in enumerate(hard_test_problems(hard_test, evaluation))]


def test_pass_at_k(student: Any, hard_test: Sequence[Any], evaluation: EvalConfig, *, seed: int,
                   state: Any = None, max_new_tokens: int | None = None) -> tuple[dict[int, float], Any]:
    """pass@k on hard test from ``samples`` sampled solutions per problem; (pass@k, EvalResult)."""
    problems = hard_test_problems(hard_test, evaluation)
    result = student.evaluate(problems, samples=evaluation.samples, greedy=False, state=state,
                              max_new_tokens=max_new_tokens, seed=seed)
    return mean_pass_at_k(result.correct, evaluation.samples, evaluation.ks), result


def _eval_tokens(config: Any, evaluation: EvalConfig) -> int | None:
    if evaluation.eval_max_new_tokens is not None:
        return evaluation.eval_max_new_tokens
    return getattr(config, "eval_tokens", None)


def early_stop_set(hard_train: Sequence[Any], evaluation: EvalConfig,
                   rng: random.Random) -> tuple[list[Any], list[Any], int]:
    """(problems to train on, problems the early-stop curve is measured on, how many are held out)."""
    train_pool = list(hard_train)
    if not evaluation.early_stop:
        return train_pool, [], 0
    if evaluation.heldout_size > 0:
        # At most a quarter of hard train is held out, so a small hard set still leaves most of it to train on.
        size = min(evaluation.heldout_size, len(train_pool) // 4)
        if size == 0:
            return train_pool, [], 0
        chosen = set(rng.sample(range(len(train_pool)), size))
        heldout = [p for i, p in enumerate(train_pool) if i in chosen]
        return [p for i, p in enumerate(train_pool) if i not in chosen], heldout, len(heldout)
    chosen = sorted(rng.sample(range(len(train_pool)), min(evaluation.curve_size, len(train_pool))))
    return train_pool, [train_pool[i] for i in chosen], 0


def run_pq(config: Any, promoted: Sequence[Any], hard_train: Sequence[Any], hard_test: Sequence[Any],
           evaluation: EvalConfig | None = None, *, seed: int = 0, student: Any = None,
           student_factory: Callable[[Any], Any] | None = None, protocol: str = "PQ") -> ProtocolResult:
    """PQ: a fresh base student trained on ``promoted`` + hard train, tested on hard test.

    With ``promoted`` empty this is the paper's Hard-Only baseline (pass ``protocol="Hard-Only"``);
    with a teacher's sampled problems instead of PQ it is the Base-T / Intrinsic-T / Random rows.
    ``student`` (an untrained `Student`) or ``student_factory(config)`` supplies the model;
    default: `soar_env.student.build_student`. The student ends up holding the trained weights
    as its baseline.
    """
    evaluation = evaluation or EvalConfig()
    start = time.perf_counter()
    if student is None:
        if student_factory is None:
            # soar_env.student loads torch; this module must import fast (`soar bench --help` reads EvalConfig).
            from soar_env.student import build_student as student_factory
        student = student_factory(dataclasses.replace(config, seed=seed))
    rng = random.Random(seed)
    train_pool, curve_problems, heldout = early_stop_set(hard_train, evaluation, rng)
    promoted = list(promoted)
    batch_size = evaluation.batch_size or config.batch_size
    group_size = evaluation.group_size or config.group_size
    tokens_eval = _eval_tokens(config, evaluation)

    if evaluation.mode == "curriculum" and promoted:
        phases = [(promoted, min(evaluation.synthetic_steps, evaluation.max_steps)), (train_pool, evaluation.max_steps)]
    else:
        phases = [(promoted + train_pool, evaluation.max_steps)]
    one_run = None
    if evaluation.schedule == "one-run":
        from benchmarks.fresh_student import OneRun  # lazy: imports torch

        one_run = OneRun(student, evaluation.max_steps, batch_size=batch_size, group_size=group_size,
                         seed=rng.randrange(2**31))

    steps_done, tokens, curve, stopped, early, train_seconds = 0, 0, [], False, False, 0.0
    notes = []
    for phase, (problems, phase_end) in enumerate(phases):
        # Early stop judges the last phase only: in curriculum mode a flat curve on the synthetic
        # problems must not skip the hard-train phase.
        last_phase, phase_start = phase == len(phases) - 1, len(curve)
        if one_run is not None and problems:
            one_run.start_phase(problems)
        while steps_done < phase_end and not stopped and problems:
            chunk = min(evaluation.eval_every, phase_end - steps_done)
            if one_run is not None:
                result = one_run.train(chunk)  # the optimizer and the cosine go on from the last chunk
            else:
                result = student.train(problems, steps=chunk, batch_size=batch_size, group_size=group_size,
                                       seed=rng.randrange(2**31))
            tokens += result.tokens
            train_seconds += result.seconds
            if not result.ok:
                notes.append(f"training stopped at step {steps_done}: {result.error}")
                stopped = True
                if one_run is not None:
                    student.reset()  # drop the failed chunk's steps, as per-chunk training does
                break
            # The trained weights become the baseline that the curve and the test measure (per-chunk:
            # also what the next chunk starts from; one-run: the policy already holds them).
            student.promote(result.state)
            steps_done += result.steps_done
            if curve_problems:
                accuracy = student.evaluate(curve_problems, greedy=True, max_new_tokens=tokens_eval).accuracy
                curve.append((steps_done, float(accuracy)))
                if last_phase and steps_done < evaluation.max_steps and should_stop(
                        curve[phase_start:], evaluation.slope_window, evaluation.min_slope):
                    stopped = early = True
    scores, test = test_pass_at_k(student, hard_test, evaluation, seed=seed, max_new_tokens=tokens_eval)
    return ProtocolResult(protocol=protocol, seed=seed, pass_at_k=scores, correct=list(test.correct),
                          samples=evaluation.samples, student_steps=steps_done, tokens=tokens + test.tokens,
                          seconds=time.perf_counter() - start, train_seconds=train_seconds, curve=curve,
                          stopped_early=early, train_problems=len(promoted) + len(train_pool), heldout=heldout,
                          note="; ".join(notes), problem_ids=hard_test_ids(hard_test, evaluation))


def run_ps(student: Any, promoted_states: Sequence[Any], hard_train: Sequence[Any], hard_test: Sequence[Any],
           evaluation: EvalConfig | None = None, *, seed: int = 0, config: Any = None) -> ProtocolResult:
    """PS: the promoted student with the best greedy hard-train accuracy, tested on hard test.

    ``promoted_states``: trainable states captured at each promotion (see `PromotedStudents`).
    With none, the base student is tested and the result says so in ``note``.
    """
    evaluation = evaluation or EvalConfig()
    start = time.perf_counter()
    tokens_eval = _eval_tokens(config, evaluation) if config is not None else evaluation.eval_max_new_tokens
    accuracies: list[float] = []
    tokens = 0
    for state in promoted_states:
        result = student.evaluate(list(hard_train), greedy=True, state=state, max_new_tokens=tokens_eval)
        accuracies.append(float(result.accuracy))
        tokens += result.tokens
    selected = int(np.argmax(accuracies)) if accuracies else None  # first best on ties
    state = promoted_states[selected] if selected is not None else None
    scores, test = test_pass_at_k(student, hard_test, evaluation, seed=seed, state=state, max_new_tokens=tokens_eval)
    return ProtocolResult(protocol="PS", seed=seed, pass_at_k=scores, correct=list(test.correct),
                          samples=evaluation.samples, tokens=tokens + test.tokens,
                          seconds=time.perf_counter() - start, selected=selected, selection_accuracy=accuracies,
                          note="" if promoted_states else "no promotion happened: the base student was tested",
                          problem_ids=hard_test_ids(hard_test, evaluation))


class PromotedStudents(BaseCallback):
    """A teacher callback that copies the student's weights at every promotion (the PS candidates).

    ``states[i]`` was promoted at teacher step ``steps[i]``. On a resumed run the first candidate
    is the checkpoint's baseline (the last promotion before the resume).
    """

    def __init__(self) -> None:
        super().__init__()
        self.states: list[Any] = []
        self.steps: list[int] = []

    def on_training_start(self) -> None:
        # A run resumed from a checkpoint: its baseline is the last student promoted before the kill
        # (the earlier promoted ones were only in the killed process's memory).
        core = env_core(self.env)
        if core.promotions > 0 and not self.states:
            self.states.append(core.student.baseline_state())
            self.steps.append(int(getattr(self.teacher, "num_steps", 0)))

    def on_step(self, record: Any) -> bool:
        if record.promoted:
            self.states.append(env_core(self.env).student.baseline_state())
            self.steps.append(int(record.step))
        return True


def promoted_students_callback() -> PromotedStudents:
    """A fresh `PromotedStudents` recorder, for PS.

        recorder = promoted_students_callback()
        teacher.learn(envs, steps, callback=recorder)
        run_ps(student, recorder.states, hard_train, hard_test)
    """
    return PromotedStudents()


__all__ = [
    "DEFAULT_KS",
    "EvalConfig",
    "PromotedStudents",
    "ProtocolResult",
    "curve_slope",
    "early_stop_set",
    "hard_test_ids",
    "hard_test_problems",
    "promoted_students_callback",
    "run_pq",
    "run_ps",
    "should_stop",
    "test_pass_at_k",
]
