"""benchmarks.reward_signal: the dataset panel, the report's statistics, resumable jobs (tiny preset, seconds)."""

from __future__ import annotations

import dataclasses
import json
from collections import Counter

import numpy as np
import pytest


from benchmarks import reward_signal
from benchmarks.reward_panel import CONTROLS, PanelInputs, build_dataset, panel_names, select_datasets
from benchmarks.reward_report import detection_power, pooled_power, spearman, summarize
from benchmarks.reward_signal import SettingsMismatch, SignalConfig, job_path, run_study
from soar_env.estimators import REWARD_ESTIMATORS, QRScores
from soar_env.problems import Problem

pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------------------------------------
# The panel
# ---------------------------------------------------------------------------------------------


def test_every_panel_dataset_builds_and_means_what_its_name_says():
    hard = [Problem(f"hard {i}: what is {i} * 997?", str(997 * i), source="hard") for i in range(40)]
    q_r = hard[:32]
    teacher = [Problem(f"teacher {i}", str(i), source="teacher") for i in range(20)]
    inputs = PanelInputs(16, hard, teacher)
    for name in panel_names():
        problems = build_dataset(name, 3, q_r, inputs)
        assert problems == build_dataset(name, 3, q_r, inputs), f"{name} is not reproducible"
        assert all(isinstance(p, Problem) and p.question and p.answer for p in problems), name
        expected = {"empty": 0, "hard-only": 8}.get(name, 16)
        assert len(problems) == expected, name
        if name.startswith("stones-"):
            family, level = name.split("-")[1], int(name.split("-d")[1])
            assert all(p.meta["difficulty"] == level for p in problems)
            assert family == "mixed" or all(p.meta["family"] == family for p in problems)
            assert problems != build_dataset(name, 4, q_r, inputs), "another run must draw other problems"
    # hard-only leaves the run's Q_R out; base-teacher draws from the stored pool
    assert {p.id for p in build_dataset("hard-only", 0, q_r, inputs)} == {p.id for p in hard[32:]}
    assert set(build_dataset("base-teacher", 0, q_r, inputs)) <= set(teacher)
    # shuffled: the same answers, moved so that no problem keeps its own
    shuffled = build_dataset("shuffled", 0, q_r, inputs)
    assert Counter(p.answer for p in shuffled) == Counter(p.meta["true_answer"] for p in shuffled)
    assert all(p.answer != p.meta["true_answer"] for p in shuffled)
    assert len(set(build_dataset("degenerate", 0, q_r, inputs))) == 1
    with pytest.raises(ValueError, match="teacher's sample pool"):
        build_dataset("base-teacher", 0, q_r, PanelInputs(16, hard))


def test_dataset_selection():
    assert select_datasets("stones-mixed-*") == ["stones-mixed-d1", "stones-mixed-d2", "stones-mixed-d3"]
    assert select_datasets("controls,empty") == list(CONTROLS)
    assert len(select_datasets("all")) == len(panel_names())
    with pytest.raises(ValueError, match="unknown dataset 'stones-fractions-d1'"):
        select_datasets("stones-fractions-d1")


# ---------------------------------------------------------------------------------------------
# The report's statistics, on hand-made numbers
# ---------------------------------------------------------------------------------------------


def test_detection_power_counts_ties_half_over_paired_runs():
    a = {0: 1.0, 1: 0.0, 2: 0.5, 3: 0.5, 7: 9.0}
    b = {0: 0.0, 1: 1.0, 2: 0.5, 3: 0.2, 8: -9.0}  # runs 7 and 8 have no partner
    assert detection_power(a, b) == (2.5 / 4, 4)
    assert detection_power({0: 0.0}, {0: 0.0}) == (0.5, 1)
    assert detection_power({0: 1.0}, {1: 0.0}) == (None, 0)
    assert pooled_power([({0: 1.0, 1: 1.0}, {0: 0.0, 1: 0.0}), ({0: 0.0}, {0: 1.0})]) == (2 / 3, 3)


def test_spearman_on_known_values():
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    # ties take the mean rank: x ranks (1, 2.5, 2.5, 4), y ranks (1, 3, 2, 4): rho = 4.5 / sqrt(4.5 * 5)
    assert spearman([1, 2, 2, 3], [1, 3, 2, 4]) == pytest.approx(4.5 / np.sqrt(22.5))
    assert spearman([1, 1, 1], [1, 2, 3]) is None and spearman([1, 2], [2, 1]) is None


def _scores(correct):
    return dataclasses.asdict(QRScores("greedy", list(correct), 1, [], [], 0.5, 0))


def _fake_scores(correct):
    # Every estimator's entry: greedy/sampled from `correct`, likelihood from the same numbers as log-probs.
    entry = {e: _scores(correct) for e in REWARD_ESTIMATORS}
    entry["sampled"] = dataclasses.asdict(QRScores("sampled", list(correct), 1, [], [], 0.5, 0))
    entry["likelihood"] = dataclasses.asdict(QRScores("likelihood", [], 0, [float(c) for c in correct],
                                                      [0.0] * len(correct), 0.5, 0))
    return entry


def test_summary_of_hand_made_jobs():
    """Greedy gains per run: stones +0.5, +0.25, 0; ill-posed 0, +0.25, 0; empty 0 (unchanged)."""
    zero = [0, 0, 0, 0]
    jobs = {"baseline": {r: {"scores": _fake_scores(zero)} for r in range(3)}, "downstream": {}, "scores": {}}
    gains = {"stones-mixed-d1": ([1, 1, 0, 0], [1, 0, 0, 0], zero), "ill-posed": (zero, [0, 1, 0, 0], zero),
             "empty": (zero, zero, zero)}
    for name, per_run in gains.items():
        jobs["scores"][name] = {r: {"scores": _fake_scores(c), "unchanged": name == "empty", "size": 4,
                                    "train": {"seconds": 2.0, "error": None}} for r, c in enumerate(per_run)}
    results = summarize(jobs)
    stones = results["datasets"]["stones-mixed-d1"]["estimators"]["greedy"]
    assert stones["mean_sd"][0] == pytest.approx(0.25) and stones["n"] == 3
    assert stones["mean_sd"][1] == pytest.approx(0.25)
    # stones vs ill-posed: run 0 win, run 1 tie, run 2 tie -> (1 + 0.5 + 0.5) / 3
    assert results["power"]["stones-mixed-d1"]["ill-posed"]["greedy"] == {"p": pytest.approx(2 / 3), "n": 3}
    assert results["power"]["stones-mixed-d1"]["empty"]["greedy"]["p"] == pytest.approx(2.5 / 3)
    # noise: the ill-posed runs' greedy gains 0, +0.25, 0 -> mean + 2 sd = 1/12 + 2 * sqrt(1/48)
    assert results["noise"]["greedy"] == pytest.approx(1 / 12 + 2 * np.sqrt(1 / 48))
    assert stones["above_noise"] == pytest.approx(1 / 3)  # only run 0's +0.5 clears 0.372
    assert results["datasets"]["ill-posed"]["estimators"]["greedy"]["above_noise"] == 0.0
    # seconds per estimate: 3 baselines + 6 changed states, 0.5 s each; the unchanged empty runs are not scored
    assert results["seconds_per_estimate"]["greedy"] == {"mean_sd": (0.5, 0.0), "n": 9}
    # downstream ranks: stones > ill-posed > empty in both -> rho 1 for greedy
    jobs["downstream"] = {n: {0: {"pass_at_k": {"1": v / 2, "4": v}, "train_seconds": 1.0}}
                          for n, v in (("stones-mixed-d1", 0.3), ("ill-posed", 0.2), ("empty", 0.1))}
    results = summarize(jobs)
    assert results["downstream"]["stones-mixed-d1"]["value"] == 0.3 and results["downstream"]["empty"]["k"] == 4
    assert results["spearman"]["greedy"] == {"rho": pytest.approx(1.0), "datasets": 3}


# ---------------------------------------------------------------------------------------------
# End to end on the tiny preset: jobs, resume after a kill, settings refused
# ---------------------------------------------------------------------------------------------


class Killed(BaseException):
    """What a killed process looks like to the study: not an error it may catch and go on from."""


class CountingStudent:
    """The real tiny student, counting train calls; raises Killed on call ``kill_at`` (0-based)."""

    def __init__(self, student, kill_at=None):
        self.inner, self.kill_at, self.calls = student, kill_at, 0

    def train(self, *args, **kwargs):
        if self.kill_at is not None and self.calls == self.kill_at:
            raise Killed()
        self.calls += 1
        return self.inner.train(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.inner, name)


def _factory(made, kill_at=None):
    def build(config):
        from soar_env.student import build_student

        made.append(CountingStudent(build_student(config), kill_at))
        return made[-1]

    return build


DATASETS = "stones-mixed-d1,hard-only,ill-posed,shuffled,base-teacher,empty,degenerate"


def test_tiny_study_resumes_after_a_kill_and_reports(tmp_path):
    cfg = SignalConfig(preset="tiny", datasets=DATASETS, runs=2, overrides={"estimator_samples": 2}, downstream=True,
                       downstream_samples=2, downstream_test_size=4, out="t", root=str(tmp_path))
    made: list = []
    with pytest.raises(Killed):  # killed during the 4th training: run 0's baseline and 3 datasets are done
        run_study(cfg, _factory(made, kill_at=3))
    folder = cfg.folder
    done = sorted(p.name for p in (folder / "jobs").glob("*.json"))
    assert done == ["baseline-run0.json", "hard-only-run0.json", "ill-posed-run0.json", "stones-mixed-d1-run0.json"]
    kept = {name: (folder / "jobs" / name).read_text() for name in done}
    assert (folder / "teacher_samples.json").exists() is False  # base-teacher comes later in the plan

    made.clear()
    results = run_study(cfg, _factory(made))
    # finished jobs are never recomputed: every dataset and downstream job calls train once (the empty
    # dataset's too, which finds no problem), 2 x 7 + 7 in all, of which 3 were kept
    assert made[0].calls == 2 * 7 + 7 - 3
    assert all((folder / "jobs" / name).read_text() == text for name, text in kept.items())
    assert not results["failed"] and not results["skipped"]
    rows = results["datasets"]
    assert set(rows) == set(DATASETS.split(",")) and all(len(r["runs"]) == 2 for r in rows.values())
    assert rows["empty"]["unchanged_runs"] == 2
    assert rows["hard-only"]["size"] == [4]  # n of the 12 hard-train problems outside Q_R
    for e in REWARD_ESTIMATORS:
        assert rows["empty"]["estimators"][e]["mean_sd"] == (0.0, 0.0)
        assert np.isfinite(rows["stones-mixed-d1"]["estimators"][e]["mean_sd"][0])
    job = json.loads(job_path(folder, "scores", 1, "shuffled").read_text())
    assert job["q_r"] == json.loads(job_path(folder, "baseline", 1).read_text())["q_r"]  # one Q_R per run
    assert results["spearman"]["greedy"]["datasets"] == 7
    text = (folder / "results.md").read_text()
    assert "Detection power" in text and "machine:" in text and "vs shuffled" in text and "Spearman" in text
    assert json.loads((folder / "results.json").read_text())["datasets"].keys() == rows.keys()
    pool = json.loads((folder / "teacher_samples.json").read_text())  # Base-T, sampled once at the tiny preset
    assert 0 < pool["info"]["kept"] == len(pool["problems"]) <= pool["info"]["asked"] == 16


def test_a_scripted_student_that_learns_only_from_stepping_stones_is_detected(tmp_path):
    """Stepping stones lift the scripted student's skill to 1; every non-empty dataset also lifts the
    log-prob of any answer by 0.3 (format). Every estimator must rank the stones first, and the
    likelihood estimator must give the format-only datasets ~0."""
    from soar_env.data.hardset import load_hard_pool
    from soar_env.envs.testing import ScriptedStudent

    def stones(problems, seed):  # the tiny hard pool is generated too, at difficulty 3
        return 1.0 if problems and problems[0].source.startswith("generator:") and problems[0].meta["difficulty"] == 1 \
            else 0.0

    def factory(config):
        return ScriptedStudent(load_hard_pool(config), gains=stones, success_rate=0.0,
                               format_gains=lambda problems, seed: 0.3 if problems else 0.0)

    cfg = SignalConfig(preset="tiny", datasets="stones-mixed-d1,ill-posed,shuffled,hard-only,empty", runs=4,
                       out="scripted", root=str(tmp_path))
    results = run_study(cfg, factory)
    rows = results["datasets"]
    for e in REWARD_ESTIMATORS:
        assert rows["stones-mixed-d1"]["estimators"][e]["mean_sd"][0] == pytest.approx(1.0), e
        for control in ("ill-posed", "shuffled", "hard-only", "empty"):
            assert rows[control]["estimators"][e]["mean_sd"] == pytest.approx((0.0, 0.0)), (e, control)
            assert results["power"]["stones-mixed-d1"][control][e] == {"p": 1.0, "n": 4}
    assert rows["shuffled"]["unchanged_runs"] == 0 and rows["empty"]["unchanged_runs"] == 4


def test_other_settings_into_the_same_folder_are_refused(tmp_path, capsys):
    cfg = SignalConfig(preset="tiny", datasets="empty", runs=1, out="s", root=str(tmp_path))
    run_study(cfg)
    assert job_path(cfg.folder, "scores", 0, "empty").exists()
    changed = dataclasses.replace(cfg, overrides={"inner_steps": 2})
    with pytest.raises(SettingsMismatch, match="env.inner_steps"):
        run_study(changed)
    with pytest.raises(SystemExit, match="env.inner_steps"):
        reward_signal.main(["--preset", "tiny", "--datasets", "empty", "--runs", "1", "--out", "s", "--root",
                            str(tmp_path), "--set", "inner_steps=2"])
    # more runs, other datasets or a budget are not settings: they add jobs to the same folder
    results = run_study(dataclasses.replace(cfg, runs=2, datasets="empty,degenerate", budget_minutes=0.0))
    assert results["skipped"] == ["degenerate-run0", "baseline-run1", "empty-run1", "degenerate-run1"]
    with pytest.raises(ValueError, match="unknown EnvConfig setting"):
        SignalConfig(preset="tiny", overrides={"inner_step": 2})


def test_cut_off_hits_splits_right_answers_by_how_the_reply_ended(tmp_path, monkeypatch, capsys):
    """Every reply graded right: the probe's right answers are all rows, and those cut off are the rows
    that did not finish; the student grades as before afterwards."""
    import soar_env.student as student_module
    from benchmarks import cut_off_hits
    from soar_env.verify import Grade

    monkeypatch.setattr(student_module, "grade_many", lambda texts, golds, **kw: [Grade("correct", "1")] * len(texts))
    study = cut_off_hits.Study(SignalConfig(preset="tiny", out="cut", root=str(tmp_path)))
    result = cut_off_hits.probe(study, "stones-mixed-d1", 0)
    train, q_r = result["train"], result["q_r"]
    assert train["rows"] == study.config.inner_steps * study.config.batch_size * study.config.group_size
    for counts in (train, q_r):
        assert counts["correct"] == counts["rows"] and counts["correct_cut_off"] == counts["rows"] - counts["finished"]
    assert q_r["rows"] == study.config.eval_subset_size == len(result["q_r_hits"])
    assert "grade_replies" not in vars(study.student)
    assert cut_off_hits.main(["--preset", "tiny", "--out", "cut", "--root", str(tmp_path), "shuffled:1"]) == 0
    assert "| shuffled-run1 |" in capsys.readouterr().out
