"""A conformance check for teachers: run it on your own class before a long run does.

    from agents.testing import check_teacher
    from examples.my_teacher import MyTeacher
    check_teacher(MyTeacher)          # raises TeacherConformanceError naming what is wrong

It needs no model: the env it drives is SOAR-MATH-v0's vector form on the tiny preset with a
scripted student (`soar_env.envs.testing.ScriptedStudent`), whose rewards are known and which
trains in microseconds. What is checked, each failure a named message:

1. ``propose(g, n)`` returns g batches of at most n entries, every entry a valid problem.
2. ``update(rewards, infos)`` accepts the env's (g,) rewards and per-dataset infos and returns
   None or a mapping of numbers.
3. ``state_dict()`` survives ``torch.save``/``torch.load`` and ``load_state_dict`` takes it back.
4. Resuming is exact: after ``load_state_dict(state)`` the teacher proposes what it proposed
   right after ``state`` was taken (skip with ``check_resume=False`` for a teacher that is
   random on purpose).
5. ``learn(env, 2)`` runs, writes a checkpoint, and ``resume_from`` continues it to step 3.
"""

from __future__ import annotations

import io
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from agents.base import PROTOCOL_METHODS, Teacher
from agents.callbacks import StepRecord
from agents.driver import unbatch_infos
from agents.loop import check_batches, run_learning
from soar_env.envs.testing import ScriptedStudent, ranked_pool
from soar_env.envs.vector import SOARMathVectorEnv
from soar_env.problems import Problem, Rejection, to_problem

NOT_A_TEACHER = "{name} lacks {missing}: a teacher needs propose, update, state_dict and load_state_dict"
WRONG_BATCH_COUNT = "{name}.propose({g}, {n}) returned {got} batches, expected {g}"
TOO_MANY_PROBLEMS = "{name}.propose({g}, {n}) returned a batch of {got} problems, more than n = {n}"
EMPTY_PROPOSAL = "{name}.propose({g}, {n}) returned no problem at all"
INVALID_PROBLEM = "{name}.propose returned an invalid problem ({reason}: {detail}): {text!r}"
BAD_UPDATE_RESULT = "{name}.update must return None or a mapping of numbers, got {got!r}"
STATE_NOT_SAVABLE = "{name}.state_dict() cannot be saved with torch.save: {error}"
RESUME_MISMATCH = ("{name} proposed different problems after load_state_dict(state) than right after state "
                   "was taken: a resumed run would not continue the same run")
LEARN_FAILED = "{name}.learn did not reach step {expected} (stopped at {got})"
RESUME_FAILED = "resuming {name} from its checkpoint did not continue at step {expected} (got {got})"


class TeacherConformanceError(AssertionError):
    """A teacher does not meet the protocol; the message says which rule and how."""


def scripted_vector_env(num_datasets: int = 2, problems_per_dataset: int = 3, gains: Any = None,
                        **overrides: Any) -> Any:
    """A model-free SOAR vector env (tiny preset) whose student improves by a scripted gain per run.

    The default gain depends on the dataset (its share of problems with even-length questions),
    so different datasets get different rewards and learning teachers see a signal.
    """
    pool = ranked_pool(20)
    if gains is None:
        def gains(problems: Any, seed: int) -> float:
            return 0.1 * sum(len(p.question) % 2 == 0 for p in problems) / max(len(problems), 1)
    settings = dict(problems_per_dataset=problems_per_dataset, eval_subset_size=len(pool), repeats=1,
                    promotion_window=1, seed=0)
    settings.update(overrides)
    return SOARMathVectorEnv(num_datasets, "tiny", student=ScriptedStudent(pool, gains=gains), hard_pool=pool,
                             **settings)


def _fail(template: str, **fields: Any) -> None:
    raise TeacherConformanceError(template.format(**fields))


def _as_problems(name: str, batches: list[list[Any]]) -> list[list[Problem]]:
    checked: list[list[Problem]] = []
    for batch in batches:
        row = []
        for entry in batch:
            result = to_problem(entry)
            if isinstance(result, Rejection):
                _fail(INVALID_PROBLEM, name=name, reason=result.reason, detail=result.detail, text=result.text)
            row.append(result)
        checked.append(row)
    return checked


def _proposal_key(batches: list[list[Problem]]) -> list[list[tuple[str, str]]]:
    return [[(p.question, p.answer) for p in batch] for batch in batches]


def check_teacher(
    teacher: Teacher | Callable[[], Any],
    *,
    env_factory: Callable[[], Any] | None = None,
    check_resume: bool = True,
    check_learn: bool = True,
) -> None:
    """Run the checks of the module docstring; raise `TeacherConformanceError` on the first failure.

    ``teacher`` is a class or a factory (called for fresh instances; needed for the resume and
    learn checks) or an instance (those two checks then reuse it). ``env_factory`` makes the
    env (default: `scripted_vector_env`).
    """
    make_env = env_factory or scripted_vector_env
    if isinstance(teacher, type) or not hasattr(teacher, "propose"):
        fresh = teacher  # a class or a factory: fresh instances on demand
    else:
        fresh = lambda: teacher  # noqa: E731 - one instance, reused by every check
    instance = fresh()
    name = type(instance).__name__
    missing = [m for m in PROTOCOL_METHODS if not callable(getattr(instance, m, None))]
    if missing:
        _fail(NOT_A_TEACHER, name=name, missing=", ".join(missing))

    env = make_env()
    g, n = int(env.num_envs), int(env.config.problems_per_dataset)
    if hasattr(instance, "setup"):
        instance.setup(env, 3)
    obs, _ = env.reset(seed=0)
    if hasattr(instance, "observe"):
        instance.observe(obs)

    # 1. propose
    raw = instance.propose(g, n)
    try:
        batches = check_batches(raw, g, instance)
    except (TypeError, ValueError):
        _fail(WRONG_BATCH_COUNT, name=name, g=g, n=n, got=len(raw) if hasattr(raw, "__len__") else "no")
    for batch in batches:
        if len(batch) > n:
            _fail(TOO_MANY_PROBLEMS, name=name, g=g, n=n, got=len(batch))
    if not any(batches):
        _fail(EMPTY_PROPOSAL, name=name, g=g, n=n)
    problems = _as_problems(name, batches)

    # 2. update with what the env says
    obs, rewards, _, _, infos = env.step(tuple(tuple(b) for b in problems))
    if hasattr(instance, "observe"):
        instance.observe(obs)
    per_dataset, _ = unbatch_infos(infos, g)
    result = instance.update(np.asarray(rewards), per_dataset)
    if result is not None and (not isinstance(result, Mapping) or
                               not all(isinstance(v, (int, float, np.number)) for v in result.values())):
        _fail(BAD_UPDATE_RESULT, name=name, got=result)

    # 3. state round trip
    try:
        buffer = io.BytesIO()
        torch.save(instance.state_dict(), buffer)
        buffer.seek(0)
        state = torch.load(buffer, map_location="cpu", weights_only=False)
    except Exception as error:  # noqa: BLE001 - any failure is the finding
        _fail(STATE_NOT_SAVABLE, name=name, error=f"{type(error).__name__}: {error}")
    instance.load_state_dict(state)

    # 4. exact resume
    if check_resume:
        first = _proposal_key(_as_problems(name, [list(b) for b in instance.propose(g, n)]))
        instance.load_state_dict(state)
        again = _proposal_key(_as_problems(name, [list(b) for b in instance.propose(g, n)]))
        if first != again:
            _fail(RESUME_MISMATCH, name=name)
        instance.load_state_dict(state)

    # 5. learn, checkpoint, resume
    if check_learn:
        with tempfile.TemporaryDirectory(prefix="soar-teacher-check-") as folder:
            steps: list[int] = []

            def seen(record: StepRecord) -> None:
                steps.append(record.step)

            learner = fresh()
            run_learning(learner, make_env(), 2, run_dir=folder, callback=seen, progress_bar=False, seed=0)
            if steps[-1:] != [2]:
                _fail(LEARN_FAILED, name=name, expected=2, got=steps[-1] if steps else 0)
            steps.clear()
            resumed = fresh()
            run_learning(resumed, make_env(), 3, run_dir=folder, resume_from=Path(folder), callback=seen,
                         progress_bar=False)
            if steps != [3]:
                _fail(RESUME_FAILED, name=name, expected=3, got=steps)


__all__ = ["TeacherConformanceError", "check_teacher", "scripted_vector_env"]
