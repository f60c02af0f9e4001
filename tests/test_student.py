"""Student inner loop on the tiny random LM: train/evaluate/reset/promote, failures."""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch

import soar_env.rl.rloo as rloo_module
import soar_env.student as student_module
from soar_env.problems import Problem
from soar_env.verify import GRADE_STATUSES
from soar_env.student import EvalResult, Student, StudentConfig, TrainResult, inner_steps_for

PROBLEMS = [
    Problem("What is 2 + 3?", "5", source="test"),
    Problem("What is 4 + 4?", "8", source="test"),
    Problem("What is 7 - 2?", "5", source="test"),
    Problem("What is 3 * 3?", "9", source="test"),
]


def tiny_config(**overrides) -> StudentConfig:
    """A few short samples and a large lr, so a step is fast and visibly moves the weights."""
    settings = dict(steps=2, batch_size=2, group_size=4, max_new_tokens=4, eval_max_new_tokens=4,
                    lr=1e-2, grade_processes=1, seed=0)
    settings.update(overrides)
    return StudentConfig(**settings)


@pytest.fixture
def policy():
    policy_module = pytest.importorskip("soar_env.models.policy")
    torch.manual_seed(0)
    return policy_module.LMPolicy.from_name("tiny")


@dataclass
class FakeGrade:
    correct: bool
    status: str


class ParityGrader:
    """Stand-in for grade_many: a random LM never solves arithmetic, so 'correct' here means
    'the reply has an even number of characters', which gives mixed rewards and real updates."""

    def __init__(self) -> None:
        self.responses: list[list[str]] = []

    def __call__(self, responses, golds, *, require_box=True, timeout=5.0, processes=None, finished=None,
                 accept_unevaluated=True):
        assert len(responses) == len(golds) and finished is None
        self.responses.append(list(responses))
        return [FakeGrade(len(r) % 2 == 0, "correct" if len(r) % 2 == 0 else "wrong") for r in responses]


@pytest.fixture
def parity_grader(monkeypatch) -> ParityGrader:
    grader = ParityGrader()
    monkeypatch.setattr(student_module, "grade_many", grader)
    return grader


def states_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ----------------------------------------------------------------------------------------------
# train


def test_train_runs_steps_and_reports(policy, parity_grader) -> None:
    student = Student(policy, tiny_config())
    result = student.train(PROBLEMS)
    assert isinstance(result, TrainResult) and result.ok
    assert result.steps_done == 2 and len(result.rewards) == 2 and len(result.stats) == 2
    assert all(0.0 <= r <= 1.0 for r in result.rewards)
    assert result.tokens > 0 and result.seconds > 0 and result.num_problems == 4 and not result.skipped
    for stats in result.stats:
        keys = ("loss", "pg_loss", "kl", "reward_mean", "tokens", "grad_norm", "lr", "skipped", "sample_seconds")
        for key in keys:
            assert key in stats
    # 2 steps x 2 problems x 4 samples graded.
    assert [len(r) for r in parity_grader.responses] == [8, 8]
    assert result.state is not None and result.state.keys() == student.baseline_state().keys()
    assert not states_equal(result.state, student.baseline_state())


def test_train_leaves_baseline_and_policy_unchanged(policy, parity_grader) -> None:
    student = Student(policy, tiny_config())
    before = student.baseline_state()
    result = student.train(PROBLEMS)
    assert result.ok
    assert states_equal(student.baseline_state(), before)
    assert states_equal(policy.state_dict_trainable(), before)


def test_train_overrides_and_cycling(policy, parity_grader) -> None:
    student = Student(policy, tiny_config())
    result = student.train(PROBLEMS[:3], steps=3, batch_size=2, group_size=2)
    assert result.steps_done == 3
    assert [len(r) for r in parity_grader.responses] == [4, 4, 4]


def test_reset_restores_baseline(policy) -> None:
    student = Student(policy, tiny_config())
    baseline = student.baseline_state()
    with torch.no_grad():
        for p in policy.trainable_parameters():
            p.add_(1.0)
    assert not states_equal(policy.state_dict_trainable(), baseline)
    student.reset()
    assert states_equal(policy.state_dict_trainable(), baseline)


def test_promote_changes_baseline_and_step_count(policy, parity_grader) -> None:
    student = Student(policy, tiny_config(steps=1, steps_after_promotion=2))
    assert student.default_steps == 1 and student.promotions == 0
    result = student.train(PROBLEMS)
    assert result.steps_done == 1
    student.promote(result.state)
    assert student.promotions == 1 and student.default_steps == 2
    assert states_equal(student.baseline_state(), result.state)
    assert states_equal(policy.state_dict_trainable(), result.state)
    # The next run starts from the promoted baseline and runs steps_after_promotion steps.
    assert student.train(PROBLEMS).steps_done == 2
    assert states_equal(student.baseline_state(), result.state)


def test_inner_steps_rule_is_the_papers_10_then_15() -> None:
    """One rule for the bare student and the env: more steps once anything was promoted."""
    assert [inner_steps_for(p, 10, 15) for p in (0, 1, 4)] == [10, 15, 15]


def test_zero_reward_run_leaves_state_exactly_at_baseline(policy) -> None:
    """The Hard-Only plateau, with the real grader: a random LM never boxes a correct answer, so
    every reward is 0 and RLOO must not move the weights (not even by weight decay)."""
    student = Student(policy, tiny_config(weight_decay=0.1, require_box=True))
    result = student.train(PROBLEMS)
    assert result.ok and result.steps_done == 2 and result.rewards == [0.0, 0.0]
    assert all(s["skipped"] == 1.0 for s in result.stats)
    assert states_equal(result.state, student.baseline_state())

    evaluation = student.evaluate(PROBLEMS, samples=2, greedy=False)
    assert evaluation.correct == [0, 0, 0, 0]
    assert sum(evaluation.statuses.values()) == 8 and set(evaluation.statuses) <= set(GRADE_STATUSES)


def test_malformed_problems_are_skipped_with_reasons(policy, parity_grader) -> None:
    student = Student(policy, tiny_config(steps=1))
    entries = [Problem("   ", "5"), PROBLEMS[0], Problem("What is 1 + 1?", ""), 42]
    result = student.train(entries)
    assert result.ok and result.steps_done == 1 and result.num_problems == 1
    assert [index for index, _ in result.skipped] == [0, 2, 3]
    assert all(rejection.reason for _, rejection in result.skipped)

    nothing = student.train([Problem("", ""), None])
    assert nothing.steps_done == 0 and nothing.state is None and len(nothing.skipped) == 2
    assert nothing.error is not None and "no_valid_problems" in nothing.error
    assert len(parity_grader.responses) == 1  # the empty run sampled nothing


def test_nan_loss_stops_run_and_keeps_baseline(policy, parity_grader, monkeypatch) -> None:
    real_loss = rloo_module.rloo_loss

    def nan_loss(*args, **kwargs):
        loss, stats = real_loss(*args, **kwargs)
        return loss * float("nan"), {**stats, "loss": float("nan")}

    monkeypatch.setattr(rloo_module, "rloo_loss", nan_loss)
    student = Student(policy, tiny_config(skip_zero_advantage=False))
    before = student.baseline_state()
    result = student.train(PROBLEMS)
    assert not result.ok and "non_finite" in result.error
    assert result.state is None and result.steps_done == 0
    assert math.isnan(result.stats[-1]["loss"])
    assert states_equal(student.baseline_state(), before)
    assert states_equal(policy.state_dict_trainable(), before)


def test_same_seed_same_samples_and_rewards(policy, parity_grader) -> None:
    student = Student(policy, tiny_config())
    first = student.train(PROBLEMS, seed=7)
    samples_first = list(parity_grader.responses)
    second = student.train(PROBLEMS, seed=7)
    assert parity_grader.responses[2:] == samples_first
    assert first.rewards == second.rewards
    assert states_equal(first.state, second.state)
    student.train(PROBLEMS, steps=1, seed=8)
    assert parity_grader.responses[4] != samples_first[0]


# ----------------------------------------------------------------------------------------------
# evaluate


def test_evaluate_shapes_and_state_restored(policy, parity_grader) -> None:
    student = Student(policy, tiny_config())
    result = student.evaluate(PROBLEMS[:3], samples=3, greedy=False)
    assert isinstance(result, EvalResult)
    assert len(result.correct) == 3 and result.samples == 3
    assert all(0 <= c <= 3 for c in result.correct)
    assert sum(result.statuses.values()) == 9
    assert result.accuracy == pytest.approx(sum(result.correct) / 9)
    assert set(result.pass_at_k(ks=(1, 3))) == {1, 3}

    trained = student.train(PROBLEMS)
    baseline = student.baseline_state()
    greedy = student.evaluate(PROBLEMS, state=trained.state, max_new_tokens=3)
    assert len(greedy.correct) == 4 and greedy.samples == 1
    assert states_equal(policy.state_dict_trainable(), baseline)
    assert student.evaluate([]).accuracy == 0.0


def test_evaluate_with_state_uses_that_state(policy, parity_grader) -> None:
    student = Student(policy, tiny_config())
    noisy = {k: v + torch.randn_like(v) * 5 for k, v in student.baseline_state().items()}
    student.evaluate(PROBLEMS, max_new_tokens=6)
    student.evaluate(PROBLEMS, max_new_tokens=6, state=noisy)
    student.evaluate(PROBLEMS, max_new_tokens=6)
    base, other, base_again = parity_grader.responses
    assert base == base_again and other != base


def test_update_scores_samples_at_the_sampling_temperature(policy, parity_grader, monkeypatch) -> None:
    """Samples drawn at T are scored as log softmax(logits / T): on-policy at any temperature. (The
    first update reuses its own scores as the reference's; the second runs the reference pass.)"""
    seen: list[tuple[bool, float]] = []
    score = policy.token_logprobs

    def spy(prompt_ids, completion_ids, **options):
        seen.append((options.get("reference", False), options.get("temperature", 1.0)))
        return score(prompt_ids, completion_ids, **options)

    monkeypatch.setattr(policy, "token_logprobs", spy)
    student = Student(policy, tiny_config(steps=2, temperature=0.5, kl_coef=0.1, skip_zero_advantage=False))
    assert student.train(PROBLEMS).ok
    assert seen and set(seen) == {(False, 0.5), (True, 0.5)}


def test_unfinished_replies_are_graded_wrong_only_when_asked(policy) -> None:
    """A cut-off reply's last number is not an answer under grade_unfinished=False, in the training
    reward and the evaluation alike; the default reads it (the paper's grader reads any reply)."""
    from soar_env.models.rollout import Rollout

    problems = PROBLEMS[:2]  # answers 5 and 8
    rollout = Rollout.from_completions([[1], [2]], [[([5], "so 2 + 3 = 5", False), ([6], "2 + 3 = 5.", True)],
                                                    [([7], "4 + 4 is 8 and", False), ([8], "it is 8", True)]])
    assert Student(policy, tiny_config(require_box=False)).rewards(rollout, problems) == [1.0, 1.0, 1.0, 1.0]
    strict = Student(policy, tiny_config(require_box=False, grade_unfinished=False))
    assert strict.rewards(rollout, problems) == [0.0, 1.0, 0.0, 1.0]
    assert [g.status for g in strict._grade(rollout, problems)] == ["unfinished", "correct", "unfinished", "correct"]
    # Four tokens cut every reply of the random tiny model: nothing is read, every status is unfinished.
    evaluation = strict.evaluate(problems, samples=2, greedy=False)
    assert evaluation.correct == [0, 0] and evaluation.statuses == {"unfinished": 4}


def test_the_question_written_back_is_wrong_only_when_asked(policy) -> None:
    from soar_env.models.rollout import Rollout

    rollout = Rollout.from_completions([[1]], [[([5], "so 2 + 3 = 2 + 3", True), ([6], "2 + 3 = 5", True)]])
    lenient = Student(policy, tiny_config(require_box=False))
    strict = Student(policy, tiny_config(require_box=False, accept_unevaluated=False))
    assert lenient.rewards(rollout, PROBLEMS[:1]) == [1.0, 1.0]
    assert [g.status for g in strict._grade(rollout, PROBLEMS[:1])] == ["unevaluated", "correct"]


def test_build_student_passes_the_grading_settings():
    from soar_env.config import make_config
    from soar_env.student import build_student

    assert build_student(make_config("tiny")).config.grade_unfinished is True
    assert build_student(make_config("tiny", grade_unfinished=False)).config.grade_unfinished is False
    assert make_config("paper").grade_unfinished is True and make_config("cpu").grade_unfinished is False
    assert build_student(make_config("tiny", accept_unevaluated=False)).config.accept_unevaluated is False
    assert make_config("paper").accept_unevaluated is True and make_config("cpu").accept_unevaluated is False


def test_build_student_passes_the_compute_dtype():
    from soar_env.config import make_config
    from soar_env.student import build_student

    student = build_student(make_config("tiny", compute_dtype="bfloat16"))
    assert student.policy.compute_dtype == torch.bfloat16
    assert {t.dtype for t in student.baseline_state().values()} == {torch.float32}
    assert build_student(make_config("tiny")).policy.compute_dtype == torch.float32
    with pytest.raises(ValueError, match="compute_dtype"):
        make_config("tiny", compute_dtype="half")


def test_train_reports_every_inner_step():
    from soar_env.config import make_config
    from soar_env.data.generators import sample_problems
    from soar_env.student import build_student

    student = build_student(make_config("tiny"))
    seen: list[tuple[int, int]] = []
    result = student.train(sample_problems(4, 0), steps=3, batch_size=2, group_size=2, seed=0,
                           on_step=lambda done, total: seen.append((done, total)))
    assert result.ok and seen == [(1, 3), (2, 3), (3, 3)]
