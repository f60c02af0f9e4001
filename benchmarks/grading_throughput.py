"""Grading throughput (grades per second) on MATH-500, one worker process versus the pool.

    python benchmarks/grading_throughput.py [--runs 3] [--processes N] [--data PATH]

Each MATH-500 worked solution is graded against its own final answer (the content of its last
``\\boxed{}``): "matched" pairs, all correct. "Shifted" pairs grade solution i against the answer
of row i+1, nearly all wrong, which is the slower path (every comparison strategy is tried).
``fast_path=False`` forces Math-Verify even where the strings are identical, so the numbers
measure the symbolic path; the fast-path row shows what identical strings cost. The pool is
restarted before every run so each gold answer is parsed from scratch (a conservative figure:
in training a gold answer's parse is reused across its 32 samples).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

from soar_env.verify import (
    extract_boxed,
    grade_many,
    grading_stats,
    reset_grading_stats,
    shutdown_grading_pool,
    warm_up,
)

DEFAULT_DATA = Path(
    os.environ.get("SOAR_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data")
) / "math500.test.jsonl"


def load_pairs(path: Path) -> tuple[list[str], list[str]]:
    """(solutions, final answers) of every row whose solution has a box."""
    solutions, golds = [], []
    for line in path.read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        boxed = extract_boxed(row["answer"])
        if boxed is not None:
            solutions.append(row["answer"])
            golds.append(boxed)
    return solutions, golds


def measure(
    solutions: list[str], golds: list[str], *, processes: int, fast_path: bool, runs: int
) -> tuple[float, float, int]:
    """Median grades/s over ``runs`` cold-cache runs, the fraction correct, and the timeouts."""
    rates, correct = [], 0.0
    reset_grading_stats()
    for _ in range(runs):
        shutdown_grading_pool()
        warm_up(processes)  # process start-up is a one-off cost, not part of throughput
        start = time.perf_counter()
        grades = grade_many(solutions, golds, processes=processes, fast_path=fast_path, timeout=10.0)
        rates.append(len(grades) / (time.perf_counter() - start))
        correct = sum(g.correct for g in grades) / len(grades)
    return statistics.median(rates), correct, grading_stats()["timeouts"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="math500.test.jsonl")
    parser.add_argument("--runs", type=int, default=3, help="timed runs per setting (median reported)")
    parser.add_argument("--processes", type=int, default=os.cpu_count() or 1, help="pool size")
    args = parser.parse_args()

    solutions, golds = load_pairs(args.data)
    shifted = golds[1:] + golds[:1]
    print(f"data: {args.data} ({len(solutions)} pairs); runs per setting: {args.runs} (median)")
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, load average {load:.1f} at start, "
          f"Python {platform.python_version()}")
    print(f"{'pairs':9} {'path':10} {'processes':>9} {'grades/s':>9} {'correct':>8} {'timeouts':>8}")
    settings = [
        ("matched", golds, "symbolic", 1), ("matched", golds, "symbolic", args.processes),
        ("shifted", shifted, "symbolic", 1), ("shifted", shifted, "symbolic", args.processes),
        ("matched", golds, "fast", 1),
    ]
    for name, gold_list, path, processes in settings:
        rate, correct, timeouts = measure(
            solutions, gold_list, processes=processes, fast_path=path == "fast", runs=args.runs
        )
        print(f"{name:9} {path:10} {processes:9d} {rate:9.1f} {correct:8.1%} {timeouts:8d}")
    shutdown_grading_pool()


if __name__ == "__main__":
    main()
