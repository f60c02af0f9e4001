"""What the single and the vector env share: checkpoints (save, load, restore) and the read-only
SOAR state they expose from their core.

    env.save("env.pt")                         # baseline, PQ, window, step, RNG states (atomic)
    env = SOARMathEnv.restore("env.pt")        # a new env with the checkpoint's settings, resumed

A checkpoint is a ``torch.save``d dict tagged with `CHECKPOINT_FORMAT` and the env ``kind``
("single" or "vector"): the core's state, the env's own counters and every random
generator, so that a resumed env takes exactly the steps the saved one would have.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar, TypeVar

import numpy as np
import torch

from soar_env.atomic import atomic_torch_save
from soar_env.config import EnvConfig, make_config
from soar_env.envs.core import SOARCore
from soar_env.problems import Problem
from soar_env.rng import rng_from_state, rng_state
from soar_env.student import StudentLike

CHECKPOINT_FORMAT = "soar-gym-env/1"
"""Tag written into every checkpoint so a future layout change can be detected on load."""

_ABSENT = object()

Env = TypeVar("Env", bound="CheckpointMixin")


def load_checkpoint(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The payload of an env checkpoint; ValueError for any other file."""
    # Our own files hold Python containers and numpy RNG state besides tensors.
    payload = torch.load(os.fspath(path), map_location="cpu", weights_only=False)
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path} is not a soar-gym environment checkpoint ({CHECKPOINT_FORMAT})")
    return payload


def changed_settings(saved: Mapping[str, Any], current: EnvConfig) -> dict[str, tuple[Any, Any]]:
    """``{setting: (saved value, current value)}`` for every setting that differs.

    The saved settings are read through ``EnvConfig`` first, so a setting that was renamed or
    added since (``greedy_eval`` -> ``reward_estimator``) compares by what it means."""
    try:
        saved = EnvConfig(**saved).to_dict()
    except (TypeError, ValueError):  # settings this version does not know: compare them as written
        pass
    now = current.to_dict()
    return {key: (saved.get(key), now.get(key)) for key in sorted(saved.keys() | now.keys())
            if saved.get(key, _ABSENT) != now.get(key, _ABSENT)}


class CheckpointMixin:
    """``save``, ``load`` and ``restore`` of an env that keeps its SOAR state in ``self.core``.

    An env sets ``checkpoint_kind`` and fills the hooks below with what is its own (step
    counters, last rewards, the action space's generators); everything else is here.
    """

    checkpoint_kind: ClassVar[str]
    """"single" or "vector": a file of the other kind is refused on load."""
    config: EnvConfig
    core: SOARCore
    _np_random: np.random.Generator | None
    _np_random_seed: int | None

    # -- hooks -------------------------------------------------------------------------------------

    def _checkpoint_fields(self) -> dict[str, Any]:
        """The env's own counters, written beside the core's state."""
        raise NotImplementedError

    def _load_checkpoint_fields(self, payload: Mapping[str, Any]) -> None:
        raise NotImplementedError

    def _action_rng_state(self) -> Any:
        raise NotImplementedError

    def _load_action_rng_state(self, state: Any) -> None:
        raise NotImplementedError

    @classmethod
    def _restore_args(cls, payload: Mapping[str, Any]) -> tuple[Any, ...]:
        """Positional constructor arguments a restored env needs besides its config."""
        return ()

    def _check_checkpoint(self, payload: Mapping[str, Any], path: str | os.PathLike[str]) -> None:
        if payload.get("kind") != self.checkpoint_kind:
            raise ValueError(f"{path} holds a {payload.get('kind')!r} env checkpoint, "
                             f"not a {self.checkpoint_kind} env's")

    # -- the shared implementation -------------------------------------------------------------------

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write everything needed to resume: baseline, PQ, window, step, RNG states (atomic)."""
        if self._np_random is None:
            raise RuntimeError("save() needs a reset() first: there is no episode to save")
        payload = {
            "format": CHECKPOINT_FORMAT,
            "kind": self.checkpoint_kind,
            "config": self.config.to_dict(),
            "core": self.core.state_dict(),
            **self._checkpoint_fields(),
            "np_random": rng_state(self._np_random),
            "np_random_seed": self._np_random_seed,
            "action_space_rng": self._action_rng_state(),
        }
        atomic_torch_save(payload, path)

    def _load(self, path: str | os.PathLike[str]) -> None:
        """Put the env in the state ``save`` wrote; warns naming every setting that changed since."""
        payload = load_checkpoint(path)
        self._check_checkpoint(payload, path)
        changed = changed_settings(payload["config"], self.config)
        if changed:
            warnings.warn(f"loading a checkpoint written with other settings (saved, current): {changed}",
                          stacklevel=3)
        self.core.load_state_dict(payload["core"])
        self._load_checkpoint_fields(payload)
        self._np_random = rng_from_state(payload["np_random"])
        self._np_random_seed = payload["np_random_seed"]
        self._load_action_rng_state(payload["action_space_rng"])

    @classmethod
    def restore(cls: type[Env], path: str | os.PathLike[str], *, student: StudentLike | None = None,
                hard_pool: Sequence[Problem] | None = None, **overrides: Any) -> Env:
        """A new env built from a checkpoint's own settings (plus overrides), resumed."""
        payload = load_checkpoint(path)
        config = make_config(EnvConfig(**payload["config"]), **overrides)
        env = cls(*cls._restore_args(payload), config=config, student=student,  # type: ignore[call-arg]
                  hard_pool=hard_pool)
        env.load(path)  # type: ignore[attr-defined]
        return env




class CoreStateMixin:
    """The read-only SOAR state that the single and the vector env both expose from ``self.core``."""

    core: SOARCore
    _steps: int

    @property
    def student(self) -> StudentLike:
        return self.core.student

    @property
    def promoted_questions(self) -> list[Problem]:
        """PQ: every batch that led to a promotion this episode, in order."""
        return list(self.core.promoted_questions)

    @property
    def promotions(self) -> int:
        return self.core.promotions

    @property
    def eval_subset(self) -> list[Problem]:
        """Q_R: the hard problems the next step is measured on."""
        return list(self.core.eval_subset)

    @property
    def step_count(self) -> int:
        return self._steps


__all__ = ["CHECKPOINT_FORMAT", "CheckpointMixin", "CoreStateMixin", "changed_settings", "load_checkpoint"]
