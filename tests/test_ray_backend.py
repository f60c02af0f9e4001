"""backend="ray": a local Ray cluster of 2 workers gives the in-process results and survives a killed worker."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from soar_env.config import make_config
from soar_env.envs.testing import CRASH_COUNT_VARIABLE, CRASH_DIR_VARIABLE
from soar_env.envs.vector import SOARMathVectorEnv

ray = pytest.importorskip("ray")

# Promote at every step, so the remote-weights fetch and the promoted baseline are compared too.
# One run after another (batch_runs=False): the comparisons below are bitwise.
SETTINGS = dict(num_envs=2, repeats=2, promotion_window=1, promotion_threshold=-1.0, inner_steps=2, batch_runs=False)
STEPS = 2


@pytest.fixture(scope="module", autouse=True)
def local_cluster():
    """One 2-CPU Ray for the module; the runner joins it instead of starting its own."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the workers run 1 thread each; same arithmetic on both sides
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()
    torch.set_num_threads(threads)


def rollout(**overrides) -> dict:
    """STEPS vector steps on the tiny preset with fixed actions; everything the teacher would see."""
    envs = SOARMathVectorEnv(preset="tiny", **{**SETTINGS, **overrides})
    envs.reset(seed=3)
    envs.action_space.seed(11)
    out = {"rewards": [], "train_rewards": [], "trained_correct": [], "events": [], "errors": [], "retried": []}
    for _ in range(STEPS):
        _, rewards, _, _, infos = envs.step(envs.action_space.sample())
        out["rewards"].append(rewards.tolist())
        out["train_rewards"].append(list(infos["train_rewards"]))
        out["trained_correct"].append(list(infos["trained_correct"]))
        out["events"].extend(infos["backend_events"][0])
        out["errors"].append(list(infos["errors"]))
        out["retried"].append(list(infos["retried_runs"]))
    out["promotions"] = envs.promotions
    out["baseline"] = envs.student.baseline_state()
    out["runner"] = type(envs.core.runner).__name__
    out["workers"] = len(getattr(envs.core.runner, "workers", []))
    envs.close()
    return out


@pytest.fixture(scope="module")
def local_run():
    return rollout()


def assert_same_transitions(a: dict, b: dict) -> None:
    assert a["rewards"] == b["rewards"]
    assert a["train_rewards"] == b["train_rewards"]
    assert a["trained_correct"] == b["trained_correct"]
    assert a["promotions"] == b["promotions"] == STEPS
    for name, tensor in a["baseline"].items():
        assert torch.equal(tensor, b["baseline"][name]), name


def test_two_ray_workers_give_the_in_process_results(local_run):
    remote = rollout(backend="ray", ray_workers=2)
    assert remote["runner"] == "RayRunner" and remote["workers"] == 2
    assert local_run["runner"] == "LocalRunner"
    assert_same_transitions(local_run, remote)
    assert remote["events"] == [] and all(not e for step in remote["errors"] for e in step)
    # The runs did learn something, so the comparison is not between two untouched students.
    assert any(r for step in local_run["train_rewards"] for runs in step for r in runs)


def test_each_ray_worker_batches_its_share_and_matches_the_sequential_runs(local_run):
    """batch_runs on Ray: each of the 2 workers trains its 2 runs as one batch (soar_env.batched_runs);
    the transitions equal one-run-at-a-time in-process ones, the weights up to float round-off."""
    remote = rollout(backend="ray", ray_workers=2, batch_runs=True)
    assert remote["runner"] == "RayRunner" and remote["events"] == []
    for key in ("rewards", "train_rewards", "trained_correct"):
        assert remote[key] == local_run[key], key
    assert remote["promotions"] == local_run["promotions"] == STEPS
    for name, tensor in local_run["baseline"].items():
        torch.testing.assert_close(remote["baseline"][name], tensor, atol=2e-5, rtol=1e-4, msg=name)


def test_a_killed_worker_is_retried_and_the_step_completes(local_run, tmp_path, monkeypatch):
    monkeypatch.setenv(CRASH_DIR_VARIABLE, str(tmp_path))
    monkeypatch.setenv(CRASH_COUNT_VARIABLE, "1")
    remote = rollout(backend="ray", ray_workers=2, ray_student_factory="soar_env.envs.testing:crashing_student")
    assert os.path.exists(tmp_path / "crash-0")  # a worker process really died mid-step
    assert [e["action"] for e in remote["events"]] == ["retried"]
    assert "Actor" in remote["events"][0]["error"]  # RayActorError or ActorUnavailableError: the process died
    assert sum(sum(step) for step in remote["retried"]) == 1
    assert_same_transitions(local_run, remote)  # the retried run computed what it would have


def test_a_run_that_keeps_failing_is_reported_and_counted_as_no_gain(tmp_path, monkeypatch):
    monkeypatch.setenv(CRASH_DIR_VARIABLE, str(tmp_path))
    monkeypatch.setenv(CRASH_COUNT_VARIABLE, "2")  # the first run dies on both of its attempts
    envs = SOARMathVectorEnv(preset="tiny", num_envs=1, repeats=1, backend="ray", ray_workers=1, ray_max_retries=1,
                             ray_student_factory="soar_env.envs.testing:crashing_student")
    envs.reset(seed=0)
    _, rewards, _, _, infos = envs.step(envs.action_space.sample())
    events = infos["backend_events"][0]
    assert [e["action"] for e in events] == ["retried", "gave up"]
    (errors,) = infos["errors"]
    assert len(errors) == 1 and "failed after 2 attempt(s)" in errors[0]
    # Counted, not dropped: the run's gain is 0, so the dataset's reward is exactly 0.
    assert rewards.tolist() == [0.0] and infos["run_rewards"][0] == [0.0]
    # The next step runs normally on the restarted worker.
    _, rewards, _, _, infos = envs.step(envs.action_space.sample())
    assert infos["backend_events"][0] == [] and infos["errors"][0] == []
    envs.close()


def test_workers_that_cannot_start_are_dropped_and_the_step_still_ends():
    """A student that cannot be built on the workers must not hang env.step: runs fail, reward 0, reasons."""
    envs = SOARMathVectorEnv(preset="tiny", num_envs=1, repeats=2, backend="ray", ray_workers=1, ray_max_retries=1,
                             ray_student_factory="soar_env.envs.testing:unbuildable_student")
    envs.reset(seed=0)
    _, rewards, _, _, infos = envs.step(envs.action_space.sample())
    actions = [e["action"] for e in infos["backend_events"][0]]
    assert actions == ["replaced", "dropped"]
    assert rewards.tolist() == [0.0] and infos["run_rewards"][0] == [0.0, 0.0]
    assert all("no Ray worker is left" in e for e in infos["errors"][0]) and len(infos["errors"][0]) == 2
    envs.close()


def test_a_student_passed_to_the_env_is_refused_on_ray():
    from soar_env.envs.testing import ScriptedStudent, ranked_pool

    pool = ranked_pool(4)
    envs = SOARMathVectorEnv(preset="tiny", num_envs=1, backend="ray", student=ScriptedStudent(pool), hard_pool=pool)
    envs.reset(seed=0)
    with pytest.raises(ValueError, match="ray_student_factory"):
        envs.step(envs.action_space.sample())


def test_ray_settings_are_validated():
    with pytest.raises(ValueError, match="ray_workers"):
        make_config("tiny", backend="ray", ray_workers=0)
    with pytest.raises(ValueError, match="module:function"):
        make_config("tiny", ray_student_factory="no_colon")
    with pytest.raises(ValueError, match="backend must be one of"):
        make_config("tiny", backend="spark")
    assert np.isclose(make_config("tiny", backend="ray").ray_cpus_per_worker, 1.0)


def test_intrinsic_rewards_on_ray_equal_the_in_process_ones():
    def success_rates(**overrides):
        envs = SOARMathVectorEnv(preset="tiny", num_envs=2, reward_mode="learnability", intrinsic_samples=4,
                                 **overrides)
        envs.reset(seed=5)
        envs.action_space.seed(5)
        _, rewards, _, _, infos = envs.step(envs.action_space.sample())
        envs.close()
        return rewards.tolist(), [list(r) for r in infos["success_rates"]]

    local = success_rates()
    assert success_rates(backend="ray", ray_workers=2) == local
    assert all(len(rates) == 4 for rates in local[1])  # one success rate per problem of each dataset
