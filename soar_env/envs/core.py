"""`SOARCore`: the machinery every SOAR env shares, behind public methods.

    core = SOARCore(make_config("tiny"), student=ScriptedStudent(pool), hard_pool=pool)
    core.new_episode(np_random)                      # episode-start student, fresh Q_R
    problems, rejected = core.validate(action)       # the one validation of an action
    result = core.run_dataset(problems, np_random)   # r inner runs -> reward
    core.maybe_promote(result.reward, result.median_state, problems)
    core.next_step(np_random)                        # Q_R (and sampling seed) of the next step

It holds the student, the hard pool and Q_R, the baseline's scores on Q_R (computed once,
`soar_env.envs.baseline`), the inner runs and their rewards (``reward_estimator``,
`soar_env.estimators`), the promotion rule and the promoted-questions buffer PQ. One core serves one single env, or
all g datasets of a vector env (that is how they share one baseline, one Q_R per step and
one baseline evaluation).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from soar_env.config import EnvConfig
from soar_env.data.hardset import draw_eval_subset, load_hard_pool
from soar_env.envs.baseline import BaselineScores
from soar_env.envs.results import DatasetResult, StepTimings
from soar_env.estimators import QRScores, estimate, qr_level
from soar_env.problems import Problem, Rejection, to_problem
from soar_env.batched_runs import BatchedLocalRunner
from soar_env.ray_backend import RayRunner
from soar_env.rewards import PromotionTracker, intrinsic_reward, median_run, run_mean
from soar_env.runs import LocalRunner, ProgressEvent, ProgressFn, RunRecord, RunSpec, StudentRunner
from soar_env.student import StudentLike, build_student, inner_steps_for


class SOARCore:
    """Student, Q_R, cached baseline evaluation, inner runs, promotion and PQ.

    Randomness is never drawn here from a generator of its own: callers pass their
    ``np_random``. The core owns the episode's promotion count and, from it, the inner-steps
    choice; every run gets its step count explicitly, so the student keeps no mirror of it.
    """

    def __init__(self, config: EnvConfig, *, student: StudentLike | None = None,
                 hard_pool: Sequence[Problem] | None = None, progress: ProgressFn | None = None) -> None:
        self.config = config
        self.progress: ProgressFn | None = progress
        """Hears where a step is (`soar_env.runs.ProgressEvent`); set it with `set_progress`."""
        self._student = student
        self._student_given = student is not None
        self._hard_pool = list(hard_pool) if hard_pool is not None else None
        self._initial_state: Any = None
        self._baseline_tensors: Any = None
        self.state_id = 0
        """0 is the episode-start student; each promotion gets a new id (for the cache)."""
        self._next_state_id = 1
        self.baseline_scores_cache = BaselineScores(config.reward_estimator, config.estimator_samples,
                                                    config.eval_tokens)
        """The baseline's scores on Q_R: greedy answers per state, others for the current step."""
        self.eval_seed: int | None = None
        """The sampled estimator's seed of this step, shared by the baseline's and every trained
        student's answers on Q_R (common random numbers); None for the other estimators."""
        self._runner: StudentRunner | None = None
        self.promotion_errors: list[str] = []
        """Promotions the rule fired but that could not happen (the run's weights were lost)."""
        self.eval_subset: list[Problem] = []
        self.promoted_questions: list[Problem] = []
        self.promotions = 0
        """Promotions this episode (a promotion whose run left the weights unchanged counts too)."""
        self.tracker = PromotionTracker(config.promotion_window, config.promotion_threshold,
                                        config.restart_average_after_promotion)

    # -- lazy heavy parts: gym.make stays cheap, the model loads at the first reset ------------

    @property
    def student(self) -> StudentLike:
        if self._student is None:
            self._student = build_student(self.config)
        if self._initial_state is None:
            self._initial_state = self._student.baseline_state()
            self._baseline_tensors = self._initial_state
        return self._student

    @property
    def hard_pool(self) -> list[Problem]:
        if self._hard_pool is None:
            self._hard_pool = load_hard_pool(self.config)
            if len(self._hard_pool) < self.config.eval_subset_size:
                warnings.warn(f"the hard pool has {len(self._hard_pool)} problems, fewer than "
                              f"eval_subset_size={self.config.eval_subset_size}; Q_R is the whole pool",
                              stacklevel=2)
        return self._hard_pool

    @property
    def inner_steps(self) -> int:
        """RLOO steps of this step's inner runs (more once the episode has promoted)."""
        return inner_steps_for(self.promotions, self.config.inner_steps, self.config.inner_steps_after_promotion)

    # -- episode ---------------------------------------------------------------------------------

    def new_episode(self, rng: np.random.Generator) -> None:
        """Back to the episode-start student, an empty PQ and window, a fresh Q_R."""
        student = self.student
        if self.state_id != 0 or self.promotions != 0:  # this episode (or a checkpoint) promoted
            student.promote(self._initial_state)
        self._baseline_tensors = self._initial_state
        self.state_id = 0
        self.baseline_scores_cache.keep_episode_start()
        self.promotions = 0
        self.promoted_questions = []
        self.tracker.clear()
        self.draw_eval_subset(rng)

    def draw_eval_subset(self, rng: np.random.Generator) -> None:
        """Q_R: M problems of the hard pool, without replacement (and a new sampling seed)."""
        self.eval_subset = draw_eval_subset(self.hard_pool, self.config.eval_subset_size, rng)
        self._draw_eval_seed(rng)

    def next_step(self, rng: np.random.Generator) -> None:
        """What the next step is measured with: a fresh Q_R (``resample_eval_subset``) and, for the
        sampled estimator, a fresh seed, so no sampled answer is reused from one step to the next."""
        if self.config.resample_eval_subset:
            self.draw_eval_subset(rng)
        else:
            self._draw_eval_seed(rng)

    def _draw_eval_seed(self, rng: np.random.Generator) -> None:
        # Only sampling needs a seed; drawing none keeps the other estimators' random streams as they were.
        sampled = self.config.reward_estimator == "sampled"
        self.eval_seed = int(rng.integers(2**31 - 1)) if sampled else None

    def baseline_scores(self) -> tuple[QRScores, StepTimings]:
        """The baseline's scores on Q_R under ``reward_estimator``, computed only when not known
        (see `soar_env.envs.baseline`): the g datasets of a step share them."""
        return self.baseline_scores_cache.get(self.student, self.state_id, self.eval_subset, self.eval_seed)

    def baseline_info(self) -> dict[str, Any]:
        """The step's estimator and the baseline's raw scores on Q_R, for ``info``."""
        scores = self.baseline_scores()[0]
        return {"reward_estimator": self.config.reward_estimator, "baseline_correct": list(scores.correct),
                "baseline_answer_logprob": list(scores.answer_logprob),
                "baseline_decoy_logprob": list(scores.decoy_logprob)}

    def invalid_reward(self) -> float:
        """Reward of a dataset with no valid problem: ``invalid_penalty``, or when that is None the
        floor of this step's reward (greedy and sampled: minus the baseline's Q_R accuracy; intrinsic
        modes: 0). The likelihood estimator has no floor: 0, as for a dataset that changed nothing."""
        if self.config.invalid_penalty is not None:
            return float(self.config.invalid_penalty)
        if self.config.reward_mode != "grounded" or self.config.reward_estimator == "likelihood":
            return 0.0
        return 0.0 - self.baseline_accuracy()[0]  # 0.0 - x: no "-0.0" in logs

    def baseline_accuracy(self) -> tuple[float, StepTimings]:
        """The baseline's level on Q_R in [0, 1] (`soar_env.estimators.qr_level`): greedy accuracy,
        sampled success rate, or the mean per-token probability of the reference answers."""
        scores, timings = self.baseline_scores()
        return qr_level(scores), timings

    # -- actions ---------------------------------------------------------------------------------

    def validate(self, action: Any) -> tuple[list[Problem], list[dict[str, Any]]]:
        """Usable problems of an action and a record of every rejected entry; never raises.

        This is where a problem enters an env, and the only place an env checks it: every
        ``step`` calls it first, and what it returns runs as is.
        """
        limit = self.config.batch_limit
        if isinstance(action, np.ndarray) and action.dtype == object:
            action = list(action.ravel()) if action.ndim else [action.item()]
        if not isinstance(action, (tuple, list)):
            rejection = Rejection(
                "not_a_batch", f"an action must be a tuple or list of problems, got {type(action).__name__}",
                _snippet(action))
            return [], [{"index": None, **rejection.to_dict()}]
        if len(action) == 0:
            return [], [{"index": None, "reason": "empty_batch", "detail": "the action holds no problem", "text": ""}]
        problems: list[Problem] = []
        rejected: list[dict[str, Any]] = []
        for index, entry in enumerate(action[:limit]):
            checked = to_problem(entry, source="action", require_parsable=self.config.require_parsable,
                                 timeout=self.config.grade_timeout)
            if isinstance(checked, Rejection):
                rejected.append({"index": index, **checked.to_dict()})
            else:
                problems.append(checked)
        if len(action) > limit:
            # Past the limit nothing is read, so a huge action costs no validation time.
            rejected.append({"index": limit, "reason": "too_many_problems",
                             "detail": f"entries {limit}..{len(action) - 1} ({len(action) - limit}) exceed "
                                       f"max_problems={limit} and were not read", "text": ""})
        return problems, rejected

    # -- datasets ----------------------------------------------------------------------------------

    def set_progress(self, progress: ProgressFn | None) -> None:
        """Report every step's progress to ``progress`` (None: stop reporting).

        ``env.unwrapped.core.set_progress(print)`` (a single env) or ``vec_env.core.set_progress(...)``.
        In-process runs report their start, each inner RLOO step, the start of their evaluation
        and their end; the Ray backend reports each run's end only, when the step's runs are back.
        """
        self.progress = progress

    def _report(self, kind: Any, runs: int, inner_steps: int, **fields: int) -> None:
        if self.progress is not None:
            self.progress(ProgressEvent(kind, runs=runs, inner_steps=inner_steps, **fields))

    @property
    def runner(self) -> StudentRunner:
        """Where student runs execute: this process, or Ray workers (``backend``)."""
        if self._runner is None:
            if self.config.backend == "ray":
                if self._student_given and self.config.ray_student_factory is None:
                    raise ValueError("backend='ray' builds each worker's student from the config, so a student "
                                     "passed to the env would not be the one trained; set ray_student_factory "
                                     "to a 'module:function' that builds it")
                self._runner = RayRunner(self.config)
            elif self.config.batch_runs:
                self._runner = BatchedLocalRunner(self.student)
            else:
                self._runner = LocalRunner(self.student)
        return self._runner

    def run_dataset(self, problems: Sequence[Problem], rng: np.random.Generator) -> DatasetResult:
        """The reward of one dataset under the configured mode (the student ends at baseline)."""
        return self.run_datasets([problems], rng)[0][0]

    def run_datasets(self, batches: Sequence[Sequence[Problem]],
                     rng: np.random.Generator) -> tuple[list[DatasetResult], int]:
        """Rewards of several datasets judged against the same baseline and Q_R, and the index of
        the best one (first argmax; -1 for no batches): the only one whose median may be promoted.

        Seeds are drawn from ``rng`` dataset by dataset, repeat by repeat, before anything
        runs, so where the runs execute (in order here, or all at once on Ray) cannot change
        what they compute.
        """
        grounded = self.config.reward_mode == "grounded"
        total_runs = len(batches) * (self.config.repeats if grounded else 1)
        inner = self.inner_steps if grounded else 0
        self._report("step_start", total_runs, inner)  # before the baseline's Q_R evaluation
        base_scores = self.baseline_scores()[0] if grounded else None
        groups: list[list[RunSpec]] = []
        for problems in batches:
            groups.append(self._dataset_specs(problems, rng, first_index=sum(len(g) for g in groups)))
        runner = self.runner
        baseline = self._baseline_tensors if self._baseline_tensors is not None else self.student.baseline_state()
        local_progress = isinstance(runner, LocalRunner)
        if isinstance(runner, LocalRunner):
            runner.progress = self.progress
            runner.progress_context = {"runs": total_runs, "inner_steps": inner, "runs_done": 0}
        if runner.parallel:
            records = runner.run([spec for specs in groups for spec in specs], baseline_id=self.state_id,
                                 baseline=baseline)
            if not local_progress:  # a remote runner answers when every run is over
                for done, record in enumerate(records, 1):
                    self._report("run_end", total_runs, inner, run=record.index, runs_done=done,
                                 inner_step=inner)
            per_dataset: Iterable[list[RunRecord]] = [[records[spec.index] for spec in specs] for specs in groups]
        else:
            # Lazily, dataset by dataset, so at most r trained states are alive at once.
            per_dataset = (runner.run(specs, baseline_id=self.state_id, baseline=baseline) for specs in groups)
        results: list[DatasetResult] = []
        best = -1
        for runs in per_dataset:
            result = self._grounded_result(runs, base_scores) if base_scores is not None else \
                self._intrinsic_result(runs[0])
            for run in runs:
                run.state = None  # the median's state lives on in the result; the others go now
            # Promotion can only take the best dataset's (first argmax) median student, and g
            # full-weight states may not fit in memory: every other trained state is dropped now.
            if best < 0 or result.reward > results[best].reward:
                if best >= 0:
                    results[best].median_state = None
                best = len(results)
            else:
                result.median_state = None
            results.append(result)
        self._report("step_end", total_runs, inner, runs_done=total_runs)
        # Remote workers free every trained state but the one promotion may ask for.
        runner.keep_only(results[best].median_state if results and self.can_promote else None)
        if not self.can_promote and results:
            results[best].median_state = None
        return results, best

    def _dataset_specs(self, problems: Sequence[Problem], rng: np.random.Generator,
                       first_index: int) -> list[RunSpec]:
        """The runs one dataset needs: r trainings (grounded) or one sampled evaluation (intrinsic)."""
        config = self.config
        if config.reward_mode == "grounded":
            seeds = [int(rng.integers(2**31 - 1)) for _ in range(config.repeats)]
            return [RunSpec(index=first_index + j, problems=tuple(problems), steps=self.inner_steps,
                            batch_size=config.batch_size, group_size=config.group_size, seed=seed,
                            eval_problems=tuple(self.eval_subset), eval_samples=config.estimator_samples,
                            estimator=config.reward_estimator, eval_tokens=config.eval_tokens,
                            eval_seed=self.eval_seed)
                    for j, seed in enumerate(seeds)]
        # Intrinsic modes: the baseline samples the teacher's own problems, no training.
        return [RunSpec(index=first_index, problems=tuple(problems), steps=0, batch_size=config.batch_size,
                        group_size=config.group_size, seed=int(rng.integers(2**31 - 1)),
                        eval_problems=tuple(problems), eval_samples=config.intrinsic_samples,
                        estimator="sampled", eval_tokens=config.max_new_tokens)]

    def _grounded_result(self, runs: Sequence[RunRecord], base: QRScores) -> DatasetResult:
        estimator = self.config.reward_estimator
        result = DatasetResult(reward=0.0)
        for run in runs:
            # A run left at the baseline's weights (or failed) scores exactly as the baseline did.
            scores = base if run.scores is None else run.scores
            result.trained_correct.append(list(scores.correct))
            result.trained_accuracy.append(qr_level(scores))
            result.trained_answer_logprob.append(list(scores.answer_logprob))
            result.trained_decoy_logprob.append(list(scores.decoy_logprob))
            result.run_rewards.append(estimate(estimator, base, scores))
            result.train_rewards.append(list(run.train_rewards))
            result.tokens += run.tokens
            result.train_seconds += run.train_seconds
            result.eval_seconds += run.eval_seconds
            if run.error:
                result.errors.append(run.error)
            if run.attempts > 1:
                result.retried_runs += 1
        result.reward = run_mean(result.run_rewards)
        result.median_index = median_run(result.run_rewards)
        result.median_state = runs[result.median_index].state
        return result

    def _intrinsic_result(self, run: RunRecord) -> DatasetResult:
        samples = self.config.intrinsic_samples
        rates = [int(c) / samples for c in (run.correct or [])]
        result = DatasetResult(reward=intrinsic_reward(self.config.reward_mode, rates) if rates else 0.0,
                               success_rates=rates, tokens=run.tokens, eval_seconds=run.eval_seconds,
                               retried_runs=int(run.attempts > 1))
        if run.error:
            result.errors.append(run.error)
        return result

    def backend_events(self) -> list[dict[str, Any]]:
        """Worker failures of the last step (Ray backend): what failed, and whether it was retried."""
        return self._runner.events() if self._runner is not None else []

    def close(self) -> None:
        """Stop the runner's workers (Ray actors); a later run starts new ones."""
        if self._runner is not None:
            self._runner.close()
            self._runner = None

    def release(self) -> None:
        """Free everything an env holds: workers, the student (the model) and the baseline cache.

        What ``env.close()`` calls; a later reset rebuilds the student from the config.
        """
        self.close()
        self._student = None
        self._initial_state = None
        self._baseline_tensors = None
        self.baseline_scores_cache.clear()

    # -- promotion ---------------------------------------------------------------------------------

    @property
    def can_promote(self) -> bool:
        return self.config.promotion and self.config.reward_mode == "grounded"

    def maybe_promote(self, step_reward: float, state: Any, problems: Sequence[Problem]) -> bool:
        """Feed one step's reward to the promotion window; promote ``state`` if the rule fires.

        ``step_reward`` is the single env's reward or the mean over the vector env's valid
        datasets; ``state`` and ``problems`` are the (best) dataset's median run and batch.
        """
        if not self.can_promote or not self.tracker.update(step_reward):
            return False
        return self.promote(state, problems)

    def promote(self, state: Any, problems: Sequence[Problem]) -> bool:
        """Make ``state`` the baseline and append ``problems`` to PQ.

        A ``None`` state means the chosen run left the weights unchanged: the baseline stays,
        but the promotion is still counted and the questions still join PQ, since the rule
        (window average over tau) fired on them.
        """
        if state is not None and hasattr(state, "fetch"):
            try:
                state = state.fetch()  # a RemoteState: the chosen run's weights still sit on its worker
            except RuntimeError as error:  # every worker that could hold or redo them failed
                warnings.warn(f"promotion skipped: {error}", stacklevel=2)
                self.promotion_errors.append(str(error))
                return False
        if state is not None:
            self.student.promote(state)
            self._baseline_tensors = state
            self.state_id = self._next_state_id
            self._next_state_id += 1
        self.promotions += 1
        self.promoted_questions.extend(problems)
        self.tracker.promoted()
        return True

    # -- checkpoint --------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {
            "baseline_state": self.student.baseline_state(),
            "state_id": self.state_id,
            "next_state_id": self._next_state_id,
            "promotions": self.promotions,
            "promoted_questions": [p.to_dict() for p in self.promoted_questions],
            "tracker": self.tracker.state_dict(),
            "eval_subset": [p.to_dict() for p in self.eval_subset],
            "eval_seed": self.eval_seed,
            **self.baseline_scores_cache.state_dict(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        # Remote workers cache baselines by state id, and the loaded ids may name other weights.
        self.close()
        student = self.student
        self.promotions = int(state["promotions"])
        if self.promotions or int(state["state_id"]) != 0:
            student.promote(state["baseline_state"])
            self._baseline_tensors = state["baseline_state"]
        else:
            student.promote(self._initial_state)
            self._baseline_tensors = self._initial_state
        self.state_id = int(state["state_id"])
        self._next_state_id = int(state["next_state_id"])
        self.promoted_questions = [Problem.from_dict(row) for row in state["promoted_questions"]]
        self.tracker.load_state_dict(state["tracker"])
        self.eval_subset = [Problem.from_dict(row) for row in state["eval_subset"]]
        self.baseline_scores_cache.load_state_dict(state)
        seed = state.get("eval_seed")  # absent in checkpoints written before sampled evaluation had seeds
        self.eval_seed = None if seed is None else int(seed)


def _snippet(value: Any, limit: int = 200) -> str:
    try:
        text = repr(value)
    except Exception:  # noqa: BLE001
        return f"<unprintable {type(value).__name__}>"
    return text if len(text) <= limit else text[:limit] + "..."


__all__ = ["SOARCore"]
