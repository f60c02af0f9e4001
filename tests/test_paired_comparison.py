"""Paired comparisons: method minus reference on matched (seed, hard-test problem) pairs, on hand-made job rows."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest

from benchmarks import bench_jobs, evaluation
from benchmarks.bench_config import BenchConfig
from benchmarks.bench_report import paired_differences, write_results
from benchmarks.bootstrap import Difference, bootstrap_pass_at_k_difference, pair_tables
from benchmarks.evaluation import EvalConfig
from soar_env.metrics import pass_at_k
from soar_env.problems import Problem

SAMPLES = 8


def row(seed: int, correct: list[int], ids: list[str] | None = None, **extra) -> dict:
    """A job row as `ProtocolResult.to_dict` writes it (only what the report reads)."""
    entry = {"seed": seed, "correct": correct, "samples": SAMPLES,
             "problem_ids": [f"p{i}" for i in range(len(correct))] if ids is None else ids,
             "pass_at_k": {str(k): sum(pass_at_k(SAMPLES, c, k) for c in correct) / max(len(correct), 1)
                           for k in (1, 4, 8)},
             "student_steps": 10, "tokens": 100, "seconds": 1.0, "note": ""}
    return entry | extra


def spread_rows(shift: int, seeds: int = 3, problems: int = 40, seed: int = 0,
                every: int = 1) -> tuple[list[dict], list[dict]]:
    """(A, B): problems from never to always solved (B); A solves ``shift`` more samples of every ``every``-th."""
    rng = np.random.default_rng(seed)
    difficulty = np.linspace(0, SAMPLES - shift, problems).round().astype(int)
    b_rows, a_rows = [], []
    for s in range(seeds):
        b = np.clip(difficulty + rng.integers(-1, 2, problems), 0, SAMPLES - shift)  # a seed's small luck
        b_rows.append(row(s, b.tolist()))
        a_rows.append(row(s, (b + shift * (np.arange(problems) % every == 0)).tolist()))
    return a_rows, b_rows


def width(found: Difference) -> float:
    return found.high - found.low


# -- the paired bootstrap ---------------------------------------------------------------------------


def test_better_on_every_pair_gives_a_ci_above_zero():
    a_rows, b_rows = spread_rows(shift=1)
    found = bootstrap_pass_at_k_difference(a_rows, b_rows, 1, n_resamples=2000)
    assert found.pairs == 3 * 40
    assert found.mean == pytest.approx(1 / SAMPLES)  # pass@1 = c / n, one more correct sample each
    assert 0 < found.low <= found.mean <= found.high
    worse = bootstrap_pass_at_k_difference(b_rows, a_rows, 1, n_resamples=2000)
    assert worse.high < 0 and worse.mean == pytest.approx(-found.mean)


def test_identical_methods_give_exactly_zero_with_a_zero_width_ci():
    _, b_rows = spread_rows(shift=1)
    for k in (1, 4, 8):
        assert bootstrap_pass_at_k_difference(b_rows, [dict(r) for r in b_rows], k) == Difference(0.0, 0.0, 0.0, 120)
    # Unpaired, the same two methods still get an interval as wide as the problems' spread.
    assert width(bootstrap_pass_at_k_difference(b_rows, b_rows, 1, paired=False, n_resamples=2000)) > 0.1


def test_paired_ci_is_narrower_than_the_unpaired_when_difficulty_varies():
    a_rows, b_rows = spread_rows(shift=1, every=2)  # a small gain (half a sample) beside a wide spread
    paired = bootstrap_pass_at_k_difference(a_rows, b_rows, 1, n_resamples=2000)
    unpaired = bootstrap_pass_at_k_difference(a_rows, b_rows, 1, paired=False, n_resamples=2000)
    assert paired.mean == unpaired.mean and paired.pairs == unpaired.pairs
    assert width(paired) < width(unpaired) / 5
    assert unpaired.low < 0 < paired.low  # only the paired comparison sees that A is better


def test_deterministic_given_a_seed():
    a_rows, b_rows = spread_rows(shift=1, seed=3)
    once = bootstrap_pass_at_k_difference(a_rows, b_rows, 4, n_resamples=500, seed=7)
    assert once == bootstrap_pass_at_k_difference(a_rows, b_rows, 4, n_resamples=500, seed=7)
    assert once != bootstrap_pass_at_k_difference(a_rows, b_rows, 4, n_resamples=500, seed=8)


def test_missing_pairs_are_skipped():
    a_rows = [row(0, [8, 0, 4]), row(1, [8, 0, 4]), row(2, [8, 8, 8]), row(3, [], ids=[])]
    b_rows = [row(0, [0, 4], ids=["p0", "p2"]),  # p1 never tested for B at seed 0
              row(1, [0, 0, 0]),
              {k: v for k, v in row(3, [1, 1, 1]).items() if k not in ("correct", "problem_ids")}]  # no counts
    a, b = pair_tables(a_rows, b_rows, 1)  # seed 2: only A; seed 3: A tested nothing, B kept no counts
    assert a.shape == b.shape == (2, 3)  # seeds 0 and 1, problems p0-p2
    assert np.isnan(a).sum() == np.isnan(b).sum() == 1 and np.isnan(a[0]).sum() == 1  # (0, p1)
    found = bootstrap_pass_at_k_difference(a_rows, b_rows, 1, n_resamples=500)
    assert found.pairs == 5
    assert found.mean == pytest.approx(np.mean([1 - 0, 0.5 - 0.5, 1 - 0, 0 - 0, 0.5 - 0]))
    assert bootstrap_pass_at_k_difference(a_rows, [row(9, [1, 2, 3])], 1) is None  # no seed in common
    # Every present pair differs by exactly 1: no resample may mix in the missing ones as 0.
    always = [row(0, [8] * 4), row(1, [8] * 4)]
    never = [row(0, [0, 0], ids=["p1", "p3"]), row(1, [0], ids=["p2"])]
    assert bootstrap_pass_at_k_difference(always, never, 1, n_resamples=500) == Difference(1.0, 1.0, 1.0, 3)


def test_problems_are_matched_by_id_whatever_their_order():
    a_rows = [row(0, [8, 0, 4], ids=["x", "y", "z"])]
    b_rows = [row(0, [4, 8, 0], ids=["z", "x", "y"])]
    assert bootstrap_pass_at_k_difference(a_rows, b_rows, 1) == Difference(0.0, 0.0, 0.0, 3)
    # Rows written before ids were kept pair by position, as one study tests every method on one list.
    old = [{k: v for k, v in r.items() if k != "problem_ids"} for r in b_rows]
    assert bootstrap_pass_at_k_difference(a_rows, old, 1).pairs == 3
    assert bootstrap_pass_at_k_difference(a_rows, old, 1).mean == pytest.approx((0.5 - 1 + 0.5) / 3)


# -- the report ----------------------------------------------------------------------------------------


def test_report_shows_each_method_minus_hard_only_and_base(tmp_path):
    better, hard_only = spread_rows(shift=1, problems=12)
    _, base = spread_rows(shift=2, problems=12, seed=5)
    rows = {"base-student": base, "hard-only": hard_only, "soar-pq": better}
    bench = BenchConfig(preset="tiny", samples=SAMPLES, plots=False, out=str(tmp_path))
    results = write_results(bench, tmp_path, rows, {}, [], {}, 1.0)
    cell = json.loads((tmp_path / "results.json").read_text())["paired"]["hard-only"]["soar-pq"]["1"]
    assert cell == results["paired"]["hard-only"]["soar-pq"]["1"]
    assert cell["pairs"] == 36 and cell["diff"] == pytest.approx(100 / SAMPLES) and 0 < cell["low"] < cell["high"]
    assert "hard-only" not in results["paired"]["hard-only"]  # a reference is not compared with itself
    text = (tmp_path / "results.md").read_text()
    line = next(x for x in text.splitlines() if x.startswith("| SOAR PQ | Hard-Only |"))
    assert line.count("(36)") == 3  # pass@1, 4 and 8 with 8 samples
    assert f"| SOAR PQ | Base | {results['paired']['base-student']['soar-pq']['1']['diff']:+.1f} [" in text
    assert "SOAR PQ − Hard-Only, paired: pass@1 +12.5 [" in text
    assert text.index("| method | seeds |") < text.index("| method | minus |")  # beside the unpaired table


def test_report_with_old_rows_and_a_missing_reference_does_not_crash(tmp_path):
    old = [{k: v for k, v in row(s, [1, 2, 3]).items() if k not in ("correct", "problem_ids")} for s in range(2)]
    rows = {"base-student": old, "soar-pq": [row(0, [2, 3, 4]), row(1, [0, 1, 2])]}
    bench = BenchConfig(preset="tiny", samples=SAMPLES, plots=False, out=str(tmp_path))
    results = write_results(bench, tmp_path, rows, {}, [], {}, 1.0)
    assert results["paired"]["base-student"]["soar-pq"] == {"1": None, "4": None, "8": None}
    assert results["paired"]["hard-only"]["soar-pq"]["1"] is None  # Hard-Only was not run
    assert results["table"]["base-student"]["pass_at_k"]["1"][0] == pytest.approx(100 * 2 / SAMPLES)
    assert "CI over seeds only" in " ".join(results["table"]["base-student"]["notes"])
    text = (tmp_path / "results.md").read_text()
    assert "| SOAR PQ | Hard-Only | — | — | — |" in text and "| SOAR PQ | Base | — | — | — |" in text
    assert paired_differences({"soar-pq": rows["soar-pq"]})["hard-only"]["soar-pq"]["4"] is None


# -- what the job rows keep ------------------------------------------------------------------------------


def test_job_rows_keep_the_problem_ids_of_their_counts(tmp_path, monkeypatch):
    """The Base row (built in bench_jobs) and every run_pq / run_ps row carry the ids of the tested problems."""
    problems = [Problem(f"q{i}", str(i)) for i in range(5)]
    assert evaluation.hard_test_ids(problems, EvalConfig(test_size=3)) == [p.id for p in problems[:3]]
    import soar_env.student

    tested: list[list[str]] = []

    def fake_test(student, hard_test, settings, *, seed, max_new_tokens=None):
        chosen = evaluation.hard_test_problems(hard_test, settings)
        tested.append([p.id for p in chosen])
        return {1: 0.0}, SimpleNamespace(correct=[0] * len(chosen), tokens=0)

    monkeypatch.setattr(soar_env.student, "build_student", lambda config: object())
    monkeypatch.setattr(evaluation, "test_pass_at_k", fake_test)
    bench = BenchConfig(preset="tiny", methods="base-student", seeds=1, samples=4, test_size=3, out=str(tmp_path))
    job = bench_jobs.run_job(bench, "base-student", 0)
    entry = job["rows"]["base-student"][0]
    assert entry["problem_ids"] == tested[0] and len(entry["problem_ids"]) == len(entry["correct"]) == 3


def test_the_meta_training_table_says_whether_each_teachers_loop_ran(tmp_path):
    """Non-zero reward steps, updates taken (from the job, or an older job's progress.csv) and promotions."""
    from benchmarks.bench_report import meta_training_table

    soar = {"run_dir": "study/soar-seed0", "rewards": [0.0, 0.0078, -0.0078, 0.0], "promotion_steps": [3],
            "pq_size": 16, "updates_skipped": [1.0, 0.0, 0.0, 1.0]}
    (tmp_path / "alp-gmm-seed0").mkdir()
    (tmp_path / "alp-gmm-seed0" / "progress.csv").write_text("step,teacher/update_skipped\n1,1.0\n2,0.0\n")
    alp = {"run_dir": "study/alp-gmm-seed0", "rewards": [0.02, 0.0], "promotion_steps": [], "pq_size": 0}
    text = meta_training_table({"soar": [soar], "alp-gmm": [alp], "random": [{"rewards": []}]}, tmp_path)
    assert "| SOAR | soar-seed0 | 4 | 2/4 | +0.0000 | +0.0078 | 2/4 | 1 | 16 |" in text
    assert "| ALP-GMM | alp-gmm-seed0 | 2 | 1/2 | +0.0100 | +0.0200 | 1/2 | 0 | 0 |" in text
    assert "Random" not in text and meta_training_table({"random": [{"rewards": []}]}, tmp_path) == ""
