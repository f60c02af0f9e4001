"""The training run of a fresh PQ / Hard-Only student: one optimizer and one schedule, in chunks.

    run = OneRun(student, total_steps=1500, batch_size=8, group_size=32, seed=0)
    run.start_phase(promoted)                 # curriculum: the synthetic problems first ...
    chunk = run.train(50)                     # ... 50 RLOO steps,
    student.promote(chunk.state)              # the student's baseline is now the run's weights: measure
    run.start_phase(hard_train)
    chunk = run.train(50)                     # the optimizer and the cosine go on where they were

The paper trains each fresh student in one run of at most 1500 steps with a slope-based early
stop. The curve is measured between chunks, and measuring must not restart AdamW or the cosine:
`Student.train` makes a fresh optimizer whose cosine spans each call (right for the 10-step
inner runs), so this keeps one `RLOOUpdater` for the whole run and hands it to
`Student.rloo_steps` chunk after chunk, with the student's policy and settings. It
trains the policy in place: after a chunk the policy holds the run's weights, and
``student.promote(chunk.state)`` makes them the student's baseline too (promoting copies values
into the same parameters, so the optimizer's state stays attached to them).
"""

from __future__ import annotations

import random
import time
from typing import Any, Iterator, Sequence

from soar_env.problems import Problem, Rejection
from soar_env.student_results import TrainResult


class OneRun:
    """One RLOO run of ``total_steps`` updates on a `soar_env.student.Student`, trained in chunks.

    Needs a student with ``policy``, ``config`` (`StudentConfig`) and ``rloo_steps``; a scripted
    student has no optimizer to continue, so it gets a ``TypeError`` that names the per-chunk
    protocol instead.
    """

    def __init__(self, student: Any, total_steps: int, *, batch_size: int, group_size: int, seed: int) -> None:
        policy, config = getattr(student, "policy", None), getattr(student, "config", None)
        if policy is None or not hasattr(config, "rloo_config") or not hasattr(student, "rloo_steps"):
            raise TypeError(f"{type(student).__name__} has no policy and StudentConfig to train in one run; "
                            "use EvalConfig(schedule='per-chunk') for such a student")
        import torch  # lazy: the benchmarks' settings import without torch

        from soar_env.rl import RLOOUpdater

        self.torch = torch
        self.batch_size = batch_size
        self.group_size = group_size
        self.rng = random.Random(seed)
        student.reset()  # start from the student's baseline weights
        student.sync_reference()  # KL towards the weights the run starts from
        self.student = student
        self.policy = policy
        self.updater = RLOOUpdater(policy.trainable_parameters(), config.rloo_config(), total_steps=max(total_steps, 1))
        self.problems: list[Problem] = []
        self.skipped: list[tuple[int, Rejection]] = []
        self._order: Iterator[int] | None = None

    def start_phase(self, problems: Sequence[Any]) -> int:
        """Train on ``problems`` from now on (checked like `Student.train` checks them); how many are usable."""
        from soar_env.student import checked_problems, shuffled_cycle  # lazy: imports torch

        self.problems, self.skipped = checked_problems(problems)
        self._order = shuffled_cycle(len(self.problems), self.rng) if self.problems else None
        return len(self.problems)

    def train(self, steps: int) -> TrainResult:
        """``steps`` more RLOO steps of the run (`Student.rloo_steps`); the optimizer and the schedule
        carry on from the last chunk, and ``state`` is the run's weights after this chunk."""
        torch = self.torch
        result = TrainResult(steps_done=0, num_problems=len(self.problems), skipped=self.skipped)
        start = time.perf_counter()
        if self._order is None:
            result.error = f"no_valid_problems: all {len(self.skipped)} entries were skipped"
            return result
        device = getattr(self.policy, "device", torch.device("cpu"))
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(self.rng.randrange(2**31))  # adapter dropout, if any
            self.student.rloo_steps(self.updater, self.problems, self._order, steps, self.batch_size,
                                    self.group_size, self.rng, result)
        if result.error is None:
            result.state = self.policy.state_dict_trainable()
        result.seconds = time.perf_counter() - start
        return result


__all__ = ["OneRun"]
