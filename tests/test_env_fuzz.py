"""Malformed actions: every step must end with a result and a reason, never an exception."""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping

import numpy as np
import pytest

from soar_env.envs.soar_math import SOARMathEnv
from soar_env.envs.testing import ScriptedStudent, ranked_pool
from soar_env.envs.vector import SOARMathVectorEnv
from soar_env.problems import Problem

POOL = ranked_pool(10)
OK = {"question": "What is 3 + 4?", "answer": "7"}


class HostileRepr:
    def __repr__(self) -> str:
        raise RuntimeError("repr exploded")


class HostileMapping(Mapping):
    """Claims to have keys, then raises when they are read."""

    def __getitem__(self, key):
        raise KeyError(key)

    def __iter__(self):
        return iter(["question", "answer"])

    def __len__(self):
        return 2

    def __contains__(self, key):
        return True


def nested(depth: int):
    value: list = []
    for _ in range(depth):
        value = [value]
    return value


# Each case: (name, action). None of them holds a single usable problem.
MALFORMED = [
    ("none", None),
    ("int", 0),
    ("negative int", -7),
    ("float", 3.14),
    ("nan", float("nan")),
    ("inf", math.inf),
    ("bool", True),
    ("empty string", ""),
    ("plain string", "What is 2 + 2? 4"),
    ("teacher text", "<question>What is 2+2?</question><answer>\\boxed{4}</answer>"),
    ("bytes", b"What is 2+2?"),
    ("empty list", []),
    ("empty tuple", ()),
    ("single dict, not a batch", dict(OK)),
    ("single Problem, not a batch", Problem("What is 1+1?", "2")),
    ("set of pairs", {("What is 1+1?", "2")}),
    ("generator", (x for x in [OK])),
    ("object", object()),
    ("function", lambda: OK),
    ("numpy float array", np.zeros(3)),
    ("hostile repr", HostileRepr()),
    ("list of None", [None]),
    ("list of ints", [1, 2, 3]),
    ("list of floats", [0.5]),
    ("list of empty lists", [[]]),
    ("one-item tuple", [("What is 1+1?",)]),
    ("three-item tuple", [("What is 1+1?", "2", "extra")]),
    ("missing answer", [{"question": "What is 1+1?"}]),
    ("missing question", [{"answer": "2"}]),
    ("empty question", [{"question": "", "answer": "2"}]),
    ("whitespace question", [{"question": " \n\t ", "answer": "2"}]),
    ("empty answer", [{"question": "What is 1+1?", "answer": ""}]),
    ("empty box", [{"question": "What is 1+1?", "answer": "\\boxed{}"}]),
    ("nested box", [{"question": "What is 1+1?", "answer": "\\boxed{\\boxed{2}}"}]),
    ("int question", [{"question": 5, "answer": "2"}]),
    ("int answer", [{"question": "What is 1+1?", "answer": 2}]),
    ("float answer", [{"question": "What is 1+1?", "answer": 2.0}]),
    ("None answer", [{"question": "What is 1+1?", "answer": None}]),
    ("list answer", [{"question": "What is 1+1?", "answer": ["2"]}]),
    ("nested junk", [{"question": ["What", {"is": [1, 2]}], "answer": {"x": (1, [2])}}]),
    ("bytes fields", [(b"What is 1+1?", b"2")]),
    ("megabyte question", [{"question": "x" * 1_000_000, "answer": "1"}]),
    ("10k-char answer", [{"question": "What is 1+1?", "answer": "2" * 10_000}]),
    ("NUL in question", [{"question": "What is\x00 1+1?", "answer": "2"}]),
    ("escape sequence", [{"question": "What is \x1b[31m1+1?", "answer": "2"}]),
    ("bell in answer", [{"question": "What is 1+1?", "answer": "2\x07"}]),
    ("DEL char", [{"question": "What\x7f is 1+1?", "answer": "2"}]),
    ("lone surrogate", [{"question": "What is \ud800 1+1?", "answer": "2"}]),
    ("C1 control", [{"question": "What is\x85 1+1?", "answer": "2"}]),
    ("hostile mapping", [HostileMapping()]),
    ("hostile entry repr", [HostileRepr()]),
    ("deeply nested", [nested(500)]),
    ("numpy object array of junk", np.array([None, 3], dtype=object)),
    ("thousands of junk entries", [None] * 5000),
    ("thousands of empty questions", [{"question": "", "answer": "1"}] * 3000),
    ("problem with empty text", [Problem("", "")]),
    ("mixed junk", [None, 1, "x", {"question": ""}, ("a",), b"q"]),
]


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning)
        yield


@pytest.fixture(scope="module")
def env_and_student():
    student = ScriptedStudent(POOL, gains=[0.1])
    env = SOARMathEnv("tiny", student=student, hard_pool=POOL, eval_subset_size=10, repeats=1,
                      invalid_penalty=-0.25)
    env.reset(seed=0)
    return env, student


def test_there_are_at_least_fifty_cases():
    assert len(MALFORMED) >= 50


@pytest.mark.parametrize("name,action", MALFORMED, ids=[name for name, _ in MALFORMED])
def test_malformed_action_is_rejected_with_a_reason(env_and_student, name, action):
    env, student = env_and_student
    trained_before = len(student.train_calls)
    obs, reward, terminated, truncated, info = env.step(action)
    assert reward == -0.25 and math.isfinite(reward)
    assert obs in env.observation_space and not terminated
    assert info["invalid_action"] is True and info["num_valid"] == 0
    assert isinstance(info["reason"], str) and info["reason"]
    assert info["rejected"], "every rejection carries at least one record"
    for record in info["rejected"]:
        assert record["reason"] and isinstance(record["detail"], str) and len(record["text"]) <= 400
    assert len(student.train_calls) == trained_before, "nothing reaches training"


STRUCTURAL = MALFORMED[:30]
"""Cases that are not even well-formed batches (wrong container, wrong entry shape, empty text)."""


@pytest.mark.parametrize("name,action", STRUCTURAL, ids=[name for name, _ in STRUCTURAL])
def test_action_space_does_not_contain_structural_junk(env_and_student, name, action):
    assert not env_and_student[0].action_space.contains(action)


@pytest.mark.parametrize("name,action", [
    ("valid among junk", [None, OK, {"question": "", "answer": "1"}]),
    ("unbalanced latex is text, not an error", [{"question": "Compute $\\frac{1}{2", "answer": "\\frac{1"}]),
    ("pair entry", [("What is 5 - 2?", "3")]),
    ("boxed answer is unboxed", [{"question": "What is 1+1?", "answer": "\\boxed{2}"}]),
    ("extra keys", [{**OK, "junk": object()}]),
    ("numpy object array", np.array([OK], dtype=object)),
    ("thousands of problems", [OK] * 5000),
    ("unicode", [{"question": "Combien font 2 × 3 ? 🧮 ∑", "answer": "6"}]),
])
def test_partly_valid_action_trains_on_the_valid_part(env_and_student, name, action):
    env, student = env_and_student
    trained_before = len(student.train_calls)
    _, reward, _, _, info = env.step(action)
    assert info["invalid_action"] is False and info["num_valid"] >= 1 and info["reason"] is None
    assert math.isfinite(reward) and len(student.train_calls) == trained_before + 1
    assert info["num_valid"] + sum(1 for r in info["rejected"] if r["reason"] != "too_many_problems") <= len(action)


def test_malformed_actions_on_the_real_tiny_model():
    """A few hostile actions all the way through a real student, inner loop included."""
    env = SOARMathEnv("tiny", repeats=1)
    env.reset(seed=0)
    for action in (None, [None, OK], [{"question": "x" * 1_000_000, "answer": "1"}],
                   [{"question": "Compute $\\frac{1}{2} + \\sqrt{", "answer": "\\frac{1}{2"}] * 3,
                   [OK] * 3000):
        obs, reward, _, _, info = env.step(action)
        assert math.isfinite(reward) and obs in env.observation_space
        assert info["invalid_action"] == (info["num_valid"] == 0)
        assert info["reason"] or info["num_valid"]


def test_vector_env_survives_malformed_sub_actions():
    student = ScriptedStudent(POOL, gains=[0.1])
    envs = SOARMathVectorEnv(3, "tiny", student=student, hard_pool=POOL, eval_subset_size=10, repeats=1)
    envs.reset(seed=0)
    for action in (None, 5, "abc", [None, None, None], (MALFORMED[40][1], [OK], None), [[OK]] * 7):
        obs, rewards, _, _, infos = envs.step(action)
        assert obs in envs.observation_space and np.isfinite(rewards).all()
        assert all(r or v for r, v in zip(infos["reason"], infos["num_valid"]))
