"""The benchmark scripts parse their options and run end to end on the tiny model (seconds)."""

from __future__ import annotations

import pytest
import torch

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
