"""Runs longer than one episode: every episode's promoted questions stay on disk, resumes included.

A scripted student and a promotion every step (threshold -1, window 1) make each step promote
its dataset, so PQ grows by n = 4 problems a step; with ``episode_length=2`` a 5-step run has
three episodes (2 + 2 + 1 steps), and the env empties PQ at each reset.
"""

from __future__ import annotations

import json

import pytest

from agents.baselines import RandomTeacher
from agents.logger import Logger
from agents.loop import run_learning
from agents.run_dir import read_pq
from soar_env.envs.soar_math import SOARMathEnv
from soar_env.envs.testing import ScriptedStudent, ranked_pool

pytestmark = pytest.mark.usefixtures("one_thread")

STEPS = 5
POOL = ranked_pool(8)


def make_env() -> SOARMathEnv:
    return SOARMathEnv("tiny", student=ScriptedStudent(POOL), hard_pool=POOL, eval_subset_size=len(POOL),
                       episode_length=2, promotion_threshold=-1.0, promotion_window=1)


def learn(run_dir, steps: int, resume: bool = False) -> None:
    run_learning(RandomTeacher(seed=0), make_env(), steps, run_dir=run_dir, seed=0, progress_bar=False,
                 resume_from=run_dir if resume else None, logger=Logger(run_dir, writers=("csv",)))


def promoted_in_proposals(run_dir) -> list[tuple[int, str]]:
    """(step, question) of every promoted dataset, from the proposals log."""
    rows = [json.loads(line) for line in (run_dir / "proposals.jsonl").read_text().splitlines()]
    return [(row["step"], p["question"]) for row in rows if row["promoted"] for p in row["problems"]]


def test_every_episode_keeps_its_promoted_questions(tmp_path):
    learn(tmp_path, STEPS)
    rows = [json.loads(line) for line in (tmp_path / "pq.jsonl").read_text().splitlines()]
    promoted = promoted_in_proposals(tmp_path)
    assert len(promoted) == 4 * STEPS
    assert [row["question"] for row in rows] == [question for _, question in promoted], "promoted questions lost"
    assert [row["episode"] for row in rows] == [0] * 8 + [1] * 8 + [2] * 4
    assert [p.meta["episode"] for p in read_pq(tmp_path)] == [row["episode"] for row in rows]
    assert len(read_pq(tmp_path, episode=1)) == 8


@pytest.mark.parametrize("stop", [2, 3])  # at an episode's last step (its reset still pending), and inside one
def test_a_resumed_run_keeps_them_too(tmp_path, stop):
    reference, resumed = tmp_path / "reference", tmp_path / "resumed"
    learn(reference, STEPS)
    learn(resumed, stop)
    learn(resumed, STEPS, resume=True)
    assert (resumed / "pq.jsonl").read_text() == (reference / "pq.jsonl").read_text()
    assert (resumed / "proposals.jsonl").read_text() == (reference / "proposals.jsonl").read_text()
