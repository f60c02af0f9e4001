"""The benchmark scripts parse their options and run end to end on the tiny model (seconds)."""

from __future__ import annotations

import pytest

from benchmarks import student_learning, throughput

pytestmark = pytest.mark.usefixtures("one_thread")


TINY = ["--model", "tiny", "--problems", "1", "--group-size", "2", "--max-new-tokens", "4"]


@pytest.mark.parametrize("module", [throughput, student_learning])
def test_help(module, capsys):
    with pytest.raises(SystemExit) as exit_info:
        module.parse_args(["--help"])
    assert exit_info.value.code == 0
    assert "--model" in capsys.readouterr().out


def test_throughput_generation_runs_on_tiny():
    results = throughput.main([*TINY, "--runs", "1", "--warmup", "0", "--skip-steps"])
    generation = results["generation"]
    assert generation["ours"]["runs"] == generation["other"]["runs"] == 1
    assert generation["ours"]["raw_tokens"][0] > 0 and generation["other"]["raw_tokens"][0] > 0


def test_throughput_rloo_step_runs_on_tiny():
    pytest.importorskip("trl")
    pytest.importorskip("datasets")
    results = throughput.main([*TINY, "--runs", "1", "--warmup", "0", "--skip-generation"])
    step = results["step"]
    assert step["same_prompt_tokens"]
    assert step["ours_trainable"] == step["trl_trainable"]  # same LoRA on both sides
    assert step["ours"]["raw_tokens"][0] > 0 and step["other"]["raw_tokens"][0] > 0


def test_student_learning_checks_run_on_tiny():
    results = student_learning.main([
        "--model", "tiny", "--batch-size", "1", "--group-size", "2", "--max-new-tokens", "4",
        "--hard", "mul5", "--hard-steps", "1", "--det-steps", "1", "--skip", "curve",
    ])
    assert results["premise"]["skip"]["unchanged"] and results["premise"]["no_skip"]["unchanged"]
    determinism = results["determinism"]
    assert determinism["same_rewards"] and determinism["same_state"] and all(determinism["same_ids"])


def test_against_argv_drops_only_its_own_options():
    from benchmarks.against import strip_against

    argv = ["--preset", "cpu", "--against", "HEAD~1", "--runs=3", "--json", "x.json", "--against-schedule=concurrent",
            "--grid", "num_datasets=2"]
    assert strip_against(argv) == ["--preset", "cpu", "--grid", "num_datasets=2"]


def test_the_older_side_leaves_out_settings_its_library_lacks(monkeypatch, capsys):
    """A row may name a setting added since the other commit (at the value that reproduces it): that
    side runs without it and says so; our side keeps every setting, so a typo still fails there."""
    from benchmarks import against

    row = {"inner_steps": 4, "grade_unfinished": True, "no_such_setting": 1}
    monkeypatch.delenv(against.OLD_SIDE_ENV, raising=False)
    assert against.settings_for_this_library(row) == row
    monkeypatch.setenv(against.OLD_SIDE_ENV, "1")
    assert against.settings_for_this_library(row, known={"inner_steps", "hardset"}) == {"inner_steps": 4}
    assert "no setting grade_unfinished, no_such_setting: left out there" in capsys.readouterr().out


def test_env_step_time_against_a_commit_runs_both_trees(tmp_path):
    """--against times the same rows on another commit (here HEAD, exported) in separate processes,
    each side importing the library from its own tree (the harness from ours); the repository's
    worktrees are left as they were."""
    import subprocess

    from benchmarks import against, env_step_time

    try:
        against.git("rev-parse", "--verify", "HEAD")
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")
    worktrees = against.git("worktree", "list")
    out = tmp_path / "against.json"
    assert env_step_time.main(["--preset", "tiny", "--grid", "base", "--runs", "1", "--warmup", "0",
                               "--against", "HEAD", "--json", str(out)]) == 0
    import json

    report = json.loads(out.read_text())
    pairs = report["pairs"]
    assert len(pairs["ours"]) == len(pairs["theirs"]) == 1
    assert pairs["theirs"][0]["library_file"].endswith("theirs-library/soar_env")  # an export of HEAD, not ours
    assert pairs["ours"][0]["library_file"] == str(against.REPO / "soar_env")
    assert against.git("worktree", "list") == worktrees
    step = next(f for f in report["rows"][0]["figures"] if f["figure"] == "step s")
    assert step["ours"][0] > 0 and step["theirs"][0] > 0


def test_setting_overrides_parse_values_with_commas():
    """Benchmark rows and --set/--env-set: "a=1,b=x" pairs, typed values, and a comma inside a value
    (a family list) stays in that value."""
    from benchmarks.timing import parse_override

    assert parse_override("base") == {}
    assert parse_override("inner_steps=8,learning_rate=1e-3,lora=false,hardset=bundled") == {
        "inner_steps": 8, "learning_rate": 1e-3, "lora": False, "hardset": "bundled"}
    assert parse_override("hardset_families=addition,subtraction@2-3,eval_subset_size=32") == {
        "hardset_families": "addition,subtraction@2-3", "eval_subset_size": 32}
