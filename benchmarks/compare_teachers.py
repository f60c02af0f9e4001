"""Teacher comparison the way the paper makes it: PQ / PS / baselines, pass@k with bootstrap CIs.

    python -m benchmarks.compare_teachers --preset cpu --seeds 3 --workers 2 --out runs/compare-cpu
    OMP_NUM_THREADS=1 python -m benchmarks.compare_teachers --quick            # smoke test, < 15 min on 2 cores
    soar bench --quick                                                         # the same

Each finished (method, seed) job is written to ``OUT/jobs/``; running the same command on the
same ``--out`` again keeps those jobs and runs only the missing ones, so a study of many hours
survives a killed run, and can be spread over several sessions (``--seeds``, ``--methods``)
that add up in one table. Jobs measured with other settings are refused, never mixed in.
``--workers N`` runs N jobs at once, each in its own process with ``--threads`` torch threads
(on a 2-core CPU: ``--workers 2 --threads 1``, which uses both cores). A job that
fails is listed in the results with its error; the others still run, and a re-run retries it.

For each seed and method:

1. ``base-student``: the untrained student, tested (the paper's "Base" row).
2. ``hard-only``: a fresh student trained with RLOO on hard train alone (PQ protocol, empty PQ).
3. ``base`` / ``random``: problems sampled from the untrained LLM teacher (Base-T) or the random
   generator; a fresh student is trained on them + hard train (PQ protocol).
4. ``intrinsic``: IntrinsicTeacher meta-trained on the learnability reward, then as 3.
5. ``soar``: RLOOTeacher meta-trained on the grounded reward; rows ``SOAR PQ`` (its promoted
   questions; with no promotion its sampled problems, noted), ``SOAR PS`` (best promoted
   student) and ``Grounded-T`` (problems sampled from the trained teacher, as 3).
6. ``sb3``: the stable-baselines3 PPO curriculum teacher, meta-trained, then like SOAR PQ.
7. ``alp-gmm``: the ALP-GMM curriculum teacher over the generator space (absolute learning
   progress on the grounded reward), meta-trained, then like SOAR PQ.

Random, SB3 and ALP-GMM draw from the generator families of the hard set (the preset teacher's
``families="target"``), as the LLM teachers' prompt names the target's topics.

Every method is tested on the same hard-test problems with ``samples`` sampled solutions each, and
seed s seeds every method's fresh student and its test samples, so the report also gives each method
minus Hard-Only and minus Base on matched (seed, problem) pairs, with paired bootstrap CIs.
Writes ``results.json``, ``results.md`` (paper-style table; the paper's MATH numbers beside
ours only when the settings are the paper's, else labelled with what differs), ``plots/*.png`` (when matplotlib is installed), ``tensorboard/`` (each fresh student's
held-out curve and test pass@k), one run dir per meta-trained teacher
(TensorBoard, progress.csv, pq.jsonl, checkpoints) and ``questions.jsonl`` per teacher for
``soar analyze``.

Settings and table rows: `benchmarks.bench_config`; one job and its file: `benchmarks.bench_jobs`;
tables, question analysis, TensorBoard and plots: `benchmarks.bench_report`. This module runs
the jobs of a study and is the command line.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from multiprocessing import get_context
from pathlib import Path
from typing import Any

from benchmarks.bench_config import BenchConfig
from benchmarks.bench_jobs import collect, job_path, load_job, run_job, run_job_in_worker
from benchmarks.bench_report import analyze_teachers, write_results, write_tensorboard
from soar_env.options import add_dataclass_arguments, dataclass_from_args

# ---------------------------------------------------------------------------------------------
# The study: every (method, seed) job, a few at a time
# ---------------------------------------------------------------------------------------------


def run_study(bench: BenchConfig) -> dict[str, Any]:
    """Every (method, seed) job within the budget, ``workers`` at a time; returns (and writes) the results.

    Finished jobs are read back from their files, so the table is the same whichever process ran a job
    and in whichever order they ended. A job that fails is listed with its error and the study goes on.
    """
    out = Path(bench.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    jobs = [(method, seed) for seed in range(bench.first_seed, bench.first_seed + bench.seeds)
            for method in bench.method_list]
    missing: list[tuple[str, int]] = []
    for method, seed in jobs:  # load_job refuses jobs measured otherwise, before anything runs
        if load_job(out, bench, method, seed) is None:
            missing.append((method, seed))
        else:
            print(f"{method} seed {seed}: kept from {job_path(out, method, seed)}", flush=True)
    skipped: list[str] = []
    failed: dict[str, str] = {}

    def over_budget() -> bool:
        return bench.budget_minutes is not None and (time.perf_counter() - started) / 60 > bench.budget_minutes

    def finished(method: str, seed: int, error: BaseException | None) -> None:
        if error is not None:
            failed[f"{method}/seed{seed}"] = f"{type(error).__name__}: {error}"
            print(f"{method} seed {seed}: FAILED ({failed[f'{method}/seed{seed}']}); the study goes on", flush=True)
        write_results(bench, out, *collect(bench, out), skipped, failed, time.perf_counter() - started)

    if bench.workers == 1:
        for method, seed in missing:
            if over_budget():
                skipped.append(f"{method}/seed{seed}")
                continue
            try:
                run_job(bench, method, seed)
                finished(method, seed, None)
            except Exception as error:  # noqa: BLE001 - one broken job must not cost the others
                finished(method, seed, error)
    else:
        queue = list(missing)
        running: dict[Future[None], tuple[str, int]] = {}
        pool = ProcessPoolExecutor(bench.workers, mp_context=get_context("spawn"))
        try:
            while queue or running:
                broken = False
                while queue and len(running) < bench.workers and not broken:
                    method, seed = queue.pop(0)
                    if over_budget():
                        skipped.append(f"{method}/seed{seed}")
                        continue
                    try:
                        running[pool.submit(run_job_in_worker, bench, method, seed)] = (method, seed)
                    except BrokenProcessPool:  # a worker died since the last wait: this job never started
                        queue.insert(0, (method, seed))
                        broken = True
                if running and not broken:
                    done, _ = wait(running, return_when=FIRST_COMPLETED)
                    for future in done:
                        method, seed = running.pop(future)
                        finished(method, seed, future.exception())
                    broken = any(isinstance(f.exception(), BrokenProcessPool) for f in done)
                if broken:
                    # A worker was killed (out of memory?): every job in flight is lost with the pool.
                    # They are recorded as failed (a re-run retries them) and a new pool takes the rest.
                    for method, seed in running.values():
                        finished(method, seed, BrokenProcessPool("a worker process of the study died"))
                    running.clear()
                    pool.shutdown(wait=False)
                    pool = ProcessPoolExecutor(bench.workers, mp_context=get_context("spawn"))
                elif not running:
                    break
        except KeyboardInterrupt:
            for process in list((getattr(pool, "_processes", None) or {}).values()):  # no public way to stop jobs
                process.terminate()
            raise
        finally:
            pool.shutdown(wait=False, cancel_futures=True)
    analysis = analyze_teachers(bench, out)
    rows, teachers = collect(bench, out)
    write_tensorboard(out, rows)
    return write_results(bench, out, rows, teachers, skipped, failed, time.perf_counter() - started, analysis)


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``soar bench``: one per `BenchConfig` field."""
    add_dataclass_arguments(parser, BenchConfig)


def add_command(commands: Any) -> None:
    """``soar bench`` (the ``soar.commands`` entry point of this module)."""
    bench = commands.add_parser(
        "bench", help="compare teachers the paper's way (PQ, PS, baselines; pass@k with CIs)",
        description="Run Hard-Only, Base-T, Random, Intrinsic-T, SOAR (PQ, PS, Grounded-T) and the SB3 teacher "
                    "on a preset with N seeds; writes results.json, results.md and plots. --quick: a smoke test.")
    add_arguments(bench)
    bench.set_defaults(run=run_from_args)


def run_from_args(args: argparse.Namespace) -> int:
    """``soar bench``: run the study and print its tables; exit status 1 when a job failed."""
    bench = dataclass_from_args(BenchConfig, args)
    results = run_study(bench)
    print((Path(bench.out) / "results.md").read_text())  # the tables write_results has just written
    print(f"wrote {Path(bench.out) / 'results.json'} and results.md ({results['wall_seconds']:.0f} s)")
    for job, error in results["failed"].items():
        print(f"failed: {job}: {error}", file=sys.stderr)
    return 1 if results["failed"] else 0


def main(argv: list[str] | None = None) -> int:
    """``python -m benchmarks.compare_teachers``: the same options as ``soar bench``."""
    parser = argparse.ArgumentParser(prog="compare_teachers", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    return run_from_args(parser.parse_args(argv))


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    sys.exit(main())
