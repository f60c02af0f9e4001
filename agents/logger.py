"""The one logger of a training run: ``record`` scalars during a step, ``dump`` them once per step.

    logger = Logger("runs/demo", writers=("console", "csv", "tensorboard"))
    logger.record("teacher/reward_mean", 0.01)
    logger.dump(step=1)

Keys are namespaced like CleanRL's and SB3's (``teacher/...``, ``student/...``, ``eval/...``,
``time/...``). Writers are pluggable: the console gets one short line per dump, the CSV file
(``progress.csv``) and TensorBoard get every key. The logger also keeps every dumped row in
memory (``history``): a SOAR run has hundreds of steps, not millions, and the history is what
the final summary is computed from and what a checkpoint stores, so a resumed run rewrites
``progress.csv`` exactly as it stood at the checkpoint and purges later TensorBoard events.
"""

from __future__ import annotations

import csv
import io
import math
import numbers
import os
import sys
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol, TextIO

from soar_env.atomic import atomic_write_text

WRITERS = ("console", "csv", "tensorboard")
"""Names accepted by ``Logger(writers=...)``."""

CONSOLE_KEYS = (
    "teacher/reward_mean",
    "teacher/reward_average",
    "teacher/promotions",
    "teacher/acceptance_rate",
    "student/baseline_accuracy",
    "time/step_seconds",
)
"""What the one console line per step shows; everything else goes to CSV and TensorBoard."""


class Writer(Protocol):
    """Receives one row of scalars per dump."""

    def write(self, values: Mapping[str, float], step: int) -> None: ...

    def close(self) -> None: ...


class ConsoleWriter:
    """One line per dump with a few chosen keys; ``print_fn`` lets a progress bar own the terminal."""

    def __init__(self, keys: Sequence[str] = CONSOLE_KEYS, stream: TextIO | None = None, print_fn: Any = None) -> None:
        self.keys = tuple(keys)
        self.stream = stream
        self.print_fn = print_fn

    def write(self, values: Mapping[str, float], step: int) -> None:
        parts = [f"step {step}"]
        for key in self.keys:
            if key in values:
                parts.append(f"{key.split('/', 1)[-1]}={_short(values[key], key)}")
        line = "  ".join(parts)
        if self.print_fn is not None:
            self.print_fn(line)
        else:
            print(line, file=self.stream or sys.stdout, flush=True)

    def close(self) -> None:
        pass


class CSVWriter:
    """``progress.csv``; a key first seen later rewrites the file with the wider header (as SB3 does)."""

    def __init__(self, path: str | os.PathLike[str], rows: Iterable[Mapping[str, float]] = ()) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.rows: list[dict[str, float]] = [dict(row) for row in rows]
        self.keys: list[str] = []
        for row in self.rows:
            self.keys.extend(k for k in row if k not in self.keys)
        self._rewrite()

    def write(self, values: Mapping[str, float], step: int) -> None:
        row = {"step": step, **values}
        self.rows.append(row)
        new = [k for k in row if k not in self.keys]
        if new:
            self.keys.extend(new)
            self._rewrite()
            return
        with self.path.open("a", newline="", encoding="utf-8") as handle:
            csv.DictWriter(handle, fieldnames=self.keys).writerow(row)

    def _rewrite(self) -> None:
        text = io.StringIO()
        writer = csv.DictWriter(text, fieldnames=self.keys)
        if self.keys:
            writer.writeheader()
        writer.writerows(self.rows)
        atomic_write_text(self.path, text.getvalue())

    def close(self) -> None:
        pass


class TensorBoardWriter:
    """Scalars for TensorBoard under ``log_dir``; ``purge_step`` drops events a killed run wrote past its checkpoint."""

    def __init__(self, log_dir: str | os.PathLike[str], purge_step: int | None = None) -> None:
        from torch.utils.tensorboard import SummaryWriter  # lazy: importing agents loads no torch

        self.writer = SummaryWriter(log_dir=os.fspath(log_dir), purge_step=purge_step)

    def write(self, values: Mapping[str, float], step: int) -> None:
        for key, value in values.items():
            self.writer.add_scalar(key, value, global_step=step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class Logger:
    """Collects scalars with ``record`` and hands one row per ``dump`` to every writer.

    ``run_dir=None`` keeps rows in memory only (plus the console, when asked for).
    Non-numeric and non-finite values are dropped at ``record`` time: a NaN loss is reported by
    the code that produced it, not smuggled into a CSV column.
    """

    def __init__(
        self,
        run_dir: str | os.PathLike[str] | None = None,
        writers: Sequence[str] = WRITERS,
        *,
        console_keys: Sequence[str] = CONSOLE_KEYS,
        print_fn: Any = None,
    ) -> None:
        unknown = [w for w in writers if w not in WRITERS]
        if unknown:
            raise ValueError(f"unknown writer(s) {unknown}; valid: {', '.join(WRITERS)}")
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.writer_names = tuple(writers)
        self.console_keys = tuple(console_keys)
        self.print_fn = print_fn
        self.history: list[dict[str, float]] = []
        """Every dumped row, ``{"step": ..., key: value, ...}``, oldest first."""
        self._pending: dict[str, float] = {}
        self._writers: list[Writer] | None = None

    # -- recording ---------------------------------------------------------------------------

    def record(self, key: str, value: Any) -> None:
        """Remember ``value`` for the next ``dump`` (a later value for the same key wins)."""
        number = _as_float(value)
        if number is not None:
            self._pending[key] = number

    def record_many(self, values: Mapping[str, Any], prefix: str = "") -> None:
        for key, value in values.items():
            self.record(prefix + key, value)

    @property
    def pending(self) -> dict[str, float]:
        """What the next ``dump`` will write."""
        return dict(self._pending)

    def dump(self, step: int) -> dict[str, float]:
        """Write the recorded row for ``step`` to every writer and start a new one."""
        values = dict(sorted(self._pending.items()))
        self._pending = {}
        self.history.append({"step": float(step), **values})
        for writer in self._open_writers():
            writer.write(values, step)
        return values

    def series(self, key: str) -> list[tuple[int, float]]:
        """``(step, value)`` of ``key`` over the history."""
        return [(int(row["step"]), row[key]) for row in self.history if key in row]

    def close(self) -> None:
        for writer in self._writers or []:
            writer.close()
        self._writers = None

    # -- checkpoints -------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {"history": [dict(row) for row in self.history]}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue from a checkpoint: rows after it (from a killed run) are dropped from every file."""
        self.close()
        self.history = [dict(row) for row in state.get("history", [])]
        self._pending = {}
        self._writers = None  # reopened lazily, starting from this history

    def _open_writers(self) -> list[Writer]:
        if self._writers is not None:
            return self._writers
        writers: list[Writer] = []
        last_step = int(self.history[-2]["step"]) if len(self.history) >= 2 else None
        for name in self.writer_names:
            if name == "console":
                writers.append(ConsoleWriter(self.console_keys, print_fn=self.print_fn))
            elif self.run_dir is None:
                continue
            elif name == "csv":
                # All rows but the one being dumped now, which write() appends.
                previous = [_csv_row(row) for row in self.history[:-1]]
                writers.append(CSVWriter(self.run_dir / "progress.csv", previous))
            elif name == "tensorboard":
                purge = None if last_step is None else last_step + 1
                writers.append(TensorBoardWriter(self.run_dir / "tensorboard", purge_step=purge))
        self._writers = writers
        return writers


def _csv_row(row: Mapping[str, float]) -> dict[str, float]:
    out = dict(row)
    out["step"] = int(out["step"])
    return out


def _as_float(value: Any) -> float | None:
    if isinstance(value, bool):
        return float(value)
    if hasattr(value, "item") and callable(value.item):  # numpy / torch scalars
        try:
            value = value.item()
        except (ValueError, RuntimeError):
            return None
    if isinstance(value, numbers.Real):
        number = float(value)
        return number if math.isfinite(number) else None
    return None


def _short(value: float, key: str = "") -> str:
    if float(value).is_integer() and abs(value) < 1e6:
        return str(int(value))
    if "reward" in key:
        return f"{value:+.4f}"  # rewards are small and signed (paper: -0.04 .. +0.02)
    return f"{value:.4g}"
