"""Batched student runs equal the sequential ones: states, rewards, records; every adapter trains.

    OMP_NUM_THREADS=1 python -m pytest tests/test_batched_runs.py -q
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

import soar_env.batched_runs as batched_runs
import soar_env.student as student_module
from soar_env.batched_runs import BatchedLocalRunner, batch_unsupported, train_runs
from soar_env.envs.testing import ScriptedStudent
from soar_env.models import LMPolicy, LoraSettings, build_tiny_model
from soar_env.models.tiny import perturbed_state
from soar_env.problems import Problem
from soar_env.runs import LocalRunner, RunSpec
from soar_env.student import Student, StudentConfig

pytestmark = pytest.mark.usefixtures("one_thread")

RUNS = 3
PROBLEMS = [Problem(question=f"What is {a} + {b}?", answer=str(a + b)) for a, b in [(2, 3), (4, 4), (7, 1), (6, 2)]]
TOLERANCE = dict(atol=2e-5, rtol=1e-4)
"""Batched and sequential runs differ only by float round-off (adapter delta vs folded weights)."""


@dataclass
class FakeGrade:
    correct: bool
    status: str = "ok"


def parity_grades(responses, golds, **kwargs):
    """A known-answer grader: a reply is 'correct' when its character codes sum to an even number.

    The random tiny model never writes the right sum; this gives mixed groups, hence non-zero
    advantages, while staying a pure function of the text (so equal texts get equal rewards).
    """
    return [FakeGrade(sum(map(ord, r)) % 2 == 0) for r in responses]


@pytest.fixture(autouse=True)
def fake_grader(monkeypatch):
    monkeypatch.setattr(student_module, "grade_many", parity_grades)  # batched runs grade through the student too


def make_student(**overrides) -> Student:
    model, tokenizer = build_tiny_model(seed=0)
    policy = LMPolicy(model, tokenizer, lora=LoraSettings(r=4, alpha=8))
    # A baseline with non-zero B (peft starts B at 0, which would give A no gradient at step 0).
    policy.load_state_dict_trainable(perturbed_state(policy, 0.05, seed=5))
    settings = dict(steps=2, batch_size=2, group_size=4, max_new_tokens=8, eval_max_new_tokens=6, require_box=False,
                    lr=1e-2, kl_coef=0.01, sample_batch_size=8)
    settings.update(overrides)
    return Student(policy, StudentConfig(**settings))


def specs_for(steps: int = 2, **overrides) -> list[RunSpec]:
    settings = dict(steps=steps, batch_size=2, group_size=4, eval_problems=tuple(PROBLEMS), eval_tokens=6)
    settings.update(overrides)
    return [RunSpec(index=k, problems=tuple(PROBLEMS[k % 2 :][:3]), seed=10 + k, **settings) for k in range(RUNS)]


def sequential(student: Student, specs: list[RunSpec]) -> list:
    return [student.train(list(s.problems), s.steps, s.batch_size, s.group_size, seed=s.seed) for s in specs]


def assert_same_state(a: dict, b: dict, what: str) -> None:
    for name in a:
        torch.testing.assert_close(b[name], a[name], **TOLERANCE, msg=f"{what} {name}")


@pytest.mark.parametrize("rows_per_pass", [None, 5])
def test_batched_training_equals_sequential_runs(rows_per_pass: int | None) -> None:
    student = make_student()
    baseline = student.baseline_state()
    specs = specs_for()
    alone_results = sequential(student, specs)
    together = train_runs(student, specs, rows_per_pass=rows_per_pass, rows_per_decode=7)  # 5, 7: cross runs
    assert all(torch.equal(v, baseline[k]) for k, v in student.policy.state_dict_trainable().items())
    for k, (alone, batch) in enumerate(zip(alone_results, together)):
        assert batch.error is None and alone.error is None
        assert batch.rewards == alone.rewards, f"run {k}: different samples"
        assert batch.tokens == alone.tokens
        assert [s["skipped"] for s in batch.stats] == [s["skipped"] for s in alone.stats]
        assert sum(s["skipped"] for s in batch.stats) < len(batch.stats), "test needs a non-skipped step"
        assert_same_state(alone.state, batch.state, f"run {k}")
        for name in alone.state:  # every adapter tensor of every run trained
            assert not torch.equal(batch.state[name], baseline[name]), f"run {k}: {name} did not change"
        for a, b in zip(alone.stats, batch.stats):
            assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4, abs=1e-6)
            assert b["loss"] == pytest.approx(a["loss"], rel=1e-4, abs=1e-6)
            assert b["kl"] == pytest.approx(a["kl"], rel=1e-3, abs=1e-7)
    # Different data and seeds give different adapters.
    assert not torch.equal(next(iter(together[0].state.values())), next(iter(together[1].state.values())))


def test_the_first_update_reuses_its_log_probs_as_the_kl_reference(monkeypatch) -> None:
    """Every run starts from the baseline, its KL reference, so the first batched update skips the
    reference pass (as RLOOUpdater does); later ones run it."""
    student = make_student()
    reference_passes = [0]
    original = student.policy.token_logprobs

    def counted(*args, **kwargs):
        reference_passes[0] += bool(kwargs.get("reference"))
        return original(*args, **kwargs)

    monkeypatch.setattr(student.policy, "token_logprobs", counted)
    after_step: list[int] = []
    train_runs(student, specs_for(), rows_per_pass=5, on_step=lambda runs, done: after_step.append(reference_passes[0]))
    assert student.config.kl_coef > 0 and len(after_step) == 2
    assert after_step[0] == 0 and after_step[1] > 0  # step 1 reused its log-probs; step 2 scored the reference


def test_a_run_with_all_zero_advantages_skips_alone(monkeypatch) -> None:
    student = make_student()
    baseline = student.baseline_state()
    specs = specs_for(steps=1)

    def grades(responses, golds, **kwargs):  # run 1's rows (the middle 8 of the joint call) all wrong
        out = parity_grades(responses, golds)
        out[8:16] = [FakeGrade(False)] * 8
        return out

    monkeypatch.setattr(student_module, "grade_many", grades)
    results = train_runs(student, specs)
    assert results[1].stats[0]["skipped"] == 1.0 and results[1].error is None
    assert all(torch.equal(results[1].state[n], baseline[n]) for n in baseline)
    for k in (0, 2):
        assert results[k].stats[0]["skipped"] == 0.0
        assert not all(torch.equal(results[k].state[n], baseline[n]) for n in baseline)


def test_a_non_finite_loss_fails_only_its_run(monkeypatch) -> None:
    student = make_student()
    specs = specs_for()
    alone_results = sequential(student, specs)
    original = batched_runs.run_logprobs

    def poisoned(policy, bank, prompt_ids, completion_ids, runs, **kwargs):
        with torch.no_grad():  # run 1's adapters blew up: its forward is NaN, its batch-mates' is not
            bank.parameters_of(1)[0].fill_(float("nan"))
        return original(policy, bank, prompt_ids, completion_ids, runs, **kwargs)

    monkeypatch.setattr(batched_runs, "run_logprobs", poisoned)
    together = train_runs(student, specs, rows_per_pass=5)
    assert together[1].error is not None and together[1].error.startswith("non_finite_loss at step 0")
    assert together[1].state is None and together[1].steps_done == 0
    for k in (0, 2):
        assert together[k].error is None and together[k].rewards == alone_results[k].rewards
        assert_same_state(alone_results[k].state, together[k].state, f"run {k}")


@pytest.mark.parametrize("estimator", ["greedy", "sampled", "likelihood"])
def test_batched_runner_records_equal_the_local_runner(estimator: str) -> None:
    student = make_student()
    baseline = student.baseline_state()
    specs = specs_for(eval_samples=2, estimator=estimator)
    specs.append(RunSpec(index=RUNS, problems=(), steps=0, batch_size=2, group_size=4, seed=3,
                         eval_problems=tuple(PROBLEMS), eval_samples=2, estimator=estimator,
                         eval_tokens=6))  # the intrinsic modes' "evaluate the baseline" run
    local = LocalRunner(student).run(specs, baseline_id=0, baseline=baseline)
    runner = BatchedLocalRunner(student)
    assert runner.parallel and runner.unsupported is None
    batch = runner.run(specs, baseline_id=0, baseline=baseline)
    if estimator != "likelihood":
        assert any(a.correct and sum(a.correct) for a in local), "test needs some correct answers"
    for a, b in zip(local, batch):
        assert (b.index, b.train_rewards, b.error, b.tokens) == (a.index, a.train_rewards, a.error, a.tokens)
        assert (b.scores is None) == (a.scores is None)
        if a.scores is not None:
            assert (b.scores.estimator, b.scores.correct, b.scores.samples) == (a.scores.estimator,
                                                                              a.scores.correct, a.scores.samples)
            assert b.scores.answer_logprob == pytest.approx(a.scores.answer_logprob, abs=1e-4)
            assert b.scores.decoy_logprob == pytest.approx(a.scores.decoy_logprob, abs=1e-4)
        assert (a.state is None) == (b.state is None)
        if a.state is not None:
            assert_same_state(a.state, b.state, f"run {a.index}")


def test_batched_runner_reports_progress_per_run_and_inner_step() -> None:
    student = make_student()
    events = []
    runner = BatchedLocalRunner(student, progress=events.append)
    runner.progress_context = {"runs": RUNS, "inner_steps": 2, "runs_done": 0}
    runner.run(specs_for(), baseline_id=0, baseline=student.baseline_state())
    kinds = [(e.kind, e.run, e.inner_step) for e in events]
    for k in range(RUNS):
        assert ("run_start", k, 0) in kinds and ("run_end", k, 2) in kinds
        assert ("inner_step", k, 1) in kinds and ("inner_step", k, 2) in kinds
        assert kinds.index(("inner_step", k, 1)) < kinds.index(("inner_step", k, 2)) < kinds.index(("run_end", k, 2))
    assert [e.runs_done for e in events if e.kind == "run_end"] == [1, 2, 3]


def test_a_student_that_cannot_be_batched_runs_one_by_one() -> None:
    scripted = ScriptedStudent(PROBLEMS, gains=(0.1,))
    runner = BatchedLocalRunner(scripted)
    assert not runner.parallel and "not a Student" in runner.unsupported
    records = runner.run(specs_for(), baseline_id=0, baseline=scripted.baseline_state())
    assert [r.index for r in records] == list(range(RUNS)) and len(scripted.train_calls) == RUNS
    model, tokenizer = build_tiny_model(seed=0)
    full = Student(LMPolicy(model, tokenizer, lora=None), StudentConfig())
    assert "full fine-tuning" in batch_unsupported(full)



def test_batched_runs_grade_cut_off_replies_as_a_single_run_does(monkeypatch) -> None:
    """grade_unfinished=False: the joint grading of several runs marks the same cut-off rows
    "unfinished" as each run's own grading, with the real grader."""
    from soar_env.models.rollout import Rollout
    from soar_env.verify import grade_many

    monkeypatch.setattr(student_module, "grade_many", grade_many)
    student = make_student(grade_unfinished=False)
    problems = [PROBLEMS[:1], PROBLEMS[1:2]]
    rollouts = [Rollout.from_completions([[1]], [[([5], f"so it is {p[0].answer}", done) for done in (False, True)]])
                for p in problems]
    joint = batched_runs._grade(student, rollouts, problems)
    assert joint == [student._grade(r, p) for r, p in zip(rollouts, problems)]
    assert [[g.status for g in run] for run in joint] == [["unfinished", "correct"]] * 2
