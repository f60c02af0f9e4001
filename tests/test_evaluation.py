"""Evaluation protocols: pass@k and bootstrap CIs against hand-computed values; PQ / PS on the tiny preset."""

from __future__ import annotations

import csv
import json
import math
import os
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from agents import StepRecord
from benchmarks import bench_report, evaluation
from benchmarks.analysis import embedding_model_path
from benchmarks.bench_config import BenchConfig
from benchmarks.bench_report import aggregate, markdown_table
from benchmarks.compare_teachers import main, run_study
from benchmarks.bootstrap import bootstrap_ci, bootstrap_pass_at_k
from benchmarks.evaluation import (
    EvalConfig,
    curve_slope,
    promoted_students_callback,
    run_pq,
    run_ps,
    should_stop,
)
from soar_env.config import make_config
from soar_env.data.hardset import hard_splits
from soar_env.metrics import mean_pass_at_k, pass_at_k
from soar_env.student import build_student


pytestmark = pytest.mark.usefixtures("one_thread")


# -- pass@k ------------------------------------------------------------------------------------


def test_pass_at_k_hand_computed():
    # n=4, c=1, k=2: 1 - C(3,2)/C(4,2) = 1 - 3/6
    assert pass_at_k(4, 1, 2) == pytest.approx(0.5)
    # n=32, c=2, k=4: 1 - C(30,4)/C(32,4)
    assert pass_at_k(32, 2, 4) == pytest.approx(1 - math.comb(30, 4) / math.comb(32, 4))
    assert pass_at_k(32, 0, 32) == 0.0 and pass_at_k(32, 1, 32) == 1.0
    assert pass_at_k(32, 8, 1) == pytest.approx(8 / 32)


def test_mean_pass_at_k_over_problems():
    scores = mean_pass_at_k([0, 1, 32], 32, (1, 32))
    assert scores[1] == pytest.approx((0 + 1 / 32 + 1) / 3)
    assert scores[32] == pytest.approx((0 + 1 + 1) / 3)


# -- bootstrap -----------------------------------------------------------------------------------


def test_bootstrap_ci_constant_and_single():
    assert bootstrap_ci([0.3] * 10) == pytest.approx((0.3, 0.3, 0.3))
    assert bootstrap_ci([0.7]) == (0.7, 0.7, 0.7)
    with pytest.raises(ValueError):
        bootstrap_ci([])


def test_bootstrap_ci_binary_matches_normal_approximation():
    # 50 ones and 50 zeros: mean 0.5, bootstrap sd ~ sqrt(0.25/100) = 0.05, 95% CI ~ 0.5 +- 0.098.
    mean, low, high = bootstrap_ci([1] * 50 + [0] * 50, n_resamples=20000, seed=1)
    assert mean == 0.5
    assert low == pytest.approx(0.402, abs=0.02) and high == pytest.approx(0.598, abs=0.02)
    assert bootstrap_ci([1] * 50 + [0] * 50, n_resamples=2000, seed=3) == bootstrap_ci(
        [1] * 50 + [0] * 50, n_resamples=2000, seed=3)  # seeded


def test_bootstrap_pass_at_k_two_level():
    mean, low, high = bootstrap_pass_at_k([[32, 0], [32, 0]], 32, 1, n_resamples=2000)
    assert mean == pytest.approx(0.5)
    assert 0.0 <= low <= 0.5 <= high <= 1.0
    assert bootstrap_pass_at_k([[4, 4], [4, 4]], 4, 1) == pytest.approx((1.0, 1.0, 1.0))


# -- early stop ---------------------------------------------------------------------------------


def test_slope_rule():
    assert curve_slope([(0, 0.0), (10, 0.1), (20, 0.2)]) == pytest.approx(0.01)
    assert not should_stop([(0, 0.0), (10, 0.1), (20, 0.2)], 3, 0.0)
    assert should_stop([(0, 0.2), (10, 0.2), (20, 0.2)], 3, 0.0)
    assert not should_stop([(0, 0.2), (10, 0.2)], 3, 0.0)  # window not full yet


def test_eval_config_validates():
    with pytest.raises(ValueError):
        EvalConfig(mode="interleaved")
    assert EvalConfig(samples=8).ks == (1, 4, 8)


# -- protocols on the tiny preset -------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny():
    config = make_config("tiny")
    train, test = hard_splits(config)
    return config, train, test, build_student


def test_hard_splits_disjoint(tiny):
    _, train, test, _ = tiny
    assert train and test and not {p.id for p in train} & {p.id for p in test}


@pytest.mark.parametrize("mode,schedule", [("curriculum", "one-run"), ("mixed", "one-run"), ("mixed", "per-chunk")])
def test_run_pq_tiny(tiny, mode, schedule):
    config, train, test, build_student = tiny
    promoted = train[:2]
    evaluation = EvalConfig(mode=mode, max_steps=4, synthetic_steps=2, eval_every=1, slope_window=2,
                            samples=4, test_size=4, heldout_size=4, early_stop=True, schedule=schedule)
    student = build_student(config)
    result = run_pq(config, promoted, train, test, evaluation, seed=0, student=student)
    assert set(result.pass_at_k) == {1, 4}
    assert len(result.correct) == 4 and result.samples == 4
    assert 1 <= result.student_steps <= 4 and result.tokens > 0
    # A flat held-out curve (the random tiny model solves nothing) stops early after the window fills.
    assert result.curve and result.stopped_early == (result.student_steps < 4)
    assert result.heldout == 4 and result.train_problems == len(train) - 4 + len(promoted)
    # Each chunk's weights became the baseline that the curve measures (per-chunk: and that the next
    # chunk starts from; the random tiny model solves nothing, so RLOO leaves the weights unchanged).
    assert student.promotions == len(result.curve)


def test_run_ps_picks_best_state(tiny):
    config, train, test, build_student = tiny
    student = build_student(config)
    base = student.baseline_state()
    other = {k: v + 0.01 for k, v in base.items()}
    evaluation = EvalConfig(samples=4, test_size=4)
    result = run_ps(student, [base, other], train[:4], test, evaluation, seed=0, config=config)
    assert result.selected in (0, 1) and len(result.selection_accuracy) == 2
    assert result.selected == int(np.argmax(result.selection_accuracy))
    empty = run_ps(student, [], train[:4], test, evaluation, seed=0, config=config)
    assert empty.selected is None and "no promotion" in empty.note


# -- the comparison harness ---------------------------------------------------------------------------


def test_compare_teachers_smoke(tmp_path):
    bench = BenchConfig(preset="tiny", methods="base-student,hard-only,random", seeds=2, pq_max_steps=2,
                        eval_every=1, samples=4, test_size=4, analysis_questions=8, out=str(tmp_path), plots=False)
    results = run_study(bench)
    table = results["table"]
    assert set(table) == {"base-student", "hard-only", "random"}
    assert table["hard-only"]["seeds"] == 2 and set(table["hard-only"]["pass_at_k"]) == {"1", "4"}
    mean, low, high = table["random"]["pass_at_k"]["4"]
    assert low <= mean <= high
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["analysis"]["random"]["questions"] == 8
    text = (tmp_path / "results.md").read_text()
    assert "| Hard-Only | 2 |" in text and "Vendi (TF-IDF)" in text
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = EventAccumulator(str(tmp_path / "tensorboard" / "hard-only-seed1")).Reload()
    logged = {event.step: event.value for event in run.Scalars("test/pass_at_k")}
    assert logged == pytest.approx({int(k): 100 * v for k, v in results["rows"]["hard-only"][1]["pass_at_k"].items()})
    assert [e.step for e in run.Scalars("pq/heldout_greedy_accuracy")] == [s for s, _ in results["rows"]["hard-only"][1]["curve"]]
    if embedding_model_path() is not None:  # the paper's kernel is reported whenever the model is installed
        embedding = saved["analysis"]["random"]["vendi_embedding"]
        assert 1.0 <= embedding <= 8 and f"| Random | 8 | {embedding:.1f} |" in text


def test_compare_teachers_keeps_finished_jobs_of_a_killed_study(tmp_path, monkeypatch):
    """A study re-run on the same folder reuses every finished (method, seed) job and runs only the rest."""
    settings = dict(preset="tiny", methods="base-student,hard-only", pq_max_steps=2, eval_every=1, samples=4,
                    test_size=4, analysis_questions=8, out=str(tmp_path), plots=False)
    run_study(BenchConfig(seeds=1, **settings))  # as if killed after seed 0
    first = json.loads((tmp_path / "results.json").read_text())
    assert sorted(p.name for p in (tmp_path / "jobs").iterdir()) == ["base-student-seed0.json", "hard-only-seed0.json"]

    calls = []

    original = evaluation.run_pq

    def counting_run_pq(config, *args, **kwargs):
        calls.append(kwargs.get("seed"))
        return original(config, *args, **kwargs)

    monkeypatch.setattr(evaluation, "run_pq", counting_run_pq)
    second = run_study(BenchConfig(seeds=2, **settings))
    assert calls == [1]  # only hard-only of the new seed trained a student
    assert json.loads(json.dumps(second["rows"]["hard-only"][0])) == first["rows"]["hard-only"][0]
    assert second["table"]["hard-only"]["seeds"] == 2
    assert json.loads((tmp_path / "results.json").read_text())["table"]["base-student"]["seeds"] == 2

    with pytest.raises(ValueError, match="other settings.*samples"):
        run_study(BenchConfig(seeds=1, **{**settings, "samples": 2}))
    # Meta-training length is not read by these jobs: a study with other teacher steps keeps them.
    calls.clear()
    run_study(BenchConfig(seeds=2, teacher_steps=7, **settings))
    assert calls == []


def test_compare_teachers_workers_give_the_same_table_as_one_process(tmp_path):
    """Jobs in two worker processes measure what one process measures; the table reads the job files in order."""
    settings = dict(preset="tiny", methods="base-student,random", seeds=2, pq_max_steps=2, eval_every=1, samples=4,
                    test_size=4, analysis_questions=8, plots=False)
    one = run_study(BenchConfig(out=str(tmp_path / "one"), **settings))
    two = run_study(BenchConfig(out=str(tmp_path / "two"), workers=2, **settings))
    assert sorted(p.name for p in (tmp_path / "two" / "jobs").iterdir()) == [
        "base-student-seed0.json", "base-student-seed1.json", "random-seed0.json", "random-seed1.json"]
    for row in ("base-student", "random"):
        assert [e["correct"] for e in two["rows"][row]] == [e["correct"] for e in one["rows"][row]]
        assert [e["seed"] for e in two["rows"][row]] == [0, 1]
    assert two["table"]["random"]["pass_at_k"] == one["table"]["random"]["pass_at_k"]
    assert two["failed"] == {} and two["skipped"] == []


def test_compare_teachers_records_a_failed_job_and_goes_on(tmp_path, monkeypatch, capsys):
    original = evaluation.run_pq

    def broken_for_seed_0(config, *args, **kwargs):
        if kwargs.get("seed") == 0:
            raise RuntimeError("loss became NaN")
        return original(config, *args, **kwargs)

    monkeypatch.setattr(evaluation, "run_pq", broken_for_seed_0)
    argv = ["--preset", "tiny", "--methods", "hard-only,base-student", "--seeds", "2", "--pq-max-steps", "2",
            "--eval-every", "1", "--samples", "4", "--test-size", "4", "--no-plots", "--out", str(tmp_path)]
    assert main(argv) == 1  # the command says something failed ...
    assert "failed: hard-only/seed0: RuntimeError: loss became NaN" in capsys.readouterr().err
    results = json.loads((tmp_path / "results.json").read_text())  # ... after every other job ran
    assert results["failed"] == {"hard-only/seed0": "RuntimeError: loss became NaN"}
    assert results["table"]["hard-only"]["seeds"] == 1 and results["table"]["base-student"]["seeds"] == 2
    assert "Failed: hard-only/seed0" in (tmp_path / "results.md").read_text()
    monkeypatch.setattr(evaluation, "run_pq", original)
    assert main(argv) == 0  # a re-run runs only the failed job
    assert json.loads((tmp_path / "results.json").read_text())["table"]["hard-only"]["seeds"] == 2


KILLED_WORKER_HOOK = """
import os
if os.environ.get("SOAR_TEST_DIE_AT_SEED"):
    import benchmarks.evaluation as evaluation
    original = evaluation.run_pq
    def dying(config, *args, **kwargs):
        if kwargs.get("seed") == int(os.environ["SOAR_TEST_DIE_AT_SEED"]):
            os._exit(9)  # as the kernel's out-of-memory killer would end it: no exception, no clean-up
        return original(config, *args, **kwargs)
    evaluation.run_pq = dying
"""


def test_compare_teachers_survives_a_killed_worker(tmp_path, monkeypatch):
    """A worker process that dies breaks its pool: the jobs in flight are recorded, a new pool runs the rest."""
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(KILLED_WORKER_HOOK)  # imported at start-up by each spawned worker
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(hook), os.environ.get("PYTHONPATH", "")]))
    monkeypatch.setenv("SOAR_TEST_DIE_AT_SEED", "0")
    settings = dict(preset="tiny", methods="base-student,hard-only", seeds=2, pq_max_steps=2, eval_every=1,
                    samples=4, test_size=4, analysis_questions=8, out=str(tmp_path / "study"), plots=False, workers=2)
    results = run_study(BenchConfig(**settings))
    assert "hard-only/seed0" in results["failed"] and "BrokenProcessPool" in results["failed"]["hard-only/seed0"]
    assert results["table"]["hard-only"]["seeds"] == 1  # seed 1 ran in the new pool
    monkeypatch.delenv("SOAR_TEST_DIE_AT_SEED")
    again = run_study(BenchConfig(**settings))
    assert again["failed"] == {} and again["table"]["hard-only"]["seeds"] == 2
    assert again["table"]["base-student"]["seeds"] == 2


def test_compare_teachers_resumes_a_soar_job_killed_after_meta_training(tmp_path, monkeypatch):
    """The teacher's checkpoints outlive a killed job; the re-run continues them instead of starting over."""
    settings = dict(preset="tiny", methods="soar", seeds=1, teacher_steps=2, pq_max_steps=2, eval_every=1,
                    samples=4, test_size=4, analysis_questions=8, out=str(tmp_path), plots=False)
    original = evaluation.run_pq

    def killed(*args, **kwargs):
        raise KeyboardInterrupt("session ended")

    monkeypatch.setattr(evaluation, "run_pq", killed)
    with pytest.raises(KeyboardInterrupt):
        run_study(BenchConfig(**settings))
    assert not (tmp_path / "jobs" / "soar-seed0.json").exists()
    assert (tmp_path / "soar-seed0" / "checkpoints" / "step_000002").is_dir()

    calls = []

    def counting(config, promoted, *args, **kwargs):
        calls.append(kwargs.get("protocol"))
        return original(config, promoted, *args, **kwargs)

    monkeypatch.setattr(evaluation, "run_pq", counting)
    results = run_study(BenchConfig(**settings))
    teacher = json.loads((tmp_path / "jobs" / "soar-seed0.json").read_text())["teacher"]
    assert teacher["resumed_at_step"] == 2 and teacher["compute"]["teacher_steps"] == 2
    assert len(teacher["rewards"]) == 2  # the meta-training log came back with the checkpoint
    # Compute counts the first session's meta-training too, not only the re-run's few seconds.
    logged = [float(r["time/step_seconds"]) for r in csv.DictReader(open(tmp_path / "soar-seed0" / "progress.csv"))]
    assert len(logged) == 2 and teacher["compute"]["meta_seconds"] == round(sum(logged), 1) > 0
    grounded, soar_pq = results["rows"]["grounded"][0], results["rows"]["soar-pq"][0]
    if teacher["pq_size"] == 0:  # no promotion: Grounded-T is the SOAR PQ run, not trained twice
        assert calls == ["PQ"] and grounded["pass_at_k"] == soar_pq["pass_at_k"]
        assert grounded["protocol"] == "Grounded-T" and "same run as SOAR PQ" in grounded["note"]
    else:
        assert calls == ["PQ", "Grounded-T"]


def test_table_averages_meta_training_compute_over_seeds():
    def entry(seed, tokens, seconds):
        meta = {"teacher_steps": 4, "meta_student_tokens": tokens, "meta_student_steps": 64,
                "meta_seconds": seconds, "sample_seconds": 10.0}
        return {"seed": seed, "correct": [0, 1, 2], "samples": 4, "student_steps": 60, "tokens": 1000,
                "seconds": 5.0, "meta": meta}

    table = aggregate({"soar-pq": [entry(0, 100, 20.0), entry(1, 300, 40.0)],
                       "hard-only": [entry(0, 1, 1.0) | {"meta": None}]})
    assert table["soar-pq"]["meta"]["meta_student_tokens"] == 200 and table["soar-pq"]["meta"]["meta_seconds"] == 30.0
    assert table["hard-only"]["meta"] is None
    text = markdown_table(BenchConfig(preset="cpu", samples=4), table)
    lines = {line.split(" |")[0]: line for line in text.splitlines() if line.startswith("| ")}
    assert lines["| SOAR PQ"].endswith("| 4 / 200 / 30 |") and lines["| Hard-Only"].endswith("| – |")


def test_paper_table_has_paper_numbers(monkeypatch):
    row = {"seeds": 1, "pass_at_k": {str(k): [1.0, 0.5, 1.5] for k in (1, 4, 8, 16, 32)}, "student_steps": 10,
           "tokens": 100, "seconds": 1.0, "meta": None, "notes": []}
    monkeypatch.setattr(bench_report, "paper_differences", lambda bench, questions=False: [])
    text = markdown_table(BenchConfig(preset="paper", seeds=1), {"soar-pq": row, "hard-only": row})
    assert "| paper (MATH) |" in text and "different settings" not in text
    assert "1.7/5.3/8.5/13.0/18.9" in text and "0.5/1.7/3.2/5.7/9.6" in text
    assert text.index("Hard-Only") < text.index("SOAR PQ")


def test_promoted_students_callback_keeps_each_promotion():
    weights = {"w": torch.zeros(2)}
    env = SimpleNamespace(core=SimpleNamespace(student=SimpleNamespace(baseline_state=lambda: dict(weights))))
    recorder = promoted_students_callback()
    recorder.init_callback(teacher=None, env=env, logger=None)
    for step, promoted in ((1, False), (2, True), (3, False), (4, True)):
        weights = {"w": torch.full((2,), float(step))}
        assert recorder.on_step(StepRecord(step=step, batches=[], rewards=np.zeros(2), infos=[], promoted=promoted))
    assert recorder.steps == [2, 4]
    assert [float(s["w"][0]) for s in recorder.states] == [2.0, 4.0]


def test_promoted_students_callback_on_a_resumed_run_starts_from_the_checkpoint_baseline():
    fresh = SimpleNamespace(core=SimpleNamespace(promotions=0, student=None))
    recorder = promoted_students_callback()
    recorder.init_callback(teacher=SimpleNamespace(num_steps=0), env=fresh, logger=None)
    recorder.on_training_start()
    assert recorder.states == []  # nothing promoted yet: the base student is no PS candidate

    baseline = {"w": torch.ones(2)}
    resumed = SimpleNamespace(core=SimpleNamespace(promotions=2, student=SimpleNamespace(baseline_state=lambda: baseline)))
    recorder = promoted_students_callback()
    recorder.init_callback(teacher=SimpleNamespace(num_steps=5), env=resumed, logger=None)
    recorder.on_training_start()
    assert recorder.steps == [5] and recorder.states == [baseline]
