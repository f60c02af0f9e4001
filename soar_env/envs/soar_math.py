"""SOAR-MATH-v0: a teacher writes a batch of math problems; the reward is what they teach.

    env = gym.make("SOAR-MATH-v0", preset="cpu")
    obs, info = env.reset(seed=0)
    obs, reward, terminated, truncated, info = env.step(env.action_space.sample())

The env itself is thin: the student, Q_R, the inner runs, promotion and PQ live in
`soar_env.envs.core.SOARCore`, checkpoints in `soar_env.envs.checkpoint`, the spaces in
`soar_env.envs.spaces`.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Mapping, Sequence
from typing import Any

import gymnasium as gym
import numpy as np

from soar_env.config import EnvConfig, make_config
from soar_env.envs.checkpoint import CheckpointMixin, CoreStateMixin
from soar_env.envs.core import SOARCore
from soar_env.envs.results import dataset_info
from soar_env.envs.spaces import ProblemBatch, make_observation, observation_space
from soar_env.problems import Problem
from soar_env.rng import rng_from_state, rng_state
from soar_env.student import StudentLike


class SOARMathEnv(CoreStateMixin, CheckpointMixin, gym.Env[np.ndarray, tuple[Problem, ...]]):
    """
    ## Description

    The teacher-side environment of SOAR (Sundaram et al., "Teaching Models to Teach
    Themselves", arXiv 2601.18778). The agent is a teacher that writes a batch of practice
    math problems, each a question with its final answer. The environment holds a student
    language model and a set of hard problems the student cannot solve. Each step trains r
    independent copies of the current *baseline* student on the batch with RLOO (the inner
    loop), measures them on Q_R (M problems drawn from the hard train split; the paper: greedy
    accuracy) and rewards the teacher by the mean gain over the baseline. When the moving
    average of step rewards over the last m steps exceeds tau, the median of the r trained
    students becomes the new baseline and the batch joins the promoted-questions buffer PQ.

    ## Action Space

    A `ProblemBatch`: a tuple or list of 1 to ``max_problems`` entries, each a `Problem`, a
    ``{"question": str, "answer": str}`` mapping or a ``(question, answer)`` pair.
    ``action_space.sample()`` returns ``problems_per_dataset`` random generated problems.
    Entries are validated with `soar_env.problems.to_problem`; invalid ones are dropped and
    listed in ``info["rejected"]`` with a reason. Any object is accepted by ``step``: a
    malformed action never raises, it is rejected whole.

    ## Observation Space

    ``Box(5,)`` of float32, one number each:

    | index | observation | min | max |
    |---|---|---|---|
    | 0 | baseline level on the current Q_R (greedy accuracy; see Rewards) | 0 | 1 |
    | 1 | promotions so far this episode | 0 | episode_length |
    | 2 | fraction of the episode elapsed | 0 | 1 |
    | 3 | moving average of step rewards (the promotion window) | -1 | 1 |
    | 4 | last step reward | -1 | 1 |

    Entries 3 and 4 are clipped to [-1, 1]. The text itself (Q_R, PQ, rejections) is in ``info``.

    ## Rewards

    ``reward_mode="grounded"`` (SOAR): mean over the r runs of the trained student's score on
    Q_R minus the baseline's, as ``reward_estimator`` measures it (`soar_env.estimators`):
    ``"greedy"`` (paper) Acc(trained, Q_R) - Acc(baseline, Q_R), in [-1, 1], the paper saw
    -0.04 to +0.02; ``"sampled"`` the gain in success rate over ``estimator_samples`` answers
    per problem, the baseline sampled afresh every step with the same seed as that step's
    trained students (common random numbers); ``"likelihood"`` the gain in mean per-token
    log-prob of the reference answers minus that of decoy answers (nats per token; observation
    0 is then the mean per-token probability of the reference answers). ``"learnability"``: from
    ``intrinsic_samples`` sampled answers of the baseline per question, success rate s,
    reward mean of (0 if s = 0 else 1 - s). ``"variance"``: mean of s(1 - s). An action with no
    valid problem trains nothing and gets ``invalid_penalty``; by default (None) the least a valid
    batch could score, minus the baseline's Q_R accuracy (0 in the intrinsic modes), which keeps
    it on the scale of real rewards. The intrinsic modes and invalid actions do not move the
    promotion window. ``info`` reports the estimator and the raw scores behind each reward
    (``baseline_correct``, ``trained_correct``, ``*_answer_logprob``, ``*_decoy_logprob``).

    ## Starting State

    ``reset`` puts back the episode-start student (the configured model, or the weights in
    ``student_checkpoint``), empties
    PQ and the promotion window, draws Q_R with ``np_random`` and measures the baseline on it
    (greedy answers are cached per student state and problem, so later resets cost nothing).

    ## Episode End

    The episode never terminates. It is truncated after ``episode_length`` steps (200, the
    paper's outer steps): ``gym.make`` applies the registered ``max_episode_steps``, and the env
    truncates at ``episode_length`` itself so that ``gym.make(..., episode_length=N)`` works.

    ## Arguments

    ```python
    >>> import gymnasium as gym
    >>> import soar_env
    >>> env = gym.make("SOAR-MATH-v0", preset="tiny", repeats=1)
    >>> env.unwrapped.config.repeats, env.unwrapped.config.student_model
    (1, 'tiny')
    >>> obs, info = env.reset(seed=0)
    >>> obs.shape, env.observation_space.contains(obs)
    ((5,), True)
    >>> obs, reward, terminated, truncated, info = env.step([{"question": "What is 2 + 2?", "answer": "4"}])
    >>> info["num_valid"], terminated, truncated
    (1, False, False)

    ```

    ``preset`` is ``"tiny"``, ``"cpu"`` (default) or ``"paper"`` (see `soar_env.config.PRESETS`);
    any `EnvConfig` field is a keyword override. ``config=`` passes a whole `EnvConfig`.
    ``student=`` and ``hard_pool=`` inject a ready student and hard pool (tests, sharing).
    ``render_mode="ansi"`` makes ``render()`` return a text summary of the last step.

    ## Version History

    * v0: Initial version: grounded, learnability and variance rewards; promotion with PQ;
      vector form with a shared baseline; checkpoints. Later in v0: the reward estimators
      (greedy stays the default; ``greedy_eval=False`` of old configs loads as "sampled", k=1).
    """

    metadata = {"render_modes": ["ansi"], "render_fps": 1}

    def __init__(
        self,
        preset: str | EnvConfig | None = None,
        *,
        config: EnvConfig | None = None,
        student: StudentLike | None = None,
        hard_pool: Sequence[Problem] | None = None,
        render_mode: str | None = None,
        **overrides: Any,
    ) -> None:
        self.config = make_config(config if config is not None else preset, **overrides)
        if render_mode is not None and render_mode not in self.metadata["render_modes"]:
            raise ValueError(f"render_mode must be one of {self.metadata['render_modes']} or None, got {render_mode!r}")
        self.render_mode = render_mode
        self.core = SOARCore(self.config, student=student, hard_pool=hard_pool)
        self.action_space = ProblemBatch(self.config.batch_limit, self.config.problems_per_dataset,
                                         difficulty=self.config.sample_difficulty)
        self.observation_space = observation_space(self.config)
        self._steps = 0
        self._last_reward = 0.0
        self._baseline_accuracy = 0.0
        self._last_info: dict[str, Any] = {}

    # -- gym API -----------------------------------------------------------------------------------

    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[np.ndarray, dict[str, Any]]:
        if seed is None and self._np_random is None and self.config.seed is not None:
            seed = self.config.seed
        super().reset(seed=seed)
        start = time.perf_counter()
        self.core.new_episode(self.np_random)
        self._steps = 0
        self._last_reward = 0.0
        self._baseline_accuracy, timings = self.core.baseline_accuracy()
        info = {
            "baseline_accuracy": self._baseline_accuracy,
            "eval_problems": tuple(self.core.eval_subset),
            "hardset_size": len(self.core.hard_pool),
            "promotions": 0,
            "timings": dataclasses.replace(timings, total=time.perf_counter() - start),
        }
        self._last_info = info
        return self._observation(), dict(info)

    def step(self, action: Any) -> tuple[np.ndarray, float, bool, bool, dict[str, Any]]:
        start = time.perf_counter()
        problems, rejected = self.core.validate(action)
        self._steps += 1
        info: dict[str, Any] = {
            "step": self._steps,
            "reward_mode": self.config.reward_mode,
            "baseline_accuracy": self._baseline_accuracy,
            "num_valid": len(problems),
            "num_rejected": len(rejected),
            "rejected": rejected,
            "problems": tuple(problems),
            "inner_steps": self.core.inner_steps,
            "eval_problems": tuple(self.core.eval_subset),
        }
        result = self.core.run_dataset(problems, self.np_random) if problems else None
        info.update(self.core.baseline_info())  # the baseline this step was judged against (before promotion)
        invalid_reward = self.core.invalid_reward() if result is None else 0.0
        reward, outcome = dataset_info(result, rejected, invalid_reward)
        info.update(outcome)
        promoted = False
        if result is not None:
            promoted = self.core.maybe_promote(reward, result.median_state, problems)
        train_s, eval_s = (result.train_seconds, result.eval_seconds) if result is not None else (0.0, 0.0)
        self._last_reward = reward
        info.update(reward=reward, promoted=promoted, promotions=self.core.promotions,
                    reward_average=self.core.tracker.moving_average, promoted_count=len(self.core.promoted_questions),
                    backend_events=self.core.backend_events())
        # Q_R of the next step, and the baseline accuracy the next observation reports.
        self.core.next_step(self.np_random)
        self._baseline_accuracy, timings = self.core.baseline_accuracy()
        info["next_baseline_accuracy"] = self._baseline_accuracy
        info["timings"] = dataclasses.replace(timings, total=time.perf_counter() - start, train=train_s, eval=eval_s)
        truncated = self._steps >= self.config.episode_length
        self._last_info = info
        return self._observation(), reward, False, truncated, info

    def render(self) -> str | None:
        if self.render_mode != "ansi":
            return None
        info = self._last_info
        return (f"step {self._steps}/{self.config.episode_length}  reward {self._last_reward:+.4f}  "
                f"baseline acc {self._baseline_accuracy:.3f}  promotions {self.core.promotions}  "
                f"PQ {len(self.core.promoted_questions)}  rejected {info.get('num_rejected', 0)}")

    def close(self) -> None:
        # Drop the model so a closed env frees its memory; a later reset would rebuild it.
        self.core.release()

    def _observation(self) -> np.ndarray:
        return make_observation(self.observation_space, self._baseline_accuracy, self.core.promotions,
                                self._steps / self.config.episode_length, self.core.tracker.moving_average,
                                self._last_reward)

    # -- checkpoints (save and restore: `CheckpointMixin`) ------------------------------------------

    checkpoint_kind = "single"

    def load(self, path: str | os.PathLike[str]) -> tuple[np.ndarray, dict[str, Any]]:
        """Resume from ``save``: returns the observation and info the env had then.

        Through ``gym.make`` call ``env.reset()`` once first (wrappers insist on it), then
        ``env.unwrapped.load(path)``; the TimeLimit wrapper then counts from the resume point,
        but the env's own ``episode_length`` truncation counts from the saved step.
        """
        self._load(path)
        info = {"baseline_accuracy": self._baseline_accuracy, "eval_problems": tuple(self.core.eval_subset),
                "promotions": self.core.promotions, "resumed_from": os.fspath(path), "step": self._steps}
        return self._observation(), info

    def _checkpoint_fields(self) -> dict[str, Any]:
        return {"steps": self._steps, "last_reward": self._last_reward, "baseline_accuracy": self._baseline_accuracy}

    def _load_checkpoint_fields(self, payload: Mapping[str, Any]) -> None:
        self._steps = int(payload["steps"])
        self._last_reward = float(payload["last_reward"])
        self._baseline_accuracy = float(payload["baseline_accuracy"])

    def _action_rng_state(self) -> Any:
        return rng_state(self.action_space.np_random)

    def _load_action_rng_state(self, state: Any) -> None:
        self.action_space._np_random = rng_from_state(state)
