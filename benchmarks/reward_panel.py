"""The fixed panel of datasets that `benchmarks.reward_signal` trains students on and scores.

    names = panel_names()                              # every dataset, stepping stones first
    problems = build_dataset("stones-fraction-d2", run=0, q_r=q_r, inputs=PanelInputs(16, hard_train))

Each dataset is a kind of teacher output whose value we can say in advance, so that a reward
estimator can be checked against it:

- ``stones-FAMILY-dN``: generated problems of one family (``mixed``: all ten) at difficulty N
  (1-3): well-posed, checkable stepping stones; a good estimator scores them above the controls.
- ``hard-only``: hard-train problems that are not in the run's Q_R (the paper's Hard-Only; the
  small bundled set may leave fewer than n of them).
- ``ill-posed``: well-formed questions whose answer is not determined by the text (a missing
  quantity, an undefined symbol, an equation without a solution), each with a random number as
  its "answer".
- ``shuffled``: a mixed stepping-stone set (difficulty 1-2) with its answers permuted among its
  problems (no problem keeps its own answer): the same questions and answer forms, wrong
  labels. It separates an estimator that sees knowledge from one that sees format.
- ``base-teacher``: problems of the untrained LLM teacher (Base-T), drawn from a pool that is
  sampled once per results folder (`sample_teacher_pool`) so every run uses the same ones.
- ``empty``: no problem (nothing is trained); ``degenerate``: one trivial problem, n times.

A dataset depends only on its name, the run index and (for ``hard-only``) the run's Q_R, so
every process that builds it gets the same problems.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any, Sequence

import numpy as np

from soar_env.data.generators import FAMILIES, sample_problems
from soar_env.problems import Problem

STONE_LEVELS = (1, 2, 3)
"""Generator difficulties of the stepping-stone datasets."""
STONE_FAMILIES = ("mixed",) + FAMILIES
"""``mixed`` draws every problem's family uniformly; the others are one generator family each."""
CONTROLS = ("hard-only", "ill-posed", "shuffled", "base-teacher", "empty", "degenerate")
"""The datasets that are not stepping stones."""
POWER_CONTROLS = ("ill-posed", "shuffled", "hard-only", "empty")
"""The controls every stepping-stone set is compared with for detection power."""
NULL_CONTROLS = ("ill-posed", "shuffled")
"""Datasets with no right answer to learn: their rewards are the estimator's noise (issue 16, item 5)."""
SHUFFLED_LEVELS = (1, 2)
"""Difficulties of the stepping-stone set whose answers ``shuffled`` permutes."""
DEGENERATE = Problem("What is 1 + 1?", "2", source="panel:degenerate")
"""The one trivial problem the degenerate batch repeats."""


def stone_name(family: str, level: int) -> str:
    return f"stones-{family}-d{level}"


def panel_names() -> tuple[str, ...]:
    """Every dataset of the panel: stepping stones (mixed first, then per family and level), then controls."""
    return tuple(stone_name(f, d) for f in STONE_FAMILIES for d in STONE_LEVELS) + CONTROLS


def is_stone(name: str) -> bool:
    return name.startswith("stones-")


def select_datasets(spec: str) -> list[str]:
    """Panel names from a comma-separated list: ``all``, ``stones``, ``controls``, names, ``stones-mixed-*``.

    Unknown names raise ValueError listing the valid ones.
    """
    names = panel_names()
    chosen: list[str] = []
    for part in (p.strip() for p in spec.split(",")):
        if not part:
            continue
        if part == "all":
            matches = list(names)
        elif part == "stones":
            matches = [n for n in names if is_stone(n)]
        elif part == "controls":
            matches = list(CONTROLS)
        elif part.endswith("*"):
            matches = [n for n in names if n.startswith(part[:-1])]
        else:
            matches = [part] if part in names else []
        if not matches:
            raise ValueError(f"unknown dataset {part!r}; valid: all, stones, controls, a prefix ending in '*', "
                             f"or one of {', '.join(names)}")
        chosen.extend(m for m in matches if m not in chosen)
    if not chosen:
        raise ValueError("--datasets names no dataset")
    return chosen


@dataclass
class PanelInputs:
    """What datasets are made from besides their seed."""

    n: int
    """Problems per dataset (the preset's problems_per_dataset)."""
    hard_train: Sequence[Problem] = ()
    """The hard-train split (``hard-only`` draws from it, leaving Q_R out)."""
    teacher_pool: Sequence[Problem] | None = None
    """The stored Base-T samples (``base-teacher``); None: not loaded."""


def dataset_rng(name: str, run: int) -> np.random.Generator:
    """The generator of dataset ``name`` in run ``run``: stable across processes and Python versions."""
    return np.random.default_rng([int(run), zlib.crc32(name.encode("utf-8"))])


def build_dataset(name: str, run: int, q_r: Sequence[Problem], inputs: PanelInputs) -> list[Problem]:
    """The problems of panel dataset ``name`` in run ``run`` (see the module doc)."""
    rng, n = dataset_rng(name, run), inputs.n
    if is_stone(name):
        _, family, level = name.split("-")
        families = None if family == "mixed" else (family,)
        return _generated(n, rng, families, int(level[1:]))
    if name == "hard-only":
        excluded = {p.id for p in q_r}
        pool = [p for p in inputs.hard_train if p.id not in excluded]
        return [pool[int(i)] for i in rng.permutation(len(pool))[:n]]
    if name == "ill-posed":
        return ill_posed(n, rng)
    if name == "shuffled":
        return shuffled_answers(_generated(n, rng, None, SHUFFLED_LEVELS), rng)
    if name == "base-teacher":
        if inputs.teacher_pool is None:
            raise ValueError("base-teacher needs the teacher's sample pool (sample_teacher_pool)")
        pool = list(inputs.teacher_pool)
        return [pool[int(i)] for i in sorted(rng.choice(len(pool), size=min(n, len(pool)), replace=False))]
    if name == "empty":
        return []
    if name == "degenerate":
        return [DEGENERATE] * n
    raise ValueError(f"unknown panel dataset {name!r}; valid: {', '.join(panel_names())}")


def _generated(n: int, rng: np.random.Generator, families: Sequence[str] | None,
               levels: int | Sequence[int]) -> list[Problem]:
    # Distinct problems when the family and level have n of them (some easy levels do not).
    state = rng.bit_generator.state
    try:
        return sample_problems(n, rng, families=families, difficulty=levels, unique=True)
    except ValueError:
        rng.bit_generator.state = state
        return sample_problems(n, rng, families=families, difficulty=levels)


_ILL_POSED = (
    "What is {a} + y?",
    "A box holds some marbles. After {a} more marbles are added, how many marbles are in the box?",
    "Solve for x: x + {a} = x + {b}.",
    "Sam has some coins and gives {a} of them away. How many coins does Sam have now?",
    "What is the remainder when a number is divided by {a}?",
    "Find the larger root of x^2 + bx + {a} = 0.",
    "A train travels {a} km. How many hours does the trip take?",
    "What is {a} times the number Alex is thinking of?",
)
"""Questions whose text does not determine an answer ({a}, {b}: random integers)."""


def ill_posed(n: int, rng: np.random.Generator) -> list[Problem]:
    """``n`` well-formed questions with undetermined answers, each labelled with a random number."""
    problems = []
    for _ in range(n):
        template = _ILL_POSED[int(rng.integers(len(_ILL_POSED)))]
        a, b = int(rng.integers(2, 100)), int(rng.integers(100, 200))
        question = template.format(a=a, b=b)
        problems.append(Problem(question, str(int(rng.integers(1, 1000))), source="panel:ill-posed"))
    return problems


def shuffled_answers(problems: Sequence[Problem], rng: np.random.Generator, tries: int = 20) -> list[Problem]:
    """``problems`` with their answers moved one step along a random cycle: no problem keeps its own.

    Among ``tries`` cycles the one that leaves the fewest problems with an equal answer value
    (two problems can share an answer) is kept.
    """
    count = len(problems)
    if count < 2:
        return list(problems)
    best: list[int] | None = None
    for _ in range(tries):
        order = [int(i) for i in rng.permutation(count)]
        source = [0] * count
        for position, index in enumerate(order):
            source[index] = order[(position + 1) % count]
        same = sum(problems[i].answer == problems[source[i]].answer for i in range(count))
        if best is None or same < best[0]:
            best = [same] + source
        if same == 0:
            break
    assert best is not None
    source = best[1:]
    return [Problem(p.question, problems[source[i]].answer, source="panel:shuffled",
                    meta={"true_answer": p.answer}) for i, p in enumerate(problems)]


def sample_teacher_pool(env_config: Any, preset: str, size: int, seed: int = 0) -> tuple[list[Problem], dict[str, Any]]:
    """``size`` problems of the untrained LLM teacher (Base-T) at ``preset``'s teacher settings.

    Rejection sampling within the preset's attempt budget: a teacher that writes fewer valid
    problems gives a smaller pool, and the returned info says so (drawn, accepted).
    """
    from agents import BaseTeacher  # lazy: loads the teacher's model code
    from agents.teacher_config import make_teacher_config

    teacher = BaseTeacher(make_teacher_config(preset, seed=seed))
    teacher.setup(SimpleNamespace(config=env_config), 1)  # loads the model the env config implies
    problems = [p for p in teacher.propose(1, size)[0] if isinstance(p, Problem)]
    totals = teacher.totals
    info = {"preset": preset, "seed": seed, "asked": size, "kept": len(problems), "drawn": int(totals["drawn"]),
            "accepted": int(totals["accepted"]), "model": teacher.model_name}
    return problems, info


__all__ = ["CONTROLS", "DEGENERATE", "POWER_CONTROLS", "PanelInputs", "STONE_FAMILIES", "STONE_LEVELS",
           "build_dataset", "dataset_rng", "ill_posed", "is_stone", "panel_names", "sample_teacher_pool",
           "select_datasets", "shuffled_answers", "stone_name"]
