"""The teacher protocol, and `Teacher`: the base class that gives any teacher ``learn``.

    from agents import RandomTeacher
    envs = gym.make_vec("SOAR-MATH-v0", num_envs=2, preset="tiny")
    RandomTeacher(seed=0).learn(envs, total_steps=3, run_dir="runs/random")

A teacher does three things (`TeacherProtocol`): ``propose(g, n)`` writes g datasets of n
problems, ``update(rewards, infos)`` learns from what the environment said about them, and
``state_dict``/``load_state_dict`` let a run resume. Subclass `Teacher` to get ``learn``,
``save``/``load`` and metric recording for free; a few lines are enough (examples/my_teacher.py).

``learn`` is the outer loop of SOAR (`agents.loop.run_learning`): propose, step the env (the
student trains inside the step), feed the rewards back, log, checkpoint (`agents.run_dir`).
It drives the vector env (g datasets judged against one shared baseline: the paper's setting,
and what `RLOOTeacher` needs) or a single env (g = 1).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

from agents.logger import Logger
from agents.loop import run_learning
from agents.run_dir import load_torch_file
from soar_env.atomic import atomic_torch_save
from soar_env.problems import Problem

Batch = list[Problem]
"""One dataset X_k: the n problems of one sub-env's action."""


@runtime_checkable
class TeacherProtocol(Protocol):
    """What ``learn`` needs from a teacher. `Teacher` implements all of it but ``propose``."""

    def propose(self, num_datasets: int, problems_per_dataset: int) -> Sequence[Sequence[Any]]:
        """``num_datasets`` batches of ``problems_per_dataset`` problems (Problem, dict or pair)."""
        ...

    def update(self, rewards: np.ndarray, infos: Sequence[Mapping[str, Any]]) -> Mapping[str, float] | None:
        """Learn from the (g,) rewards of the last proposal; returns metrics to log (or None)."""
        ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: Mapping[str, Any]) -> None: ...


PROTOCOL_METHODS = ("propose", "update", "state_dict", "load_state_dict")
"""The methods every teacher has (what ``soar train`` checks a ``module:Class`` for)."""


class Teacher:
    """Base class of every teacher: subclass it and write ``propose`` (and ``update`` to learn).

    Hooks, all optional: ``setup(env, total_steps)`` runs once before training (load a model,
    read the env's settings), ``check_env(config)`` rejects an env the teacher cannot use,
    ``observe(observation)`` sees the env's observation after every reset and step.
    ``env_overrides`` are env settings the teacher needs (the CLI applies them).
    """

    env_overrides: dict[str, Any] = {}
    """Env settings this teacher needs, e.g. ``{"reward_mode": "learnability"}`` for Intrinsic-T."""

    def __init__(self) -> None:
        self.num_steps = 0
        """Teacher steps taken by ``learn`` (restored from a checkpoint on resume)."""
        self.logger: Logger | None = None
        """The logger of the last ``learn`` call; ``logger.history`` holds every logged step."""
        self._metrics: dict[str, float] = {}

    # -- the protocol --------------------------------------------------------------------------

    def propose(self, num_datasets: int, problems_per_dataset: int) -> list[Batch]:
        raise NotImplementedError(f"{type(self).__name__} must implement propose(num_datasets, problems_per_dataset)")

    def update(self, rewards: np.ndarray, infos: Sequence[Mapping[str, Any]]) -> Mapping[str, float] | None:
        """Default: a teacher that does not learn."""
        return None

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        pass

    # -- optional hooks ------------------------------------------------------------------------

    def setup(self, env: Any, total_steps: int) -> None:
        """Called by ``learn`` before the first step (and before a checkpoint is loaded)."""

    def check_env(self, config: Any) -> None:
        """Raise ValueError when ``config`` (the env's EnvConfig, or None) does not suit this teacher."""

    def observe(self, observation: np.ndarray) -> None:
        """The env's observation after a reset or step: (g, 5) for the vector env, (1, 5) for a single env."""

    # -- helpers ---------------------------------------------------------------------------------

    def record(self, key: str, value: float) -> None:
        """Log a metric for the current step (``learn`` collects it after ``propose``/``update``)."""
        self._metrics[key] = float(value)

    def pop_metrics(self) -> dict[str, float]:
        metrics, self._metrics = self._metrics, {}
        return metrics

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write ``state_dict()`` to ``path`` (atomically: a crash leaves the old file)."""
        atomic_torch_save(self.state_dict(), Path(path))

    def load(self, path: str | os.PathLike[str]) -> None:
        self.load_state_dict(load_torch_file(path))

    def learn(self, env: Any, total_steps: int, **options: Any) -> "Teacher":
        """Train against ``env`` until ``total_steps`` teacher steps are done; returns ``self``.

        ``options`` are those of `agents.loop.run_learning` (``callback``, ``run_dir``,
        ``checkpoint_every``, ``keep_checkpoints``, ``resume_from``, ``seed``, ``logger``,
        ``progress_bar``), documented there once.
        """
        self.logger = run_learning(self, env, total_steps, **options)
        return self

