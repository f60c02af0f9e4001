"""Which reward estimator sees grounded progress? A fixed panel of datasets x every estimator x runs.

    python -m benchmarks.reward_signal --preset cpu --runs 4 --out cpu       # the whole panel: many hours
    python -m benchmarks.reward_signal --preset cpu --datasets stones-mixed-*,controls --budget-minutes 120 --out probe
    python -m benchmarks.reward_signal --preset cpu --set inner_steps=8 --set estimator_samples=8 --out steps8
    python -m benchmarks.reward_signal --preset cpu --datasets stones-mixed-*,controls --downstream --out probe
    python -m benchmarks.reward_signal --preset tiny --runs 4 --out tiny      # smoke test, a minute

For each run index i (0 .. runs-1) one Q_R is drawn from hard train with seed i, and every
dataset of the panel (`benchmarks.reward_panel`) is trained on with training seed i, so the
datasets are compared paired by run:

1. **Baseline** (one job per run): the untrained student scored on Q_R by every estimator
   (`soar_env.estimators.score_qr`: greedy, sampled with the env's ``estimator_samples`` answers
   per problem, likelihood), with scoring seed ``EVAL_SEED + i``, the same for every state of the run.
2. **Dataset** (one job per dataset and run): a fresh student from the baseline weights is
   trained exactly like one inner run of the env (`Student.train` with the env's inner steps,
   batch, group and lr), then scored by every estimator on the same Q_R and seeds (trained
   once, scored three ways). A run whose weights did not change (an empty batch, all-zero
   advantages) has the baseline's scores, as in the env, and costs no scoring.
3. **Downstream** (``--downstream``; one job per dataset and downstream run): a fresh student
   trained ``downstream_factor`` x the inner steps on the dataset (one run, its own AdamW and
   cosine), then pass@k on the hard TEST split (`benchmarks.evaluation.test_pass_at_k`).

Every job is a file in ``ROOT/reward-signal-OUT/jobs/``, written atomically when it ends: a killed
or budget-limited study keeps its finished jobs and a re-run computes only the missing ones.
``settings.json`` records what decides the numbers (env settings after ``--set``, the teacher
preset and pool, downstream settings); a re-run with other settings into the same folder
is refused. The Base-T samples are drawn once into ``teacher_samples.json`` and reused. The
report (`benchmarks.reward_report`) is written to ``results.md`` and ``results.json`` and printed.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from benchmarks.reward_panel import PanelInputs, build_dataset, sample_teacher_pool, select_datasets
from benchmarks.reward_report import SettingsMismatch, collect, load_job, write_report
from benchmarks.timing import parse_override
from soar_env.atomic import atomic_write_text
from soar_env.config import PRESETS, EnvConfig, make_config
from soar_env.data.hardset import draw_eval_subset, hard_splits, load_hard_pool
from soar_env.estimators import REWARD_ESTIMATORS, QRScores, estimate, score_qr
from soar_env.options import add_dataclass_arguments, check_minimum, dataclass_from_args

RESULTS_ROOT = Path(__file__).resolve().parent / "results"
EVAL_SEED = 1_000_000
"""Scoring seed of run i is EVAL_SEED + i: apart from its training seed i, so no scored answer
shares a random stream with a training sample."""
FORMAT = 2
"""Version of the job files; a change to what a job measures bumps it. 2: the likelihood
estimator's decoys are the answers with every digit shifted (1: another Q_R answer)."""


@dataclass
class SignalConfig:
    """Settings of one reward-signal study."""

    preset: str = "cpu"
    """Env and teacher preset: tiny (seconds), cpu (SmolLM2-135M on this CPU) or paper; --set changes
    single settings."""
    datasets: str = "all"
    """Comma-separated panel datasets: all, stones, controls, a name, or a prefix ending in * (stones-mixed-*)."""
    runs: int = 4
    """Run indices 0 .. runs-1: run i draws Q_R with seed i and trains every dataset with seed i."""
    teacher_pool: int | None = None
    """Base-T problems sampled once into the results folder; each run draws n of them (default: 4 x n)."""
    downstream: bool = False
    """Also run the downstream jobs: each dataset's value to a fresh student tested on hard test."""
    downstream_factor: int = 3
    """Downstream students train this many times the env's inner steps on the dataset."""
    downstream_runs: int = 1
    """Downstream jobs per dataset (runs 0 .. downstream_runs-1; the value is their mean)."""
    downstream_samples: int = 32
    """Sampled solutions per hard-test problem of a downstream student (pass@k for k <= this)."""
    downstream_test_size: int | None = None
    """Hard-test problems a downstream student is tested on (None: all)."""
    budget_minutes: float | None = None
    """Stop starting new jobs after this much wall time; the skipped ones are listed."""
    out: str = "cpu"
    """Name of the study: its folder is ROOT/reward-signal-OUT."""
    root: str = str(RESULTS_ROOT)
    """Folder the study's folder goes in."""
    threads: int = 1
    """Torch CPU threads (1 is fastest on a busy machine)."""
    overrides: dict[str, Any] = field(default_factory=dict)
    """Env settings over the preset (--set name=value)."""

    def __post_init__(self) -> None:
        if self.preset not in PRESETS:
            raise ValueError(f"unknown preset {self.preset!r}; valid: {', '.join(PRESETS)}")
        check_minimum(self, ("runs", "downstream_factor", "downstream_runs", "downstream_samples",
                             "threads"), 1, integer=True)
        check_minimum(self, ("teacher_pool", "downstream_test_size"), 1, integer=True, optional=True)
        if not self.out or "/" in self.out or self.out.startswith("."):
            raise ValueError(f"--out is a name (the folder is ROOT/reward-signal-NAME), got {self.out!r}")
        self.dataset_list = select_datasets(self.datasets)
        self.env_config()  # an unknown or invalid --set fails here, before anything runs

    def env_config(self) -> EnvConfig:
        return make_config(self.preset, **self.overrides)

    @property
    def folder(self) -> Path:
        return Path(self.root) / f"reward-signal-{self.out}"

    def recorded_settings(self) -> dict[str, Any]:
        """What decides a finished job's numbers; a folder's jobs are only mixed with jobs made with these."""
        from agents.teacher_config import make_teacher_config  # lazy: `--help` stays fast

        env = self.env_config()
        env_settings = env.measured_settings()
        return {"format": FORMAT, "preset": self.preset, "env": env_settings, "estimators": list(REWARD_ESTIMATORS),
                "eval_seed": EVAL_SEED,
                "teacher": make_teacher_config(self.preset).to_dict(),
                "teacher_pool": self.teacher_pool or 4 * env.problems_per_dataset,
                "downstream_factor": self.downstream_factor, "downstream_samples": self.downstream_samples,
                "downstream_test_size": self.downstream_test_size}


def check_settings(folder: Path, settings: dict[str, Any]) -> str:
    """Record ``settings`` in a new folder, or refuse a folder measured with others; returns their digest."""
    text = json.dumps(settings, sort_keys=True, default=str)
    digest = hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]
    path = folder / "settings.json"
    if path.is_file():
        recorded = json.loads(path.read_text())
        if recorded.get("digest") != digest:
            old = recorded.get("settings", {})
            changed = sorted(_changed(old, json.loads(text)))
            raise SettingsMismatch(f"{folder} holds a study made with other settings (changed: {', '.join(changed)}); "
                             f"use another --out or delete the folder")
        return digest
    atomic_write_text(path, json.dumps({"digest": digest, "settings": json.loads(text)}, indent=1) + "\n")
    return digest


def _changed(old: Any, new: Any, prefix: str = "") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        return [c for key in sorted(set(old) | set(new))
                for c in _changed(old.get(key), new.get(key), f"{prefix}{key}.")]
    return [] if old == new else [prefix.rstrip(".")]


def job_path(folder: Path, kind: str, run: int, dataset: str = "") -> Path:
    """``jobs/baseline-runI.json``, ``jobs/DATASET-runI.json`` or ``jobs/downstream-DATASET-runI.json``."""
    name = {"baseline": "baseline", "scores": dataset, "downstream": f"downstream-{dataset}"}[kind]
    return folder / "jobs" / f"{name}-run{run}.json"


def scores_from(job: dict[str, Any]) -> dict[str, QRScores]:
    return {name: QRScores.from_dict(entry) for name, entry in job["scores"].items()}


class Study:
    """The jobs of one study: the student, Q_R per run, the panel's inputs, loaded when first needed."""

    def __init__(self, cfg: SignalConfig, student_factory: Callable[[EnvConfig], Any] | None = None) -> None:
        self.cfg = cfg
        self.config = cfg.env_config()
        self.folder = cfg.folder
        self.folder.mkdir(parents=True, exist_ok=True)
        self.digest = check_settings(self.folder, cfg.recorded_settings())
        self.student_factory = student_factory
        self._student: Any = None
        self._pool: list[Any] | None = None
        self.hard_pool = load_hard_pool(self.config)  # the side Q_R is drawn from (train)
        self.hard_test = hard_splits(self.config)[1]

    @property
    def student(self) -> Any:
        if self._student is None:
            import torch

            torch.set_num_threads(self.cfg.threads)
            if self.student_factory is None:
                from soar_env.student import build_student as factory
            else:
                factory = self.student_factory
            self._student = factory(self.config)
        return self._student

    def q_r(self, run: int) -> list[Any]:
        """Q_R of run ``run``: M hard-train problems drawn with seed ``run``, as the env draws them."""
        return draw_eval_subset(self.hard_pool, self.config.eval_subset_size, np.random.default_rng(run))

    def teacher_problems(self) -> list[Any]:
        """The Base-T pool: read from ``teacher_samples.json``, sampled and stored the first time."""
        if self._pool is None:
            from soar_env.problems import Problem

            path = self.folder / "teacher_samples.json"
            if not path.is_file():
                size = self.cfg.teacher_pool or 4 * self.config.problems_per_dataset
                problems, info = sample_teacher_pool(self.config, self.cfg.preset, size)
                if not problems:
                    raise RuntimeError(f"the {self.cfg.preset} teacher wrote no valid problem in {info['drawn']} tries")
                atomic_write_text(path, json.dumps({"info": info, "problems": [p.to_dict() for p in problems]},
                                                   indent=1) + "\n")
            self._pool = [Problem.from_dict(row) for row in json.loads(path.read_text())["problems"]]
        return self._pool

    def dataset(self, name: str, run: int) -> list[Any]:
        pool = self.teacher_problems() if name == "base-teacher" else None
        inputs = PanelInputs(self.config.problems_per_dataset, self.hard_pool, pool)
        return build_dataset(name, run, self.q_r(run), inputs)

    def score(self, q_r: list[Any], run: int, state: Any) -> dict[str, QRScores]:
        """Every estimator's scores of ``state`` (None: the baseline) on Q_R with run ``run``'s seed."""
        config = self.config
        return {name: score_qr(self.student, q_r, name, samples=config.estimator_samples if name == "sampled" else 1,
                               max_new_tokens=config.eval_tokens, seed=EVAL_SEED + run, state=state)
                for name in REWARD_ESTIMATORS}

    # -- the three job kinds -------------------------------------------------------------------

    def baseline_job(self, run: int) -> dict[str, Any]:
        q_r = self.q_r(run)
        scores = self.score(q_r, run, None)
        return {"q_r": [p.id for p in q_r], "scores": {k: v.to_dict() for k, v in scores.items()}}

    def scores_job(self, dataset: str, run: int) -> dict[str, Any]:
        from soar_env.runs import same_state

        baseline = load_job(job_path(self.folder, "baseline", run), self.digest)
        if baseline is None:
            raise RuntimeError(f"run {run} has no baseline job")
        q_r, problems, config = self.q_r(run), self.dataset(dataset, run), self.config
        student = self.student
        trained = student.train(problems, steps=config.inner_steps, batch_size=config.batch_size,
                                group_size=config.group_size, seed=run)
        state = getattr(trained, "state", None)
        unchanged = state is None or same_state(state, student.baseline_state())
        base_scores = scores_from(baseline)
        # Unchanged weights answer exactly as the baseline did (same seeds): the env does not score them either.
        scores = base_scores if unchanged else self.score(q_r, run, state)
        rewards = [float(r) for r in getattr(trained, "rewards", [])]
        return {"size": len(problems), "problems": [p.id for p in problems], "q_r": [p.id for p in q_r],
                "train": {"steps": int(getattr(trained, "steps_done", 0)),
                          "seconds": float(getattr(trained, "seconds", 0.0)),
                          "tokens": int(getattr(trained, "tokens", 0)), "error": getattr(trained, "error", None),
                          "mean_reward": float(np.mean(rewards)) if rewards else None},
                "unchanged": bool(unchanged),
                "scores": {k: v.to_dict() for k, v in scores.items()},
                "estimates": {k: estimate(k, base_scores[k], scores[k]) for k in REWARD_ESTIMATORS}}

    def downstream_job(self, dataset: str, run: int) -> dict[str, Any]:
        from benchmarks.evaluation import EvalConfig, test_pass_at_k

        config, cfg = self.config, self.cfg
        problems = self.dataset(dataset, run)
        steps = cfg.downstream_factor * config.inner_steps
        trained = self.student.train(problems, steps=steps, batch_size=config.batch_size,
                                     group_size=config.group_size, seed=run)
        settings = EvalConfig(samples=cfg.downstream_samples, test_size=cfg.downstream_test_size, max_steps=steps)
        t0 = time.perf_counter()
        scores, test = test_pass_at_k(self.student, self.hard_test, settings, seed=EVAL_SEED + run,
                                      state=getattr(trained, "state", None), max_new_tokens=config.eval_tokens)
        return {"size": len(problems), "steps": int(getattr(trained, "steps_done", 0)),
                "train_seconds": float(getattr(trained, "seconds", 0.0)), "test_seconds": time.perf_counter() - t0,
                "error": getattr(trained, "error", None), "samples": settings.samples,
                "pass_at_k": {str(k): float(v) for k, v in scores.items()}, "correct": list(test.correct)}


def plan(cfg: SignalConfig) -> list[tuple[str, str, int]]:
    """(kind, dataset, run) of every job, run-major so that a cut-short study holds whole runs."""
    jobs = []
    for run in range(cfg.runs):
        jobs.append(("baseline", "", run))
        jobs.extend(("scores", name, run) for name in cfg.dataset_list)
    if cfg.downstream:
        jobs.extend(("downstream", name, run) for run in range(cfg.downstream_runs) for name in cfg.dataset_list)
    return jobs


def run_study(cfg: SignalConfig, student_factory: Callable[[EnvConfig], Any] | None = None,
              command: str | None = None) -> dict[str, Any]:
    """Every missing job within the budget, then the report; returns the report's results."""

    study = Study(cfg, student_factory)
    started = time.perf_counter()
    skipped: list[str] = []
    failed: dict[str, str] = {}
    for kind, dataset, run in plan(cfg):
        path = job_path(study.folder, kind, run, dataset)
        label = f"{kind} {dataset} run {run}".replace("  ", " ")
        if load_job(path, study.digest) is not None:
            continue
        if cfg.budget_minutes is not None and (time.perf_counter() - started) / 60 > cfg.budget_minutes:
            skipped.append(path.stem)
            continue
        t0 = time.perf_counter()
        try:
            if kind == "baseline":
                job = study.baseline_job(run)
            elif kind == "scores":
                job = study.scores_job(dataset, run)
            else:
                job = study.downstream_job(dataset, run)
        except Exception as error:  # noqa: BLE001 - one broken job must not cost the others
            failed[path.stem] = f"{type(error).__name__}: {error}"
            print(f"[{time.perf_counter() - started:6.0f}s] {label}: FAILED ({failed[path.stem]})", flush=True)
            continue
        job.update(kind=kind, dataset=dataset, run=run, digest=study.digest, seconds=time.perf_counter() - t0)
        atomic_write_text(path, json.dumps(job, indent=1) + "\n")
        estimates = job.get("estimates") or job.get("pass_at_k") or {}
        print(f"[{time.perf_counter() - started:6.0f}s] {label}: "
              + " ".join(f"{k} {v:+.4f}" for k, v in estimates.items()) + f" ({job['seconds']:.0f} s)", flush=True)
    return write_report(cfg, collect(cfg, study.folder, study.digest), skipped, failed, command=command)


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.reward_signal", description=__doc__.split("\n\n")[0])
    add_dataclass_arguments(parser, SignalConfig, skip=("overrides",))
    parser.add_argument("--set", action="append", default=[], metavar="SETTING=VALUE",
                        help="an env setting over the preset, e.g. --set inner_steps=8 (repeatable)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    overrides: dict[str, Any] = {}
    for text in args.set:
        if "=" not in text:
            raise SystemExit(f"--set needs SETTING=VALUE, got {text!r}")
        overrides.update(parse_override(text))
    try:
        cfg = dataclass_from_args(SignalConfig, args)
        cfg = dataclasses.replace(cfg, overrides=overrides)
    except ValueError as error:
        raise SystemExit(f"reward_signal: {error}") from None
    command = "python -m benchmarks.reward_signal " + " ".join(sys.argv[1:] if argv is None else argv)
    try:
        results = run_study(cfg, command=command)
    except SettingsMismatch as error:
        raise SystemExit(f"reward_signal: {error}") from None
    print(results["markdown"])
    print(f"wrote {cfg.folder / 'results.md'} and results.json")
    for job, error in results["failed"].items():
        print(f"failed: {job}: {error}", file=sys.stderr)
    return 1 if results["failed"] else 0


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    sys.exit(main())
