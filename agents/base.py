"""The teacher protocol and the loop that trains any teacher against a SOAR environment.

    from agents import RandomTeacher
    envs = gym.make_vec("SOAR-MATH-v0", num_envs=2, preset="tiny")
    RandomTeacher(seed=0).learn(envs, total_steps=3, run_dir="runs/random")

A teacher does three things (`TeacherProtocol`): ``propose(g, n)`` writes g datasets of n
problems, ``update(rewards, infos)`` learns from what the environment said about them, and
``state_dict``/``load_state_dict`` let a run resume. Subclass `Teacher` to get ``learn``,
``save``/``load`` and metric recording for free; a few lines are enough (examples/my_teacher.py).

``learn`` is the outer loop of SOAR: propose, step the env (the student trains inside the
step), feed the rewards back, log, checkpoint. A run directory also gets ``proposals.jsonl``:
every proposed dataset with its reward, for the question analyses of the paper. It drives the vector env (g datasets judged
against one shared baseline: the paper's setting, and what `RLOOTeacher` needs) or a single
env (g = 1). Checkpoints hold the teacher state (weights and optimizer), the env state
(baseline student, PQ, promotion window, RNG), the step counter and the logger history, each
written into a temporary folder that is renamed into place, so a run killed at any moment
resumes from its last complete checkpoint.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

from agents.logger import Logger
from soar_env.problems import Problem

CHECKPOINT_FORMAT = "soar-gym-run/1"
CHECKPOINTS_DIR = "checkpoints"
PQ_FILE = "pq.jsonl"
PROPOSALS_FILE = "proposals.jsonl"
TEACHER_FILE = "teacher.pt"
ENV_FILE = "env.pt"
TRAINER_FILE = "trainer.json"

Batch = list[Problem]
"""One dataset X_k: the n problems of one sub-env's action."""


# ---------------------------------------------------------------------------------------------
# The protocol
# ---------------------------------------------------------------------------------------------


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
        _atomic_torch_save(self.state_dict(), Path(path))

    def load(self, path: str | os.PathLike[str]) -> None:
        import torch

        self.load_state_dict(torch.load(os.fspath(path), map_location="cpu", weights_only=False))

    def learn(
        self,
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
    ) -> "Teacher":
        """Train against ``env`` until ``total_steps`` teacher steps are done; returns ``self``.

        ``run_dir`` receives ``progress.csv``, ``tensorboard/``, ``checkpoints/`` (every
        ``checkpoint_every`` steps and at the end, the last ``keep_checkpoints`` kept) and
        ``pq.jsonl``. ``resume_from`` (a run dir or one checkpoint folder) restores a run; its
        steps count towards ``total_steps``. ``callback``: a `BaseCallback`, a list of them,
        or a function of one `StepRecord` that returns False to stop.
        """
        self.logger = run_learning(self, env, total_steps, callback=callback, run_dir=run_dir,
                                   checkpoint_every=checkpoint_every, keep_checkpoints=keep_checkpoints,
                                   resume_from=resume_from, seed=seed, logger=logger, progress_bar=progress_bar)
        return self


# ---------------------------------------------------------------------------------------------
# Callbacks
# ---------------------------------------------------------------------------------------------


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


# ---------------------------------------------------------------------------------------------
# Envs: one interface over the single env and the vector env
# ---------------------------------------------------------------------------------------------


def env_config(env: Any) -> Any:
    """The `EnvConfig` of a SOAR env, vector env or wrapped env (None for other envs)."""
    for candidate in (env, getattr(env, "unwrapped", None)):
        config = getattr(candidate, "config", None)
        if config is not None and hasattr(config, "problems_per_dataset"):
            return config
    return None


def env_core(env: Any) -> Any:
    """The `SOARCore` (student, hard pool, PQ) behind a SOAR env, or None."""
    for candidate in (env, getattr(env, "unwrapped", None)):
        core = getattr(candidate, "core", None)
        if core is not None:
            return core
    return None


def is_vector_env(env: Any) -> bool:
    from gymnasium.vector import VectorEnv

    return isinstance(env, VectorEnv) or isinstance(getattr(env, "unwrapped", None), VectorEnv)


class EnvDriver:
    """Steps a single env (g = 1) or a vector env (g = num_envs) with g batches; unbatches infos."""

    def __init__(self, env: Any) -> None:
        self.env = env
        self.vector = is_vector_env(env)
        self.config = env_config(env)
        self.num_datasets = int(env.num_envs) if self.vector else 1
        if self.config is not None:
            self.problems_per_dataset = int(self.config.problems_per_dataset)
        else:
            space = env.single_action_space if self.vector else env.action_space
            self.problems_per_dataset = int(getattr(space, "sample_size", 1))

    @property
    def target(self) -> Any:
        """The object that owns save/load (the unwrapped env for gym.make envs)."""
        return self.env if self.vector else getattr(self.env, "unwrapped", self.env)

    @property
    def can_checkpoint(self) -> bool:
        return hasattr(self.target, "save") and hasattr(self.target, "load")

    def reset(self, seed: int | None = None) -> tuple[np.ndarray, dict[str, Any]]:
        obs, info = self.env.reset(seed=seed)
        return self._obs(obs), info

    def step(self, batches: Sequence[Sequence[Any]]
             ) -> tuple[np.ndarray, np.ndarray, bool, list[dict[str, Any]], dict[str, Any]]:
        """(obs (g, d), rewards (g,), episode over, per-dataset infos, shared info)."""
        if self.vector:
            obs, rewards, terminated, truncated, infos = self.env.step(tuple(tuple(b) for b in batches))
            per_dataset, shared = unbatch_infos(infos, self.num_datasets)
            done = bool(np.any(terminated) or np.any(truncated))
            return self._obs(obs), np.asarray(rewards, dtype=np.float64), done, per_dataset, shared
        obs, reward, terminated, truncated, info = self.env.step(tuple(batches[0]))
        info = dict(info)
        shared = {"timings": info.get("timings"), "promoted_dataset": 0 if info.get("promoted") else -1}
        return self._obs(obs), np.array([float(reward)]), bool(terminated or truncated), [info], shared

    def save(self, path: Path) -> None:
        self.target.save(path)

    def load(self, path: Path) -> np.ndarray:
        if not self.vector:
            # Gymnasium's wrappers insist on a reset before anything else; load then overwrites it.
            self.env.reset()
            obs, _ = self.target.load(path)
            return self._obs(obs)
        return self._obs(self.target.load(path))

    @property
    def promoted_questions(self) -> list[Problem]:
        return list(getattr(self.target, "promoted_questions", []) or [])

    def _obs(self, obs: Any) -> np.ndarray:
        array = np.asarray(obs)
        return array if self.vector else array[None]


def unbatch_infos(infos: Mapping[str, Any], num_envs: int) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Gymnasium's batched info dict -> one dict per sub-env, plus the keys that are not per-env.

    A vector env stores ``info[key]`` as an array of length ``num_envs`` next to a boolean
    mask ``info["_" + key]``; anything else (timings, the promoted dataset) is shared.
    """
    per_env: list[dict[str, Any]] = [{} for _ in range(num_envs)]
    shared: dict[str, Any] = {}
    for key, value in infos.items():
        if key.startswith("_"):
            continue
        mask = infos.get("_" + key)
        if mask is not None and isinstance(value, np.ndarray) and len(value) == num_envs:
            for k in range(num_envs):
                if bool(mask[k]):
                    item = value[k]
                    per_env[k][key] = item.item() if isinstance(item, np.generic) else item
        else:
            shared[key] = value
    return per_env, shared


# ---------------------------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------------------------


def checkpoint_dirs(run_dir: str | os.PathLike[str]) -> list[Path]:
    """Complete checkpoints of a run, oldest first (temporary folders of a killed write are ignored)."""
    folder = Path(run_dir) / CHECKPOINTS_DIR
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if p.is_dir() and p.name.startswith("step_") and (p / TRAINER_FILE).is_file()]
    return sorted(found, key=lambda p: int(p.name.split("_", 1)[1]))


def latest_checkpoint(path: str | os.PathLike[str]) -> Path:
    """The checkpoint folder ``path`` names: itself, or the newest one of the run dir ``path``."""
    path = Path(path)
    if (path / TRAINER_FILE).is_file():
        return path
    found = checkpoint_dirs(path)
    if not found:
        raise FileNotFoundError(f"no checkpoint in {path} (expected {path / CHECKPOINTS_DIR}/step_*/{TRAINER_FILE})")
    return found[-1]


def save_checkpoint(run_dir: Path, step: int, teacher: Any, driver: EnvDriver | None, logger: Logger,
                    extra: Mapping[str, Any] | None = None, keep: int = 2) -> Path:
    """Write teacher, env and trainer state into ``run_dir/checkpoints/step_NNNNNN`` atomically."""
    import torch

    folder = run_dir / CHECKPOINTS_DIR
    folder.mkdir(parents=True, exist_ok=True)
    final = folder / f"step_{step:06d}"
    # Leftovers of a write that was killed half-way: never complete, never read.
    for stale in folder.glob(".tmp-step_*"):
        shutil.rmtree(stale, ignore_errors=True)
    tmp = folder / f".tmp-step_{step:06d}-{os.getpid()}"
    tmp.mkdir()
    try:
        torch.save(teacher.state_dict(), tmp / TEACHER_FILE)
        if driver is not None and driver.can_checkpoint:
            driver.save(tmp / ENV_FILE)
        trainer = {"format": CHECKPOINT_FORMAT, "step": step, "teacher_class": _qualname(teacher),
                   "logger": logger.state_dict(), **(extra or {})}
        # The trainer file goes last: a folder holding it is complete.
        _atomic_write_text(tmp / TRAINER_FILE, json.dumps(trainer) + "\n")
        _fsync_dir(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for old in checkpoint_dirs(run_dir)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def read_trainer_state(checkpoint: Path) -> dict[str, Any]:
    state = json.loads((checkpoint / TRAINER_FILE).read_text())
    if state.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{checkpoint} is not a soar-gym run checkpoint ({CHECKPOINT_FORMAT})")
    return state


def write_pq(run_dir: Path, problems: Sequence[Problem]) -> Path:
    """The promoted-questions buffer as jsonl (one `Problem.to_dict` per line), replaced atomically."""
    lines = "".join(json.dumps(p.to_dict(), ensure_ascii=False) + "\n" for p in problems)
    path = run_dir / PQ_FILE
    _atomic_write_text(path, lines)
    return path


def _entry_dict(entry: Any) -> dict[str, Any]:
    if isinstance(entry, Problem):
        return {"question": entry.question, "answer": entry.answer, "source": entry.source}
    if isinstance(entry, Mapping):
        return {"question": str(entry.get("question")), "answer": str(entry.get("answer"))}
    if isinstance(entry, (tuple, list)) and len(entry) == 2:
        return {"question": str(entry[0]), "answer": str(entry[1])}
    return {"entry": repr(entry)[:300]}


def append_proposals(run_dir: Path, step: int, batches: Sequence[Sequence[Any]], rewards: np.ndarray,
                     promoted_dataset: int) -> None:
    """One line per dataset: what the teacher proposed at ``step`` and what it earned (for question analysis)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    with (run_dir / PROPOSALS_FILE).open("a", encoding="utf-8") as handle:
        for k, batch in enumerate(batches):
            row = {"step": step, "dataset": k, "reward": float(rewards[k]), "promoted": k == promoted_dataset,
                   "problems": [_entry_dict(entry) for entry in batch]}
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")


def truncate_proposals(run_dir: Path, last_step: int) -> None:
    """Drop proposals a killed run logged after its last checkpoint."""
    path = run_dir / PROPOSALS_FILE
    if not path.is_file():
        return
    kept = [line for line in path.read_text(encoding="utf-8").splitlines(keepends=True)
            if line.strip() and json.loads(line)["step"] <= last_step]
    _atomic_write_text(path, "".join(kept))


def _atomic_write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with tmp.open("w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def _atomic_torch_save(payload: Any, path: Path) -> None:
    import torch

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with tmp.open("wb") as handle:
        torch.save(payload, handle)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _qualname(obj: Any) -> str:
    cls = type(obj)
    return f"{cls.__module__}:{cls.__qualname__}"


# ---------------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------------


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


def step_metrics(rewards: np.ndarray, infos: Sequence[Mapping[str, Any]], shared: Mapping[str, Any],
                 driver: EnvDriver) -> dict[str, float]:
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
    """The outer loop behind `Teacher.learn`; works with any `TeacherProtocol` object."""
    from tqdm.auto import tqdm

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
    if logger is None:
        logger = Logger(run_path, print_fn=bar.write if progress_bar else None)
    callbacks = convert_callback(callback)
    callbacks.init_callback(teacher, env, logger)
    if hasattr(teacher, "setup"):
        teacher.setup(env, total_steps)

    # 1. Start: a fresh episode, or everything as the checkpoint left it.
    if resume_from is not None:
        checkpoint = latest_checkpoint(resume_from)
        trainer_state = read_trainer_state(checkpoint)
        teacher.load_state_dict(_torch_load(checkpoint / TEACHER_FILE))
        if (checkpoint / ENV_FILE).is_file():
            obs = driver.load(checkpoint / ENV_FILE)
        else:
            warnings.warn(f"{checkpoint} has no env state: the env starts a fresh episode", stacklevel=2)
            obs, _ = driver.reset(seed=seed)
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

            metrics = step_metrics(rewards, infos, shared, driver)
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

            if done and step < total_steps and keep_going:
                # Episode over (truncation): a new one starts; teacher and PQ file carry on.
                obs, _ = driver.reset()
                if hasattr(teacher, "observe"):
                    teacher.observe(obs)
            final = step >= total_steps or not keep_going
            if run_path is not None and (step % checkpoint_every == 0 or final):
                t4 = time.perf_counter()
                path = save_checkpoint(run_path, step, teacher, driver, logger,
                                       extra={"total_steps": total_steps}, keep=keep_checkpoints)
                write_pq(run_path, driver.promoted_questions)
                last_checkpoint_seconds = time.perf_counter() - t4
                callbacks.on_checkpoint(path)
            if not keep_going:
                break
    finally:
        bar.close()
        logger.close()  # flushes TensorBoard; writers reopen if the logger is used again
    if run_path is not None:
        write_pq(run_path, driver.promoted_questions)
    callbacks.on_training_end()
    return logger


def _pop(teacher: Any) -> dict[str, float]:
    return dict(teacher.pop_metrics()) if hasattr(teacher, "pop_metrics") else {}


def _set_steps(teacher: Any, steps: int) -> None:
    try:
        teacher.num_steps = steps
    except AttributeError:
        pass


def _torch_load(path: Path) -> Any:
    import torch

    return torch.load(os.fspath(path), map_location="cpu", weights_only=False)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)
