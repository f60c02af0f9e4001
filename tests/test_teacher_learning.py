"""A teacher learns the known-best curriculum (stable-baselines3's identity-env tests, for teachers).

The scripted student gains in proportion to the share of addition problems in a dataset and
nothing from multiplication, so the best curriculum is known in advance: all addition. The
rewards reach the teacher through the real vector env and training loop (unbatched infos,
dataset order, logging), so a teacher whose reward exceeds what a random curriculum earns
has learned from the right rewards. Promotion is off: the baseline, and so the answer, stays fixed.
"""

from __future__ import annotations

import numpy as np
import pytest

from agents import Logger, RandomTeacher, SB3Teacher, run_learning
from agents.testing import scripted_vector_env

FAMILIES = ("addition", "multiplication")
BEST_GAIN = 0.5
"""The student's gain from a dataset of addition only; a 50/50 mix (random) gains half of it."""
THRESHOLD = 0.4
"""Mean reward over the last steps: a random curriculum earns about 0.25, the best one 0.5."""


def addition_share_gain(problems, seed: int) -> float:
    return BEST_GAIN * float(np.mean([p.meta.get("family") == "addition" for p in problems]))


def last_rewards(teacher, steps: int, last: int = 16) -> float:
    env = scripted_vector_env(num_datasets=4, problems_per_dataset=4, gains=addition_share_gain, promotion=False)
    logger = run_learning(teacher, env, steps, seed=0, progress_bar=False, logger=Logger(None, writers=()))
    return float(np.mean([row["teacher/reward_mean"] for row in logger.history[-last:]]))


def test_a_random_curriculum_stays_below_the_threshold():
    assert 0.15 < last_rewards(RandomTeacher(families=FAMILIES, difficulty=1, seed=0), 32) < THRESHOLD


def test_ppo_teacher_learns_the_known_best_curriculum():
    pytest.importorskip("stable_baselines3")
    untrained = last_rewards(SB3Teacher(FAMILIES, n_steps=1000, seed=0), 16)  # the buffer never fills: no update
    learned = last_rewards(SB3Teacher(FAMILIES, n_steps=8, n_epochs=10, learning_rate=3e-3, seed=0), 200)
    assert untrained < THRESHOLD < learned
