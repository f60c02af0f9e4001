"""ALP-GMM: numpy EM, nearest-neighbour learning progress, exact resume, and a teacher that finds progress.

The learning test uses a scripted student whose gain rises with repeated practice on one
region of the generator space (multiplication at difficulty 2) and is zero elsewhere, so
absolute learning progress exists only there: a teacher following it must serve that region
far more often than a uniform draw over the box does.
"""

from __future__ import annotations

import csv
import io
import json

import numpy as np
import pytest
import torch

from agents import ALPGMMTeacher, FunctionCallback, Logger, run_learning
from agents.alp_gmm import nearest_alp
from agents.gmm import fit_mixture, select_mixture
from agents.registry import BUILTIN_TEACHERS, resolve_teacher_class
from agents.testing import check_teacher, scripted_vector_env
from soar_env import cli
from soar_env.data.generators import FAMILIES
from soar_env.problems import Problem, to_problem

pytestmark = pytest.mark.usefixtures("one_thread")

SMALL = ("addition", "multiplication", "fraction")
TARGET = ("multiplication", 2)
"""The region where the scripted student learns: (family, difficulty)."""


def two_clusters(seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centres = np.array([[-4.0, -4.0, 0.0], [4.0, 3.0, 1.0]])
    points = np.vstack([rng.normal(centres[0], 0.5, (120, 3)), rng.normal(centres[1], 0.5, (80, 3))])
    return points, centres, np.array([0.6, 0.4])


def drive(teacher: ALPGMMTeacher, steps: int, g: int = 3, n: int = 4, start: int = 0) -> list[list[tuple[str, str]]]:
    """Propose/update ``steps`` times with a reward that is a fixed function of the proposals (no env)."""
    seen = []
    for step in range(start, start + steps):
        batches = teacher.propose(g, n)
        seen.append([(p.question, p.answer) for batch in batches for p in batch])
        rewards = [0.05 * np.mean([p.meta["difficulty"] == 2 for p in batch]) + 0.01 * (step % 3) for batch in batches]
        teacher.update(np.array(rewards), [{}] * g)
    return seen


# -- the mixture -----------------------------------------------------------------------------------


@pytest.mark.parametrize("covariance", ["full", "diag"])
def test_em_recovers_two_well_separated_clusters(covariance):
    points, centres, weights = two_clusters()
    mixture = fit_mixture(points, 2, np.random.default_rng(1), covariance_type=covariance)
    order = np.argsort(mixture.means[:, 0])
    assert np.allclose(mixture.means[order], centres, atol=0.2)
    assert np.allclose(mixture.weights[order], weights, atol=0.02)
    assert np.allclose(np.diagonal(mixture.covariances[order], axis1=1, axis2=2), 0.25, atol=0.1)
    # BIC does not split a Gaussian cluster further: 2 wins among 2..6.
    chosen = select_mixture(points, range(2, 7), np.random.default_rng(1), criterion="bic", covariance_type=covariance)
    assert chosen.num_components == 2


def test_mixtures_of_degenerate_or_too_few_points_are_usable_or_none():
    rng = np.random.default_rng(0)
    assert fit_mixture(np.zeros((3, 2)), 4, rng) is None  # fewer points than components
    assert select_mixture(np.zeros((1, 2)), range(2, 11), rng) is None
    same = select_mixture(np.ones((6, 3)), range(2, 11), rng)  # identical points: regularised, not singular
    assert same is not None and np.isfinite(same.log_likelihood)
    assert np.isfinite(same.sample(0, rng)).all()
    line = np.column_stack([np.linspace(0, 1, 20), np.zeros(20)])  # a flat direction
    assert np.isfinite(select_mixture(line, range(2, 5), rng).log_likelihood)
    with pytest.raises(ValueError, match="finite"):
        fit_mixture(np.array([[np.nan, 0.0]]), 1, rng)


# -- learning progress -----------------------------------------------------------------------------


def test_alp_is_measured_against_the_nearest_task_of_an_earlier_step():
    past = np.array([[0.0, 0.0], [1.0, 1.0], [0.9, 0.9]])
    assert nearest_alp(np.array([0.95, 1.0]), 0.5, past, np.array([0.1, 0.2, 0.4])) == pytest.approx(0.3)
    # A task with a NaN reward is never the neighbour; a NaN reward has no ALP; nothing seen: 0.
    assert nearest_alp(np.array([0.95, 1.0]), 0.5, past, np.array([0.1, 0.2, np.nan])) == pytest.approx(0.3)
    assert np.isnan(nearest_alp(np.zeros(2), float("nan"), past, np.zeros(3)))
    assert nearest_alp(np.zeros(2), 0.7, past[:0], np.zeros(0)) == 0.0

    teacher = ALPGMMTeacher(SMALL, seed=0)
    teacher.propose(2, 3)
    teacher.update(np.array([0.1, 0.3]), [{}, {}])
    assert teacher.alps.tolist() == [0.0, 0.0]  # same step: same baseline, no progress to compare
    teacher.propose(1, 3)
    teacher.update(np.array([0.5]), [{}])
    first, second, third = teacher.tasks
    nearest = 0 if np.sum((third - first) ** 2) < np.sum((third - second) ** 2) else 1
    assert teacher.alps[2] == pytest.approx(abs(0.5 - [0.1, 0.3][nearest]))


# -- proposals, determinism, resume, bad rewards ---------------------------------------------------


def test_proposals_are_well_formed_datasets_of_the_requested_size():
    teacher = ALPGMMTeacher(SMALL, fit_every=4, seed=0)
    drive(teacher, 6)
    assert teacher.mixture is not None and teacher.num_fits >= 2
    for g, n in ((1, 1), (3, 5), (2, 16)):
        batches = teacher.propose(g, n)
        assert len(batches) == g and all(len(batch) == n for batch in batches)
        for batch in batches:
            assert all(isinstance(to_problem(p), Problem) for p in batch)
            assert {p.meta["family"] for p in batch} <= set(SMALL)
            assert len({p.meta["difficulty"] for p in batch}) == 1  # one task: one level
        teacher.update(np.zeros(g), [{}] * g)
    assert teacher.tasks.shape == (18 + 1 + 3 + 2, len(SMALL) + 1) and np.abs(teacher.tasks).max() <= 1.0


def test_same_seed_same_proposals_and_another_seed_differs():
    runs = [drive(ALPGMMTeacher(SMALL, fit_every=4, seed=seed), 8) for seed in (3, 3, 4)]
    assert runs[0] == runs[1]
    assert runs[0] != runs[2]


def test_a_checkpoint_continues_exactly_the_same_run():
    teacher = ALPGMMTeacher(SMALL, fit_every=4, seed=0)
    drive(teacher, 5)
    buffer = io.BytesIO()
    torch.save(teacher.state_dict(), buffer)  # as run_learning's checkpoints do
    expected = drive(teacher, 6, start=5)
    assert teacher.num_fits >= 4  # the continuation refits: history, mixture and RNG all matter
    buffer.seek(0)
    resumed = ALPGMMTeacher(SMALL, fit_every=4, seed=99)
    resumed.load_state_dict(torch.load(buffer, weights_only=False))
    assert drive(resumed, 6, start=5) == expected
    with pytest.raises(ValueError, match="families"):
        ALPGMMTeacher(("addition",)).load_state_dict(teacher.state_dict())


def test_non_finite_rewards_are_recorded_and_never_fitted():
    teacher = ALPGMMTeacher(SMALL, fit_every=3, seed=0)
    for step in range(8):
        teacher.propose(3, 2)
        metrics = teacher.update(np.array([np.nan, np.inf, 0.02 * step]), [{}] * 3)
        assert metrics["nonfinite_rewards"] == 2.0 and np.isfinite(list(metrics.values())).all()
    assert np.isnan(teacher.rewards[0::3]).all() and np.isnan(teacher.rewards[1::3]).all()
    assert np.isnan(teacher.alps[0::3]).all() and np.isfinite(teacher.alps[2::3]).all()
    assert teacher.mixture is not None  # fitted on the finite third
    assert teacher.mixture.num_points == 8
    # Only NaN: no fit at all, proposals keep coming (uniformly).
    blind = ALPGMMTeacher(SMALL, fit_every=2, seed=0)
    for _ in range(4):
        assert len(blind.propose(2, 3)) == 2
        blind.update(np.array([np.nan, np.nan]), [{}, {}])
    assert blind.mixture is None and blind.num_fits == 0


def test_bad_settings_and_calls_are_clear_errors():
    for kwargs, message in (({"families": ["algebra"]}, "unknown families"), ({"fit_every": 0}, "fit_every"),
                            ({"random_fraction": 1.5}, "random_fraction"), ({"covariance": "tied"}, "covariance"),
                            ({"criterion": "loo"}, "criterion"), ({"max_components": 1}, "max_components"),
                            ({"reg_covar": 0.0}, "reg_covar"), ({"bootstrap": -1}, "bootstrap")):
        with pytest.raises(ValueError, match=message):
            ALPGMMTeacher(**kwargs)
    teacher = ALPGMMTeacher()
    assert teacher.dim == len(FAMILIES) + 1
    with pytest.raises(RuntimeError, match="propose"):
        teacher.update(np.zeros(2), [{}, {}])
    teacher.propose(2, 2)
    with pytest.raises(ValueError, match="3 rewards for 2"):
        teacher.update(np.zeros(3), [{}] * 3)


def test_alp_gmm_passes_the_teacher_conformance_check():
    check_teacher(lambda: ALPGMMTeacher(SMALL, fit_every=2, bootstrap=2, seed=0))


# -- learning --------------------------------------------------------------------------------------


def practice_gain():
    """Gain grows with the practice the student has had on TARGET (its share of each dataset), nothing elsewhere."""
    practice = [0.0]

    def gain(problems, seed):
        share = float(np.mean([(p.meta.get("family"), p.meta.get("difficulty")) == TARGET for p in problems]))
        practice[0] += share
        return 0.5 * share * min(1.0, practice[0] / 40.0)

    return gain


def target_share(teacher: ALPGMMTeacher, steps: int = 40, last: int = 10) -> float:
    """Share of TARGET problems among those proposed in the last ``last`` of ``steps`` steps."""
    shares: list[float] = []

    def count(record):
        problems = [p for batch in record.batches for p in batch]
        shares.append(float(np.mean([(p.meta["family"], p.meta["difficulty"]) == TARGET for p in problems])))

    env = scripted_vector_env(num_datasets=4, problems_per_dataset=8, gains=practice_gain(), promotion=False)
    run_learning(teacher, env, steps, seed=0, progress_bar=False, logger=Logger(None, writers=()),
                 callback=FunctionCallback(count))
    return float(np.mean(shares[-last:]))


THRESHOLD = 0.2
"""A uniform draw over the box serves TARGET about 1/3 x 1/4 = 0.08 of the time."""


def test_alp_gmm_serves_the_region_where_the_student_makes_progress():
    assert target_share(ALPGMMTeacher(SMALL, random_fraction=1.0, seed=0)) < THRESHOLD  # uniform: the control
    for seed in (0, 1):
        assert target_share(ALPGMMTeacher(SMALL, seed=seed)) > THRESHOLD


# -- the command line ------------------------------------------------------------------------------


def test_soar_train_runs_and_resumes_the_alp_gmm_teacher(tmp_path, capsys):
    assert "alp-gmm" in BUILTIN_TEACHERS and resolve_teacher_class("alp-gmm") is ALPGMMTeacher
    run_dir = tmp_path / "run"
    common = ["--no-progress", "--threads", "1", "--eval-train-size", "2", "--eval-test-size", "2"]
    assert cli.main(["train", "--teacher", "alp-gmm", "--preset", "tiny", "--steps", "2", "--run-dir", str(run_dir),
                     *common]) == 0
    assert "soar train summary (alp-gmm, preset tiny)" in capsys.readouterr().out
    assert cli.main(["train", "--resume", str(run_dir), "--steps", "3", *common]) == 0
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["teacher"] == "alp-gmm" and summary["steps"] == 3 and len(summary["reward_trajectory"]) == 3
    rows = list(csv.DictReader((run_dir / "progress.csv").open()))
    assert [r["step"] for r in rows] == ["1", "2", "3"]
    assert all(r["teacher/uniform_fraction"] == "1.0" for r in rows)  # still bootstrapping (8 tasks)
    assert "teacher/alp_mean" in rows[0]
    state = torch.load(run_dir / "checkpoints" / "step_000003" / "teacher.pt", weights_only=False)
    # The resumed run kept the history of steps 1-2; its box spans the tiny hard set's two families.
    assert state["families"] == ["addition", "multiplication"] and state["tasks"].shape == (6, 3)
