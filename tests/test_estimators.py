"""Reward estimators (issue 16, item 1): greedy (the paper), sampled with common random numbers,
and the likelihood contrast against decoy answers; in the env, with promotion, and on old configs.

    python -m pytest tests/test_estimators.py -q
"""

from __future__ import annotations

import json
import math
from types import SimpleNamespace
from pathlib import Path

import numpy as np
import pytest
import torch

from soar_env.config import PRESETS, EnvConfig, make_config
from soar_env.envs.soar_math import SOARMathEnv
from soar_env.envs.testing import LOGPROB_FLOOR, ScriptedStudent, ranked_pool
from soar_env.envs.vector import SOARMathVectorEnv
from soar_env.estimators import (REWARD_ESTIMATORS, QRScores, answer_reply, decoy_answers, estimate, qr_level,
                                 score_qr)
from soar_env.problems import Problem
from soar_env.prompts import student_prompt

pytestmark = [pytest.mark.filterwarnings("ignore::FutureWarning"), pytest.mark.usefixtures("one_thread")]

POOL = ranked_pool(10)
OLD_RUN_CONFIG = Path(__file__).resolve().parents[1] / "benchmarks/results/compare-cpu/base-seed0/run_config.json"
TAU = {"greedy": 0.1, "sampled": 0.1, "likelihood": 0.1}
"""tau per estimator for the scripted envs below (each reward here is ~0.3 when the student learns)."""


def batch(tag: str = "x", n: int = 2) -> list[dict[str, str]]:
    return [{"question": f"What is {i} + {tag}?", "answer": str(i)} for i in range(n)]


def scores(estimator: str, correct=(), samples=1, answer=(), decoy=()) -> QRScores:
    return QRScores(estimator, list(correct), samples, list(answer), list(decoy))


# --- the estimators on crafted scores --------------------------------------------------------------


def test_greedy_estimate_is_the_papers_accuracy_gain_bit_for_bit():
    base, trained = scores("greedy", [0, 1, 0, 0, 1, 0]), scores("greedy", [1, 1, 0, 1, 1, 0])
    assert estimate("greedy", base, trained) == float(np.mean(trained.correct)) - float(np.mean(base.correct))
    assert estimate("greedy", base, trained) > 0 > estimate("greedy", trained, base)
    assert estimate("greedy", base, base) == 0.0


def test_sampled_estimate_is_the_success_rate_gain():
    base, trained = scores("sampled", [0, 1, 2], 4), scores("sampled", [1, 3, 2], 4)
    assert estimate("sampled", base, trained) == pytest.approx(np.mean([1 / 4, 2 / 4, 0]))
    assert estimate("sampled", trained, base) < 0
    assert qr_level(trained) == pytest.approx(6 / 12)


def test_likelihood_estimate_rewards_the_right_answer_and_not_format():
    base = scores("likelihood", answer=[-5.0, -4.0], decoy=[-5.5, -4.5])
    knows_more = scores("likelihood", answer=[-4.0, -3.5], decoy=[-5.5, -4.5])
    format_only = scores("likelihood", answer=[-4.0, -3.0], decoy=[-4.5, -3.5])  # every answer +1 nat
    assert estimate("likelihood", base, knows_more) == pytest.approx(0.75)
    assert estimate("likelihood", base, format_only) == pytest.approx(0.0, abs=1e-12)
    likes_wrong = scores("likelihood", answer=[-5.0, -4.0], decoy=[-4.0, -3.0])
    assert estimate("likelihood", base, likes_wrong) < 0


def test_estimate_refuses_scores_it_cannot_compare():
    with pytest.raises(ValueError, match="made by the greedy"):
        estimate("sampled", scores("greedy", [1]), scores("sampled", [1]))
    with pytest.raises(ValueError, match="different"):
        estimate("sampled", scores("sampled", [1, 2], 4), scores("sampled", [1, 2], 2))
    with pytest.raises(ValueError, match="unknown reward estimator"):
        estimate("pass@k", scores("greedy"), scores("greedy"))
    assert set(REWARD_ESTIMATORS) == {"greedy", "sampled", "likelihood"}


def test_decoys_are_the_answers_with_every_digit_wrong_same_length_and_form():
    answers = ["1545", "27/140", "-1/8", "\\frac{3}{4}", "0", "99", "3.5", "x+1"]
    decoys = decoy_answers([Problem(f"q{i}", answer) for i, answer in enumerate(answers)])
    assert decoys == ["2656", "38/251", "-2/9", "\\frac{4}{5}", "1", "10", "4.6", "x+2"]
    for answer, decoy in zip(answers, decoys):
        assert len(decoy) == len(answer)
        assert all((a == d) != a.isdigit() for a, d in zip(answer, decoy)), "every digit wrong, the rest kept"
    no_digits = [Problem("q", "x"), Problem("r", "x"), Problem("s", "y")]
    assert decoy_answers(no_digits) == ["y", "y", "x"], "no digit: another answer that differs"
    assert decoy_answers([Problem("q", "x")]) == ["x1"]


# --- score_qr on the scripted student ----------------------------------------------------------------


def test_a_student_that_gets_better_on_q_r_scores_higher_under_every_estimator():
    student = ScriptedStudent(POOL, skill=0.3)
    better = {"skill": 0.7, "version": 1.0}
    for estimator in REWARD_ESTIMATORS:
        base = score_qr(student, POOL, estimator, samples=8, max_new_tokens=8, seed=11)
        trained = score_qr(student, POOL, estimator, samples=8, max_new_tokens=8, seed=11, state=better)
        assert estimate(estimator, base, trained) > 0.2, estimator
        assert estimate(estimator, trained, base) < -0.2, estimator


def test_format_only_training_earns_nothing_under_likelihood():
    student = ScriptedStudent(POOL, skill=0.3, format_gains=(1.5,))
    state = student.train(batch(), steps=1, seed=0).state
    base = score_qr(student, POOL, "likelihood", max_new_tokens=8)
    trained = score_qr(student, POOL, "likelihood", max_new_tokens=8, state=state)
    assert np.mean(trained.answer_logprob) - np.mean(base.answer_logprob) == pytest.approx(1.5), "format moved"
    assert estimate("likelihood", base, trained) == pytest.approx(0.0, abs=1e-12)
    assert base.answer_logprob == [LOGPROB_FLOOR + 0.3] * len(POOL)
    # Each answer beside its decoy (they share a prompt, so one micro-batch scores both).
    assert student.logprob_calls[0]["answers"][:2] == [answer_reply(POOL[0].answer),
                                                       answer_reply(decoy_answers(POOL)[0])]


def test_same_seed_gives_the_same_sampled_estimate_and_another_seed_may_not():
    student = ScriptedStudent(POOL, skill=0.4)
    better = {"skill": 0.6, "version": 1.0}

    def sampled_estimate(seed: int) -> float:
        base = score_qr(student, POOL, "sampled", samples=4, max_new_tokens=8, seed=seed)
        return estimate("sampled", base, score_qr(student, POOL, "sampled", samples=4, max_new_tokens=8, seed=seed,
                                                  state=better))

    first = sampled_estimate(3)
    assert sampled_estimate(3) == first, "same seeds, same estimate, bit for bit"
    assert len({sampled_estimate(seed) for seed in range(8)}) > 1, "the estimate is a draw over seeds"
    # Common random numbers: the baseline scored again with its own seed differs by exactly nothing.
    base = score_qr(student, POOL, "sampled", samples=4, max_new_tokens=8, seed=5)
    assert estimate("sampled", base, score_qr(student, POOL, "sampled", samples=4, max_new_tokens=8, seed=5,
                                              state=student.baseline_state())) == 0.0


# --- the real student: teacher-forced scores are the policy's log-probs ------------------------------

PROBLEMS = [Problem("What is 2 + 3?", "5"), Problem("What is 4 + 4?", "8"), Problem("What is 9 - 2?", "7")]


@pytest.fixture
def tiny_student():
    from soar_env.models.policy import LMPolicy
    from soar_env.student import Student, StudentConfig

    torch.manual_seed(0)
    return Student(LMPolicy.from_name("tiny"), StudentConfig(seed=0, eval_max_new_tokens=4, max_new_tokens=4))


def _policy_mean_logprob(policy, question: str, reply: str) -> float:
    prompt = policy.encode(policy.chat_prompt(student_prompt(question)))
    with torch.no_grad():
        logprobs, mask = policy.token_logprobs([prompt], [policy.encode(reply)])
    return float(logprobs[0][mask[0]].double().mean())


def test_likelihood_scores_equal_the_policys_token_logprobs(tiny_student):
    policy = tiny_student.policy
    base = score_qr(tiny_student, PROBLEMS, "likelihood", max_new_tokens=4)
    decoys = decoy_answers(PROBLEMS)
    for problem, decoy, answer_lp, decoy_lp in zip(PROBLEMS, decoys, base.answer_logprob, base.decoy_logprob):
        assert answer_lp == pytest.approx(_policy_mean_logprob(policy, problem.question, answer_reply(problem.answer)),
                                          rel=1e-5, abs=1e-5)
        assert decoy_lp == pytest.approx(_policy_mean_logprob(policy, problem.question, answer_reply(decoy)),
                                         rel=1e-5, abs=1e-5)
    assert base.tokens == sum(len(policy.encode(answer_reply(a))) for a in [p.answer for p in PROBLEMS] + decoys)
    # A trained state is loaded for the scoring and undone after it.
    state = {name: tensor + 0.05 * torch.randn_like(tensor) for name, tensor in tiny_student.baseline_state().items()}
    trained = score_qr(tiny_student, PROBLEMS, "likelihood", max_new_tokens=4, state=state)
    policy.load_state_dict_trainable(state)
    expected = _policy_mean_logprob(policy, PROBLEMS[0].question, answer_reply(PROBLEMS[0].answer))
    tiny_student.reset()
    assert trained.answer_logprob[0] == pytest.approx(expected, rel=1e-5, abs=1e-5)
    assert trained.answer_logprob != base.answer_logprob
    assert score_qr(tiny_student, PROBLEMS, "likelihood", max_new_tokens=4).answer_logprob == base.answer_logprob
    assert math.isfinite(estimate("likelihood", base, trained))


def test_sampled_scores_of_the_real_student_repeat_under_the_same_seed(tiny_student, monkeypatch):
    import soar_env.student as student_module

    # The random tiny model gets every sum wrong; grade by the parity of the reply's character codes
    # instead (a pure function of the text), so the counts depend on which answers were drawn.
    monkeypatch.setattr(student_module, "grade_many", lambda texts, golds, **kw: [
        SimpleNamespace(correct=sum(map(ord, t)) % 2 == 0, status="ok") for t in texts])
    first = score_qr(tiny_student, PROBLEMS, "sampled", samples=3, max_new_tokens=4, seed=7)
    again = score_qr(tiny_student, PROBLEMS, "sampled", samples=3, max_new_tokens=4, seed=7,
                     state=tiny_student.baseline_state())
    assert first.samples == 3 and len(first.correct) == 3
    assert estimate("sampled", first, again) == 0.0 and first.tokens == again.tokens
    assert first.correct == again.correct
    others = [score_qr(tiny_student, PROBLEMS, "sampled", samples=3, max_new_tokens=4, seed=s).correct
              for s in (8, 9, 10, 11)]
    assert any(c != first.correct for c in others)  # the seed decides the draws: this test can fail


# --- in the env ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("estimator", REWARD_ESTIMATORS)
def test_env_step_with_each_estimator_rewards_learning_and_promotes(estimator):
    student = ScriptedStudent(POOL, gains=(0.3,), skill=0.3)
    env = SOARMathEnv("tiny", student=student, hard_pool=POOL, eval_subset_size=10, repeats=2, problems_per_dataset=2,
                      reward_estimator=estimator, estimator_samples=4, promotion_window=2,
                      promotion_threshold=TAU[estimator])
    _, info = env.reset(seed=0)
    assert 0.0 <= info["baseline_accuracy"] <= 1.0
    _, first, _, _, info = env.step(batch("a"))
    assert math.isfinite(first) and first > TAU[estimator] and not info["promoted"], "a part-filled window waits"
    assert info["reward_estimator"] == estimator and len(info["run_rewards"]) == 2
    if estimator == "likelihood":
        assert first == pytest.approx(0.3) and len(info["baseline_answer_logprob"]) == 10
        assert len(info["trained_decoy_logprob"][0]) == 10 and info["baseline_correct"] == []
    else:
        assert len(info["baseline_correct"]) == 10 and len(info["trained_correct"][1]) == 10
    _, second, _, _, info = env.step(batch("b"))
    assert info["promoted"] and env.promotions == 1 and student.baseline["skill"] == pytest.approx(0.6)
    assert env.unwrapped.core.tracker.history == [first, second] and (first + second) / 2 > TAU[estimator]


@pytest.mark.parametrize("estimator", REWARD_ESTIMATORS)
def test_vector_env_shares_one_baseline_scoring_per_step(estimator):
    student = ScriptedStudent(POOL, gains=(0.1, 0.2, 0.3, 0.0), skill=0.2)
    envs = SOARMathVectorEnv(2, "tiny", student=student, hard_pool=POOL, eval_subset_size=10, repeats=2,
                             reward_estimator=estimator, estimator_samples=2, promotion=False)
    envs.reset(seed=0)
    baseline_calls = len([c for c in student.eval_calls + student.logprob_calls if c["baseline"]])
    _, rewards, _, _, infos = envs.step((batch("a"), batch("b")))
    assert np.isfinite(rewards).all() and (rewards > 0).all()
    assert list(infos["reward_estimator"]) == [estimator] * 2
    again = len([c for c in student.eval_calls + student.logprob_calls if c["baseline"]])
    # greedy answers are cached per state; sampled/likelihood: one scoring for the next step, none for this one.
    assert again - baseline_calls == (0 if estimator == "greedy" else 1)


def test_format_only_student_is_never_promoted_under_likelihood():
    student = ScriptedStudent(POOL, skill=0.3, format_gains=(2.0,))
    env = SOARMathEnv("tiny", student=student, hard_pool=POOL, eval_subset_size=10, repeats=1,
                      reward_estimator="likelihood", promotion_window=1, promotion_threshold=0.01)
    env.reset(seed=0)
    for tag in "abc":
        _, reward, _, _, info = env.step(batch(tag))
        assert reward == pytest.approx(0.0, abs=1e-12) and not info["promoted"]
        assert np.mean(info["trained_answer_logprob"][0]) > np.mean(info["baseline_answer_logprob"]) + 1.9


def test_likelihood_env_on_the_tiny_model_gives_finite_rewards():
    env = SOARMathEnv("tiny", reward_estimator="likelihood", repeats=1)
    obs, _ = env.reset(seed=0)
    assert 0.0 < obs[0] <= 1.0, "observation 0: mean per-token probability of the reference answers"
    _, reward, _, _, info = env.step(batch())
    assert math.isfinite(reward) and info["run_rewards"] == [reward]
    assert len(info["baseline_answer_logprob"]) == env.unwrapped.config.eval_subset_size
    env.close()


def test_likelihood_invalid_action_gets_zero_by_default():
    env = SOARMathEnv("tiny", student=ScriptedStudent(POOL, skill=0.3), hard_pool=POOL, eval_subset_size=10,
                      reward_estimator="likelihood")
    env.reset(seed=0)
    _, reward, _, _, info = env.step([{"question": " ", "answer": "1"}])
    assert info["invalid_action"] and reward == 0.0


# --- configs --------------------------------------------------------------------------------------------


def test_paper_preset_uses_the_greedy_estimator():
    assert PRESETS["paper"].reward_estimator == "greedy" and EnvConfig().reward_estimator == "greedy"
    with pytest.raises(ValueError, match="reward_estimator"):
        make_config("tiny", reward_estimator="pass@k")
    with pytest.raises(ValueError, match="estimator_samples"):
        make_config("tiny", estimator_samples=0)


def test_old_configs_with_greedy_eval_still_load():
    saved = json.loads(OLD_RUN_CONFIG.read_text())["env"]
    assert saved["greedy_eval"] is True and EnvConfig(**saved).reward_estimator == "greedy"
    old_sampled = EnvConfig(**{**saved, "greedy_eval": False})
    assert (old_sampled.reward_estimator, old_sampled.estimator_samples) == ("sampled", 1)
    assert "greedy_eval" not in old_sampled.to_dict(), "saved again, it is written the new way"
    assert make_config(old_sampled, repeats=3).reward_estimator == "sampled"
    with pytest.raises(ValueError, match="replaced by reward_estimator"):
        make_config("tiny", greedy_eval=False)


@pytest.mark.filterwarnings("ignore:loading a checkpoint written with other settings")
def test_old_checkpoint_with_a_sampled_baseline_resumes_with_the_same_numbers(tmp_path):
    def env_and_student():
        student = ScriptedStudent(POOL, gains=lambda problems, seed: (seed % 5) / 10, skill=0.4)
        return SOARMathEnv("tiny", student=student, hard_pool=POOL, eval_subset_size=10, repeats=2,
                           reward_estimator="sampled", estimator_samples=1, promotion=False), student

    env, _ = env_and_student()
    env.reset(seed=4)
    env.step(batch("a"))
    env.save(tmp_path / "new.pt")
    expected = [env.step(batch(tag))[:2] for tag in "bcd"]
    # Rewrite the checkpoint as the code before reward estimators wrote it (greedy_eval False).
    payload = torch.load(tmp_path / "new.pt", weights_only=False)
    config = {k: v for k, v in payload["config"].items() if k not in ("reward_estimator", "estimator_samples")}
    payload["config"] = {**config, "greedy_eval": False}
    step = payload["core"].pop("step_baseline")
    _, _, state_id, seed, ids = step["key"]
    payload["core"]["sampled_baseline"] = {"key": [state_id, seed, ids], "correct": step["scores"]["correct"]}
    torch.save(payload, tmp_path / "old.pt")

    _, student = env_and_student()
    resumed = SOARMathEnv.restore(tmp_path / "old.pt", student=student, hard_pool=POOL)
    assert (resumed.config.reward_estimator, resumed.config.estimator_samples) == ("sampled", 1)
    got = [resumed.step(batch(tag))[:2] for tag in "bcd"]
    for (obs_a, r_a), (obs_b, r_b) in zip(expected, got):
        np.testing.assert_array_equal(obs_a, obs_b)
        assert r_a == r_b
    baseline_draws = [call for call in student.eval_calls if call["baseline"]]
    assert len(baseline_draws) == 3, "the saved draw served the first step; each step drew its successor's"
