"""Issue 15, env side: sampled evaluation of Q_R (item 3, now reward_estimator="sampled" with one sample), the reward of an empty dataset
(item 4) and the inner loop's open settings reachable from EnvConfig (item 8).

    python -m pytest tests/test_env_fidelity.py -q
"""

from __future__ import annotations

import random

import numpy as np
import pytest

from soar_env.config import PRESETS, EnvConfig, make_config
from soar_env.envs.soar_math import SOARMathEnv
from soar_env.envs.testing import ScriptedStudent, ranked_pool
from soar_env.envs.vector import SOARMathVectorEnv
from soar_env.options import field_docs
from soar_env.rl.rloo import RLOOConfig
from soar_env.student import EvalResult, build_student

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")

POOL = ranked_pool(10)
INVALID = [{"question": "   ", "answer": "1"}]


def batch(tag: str = "x", n: int = 2) -> list[dict[str, str]]:
    return [{"question": f"What is {i} + {tag}?", "answer": str(i)} for i in range(n)]


class SampledStudent(ScriptedStudent):
    """A scripted student whose *sampled* answers are draws: problem p is right under seed s with
    probability skill, a fixed function of (s, p). Records every sampled evaluation's seed."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.sampled: list[tuple[bool, int | None]] = []  # (is the baseline, seed)

    def evaluate(self, problems, *, samples=1, greedy=True, state=None, max_new_tokens=None, seed=None):
        if greedy:
            return super().evaluate(problems, samples=samples, greedy=greedy, state=state,
                                    max_new_tokens=max_new_tokens, seed=seed)
        self.eval_calls.append({"problems": list(problems), "samples": samples, "greedy": False,
                                "baseline": state is None})
        self.sampled.append((state is None, seed))
        skill = (state if state is not None else self.baseline)["skill"]
        correct = [int(random.Random(f"{seed}:{p.id}").random() < skill) for p in problems]
        return EvalResult(correct=correct, samples=samples, tokens=len(problems))


def sampled_env(gains=(0.0,), **overrides) -> tuple[SOARMathEnv, SampledStudent]:
    student = SampledStudent(POOL, gains=gains, skill=0.5)
    settings = {"eval_subset_size": 10, "repeats": 2, "problems_per_dataset": 2, "reward_estimator": "sampled",
                "estimator_samples": 1, "promotion": False, **overrides}
    return SOARMathEnv("tiny", student=student, hard_pool=POOL, **settings), student


# --- item 3: sampled evaluation -------------------------------------------------------------------


@pytest.mark.parametrize("resample", [True, False])
def test_sampled_baseline_is_drawn_afresh_every_step(resample):
    env, student = sampled_env(resample_eval_subset=resample)
    _, info = env.reset(seed=0)
    accuracies = [info["baseline_accuracy"]]
    for _ in range(5):
        _, reward, _, _, info = env.step(batch())
        accuracies.append(info["next_baseline_accuracy"])
        # Common random numbers: a run that learned nothing answers exactly as the baseline did.
        assert reward == 0.0
    baseline_seeds = [seed for is_baseline, seed in student.sampled if is_baseline]
    assert len(set(baseline_seeds)) == 6, "one baseline draw per step (and the reset), each with its own seed"
    assert len(set(accuracies)) > 1, "a frozen single draw would report one accuracy forever"


def test_trained_students_share_the_step_seed_with_the_baseline():
    env, student = sampled_env(gains=(0.2,))
    env.reset(seed=1)
    for _ in range(3):
        step_seed = env.unwrapped.core.eval_seed
        assert student.sampled[-1] == (True, step_seed), "the baseline was measured with the step's seed"
        before = len(student.sampled)
        env.step(batch())
        trained = [seed for is_baseline, seed in student.sampled[before:] if not is_baseline]
        assert trained == [step_seed, step_seed], "both trained students sampled with the baseline's seed"
        assert env.unwrapped.core.eval_seed != step_seed, "the next step draws a new one"


def test_greedy_evaluation_still_evaluates_each_problem_once_per_state():
    student = ScriptedStudent(POOL, skill=0.3)
    env = SOARMathEnv("tiny", student=student, hard_pool=POOL, eval_subset_size=10, repeats=2, promotion=False)
    env.reset(seed=0)
    for _ in range(3):
        env.step(batch())
    assert student.baseline_evaluations == 10 and env.unwrapped.core.eval_seed is None


def test_sampled_evaluation_resumes_exactly(tmp_path):
    env, _ = sampled_env(gains=(0.1,))
    env.reset(seed=2)
    env.step(batch())
    env.save(tmp_path / "env.pt")
    expected = [env.step(batch(str(i)))[:2] for i in range(3)]
    student = SampledStudent(POOL, gains=(0.1,), skill=0.5)
    resumed = SOARMathEnv.restore(tmp_path / "env.pt", student=student, hard_pool=POOL)
    got = [resumed.step(batch(str(i)))[:2] for i in range(3)]
    for (obs_a, r_a), (obs_b, r_b) in zip(expected, got):
        np.testing.assert_array_equal(obs_a, obs_b)
        assert r_a == r_b


# --- item 4: the reward of a dataset with no valid problem ----------------------------------------


def test_empty_dataset_gets_the_step_floor_not_minus_one():
    student = ScriptedStudent(POOL, skill=0.3)
    env = SOARMathEnv("tiny", student=student, hard_pool=POOL, eval_subset_size=10, repeats=1)
    env.reset(seed=0)
    _, reward, _, _, info = env.step(INVALID)
    assert info["invalid_action"] and reward == pytest.approx(-0.3), "minus the baseline's Q_R accuracy"
    assert not student.train_calls and env.unwrapped.core.tracker.history == []
    # Never above what a valid batch can score: a batch that wipes out the student gets the same.
    student.gains = (-1.0,)
    _, worst, _, _, _ = env.step(batch())
    assert worst == pytest.approx(reward)


def test_empty_dataset_reward_in_intrinsic_modes_and_fixed_penalty():
    for mode in ("learnability", "variance"):
        env = SOARMathEnv("tiny", student=ScriptedStudent(POOL, skill=0.3), hard_pool=POOL, eval_subset_size=10,
                          reward_mode=mode)
        env.reset(seed=0)
        assert env.step(INVALID)[1] == 0.0, "the intrinsic rewards' floor"
    env = SOARMathEnv("tiny", student=ScriptedStudent(POOL, skill=0.3), hard_pool=POOL, eval_subset_size=10,
                      invalid_penalty=-1.0)
    env.reset(seed=0)
    assert env.step(INVALID)[1] == -1.0
    with pytest.raises(ValueError, match="invalid_penalty"):
        make_config("tiny", invalid_penalty=float("nan"))


def test_vector_env_floor_keeps_the_other_datasets_advantages_on_scale():
    student = ScriptedStudent(POOL, skill=0.1, gains=(0.02,))
    envs = SOARMathVectorEnv(4, "tiny", student=student, hard_pool=POOL, eval_subset_size=10, repeats=1,
                             promotion=False)
    envs.reset(seed=0)
    _, rewards, _, _, infos = envs.step((batch("a"), INVALID, batch("c"), batch("d")))
    assert infos["invalid_action"].tolist() == [False, True, False, False]
    assert rewards[1] == pytest.approx(-0.1)
    assert np.abs(rewards).max() <= 0.1 + 1e-9, "no reward off the scale of Q_R accuracies"


# --- item 8: the inner loop's open settings -----------------------------------------------------


def test_open_inner_loop_settings_reach_the_students_updater():
    config = make_config("tiny", weight_decay=0.05, max_grad_norm=0.5, skip_zero_advantage=False,
                         loss_normalization="sequences")
    rloo = build_student(config).config.rloo_config()
    assert (rloo.weight_decay, rloo.max_grad_norm, rloo.skip_zero_advantage, rloo.loss_normalization) == (
        0.05, 0.5, False, "sequences")
    assert build_student(make_config("tiny", max_grad_norm=None)).config.rloo_config().max_grad_norm is None
    for bad in ({"weight_decay": -1.0}, {"max_grad_norm": -0.1}, {"loss_normalization": "words"}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            make_config("tiny", **bad)


def test_paper_preset_keeps_the_documented_defaults_of_open_settings():
    paper, rloo = PRESETS["paper"], RLOOConfig()
    for name in ("weight_decay", "max_grad_norm", "skip_zero_advantage", "loss_normalization"):
        assert getattr(paper, name) == getattr(rloo, name), name
    docs = field_docs(EnvConfig)
    for name in ("weight_decay", "max_grad_norm", "skip_zero_advantage", "loss_normalization"):
        assert "not stated in the paper" in docs[name].lower(), f"{name}'s --help must say the paper is silent"
    assert "kl_reference" in docs["kl_coef"] or "reference" in docs["kl_coef"]
