"""Kill `soar train` with SIGKILL mid-run, resume it, and get exactly the uninterrupted run.

Three runs of the tiny preset in subprocesses: A runs 3 steps uninterrupted; B is killed as soon
as its first checkpoint exists (so during step 2) and then resumed with ``--resume``. The
settings make every piece of state move at every step even with a random student, whose
grounded rewards are all 0: ``--promotion-threshold -1 --promotion-window 1`` promotes a dataset
every step (PQ, promotion count, promotion window), and teacher weight decay with
``--no-teacher-skip-zero-advantage`` steps the teacher's optimizer (weights, Adam moments,
schedule) on every update. B's checkpoint must equal A's state at the same step, and B's
final state A's final state: teacher weights, optimizer, RNG, student baseline, PQ, logs.
"""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from agents import checkpoint_dirs

REPO = Path(__file__).resolve().parents[1]
STEPS = 3
ARGS = ["train", "--preset", "tiny", "--steps", str(STEPS), "--no-progress", "--threads", "1",
        "--keep-checkpoints", str(STEPS), "--eval-train-size", "2",
        "--promotion-threshold", "-1", "--promotion-window", "1",
        "--teacher-weight-decay", "0.5", "--no-teacher-skip-zero-advantage"]
TIMEOUT = 600


def soar(args: list[str], env: dict[str, str], **kwargs):
    return [sys.executable, "-m", "soar_env.cli", *args], dict(cwd=REPO, env=env, **kwargs)


def subprocess_env(tmp_path: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["SOAR_GYM_CACHE"] = str(tmp_path / "cache")  # the tiny-format teacher is built once, here
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    return env


def load(path: Path):
    return torch.load(path, map_location="cpu", weights_only=False)


def assert_same(a, b, where="state"):
    """Deep equality over dicts, lists, tensors and arrays, naming the first difference."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and torch.equal(a, b), where
    elif isinstance(a, np.ndarray):
        assert np.array_equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), f"{where}: keys {sorted(a)} != {sorted(b)}"
        for key in a:
            assert_same(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), f"{where}: length"
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def run_state(checkpoint: Path) -> dict:
    """What must continue: teacher (weights, optimizer, RNG, counters) and env (baseline, PQ, window, RNG)."""
    teacher = load(checkpoint / "teacher.pt")
    env = load(checkpoint / "env.pt")
    trainer = json.loads((checkpoint / "trainer.json").read_text())
    return {"teacher": teacher, "env": {k: env[k] for k in ("core", "steps", "np_random", "last_rewards")},
            "step": trainer["step"], "history": [{k: v for k, v in row.items() if not k.startswith("time/")}
                                                 for row in trainer["logger"]["history"]]}


def csv_rows(run_dir: Path) -> list[dict[str, str]]:
    rows = list(csv.DictReader((run_dir / "progress.csv").open()))
    return [{k: v for k, v in row.items() if not k.startswith("time/") and "tokens_per_second" not in k}
            for row in rows]


def test_sigkill_then_resume_continues_exactly(tmp_path):
    env = subprocess_env(tmp_path)
    a, b = tmp_path / "A", tmp_path / "B"

    # A: the uninterrupted reference.
    command, kwargs = soar([*ARGS, "--run-dir", str(a)], env)
    done = subprocess.run(command, capture_output=True, text=True, timeout=TIMEOUT, **kwargs)
    assert done.returncode == 0, done.stderr[-3000:]

    # B: killed with SIGKILL as soon as a checkpoint is complete (the next step is in flight).
    command, kwargs = soar([*ARGS, "--run-dir", str(b)], env)
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                               start_new_session=True, **kwargs)
    deadline = time.monotonic() + TIMEOUT
    try:
        while not checkpoint_dirs(b):
            assert process.poll() is None, f"B ended before its first checkpoint: {process.stderr.read()[-3000:]}"
            assert time.monotonic() < deadline, "no checkpoint within the timeout"
            time.sleep(0.05)
        os.killpg(process.pid, signal.SIGKILL)  # the run and its grading workers, nothing else
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=60)
        process.stderr.close()
    assert process.returncode == -signal.SIGKILL
    killed_at = checkpoint_dirs(b)[-1]
    k = int(killed_at.name.split("_")[1])
    assert 1 <= k < STEPS and not (b / "summary.json").exists()

    # The checkpoint B left is A's state at the same step: teacher weights (moved by the update),
    # Adam moments and schedule, sampling RNG, student baseline, PQ, promotion window, env RNG.
    state_b = run_state(killed_at)
    assert_same(state_b, run_state(a / "checkpoints" / killed_at.name), "checkpoint")
    assert state_b["teacher"]["updater"]["steps_done"] == k
    assert state_b["env"]["core"]["promotions"] == k and len(state_b["env"]["core"]["promoted_questions"]) > 0
    after_first = load(a / "checkpoints" / "step_000001" / "teacher.pt")["policy"]
    final_a = run_state(a / "checkpoints" / f"step_{STEPS:06d}")
    assert any(not torch.equal(after_first[n], final_a["teacher"]["policy"][n]) for n in after_first)

    # Resuming with a different setting is refused at once; with the saved ones it continues.
    command, kwargs = soar(["train", "--resume", str(b), "--repeats", "3"], env)
    refused = subprocess.run(command, capture_output=True, text=True, timeout=TIMEOUT, **kwargs)
    assert refused.returncode == 2 and "--repeats" in refused.stderr
    command, kwargs = soar(["train", "--resume", str(b), "--no-progress", "--threads", "1"], env)
    resumed = subprocess.run(command, capture_output=True, text=True, timeout=TIMEOUT, **kwargs)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "(resuming)" in resumed.stdout

    # Step counter continued from k; logs hold each step once; everything ends where A ended.
    assert [p.name for p in checkpoint_dirs(b)][-1] == f"step_{STEPS:06d}"
    assert [row["step"] for row in csv_rows(b)] == [str(s) for s in range(1, STEPS + 1)]
    assert csv_rows(b) == csv_rows(a)
    final_b = run_state(b / "checkpoints" / f"step_{STEPS:06d}")
    assert_same(final_b, final_a, "final")
    assert final_b["teacher"]["updater"]["steps_done"] == STEPS  # the optimizer was not restarted
    assert (b / "pq.jsonl").read_text() == (a / "pq.jsonl").read_text() != ""
    assert (b / "proposals.jsonl").read_text() == (a / "proposals.jsonl").read_text()  # no step logged twice
    summary_a = json.loads((a / "summary.json").read_text())
    summary_b = json.loads((b / "summary.json").read_text())
    for key in ("steps", "promotions", "pq_size", "reward_trajectory", "acceptance_trajectory", "student_accuracy"):
        assert summary_b[key] == summary_a[key], key
    assert summary_b["steps"] == STEPS and summary_b["promotions"] == STEPS
