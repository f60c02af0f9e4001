"""The jobs of a teacher comparison: run one (method, seed) and keep what it measured in a job file.

A job file (``OUT/jobs/METHOD-seedS.json``) holds the settings that decide what the job
measured, its table rows (one `ProtocolResult` dict per row: per hard-test problem its id and
correct samples, for paired comparisons) and its teacher's meta-training record. It is written
atomically once the job ends, so a killed study keeps every finished job and a re-run on the
same folder runs only the missing ones.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from pathlib import Path
from typing import Any

import gymnasium as gym

import soar_env  # noqa: F401  (registers the env ids)
from agents import Logger, checkpoint_dirs, checkpoint_step, env_core, read_pq
from agents.teacher_config import TeacherConfig, make_teacher_config
from agents.train import (DEFAULT_STEPS, RunPlan, build_teacher, families_setting, plan_run,
                          saved_teacher_settings, write_run_config)
from benchmarks import evaluation  # PQ / PS protocols, named through the module so that tests can replace them
from benchmarks.bench_config import META_TRAINED, ROW_NAMES, TEACHER_OF, BenchConfig
from soar_env.atomic import atomic_write_text
from soar_env.config import EnvConfig, make_config
from soar_env.data.hardset import hard_splits


# ---------------------------------------------------------------------------------------------
# One teacher: meta-train (or not), sample problems
# ---------------------------------------------------------------------------------------------


def teacher_plan(bench: BenchConfig, method: str, seed: int, out: Path) -> RunPlan:
    """The ``soar train`` run of ``method``'s teacher: the study's env (env_set, seed) and the preset's teacher.

    A job killed during or after meta-training (a session that ended) continues from its last
    checkpoint; plan_run checks that the folder's run was started with these settings.
    """
    run_dir = out / f"{method}-seed{seed}"
    steps = bench.teacher_steps or DEFAULT_STEPS.get(bench.preset, 10)
    options = {"teacher": TEACHER_OF[method], "preset": bench.preset, "steps": steps, "run_dir": str(run_dir),
               "progress": False, "threads": bench.threads}
    if method in META_TRAINED and checkpoint_dirs(run_dir):
        options["resume"] = str(run_dir)
    return plan_run(options, bench.teacher_overrides(), {**bench.env_overrides(), "seed": seed}, allow_finished=True)


def _teacher_run(bench: BenchConfig, method: str, seed: int, out: Path) -> dict[str, Any]:
    """Build (and meta-train, for learned teachers) one teacher; its PQ, promoted states, samples, compute."""
    plan = teacher_plan(bench, method, seed, out)
    run_dir, steps = plan.run_dir, plan.train.total_steps
    found = checkpoint_dirs(run_dir) if plan.resuming else []
    resumed_at = checkpoint_step(found[-1]) if found else 0
    if not found:
        write_run_config(plan)
    envs = gym.make_vec("SOAR-MATH-v0", num_envs=plan.env.num_datasets, config=plan.env)
    teacher = build_teacher(plan)
    history: list[dict[str, float]] = []
    recorder = None
    if method in META_TRAINED:
        recorder = evaluation.promoted_students_callback()
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
    # Every episode's promoted questions, from the run's pq.jsonl (the env holds only the last episode's).
    promoted = read_pq(run_dir) if method in META_TRAINED else []
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
        "updates_skipped": [row.get("teacher/update_skipped") for row in history],
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
# One (method, seed) job
# ---------------------------------------------------------------------------------------------


def run_job(bench: BenchConfig, method: str, seed: int) -> dict[str, Any]:
    """Run one (method, seed) job and write its job file; returns what the file holds.

    A job is self-contained (it builds its own students and teacher), so jobs can run in other processes.
    """
    # torch loads here, not with the module: a worker process sets OMP_NUM_THREADS first, and
    # `soar bench --help` stays fast.
    import torch

    from soar_env.student import build_student

    torch.set_num_threads(bench.threads)
    out = Path(bench.out)
    settings = bench.evaluation()
    # The fresh student, its training and its hard-test samples are seeded by ``seed`` alone, never by the
    # method, so every method's (seed, problem) pairs line up (the report's paired differences).
    config = make_config(bench.preset, seed=seed, **bench.env_overrides())
    hard_train, hard_test = hard_splits(config)  # one split per hard set, whatever the seed
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
        scores, test = evaluation.test_pass_at_k(build_student(config), hard_test, settings, seed=seed,
                                                 max_new_tokens=config.eval_tokens)
        add(method, evaluation.ProtocolResult("base", seed, scores, list(test.correct), settings.samples,
                                              tokens=test.tokens, seconds=time.perf_counter() - t0,
                                              problem_ids=evaluation.hard_test_ids(hard_test, settings)))
    elif method == "hard-only":
        add(method, evaluation.run_pq(config, [], hard_train, hard_test, settings, seed=seed, protocol="Hard-Only"))
    else:
        run = _teacher_run(bench, method, seed, out)
        teacher_info = run["info"]
        extra = {"meta": teacher_info["compute"]}
        synthetic = run["sampled"][: bench.synthetic_problems or len(run["sampled"])]
        if method in ("soar", "sb3", "alp-gmm"):
            pq = run["promoted"]
            note = "" if pq else "no promotion: trained on the teacher's sampled problems instead"
            result = evaluation.run_pq(config, pq or synthetic, hard_train, hard_test, settings, seed=seed,
                                       protocol="PQ")
            result.note = "; ".join(x for x in (result.note, note) if x)
            add("soar-pq" if method == "soar" else method, result, extra)
            if method == "soar":
                student = run["student"] or build_student(config)
                add("soar-ps", evaluation.run_ps(student, run["states"], hard_train, hard_test, settings, seed=seed,
                                                 config=config), extra)
                if pq:
                    grounded = evaluation.run_pq(config, synthetic, hard_train, hard_test, settings, seed=seed,
                                                 protocol="Grounded-T")
                else:  # SOAR PQ above already trained on exactly these problems with this seed
                    grounded = dataclasses.replace(result, protocol="Grounded-T",
                                                   note="same run as SOAR PQ (no promotion, so PQ = the sampled problems)")
                add("grounded", grounded, extra)
        else:
            add(method, evaluation.run_pq(config, synthetic, hard_train, hard_test, settings, seed=seed,
                                          protocol=ROW_NAMES[method]), extra)
    return save_job(out, bench, method, seed, rows, teacher_info)


def run_job_in_worker(bench: BenchConfig, method: str, seed: int) -> None:
    """Entry point of a worker process: its own torch threads, the job file is the result."""
    os.environ.setdefault("OMP_NUM_THREADS", str(bench.threads))
    try:
        run_job(bench, method, seed)
    except Exception as error:  # noqa: BLE001 - some exceptions do not survive pickling back to the parent
        raise RuntimeError(f"{type(error).__name__}: {error}") from None


# ---------------------------------------------------------------------------------------------
# Job files
# ---------------------------------------------------------------------------------------------


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
NOT_JOB_SETTINGS = ("methods", "seeds", "first_seed", "budget_minutes", "out", "threads", "workers", "plots",
                    "env_set", "teacher_set")
"""BenchConfig fields that do not decide a job's numbers (env_set and teacher_set do, through the
env and the teacher settings they resolve to)."""


def job_path(out: Path, method: str, seed: int) -> Path:
    """``OUT/jobs/METHOD-seedS.json``: one finished (method, seed) job."""
    return out / "jobs" / f"{method}-seed{seed}.json"


# Settings a method's job never reads: changing them keeps its finished jobs.
UNREAD_BY = {
    "base-student": ("teacher_steps", "pq_mode", "pq_max_steps", "synthetic_steps", "eval_every", "early_stop",
                     "pq_schedule", "heldout_size", "synthetic_problems", "analysis_questions"),
    "hard-only": ("teacher_steps", "synthetic_problems", "analysis_questions"),
    "base": ("teacher_steps",),
    "random": ("teacher_steps",),
}


def resolved_env(preset: str, overrides: dict[str, Any]) -> dict[str, Any]:
    """The env settings a job ran with: the preset as it is today plus ``overrides``, without the
    seed (the job's own) and scheduling (which never changes numbers)."""
    env = make_config(preset, **overrides).measured_settings()
    return {k: v for k, v in env.items() if k != "seed"}


LEGACY_SETTINGS = {"pq_schedule": "per-chunk", "heldout_size": 32,
                   "env": resolved_env("cpu", {"inner_steps": 4, "inner_steps_after_promotion": 6, "learning_rate": 2e-4,
                                       "hardset": "bundled", "eval_subset_size": 32,
                                       "grade_unfinished": True, "accept_unevaluated": True})}
"""Settings added after job files were first written, with the values those older jobs were
measured with (AdamW and cosine restarted every chunk, 32 hard-train problems held out, the cpu
preset before its retune: 4 inner steps, 6 after a promotion, lr 2e-4, the fail@16 hard set with
M = 32, cut-off replies and unevaluated answers read): such a job is kept only by a study that asks
for these values, e.g. benchmarks/results/compare-cpu with ``--env-set inner_steps=4,inner_steps_after_promotion=6,``
``learning_rate=2e-4,hardset=bundled,eval_subset_size=32,grade_unfinished=true,accept_unevaluated=true`` (and its
teachers' prompt with ``--teacher-set topics=...``, the ten families' topics; see `recorded_teacher`)."""


def teacher_record(config: TeacherConfig, env: EnvConfig) -> dict[str, Any]:
    """The teacher settings that change what a teacher writes beyond the env: the prompt's topics,
    the question form and the curriculum teachers' families ("target" resolved)."""
    return {"topics": config.topics, "question_form": config.question_form,
            "families": families_setting(config, env)}


def recorded_teacher(out: Path, method: str, seed: int) -> dict[str, Any] | None:
    """A job's `teacher_record` as its run's run_config.json saved it (jobs written before the job
    file recorded it); None without that file."""
    path = out / f"{method}-seed{seed}" / "run_config.json"
    if not path.is_file():
        return None
    saved = json.loads(path.read_text())
    return teacher_record(TeacherConfig(**saved_teacher_settings(saved)), EnvConfig(**saved["env"]))


def job_settings(bench: BenchConfig, method: str) -> dict[str, Any]:
    """The settings that decide what ``method``'s job measures."""
    skip = NOT_JOB_SETTINGS + UNREAD_BY.get(method, ())
    settings = {k: v for k, v in dataclasses.asdict(bench).items() if k not in skip}
    settings["env"] = resolved_env(bench.preset, bench.env_overrides())
    if method in TEACHER_OF:
        settings["teacher"] = teacher_record(make_teacher_config(bench.preset, **bench.teacher_overrides()),
                                             make_config(bench.preset, **bench.env_overrides()))
    return settings



def save_job(out: Path, bench: BenchConfig, method: str, seed: int, rows: dict[str, list[dict[str, Any]]],
             teacher: dict[str, Any] | None) -> dict[str, Any]:
    """One finished (method, seed) job, written atomically: a killed study loses only the job in flight."""
    path = job_path(out, method, seed)
    job = {"settings": job_settings(bench, method), "rows": rows, "teacher": teacher}
    atomic_write_text(path, json.dumps(job, indent=1) + "\n")
    return job


def load_job(out: Path, bench: BenchConfig, method: str, seed: int) -> dict[str, Any] | None:
    """A finished job of this study, or None; a job made with other settings is refused, never mixed in."""
    path = job_path(out, method, seed)
    if not path.is_file():
        return None
    job = json.loads(path.read_text())
    wanted = job_settings(bench, method)
    recorded = {**LEGACY_SETTINGS, **job["settings"]}
    if "teacher" in wanted and "teacher" not in recorded:
        recorded["teacher"] = recorded_teacher(out, method, seed) or wanted["teacher"]
    changed = sorted(k for k in wanted if k not in recorded or recorded[k] != wanted[k])
    if changed:
        raise ValueError(f"{path} was measured with other settings ({', '.join(changed)}); "
                         f"use another --out or delete it")
    return job
