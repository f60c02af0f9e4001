"""The files of a run directory: checkpoints, the promoted-questions buffer and the proposals log.

    runs/soar/
      checkpoints/step_000010/{teacher.pt, env.pt, trainer.json}   newest ``keep`` kept
      pq.jsonl          promoted questions of every episode, one `Problem.to_dict` plus ``episode`` per line
      proposals.jsonl   every proposed dataset with its reward (for the question analyses)
      progress.csv, tensorboard/                                     written by `Logger`

A checkpoint is written into a temporary folder that is renamed into place, its
``trainer.json`` last, so a run killed at any moment resumes from its last complete checkpoint.

A run longer than the env's episode starts a new episode whose PQ is empty; ``pq.jsonl``
keeps the earlier episodes' rows (``episode`` 0, 1, ...), and so does each checkpoint's
``trainer.json``, so that neither a reset nor a resume loses a promoted question.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from agents.logger import Logger
from soar_env.atomic import atomic_torch_save, atomic_write_text, fsync_dir
from soar_env.problems import Problem

CHECKPOINT_FORMAT = "soar-gym-run/1"
CHECKPOINTS_DIR = "checkpoints"
PQ_FILE = "pq.jsonl"
PROPOSALS_FILE = "proposals.jsonl"
TEACHER_FILE = "teacher.pt"
ENV_FILE = "env.pt"
TRAINER_FILE = "trainer.json"


class SavableEnv(Protocol):
    """What a checkpoint needs from the env side (`agents.driver.EnvDriver`)."""

    can_checkpoint: bool

    def save(self, path: Path) -> None: ...


def checkpoint_dirs(run_dir: str | os.PathLike[str]) -> list[Path]:
    """Complete checkpoints of a run, oldest first (temporary folders of a killed write are ignored)."""
    folder = Path(run_dir) / CHECKPOINTS_DIR
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if p.is_dir() and p.name.startswith("step_") and (p / TRAINER_FILE).is_file()]
    return sorted(found, key=checkpoint_step)


def checkpoint_step(checkpoint: Path) -> int:
    """The teacher step a checkpoint folder (``step_NNNNNN``) was written at."""
    return int(checkpoint.name.split("_", 1)[1])


def latest_checkpoint(path: str | os.PathLike[str]) -> Path:
    """The checkpoint folder ``path`` names: itself, or the newest one of the run dir ``path``."""
    path = Path(path)
    if (path / TRAINER_FILE).is_file():
        return path
    found = checkpoint_dirs(path)
    if not found:
        raise FileNotFoundError(f"no checkpoint in {path} (expected {path / CHECKPOINTS_DIR}/step_*/{TRAINER_FILE})")
    return found[-1]


def save_checkpoint(run_dir: Path, step: int, teacher: Any, env: SavableEnv | None, logger: Logger,
                    extra: Mapping[str, Any] | None = None, keep: int = 2) -> Path:
    """Write teacher, env and trainer state into ``run_dir/checkpoints/step_NNNNNN`` atomically."""
    folder = run_dir / CHECKPOINTS_DIR
    folder.mkdir(parents=True, exist_ok=True)
    final = folder / f"step_{step:06d}"
    # Leftovers of a write that was killed half-way: never complete, never read.
    for stale in folder.glob(".tmp-step_*"):
        shutil.rmtree(stale, ignore_errors=True)
    tmp = folder / f".tmp-step_{step:06d}-{os.getpid()}"
    tmp.mkdir()
    try:
        atomic_torch_save(teacher.state_dict(), tmp / TEACHER_FILE)
        if env is not None and env.can_checkpoint:
            env.save(tmp / ENV_FILE)
        trainer = {"format": CHECKPOINT_FORMAT, "step": step, "teacher_class": _qualname(teacher),
                   "logger": logger.state_dict(), **(extra or {})}
        # The trainer file goes last: a folder holding it is complete.
        atomic_write_text(tmp / TRAINER_FILE, json.dumps(trainer) + "\n")
        fsync_dir(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)  # a folder: renamed whole, so readers see all of it or none
        fsync_dir(folder)
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


def load_torch_file(path: str | os.PathLike[str]) -> Any:
    """A teacher state written by ``torch.save`` (full unpickling: our own checkpoints only)."""
    import torch  # lazy: importing agents loads no torch

    return torch.load(os.fspath(path), map_location="cpu", weights_only=False)


def pq_rows(problems: Sequence[Problem], episode: int) -> list[dict[str, Any]]:
    """The ``pq.jsonl`` rows of one episode's promoted questions: `Problem.to_dict` plus ``episode``."""
    return [{"episode": episode, **p.to_dict()} for p in problems]


def write_pq(run_dir: Path, rows: Sequence[Mapping[str, Any]]) -> Path:
    """The promoted questions of every episode so far (`pq_rows`), one per line, replaced atomically."""
    lines = "".join(json.dumps(dict(row), ensure_ascii=False) + "\n" for row in rows)
    path = run_dir / PQ_FILE
    atomic_write_text(path, lines)
    return path


def read_pq(run_dir: str | os.PathLike[str], episode: int | None = None) -> list[Problem]:
    """The promoted questions a run wrote: every episode's (default) or one episode's.

    Each problem's ``meta["episode"]`` says which episode promoted it (0 in files written before
    episodes were recorded).
    """
    path = Path(run_dir) / PQ_FILE
    if not path.is_file():
        return []
    problems = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        row = json.loads(line)
        problem = Problem.from_dict(row)
        problem.meta["episode"] = int(row.get("episode", problem.meta.get("episode", 0)))
        if episode is None or problem.meta["episode"] == episode:
            problems.append(problem)
    return problems


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
    atomic_write_text(path, "".join(kept))


def _qualname(obj: Any) -> str:
    cls = type(obj)
    return f"{cls.__module__}:{cls.__qualname__}"
