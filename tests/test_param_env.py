"""SOAR-MATH-Param-v0: numeric curriculum actions for standard RL libraries."""

from __future__ import annotations

import warnings

import gymnasium as gym
import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env

import soar_env  # noqa: F401  (registers the ids)
from soar_env.data.generators import FAMILIES
from soar_env.envs import parametric
from soar_env.envs.parametric import SOARMathParamEnv, decode_action
from soar_env.envs.testing import ScriptedStudent, ranked_pool

pytest.importorskip("stable_baselines3")


pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")  # transformers' deprecation notices


def test_decode_action():
    families = ("addition", "fraction", "modular")
    weights, level = decode_action([1.0, -1.0, 0.0, -1.0], families, 1, 5)
    np.testing.assert_allclose(weights, [2 / 3, 0.0, 1 / 3])
    assert level == 1
    weights, level = decode_action([-1.0, -1.0, -1.0, 1.0], families, 1, 5)
    np.testing.assert_allclose(weights, [1 / 3] * 3)  # all off means uniform
    assert level == 5
    weights, level = decode_action([np.nan, 7.0, -np.inf, 0.0], families, 1, 5)
    assert np.isfinite(weights).all() and abs(weights.sum() - 1) < 1e-9 and level == 3
    with pytest.raises(ValueError, match="expected an action of 4 numbers"):
        decode_action([0.0, 0.0], families, 1, 5)


def test_action_draws_the_chosen_mixture():
    pool = ranked_pool(10)
    env = SOARMathParamEnv("tiny", student=ScriptedStudent(pool), hard_pool=pool, problems_per_dataset=12,
                           families=("addition", "multiplication"))
    env.reset(seed=0)
    _, _, _, _, info = env.step(np.array([1.0, -1.0, 1.0], dtype=np.float32))
    assert {p.meta["family"] for p in info["problems"]} == {"addition"}
    assert info["difficulty"] == 5 and info["family_weights"] == {"addition": 1.0, "multiplication": 0.0}
    assert len(info["problems"]) == 12
    with pytest.raises(ValueError, match="unknown families"):
        SOARMathParamEnv("tiny", families=("calculus",))


def test_gymnasium_and_sb3_check_env_on_tiny():
    from stable_baselines3.common.env_checker import check_env as sb3_check_env

    env = gym.make("SOAR-MATH-Param-v0", preset="tiny", repeats=1)
    assert env.action_space.shape == (len(FAMILIES) + 1,)
    check_env(env.unwrapped)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # SB3 reports problems as warnings
        sb3_check_env(env.unwrapped, warn=True)


def test_same_seed_same_rewards_on_tiny():
    def rollout():
        env = SOARMathParamEnv("tiny", repeats=1)
        out = [env.reset(seed=4)[0]]
        for action in (np.zeros(len(FAMILIES) + 1), np.ones(len(FAMILIES) + 1)):
            obs, reward, _, _, info = env.step(action.astype(np.float32))
            out += [obs, reward, [p.id for p in info["problems"]], info["train_rewards"]]
        return out

    for a, b in zip(rollout(), rollout()):
        np.testing.assert_equal(a, b)


def test_sb3_ppo_runs_on_tiny():
    from stable_baselines3 import PPO

    env = gym.make("SOAR-MATH-Param-v0", preset="tiny", repeats=1)
    model = PPO("MlpPolicy", env, n_steps=4, batch_size=4, n_epochs=1, seed=0, device="cpu")
    before = [p.detach().clone() for p in model.policy.parameters()]
    model.learn(total_timesteps=4)
    assert model.num_timesteps == 4
    assert any(not np.allclose(a.numpy(), b.detach().numpy()) for a, b in zip(before, model.policy.parameters()))
    action, _ = model.predict(env.reset(seed=1)[0], deterministic=True)
    assert env.action_space.contains(action)


def test_docstring_example():
    import doctest

    failures, _ = doctest.testmod(parametric, optionflags=doctest.ELLIPSIS)
    assert failures == 0
