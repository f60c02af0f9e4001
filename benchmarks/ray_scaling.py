"""One teacher step (g datasets x r runs) in-process against Ray with 1 and 2 workers.

    python -m benchmarks.ray_scaling --preset tiny --runs 3
    python -m benchmarks.ray_scaling --preset cpu --runs 1 --warmup 0 --set inner_steps=2

Rows: ``local`` (the runs one after another in this process), then ``ray`` with each
``--workers`` count on a local Ray cluster that this script starts with ``--cpus`` CPUs.
Every row builds a fresh vector env, resets it (the baseline evaluation and, for Ray, the
actors' model loads happen here and are reported as ``start s``), takes ``--warmup`` untimed
steps, then times ``--runs`` steps of the same seeded actions. The rewards of every row are
printed too: they must agree, since the seeds are drawn before the runs are spread out.
Ray's overhead per run is (1-worker step time - local step time) / runs per step.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings
from typing import Any

import torch

from benchmarks.timing import machine_line, parse_override
from soar_env.envs import SOARMathVectorEnv


def time_backend(preset: str, overrides: dict[str, Any], runs: int, warmup: int, seed: int) -> dict[str, Any]:
    """Reset a fresh vector env (timed as start-up), then time ``runs`` steps of seeded actions."""
    t0 = time.perf_counter()
    envs = SOARMathVectorEnv(preset=preset, **overrides)
    envs.reset(seed=seed)
    if envs.config.backend == "ray":
        _ = envs.core.runner.worker_pids()  # wait until every actor has built its student
    start_s = time.perf_counter() - t0
    envs.action_space.seed(seed)
    for _ in range(warmup):
        envs.step(envs.action_space.sample())
    seconds, rewards = [], []
    for _ in range(runs):
        action = envs.action_space.sample()
        t = time.perf_counter()
        _, reward, _, _, infos = envs.step(action)
        seconds.append(time.perf_counter() - t)
        rewards.append([round(float(r), 6) for r in reward])
    runs_per_step = envs.num_envs * envs.config.repeats
    envs.close()
    return {"step_s": statistics.mean(seconds), "std_s": statistics.stdev(seconds) if len(seconds) > 1 else 0.0,
            "start_s": start_s, "rewards": rewards, "runs_per_step": runs_per_step}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="tiny", choices=["tiny", "cpu"])
    parser.add_argument("--runs", type=int, default=3, help="timed steps per row")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps before the timed ones")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="Ray worker counts to time")
    parser.add_argument("--cpus", type=int, default=2, help="CPUs of the local Ray cluster")
    parser.add_argument("--set", action="append", default=[], metavar="SETTING=VALUE",
                        help="env setting for every row, e.g. inner_steps=2 (repeatable)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore", category=FutureWarning)

    import ray  # the optional extra this script measures

    torch.set_num_threads(1)  # the local row gets what one worker gets: one thread
    common: dict[str, Any] = {}
    for text in args.set:
        common.update(parse_override(text))
    print(f"# one SOAR-MATH vector step, preset {args.preset!r}, settings {common or 'as the preset'}; "
          f"{args.runs} timed step(s) per row after {args.warmup} warm-up step(s)")
    print(f"# machine: {machine_line()}")
    t = time.perf_counter()
    ray.init(num_cpus=args.cpus, include_dashboard=False, log_to_driver=False)
    print(f"# local Ray cluster of {args.cpus} CPUs started in {time.perf_counter() - t:.1f} s")
    rows = [("local", {})] + [(f"ray, {w} worker(s)", {"backend": "ray", "ray_workers": w}) for w in args.workers]
    results = {}
    print(f"| {'backend':<18} | {'runs/step':>9} | {'step s':>8} | {'± std':>6} | {'start s':>7} | rewards")
    print(f"|{'-' * 20}|{'-' * 11}|{'-' * 10}|{'-' * 8}|{'-' * 9}|---------")
    for name, overrides in rows:
        result = time_backend(args.preset, {**common, **overrides}, args.runs, args.warmup, args.seed)
        results[name] = result
        print(f"| {name:<18} | {result['runs_per_step']:>9} | {result['step_s']:>8.2f} | {result['std_s']:>6.2f} | "
              f"{result['start_s']:>7.1f} | {result['rewards']}", flush=True)
    local = results["local"]
    for name, result in results.items():
        if name.startswith("ray, 1 "):
            overhead = (result["step_s"] - local["step_s"]) / result["runs_per_step"]
            print(f"# Ray overhead per run (1 worker against local): {overhead:+.2f} s")
    same = all(r["rewards"] == local["rewards"] for r in results.values())
    print(f"# rewards identical across rows: {same}")
    ray.shutdown()
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
