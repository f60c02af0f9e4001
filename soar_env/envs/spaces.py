"""The spaces of SOAR-MATH: a batch of (question, answer) problems in, a student summary out.

A teacher's action is text, so no numeric space fits. `ProblemBatch` is a Gymnasium
``Space`` whose ``sample()`` draws a valid random batch from the procedural generators
(seeded by the space's own ``np_random``, like every Gymnasium space), and whose
``contains()`` accepts any *well-formed* batch: a tuple or list of 1..max_problems entries,
each a ``Problem``, a ``{"question": str, "answer": str}`` mapping or a ``(question, answer)``
pair, with non-empty text.
Well-formed is not the same as usable: the env still validates each entry with
``soar_env.problems.to_problem`` and drops what fails, with a reason.

The observation is numeric: a ``Box`` of `OBS_FIELDS`, built by `observation_space` and
filled by `make_observation`, the same for the single env and each row of the vector env.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from gymnasium.spaces import Box, Space

from soar_env.config import EnvConfig
from soar_env.data.generators import sample_problems
from soar_env.problems import Problem

ProblemBatchType = tuple[Problem, ...]

OBS_FIELDS = ("baseline_accuracy", "promotions", "step_fraction", "reward_average", "last_reward")
"""Names of the observation's entries, in order. "baseline_accuracy" is the baseline's level on Q_R
under the reward estimator (`soar_env.estimators.qr_level`): greedy accuracy, sampled success rate,
or for "likelihood" the mean per-token probability of the reference answers; all in [0, 1]."""


def observation_space(config: EnvConfig) -> Box:
    """Flat float32 Box: baseline accuracy, promotions, step fraction, reward average, last reward."""
    low = np.array([0.0, 0.0, 0.0, -1.0, -1.0], dtype=np.float32)
    high = np.array([1.0, float(config.episode_length), 1.0, 1.0, 1.0], dtype=np.float32)
    return Box(low, high, dtype=np.float32)


def make_observation(space: Box, baseline_accuracy: float, promotions: int, step_fraction: float,
                     reward_average: float, last_reward: float) -> np.ndarray:
    """One observation row (`OBS_FIELDS` order), clipped into ``space``."""
    values = np.array([baseline_accuracy, promotions, step_fraction, reward_average, last_reward], dtype=np.float32)
    # A penalty below -1 or a count past the horizon must not leave the space.
    return np.clip(values, space.low, space.high).astype(np.float32)


def is_well_formed_entry(entry: Any) -> bool:
    """A Problem, a mapping or a (question, answer) pair, with non-empty string text."""
    if isinstance(entry, Problem):
        question, answer = entry.question, entry.answer
    elif isinstance(entry, Mapping):
        question, answer = entry.get("question"), entry.get("answer")
    elif isinstance(entry, (tuple, list)) and len(entry) == 2:
        question, answer = entry
    else:
        return False
    return isinstance(question, str) and isinstance(answer, str) and bool(question.strip()) and bool(answer.strip())


class ProblemBatch(Space[ProblemBatchType]):
    """Batches of 1..``max_problems`` math problems; ``sample()`` returns ``sample_size`` of them.

    Example:
        >>> from soar_env.envs.spaces import ProblemBatch
        >>> space = ProblemBatch(max_problems=8, sample_size=3, seed=0)
        >>> batch = space.sample()
        >>> len(batch), space.contains(batch)
        (3, True)
        >>> space.contains([{"question": "What is 2+2?", "answer": "4"}])
        True
        >>> space.contains([]), space.contains("2+2=4")
        (False, False)
    """

    def __init__(
        self,
        max_problems: int,
        sample_size: int | None = None,
        *,
        families: Sequence[str] | None = None,
        difficulty: int = 1,
        seed: int | np.random.Generator | None = None,
    ) -> None:
        if max_problems < 1:
            raise ValueError(f"max_problems must be >= 1, got {max_problems}")
        self.max_problems = int(max_problems)
        self.sample_size = int(sample_size if sample_size is not None else max_problems)
        if not 1 <= self.sample_size <= self.max_problems:
            raise ValueError(f"sample_size must be in [1, {self.max_problems}], got {self.sample_size}")
        self.families = tuple(families) if families is not None else None
        self.difficulty = int(difficulty)
        super().__init__(shape=None, dtype=None, seed=seed)

    @property
    def is_np_flattened(self) -> bool:
        # Text cannot be flattened into a numeric array; use SOAR-MATH-Param-v0 for SB3.
        return False

    def sample(self, mask: Any | None = None, probability: Any | None = None) -> ProblemBatchType:
        """A random valid batch of ``sample_size`` generated problems (``mask`` is not supported)."""
        if mask is not None or probability is not None:
            raise NotImplementedError("ProblemBatch.sample() takes no mask or probability")
        problems = sample_problems(self.sample_size, self.np_random, families=self.families,
                                   difficulty=self.difficulty)
        return tuple(problems)

    def contains(self, x: Any) -> bool:
        """True for a tuple or list of 1..max_problems well-formed entries (see module doc)."""
        return (isinstance(x, (tuple, list)) and 1 <= len(x) <= self.max_problems
                and all(is_well_formed_entry(entry) for entry in x))

    def to_jsonable(self, sample_n: Sequence[ProblemBatchType]) -> list[list[dict[str, Any]]]:
        return [[_entry_dict(entry) for entry in batch] for batch in sample_n]

    def from_jsonable(self, sample_n: list[list[dict[str, Any]]]) -> list[ProblemBatchType]:
        return [tuple(Problem.from_dict(row) for row in batch) for batch in sample_n]

    def __repr__(self) -> str:
        return (f"ProblemBatch(max_problems={self.max_problems}, sample_size={self.sample_size}, "
                f"families={self.families}, difficulty={self.difficulty})")

    def __eq__(self, other: object) -> bool:
        return (isinstance(other, ProblemBatch) and self.max_problems == other.max_problems
                and self.sample_size == other.sample_size and self.families == other.families
                and self.difficulty == other.difficulty)

    def __hash__(self) -> int:
        return hash((type(self).__name__, self.max_problems, self.sample_size, self.families, self.difficulty))


def _entry_dict(entry: Any) -> dict[str, Any]:
    if isinstance(entry, Problem):
        return entry.to_dict()
    if isinstance(entry, Mapping):
        return {"question": entry["question"], "answer": entry["answer"]}
    return {"question": entry[0], "answer": entry[1]}
