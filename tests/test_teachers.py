"""Teachers: the protocol, every reference teacher, RLOO updates, rejection sampling, callbacks, logging.

Most tests drive the vector env with a scripted student (`agents.testing.scripted_vector_env`):
rewards are known and a step takes milliseconds. The LLM teachers use the tiny preset's
"tiny-format" model (the tiny random Llama taught the output format in-process).
"""

from __future__ import annotations

import csv
import importlib.util
import json
import math
import sys
import warnings
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
import torch

import soar_env  # noqa: F401 - registers the env ids
from agents import (
    ALPGMMTeacher,
    BaseTeacher,
    HardOnlyTeacher,
    IntrinsicTeacher,
    Logger,
    RandomTeacher,
    RLOOTeacher,
    SB3Teacher,
    StopAfterPromotions,
    Teacher,
    checkpoint_dirs,
    latest_checkpoint,
    make_teacher_config,
    run_learning,
)
from agents.rloo_teacher import build_rollout
from agents.teacher_sampling import Draft, TeacherSampler, assemble_two_stage
from soar_env.verify.extract import text_before_closing_brace as close_box
from agents.testing import (
    INVALID_PROBLEM,
    WRONG_BATCH_COUNT,
    TeacherConformanceError,
    check_teacher,
    scripted_vector_env,
)
from soar_env.config import PRESETS
from soar_env.problems import Problem, Rejection, to_problem
from soar_env.rl import rloo_advantages

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # examples/ is importable from the repository root
from examples.my_teacher import MyTeacher  # noqa: E402


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_config(**overrides):
    return make_teacher_config("tiny", seed=0, lora=True, lora_rank=4, lora_alpha=8, **overrides)


TEACHERS = {
    "random": lambda: RandomTeacher(seed=0),
    "hard-only": lambda: HardOnlyTeacher(seed=0),
    "my-teacher": lambda: MyTeacher(seed=0),
    "sb3": lambda: SB3Teacher(n_steps=2, seed=0),
    "alp-gmm": lambda: ALPGMMTeacher(fit_every=2, bootstrap=2, seed=0),
    "base": lambda: BaseTeacher(tiny_config()),
    "rloo": lambda: RLOOTeacher(tiny_config()),
}


def params(teacher: RLOOTeacher) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in teacher.policy.state_dict_trainable().items()}


def changed(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> bool:
    return any(not torch.equal(before[k], after[k]) for k in before)


# ---------------------------------------------------------------------------------------------
# Every teacher: valid proposals, learn(), checkpoint and exact resume (the conformance check)
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(TEACHERS))
def test_every_teacher_passes_the_conformance_check(name):
    # propose(g, n) gives valid problems, update takes env rewards, state round-trips,
    # resume is exact, learn() runs 2 steps, checkpoints and resumes to step 3.
    check_teacher(TEACHERS[name])


@pytest.mark.parametrize("name", list(TEACHERS))
def test_every_teacher_proposes_g_batches_of_valid_problems(name):
    env = scripted_vector_env(num_datasets=3, problems_per_dataset=4)
    teacher = TEACHERS[name]()
    teacher.setup(env, 1)
    obs, _ = env.reset(seed=0)
    teacher.observe(obs)
    batches = teacher.propose(3, 4)
    assert len(batches) == 3
    for batch in batches:
        assert 1 <= len(batch) <= 4
        assert all(isinstance(to_problem(entry), Problem) for entry in batch)
    if name in ("random", "hard-only", "my-teacher", "sb3", "alp-gmm"):
        assert all(len(batch) == 4 for batch in batches)  # no rejection possible


def test_intrinsic_teacher_learns_on_the_learnability_reward_and_refuses_the_grounded_one():
    with pytest.raises(ValueError, match="learnability"):
        run_learning(IntrinsicTeacher(tiny_config()), scripted_vector_env(), 1, progress_bar=False)
    envs = scripted_vector_env(reward_mode="learnability")
    teacher = IntrinsicTeacher(tiny_config())
    logger = run_learning(teacher, envs, 1, progress_bar=False, logger=Logger(None, writers=()))
    row = logger.history[-1]
    assert row["step"] == 1 and 0.0 <= row["teacher/reward_mean"] <= 1.0
    assert IntrinsicTeacher.env_overrides == {"reward_mode": "learnability"}


def test_learn_drives_the_real_tiny_vector_env_and_a_single_env(tmp_path):
    envs = gym.make_vec("SOAR-MATH-v0", num_envs=2, preset="tiny")
    teacher = RLOOTeacher(make_teacher_config("tiny"))
    teacher.learn(envs, 1, run_dir=tmp_path / "vector", progress_bar=False)
    assert teacher.num_steps == 1
    # The teacher took the env's LoRA setting (tiny preset: rank 4) and its student model family.
    assert teacher.policy.lora is not None and teacher.policy.lora.r == 4
    rows = list(csv.DictReader((tmp_path / "vector" / "progress.csv").open()))
    assert [int(r["step"]) for r in rows] == [1]
    for key in ("teacher/reward_mean", "teacher/reward_average", "teacher/promotions", "teacher/acceptance_rate",
                "student/baseline_accuracy", "student/tokens", "teacher/tokens", "time/step_seconds"):
        assert key in rows[0], key
    assert list((tmp_path / "vector" / "tensorboard").glob("events.out.tfevents.*"))
    assert (tmp_path / "vector" / "pq.jsonl").is_file()

    env = gym.make("SOAR-MATH-v0", preset="tiny")
    RandomTeacher(seed=0, difficulty=1).learn(env, 2, run_dir=tmp_path / "single", progress_bar=False)
    checkpoint = latest_checkpoint(tmp_path / "single")
    assert checkpoint.name == "step_000002" and (checkpoint / "env.pt").is_file()


# ---------------------------------------------------------------------------------------------
# RLOOTeacher: the update, its layout, rejection sampling, prefill modes
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def rloo_teacher():
    teacher = RLOOTeacher(tiny_config())
    teacher._ensure_updater(10)
    return teacher


def test_rloo_parameters_change_with_unequal_rewards_and_not_with_equal_ones(rloo_teacher):
    teacher = rloo_teacher
    teacher.propose(2, 3)
    before = params(teacher)
    stats = teacher.update(np.array([0.0, 0.0]), [])
    assert stats["update_skipped"] == 1.0
    assert not changed(before, params(teacher))

    teacher.propose(2, 3)
    stats = teacher.update(np.array([0.02, -0.04]), [])
    assert stats["update_skipped"] == 0.0 and stats["grad_norm"] > 0
    assert changed(before, params(teacher))
    # The optimizer stepped once; the skipped update still used its slot of the schedule.
    assert teacher.updater.steps_done == 2 and teacher.totals["updates"] == 1


def test_update_without_a_proposal_is_an_error(rloo_teacher):
    rloo_teacher._pending = None
    with pytest.raises(RuntimeError, match="propose"):
        rloo_teacher.update(np.array([0.1, 0.0]), [])


def test_every_output_of_dataset_k_gets_advantage_a_k():
    # 3 datasets x 2 problems, two-stage drafts, one cut before stage 2.
    def draft(k, i, stages=2):
        rows = [([1, 2], [10 + k, i])] + ([([1, 2, 3], [20 + k])] if stages == 2 else [])
        return Draft(text=f"X{k}-{i}", result=Rejection("x"), rows=rows)

    datasets = [[draft(0, 0), draft(0, 1)], [draft(1, 0, stages=1), draft(1, 1)], [draft(2, 0), draft(2, 1)]]
    rewards = np.array([0.03, -0.01, 0.01])
    rollout, row_rewards, group_size = build_rollout(datasets, rewards)
    assert len(rollout) == 2 * 2 * 3 and group_size == 3  # problems x stages x g
    advantages = rloo_advantages(torch.tensor(row_rewards).view(-1, 3)).view(-1)
    expected = {k: rewards[k] - np.mean(np.delete(rewards, k)) for k in range(3)}
    for row, advantage in enumerate(advantages.tolist()):
        k = int(rollout.texts[row][1])
        assert math.isclose(advantage, expected[k], rel_tol=1e-5, abs_tol=1e-7)
    groups = [rollout.prompt_index[i:i + 3] for i in range(0, len(rollout), 3)]
    assert all(len(set(g)) == 1 for g in groups)
    # The draft cut before stage 2 has an empty stage-2 row: no token, no gradient.
    assert rollout.completion_ids[3 + 1] == []


def test_rejection_sampling_stops_at_its_budget_and_proposes_only_valid_problems(monkeypatch):
    teacher = RLOOTeacher(tiny_config(max_attempts=2.5))
    calls = []

    def never_valid(self, count, seed):
        calls.append(count)
        return [Draft(text="no tags", result=Rejection("missing_question_tag"), rows=[([1], [5, 6])])
                for _ in range(count)]

    monkeypatch.setattr(TeacherSampler, "sample", never_valid)
    monkeypatch.setattr(RLOOTeacher, "sampler", property(lambda self: TeacherSampler.__new__(TeacherSampler)))
    with pytest.warns(RuntimeWarning, match="only 0 of 8 problems were valid"):
        batches = teacher.propose(2, 4)
    metrics = teacher.pop_metrics()
    assert sum(calls) == math.ceil(2.5 * 2 * 4) == 20
    assert batches == [[], []]  # the env only ever sees valid problems
    assert metrics["teacher/bound_hit"] == 1.0 and metrics["teacher/acceptance_rate"] == 0.0
    assert metrics["teacher/problems_short"] == 8.0 and metrics["teacher/empty_datasets"] == 2.0
    assert metrics["teacher/rejected/missing_question_tag"] == 20.0
    assert teacher.last_drafts() == [[], []]  # rejected outputs get no gradient (tests/test_teacher_budget.py)


def test_rejection_sampling_with_a_random_model_ends_and_records_the_shortfall():
    teacher = RLOOTeacher(tiny_config(model="tiny", max_attempts=1.5))  # random weights: no format
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the budget warning (tests/test_teacher_budget.py)
        batches = teacher.propose(2, 2)
    metrics = teacher.pop_metrics()
    assert metrics["teacher/samples_drawn"] <= math.ceil(1.5 * 4)
    assert sum(len(b) for b in batches) == round(metrics["teacher/acceptance_rate"] * metrics["teacher/samples_drawn"])
    assert metrics["teacher/bound_hit"] == float(sum(len(b) for b in batches) < 4)


@pytest.mark.parametrize("prefill", ["none", "question", "answer"])
def test_prefill_modes_sample_parse_and_learn(prefill):
    teacher = RLOOTeacher(tiny_config(prefill=prefill, max_attempts=3.0))
    batches = teacher.propose(2, 2)
    drafts = [d for dataset in teacher.last_drafts() for d in dataset]
    assert all(len(d.rows) == (2 if prefill == "answer" and d.ok else len(d.rows)) for d in drafts)
    for draft in drafts:
        if prefill != "none":
            assert draft.text.startswith("<question>")
    for problem in (p for batch in batches for p in batch):
        assert problem.source == "teacher" and problem.meta["dataset"] in (0, 1)
    before = params(teacher)
    teacher.update(np.array([0.05, -0.05]), [])
    assert changed(before, params(teacher))


def test_teacher_update_in_micro_batches_equals_one_pass():
    """Bounded memory by default (the cpu preset's one-pass update took 17.5 GB), same update."""
    assert make_teacher_config("cpu").micro_batch_size == 8 and make_teacher_config("paper").micro_batch_size == 8
    updated = {}
    for micro in (None, 2):
        teacher = RLOOTeacher(tiny_config(prefill="answer", max_attempts=3.0, micro_batch_size=micro))
        teacher.propose(2, 3)
        rollout, _, _ = build_rollout(teacher.last_drafts(), np.zeros(2))
        assert len(rollout) > 2  # the micro-batched update really runs in several passes
        before = params(teacher)
        stats = teacher.update(np.array([0.05, -0.05]), [])
        assert stats["update_skipped"] == 0.0
        updated[micro] = stats, {k: v - before[k] for k, v in params(teacher).items()}
    (full_stats, full), (micro_stats, micro) = updated[None], updated[2]
    assert micro_stats["grad_norm"] == pytest.approx(full_stats["grad_norm"], rel=1e-5)
    assert micro_stats["loss"] == pytest.approx(full_stats["loss"], rel=1e-5, abs=1e-9)
    largest = max(float(step.abs().max()) for step in full.values())
    assert largest > 0
    for name, step in full.items():  # Adam's first step divides by |g|: round-off shows only where g ~ 0
        torch.testing.assert_close(micro[name], step, rtol=0, atol=0.01 * largest)


def test_two_stage_assembly_closes_the_forced_box():
    assert close_box("42}</answer>") == "42"
    assert close_box("\\frac{1}{2}} junk") == "\\frac{1}{2}"
    assert close_box("\\{x\\}}") == "\\{x\\}"
    assert close_box("7 + ") is None
    text = assemble_two_stage("What is 2+2?</question>", "4}</answer> and more")
    assert text == "<question>What is 2+2?</question>\n<answer>\\boxed{4}</answer>"
    rejection = assemble_two_stage("What is 2+2?", "4 and then")
    assert isinstance(rejection, Rejection) and rejection.reason == "unfinished_answer"


def test_numeric_answer_filter_rejects_digit_free_answers():
    sampler = TeacherSampler.__new__(TeacherSampler)
    sampler.config = tiny_config(require_numeric_answer=True)
    wordy = "<question>What colour is the sky?</question>\n<answer>\\boxed{\\text{blue}}</answer>"
    assert isinstance(sampler.parse(wordy), Rejection) and sampler.parse(wordy).reason == "non_numeric_answer"
    assert isinstance(sampler.parse("<question>What is 6 x 7?</question><answer>\\boxed{42}</answer>"), Problem)
    sampler.config = tiny_config(require_numeric_answer=False)  # the paper's check alone accepts it
    assert isinstance(sampler.parse(wordy), Problem)
    # A copied template is rejected by the parser itself, whatever the filter says.
    copied = sampler.parse("<question>the problem</question><answer>\\boxed{final answer}</answer>")
    assert isinstance(copied, Rejection) and copied.reason == "placeholder"


def test_teacher_presets_follow_the_paper():
    paper = make_teacher_config("paper")
    assert (paper.lr, paper.kl_coef, paper.warmup_steps, paper.temperature, paper.max_new_tokens) == \
        (1e-5, 0.001, 20, 1.0, 512)
    assert paper.prefill == "none" and paper.model is None  # same model as the student
    assert (PRESETS["paper"].num_datasets, PRESETS["paper"].problems_per_dataset) == (4, 64)
    with pytest.raises(ValueError, match="did you mean 'prefill'"):
        make_teacher_config("cpu", prefil="answer")
    with pytest.raises(ValueError, match="prefill"):
        make_teacher_config("cpu", prefill="sideways")
    with pytest.raises(ValueError, match="max_attempts"):
        make_teacher_config("cpu", max_attempts=0.5)


def test_rloo_teacher_state_resumes_weights_optimizer_and_sampling(tmp_path):
    teacher = RLOOTeacher(tiny_config())
    teacher._ensure_updater(10)
    teacher.propose(2, 2)
    teacher.update(np.array([0.1, -0.1]), [])
    teacher.save(tmp_path / "teacher.pt")
    expected = [[p.question for p in b] for b in teacher.propose(2, 2)]

    other = RLOOTeacher(tiny_config())
    other.load(tmp_path / "teacher.pt")
    assert not changed(params(teacher), params(other))
    assert other.updater.steps_done == 1
    moments = other.updater.optimizer.state_dict()["state"]
    assert moments and all(int(s["step"]) == 1 for s in moments.values())
    assert [[p.question for p in b] for b in other.propose(2, 2)] == expected


def test_base_teacher_never_changes_its_weights():
    teacher = BaseTeacher(tiny_config())
    teacher.propose(2, 2)
    before = params(teacher)
    assert teacher.update(np.array([1.0, -1.0]), []) == {}
    assert not changed(before, params(teacher))
    assert "policy" not in teacher.state_dict()


def test_single_dataset_warns_that_rloo_cannot_learn():
    with pytest.warns(UserWarning, match="advantage is 0"):
        RLOOTeacher(tiny_config()).check_env(scripted_vector_env(num_datasets=1).config)


# ---------------------------------------------------------------------------------------------
# The loop: callbacks, checkpoints, logger
# ---------------------------------------------------------------------------------------------


def test_callbacks_see_every_step_and_can_stop_the_run(tmp_path):
    seen = []

    def stop_at_two(record):
        seen.append((record.step, len(record.batches), record.rewards.shape))
        return record.step < 2

    teacher = RandomTeacher(seed=0)
    teacher.learn(scripted_vector_env(), 5, callback=stop_at_two, run_dir=tmp_path, progress_bar=False)
    assert seen == [(1, 2, (2,)), (2, 2, (2,))]
    assert latest_checkpoint(tmp_path).name == "step_000002"  # stopping still checkpoints

    # promotion_window=1 and positive scripted gains: one promotion per step.
    record_steps = []
    RandomTeacher(seed=0).learn(scripted_vector_env(), 10, progress_bar=False,
                                callback=[StopAfterPromotions(2), lambda r: record_steps.append(r.step)])
    assert record_steps == [1, 2]


def test_checkpoints_are_atomic_and_pruned(tmp_path):
    teacher = MyTeacher(seed=0)
    teacher.learn(scripted_vector_env(), 4, run_dir=tmp_path, keep_checkpoints=2, progress_bar=False)
    assert [p.name for p in checkpoint_dirs(tmp_path)] == ["step_000003", "step_000004"]
    # A write killed half-way leaves a temporary folder: never taken for a checkpoint.
    (tmp_path / "checkpoints" / ".tmp-step_000005-1").mkdir()
    assert latest_checkpoint(tmp_path).name == "step_000004"
    trainer = json.loads((tmp_path / "checkpoints" / "step_000004" / "trainer.json").read_text())
    assert trainer["step"] == 4 and len(trainer["logger"]["history"]) == 4
    # Resuming to 6 continues at step 5 and rewrites the CSV without duplicates.
    MyTeacher(seed=0).learn(scripted_vector_env(), 6, run_dir=tmp_path, resume_from=tmp_path, progress_bar=False)
    steps = [int(r["step"]) for r in csv.DictReader((tmp_path / "progress.csv").open())]
    assert steps == [1, 2, 3, 4, 5, 6]
    proposals = [json.loads(line) for line in (tmp_path / "proposals.jsonl").open()]
    assert [(r["step"], r["dataset"]) for r in proposals] == [(s, k) for s in range(1, 7) for k in (0, 1)]
    assert all(len(r["problems"]) == 3 and "question" in r["problems"][0] for r in proposals)
    assert not list((tmp_path / "checkpoints").glob(".tmp-*"))


def test_logger_writes_csv_and_tensorboard_and_truncates_on_resume(tmp_path):
    logger = Logger(tmp_path, writers=("csv", "tensorboard"))
    logger.record("teacher/reward_mean", 0.01)
    logger.record("ignored/not_a_number", "text")
    logger.record("ignored/nan", float("nan"))
    logger.dump(1)
    logger.record("teacher/reward_mean", 0.02)
    logger.record("teacher/new_key", np.float32(3.0))  # a new column rewrites the header
    logger.dump(2)
    state = {"history": logger.history[:1]}
    logger.record("teacher/reward_mean", 0.03)
    logger.dump(3)
    logger.close()
    rows = list(csv.DictReader((tmp_path / "progress.csv").open()))
    assert [r["step"] for r in rows] == ["1", "2", "3"] and rows[1]["teacher/new_key"] == "3.0"
    assert "ignored/nan" not in rows[0] and "ignored/not_a_number" not in rows[0]

    resumed = Logger(tmp_path, writers=("csv", "tensorboard"))
    resumed.load_state_dict(state)  # back to step 1: rows 2 and 3 were written after the checkpoint
    resumed.record("teacher/reward_mean", 0.5)
    resumed.dump(2)
    resumed.close()
    rows = list(csv.DictReader((tmp_path / "progress.csv").open()))
    assert [(r["step"], r["teacher/reward_mean"]) for r in rows] == [("1", "0.01"), ("2", "0.5")]
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))


def test_the_conformance_check_names_what_is_wrong():
    class TooFew(Teacher):
        def propose(self, num_datasets, problems_per_dataset):
            return [[("What is 1 + 1?", "2")]]

    class Garbage(Teacher):
        def propose(self, num_datasets, problems_per_dataset):
            return [[("", "2")] for _ in range(num_datasets)]

    with pytest.raises(TeacherConformanceError) as error:
        check_teacher(TooFew)
    assert str(error.value) == WRONG_BATCH_COUNT.format(name="TooFew", g=2, n=3, got=1)
    with pytest.raises(TeacherConformanceError, match=INVALID_PROBLEM.split("(")[0].format(name="Garbage")):
        check_teacher(Garbage)


def test_sb3_teacher_runs_ppo_updates_and_says_which_extra_is_missing(monkeypatch):
    teacher = SB3Teacher(n_steps=2, seed=0)
    logger = run_learning(teacher, scripted_vector_env(), 2, progress_bar=False, logger=Logger(None, writers=()))
    assert teacher.model._n_updates > 0  # the buffer filled after 2 steps and PPO trained
    assert any(key.startswith("teacher/ppo_") for key in logger.history[-1])

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "stable_baselines3" else real(name, *a))
    with pytest.raises(ImportError, match=r"soar-gym\[sb3\]"):
        SB3Teacher()
