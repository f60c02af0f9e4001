"""The PQ / Hard-Only protocol (issue 15, item 5): one optimizer and one cosine per fresh student,
an early-stop set that does not shrink hard train unless asked, the paper's numbers only where
they compare, and the committed CPU study still readable.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from agents.teacher_config import ARITHMETIC_TOPICS

from benchmarks.bench_config import BenchConfig, paper_differences
from benchmarks.bench_jobs import collect, load_job
from benchmarks.bench_report import aggregate, markdown_table
from benchmarks.evaluation import EvalConfig, run_pq
from soar_env.config import make_config
from soar_env.data.hardset import hard_splits
from soar_env.rl import cosine_schedule
from soar_env.rl.rloo import RLOOUpdater
from soar_env.student import build_student

pytestmark = pytest.mark.usefixtures("one_thread")

STUDY = Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "compare-cpu"


@pytest.fixture(scope="module")
def tiny():
    config = make_config("tiny")
    train, test = hard_splits(config)
    return config, train, test


@pytest.fixture
def updaters(monkeypatch):
    """Every RLOOUpdater made while the test runs, with the lr of each of its updates."""
    made: list[dict] = []
    init, update = RLOOUpdater.__init__, RLOOUpdater.update

    def recording_init(self, params, config, total_steps):
        init(self, params, config, total_steps)
        made.append({"updater": self, "total_steps": total_steps, "lrs": []})

    def recording_update(self, *args, **kwargs):
        stats = update(self, *args, **kwargs)
        next(m for m in made if m["updater"] is self)["lrs"].append(stats["lr"])
        return stats

    monkeypatch.setattr(RLOOUpdater, "__init__", recording_init)
    monkeypatch.setattr(RLOOUpdater, "update", recording_update)
    return made


def test_a_fresh_student_has_one_optimizer_and_one_cosine_over_its_run(tiny, updaters):
    config, train, test = tiny
    # Early stop on (slope window 10: never reached): the curve is measured between the 4 chunks.
    evaluation = EvalConfig(mode="mixed", max_steps=4, eval_every=1, slope_window=10, samples=2, test_size=2)
    result = run_pq(config, [], train, test, evaluation, seed=0, student=build_student(config))
    assert result.student_steps == 4 and len(result.curve) == 4
    assert [u["total_steps"] for u in updaters] == [4]
    peak = config.learning_rate
    expected = [peak * cosine_schedule(step, warmup_steps=0, total_steps=4) for step in range(4)]
    assert updaters[0]["lrs"] == pytest.approx(expected)  # 1e-3, 8.5e-4, 5e-4, 1.5e-4: not restarted


def test_per_chunk_schedule_is_the_earlier_protocol(tiny, updaters):
    config, train, test = tiny
    evaluation = EvalConfig(mode="mixed", max_steps=3, eval_every=1, slope_window=10, samples=2, test_size=2,
                            schedule="per-chunk")
    run_pq(config, [], train, test, evaluation, seed=0, student=build_student(config))
    assert [u["total_steps"] for u in updaters] == [1, 1, 1]
    assert all(u["lrs"] == [config.learning_rate] for u in updaters)


def test_the_default_early_stop_set_does_not_shrink_hard_train(tiny):
    config, train, test = tiny
    assert EvalConfig().heldout_size == 0 and EvalConfig().schedule == "one-run"
    promoted = train[:2]
    evaluation = EvalConfig(max_steps=2, synthetic_steps=1, eval_every=1, slope_window=10, samples=2, test_size=2)
    result = run_pq(config, promoted, train, test, evaluation, seed=0, student=build_student(config))
    assert result.heldout == 0 and result.train_problems == len(train) + len(promoted)
    assert len(result.curve) == 2  # measured on hard-train problems that are also trained on
    held = run_pq(config, promoted, train, test, EvalConfig(**{**evaluation.__dict__, "heldout_size": 4}), seed=0,
                  student=build_student(config))
    assert held.heldout == 4 and held.train_problems == len(train) - 4 + len(promoted)
    with pytest.raises(ValueError, match="schedule"):
        EvalConfig(schedule="restarts")
    with pytest.raises(ValueError, match="pq_schedule|schedule"):
        BenchConfig(pq_schedule="restarts")


def test_paper_numbers_stand_beside_ours_only_with_the_papers_settings():
    row = {"seeds": 1, "pass_at_k": {str(k): [1.0, 0.5, 1.5] for k in (1, 4, 8, 16, 32)}, "student_steps": 10,
           "tokens": 100, "seconds": 1.0, "meta": None, "notes": []}
    bench = BenchConfig(preset="paper", seeds=1, pq_max_steps=100)
    assert "fresh students of at most 100 steps (paper: 1500)" in paper_differences(bench)
    text = markdown_table(bench, {"soar-pq": row, "hard-only": row})
    header = next(line for line in text.splitlines() if line.startswith("| method"))
    assert "paper" not in header  # no column of the paper's numbers beside ours ...
    assert "Paper, different settings (" in text and "not comparable" in text  # ... only a labelled line
    assert "1.7/5.3/8.5/13.0/18.9" in text and "at most 100 steps" in text
    cpu = markdown_table(BenchConfig(preset="cpu", samples=4), {"hard-only": row})
    assert "18.9" not in cpu and "one AdamW and one cosine over the run" in cpu


def test_the_committed_cpu_study_loads_and_its_table_regenerates():
    """The study was measured with the earlier protocol: it loads under those settings, and only under them."""
    settings = dict(preset="cpu", seeds=3, teacher_steps=4, out=str(STUDY), plots=False)
    before_retune = ("inner_steps=4,inner_steps_after_promotion=6,learning_rate=2e-4,"  # the cpu preset it ran on
                     "hardset=bundled,eval_subset_size=32,grade_unfinished=true,accept_unevaluated=true")
    ten_families = f"topics={ARITHMETIC_TOPICS}"  # its LLM teachers' prompt named all ten families' topics
    bench = BenchConfig(pq_schedule="per-chunk", heldout_size=32, env_set=before_retune, teacher_set=ten_families,
                        **settings)
    rows, teachers = collect(bench, STUDY)
    assert set(rows) == {"base-student", "hard-only", "base", "random", "intrinsic", "grounded", "soar-pq",
                         "soar-ps", "sb3"} and all(len(entries) == 3 for entries in rows.values())
    assert set(teachers) == {"base", "random", "intrinsic", "soar", "sb3"}
    table = aggregate({row: rows[row] for row in ("hard-only", "soar-pq")})
    regenerated = markdown_table(bench, table)
    assert "AdamW and cosine restarted every 15 steps" in regenerated and "up to 32 hard-train problems held out" \
        in regenerated
    committed = (STUDY / "results.md").read_text()
    for name in ("Hard-Only", "SOAR PQ"):
        ours = next(line for line in regenerated.splitlines() if line.startswith(f"| {name} |"))
        assert ours in committed  # same numbers, cell for cell
    with pytest.raises(ValueError, match="other settings.*heldout_size.*pq_schedule"):
        load_job(STUDY, BenchConfig(env_set=before_retune, **settings), "hard-only", 0)
    # The retuned cpu preset is another env: the study's jobs are refused under it, never mixed in.
    with pytest.raises(ValueError, match=r"other settings \(env\)"):
        load_job(STUDY, BenchConfig(pq_schedule="per-chunk", heldout_size=32, **settings), "hard-only", 0)
    # Its teacher jobs recorded their prompt in run_config.json: today's cpu prompt is another teacher.
    with pytest.raises(ValueError, match=r"other settings \(teacher\)"):
        load_job(STUDY, BenchConfig(pq_schedule="per-chunk", heldout_size=32, env_set=before_retune, **settings),
                 "base", 0)
    # Base-student jobs read neither setting, so they load under any with the same env.
    assert load_job(STUDY, BenchConfig(env_set=before_retune, **settings), "base-student", 0) is not None
    assert math.isclose(table["hard-only"]["pass_at_k"]["32"][0], 24.8, abs_tol=0.05)


def test_env_set_overrides_every_job_env_and_is_checked_by_name():
    from benchmarks.bench_jobs import job_settings

    bench = BenchConfig(preset="tiny", env_set="inner_steps=3,learning_rate=0.01")
    assert bench.env_overrides() == {"inner_steps": 3, "learning_rate": 0.01}
    env = job_settings(bench, "hard-only")["env"]
    assert env["inner_steps"] == 3 and env["learning_rate"] == 0.01 and "seed" not in env
    assert job_settings(BenchConfig(preset="tiny"), "hard-only")["env"]["inner_steps"] == 1  # the preset's
    with pytest.raises(ValueError, match="inner_steps"):
        BenchConfig(preset="tiny", env_set="inner_step=3")


def test_env_set_and_the_seed_reach_the_teachers_env_and_not_its_settings(tmp_path):
    """A learned teacher is meta-trained in the study's env (env_set, the job's seed), with the
    preset's teacher settings."""
    from agents.teacher_config import make_teacher_config
    from benchmarks.bench_jobs import teacher_plan

    bench = BenchConfig(preset="tiny", env_set="inner_steps=3,learning_rate=0.01", teacher_steps=2)
    plan = teacher_plan(bench, "alp-gmm", 2, tmp_path)
    assert (plan.env.inner_steps, plan.env.learning_rate, plan.env.seed) == (3, 0.01, 2)
    assert plan.teacher_config == make_teacher_config("tiny", families="addition,multiplication")  # the tiny set's
    assert plan.train.total_steps == 2
    assert plan.run_dir == tmp_path / "alp-gmm-seed2" and not plan.resuming
    from benchmarks.bench_jobs import job_settings

    all_ten = BenchConfig(preset="tiny", teacher_set="families=all", teacher_steps=2)
    assert teacher_plan(all_ten, "alp-gmm", 2, tmp_path / "other").teacher_config.families == "all"
    assert job_settings(all_ten, "alp-gmm")["teacher"]["families"] == "all"
    assert job_settings(bench, "alp-gmm")["teacher"]["families"] == "addition,multiplication"
    assert "teacher" not in job_settings(bench, "hard-only")  # a method without a teacher reads none
