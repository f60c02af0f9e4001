"""Callbacks of the training loop: hooks that see every teacher step and may stop the run.

    def stop_on_promotion(record: StepRecord) -> bool:
        return not record.promoted          # False stops training after this step
    teacher.learn(envs, total_steps=50, callback=[stop_on_promotion, StopAfterPromotions(4)])

As in stable-baselines3, a callback is a template-method object (`BaseCallback`), but each step
hands it one `StepRecord` instead of the loop's ``locals()``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from agents.logger import Logger


@dataclass
class StepRecord:
    """One teacher step, as a callback sees it."""

    step: int
    """Teacher steps done, this one included (1 after the first)."""
    batches: list[list[Any]]
    """The g proposed datasets."""
    rewards: np.ndarray
    """(g,) rewards the env returned."""
    infos: list[dict[str, Any]]
    """Per-dataset info dicts of the env."""
    metrics: dict[str, float] = field(default_factory=dict)
    """Everything logged for this step."""
    promoted: bool = False
    """Whether a dataset of this step was promoted."""


class BaseCallback:
    """Template-method callback, as in stable-baselines3, but handed a `StepRecord` instead of ``locals()``."""

    def __init__(self) -> None:
        self.teacher: Any = None
        self.env: Any = None
        self.logger: Logger | None = None

    def init_callback(self, teacher: Any, env: Any, logger: Logger) -> None:
        self.teacher, self.env, self.logger = teacher, env, logger

    def on_training_start(self) -> None:
        pass

    def on_step(self, record: StepRecord) -> bool:
        """Return False to stop training after this step (a checkpoint is still written)."""
        return True

    def on_checkpoint(self, path: Path) -> None:
        pass

    def on_training_end(self) -> None:
        pass


class CallbackList(BaseCallback):
    """Several callbacks in order; training stops when any of them asks to."""

    def __init__(self, callbacks: Sequence[BaseCallback]) -> None:
        super().__init__()
        self.callbacks = list(callbacks)

    def init_callback(self, teacher: Any, env: Any, logger: Logger) -> None:
        super().init_callback(teacher, env, logger)
        for callback in self.callbacks:
            callback.init_callback(teacher, env, logger)

    def on_training_start(self) -> None:
        for callback in self.callbacks:
            callback.on_training_start()

    def on_step(self, record: StepRecord) -> bool:
        # Every callback sees every step, even after one has asked to stop.
        return all([callback.on_step(record) is not False for callback in self.callbacks])

    def on_checkpoint(self, path: Path) -> None:
        for callback in self.callbacks:
            callback.on_checkpoint(path)

    def on_training_end(self) -> None:
        for callback in self.callbacks:
            callback.on_training_end()


class FunctionCallback(BaseCallback):
    """A plain function of a `StepRecord`; returning False (not None) stops training."""

    def __init__(self, function: Callable[[StepRecord], bool | None]) -> None:
        super().__init__()
        self.function = function

    def on_step(self, record: StepRecord) -> bool:
        return self.function(record) is not False


class StopAfterPromotions(BaseCallback):
    """Stop once the env has promoted ``max_promotions`` students (the paper saw at most 4 in 200 steps)."""

    def __init__(self, max_promotions: int) -> None:
        super().__init__()
        self.max_promotions = int(max_promotions)

    def on_step(self, record: StepRecord) -> bool:
        return record.metrics.get("teacher/promotions", 0.0) < self.max_promotions


def convert_callback(callback: Any) -> BaseCallback:
    """None, a BaseCallback, a function or a list of those -> one BaseCallback."""
    if callback is None:
        return BaseCallback()
    if isinstance(callback, BaseCallback):
        return callback
    if isinstance(callback, (list, tuple)):
        return CallbackList([convert_callback(c) for c in callback])
    if callable(callback):
        return FunctionCallback(callback)
    raise TypeError(f"callback must be a BaseCallback, a function or a list of them, got {type(callback).__name__}")
