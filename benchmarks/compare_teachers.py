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

Every method is tested on the same hard-test problems with ``samples`` sampled solutions each.
Writes ``results.json``, ``results.md`` (paper-style table; the paper's MATH numbers beside
ours), ``plots/*.png`` (when matplotlib is installed), ``tensorboard/`` (each fresh student's
held-out curve and test pass@k), one run dir per meta-trained teacher
(TensorBoard, progress.csv, pq.jsonl, checkpoints) and ``questions.jsonl`` per teacher for
``soar analyze``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

METHODS = ("base-student", "hard-only", "base", "random", "intrinsic", "soar", "sb3")
TEACHER_OF = {"base": "base", "random": "random", "intrinsic": "intrinsic", "soar": "rloo", "sb3": "sb3"}
META_TRAINED = ("intrinsic", "soar", "sb3")
ROW_NAMES = {"base-student": "Base", "hard-only": "Hard-Only", "base": "Base-T", "random": "Random",
             "intrinsic": "Intrinsic-T", "soar-pq": "SOAR PQ", "soar-ps": "SOAR PS", "grounded": "Grounded-T",
             "sb3": "SB3 teacher"}
ROW_ORDER = ("base-student", "hard-only", "base", "random", "intrinsic", "grounded", "soar-pq", "soar-ps", "sb3")
KS = (1, 4, 8, 16, 32)

PAPER_MATH = {
    "base-student": (0.3, 1.0, 2.0, 3.9, 7.5),
    "hard-only": (0.5, 1.7, 3.2, 5.7, 9.6),
    "soar-pq": (1.7, 5.3, 8.5, 13.0, 18.9),
    "soar-ps": (1.0, 3.8, 6.8, 11.5, 18.1),
    "intrinsic": (None, None, None, None, 14.1),
}
"""The paper's MATH hard-test pass@k (%), k = 1/4/8/16/32 (Sundaram et al. 2026, SOAR_SPEC.md)."""

QUICK = {"preset": "tiny", "seeds": 1, "teacher_steps": 2, "pq_max_steps": 4, "eval_every": 2,
         "synthetic_steps": 2, "analysis_questions": 32}
"""--quick: the tiny preset, one seed, every loop at its smallest (minutes on 2 cores)."""

PQ_STEPS = {"tiny": 4, "cpu": 60, "paper": 1500}
"""Default RLOO steps of a fresh PQ student per preset (paper: <= 1500, with early stop)."""


@dataclass
class BenchConfig:
    """Settings of one teacher comparison."""

    preset: str = "cpu"
    """Env and teacher preset: tiny (seconds), cpu (SmolLM2-135M on a laptop CPU) or paper."""
    methods: str = ",".join(METHODS)
    """Comma-separated methods: base-student, hard-only, base, random, intrinsic, soar, sb3."""
    seeds: int = 3
    """Seeds per method (seed s also seeds the env, the teacher and the fresh students)."""
    first_seed: int = 0
    """First seed; seeds are first_seed .. first_seed + seeds - 1."""
    teacher_steps: int | None = None
    """Meta-training steps of each learned teacher (default: soar train's for the preset)."""
    pq_mode: str = "curriculum"
    """How synthetic problems and hard train are combined: curriculum (paper, MATH) or mixed (HARP)."""
    pq_max_steps: int | None = None
    """RLOO steps of every fresh student (default: tiny 4, cpu 60, paper 1500)."""
    synthetic_steps: int | None = None
    """Curriculum mode: steps on the synthetic problems first (default: min(64, pq_max_steps // 2))."""
    eval_every: int | None = None
    """Steps between held-out measurements for early stopping (default: pq_max_steps // 4)."""
    early_stop: bool = True
    """Slope-based early stop of fresh students on a held-out slice of hard train."""
    samples: int = 32
    """Sampled solutions per hard-test problem (pass@k for k <= samples)."""
    test_size: int | None = None
    """Hard-test problems used (None: all)."""
    synthetic_problems: int | None = None
    """Problems sampled from a non-promoting teacher (Base-T, Random, Intrinsic-T, Grounded-T) (default: g x n)."""
    analysis_questions: int = 128
    """Questions sampled per teacher into questions.jsonl for the question analysis."""
    budget_minutes: float | None = None
    """Stop starting new (method, seed) jobs after this much wall time; skipped ones are listed."""
    out: str = "runs/compare"
    """Output folder."""
    quick: bool = False
    """Smoke test: tiny preset, 1 seed, smallest loops; overrides the sizes above."""
    threads: int = 1
    """Torch CPU threads (1 is fastest on a busy machine)."""
    workers: int = 1
    """(method, seed) jobs run at once, each in its own process with ``threads`` threads (2 on a 2-core CPU)."""
    plots: bool = True
    """Draw plots when matplotlib is installed."""

    def __post_init__(self) -> None:
        if self.quick:
            for key, value in QUICK.items():
                setattr(self, key, value)
        unknown = [m for m in self.method_list if m not in METHODS]
        if unknown:
            raise ValueError(f"unknown methods {unknown}; valid: {', '.join(METHODS)}")
        if self.seeds < 1:
            raise ValueError(f"seeds must be >= 1, got {self.seeds}")
        if self.workers < 1:
            raise ValueError(f"workers must be >= 1, got {self.workers}")

    @property
    def method_list(self) -> list[str]:
        return [m.strip() for m in self.methods.split(",") if m.strip()]

    def evaluation(self) -> Any:
        from soar_env.evaluation import EvalConfig

        steps = self.pq_max_steps or PQ_STEPS.get(self.preset, 60)
        return EvalConfig(mode=self.pq_mode, max_steps=steps,
                          synthetic_steps=self.synthetic_steps if self.synthetic_steps is not None else min(64, max(steps // 2, 1)),
                          eval_every=self.eval_every or max(steps // 4, 1), early_stop=self.early_stop,
                          samples=self.samples, test_size=self.test_size)


# ---------------------------------------------------------------------------------------------
# One teacher: meta-train (or not), sample problems
# ---------------------------------------------------------------------------------------------


def _teacher_run(bench: BenchConfig, method: str, seed: int, out: Path) -> dict[str, Any]:
    """Build (and meta-train, for learned teachers) one teacher; its PQ, promoted states, samples, compute."""
    import gymnasium as gym

    import soar_env  # noqa: F401  (registers the env ids)
    from agents.base import checkpoint_dirs, env_core
    from agents.logger import Logger
    from agents.train import DEFAULT_STEPS, RUN_CONFIG, build_teacher, plan_run
    from soar_env.evaluation import promoted_students_callback

    run_dir = out / f"{method}-seed{seed}"
    steps = bench.teacher_steps or DEFAULT_STEPS.get(bench.preset, 10)
    options = {"teacher": TEACHER_OF[method], "preset": bench.preset, "steps": steps, "run_dir": str(run_dir),
               "progress": False, "threads": bench.threads}
    # A job killed during or after meta-training (a session that ended) continues from its last
    # checkpoint; plan_run checks that the folder's run was started with these settings.
    found = checkpoint_dirs(run_dir) if method in META_TRAINED else []
    resumed_at = int(found[-1].name.split("_", 1)[1]) if found else 0
    plan = plan_run({**options, "resume": str(run_dir)} if found else options, {}, {"seed": seed},
                    allow_finished=True)
    if not found:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / RUN_CONFIG).write_text(json.dumps({"train": dataclasses.asdict(plan.train), "env": plan.env.to_dict(),
                                                      "teacher_config": plan.teacher_config.to_dict()}, indent=2) + "\n")
    envs = gym.make_vec("SOAR-MATH-v0", num_envs=plan.env.num_datasets, config=plan.env)
    teacher = build_teacher(plan)
    history: list[dict[str, float]] = []
    recorder = None
    if method in META_TRAINED:
        recorder = promoted_students_callback()
        logger = Logger(run_dir, writers=("csv", "tensorboard"))
        teacher.learn(envs, steps, run_dir=run_dir, callback=recorder, seed=seed, logger=logger, progress_bar=False,
                      resume_from=run_dir if found else None)
        history = logger.history
    elif hasattr(teacher, "setup"):
        teacher.setup(envs, 1)  # loads the LLM teacher's model; nothing is trained

    # Samples: enough datasets of n problems for the synthetic set and the analysis.
    config = plan.env
    wanted = max(bench.synthetic_problems or config.num_datasets * config.problems_per_dataset,
                 bench.analysis_questions)
    sampled: list[Any] = []
    t0 = time.perf_counter()
    for _ in range(50 * (1 + wanted // max(config.num_datasets * config.problems_per_dataset, 1))):
        if len(sampled) >= wanted:
            break
        for batch in teacher.propose(config.num_datasets, config.problems_per_dataset):
            sampled.extend(p for p in batch if hasattr(p, "question"))
    sample_seconds = time.perf_counter() - t0
    with open(run_dir / "questions.jsonl", "w") as handle:
        for problem in sampled[: bench.analysis_questions]:
            handle.write(json.dumps(problem.to_dict(), ensure_ascii=False) + "\n")
    core = env_core(envs)
    promoted = list(envs.promoted_questions) if hasattr(envs, "promoted_questions") else []
    rewards = [row.get("teacher/reward_mean") for row in history]
    compute = {
        "teacher_steps": len(history),
        "meta_student_tokens": int(sum(row.get("student/tokens", 0.0) for row in history)),
        "meta_student_steps": int(sum(row.get("student/inner_steps", 0.0) for row in history)
                                  * config.num_datasets * config.repeats) if method != "intrinsic" else 0,
        # Logged step times span every session of a resumed run (0 for a teacher that is not trained).
        "meta_seconds": round(sum(row.get("time/step_seconds", 0.0) for row in history), 1),
        "sample_seconds": round(sample_seconds, 1),
    }
    info = {
        "run_dir": str(run_dir),
        "rewards": rewards,
        "promotion_steps": list(recorder.steps) if recorder is not None else [],
        "baseline_accuracy": [row.get("student/baseline_accuracy") for row in history],
        "compute": compute,
        "pq_size": len(promoted),
        # After a resume, PS sees the checkpoint's baseline and later promotions (earlier ones were in memory).
        "resumed_at_step": resumed_at,
    }
    student = core.student if (recorder is not None and recorder.states) else None
    envs.close()
    return {"info": info, "promoted": promoted, "sampled": sampled[: wanted], "states": recorder.states if recorder else [],
            "student": student, "config": config}


# ---------------------------------------------------------------------------------------------
# The study
# ---------------------------------------------------------------------------------------------


def run_job(bench: BenchConfig, method: str, seed: int) -> dict[str, Any]:
    """Run one (method, seed) job and write its job file; returns what the file holds.

    A job is self-contained (it builds its own students and teacher), so jobs can run in other processes.
    """
    import torch

    from soar_env.config import make_config
    from soar_env.envs.soar_math import build_student
    from soar_env.evaluation import ProtocolResult, hard_splits, run_pq, run_ps, test_pass_at_k

    torch.set_num_threads(bench.threads)
    out = Path(bench.out)
    evaluation = bench.evaluation()
    config = make_config(bench.preset, seed=seed)
    hard_train, hard_test = hard_splits(config, seed=seed)
    started = time.perf_counter()
    rows: dict[str, list[dict[str, Any]]] = {}

    def add(row: str, result: Any, extra: dict[str, Any] | None = None) -> None:
        entry = result.to_dict()
        entry.update(extra or {})
        rows.setdefault(row, []).append(entry)
        print(f"[{time.perf_counter() - started:6.0f}s] {ROW_NAMES[row]:12s} seed {result.seed}: "
              + " ".join(f"pass@{k} {100 * v:.1f}" for k, v in result.pass_at_k.items())
              + f"  ({result.student_steps} steps, {result.seconds:.0f} s, {result.train_seconds:.0f} s training)"
              + (f"  {result.note}" if result.note else ""), flush=True)

    teacher_info: dict[str, Any] | None = None
    if method == "base-student":
        t0 = time.perf_counter()
        scores, test = test_pass_at_k(build_student(config), hard_test, evaluation, seed=seed,
                                      max_new_tokens=config.eval_tokens)
        add(method, ProtocolResult("base", seed, scores, list(test.correct), evaluation.samples,
                                   tokens=test.tokens, seconds=time.perf_counter() - t0))
    elif method == "hard-only":
        add(method, run_pq(config, [], hard_train, hard_test, evaluation, seed=seed, protocol="Hard-Only"))
    else:
        run = _teacher_run(bench, method, seed, out)
        teacher_info = run["info"]
        extra = {"meta": teacher_info["compute"]}
        synthetic = run["sampled"][: bench.synthetic_problems or len(run["sampled"])]
        if method in ("soar", "sb3"):
            pq = run["promoted"]
            note = "" if pq else "no promotion: trained on the teacher's sampled problems instead"
            result = run_pq(config, pq or synthetic, hard_train, hard_test, evaluation, seed=seed, protocol="PQ")
            result.note = "; ".join(x for x in (result.note, note) if x)
            add("soar-pq" if method == "soar" else "sb3", result, extra)
            if method == "soar":
                student = run["student"] or build_student(config)
                add("soar-ps", run_ps(student, run["states"], hard_train, hard_test, evaluation, seed=seed,
                                      config=config), extra)
                if pq:
                    grounded = run_pq(config, synthetic, hard_train, hard_test, evaluation, seed=seed,
                                      protocol="Grounded-T")
                else:  # SOAR PQ above already trained on exactly these problems with this seed
                    grounded = dataclasses.replace(result, protocol="Grounded-T",
                                                   note="same run as SOAR PQ (no promotion, so PQ = the sampled problems)")
                add("grounded", grounded, extra)
        else:
            add(method, run_pq(config, synthetic, hard_train, hard_test, evaluation, seed=seed,
                               protocol=ROW_NAMES[method]), extra)
    return save_job(out, bench, method, seed, rows, teacher_info)


def _run_job_in_worker(bench: BenchConfig, method: str, seed: int) -> None:
    """Entry point of a worker process: its own torch threads, the job file is the result."""
    os.environ.setdefault("OMP_NUM_THREADS", str(bench.threads))
    try:
        run_job(bench, method, seed)
    except Exception as error:  # noqa: BLE001 - some exceptions do not survive pickling back to the parent
        raise RuntimeError(f"{type(error).__name__}: {error}") from None


def run_study(bench: BenchConfig) -> dict[str, Any]:
    """Every (method, seed) job within the budget, ``workers`` at a time; returns (and writes) the results.

    Finished jobs are read back from their files, so the table is the same whichever process ran a job
    and in whichever order they ended. A job that fails is listed with its error and the study goes on.
    """
    from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
    from concurrent.futures.process import BrokenProcessPool
    from multiprocessing import get_context

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
                        running[pool.submit(_run_job_in_worker, bench, method, seed)] = (method, seed)
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


def collect(bench: BenchConfig, out: Path) -> tuple[dict[str, list[dict[str, Any]]], dict[str, list[dict[str, Any]]]]:
    """Rows and teacher infos of every finished job of this study, in seed-then-method order."""
    rows: dict[str, list[dict[str, Any]]] = {}
    teachers: dict[str, list[dict[str, Any]]] = {}
    for seed in range(bench.first_seed, bench.first_seed + bench.seeds):
        for method in bench.method_list:
            job = load_job(out, bench, method, seed)
            if job is None:
                continue
            for row, entries in job["rows"].items():
                rows.setdefault(row, []).extend(entries)
            if job["teacher"] is not None:
                teachers.setdefault(method, []).append(job["teacher"])
    return rows, teachers


# Settings that change which jobs run or how fast, not what a finished job measured.
NOT_JOB_SETTINGS = ("methods", "seeds", "first_seed", "budget_minutes", "out", "threads", "workers", "plots")


def job_path(out: Path, method: str, seed: int) -> Path:
    return out / "jobs" / f"{method}-seed{seed}.json"


# Settings a method's job never reads: changing them keeps its finished jobs.
UNREAD_BY = {
    "base-student": ("teacher_steps", "pq_mode", "pq_max_steps", "synthetic_steps", "eval_every", "early_stop",
                     "synthetic_problems", "analysis_questions"),
    "hard-only": ("teacher_steps", "synthetic_problems", "analysis_questions"),
    "base": ("teacher_steps",),
    "random": ("teacher_steps",),
}


def job_settings(bench: BenchConfig, method: str) -> dict[str, Any]:
    """The settings that decide what ``method``'s job measures."""
    skip = NOT_JOB_SETTINGS + UNREAD_BY.get(method, ())
    return {k: v for k, v in dataclasses.asdict(bench).items() if k not in skip}


def save_job(out: Path, bench: BenchConfig, method: str, seed: int, rows: dict[str, list[dict[str, Any]]],
             teacher: dict[str, Any] | None) -> dict[str, Any]:
    """One finished (method, seed) job, written atomically: a killed study loses only the job in flight."""
    path = job_path(out, method, seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    job = {"settings": job_settings(bench, method), "rows": rows, "teacher": teacher}
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(job, indent=1) + "\n")
    os.replace(tmp, path)
    return job


def load_job(out: Path, bench: BenchConfig, method: str, seed: int) -> dict[str, Any] | None:
    """A finished job of this study, or None; a job made with other settings is refused, never mixed in."""
    path = job_path(out, method, seed)
    if not path.is_file():
        return None
    job = json.loads(path.read_text())
    wanted = job_settings(bench, method)
    changed = sorted(k for k in wanted if k not in job["settings"] or job["settings"][k] != wanted[k])
    if changed:
        raise ValueError(f"{path} was measured with other settings ({', '.join(changed)}); "
                         f"use another --out or delete it")
    return job


def analyze_teachers(bench: BenchConfig, out: Path) -> dict[str, Any]:
    """Question analysis of each teacher's first-seed samples (and SOAR's PQ when it has one)."""
    from soar_env.analysis import analyze_run

    reports: dict[str, Any] = {}
    seed = bench.first_seed
    for method in bench.method_list:
        run_dir = out / f"{method}-seed{seed}"
        if method not in TEACHER_OF or not (run_dir / "questions.jsonl").is_file():
            continue
        name = "grounded" if method == "soar" else method
        try:
            reports[name] = analyze_run(str(run_dir), sample=bench.analysis_questions, seed=seed)
            pq = run_dir / "pq.jsonl"
            if method == "soar" and pq.is_file() and pq.read_text().strip():
                reports["soar-pq"] = analyze_run(str(run_dir), sample=bench.analysis_questions, seed=seed,
                                                 file="pq.jsonl")
        except (OSError, ValueError) as error:
            reports[name] = {"error": str(error)}
    return reports


def analysis_table(analysis: dict[str, Any]) -> str:
    """Markdown: one row per teacher's sampled questions."""
    if not analysis:
        return ""
    lines = ["| questions of | n | Vendi (embedding) | Vendi (TF-IDF) | duplicates | well-posed | correct (checkable) "
             "| contaminated | word / equation |", "|---|---|---|---|---|---|---|---|---|"]
    for row in ROW_ORDER:
        report = analysis.get(row)
        if not report or "error" in report:
            continue
        correct = report["correct_rate_checkable"]
        embedding = report.get("vendi_embedding")
        lines.append(f"| {ROW_NAMES[row]} | {report['questions']} | {'–' if embedding is None else f'{embedding:.1f}'} | "
                     f"{report['vendi_tfidf']:.1f} | "
                     f"{report['duplicate_rate']:.0%} | {report['well_posed_rate']:.0%} | "
                     f"{'–' if correct is None else f'{correct:.0%}'} ({report['checkable_rate']:.0%}) | "
                     f"{report['contamination_rate']:.0%} | {report['style']['word']:.0%} / "
                     f"{report['style']['equation']:.0%} |")
    return ("\nQuestion analysis (first seed; Vendi with all-MiniLM-L6-v2 embeddings, – when not installed, and "
            "with the offline TF-IDF kernel; paper, embedding kernel: Base-T ~35, Grounded-T 32-35, Intrinsic-T ~11 "
            "of 128):\n\n" + "\n".join(lines) + "\n")


def mean_meta(entries: list[dict[str, Any]]) -> dict[str, float] | None:
    """Meta-training compute averaged over seeds, like the other compute columns (None for untrained rows)."""
    metas = [e["meta"] for e in entries if e.get("meta")]
    if not metas:
        return None
    return {key: round(sum(m.get(key, 0) for m in metas) / len(metas), 1) for key in metas[0]}


def aggregate(rows: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """Per row and k: mean pass@k with a bootstrap 95% CI over seeds and problems (in %)."""
    from soar_env.evaluation import bootstrap_pass_at_k

    table: dict[str, Any] = {}
    for row, entries in rows.items():
        samples = entries[0]["samples"]
        ks = [k for k in KS if k <= samples]
        table[row] = {
            "seeds": len(entries),
            "pass_at_k": {str(k): [100 * v for v in bootstrap_pass_at_k([e["correct"] for e in entries], samples, k,
                                                                         n_resamples=2000)] for k in ks},
            "student_steps": sum(e["student_steps"] for e in entries) / len(entries),
            "tokens": sum(e["tokens"] for e in entries) / len(entries),
            "seconds": sum(e["seconds"] for e in entries) / len(entries),
            "meta": mean_meta(entries),
            "notes": sorted({e["note"] for e in entries if e.get("note")}),
        }
    return table


def markdown_table(bench: BenchConfig, table: dict[str, Any]) -> str:
    """The paper's layout: rows = methods, columns = pass@k (%) with 95% CIs; paper numbers beside for MATH."""
    paper = bench.preset == "paper"
    ks = [k for k in KS if k <= bench.samples]
    header = "| method | seeds | " + " | ".join(f"pass@{k}" for k in ks) + (" | paper (MATH) |" if paper else " |")
    header += " student steps | tokens | wall s | meta-training (teacher steps / student tokens / s) |"
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    for row in ROW_ORDER:
        if row not in table:
            continue
        entry = table[row]
        cells = [f"{m:.1f} [{lo:.1f}, {hi:.1f}]" for m, lo, hi in (entry["pass_at_k"][str(k)] for k in ks)]
        line = f"| {ROW_NAMES[row]} | {entry['seeds']} | " + " | ".join(cells) + " |"
        if paper:
            numbers = PAPER_MATH.get(row)
            line += (" " + "/".join("–" if v is None else f"{v}" for v in numbers) if numbers else " –") + " |"
        meta = entry.get("meta") or {}
        meta_text = (f"{meta.get('teacher_steps', 0):.0f} / {meta.get('meta_student_tokens', 0):.0f} / "
                     f"{meta.get('meta_seconds', 0):.0f}") if meta else "–"
        line += f" {entry['student_steps']:.0f} | {entry['tokens']:.0f} | {entry['seconds']:.0f} | {meta_text} |"
        lines.append(line)
    notes = [f"- {ROW_NAMES[r]}: {n}" for r in ROW_ORDER if r in table for n in table[r]["notes"]]
    text = (f"pass@k (%) on the hard test split, preset `{bench.preset}`, {bench.samples} samples per problem; "
            "[low, high] = bootstrap 95% CI over seeds and problems.\n\n" + "\n".join(lines) + "\n")
    return text + ("\nNotes:\n" + "\n".join(notes) + "\n" if notes else "")


def write_results(bench: BenchConfig, out: Path, rows: dict[str, Any], teachers: dict[str, Any], skipped: list[str],
                  failed: dict[str, str], seconds: float, analysis: dict[str, Any] | None = None) -> dict[str, Any]:
    table = aggregate(rows) if rows else {}
    results = {"config": dataclasses.asdict(bench), "rows": rows, "table": table, "teachers": teachers,
               "analysis": analysis or {}, "skipped": skipped, "failed": failed, "wall_seconds": round(seconds, 1)}
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "results.md").write_text(markdown_table(bench, table) + analysis_table(analysis or {})
                                    + (f"\nSkipped (budget): {', '.join(skipped)}\n" if skipped else "")
                                    + "".join(f"\nFailed: {job}: {error}\n" for job, error in failed.items()))
    if bench.plots:
        plot(out, table, teachers)
    return results


def write_tensorboard(out: Path, rows: dict[str, list[dict[str, Any]]]) -> Path:
    """``OUT/tensorboard``, one run per (row, seed): the fresh student's held-out curve and its test pass@k.

    Written anew from the job files at the end of a study, so a resumed study never duplicates events.
    ``test/pass_at_k`` is plotted against k (its "step"); meta-training runs have their own folders.
    """
    import shutil

    from agents.logger import TensorBoardWriter

    folder = out / "tensorboard"
    shutil.rmtree(folder, ignore_errors=True)
    for row, entries in rows.items():
        for entry in entries:
            writer = TensorBoardWriter(folder / f"{row}-seed{entry['seed']}")
            for step, accuracy in entry.get("curve") or []:
                writer.write({"pq/heldout_greedy_accuracy": accuracy}, int(step))
            for k, value in entry["pass_at_k"].items():
                writer.write({"test/pass_at_k": 100 * value}, int(k))
            writer.close()
    return folder


def plot(out: Path, table: dict[str, Any], teachers: dict[str, Any]) -> list[Path]:
    """Teacher reward curves (promotions marked), pass@k bars with CIs, baseline accuracy over meta-training."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    folder = out / "plots"
    folder.mkdir(exist_ok=True)
    written = []
    fig, (ax_reward, ax_acc) = plt.subplots(1, 2, figsize=(11, 4))
    for method, runs in teachers.items():
        for index, info in enumerate(runs):
            rewards = [r for r in info["rewards"] if r is not None]
            if not rewards:
                continue
            steps = range(1, len(rewards) + 1)
            line, = ax_reward.plot(steps, rewards, label=f"{method} s{index}")
            for step in info["promotion_steps"]:
                ax_reward.axvline(step, color=line.get_color(), linestyle=":", alpha=0.7)
            accuracy = [a for a in info["baseline_accuracy"] if a is not None]
            if accuracy:
                ax_acc.plot(range(1, len(accuracy) + 1), accuracy, label=f"{method} s{index}")
    ax_reward.set(xlabel="teacher step", ylabel="mean dataset reward", title="teacher reward (dotted: promotion)")
    ax_acc.set(xlabel="teacher step", ylabel="baseline greedy accuracy on Q_R", title="student over meta-training")
    for axis in (ax_reward, ax_acc):
        if axis.lines:
            axis.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(folder / "meta_training.png", dpi=120)
    written.append(folder / "meta_training.png")
    plt.close(fig)
    if table:
        fig, axis = plt.subplots(figsize=(10, 4))
        names = [r for r in ROW_ORDER if r in table]
        ks = sorted({int(k) for r in names for k in table[r]["pass_at_k"]})
        width = 0.8 / max(len(names), 1)
        for i, row in enumerate(names):
            values = [table[row]["pass_at_k"][str(k)] for k in ks]
            means = [v[0] for v in values]
            errors = [[v[0] - v[1] for v in values], [v[2] - v[0] for v in values]]
            axis.bar([j + i * width for j in range(len(ks))], means, width, yerr=errors, capsize=2,
                     label=ROW_NAMES[row])
        axis.set_xticks([j + 0.4 - width / 2 for j in range(len(ks))], [f"pass@{k}" for k in ks])
        axis.set(ylabel="% of hard-test problems", title="pass@k with bootstrap 95% CIs")
        axis.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(folder / "pass_at_k.png", dpi=120)
        written.append(folder / "pass_at_k.png")
        plt.close(fig)
    return written


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from soar_env.cli import add_dataclass_arguments

    add_dataclass_arguments(parser, BenchConfig)


def run_from_args(args: argparse.Namespace) -> int:
    from soar_env.cli import dataclass_from_args

    bench = dataclass_from_args(BenchConfig, args)
    results = run_study(bench)
    print(markdown_table(bench, results["table"]) + analysis_table(results.get("analysis", {})))
    print(f"wrote {Path(bench.out) / 'results.json'} and results.md ({results['wall_seconds']:.0f} s)")
    for job, error in results["failed"].items():
        print(f"failed: {job}: {error}", file=sys.stderr)
    return 1 if results["failed"] else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="compare_teachers", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    return run_from_args(parser.parse_args(argv))


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    sys.exit(main())
