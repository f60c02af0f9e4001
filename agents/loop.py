"""The outer loop of SOAR, for any teacher: propose, step the env, update, log, checkpoint.

    logger = run_learning(RandomTeacher(seed=0), envs, total_steps=3, run_dir="runs/random")

`Teacher.learn` calls `run_learning`; an object that only follows `TeacherProtocol` can be
trained with it directly. The student trains inside the env step (the inner loop).
"""

from __future__ import annotations

import os
import time
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from agents.callbacks import StepRecord, convert_callback
from agents.driver import EnvDriver, env_core
from agents.logger import Logger
from agents.run_dir import (
    ENV_FILE,
    TEACHER_FILE,
    append_proposals,
    latest_checkpoint,
    load_torch_file,
    pq_rows,
    read_trainer_state,
    save_checkpoint,
    truncate_proposals,
    write_pq,
)


def check_batches(batches: Any, num_datasets: int, teacher: Any) -> list[list[Any]]:
    """A teacher's proposal as g lists; a wrong count is a bug in the teacher, reported as such."""
    if isinstance(batches, (str, bytes)) or not isinstance(batches, Sequence) and not isinstance(batches, np.ndarray):
        raise TypeError(f"{type(teacher).__name__}.propose must return a list of {num_datasets} batches, "
                        f"got {type(batches).__name__}")
    batches = [list(batch) for batch in batches]
    if len(batches) != num_datasets:
        raise ValueError(f"{type(teacher).__name__}.propose returned {len(batches)} batches "
                         f"for {num_datasets} datasets")
    return batches


def step_metrics(rewards: np.ndarray, infos: Sequence[Mapping[str, Any]], shared: Mapping[str, Any]
                 ) -> dict[str, float]:
    """The ``teacher/``, ``student/`` and ``time/`` metrics of one env step."""
    metrics: dict[str, float] = {
        "teacher/reward_mean": float(np.mean(rewards)),
        "teacher/reward_max": float(np.max(rewards)),
        "teacher/reward_min": float(np.min(rewards)),
        "teacher/reward_std": float(np.std(rewards)),
    }
    if len(rewards) > 1:
        for k, reward in enumerate(rewards):
            metrics[f"teacher/reward_dataset_{k}"] = float(reward)
    first = infos[0] if infos else {}
    for key, name in (("reward_average", "teacher/reward_average"), ("promotions", "teacher/promotions"),
                      ("promoted_count", "teacher/pq_size"), ("baseline_accuracy", "student/baseline_accuracy"),
                      ("next_baseline_accuracy", "student/next_baseline_accuracy"),
                      ("inner_steps", "student/inner_steps")):
        if key in first and _is_number(first[key]):
            metrics[name] = float(first[key])
    metrics["teacher/promoted"] = float(int(shared.get("promoted_dataset", -1)) >= 0)
    valid = sum(int(info.get("num_valid", 0)) for info in infos)
    rejected = sum(int(info.get("num_rejected", 0)) for info in infos)
    if valid + rejected:
        metrics["teacher/valid_fraction"] = valid / (valid + rejected)
    metrics["teacher/invalid_datasets"] = float(sum(bool(info.get("invalid_action")) for info in infos))
    trained = [a for info in infos for a in (info.get("trained_accuracy") or [])]
    if trained:
        metrics["student/trained_accuracy_mean"] = float(np.mean(trained))
    inner = [r for info in infos for run in (info.get("train_rewards") or []) for r in run]
    if inner:
        metrics["student/train_reward_mean"] = float(np.mean(inner))
    metrics["student/tokens"] = float(sum(int(info.get("tokens", 0) or 0) for info in infos))
    timings = shared.get("timings")
    if timings is not None and hasattr(timings, "to_dict"):
        for key, value in timings.to_dict().items():
            metrics[key.replace("time/", "time/env_")] = float(value)
    return metrics


def _clock(seconds: float) -> str:
    """tqdm's own "mm:ss" / "h:mm:ss", of the rounded seconds."""
    return tqdm.format_interval(max(int(round(seconds)), 0))


class StepProgress:
    """Progress inside one env step, from the core's `ProgressEvent`s: counts and ETAs as text.

    Units are inner RLOO steps (``runs x inner_steps`` a step; one per run when runs only
    evaluate). Runs may be under way one at a time (``LocalRunner``) or all together
    (``batch_runs``: every inner step advances each of them); the counts and ETAs hold for both.
    The ETAs use the mean time per unit and per evaluation seen so far in this process (a
    batched step's time is shared among its runs), so the first step's estimates firm up after
    its first inner step and later steps start with a good one.
    """

    def __init__(self) -> None:
        self.runs = self.inner_steps = self.runs_done = 0
        self.active: dict[int, int] = {}
        """Runs under way (started, not ended) -> their inner steps done."""
        self.evaluating: set[int] = set()
        """Runs under way that are in their Q_R evaluation."""
        self.phase = "idle"
        self._inner_seconds: list[float] = []
        self._eval_seconds: list[float] = []
        self._last = 0.0

    @property
    def total(self) -> int:
        return self.runs * max(self.inner_steps, 1)

    @property
    def inner_step(self) -> int:
        """Inner steps done by the least advanced run under way (0 when none is)."""
        return min(self.active.values(), default=0)

    @property
    def done(self) -> int:
        """Units finished: whole runs, plus the inner steps of the runs under way."""
        return self.runs_done * max(self.inner_steps, 1) + sum(self.active.values())

    def update(self, event: Any) -> None:
        kind = event.kind
        if kind == "step_start":
            self.runs, self.inner_steps, self.runs_done = event.runs, event.inner_steps, 0
            self.active, self.evaluating, self.phase = {}, set(), "baseline eval"
        elif kind == "run_start":
            self.active[event.run], self.phase = 0, "train"
        elif kind == "inner_step":
            self._inner_seconds.append(event.time - self._last)
            self.active[event.run] = event.inner_step
        elif kind == "run_eval":
            self.evaluating.add(event.run)
            self.phase = "Q_R eval"
        elif kind == "run_end":
            if event.run in self.evaluating:
                self._eval_seconds.append(event.time - self._last)
            self.active.pop(event.run, None)
            self.evaluating.discard(event.run)
            self.runs_done = event.runs_done
            self.phase = "train" if self.active else "between runs"
        elif kind == "step_end":
            self.runs_done, self.active, self.evaluating, self.phase = event.runs, {}, set(), "done"
        self._last = event.time

    def _mean(self, values: list[float]) -> float | None:
        recent = values[-20:]
        return sum(recent) / len(recent) if recent else None

    def run_eta(self) -> float | None:
        """Seconds until the least advanced run under way ends (None before there is a timing to go on)."""
        inner, evaluation = self._mean(self._inner_seconds), self._mean(self._eval_seconds)
        together = max(len(self.active), 1)  # runs under way advance together: each unit costs them all
        if self.phase == "train" and inner is not None:
            return (self.inner_steps - self.inner_step) * inner * together + (evaluation or 0.0) * together
        if self.phase == "Q_R eval" and evaluation is not None:
            return evaluation * len(self.evaluating or self.active or {0})
        return None

    def step_eta(self) -> float | None:
        """Seconds until the step's runs are all done."""
        inner, evaluation = self._mean(self._inner_seconds), self._mean(self._eval_seconds)
        if self.inner_steps and inner is None:
            return None
        units_left = self.total - self.done if self.inner_steps else 0
        evaluations_left = self.runs - self.runs_done - (len(self.evaluating) if self.phase == "Q_R eval" else 0)
        current_evaluations = len(self.evaluating) * (evaluation or 0.0) if self.phase == "Q_R eval" else 0.0
        return units_left * (inner or 0.0) + evaluations_left * (evaluation or 0.0) + current_evaluations

    def describe(self) -> str:
        """E.g. ``runs 3/4, inner step 2/4, run ETA 01:10, step ETA 05:40`` (runs: started of all)."""
        current = min(self.runs_done + len(self.active), self.runs)
        parts = [f"runs {current}/{self.runs}"]
        if self.phase == "train" and self.inner_steps:
            parts.append(f"inner step {self.inner_step}/{self.inner_steps}")
        elif self.phase in ("baseline eval", "Q_R eval"):
            parts.append(self.phase)
        run_eta, step_eta = self.run_eta(), self.step_eta()
        if run_eta is not None:
            parts.append(f"run ETA {_clock(run_eta)}")
        if step_eta is not None and self.phase != "done":
            parts.append(f"step ETA {_clock(step_eta)}")
        return ", ".join(parts)


class StepProgressBar:
    """A second tqdm bar under the teacher's that moves per inner RLOO step: give it to
    ``core.set_progress``. Cleared at the end of every step (``leave=False``)."""

    def __init__(self, position: int = 1, **tqdm_kwargs: Any) -> None:
        self.state = StepProgress()
        self.bar = tqdm(total=0, position=position, leave=False, unit="inner step", dynamic_ncols=True,
                        desc="  student", bar_format="{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt}{postfix}",
                        **tqdm_kwargs)

    def __call__(self, event: Any) -> None:
        self.state.update(event)
        if event.kind == "step_start":
            self.bar.reset(total=self.state.total)
        self.bar.n = self.state.done
        self.bar.set_postfix_str(self.state.describe(), refresh=False)
        self.bar.refresh()
        if event.kind == "step_end":
            self.bar.clear()

    def close(self) -> None:
        self.bar.close()


def run_learning(
    teacher: Any,
    env: Any,
    total_steps: int,
    *,
    callback: Any = None,
    run_dir: str | os.PathLike[str] | None = None,
    checkpoint_every: int = 1,
    keep_checkpoints: int = 2,
    resume_from: str | os.PathLike[str] | None = None,
    seed: int | None = None,
    logger: Logger | None = None,
    progress_bar: bool = True,
) -> Logger:
    """Train ``teacher`` against ``env`` until ``total_steps`` teacher steps are done; returns the logger.

    ``run_dir`` receives ``progress.csv``, ``tensorboard/``, ``checkpoints/`` (every
    ``checkpoint_every`` steps and at the end, the last ``keep_checkpoints`` kept) and
    ``pq.jsonl`` (every episode's promoted questions, when ``total_steps`` spans several
    episodes). ``resume_from`` (a run dir or one checkpoint folder) restores a run; its
    steps count towards ``total_steps``. ``callback``: a `BaseCallback`, a list of them,
    or a function of one `StepRecord` that returns False to stop. Works with any
    `TeacherProtocol` object; the optional hooks of `Teacher` are called when present.
    ``progress_bar`` shows the teacher's bar and, under it, a `StepProgressBar` that moves per
    student run and inner RLOO step of the env step under way (unless the env's core already
    reports to a ``progress`` function of the caller's).
    """
    if total_steps < 1:
        raise ValueError(f"total_steps must be >= 1, got {total_steps}")
    if checkpoint_every < 1:
        raise ValueError(f"checkpoint_every must be >= 1, got {checkpoint_every}")
    run_path = Path(run_dir) if run_dir is not None else None
    driver = EnvDriver(env)
    if hasattr(teacher, "check_env"):
        teacher.check_env(driver.config)
    if run_path is not None and not driver.can_checkpoint:
        warnings.warn(f"{type(driver.target).__name__} has no save/load: checkpoints hold the teacher only",
                      stacklevel=2)
    bar = tqdm(total=total_steps, disable=not progress_bar, unit="step", dynamic_ncols=True, desc="teacher")
    # Inside a step (minutes of student runs) a second bar moves per run and inner RLOO step.
    core = env_core(env) if progress_bar else None
    inner_bar = None
    if core is not None and core.progress is None:
        inner_bar = StepProgressBar(position=abs(getattr(bar, "pos", 0)) + 1)
    if inner_bar is not None:
        core.set_progress(inner_bar)  # type: ignore[union-attr]
    if logger is None:
        logger = Logger(run_path, print_fn=bar.write if progress_bar else None)
    callbacks = convert_callback(callback)
    callbacks.init_callback(teacher, env, logger)
    if hasattr(teacher, "setup"):
        teacher.setup(env, total_steps)

    # 1. Start: a fresh episode, or everything as the checkpoint left it. `pq_before` holds the
    # pq.jsonl rows of the finished episodes; the env holds the current episode's PQ.
    episode, episode_over, pq_before = 0, False, []
    if resume_from is not None:
        checkpoint = latest_checkpoint(resume_from)
        trainer_state = read_trainer_state(checkpoint)
        teacher.load_state_dict(load_torch_file(checkpoint / TEACHER_FILE))
        episode = int(trainer_state.get("episode", 0))
        saved_pq = list(trainer_state.get("pq", []))
        if (checkpoint / ENV_FILE).is_file():
            obs = driver.load(checkpoint / ENV_FILE)
            episode_over = bool(trainer_state.get("episode_over", False))
            pq_before = [row for row in saved_pq if row["episode"] < episode]
        else:
            warnings.warn(f"{checkpoint} has no env state: the env starts a fresh episode", stacklevel=2)
            obs, _ = driver.reset(seed=seed)
            episode, pq_before = episode + 1, saved_pq
        logger.load_state_dict(trainer_state.get("logger", {}))
        start_step = int(trainer_state["step"])
        if run_path is not None:
            truncate_proposals(run_path, start_step)
    else:
        obs, _ = driver.reset(seed=seed)
        start_step = 0
    _set_steps(teacher, start_step)
    bar.update(start_step)
    if hasattr(teacher, "observe"):
        teacher.observe(obs)
    callbacks.on_training_start()

    # 2. The outer loop: propose -> env step (inner loop inside) -> teacher update -> log -> checkpoint.
    step = start_step
    last_checkpoint_seconds = 0.0
    try:
        while step < total_steps:
            if episode_over:
                # Episode over (truncation): a new one starts with an empty PQ; the teacher carries
                # on, and the finished episode's promoted questions stay in pq.jsonl.
                pq_before += pq_rows(driver.promoted_questions, episode)
                obs, _ = driver.reset()
                episode, episode_over = episode + 1, False
                if hasattr(teacher, "observe"):
                    teacher.observe(obs)
            t0 = time.perf_counter()
            batches = check_batches(teacher.propose(driver.num_datasets, driver.problems_per_dataset),
                                    driver.num_datasets, teacher)
            propose_metrics = _pop(teacher)
            t1 = time.perf_counter()
            obs, rewards, done, infos, shared = driver.step(batches)
            t2 = time.perf_counter()
            if hasattr(teacher, "observe"):
                teacher.observe(obs)
            update_metrics = dict(teacher.update(rewards, infos) or {})
            update_metrics.update(_pop(teacher))
            t3 = time.perf_counter()
            step += 1
            _set_steps(teacher, step)

            metrics = step_metrics(rewards, infos, shared)
            metrics.update(propose_metrics)
            metrics.update({k if "/" in k else f"teacher/{k}": v for k, v in update_metrics.items()})
            metrics.update({
                "time/step_seconds": t3 - t0,
                "time/propose_seconds": t1 - t0,
                "time/env_seconds": t2 - t1,
                "time/update_seconds": t3 - t2,
                "time/last_checkpoint_seconds": last_checkpoint_seconds,
            })
            if metrics["time/env_seconds"] > 0:
                metrics["time/student_tokens_per_second"] = metrics["student/tokens"] / metrics["time/env_seconds"]
            logger.record_many(metrics)
            metrics = logger.dump(step)
            record = StepRecord(step=step, batches=batches, rewards=rewards, infos=list(infos), metrics=metrics,
                                promoted=bool(metrics.get("teacher/promoted", 0.0)))
            if run_path is not None:
                append_proposals(run_path, step, batches, rewards, int(shared.get("promoted_dataset", -1)))
            keep_going = callbacks.on_step(record) is not False
            bar.update(1)
            bar.set_postfix(reward=f"{metrics['teacher/reward_mean']:+.4f}",
                            promotions=int(metrics.get("teacher/promotions", 0)), refresh=False)

            # The reset waits for the next step, so a checkpoint taken now still holds this
            # episode's PQ, and a run that ends here leaves the env as its last step left it.
            episode_over = bool(done)
            final = step >= total_steps or not keep_going
            if run_path is not None and (step % checkpoint_every == 0 or final):
                t4 = time.perf_counter()
                pq = pq_before + pq_rows(driver.promoted_questions, episode)
                path = save_checkpoint(run_path, step, teacher, driver, logger, keep=keep_checkpoints,
                                       extra={"total_steps": total_steps, "episode": episode,
                                              "episode_over": episode_over, "pq": pq})
                write_pq(run_path, pq)
                last_checkpoint_seconds = time.perf_counter() - t4
                callbacks.on_checkpoint(path)
            if not keep_going:
                break
    finally:
        if inner_bar is not None:
            core.set_progress(None)  # type: ignore[union-attr]
            inner_bar.close()
        bar.close()
        logger.close()  # flushes TensorBoard; writers reopen if the logger is used again
    if run_path is not None:
        write_pq(run_path, pq_before + pq_rows(driver.promoted_questions, episode))
    callbacks.on_training_end()
    return logger


def _pop(teacher: Any) -> dict[str, float]:
    return dict(teacher.pop_metrics()) if hasattr(teacher, "pop_metrics") else {}


def _set_steps(teacher: Any, steps: int) -> None:
    try:
        teacher.num_steps = steps
    except AttributeError:
        pass


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)
