"""`soar train`: every option documented, bad values refused before any model loads, module:Class teachers."""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from agents.run_dir import TRAINER_FILE
from agents.train import RUN_CONFIG, plan_run
from soar_env import cli
from soar_env.models.policy import LMPolicy

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    previous = torch.get_num_threads()
    yield
    torch.set_num_threads(previous)  # --threads 1 below sets it for this process


def train_parser():
    parser = cli.build_parser()
    commands = next(a for a in parser._actions if a.dest == "command")
    return commands.choices["train"]


def test_every_option_has_help_text():
    parser = train_parser()
    options = [a for a in parser._actions if a.option_strings and a.dest != "help"]
    assert len(options) > 60  # run + teacher + every EnvConfig field
    for action in options:
        text = (action.help or "").split(" (default")[0].strip()
        assert len(text) > 10, f"{action.option_strings} has no help text"
    flags = {flag for a in options for flag in a.option_strings}
    for flag in ("--teacher", "--preset", "--steps", "--run-dir", "--resume", "--teacher-lr", "--teacher-prefill",
                 "--repeats", "--num-datasets", "--problems-per-dataset", "--reward-mode", "--student-model"):
        assert flag in flags
    assert "train" in cli.build_parser().format_help()


@pytest.fixture
def no_model(monkeypatch):
    """Every model goes through LMPolicy; building one here fails the test."""
    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the bad option was reported")

    monkeypatch.setattr(LMPolicy, "__init__", refuse)
    monkeypatch.setattr("soar_env.envs.core.build_student", refuse)
    monkeypatch.setattr("agents.rloo_teacher.tiny_format_model", refuse)


BAD = [
    (["--preset", "laptop"], "unknown preset 'laptop'"),
    (["--teacher", "genius"], "unknown teacher 'genius'"),
    (["--teacher", "no_such_module_xyz:Teacher"], "cannot import the teacher module"),
    (["--teacher", "examples.my_teacher:NoSuchTeacher"], "has no 'NoSuchTeacher'"),
    (["--teacher", "soar_env.problems:Problem"], "is not a teacher"),
    (["--steps", "0"], "steps must be an integer >= 1"),
    (["--checkpoint-every", "0"], "checkpoint_every must be >= 1"),
    (["--repeats", "0"], "repeats must be an integer >= 1"),
    (["--reward-mode", "vibes"], "reward_mode must be one of"),
    (["--teacher-prefill", "sideways"], "prefill must be one of"),
    (["--teacher-lr", "-1"], "lr must be > 0"),
    (["--teacher-max-attempts", "0.5"], "max_attempts must be >= 1"),
    (["--teacher-families", "addition,calculus"], "unknown families ['calculus']"),
    (["--hardset", "/no/such/hard.jsonl"], "no file at"),
    (["--student-model", "./no/such/model"], "does not exist"),
    (["--teacher", "intrinsic", "--reward-mode", "grounded"], "learnability"),
]


@pytest.mark.parametrize("argv,message", BAD, ids=[" ".join(a) for a, _ in BAD])
def test_bad_values_fail_fast_without_loading_a_model(argv, message, no_model, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(REPO)
    start = time.perf_counter()
    code = cli.main(["train", "--preset", "tiny", "--run-dir", str(tmp_path / "run"), *argv])
    seconds = time.perf_counter() - start
    assert code == 2
    assert message in capsys.readouterr().err
    assert seconds < 10
    assert not (tmp_path / "run").exists()  # nothing written either


@pytest.mark.parametrize("argv", [["--repeats", "many"], ["--teach", "rloo"], ["--no-such-option"]])
def test_malformed_options_are_argparse_errors(argv, no_model):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["train", *argv])
    assert exit_info.value.code == 2


def test_resume_and_run_dir_mistakes_fail_fast(no_model, tmp_path, capsys):
    assert cli.main(["train", "--resume", str(tmp_path / "nowhere")]) == 2
    assert "run_config.json" in capsys.readouterr().err
    (tmp_path / "taken" / "checkpoints" / "step_000001").mkdir(parents=True)
    (tmp_path / "taken" / "checkpoints" / "step_000001" / "trainer.json").write_text("{}")
    assert cli.main(["train", "--preset", "tiny", "--run-dir", str(tmp_path / "taken")]) == 2
    assert "--resume" in capsys.readouterr().err


def test_a_user_teacher_runs_from_the_command_line(tmp_path, monkeypatch, capsys):
    # Only the current directory makes examples/ importable: the CLI must add it to sys.path.
    monkeypatch.chdir(REPO)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(REPO))])
    for name in [m for m in sys.modules if m == "examples" or m.startswith("examples.")]:
        monkeypatch.delitem(sys.modules, name)
    run_dir = tmp_path / "mine"
    code = cli.main(["train", "--teacher", "examples.my_teacher:MyTeacher", "--preset", "tiny", "--steps", "2",
                     "--run-dir", str(run_dir), "--no-progress", "--threads", "1", "--eval-train-size", "3"])
    assert code == 0
    out = capsys.readouterr().out
    assert "soar train summary (examples.my_teacher:MyTeacher, preset tiny)" in out
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == 2 and len(summary["reward_trajectory"]) == 2
    assert summary["student_accuracy"]["hard_train"]["problems"] == 3
    # The generated hard pool is split like any other: its test half (16 of 32) is measured, never Q_R.
    assert summary["student_accuracy"]["hard_test"]["problems"] == 16
    assert summary["student_accuracy"]["hard_test"]["before"] is not None
    rows = list(csv.DictReader((run_dir / "progress.csv").open()))
    assert [r["step"] for r in rows] == ["1", "2"] and "teacher/level" in rows[0]
    for name in ("run_config.json", "eval_before.json", "pq.jsonl", "checkpoints/step_000002/teacher.pt",
                 "checkpoints/step_000002/env.pt", "checkpoints/step_000002/trainer.json"):
        assert (run_dir / name).is_file(), name
    assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    saved = json.loads((run_dir / "run_config.json").read_text())
    assert saved["train"]["teacher"] == "examples.my_teacher:MyTeacher" and saved["env"]["student_model"] == "tiny"


def test_soar_train_on_ray_starts_its_own_cluster(tmp_path):
    """`--backend ray` in a fresh process: the code itself starts a local Ray and trains on 2 workers."""
    pytest.importorskip("ray")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    run_dir = tmp_path / "run"
    done = subprocess.run(
        [sys.executable, "-m", "soar_env.cli", "train", "--preset", "tiny", "--steps", "1", "--no-progress",
         "--threads", "1", "--eval-train-size", "2", "--backend", "ray", "--ray-workers", "2",
         "--run-dir", str(run_dir)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == 1 and len(summary["reward_trajectory"]) == 1
    assert "Started a local Ray instance" in done.stderr + done.stdout


def write_older_run(run_dir, plan, teacher_config: dict) -> None:
    """A run dir with one checkpoint whose run_config.json saved ``teacher_config`` (an older run's)."""
    saved = {"train": dataclasses.asdict(plan.train), "env": plan.env.to_dict(), "teacher_config": teacher_config}
    (run_dir / "checkpoints" / "step_000001").mkdir(parents=True)
    (run_dir / "checkpoints" / "step_000001" / TRAINER_FILE).write_bytes(b"")  # planning reads only its name
    (run_dir / RUN_CONFIG).write_text(json.dumps(saved))


def test_a_resumed_run_from_before_micro_batching_updates_in_micro_batches(tmp_path):
    """Its run_config.json says micro_batch_size None (one pass, 17.5 GB at the cpu preset): memory-only, so the default wins."""
    run_dir = tmp_path / "run"
    plan = plan_run({"teacher": "rloo", "preset": "tiny", "steps": 2, "run_dir": str(run_dir)}, {}, {})
    write_older_run(run_dir, plan, {**plan.teacher_config.to_dict(), "micro_batch_size": None, "lr": 0.123})
    resumed = plan_run({"teacher": "rloo", "preset": "tiny", "steps": 2, "resume": str(run_dir)}, {}, {})
    assert resumed.resuming and resumed.teacher_config.micro_batch_size == 8
    assert resumed.teacher_config.lr == 0.123  # every other saved setting is kept


@pytest.mark.parametrize("batched", [False, True])
def test_the_progress_bar_moves_inside_a_step(tmp_path, capsys, batched):
    code = cli.main(["train", "--teacher", "random", "--preset", "tiny", "--steps", "1", "--run-dir",
                     str(tmp_path / "run"), "--threads", "1", "--eval-train-size", "3", "--inner-steps", "2",
                     "--batch-runs" if batched else "--no-batch-runs"])
    assert code == 0
    err = capsys.readouterr().err
    # The nested student bar of the tiny preset's g x r = 2 x 2 runs: baseline, then each inner RLOO step,
    # run after run, or all four runs at once when they are batched.
    assert "student" in err and "baseline eval" in err
    if batched:
        assert "4/8, runs 4/4, inner step 1/2" in err and "8/8, runs 4/4, inner step 2/2" in err
    else:
        assert "runs 1/4, inner step 1/2" in err and "runs 4/4, inner step 2/2" in err
    assert "8/8" in err and "run ETA" in err and "step ETA" in err


@pytest.mark.parametrize("teacher", ["random", "alp-gmm"])
def test_curriculum_teachers_draw_from_the_families_of_the_hard_set(teacher, tmp_path):
    """families="target" (the default): the cpu preset's hard set (bundled-edge) holds addition,
    subtraction and multiplication only, so those are the teacher's box, as its LLM teacher's prompt
    names those topics; "all" and a list of names override it."""
    from agents.train import build_teacher
    from soar_env.data.generators import FAMILIES

    def built(teacher_overrides, env_overrides):
        options = {"teacher": teacher, "preset": "cpu", "steps": 1, "run_dir": str(tmp_path / "run")}
        return build_teacher(plan_run(options, teacher_overrides, env_overrides))

    edge = ("addition", "subtraction", "multiplication")
    target = built({}, {})
    assert target.families == edge
    assert {p.source for batch in target.propose(4, 8) for p in batch} <= {f"generator:{f}" for f in edge}
    assert all(name in plan_run({"teacher": teacher, "preset": "cpu"}, {}, {}).teacher_config.topics for name in edge)
    assert built({}, {"hardset": "bundled"}).families == FAMILIES  # the fail@16 set spans all ten
    assert built({"families": "all"}, {}).families == FAMILIES
    assert built({"families": "gcd_lcm, modular"}, {}).families == ("gcd_lcm", "modular")


def test_a_set_no_generator_made_leaves_the_curriculum_teachers_all_families(tmp_path):
    from soar_env.config import make_config
    from soar_env.data.hardset import target_families
    from soar_env.data.loaders import save_jsonl
    from soar_env.problems import Problem

    path = tmp_path / "hard.jsonl"
    save_jsonl([Problem(question=f"What is {i}!?", answer=str(i), source="math500") for i in range(1, 9)], path)
    assert target_families(make_config("cpu", hardset=str(path))) is None
    assert target_families(make_config("cpu")) == ("addition", "subtraction", "multiplication")


def test_a_resumed_run_from_before_the_families_setting_keeps_all_ten(tmp_path):
    run_dir = tmp_path / "run"
    plan = plan_run({"teacher": "random", "preset": "tiny", "steps": 2, "run_dir": str(run_dir)}, {}, {})
    write_older_run(run_dir, plan, {k: v for k, v in plan.teacher_config.to_dict().items() if k != "families"})
    resumed = plan_run({"teacher": "random", "preset": "tiny", "steps": 2, "resume": str(run_dir)}, {}, {})
    assert plan.teacher_config.families == "addition,multiplication"  # "target", resolved for run_config.json
    assert resumed.teacher_config.families == "all"
    again = plan_run({"teacher": "random", "preset": "tiny", "steps": 2, "resume": str(run_dir)}, {"families": "all"}, {})
    assert again.teacher_config.families == "all"  # asking for what the old run did is no conflict
