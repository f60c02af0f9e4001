"""One train/test split per hard pool: Q_R never draws a problem the benchmarks test on.

The leak this guards against: a pool without a ``split`` column (a ``generator:`` or ``hf:``
spec, a plain jsonl) used to be Q_R's pool whole, while `hard_splits` carved the benchmarks'
test half out of that same pool. Here Q_R is drawn over many resets and steps of a real env
(scripted student, tiny preset) and intersected with the test split the benchmarks use.
"""

from __future__ import annotations

import warnings

import pytest

from agents.baselines import HardOnlyTeacher
from soar_env.config import TINY_HARDSET, make_config
from soar_env.data.generators import sample_problems
from soar_env.data.hardset import hard_splits, load_hard_pool, load_hardset, split_pool
from soar_env.data.loaders import save_jsonl
from soar_env.envs.soar_math import SOARMathEnv
from soar_env.envs.testing import ScriptedStudent
from soar_env.problems import Problem

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(params=["bundled", "plain-jsonl", "generator"])
def hardset(request, tmp_path) -> str:
    """Every kind of hard-set source: a file with a split column, a plain jsonl, a generator spec."""
    if request.param == "bundled":
        return "bundled"
    if request.param == "plain-jsonl":
        path = tmp_path / "plain.jsonl"
        save_jsonl(sample_problems(30, 7, families=("multiplication", "fraction"), difficulty=(3,), unique=True), path)
        return str(path)
    return TINY_HARDSET


def action(step: int) -> list[dict[str, str]]:
    return [{"question": f"What is {step} + {i}?", "answer": str(step + i)} for i in range(4)]


def test_q_r_never_meets_the_benchmarks_test_split(hardset):
    config = make_config("tiny", hardset=hardset, eval_subset_size=6)
    train, test = hard_splits(config)
    assert train and test
    env = SOARMathEnv(config=config, student=ScriptedStudent(train))  # the env loads its own hard pool
    drawn: set[str] = set()
    for seed in range(25):
        env.reset(seed=seed)
        drawn |= {p.question for p in env.core.eval_subset}
        for step in range(2):
            env.step(action(step))
            drawn |= {p.question for p in env.core.eval_subset}
    assert drawn, "no Q_R was drawn"
    assert not drawn & {p.question for p in test}, "Q_R drew problems of the benchmarks' hard test split"
    assert drawn <= {p.question for p in train}


def test_the_split_is_disjoint_exact_and_independent_of_order():
    pool = sample_problems(41, 3, families=("addition", "multiplication"), difficulty=(2, 3), unique=True)
    train, test = split_pool(pool)
    assert (len(train), len(test)) == (20, 21)  # rounded down, as the paper's 359 / 360 of 719
    assert not {p.question for p in train} & {p.question for p in test}
    shuffled_train, _ = split_pool(pool[::-1])
    assert {p.id for p in shuffled_train} == {p.id for p in train}
    assert [p.id for p in train] == [p.id for p in pool if p in train]  # pool order is kept
    # A duplicated question (even with other whitespace) sits on one side only.
    twin = Problem("  " + test[0].question.replace(" ", "  ") + " ", test[0].answer, id="twin")
    train2, test2 = split_pool(pool + [twin])
    assert twin in test2 and twin not in train2


@pytest.mark.parametrize("name", ["bundled", "bundled-fail32", "bundled-edge"])
def test_the_bundled_split_column_is_kept_exactly(name):
    config = make_config("cpu", hardset=name)
    train, test = hard_splits(config)
    assert [p.id for p in train] == [p.id for p in load_hardset(name, "train")]
    assert [p.id for p in test] == [p.id for p in load_hardset(name, "test")]
    assert [p.id for p in load_hard_pool(config)] == [p.id for p in train]


def test_q_r_from_the_test_split_warns_loudly():
    with pytest.warns(UserWarning, match="hard TEST split"):
        pool = load_hard_pool(make_config("tiny", hardset_split="test"))
    assert {p.id for p in pool} == {p.id for p in hard_splits(make_config("tiny"))[1]}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_hard_pool(make_config("tiny"))  # the train split: silent


def test_hard_only_never_trains_on_its_own_q_r():
    config = make_config("tiny", eval_subset_size=6)
    train, test = hard_splits(config)
    env = SOARMathEnv(config=config, student=ScriptedStudent(train))
    teacher = HardOnlyTeacher(seed=0)
    teacher.setup(env, 20)
    env.reset(seed=0)
    proposed: set[str] = set()
    for _ in range(20):
        batch = teacher.propose(1, config.problems_per_dataset)[0]
        questions = {p.question for p in batch}
        assert not questions & {p.question for p in env.core.eval_subset}, "Hard-Only trained on its own Q_R"
        proposed |= questions
        env.step(batch)
    assert proposed <= {p.question for p in train}
    assert len(proposed) > config.eval_subset_size  # it still covers the train split over time


def test_hard_only_says_so_when_q_r_is_the_whole_pool():
    config = make_config("tiny", eval_subset_size=16)  # the tiny train split holds 16 problems
    train, _ = hard_splits(config)
    env = SOARMathEnv(config=config, student=ScriptedStudent(train))
    teacher = HardOnlyTeacher(seed=0)
    teacher.setup(env, 1)
    env.reset(seed=0)
    with pytest.warns(UserWarning, match="trains on the problems its reward is measured on"):
        batch = teacher.propose(1, 4)[0]
    assert len(batch) == 4


def test_hardset_families_keeps_one_edge_in_both_splits(tmp_path):
    """hardset_families filters train (Q_R's pool) and test alike, by generator family and
    difficulty; no "@" keeps every difficulty; a hard set without families is refused clearly."""
    fail32 = make_config("cpu", hardset="bundled-fail32")
    config = make_config(fail32, hardset_families="addition,subtraction,multiplication@2-3")
    train, test = hard_splits(config)
    full_train, full_test = hard_splits(fail32)
    for kept, full in ((train, full_train), (test, full_test)):
        expected = [p.id for p in full if p.meta["family"] in ("addition", "subtraction", "multiplication")
                    and p.meta["difficulty"] in (2, 3)]
        assert [p.id for p in kept] == expected and expected
    assert len(train) == 37 and load_hard_pool(config) == train
    every_level = hard_splits(make_config(fail32, hardset_families="addition"))[0]
    assert {p.meta["difficulty"] for p in every_level} == {2, 3, 4}
    with pytest.raises(ValueError, match="unknown generator family"):
        hard_splits(make_config("cpu", hardset_families="algebra@2"))
    assert hard_splits(make_config("cpu", hardset_families="addition,subtraction,multiplication@2-3")) == \
        hard_splits(make_config("cpu"))  # the cpu preset's edge set is that slice already
    with pytest.raises(ValueError, match="only FAMILIES"):
        hard_splits(make_config("cpu", hardset_families="addition@2#10"))
    math_like = tmp_path / "math.jsonl"
    save_jsonl([Problem(f"Find x if x + {i} = 2{i}.", "20", id=f"m{i}") for i in range(6)], math_like)
    with pytest.raises(ValueError, match="has no generator family"):
        hard_splits(make_config("tiny", hardset=str(math_like), hardset_families="addition"))
    assert "hardset_families" not in make_config("cpu").measured_settings()  # older studies still load
