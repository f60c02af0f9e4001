"""The vector env: g datasets per step sharing one student and Q_R, promoting together."""

from __future__ import annotations


import gymnasium as gym
import numpy as np
import pytest

import soar_env  # noqa: F401  (registers the ids)
from soar_env.envs.soar_math import SOARMathEnv
from soar_env.envs.testing import ScriptedStudent, ranked_pool
from soar_env.envs.vector import SOARMathVectorEnv

POOL = ranked_pool(10)


def tagged(tag: str, n: int = 2) -> list[dict[str, str]]:
    return [{"question": f"[{tag}] what is {i} + 1?", "answer": str(i + 1)} for i in range(n)]


def gain_by_tag(gains: dict[str, float]):
    """A gain script that reads the dataset's tag, so each dataset k has a known reward."""
    return lambda problems, seed: gains[problems[0].question[1:].split("]")[0]]


def scripted_vec(gains, num_envs=3, **overrides) -> tuple[SOARMathVectorEnv, ScriptedStudent]:
    student = ScriptedStudent(POOL, gains=gain_by_tag(gains), skill=overrides.pop("skill", 0.0))
    settings = {"eval_subset_size": 10, "repeats": 1, **overrides}
    return SOARMathVectorEnv(num_envs, "tiny", student=student, hard_pool=POOL, **settings), student


pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")  # transformers' deprecation notices


def test_make_vec_returns_the_custom_vector_env_on_tiny():
    envs = gym.make_vec("SOAR-MATH-v0", num_envs=2, preset="tiny", repeats=1)
    assert isinstance(envs, SOARMathVectorEnv) and envs.num_envs == 2
    assert envs.horizon == 200 and envs.config.num_datasets == 2
    obs, infos = envs.reset(seed=0)
    assert obs.shape == (2, 5) and obs in envs.observation_space
    obs, rewards, terminations, truncations, infos = envs.step(envs.action_space.sample())
    assert rewards.shape == (2,) and rewards.dtype == np.float64
    assert obs in envs.observation_space and not terminations.any() and not truncations.any()
    assert infos["num_valid"].tolist() == [4, 4] and infos["_num_valid"].all()
    assert len(infos["eval_problems"][0]) == 4
    envs.close()


def test_datasets_share_one_student_and_one_baseline_evaluation():
    envs, student = scripted_vec({"a": 0.1, "b": 0.0, "c": 0.2}, promotion=False, skill=0.3)
    obs, infos = envs.reset(seed=0)
    assert (obs[:, 0] == np.float32(0.3)).all()
    before = student.baseline_evaluations
    _, rewards, _, _, infos = envs.step((tagged("a"), tagged("b"), tagged("c")))
    np.testing.assert_allclose(rewards, [0.1, 0.0, 0.2])
    assert student.baseline_evaluations == before, "Q_R (= the whole pool) was cached at reset"
    # One Q_R for all datasets: the same problems were graded for every trained student.
    assert all(len(c) == 10 for c in infos["trained_correct"][0])
    assert infos["baseline_accuracy"].tolist() == [pytest.approx(0.3)] * 3


def test_joint_promotion_uses_mean_reward_and_best_dataset():
    # mean R = (0.0 + 0.3 + 0.0) / 3 = 0.1 > tau: the best dataset (b) is promoted.
    envs, student = scripted_vec({"a": 0.0, "b": 0.3, "c": 0.0}, promotion_window=1, promotion_threshold=0.05)
    envs.reset(seed=0)
    _, rewards, _, _, infos = envs.step((tagged("a"), tagged("b"), tagged("c")))
    assert infos["promoted_dataset"] == 1 and infos["promoted"].tolist() == [False, True, False]
    assert envs.promotions == 1 and student.baseline["skill"] == pytest.approx(0.3)
    assert [p.question for p in envs.promoted_questions] == [e["question"] for e in tagged("b")]
    assert infos["reward_average"][0] == 0.0, "the window restarts after a promotion by default"


def test_no_joint_promotion_when_mean_is_low_even_if_one_dataset_is_good():
    envs, _ = scripted_vec({"a": -0.2, "b": 0.3, "c": -0.2}, promotion_window=1, promotion_threshold=0.01,
                           skill=0.5)
    envs.reset(seed=0)
    _, _, _, _, infos = envs.step((tagged("a"), tagged("b"), tagged("c")))
    assert infos["promoted_dataset"] == -1 and envs.promotions == 0


def test_median_run_of_best_dataset_is_promoted():
    runs = iter([0.1, 0.2, 0.3, 0.5, 0.9, 0.7])  # dataset a: runs 0.1 0.2 0.3; dataset b: 0.5 0.9 0.7
    student = ScriptedStudent(POOL, gains=lambda problems, seed: next(runs))
    envs = SOARMathVectorEnv(2, "tiny", student=student, hard_pool=POOL, eval_subset_size=10, repeats=3,
                             promotion_window=1)
    envs.reset(seed=0)
    _, rewards, _, _, infos = envs.step((tagged("a"), tagged("b")))
    np.testing.assert_allclose(rewards, [0.2, 0.7])
    assert infos["promoted_dataset"] == 1 and infos["median_run"].tolist() == [1, 2]
    assert student.baseline["skill"] == pytest.approx(0.7)


def test_invalid_dataset_gets_penalty_and_stays_out_of_the_average():
    # Default penalty: the step's reward floor, minus the baseline's Q_R accuracy (0.2, then 0.3
    # once dataset a is promoted), not -1, which would swamp the teacher's advantages.
    envs, student = scripted_vec({"a": 0.1, "c": 0.1}, promotion_window=1, promotion_threshold=0.05, skill=0.2)
    envs.reset(seed=0)
    _, rewards, _, _, infos = envs.step((tagged("a"), [{"question": "", "answer": ""}], tagged("c")))
    np.testing.assert_allclose(rewards, [0.1, -0.2, 0.1])
    assert infos["invalid_action"].tolist() == [False, True, False]
    assert "nothing was trained" in infos["reason"][1]
    assert infos["promoted_dataset"] == 0, "mean over valid datasets (0.1) exceeds tau; ties keep the first"
    # A vector action of the wrong length is rejected for every dataset, never raised.
    _, rewards, _, _, infos = envs.step((tagged("a"),))
    np.testing.assert_allclose(rewards, [-0.3] * 3)
    assert set(infos["reason"]) == {"no valid problem in the action (not_a_batch x1); nothing was trained"}


def test_truncation_and_next_step_autoreset():
    envs, student = scripted_vec({"a": 0.1}, num_envs=2, episode_length=2, promotion_window=1)
    envs.reset(seed=0)
    assert not envs.step((tagged("a"), tagged("a")))[3].any()
    obs, _, _, truncations, _ = envs.step((tagged("a"), tagged("a")))
    assert truncations.all() and (obs[:, 2] == 1.0).all() and envs.promotions == 2
    obs, rewards, _, truncations, infos = envs.step((tagged("a"), tagged("a")))  # the autoreset step
    assert not truncations.any() and (rewards == 0).all() and envs.promotions == 0 and (obs[:, 2] == 0).all()
    assert student.baseline["skill"] == 0.0
    with_limit = SOARMathVectorEnv(2, "tiny", student=student, hard_pool=POOL, max_episode_steps=7)
    assert with_limit.horizon == 7


def test_same_seed_same_vector_rollout():
    def rollout():
        envs, _ = scripted_vec({"a": 0.1, "b": 0.0, "c": 0.2}, promotion_window=2,
                               eval_subset_size=5)
        out = [envs.reset(seed=11)[0]]
        for _ in range(3):
            obs, rewards, *_ = envs.step((tagged("a"), tagged("b"), tagged("c")))
            out += [obs, rewards, [p.id for p in envs.eval_subset]]
        return out

    for a, b in zip(rollout(), rollout()):
        np.testing.assert_equal(a, b)


def test_vector_save_load_round_trip(tmp_path):
    gains = {"a": 0.1, "b": 0.0, "c": 0.2}
    envs, _ = scripted_vec(gains, promotion_window=2, eval_subset_size=5)
    envs.reset(seed=2)
    envs.step((tagged("a"), tagged("b"), tagged("c")))
    envs.save(tmp_path / "vec.pt")
    expected = [envs.step((tagged("a"), tagged("b"), tagged("c")))[:2] for _ in range(2)]

    student = ScriptedStudent(POOL, gains=gain_by_tag(gains))
    resumed = SOARMathVectorEnv.restore(tmp_path / "vec.pt", student=student, hard_pool=POOL)
    assert resumed.step_count == 1 and resumed.num_envs == 3
    got = [resumed.step((tagged("a"), tagged("b"), tagged("c")))[:2] for _ in range(2)]
    for (obs_a, r_a), (obs_b, r_b) in zip(expected, got):
        np.testing.assert_array_equal(obs_a, obs_b)
        np.testing.assert_array_equal(r_a, r_b)
    assert resumed.promotions == envs.promotions == 1


def test_load_names_the_changed_settings(tmp_path):
    envs, _ = scripted_vec({"a": 0.1, "b": 0.0, "c": 0.2}, eval_subset_size=5)
    envs.reset(seed=2)
    envs.save(tmp_path / "vec.pt")
    other, _ = scripted_vec({"a": 0.1, "b": 0.0, "c": 0.2}, eval_subset_size=5, promotion_threshold=0.5)
    with pytest.warns(UserWarning, match=r"other settings \(saved, current\): \{'promotion_threshold': \(0.01, 0.5\)\}"):
        other.load(tmp_path / "vec.pt")
    single = SOARMathEnv("tiny", student=ScriptedStudent(POOL), hard_pool=POOL)
    with pytest.raises(ValueError, match="holds a 'vector' env checkpoint, not a single env's"):
        single.load(tmp_path / "vec.pt")


@pytest.mark.parametrize("make", [
    lambda: scripted_vec({"a": 0.0})[0],
    lambda: SOARMathEnv("tiny", student=ScriptedStudent(POOL), hard_pool=POOL),
], ids=["vector", "single"])
def test_close_frees_the_student_and_the_baseline_cache(make):
    env = make()
    env.reset(seed=0)
    env.close()
    assert env.core._student is None and env.core.baseline_scores_cache.greedy == {}


def test_docstring_example():
    import doctest

    from soar_env.envs import vector

    failures, _ = doctest.testmod(vector, optionflags=doctest.ELLIPSIS)
    assert failures == 0
