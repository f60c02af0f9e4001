"""SOAR-MATH-v0: registration, configs, Gymnasium conformance, rewards, promotion, checkpoints.

Tests that need a real model use the tiny preset (a random llama built in-process); the
promotion and reward logic is tested with `ScriptedStudent`, whose rewards are known exactly.
"""

from __future__ import annotations

import doctest

import gymnasium as gym
import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env

import soar_env
from soar_env import rewards
from soar_env.config import PRESETS, EnvConfig, make_config
from soar_env.envs import soar_math, spaces
from soar_env.envs.soar_math import SOARMathEnv
from soar_env.envs.spaces import OBS_FIELDS
from soar_env.envs.testing import ScriptedStudent, ranked_pool
from soar_env.problems import Problem

POOL = ranked_pool(10)


def scripted_env(gains=(0.0,), **overrides) -> tuple[SOARMathEnv, ScriptedStudent]:
    """An env over a 10-problem pool with Q_R = the whole pool, so accuracy = skill exactly."""
    student = ScriptedStudent(POOL, gains=gains, skill=overrides.pop("skill", 0.0))
    settings = {"eval_subset_size": 10, "repeats": 1, "problems_per_dataset": 2, **overrides}
    return SOARMathEnv("tiny", student=student, hard_pool=POOL, **settings), student


def batch(tag: str = "x", n: int = 2) -> list[dict[str, str]]:
    return [{"question": f"What is {i} + {tag}?", "answer": str(i)} for i in range(n)]


pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")  # transformers' deprecation notices


# --- configs and registration ------------------------------------------------------------------


def test_paper_preset_has_the_paper_numbers():
    c = PRESETS["paper"]
    assert (c.num_datasets, c.problems_per_dataset, c.repeats, c.eval_subset_size) == (4, 64, 4, 64)
    assert (c.promotion_threshold, c.promotion_window) == (0.01, 3)
    assert (c.inner_steps, c.inner_steps_after_promotion, c.batch_size, c.group_size) == (10, 15, 8, 32)
    assert (c.learning_rate, c.kl_coef, c.temperature, c.max_new_tokens) == (1e-5, 1e-3, 1.0, 1024)
    assert c.reward_estimator == "greedy" and c.require_box and c.reward_mode == "grounded" and c.intrinsic_samples == 32
    assert c.grade_unfinished and c.accept_unevaluated  # the paper's grader reads every reply, symbolically
    assert c.student_model == "meta-llama/Llama-3.2-3B-Instruct" and c.episode_length == 200
    assert PRESETS["cpu"].student_model == "smollm2-135m-instruct" and not PRESETS["cpu"].require_box
    assert PRESETS["cpu"].hardset == "bundled-edge" and PRESETS["tiny"].student_model == "tiny"


def test_a_setting_added_later_keeps_older_results_loadable():
    """measured_settings, the key studies keep jobs under, leaves out grade_unfinished while it is True
    (what every result before it was measured with) and names it once it is False."""
    assert "grade_unfinished" not in make_config("tiny").measured_settings()
    assert make_config("tiny", grade_unfinished=False).measured_settings()["grade_unfinished"] is False
    assert make_config("cpu").measured_settings()["grade_unfinished"] is False
    assert "backend" not in make_config("tiny").measured_settings()  # scheduling never decides a result


def test_make_config_rejects_unknown_keys_and_bad_values():
    assert make_config("tiny", repeats=3).repeats == 3
    assert PRESETS["tiny"].repeats == 2, "make_config must not change the preset itself"
    with pytest.raises(ValueError, match=r"'repeat' \(did you mean 'repeats'\?\).*valid settings:.*num_datasets"):
        make_config("tiny", repeat=3)
    with pytest.raises(ValueError, match="unknown preset 'huge'; valid presets: tiny, cpu, paper"):
        make_config("huge")
    with pytest.raises(ValueError, match="reward_mode"):
        make_config("tiny", reward_mode="novelty")
    with pytest.raises(ValueError, match="repeats"):
        make_config("tiny", repeats=0)
    with pytest.raises(ValueError, match="backend"):
        make_config("tiny", backend="spark")


def test_registration_and_make_paths():
    assert "SOAR-MATH-v0" in gym.registry and "SOAR-MATH-Param-v0" in gym.registry
    spec = gym.spec("SOAR-MATH-v0")
    assert spec.max_episode_steps == EnvConfig().episode_length == 200
    assert spec.vector_entry_point == "soar_env.envs.vector:SOARMathVectorEnv"
    env = gym.make("soar_env:SOAR-MATH-v0")  # default preset, model not loaded until reset
    assert env.unwrapped.config == PRESETS["cpu"]
    env = gym.make("SOAR-MATH-v0", preset="tiny", repeats=1, promotion_threshold=0.02)
    assert (env.unwrapped.config.repeats, env.unwrapped.config.promotion_threshold) == (1, 0.02)
    with pytest.raises(ValueError, match="valid settings"):
        gym.make("SOAR-MATH-v0", preset="tiny", repeatz=1)


# --- Gymnasium conformance on the real tiny model -------------------------------------------------


def test_check_env_passes_on_tiny():
    env = gym.make("SOAR-MATH-v0", preset="tiny", repeats=1)
    check_env(env.unwrapped)


def test_same_seed_same_observations_and_rewards():
    def rollout() -> list:
        env = gym.make("SOAR-MATH-v0", preset="tiny")
        obs, info = env.reset(seed=7)
        out = [obs, [p.id for p in info["eval_problems"]]]
        env.action_space.seed(7)
        for _ in range(2):
            obs, reward, _, _, info = env.step(env.action_space.sample())
            out += [obs, reward, info["train_rewards"], info["trained_correct"], info["tokens"]]
        return out

    first, second = rollout(), rollout()
    for a, b in zip(first, second):
        np.testing.assert_equal(a, b)


def test_step_info_on_tiny_and_observation_layout():
    env = gym.make("SOAR-MATH-v0", preset="tiny", render_mode="ansi")
    obs, info = env.reset(seed=0)
    assert obs.dtype == np.float32 and obs.shape == (len(OBS_FIELDS),)
    assert len(info["eval_problems"]) == 4 and 0.0 <= info["baseline_accuracy"] <= 1.0
    action = list(env.action_space.sample()) + [{"question": "", "answer": "1"}]
    obs, reward, terminated, truncated, info = env.step(action)
    assert isinstance(reward, float) and not terminated and not truncated
    assert info["num_valid"] == 4 and info["rejected"][0]["reason"] == "empty_question"
    assert info["rejected"][0]["index"] == 4
    assert len(info["run_rewards"]) == 2 and len(info["trained_correct"]) == 2
    assert info["reward"] == pytest.approx(np.mean(info["run_rewards"]))
    assert info["tokens"] > 0 and info["timings"].total > 0
    assert obs[2] == pytest.approx(1 / 200)
    assert "step 1/200" in env.render()


def test_env_truncates_at_episode_length():
    env, _ = scripted_env(episode_length=2)
    env.reset(seed=0)
    assert env.step(batch())[3] is False
    assert env.step(batch())[3] is True


# --- rewards ----------------------------------------------------------------------------------------


def test_grounded_reward_is_mean_gain_over_runs():
    env, student = scripted_env(gains=[0.1, 0.3, 0.2], repeats=3, skill=0.2, promotion=False)
    obs, info = env.reset(seed=0)
    assert info["baseline_accuracy"] == pytest.approx(0.2) and obs[0] == pytest.approx(0.2)
    _, reward, _, _, info = env.step(batch())
    assert info["trained_accuracy"] == pytest.approx([0.3, 0.5, 0.4])
    assert info["run_rewards"] == pytest.approx([0.1, 0.3, 0.2])
    assert reward == pytest.approx(0.2)
    assert [c["steps"] for c in student.train_calls] == [1, 1, 1]
    assert len({c["seed"] for c in student.train_calls}) == 3, "each run gets its own seed"


def test_unchanged_or_failed_runs_reuse_the_baseline_evaluation():
    env, student = scripted_env(gains=[0.0, 0.1], repeats=2, skill=0.3, promotion=False)
    student.fail_runs = {2}
    env.reset(seed=0)
    student.eval_calls.clear()
    _, _, _, _, info = env.step(batch())           # run 0 unchanged, run 1 trained
    assert info["run_rewards"] == pytest.approx([0.0, 0.1])
    assert sum(not c["baseline"] for c in student.eval_calls) == 1
    _, _, _, _, info = env.step(batch())           # run 2 fails, run 3 unchanged
    assert info["run_rewards"] == pytest.approx([0.0, 0.1])
    assert any("non_finite" in e for e in info["errors"])


@pytest.mark.parametrize("mode,expected", [("learnability", 0.75), ("variance", 0.1875)])
def test_intrinsic_modes(mode, expected):
    student = ScriptedStudent(POOL, success_rate=0.25)
    env = SOARMathEnv("tiny", student=student, hard_pool=POOL, reward_mode=mode, intrinsic_samples=8)
    env.reset(seed=0)
    _, reward, _, _, info = env.step(batch(n=3))
    assert reward == pytest.approx(expected)
    assert info["success_rates"] == [0.25, 0.25, 0.25]
    assert not student.train_calls, "intrinsic modes sample the student, they do not train it"
    assert student.eval_calls[-2]["samples"] == 8 and not student.eval_calls[-2]["greedy"]


def test_reward_functions():
    assert rewards.learnability(0.0) == 0.0 and rewards.learnability(0.25) == 0.75
    assert rewards.learnability_reward([0.0, 1.0, 0.5]) == pytest.approx(0.5 / 3)
    assert rewards.variance_reward([0.5, 0.0]) == pytest.approx(0.125)
    assert rewards.grounded_reward([0.3, 0.1], 0.1) == pytest.approx(0.1)
    assert rewards.median_run([0.1, 0.3, 0.2]) == 2
    assert rewards.median_run([0.4, 0.1, 0.3, 0.2]) == 3, "even r: the lower of the two middle runs"
    assert rewards.median_run([0.2, 0.2, 0.2]) == 1


# --- invalid actions ----------------------------------------------------------------------------------


def test_all_invalid_action_gets_penalty_and_trains_nothing():
    env, student = scripted_env(invalid_penalty=-0.5)
    env.reset(seed=0)
    obs, reward, _, _, info = env.step([{"question": "   ", "answer": "1"}, None])
    assert reward == -0.5 and info["invalid_action"] and "nothing was trained" in info["reason"]
    assert {r["reason"] for r in info["rejected"]} == {"empty_question", "wrong_type"}
    assert not student.train_calls
    assert obs[4] == pytest.approx(-0.5)
    assert env.unwrapped.core.tracker.history == [], "invalid steps do not enter the promotion window"


def test_too_many_problems_are_cut_at_the_limit():
    env, student = scripted_env(max_problems=5)
    env.reset(seed=0)
    _, _, _, _, info = env.step(batch(n=5000))
    assert info["num_valid"] == 5 and info["rejected"][-1]["reason"] == "too_many_problems"
    assert len(student.train_calls[0]["problems"]) == 5


# --- promotion --------------------------------------------------------------------------------------


def test_promotion_needs_a_full_window_over_tau():
    env, student = scripted_env(gains=[0.1], promotion_window=3, promotion_threshold=0.05)
    env.reset(seed=0)
    promoted = [env.step(batch(str(i)))[4]["promoted"] for i in range(3)]
    assert promoted == [False, False, True]
    assert env.promotions == 1 and student.baseline["skill"] == pytest.approx(0.1)
    assert [p.question for p in env.promoted_questions] == [p["question"] for p in batch("2")]


def test_no_promotion_when_average_is_at_or_below_tau():
    env, _ = scripted_env(gains=[0.1, 0.0, 0.0], promotion_window=3, promotion_threshold=0.1 / 3)
    env.reset(seed=0)
    assert not any(env.step(batch())[4]["promoted"] for _ in range(6))
    env, _ = scripted_env(gains=[0.1], promotion=False, promotion_window=1)
    env.reset(seed=0)
    assert not any(env.step(batch())[4]["promoted"] for _ in range(3))


def test_promotion_takes_the_median_run_and_appends_pq():
    env, student = scripted_env(gains=[0.1, 0.4, 0.2, 0.3], repeats=4, promotion_window=1)
    env.reset(seed=0)
    _, reward, _, _, info = env.step(batch("a"))
    assert info["promoted"] and reward == pytest.approx(0.25)
    assert info["median_run"] == 2 and student.baseline["skill"] == pytest.approx(0.2)
    # The new baseline is measured (and cached) as its own state; steps switch to after-promotion.
    _, _, _, _, info = env.step(batch("b"))
    assert info["baseline_accuracy"] == pytest.approx(0.2)
    assert info["inner_steps"] == env.unwrapped.config.inner_steps_after_promotion
    assert student.train_calls[-1]["steps"] == env.unwrapped.config.inner_steps_after_promotion
    assert len(env.promoted_questions) == 4 and env.promotions == 2


@pytest.mark.parametrize("restart,expected", [(True, [False, True, False, True]), (False, [False, True, True, True])])
def test_moving_average_restart_after_promotion(restart, expected):
    env, _ = scripted_env(gains=[0.1], promotion_window=2, restart_average_after_promotion=restart)
    env.reset(seed=0)
    assert [env.step(batch())[4]["promoted"] for _ in range(4)] == expected


def test_promotion_tracker_unit():
    tracker = rewards.PromotionTracker(window=3, threshold=0.01)
    assert [tracker.update(r) for r in (0.06, 0.0, -0.02)] == [False, False, True]
    assert tracker.moving_average == pytest.approx(0.04 / 3)
    assert tracker.update(-0.01) is False  # window now (0.0, -0.02, -0.01)
    tracker.promoted()
    assert tracker.recent == [] and len(tracker.history) == 4


def test_reset_restores_episode_start_student_and_clears_pq():
    env, student = scripted_env(gains=[0.2], promotion_window=1, skill=0.1)
    env.reset(seed=0)
    env.step(batch())
    assert student.baseline["skill"] == pytest.approx(0.3) and env.promotions == 1
    obs, info = env.reset(seed=0)
    assert student.baseline["skill"] == pytest.approx(0.1)
    assert env.promotions == 0 and env.promoted_questions == [] and obs[1] == 0.0
    assert info["baseline_accuracy"] == pytest.approx(0.1)


# --- Q_R and the baseline cache ----------------------------------------------------------------------


def test_eval_subset_drawn_from_np_random_and_baseline_cached():
    pool = ranked_pool(30)
    student = ScriptedStudent(pool, gains=[0.0])
    env = SOARMathEnv("tiny", student=student, hard_pool=pool, eval_subset_size=10, repeats=1)
    env.reset(seed=1)
    first = [p.id for p in env.eval_subset]
    assert len(set(first)) == 10
    env.step(batch())
    assert [p.id for p in env.eval_subset] != first, "Q_R is redrawn every step (paper)"
    env.reset(seed=1)
    assert [p.id for p in env.eval_subset] == first
    evaluated = student.baseline_evaluations
    env.reset(seed=1)
    assert student.baseline_evaluations == evaluated, "an episode-start baseline is never re-evaluated"
    assert student.baseline_evaluations <= 30

    env = SOARMathEnv("tiny", student=ScriptedStudent(pool), hard_pool=pool, eval_subset_size=10,
                      resample_eval_subset=False)
    env.reset(seed=1)
    fixed = [p.id for p in env.eval_subset]
    env.step(batch())
    assert [p.id for p in env.eval_subset] == fixed


# --- checkpoints ------------------------------------------------------------------------------------


def seeded_gain(problems, seed):
    return (seed % 5) / 20  # 0 .. 0.2, a function of the run seed so a resume reproduces it


def test_save_load_round_trip_with_scripted_student(tmp_path):
    settings = dict(gains=seeded_gain, repeats=2, promotion_window=2, promotion_threshold=0.01)
    env, _ = scripted_env(**settings)
    env.reset(seed=3)
    for _ in range(3):
        env.step(batch())
    env.save(tmp_path / "env.pt")
    assert [p.name for p in tmp_path.iterdir()] == ["env.pt"], "the temporary file is renamed away"
    expected = [env.step(batch(str(i)))[:2] for i in range(3)]

    student = ScriptedStudent(POOL, gains=seeded_gain)
    resumed = SOARMathEnv.restore(tmp_path / "env.pt", student=student, hard_pool=POOL)
    assert resumed.step_count == 3 and resumed.config == env.config
    got = [resumed.step(batch(str(i)))[:2] for i in range(3)]
    for (obs_a, r_a), (obs_b, r_b) in zip(expected, got):
        np.testing.assert_array_equal(obs_a, obs_b)
        assert r_a == r_b
    assert resumed.promotions == env.promotions
    assert [p.id for p in resumed.promoted_questions] == [p.id for p in env.promoted_questions]
    assert student.baseline["skill"] == env.student.baseline["skill"]


def test_save_load_round_trip_on_tiny_model(tmp_path):
    env = SOARMathEnv("tiny", repeats=1, promotion_window=1, promotion_threshold=-1.0)  # promote every step
    env.reset(seed=5)
    env.step(env.action_space.sample())
    assert env.promotions == 1
    import torch

    saved_baseline = {name: tensor.clone() for name, tensor in env.student.baseline_state().items()}
    env.save(tmp_path / "tiny.pt")
    action = env.action_space.sample()
    expected = env.step(action)  # promotes again, so the live env's baseline moves on from the saved one

    resumed = SOARMathEnv.restore(tmp_path / "tiny.pt")
    for name, tensor in saved_baseline.items():
        assert torch.equal(tensor, resumed.student.baseline_state()[name])
    got = resumed.step(action)
    np.testing.assert_array_equal(expected[0], got[0])
    assert expected[1] == got[1] and expected[4]["train_rewards"] == got[4]["train_rewards"]
    assert resumed.promotions == 2
    for name, tensor in env.student.baseline_state().items():  # both promoted the same trained student
        assert torch.equal(tensor, resumed.student.baseline_state()[name])


def test_load_rejects_foreign_files(tmp_path):
    import torch

    torch.save({"hello": 1}, tmp_path / "x.pt")
    env, _ = scripted_env()
    with pytest.raises(ValueError, match="not a soar-gym environment checkpoint"):
        env.load(tmp_path / "x.pt")


# --- docs -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("module", [soar_math, spaces], ids=lambda m: m.__name__)
def test_docstring_examples(module):
    failures, _ = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert failures == 0


def test_package_exports():
    assert soar_env.make_config is make_config and "SOAR-MATH-v0" in soar_env.ENV_IDS
    assert isinstance(Problem("q", "a"), Problem)


def test_student_checkpoint_sets_the_episode_start_weights(tmp_path):
    import torch

    from soar_env.models.policy import LMPolicy, LoraSettings

    policy = LMPolicy.from_name("tiny", lora=LoraSettings(r=4, alpha=8))
    state = {name: torch.full_like(t, 0.01) for name, t in policy.state_dict_trainable().items()}
    policy.load_state_dict_trainable(state)
    policy.save(tmp_path / "start")
    env = SOARMathEnv("tiny", student_checkpoint=str(tmp_path / "start"))
    env.reset(seed=0)
    for name, tensor in env.student.baseline_state().items():
        assert torch.equal(tensor, state[name])
