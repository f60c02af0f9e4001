"""Wall time of one SOAR-MATH step, and how it grows with n, r, inner steps and g.

    python -m benchmarks.env_step_time --preset tiny                 # whole grid, ~2 minutes
    python -m benchmarks.env_step_time --preset cpu --runs 1 \\
        --grid "base;repeats=1;inner_steps=3;problems_per_dataset=8;num_datasets=2"

Each row builds a fresh env (not timed), resets it once (the first reset loads the model and
fills the baseline cache, reported apart), takes ``--warmup`` untimed steps (default 1), then times
``--runs`` steps with ``action_space.sample()`` batches. ``num_datasets=g`` rows use the
vector env (g datasets per step, one shared student). The table says what varied, the
machine and the number of timed runs; the breakdown columns are the env's own ``timings``.
``cpu s`` is this process's CPU time over the step (all torch threads, grader workers
excluded): unlike wall time it barely moves when other jobs share the cores, so compare rows
by it on a busy machine (wall time on an idle machine is about cpu s / torch threads).

``--against REV`` times the same rows on commit REV too (exported with git archive; see
``benchmarks.against``): ``--runs`` pairs of one-step processes, ours and REV's interleaved, and
prints the paired ratios of step, CPU, train and evaluation seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import warnings
from typing import Any

import gymnasium as gym
import torch

import soar_env  # noqa: F401  (registers the env ids)
from benchmarks import against
from benchmarks.timing import machine_line, parse_override
from soar_env.data.hardset import bundled_hardset_path

DEFAULT_GRIDS = {
    "tiny": ("base;problems_per_dataset=2;problems_per_dataset=8;problems_per_dataset=16;repeats=1;repeats=4;"
             "inner_steps=2;inner_steps=4;num_datasets=1;num_datasets=4"),
    "cpu": "base;repeats=1;inner_steps=3;problems_per_dataset=8;num_datasets=2",
    "paper": "base",
}
"""Rows per preset: ``base`` is the preset itself, each other entry overrides settings (``a=1,b=2``)."""

FALLBACK_HARDSET = "generator:addition@4#80%0"
"""Used when the bundled hard set is missing: 4-digit additions, which SmolLM2 fails greedily."""


def time_row(preset: str, overrides: dict[str, Any], runs: int, seed: int, warmup: int = 1) -> dict[str, Any]:
    """Build, reset, take ``warmup`` untimed steps, then time ``runs`` steps of one configuration."""
    settings = against.settings_for_this_library(dict(overrides))
    g = int(settings.pop("num_datasets", 0) or 0)
    t0 = time.perf_counter()
    if g:
        env = gym.make_vec("SOAR-MATH-v0", num_envs=g, preset=preset, **settings)
    else:
        env = gym.make("SOAR-MATH-v0", preset=preset, **settings)
    env.reset(seed=seed)
    reset_s = time.perf_counter() - t0
    env.action_space.seed(seed)
    for _ in range(warmup):
        env.step(env.action_space.sample())  # first-use costs (grader workers, kernels) stay out of the timing
    totals, cpu, parts = [], [], []
    for _ in range(runs):
        action = env.action_space.sample()
        start, cpu_start = time.perf_counter(), time.process_time()
        _, _, _, _, info = env.step(action)
        totals.append(time.perf_counter() - start)
        cpu.append(time.process_time() - cpu_start)
        timings = info["timings"]
        tokens = info["tokens"]
        parts.append((timings.train, timings.eval, timings.baseline_eval, int(sum(tokens) if g else tokens)))
    env.close()
    config = env.unwrapped.config if not g else env.config
    return {
        "n": config.problems_per_dataset, "r": config.repeats, "steps": config.inner_steps,
        "g": g or 1, "M": config.eval_subset_size, "group": config.group_size, "tokens_max": config.max_new_tokens,
        "step_s": statistics.mean(totals), "std_s": statistics.stdev(totals) if len(totals) > 1 else 0.0,
        "cpu_s": statistics.mean(cpu),
        "train_s": statistics.mean(p[0] for p in parts), "eval_s": statistics.mean(p[1] for p in parts),
        "base_s": statistics.mean(p[2] for p in parts), "tokens": statistics.mean(p[3] for p in parts),
        "reset_s": reset_s,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="tiny", choices=sorted(DEFAULT_GRIDS))
    parser.add_argument("--runs", type=int, default=3, help="timed steps per row")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps before the timed ones")
    parser.add_argument("--grid", default=None, help="';'-separated rows: 'base' or 'setting=value'")
    parser.add_argument("--hardset", default=None, help="override the preset's hard set")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None, help="also write the rows to this file")
    against.add_arguments(parser)
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore", category=FutureWarning)
    if args.against:
        return compare_against(args, sys.argv[1:] if argv is None else list(argv))

    common: dict[str, Any] = {}
    if args.hardset:
        common["hardset"] = args.hardset
    elif args.preset == "cpu":
        if not bundled_hardset_path().exists():
            common["hardset"] = FALLBACK_HARDSET
    rows = [r.strip() for r in (args.grid or DEFAULT_GRIDS[args.preset]).split(";") if r.strip()]
    print(f"# SOAR-MATH-v0 step time, preset {args.preset!r}, {args.runs} timed step(s) per row after "
          f"{args.warmup} warm-up step(s)")
    print(f"# machine: {machine_line()}")
    print(f"# library: {os.path.realpath(os.path.dirname(soar_env.__file__))}")
    if common:
        print(f"# common overrides: {common}")
    header = (f"| {'varied':<24} | {'n':>3} | {'r':>2} | {'steps':>5} | {'g':>2} | {'M':>3} | {'step s':>8} | "
              f"{'± std':>6} | {'cpu s':>7} | {'train s':>8} | {'eval s':>7} | {'base s':>6} | {'tokens':>7} | "
              f"{'reset s':>7} |")
    print(header)
    print("|" + "|".join("-" * (len(cell)) for cell in header.split("|")[1:-1]) + "|")
    results = []
    for row in rows:
        overrides = {**common, **parse_override(row)}
        result = time_row(args.preset, overrides, args.runs, args.seed, args.warmup)
        results.append({"row": row, **result})
        print(f"| {row:<24} | {result['n']:>3} | {result['r']:>2} | {result['steps']:>5} | {result['g']:>2} | "
              f"{result['M']:>3} | {result['step_s']:>8.2f} | {result['std_s']:>6.2f} | {result['cpu_s']:>7.1f} | "
              f"{result['train_s']:>8.2f} | "
              f"{result['eval_s']:>7.2f} | {result['base_s']:>6.2f} | {result['tokens']:>7.0f} | "
              f"{result['reset_s']:>7.1f} |", flush=True)
    if hasattr(os, "getloadavg"):
        print(f"# load average at the end: {os.getloadavg()[0]:.1f}")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump({"machine": machine_line(), "settings": vars(args), "rows": results}, handle, indent=2)
    return 0


def compare_against(args: argparse.Namespace, argv: list[str]) -> int:
    """Every row on our tree and on ``args.against``'s, ``args.runs`` interleaved pairs of one step each."""
    print(f"# SOAR-MATH-v0 step time against {args.against}, preset {args.preset!r}, {args.runs} pair(s) of "
          f"one timed step after {args.warmup} warm-up step(s)")
    print(f"# machine: {machine_line()}")
    pairs = against.run_pairs("benchmarks.env_step_time", [*against.strip_against(argv), "--runs", "1"],
                              args.against, args.runs, schedule=args.against_schedule,
                              threads=torch.get_num_threads() if args.against_schedule == "alternate" else 1)
    report = {"pairs": pairs, "rows": []}
    for k, row in enumerate(pairs["ours"][0]["rows"]):
        figures = [(f"{name}", lambda run, key=key, k=k: run["rows"][k][key])
                   for name, key in (("step s", "step_s"), ("CPU s", "cpu_s"), ("train s", "train_s"),
                                     ("Q_R eval s (trained)", "eval_s"), ("baseline eval s", "base_s"),
                                     ("tokens", "tokens"))]
        report["rows"].append({"row": row["row"], "figures": against.paired_table(pairs, figures, f"row {row['row']}")})
    if hasattr(os, "getloadavg"):
        print(f"# load average at the end: {os.getloadavg()[0]:.1f}")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump(report, handle, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
