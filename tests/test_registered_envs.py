"""Every registered SOAR id, the way Gymnasium tests its own (``tests/envs/test_envs.py``).

For each id in ``soar_env.ENV_IDS``: Gymnasium's ``check_env``, a same-seed rollout of two
envs, and our contract check `soar_env.envs.testing.check_soar_env`. Every env gets a
`ScriptedStudent` and a small ranked pool, so the whole file runs in seconds.
"""

from __future__ import annotations

import warnings
from typing import Any

import gymnasium as gym
import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env, data_equivalence

import soar_env
from soar_env.envs import testing
from soar_env.envs.soar_math import SOARMathEnv
from soar_env.envs.testing import EnvConformanceError, ScriptedStudent, check_soar_env, ranked_pool

POOL = ranked_pool(8)
SEED = 3
ROLLOUT_STEPS = 4


def settings() -> dict[str, Any]:
    """A fresh scripted student each call: envs compared with each other must not share one."""
    # gains constant and > tau, so the window fills and promotes within the rollout
    return dict(preset="tiny", student=ScriptedStudent(POOL, gains=(0.125,)), hard_pool=POOL,
                eval_subset_size=6, repeats=2, problems_per_dataset=2, promotion_window=2)


@pytest.mark.parametrize("env_id", soar_env.ENV_IDS)
def test_check_env(env_id):
    env = gym.make(env_id, **settings())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        check_env(env.unwrapped)
    checker_warnings = [str(w.message) for w in caught if "gymnasium" in w.filename]
    assert checker_warnings == []
    env.close()


@pytest.mark.parametrize("env_id", soar_env.ENV_IDS)
def test_same_seed_rollout(env_id):
    """Two envs, one seed, the same actions: equal observations, rewards, flags and infos."""
    env_1, env_2 = gym.make(env_id, **settings()), gym.make(env_id, **settings())
    obs_1, info_1 = env_1.reset(seed=SEED)
    obs_2, info_2 = env_2.reset(seed=SEED)
    assert data_equivalence(obs_1, obs_2, exact=True) and data_equivalence(info_1, info_2, exact=True)
    env_1.action_space.seed(SEED)
    promoted = False
    for _ in range(ROLLOUT_STEPS):
        action = env_1.action_space.sample()
        step_1, step_2 = env_1.step(action), env_2.step(action)
        for item_1, item_2 in zip(step_1, step_2):
            assert data_equivalence(item_1, item_2, exact=True)
        promoted |= step_1[4]["promoted"]
    assert promoted, "the rollout should cover a promotion, the env's state transition"
    env_1.close()
    env_2.close()


def test_same_seed_vector_rollout():
    envs = [gym.make_vec("SOAR-MATH-v0", num_envs=2, **settings()) for _ in range(2)]
    results = [env.reset(seed=SEED) for env in envs]
    assert data_equivalence(results[0], results[1], exact=True)
    envs[0].action_space.seed(SEED)
    for _ in range(ROLLOUT_STEPS):
        action = envs[0].action_space.sample()
        first, second = (env.step(action) for env in envs)
        for item_1, item_2 in zip(first, second):
            assert data_equivalence(item_1, item_2, exact=True)


@pytest.mark.parametrize("env_id", soar_env.ENV_IDS)
def test_check_soar_env_on_registered_ids(env_id):
    check_soar_env(lambda: gym.make(env_id, **settings()), seed=SEED)


def test_check_soar_env_on_the_vector_env_and_a_bare_class():
    check_soar_env(lambda: gym.make_vec("SOAR-MATH-v0", num_envs=2, **settings()), seed=SEED)
    check_soar_env(lambda: SOARMathEnv(**settings()), seed=SEED)


# --- the checker catches what it promises to catch ------------------------------------------------------


class RaisesOnJunk(SOARMathEnv):
    """Skips validation: a malformed action reaches code that cannot handle it."""

    def step(self, action):
        if not isinstance(action, (list, tuple)) or not action:
            raise TypeError("expected a list of problems")
        return super().step(action)


class NonFiniteReward(SOARMathEnv):
    def step(self, action):
        obs, _, terminated, truncated, info = super().step(action)
        return obs, float("nan"), terminated, truncated, info


class UnseededQR(SOARMathEnv):
    """Draws Q_R from fresh entropy instead of ``np_random``: same seed, other problems measured."""

    def step(self, action):
        self.core.draw_eval_subset(np.random.default_rng())
        return super().step(action)


class ForgetsPQ(SOARMathEnv):
    """Its checkpoint loses the promoted questions, so a resumed env reports other infos."""

    def load(self, path):
        result = super().load(path)
        self.core.promoted_questions = []
        return result


@pytest.mark.parametrize("cls,message,fields", [
    (RaisesOnJunk, testing.MALFORMED_ACTION_RAISED,
     dict(action=None, error="TypeError: expected a list of problems")),
    (NonFiniteReward, testing.BAD_REWARD, dict(reward=float("nan"))),
], ids=["raises", "nan-reward"])
def test_check_soar_env_names_the_broken_rule(cls, message, fields):
    with pytest.raises(EnvConformanceError) as failure:
        check_soar_env(lambda: cls(**settings()), seed=SEED)
    assert str(failure.value) == message.format(name=cls.__name__, **fields)


def test_check_soar_env_catches_unseeded_randomness_and_lossy_checkpoints():
    # Q_R is 4 of 8 problems drawn unseeded on each of 3 steps: equal by chance with p = 70 ** -3.
    with pytest.raises(EnvConformanceError, match=r"two UnseededQR envs reset with seed 3 .* differ"):
        check_soar_env(lambda: UnseededQR(**{**settings(), "eval_subset_size": 4}), seed=SEED, steps=3)
    with pytest.raises(EnvConformanceError, match=r"ForgetsPQ loaded from a checkpoint differs .*promoted_count"):
        check_soar_env(lambda: ForgetsPQ(**{**settings(), "promotion_window": 1}), seed=SEED)
