"""Testing SOAR envs: a model-free student, and a conformance check for your own env class.

    from soar_env.envs.testing import ScriptedStudent, check_soar_env, ranked_pool
    pool = ranked_pool(10)
    student = ScriptedStudent(pool, gains=[0.1, 0.3, 0.2])
    env = SOARMathEnv("tiny", student=student, hard_pool=pool, eval_subset_size=10, repeats=3)
    check_soar_env(lambda: MyEnv("tiny", student=ScriptedStudent(pool), hard_pool=pool))

The student's skill is one number s in [0, 1]. Greedy evaluation answers a hard-pool problem
correctly when its rank in the pool is below round(s * len(pool)), so with Q_R = the whole
pool the accuracy is exactly round(s * N) / N and rewards are known in advance. Sampled
answers to a hard-pool problem are draws: answer j under seed e is right when a uniform number
fixed by (e, problem, j) is below s, so the same seed gives every state the same numbers
(common random numbers) and a higher skill never answers worse. Teacher-forced scoring gives
an answer the log-prob ``LOGPROB_FLOOR + format + (skill if it is the reference answer)``: a
run's ``gains`` move only the right answers (knowledge), its ``format_gains`` every answer
(format). A training run returns skill + gain, with gains from a list (in call order) or a
function of the run's seed (so a resumed env reproduces them). Every call is recorded for
assertions.

`check_soar_env` runs the env contract (spaces, reset/step returns, rejection of malformed
actions, same-seed determinism, exact resume) on any env factory, with named failure
messages, as dm_env's test utilities do; `crashing_student` and `unbuildable_student` are
fault injectors for the Ray backend.
"""

from __future__ import annotations

import math
import os
import random
import tempfile
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from gymnasium import spaces
from gymnasium.utils.env_checker import data_equivalence
from gymnasium.vector import VectorEnv

from soar_env.envs.spaces import ProblemBatch
from soar_env.estimators import answer_reply
from soar_env.problems import Problem
from soar_env.student import AnswerLogprobs, EvalResult, TrainResult, build_student

GainScript = Sequence[float] | Callable[[Sequence[Problem], int], float]

LOGPROB_FLOOR = -3.0
"""A scripted student's mean per-token log-prob of any answer before skill and format add to it."""


def ranked_pool(n: int, prefix: str = "hard") -> list[Problem]:
    """``n`` distinct hard problems; a ScriptedStudent ranks them in this order."""
    return [Problem(f"{prefix} problem {i}: what is {i} * {i + 7}?", str(i * (i + 7)), source=prefix)
            for i in range(n)]


class ScriptedStudent:
    """Satisfies `soar_env.student.StudentLike` without a model (see module doc)."""

    def __init__(self, pool: Sequence[Problem], gains: GainScript = (0.0,), *, skill: float = 0.0,
                 success_rate: float | Callable[[Problem], float] = 0.5, fail_runs: Sequence[int] = (),
                 format_gains: GainScript = (0.0,)) -> None:
        self.rank = {p.id: i for i, p in enumerate(pool)}
        self.size = len(pool)
        self.gains = gains
        self.format_gains = format_gains
        """Like ``gains``, for the log-prob every answer gains (format, not knowledge)."""
        self.success_rate = success_rate
        self.fail_runs = set(fail_runs)
        """Run numbers (0-based, in call order) that fail like a non-finite loss: no state."""
        self.baseline: dict[str, float] = {"skill": float(skill), "version": 0.0}
        self.promotions = 0
        self.train_calls: list[dict[str, Any]] = []
        self.eval_calls: list[dict[str, Any]] = []
        self.logprob_calls: list[dict[str, Any]] = []

    def _gain(self, script: GainScript, problems: Sequence[Problem], seed: int) -> float:
        if callable(script):
            return float(script(problems, seed))
        return float(script[len(self.train_calls) % len(script)])

    def train(self, problems: Sequence[Problem], steps: int | None = None, batch_size: int | None = None,
              group_size: int | None = None, *, seed: int | None = None) -> TrainResult:
        run = len(self.train_calls)
        gain = self._gain(self.gains, problems, int(seed or 0))
        format_gain = self._gain(self.format_gains, problems, int(seed or 0))
        self.train_calls.append({"problems": list(problems), "steps": steps, "batch_size": batch_size,
                                 "group_size": group_size, "seed": seed, "gain": gain, "format_gain": format_gain})
        steps_done = int(steps or 1)
        if run in self.fail_runs:
            return TrainResult(steps_done=0, error="non_finite_loss at step 0: scripted")
        if gain == 0.0 and format_gain == 0.0:
            # Nothing learned: the very same weights, as a skipped zero-advantage update gives.
            state = dict(self.baseline)
        else:
            state = {"skill": self.baseline["skill"] + gain, "version": float(run + 1)}
            if format_gain or "format" in self.baseline:
                state["format"] = self.baseline.get("format", 0.0) + format_gain
        return TrainResult(steps_done=steps_done, rewards=[0.0] * steps_done, tokens=10 * steps_done,
                           state=state)  # type: ignore[arg-type]  (a scripted state is a dict of floats)

    def evaluate(self, problems: Sequence[Problem], *, samples: int = 1, greedy: bool = True, state: Any = None,
                 max_new_tokens: int | None = None, seed: int | None = None) -> EvalResult:
        self.eval_calls.append({"problems": list(problems), "samples": samples, "greedy": greedy,
                                "baseline": state is None})
        skill = (state if state is not None else self.baseline)["skill"]
        solved = round(min(max(skill, 0.0), 1.0) * self.size)
        correct = []
        for problem in problems:
            if problem.id in self.rank and greedy and samples == 1:
                correct.append(int(self.rank[problem.id] < solved))
            elif problem.id in self.rank and not greedy:
                draws = (random.Random(f"{seed}:{problem.id}:{j}").random() for j in range(samples))
                correct.append(sum(int(u < skill) for u in draws))
            else:
                rate = self.success_rate(problem) if callable(self.success_rate) else self.success_rate
                correct.append(int(round(rate * samples)))
        return EvalResult(correct=correct, samples=samples, tokens=len(problems) * samples)

    def answer_logprobs(self, problems: Sequence[Problem], answers: Sequence[str], *,
                        state: Any = None) -> AnswerLogprobs:
        """Mean per-token log-prob of each answer (see module doc): skill lifts only reference answers."""
        self.logprob_calls.append({"problems": list(problems), "answers": list(answers), "baseline": state is None})
        weights = state if state is not None else self.baseline
        skill, form = weights["skill"], weights.get("format", 0.0)
        logprobs = [LOGPROB_FLOOR + form + (skill if answer == answer_reply(problem.answer) else 0.0)
                    for problem, answer in zip(problems, answers)]
        return AnswerLogprobs(logprobs, tokens=len(answers))

    def promote(self, state: dict[str, float]) -> None:
        self.baseline = dict(state)
        self.promotions += 1

    def baseline_state(self) -> dict[str, float]:
        return dict(self.baseline)

    def reset(self) -> None:
        pass

    @property
    def baseline_evaluations(self) -> int:
        """How many problems were evaluated for the baseline (cache misses)."""
        return sum(len(call["problems"]) for call in self.eval_calls if call["baseline"])


CRASH_DIR_VARIABLE = "SOAR_TEST_CRASH_DIR"
"""Folder that `crashing_student` counts its crashes in (one file per crash)."""
CRASH_COUNT_VARIABLE = "SOAR_TEST_CRASH_COUNT"
"""How many training runs, over all processes, `crashing_student` kills (default 1)."""


def crashing_student(config: Any) -> Any:
    """The config's real student, whose process dies at the start of its first few ``train`` calls.

    A fault injector for the Ray backend (``ray_student_factory=
    "soar_env.envs.testing:crashing_student"``): a run claims a crash by creating the next
    numbered file in ``$SOAR_TEST_CRASH_DIR`` (exclusive create, so it is exact across worker
    processes) and then exits its process the way a killed worker does, mid-step.
    """
    student = build_student(config)
    train = student.train
    folder = os.environ[CRASH_DIR_VARIABLE]
    budget = int(os.environ.get(CRASH_COUNT_VARIABLE, "1"))

    def train_or_die(*args: Any, **kwargs: Any) -> Any:
        for number in range(budget):
            try:
                os.close(os.open(os.path.join(folder, f"crash-{number}"), os.O_CREAT | os.O_EXCL | os.O_WRONLY))
            except FileExistsError:
                continue
            os._exit(17)  # no cleanup, no exception: as SIGKILL or an OOM kill leaves it
        return train(*args, **kwargs)

    student.train = train_or_die
    return student


def unbuildable_student(config: Any) -> Any:
    """A student factory that always fails, as a worker without the model files would (fault tests)."""
    raise RuntimeError(f"cannot build the student {config.student_model!r} on this worker (test fault)")


# ---------------------------------------------------------------------------------------------
# A conformance check for SOAR envs: run it on your own env class
# ---------------------------------------------------------------------------------------------

MISSING_SPACES = "{name} lacks {missing}: a SOAR env needs an action_space and an observation_space"
RESET_NOT_A_PAIR = "{name}.reset(seed=...) must return (observation, info), got {got!r}"
OBSERVATION_OUTSIDE_SPACE = "{name}.{call} returned an observation outside observation_space: {obs!r}"
INFO_NOT_A_DICT = "{name}.{call} returned info of type {got}, expected a dict"
INFO_MISSING_KEYS = "{name}.{call} info lacks {missing}, which every SOAR env reports"
SAMPLE_NOT_CONTAINED = "{name}.action_space.sample() returned an action that action_space does not contain"
STEP_NOT_FIVE = "{name}.step must return (observation, reward, terminated, truncated, info), got {got!r}"
BAD_REWARD = "{name}.step returned the reward {reward!r}; expected a finite float (a vector env: num_envs of them)"
BAD_FLAGS = "{name}.step returned terminated={terminated!r}, truncated={truncated!r}; expected bools"
MALFORMED_ACTION_RAISED = "{name}.step({action!r}) raised {error}: a malformed action must be rejected, never raised"
MALFORMED_ACTION_NOT_REJECTED = ("{name}.step({action!r}) did not report the action as invalid "
                                 "(info['invalid_action'] True, a reason in info['rejected'])")
SAME_SEED_DIVERGES = "two {name} envs reset with seed {seed} and given the same actions differ in {what} at step {step}"
RESUME_DIVERGES = "{name} loaded from a checkpoint differs from the env that saved it in {what} at step {step}"

RESET_INFO_KEYS = ("baseline_accuracy", "eval_problems")
"""What ``reset`` reports: the baseline's accuracy on Q_R and Q_R itself."""
STEP_INFO_KEYS = ("reward", "num_valid", "rejected", "invalid_action", "promoted", "promotions")
"""What ``step`` reports: the reward, the validation outcome and the promotion state."""
MALFORMED_ACTIONS: tuple[Any, ...] = (None, "What is 2 + 2? 4", [], 42)
"""Actions that are not a problem batch at all; a text-action env must reject each with a reason."""


class EnvConformanceError(AssertionError):
    """An env breaks the SOAR env contract; the message names the rule and the offending value."""


def check_soar_env(env_fn: Callable[[], Any], *, seed: int = 0, steps: int = 2,
                   check_checkpoint: bool = True) -> None:
    """Check that the envs ``env_fn()`` builds keep the SOAR env contract; raise `EnvConformanceError` if not.

    ``env_fn`` makes a fresh env each call (a class, or a lambda around ``gym.make`` or
    ``gym.make_vec``); give each env its own student (a `ScriptedStudent` makes this take
    milliseconds). Checked, each failure a named message above:

    1. spaces exist, ``reset(seed=...)`` returns (observation in the space, info with
       `RESET_INFO_KEYS`), ``action_space.sample()`` is in ``action_space``;
    2. ``step`` returns five items: an observation in the space, finite float rewards, bool
       flags and an info with `STEP_INFO_KEYS`;
    3. with a text action space (`ProblemBatch`), each of `MALFORMED_ACTIONS` is rejected
       with a reason, never raised;
    4. two envs with the same seed and actions give equal observations, rewards, flags, infos;
    5. when the env has ``save``/``load`` (``check_checkpoint``), an env loaded from a
       checkpoint continues exactly as the env that saved it.
    """
    env = env_fn()
    name = type(env.unwrapped if hasattr(env, "unwrapped") else env).__name__
    try:
        actions = _check_basics(env, name, seed, steps)
        _check_malformed_actions(env, name, seed)
    finally:
        env.close()
    _check_same_seed(env_fn, name, seed, actions)
    if check_checkpoint and hasattr(_unwrapped(env), "save") and hasattr(_unwrapped(env), "load"):
        _check_resume(env_fn, name, seed, actions)


def _fail(message: str, **fields: Any) -> None:
    raise EnvConformanceError(message.format(**fields))


def _unwrapped(env: Any) -> Any:
    return getattr(env, "unwrapped", env)


def _check_basics(env: Any, name: str, seed: int, steps: int) -> list[Any]:
    """Rules 1 and 2 over ``steps`` sampled actions; returns the actions for the later rules."""
    missing = [attr for attr in ("action_space", "observation_space") if getattr(env, attr, None) is None]
    if missing:
        _fail(MISSING_SPACES, name=name, missing=", ".join(missing))
    reset = env.reset(seed=seed)
    if not isinstance(reset, tuple) or len(reset) != 2:
        _fail(RESET_NOT_A_PAIR, name=name, got=reset)
    _check_observation(env, name, "reset", reset[0])
    _check_info(name, "reset", reset[1], RESET_INFO_KEYS)
    env.action_space.seed(seed)
    actions = []
    for _ in range(steps):
        action = env.action_space.sample()
        if not env.action_space.contains(action):
            _fail(SAMPLE_NOT_CONTAINED, name=name)
        actions.append(action)
        result = env.step(action)
        if not isinstance(result, tuple) or len(result) != 5:
            _fail(STEP_NOT_FIVE, name=name, got=result)
        obs, reward, terminated, truncated, info = result
        _check_observation(env, name, "step", obs)
        _check_reward_and_flags(env, name, reward, terminated, truncated)
        _check_info(name, "step", info, STEP_INFO_KEYS)
        if _episode_over(env, terminated, truncated):
            env.reset()
    return actions


def _check_observation(env: Any, name: str, call: str, obs: Any) -> None:
    if not env.observation_space.contains(obs):
        _fail(OBSERVATION_OUTSIDE_SPACE, name=name, call=call, obs=obs)


def _check_info(name: str, call: str, info: Any, keys: Sequence[str]) -> None:
    if not isinstance(info, dict):
        _fail(INFO_NOT_A_DICT, name=name, call=call, got=type(info).__name__)
    missing = [key for key in keys if key not in info]
    if missing:
        _fail(INFO_MISSING_KEYS, name=name, call=call, missing=", ".join(missing))


def _check_reward_and_flags(env: Any, name: str, reward: Any, terminated: Any, truncated: Any) -> None:
    if isinstance(env, VectorEnv):
        rewards = np.asarray(reward)
        good_reward = rewards.shape == (env.num_envs,) and bool(np.isfinite(rewards).all())
        flags = [np.asarray(terminated), np.asarray(truncated)]
        good_flags = all(f.shape == (env.num_envs,) and f.dtype == np.bool_ for f in flags)
    else:
        good_reward = isinstance(reward, (float, np.floating)) and math.isfinite(reward)
        good_flags = all(isinstance(f, (bool, np.bool_)) for f in (terminated, truncated))
    if not good_reward:
        _fail(BAD_REWARD, name=name, reward=reward)
    if not good_flags:
        _fail(BAD_FLAGS, name=name, terminated=terminated, truncated=truncated)


def _episode_over(env: Any, terminated: Any, truncated: Any) -> bool:
    # A vector env resets itself (next-step autoreset); a single env is reset by its user.
    return not isinstance(env, VectorEnv) and bool(terminated or truncated)


def _takes_text(env: Any) -> bool:
    space = env.action_space
    if isinstance(env, VectorEnv) and isinstance(space, spaces.Tuple):
        return all(isinstance(sub, ProblemBatch) for sub in space.spaces)
    return isinstance(space, ProblemBatch)


def _check_malformed_actions(env: Any, name: str, seed: int) -> None:
    """Rule 3: a text-action env rejects non-batches with a reason (numeric envs cannot be given one)."""
    if not _takes_text(env):
        return
    env.reset(seed=seed)
    for action in MALFORMED_ACTIONS:
        try:
            _, _, terminated, truncated, info = env.step(action)
        except Exception as error:  # noqa: BLE001 - the rule is that nothing is raised
            _fail(MALFORMED_ACTION_RAISED, name=name, action=action, error=f"{type(error).__name__}: {error}")
        invalid = np.asarray(info.get("invalid_action", False))
        rejected = info.get("rejected")
        reported = [len(r) > 0 for r in rejected] if isinstance(env, VectorEnv) else [bool(rejected)]
        if not (invalid.all() and all(reported)):
            _fail(MALFORMED_ACTION_NOT_REJECTED, name=name, action=action)
        if _episode_over(env, terminated, truncated):
            env.reset()


def _compare(first: Sequence[Any], second: Sequence[Any], message: str, name: str, seed: int, step: int) -> None:
    labels = ("the observation", "the reward", "terminated", "truncated")
    for label, a, b in zip(labels, first, second):
        if not data_equivalence(a, b, exact=True):
            _fail(message, name=name, seed=seed, what=label, step=step)
    info_a, info_b = first[4], second[4]
    for key in sorted(set(info_a) | set(info_b)):
        if key not in info_a or key not in info_b or not data_equivalence(info_a[key], info_b[key], exact=True):
            _fail(message, name=name, seed=seed, what=f"info[{key!r}]", step=step)


def _check_same_seed(env_fn: Callable[[], Any], name: str, seed: int, actions: Sequence[Any]) -> None:
    """Rule 4: same seed, same actions, same transitions (Gymnasium's determinism rollout)."""
    envs = [env_fn(), env_fn()]
    try:
        resets = [env.reset(seed=seed) for env in envs]
        if not data_equivalence(resets[0][0], resets[1][0], exact=True):
            _fail(SAME_SEED_DIVERGES, name=name, seed=seed, what="the reset observation", step=0)
        for step, action in enumerate(actions, start=1):
            first, second = (env.step(action) for env in envs)
            _compare(first, second, SAME_SEED_DIVERGES, name, seed, step)
            for env, result in zip(envs, (first, second)):
                if _episode_over(env, result[2], result[3]):
                    env.reset()
    finally:
        for env in envs:
            env.close()


def _check_resume(env_fn: Callable[[], Any], name: str, seed: int, actions: Sequence[Any]) -> None:
    """Rule 5: save after one step, then the saved env and a loaded one take the same steps."""
    saved, loaded = env_fn(), env_fn()
    try:
        saved.reset(seed=seed)
        saved.step(actions[0])
        loaded.reset(seed=seed + 1)  # a wrapped env must be reset before it may step; load overrides it
        with tempfile.TemporaryDirectory() as folder:
            path = os.path.join(folder, "env.pt")
            _unwrapped(saved).save(path)
            _unwrapped(loaded).load(path)
        for step, action in enumerate(actions[1:] or actions, start=1):
            _compare(saved.step(action), loaded.step(action), RESUME_DIVERGES, name, seed, step)
    finally:
        saved.close()
        loaded.close()
