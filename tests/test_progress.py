"""Progress inside an env step: the events a step sends, and the nested bar of `soar train`."""

from __future__ import annotations

from collections import Counter

import pytest

from agents.loop import StepProgress
from soar_env.envs.testing import ScriptedStudent, ranked_pool
from soar_env.envs.vector import SOARMathVectorEnv
from soar_env.runs import ProgressEvent

POOL = ranked_pool(10)

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")


class SteppingStudent(ScriptedStudent):
    """A scripted student that, like `Student`, reports each inner RLOO step through ``on_step``."""

    def train(self, problems, steps=None, batch_size=None, group_size=None, *, seed=None, on_step=None):
        result = super().train(problems, steps, batch_size, group_size, seed=seed)
        for done in range(1, int(steps or 1) + 1):
            if on_step is not None:
                on_step(done, steps)
        return result


def batch(tag: str, n: int = 2) -> list[dict[str, str]]:
    return [{"question": f"What is {i} + {tag}?", "answer": str(i)} for i in range(n)]


@pytest.mark.parametrize("student_class", [SteppingStudent, ScriptedStudent])
def test_a_vector_step_reports_every_run_and_inner_step(student_class):
    g, r, k = 2, 3, 4
    student = student_class(POOL, gains=(0.1,))
    envs = SOARMathVectorEnv(g, "tiny", student=student, hard_pool=POOL, eval_subset_size=10, repeats=r,
                             problems_per_dataset=2, inner_steps=k)
    events: list[ProgressEvent] = []
    envs.core.set_progress(events.append)
    envs.reset(seed=0)
    envs.step([batch("a"), batch("b")])
    kinds = Counter(e.kind for e in events)
    inner = g * r * k if student_class is SteppingStudent else 0  # a student without on_step: runs only
    assert kinds == Counter({"step_start": 1, "run_start": g * r, "inner_step": inner, "run_eval": g * r,
                             "run_end": g * r, "step_end": 1})
    assert events[0].kind == "step_start" and events[-1].kind == "step_end"
    assert all(e.runs == g * r and e.inner_steps == k for e in events)
    assert [e.runs_done for e in events if e.kind == "run_end"] == list(range(1, g * r + 1))
    if inner:
        first_run = [e.kind for e in events if e.run == 0]
        assert first_run == ["run_start", *["inner_step"] * k, "run_eval", "run_end"]
        assert [e.inner_step for e in events if e.run == 0 and e.kind == "inner_step"] == [1, 2, 3, 4]
    envs.core.set_progress(None)
    events.clear()
    envs.step([batch("c"), batch("d")])
    assert events == []


def test_step_progress_counts_and_etas():
    state = StepProgress()
    t = 0.0

    def send(kind, **fields):
        state.update(ProgressEvent(kind, runs=2, inner_steps=2, time=t, **fields))

    send("step_start")
    assert state.total == 4 and state.done == 0 and "baseline eval" in state.describe()
    t = 10.0
    send("run_start", run=0)
    t = 20.0
    send("inner_step", run=0, inner_step=1)
    assert state.done == 1
    assert state.describe() == "runs 1/2, inner step 1/2, run ETA 00:10, step ETA 00:30"
    t = 30.0
    send("inner_step", run=0, inner_step=2)
    t = 30.0
    send("run_eval", run=0, inner_step=2)
    t = 35.0
    send("run_end", run=0, inner_step=2, runs_done=1)
    assert state.done == 2 and state.step_eta() == pytest.approx(25.0)  # 2 x 10 s inner + 5 s eval
    t = 35.0
    send("run_start", run=1)
    assert state.describe().startswith("runs 2/2, inner step 0/2, run ETA 00:25")
    send("step_end", runs_done=2)
    assert state.done == 4


def test_step_progress_of_runs_batched_together():
    """batch_runs: every run starts at once and each batched inner step advances them all."""
    state = StepProgress()
    t = 0.0

    def send(kind, **fields):
        state.update(ProgressEvent(kind, runs=2, inner_steps=2, time=t, **fields))

    send("step_start")
    for run in (0, 1):
        send("run_start", run=run)
    assert state.describe() == "runs 2/2, inner step 0/2"
    t = 20.0  # one batched inner step of both runs: 20 s, 10 s a unit
    send("inner_step", run=0, inner_step=1)
    send("inner_step", run=1, inner_step=1)
    assert state.done == 2 and state.inner_step == 1
    # The least advanced run needs one more batched step (20 s); the step has 2 units left (20 s).
    assert state.describe() == "runs 2/2, inner step 1/2, run ETA 00:20, step ETA 00:20"
    t = 40.0
    send("inner_step", run=0, inner_step=2)
    send("inner_step", run=1, inner_step=2)
    for run in (0, 1):
        send("run_eval", run=run, inner_step=2)
    t = 50.0  # the batched evaluation of both: 5 s a run
    send("run_end", run=0, inner_step=2, runs_done=1)
    send("run_end", run=1, inner_step=2, runs_done=2)
    assert state.done == 4 and state.phase == "between runs"
    assert state._mean(state._eval_seconds) == pytest.approx(5.0)
    send("step_end", runs_done=2)
    assert state.done == 4
