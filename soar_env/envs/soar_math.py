"""SOAR-MATH-v0: a teacher writes a batch of math problems; the reward is what they teach.

    env = gym.make("SOAR-MATH-v0", preset="cpu")
    obs, info = env.reset(seed=0)
    obs, reward, terminated, truncated, info = env.step(env.action_space.sample())

The module holds the environment and `SOARCore`, the machinery it shares with the vector
env and the parametric env: the student, the hard pool and Q_R, the cached baseline
evaluation, the inner runs, the promotion rule and the promoted-questions buffer PQ.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
import time
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import gymnasium as gym
import numpy as np
from gymnasium import spaces

from soar_env.config import EnvConfig, make_config
from soar_env.envs.spaces import ProblemBatch
from soar_env.problems import Problem, Rejection, to_problem
from soar_env.rewards import PromotionTracker, grounded_reward, intrinsic_reward, median_run
from soar_env.runs import LocalRunner, RunRecord, RunSpec, StudentRunner

CHECKPOINT_FORMAT = "soar-gym-env/1"
"""Tag written into every checkpoint so a future layout change can be detected on load."""

OBS_FIELDS = ("baseline_accuracy", "promotions", "step_fraction", "reward_average", "last_reward")
"""Names of the observation's entries, in order."""


# ---------------------------------------------------------------------------------------------
# What the env needs from a student (soar_env.student.Student; tests inject stubs)
# ---------------------------------------------------------------------------------------------


class StudentLike(Protocol):
    """The part of `soar_env.student.Student` the environments use."""

    promotions: int

    def train(self, problems: Sequence[Problem], steps: int | None = None, batch_size: int | None = None,
              group_size: int | None = None, *, seed: int | None = None) -> Any: ...

    def evaluate(self, problems: Sequence[Problem], *, samples: int = 1, greedy: bool = True,
                 state: Any = None, max_new_tokens: int | None = None, seed: int | None = None) -> Any: ...

    def promote(self, state: Any) -> None: ...

    def baseline_state(self) -> Any: ...


def build_student(config: EnvConfig) -> StudentLike:
    """The student a config names: model, LoRA and inner-loop settings."""
    from soar_env.models.policy import LMPolicy, LoraSettings
    from soar_env.student import Student, StudentConfig

    import torch

    lora = LoraSettings(r=config.lora_rank, alpha=config.lora_alpha) if config.lora else None
    device = config.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    policy = LMPolicy.from_name(config.student_model, lora=lora, device=device, dtype=getattr(torch, config.dtype))
    if config.student_checkpoint:
        # Episode-start weights other than the pretrained ones, e.g. a promoted student of a past run.
        policy.load(os.path.expanduser(config.student_checkpoint))
    if config.sampler == "vllm":
        from soar_env.models.vllm_sampler import VLLMSampler, VLLMSettings

        policy.sampler = VLLMSampler(policy, VLLMSettings(gpu_memory_utilization=config.vllm_gpu_memory_utilization,
                                                          lora_sync=config.vllm_lora_sync))
    student_config = StudentConfig(
        steps=config.inner_steps,
        steps_after_promotion=config.inner_steps_after_promotion,
        batch_size=config.batch_size,
        group_size=config.group_size,
        max_new_tokens=config.max_new_tokens,
        temperature=config.temperature,
        eval_max_new_tokens=config.eval_tokens,
        require_box=config.require_box,
        grade_timeout=config.grade_timeout,
        lr=config.learning_rate,
        kl_coef=config.kl_coef,
        seed=config.seed if config.seed is not None else 0,
    )
    return Student(policy, student_config)


def load_hard_pool(config: EnvConfig) -> list[Problem]:
    """The problems Q_R is drawn from: a hard-set file's split, or any `load_problems` spec.

    A jsonl whose rows carry a ``split`` (what ``soar hardset`` writes) gives that split only;
    a plain problem file or a ``generator:``/``hf:`` spec is used whole.
    """
    spec = config.hardset
    if spec == "bundled" or (spec.endswith(".jsonl") and os.path.isfile(os.path.expanduser(spec))):
        from soar_env.data.hardset import load_hardset

        rows = load_hardset(os.path.expanduser(spec) if spec != "bundled" else spec, split=None)
        if any("split" in p.meta for p in rows):
            rows = [p for p in rows if p.meta.get("split") == config.hardset_split]
    else:
        from soar_env.data.loaders import load_problems

        rows = load_problems(spec)
    if not rows:
        raise ValueError(f"the hard set {spec!r} (split {config.hardset_split!r}) has no problems")
    return rows


# ---------------------------------------------------------------------------------------------
# Results of one step
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StepTimings:
    """Wall-clock seconds of one reset or step (``time/...`` metrics).

    Timings are measurements, not part of the transition: every field is left out of
    equality, so two same-seed steps have equal ``info`` (Gymnasium's determinism check
    compares infos).
    """

    total: float = field(default=0.0, compare=False)
    """The whole call."""
    train: float = field(default=0.0, compare=False)
    """Inner RLOO runs."""
    eval: float = field(default=0.0, compare=False)
    """Greedy evaluation of trained students on Q_R (or intrinsic sampling)."""
    baseline_eval: float = field(default=0.0, compare=False)
    """Evaluation of the baseline on problems of Q_R not yet in its cache."""
    baseline_cache_hits: int = field(default=0, compare=False)
    """Q_R problems whose baseline result came from the cache."""

    def to_dict(self) -> dict[str, float]:
        return {f"time/{k}": v for k, v in dataclasses.asdict(self).items()}


@dataclass
class DatasetResult:
    """What one dataset did to the student: the reward and everything behind it."""

    reward: float
    run_rewards: list[float] = field(default_factory=list)
    """Grounded mode: accuracy gain of each of the r runs."""
    trained_accuracy: list[float] = field(default_factory=list)
    trained_correct: list[list[int]] = field(default_factory=list)
    """Per run, correct answers per Q_R problem."""
    train_rewards: list[list[float]] = field(default_factory=list)
    """Per run, mean training reward at each inner step (the student's success on the batch)."""
    success_rates: list[float] = field(default_factory=list)
    """Intrinsic modes: the student's success rate s on each of the dataset's problems."""
    median_index: int | None = None
    median_state: Any = None
    tokens: int = 0
    train_seconds: float = 0.0
    eval_seconds: float = 0.0
    errors: list[str] = field(default_factory=list)
    """Why runs failed (non-finite loss, a worker that kept dying); such a run counts as no gain."""
    retried_runs: int = 0
    """Runs that needed more than one attempt because their worker failed (Ray backend)."""

    def info(self) -> dict[str, Any]:
        return {
            "run_rewards": list(self.run_rewards),
            "trained_accuracy": list(self.trained_accuracy),
            "trained_correct": [list(c) for c in self.trained_correct],
            "train_rewards": [list(r) for r in self.train_rewards],
            "success_rates": list(self.success_rates),
            "median_run": -1 if self.median_index is None else int(self.median_index),
            "errors": list(self.errors),
            "retried_runs": int(self.retried_runs),
        }


# ---------------------------------------------------------------------------------------------
# The shared machinery
# ---------------------------------------------------------------------------------------------


class SOARCore:
    """Student, Q_R, cached baseline evaluation, inner runs, promotion and PQ.

    One core serves one single env, or all g sub-datasets of a vector env (which is how
    they share one baseline, one Q_R per step and one baseline evaluation). Randomness is
    never drawn here from a generator of its own: callers pass their ``np_random``.
    """

    def __init__(self, config: EnvConfig, *, student: StudentLike | None = None,
                 hard_pool: Sequence[Problem] | None = None) -> None:
        self.config = config
        self._student = student
        self._student_given = student is not None
        self._hard_pool = list(hard_pool) if hard_pool is not None else None
        self._initial_state: Any = None
        self._baseline_tensors: Any = None
        self.state_id = 0
        """0 is the episode-start student; each promotion gets a new id (for the cache)."""
        self._next_state_id = 1
        self._baseline_cache: dict[int, dict[str, int]] = {}
        self._runner: StudentRunner | None = None
        self.promotion_errors: list[str] = []
        """Promotions the rule fired but that could not happen (the run's weights were lost)."""
        self.eval_subset: list[Problem] = []
        self.promoted_questions: list[Problem] = []
        self.promotions = 0
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
        return self.config.inner_steps_after_promotion if self.promotions > 0 else self.config.inner_steps

    # -- episode ---------------------------------------------------------------------------------

    def new_episode(self, rng: np.random.Generator) -> None:
        """Back to the episode-start student, an empty PQ and window, a fresh Q_R."""
        student = self.student
        if self.state_id != 0 or student.promotions != 0:
            student.promote(self._initial_state)
            student.promotions = 0
        self._baseline_tensors = self._initial_state
        self.state_id = 0
        # Only the episode-start cache stays useful across episodes.
        self._baseline_cache = {0: self._baseline_cache.get(0, {})}
        self.promotions = 0
        self.promoted_questions = []
        self.tracker.clear()
        self.draw_eval_subset(rng)

    def draw_eval_subset(self, rng: np.random.Generator) -> None:
        """Q_R: M problems of the hard pool, without replacement."""
        pool = self.hard_pool
        size = min(self.config.eval_subset_size, len(pool))
        index = rng.choice(len(pool), size=size, replace=False)
        self.eval_subset = [pool[int(i)] for i in index]

    def baseline_correct(self) -> tuple[list[int], StepTimings]:
        """Baseline's correct answers per Q_R problem, evaluating only what the cache lacks.

        Greedy answers of one state never change, so each (state, problem) is evaluated once
        per state: the g datasets of a step, and later steps re-drawing a problem, reuse it.
        """
        cache = self._baseline_cache.setdefault(self.state_id, {})
        missing = [p for p in self.eval_subset if p.id not in cache]
        start = time.perf_counter()
        if missing:
            result = self.student.evaluate(missing, greedy=self.config.greedy_eval,
                                           max_new_tokens=self.config.eval_tokens)
            for problem, correct in zip(missing, result.correct):
                cache[problem.id] = int(correct)
        timings = StepTimings(baseline_eval=time.perf_counter() - start,
                              baseline_cache_hits=len(self.eval_subset) - len(missing))
        return [cache[p.id] for p in self.eval_subset], timings

    def baseline_accuracy(self) -> tuple[float, StepTimings]:
        correct, timings = self.baseline_correct()
        return (float(np.mean(correct)) if correct else 0.0), timings

    # -- actions ---------------------------------------------------------------------------------

    def validate(self, action: Any) -> tuple[list[Problem], list[dict[str, Any]]]:
        """Usable problems of an action and a record of every rejected entry; never raises."""
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

    @property
    def runner(self) -> "StudentRunner":
        """Where student runs execute: this process, or Ray workers (``backend``)."""
        if self._runner is None:
            if self.config.backend == "ray":
                from soar_env.ray_backend import RayRunner

                if self._student_given and self.config.ray_student_factory is None:
                    raise ValueError("backend='ray' builds each worker's student from the config, so a student "
                                     "passed to the env would not be the one trained; set ray_student_factory "
                                     "to a 'module:function' that builds it")

                self._runner = RayRunner(self.config)
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
        base_correct = self.baseline_correct()[0] if grounded else []
        groups: list[list[RunSpec]] = []
        for problems in batches:
            groups.append(self._dataset_specs(problems, rng, first_index=sum(len(g) for g in groups)))
        runner = self.runner
        baseline = self._baseline_tensors if self._baseline_tensors is not None else self.student.baseline_state()
        if runner.parallel:
            records = runner.run([spec for specs in groups for spec in specs], baseline_id=self.state_id,
                                 baseline=baseline)
            per_dataset: Iterable[list[RunRecord]] = [[records[spec.index] for spec in specs] for specs in groups]
        else:
            # Lazily, dataset by dataset, so at most r trained states are alive at once.
            per_dataset = (runner.run(specs, baseline_id=self.state_id, baseline=baseline) for specs in groups)
        results: list[DatasetResult] = []
        best = -1
        for runs in per_dataset:
            result = self._grounded_result(runs, base_correct) if grounded else self._intrinsic_result(runs[0])
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
                            eval_problems=tuple(self.eval_subset), greedy=config.greedy_eval,
                            eval_tokens=config.eval_tokens) for j, seed in enumerate(seeds)]
        # Intrinsic modes: the baseline samples the teacher's own problems, no training.
        return [RunSpec(index=first_index, problems=tuple(problems), steps=0, batch_size=config.batch_size,
                        group_size=config.group_size, seed=int(rng.integers(2**31 - 1)),
                        eval_problems=tuple(problems), eval_samples=config.intrinsic_samples, greedy=False,
                        eval_tokens=config.max_new_tokens)]

    def _grounded_result(self, runs: Sequence[RunRecord], base_correct: list[int]) -> DatasetResult:
        base_acc = float(np.mean(base_correct)) if base_correct else 0.0
        result = DatasetResult(reward=0.0)
        for run in runs:
            # A run left at the baseline's weights (or failed) answers exactly as the baseline did.
            correct = list(base_correct) if run.correct is None else list(run.correct)
            accuracy = float(np.mean(correct)) if correct else 0.0
            result.trained_correct.append(correct)
            result.trained_accuracy.append(accuracy)
            result.run_rewards.append(accuracy - base_acc)
            result.train_rewards.append(list(run.train_rewards))
            result.tokens += run.tokens
            result.train_seconds += run.train_seconds
            result.eval_seconds += run.eval_seconds
            if run.error:
                result.errors.append(run.error)
            if run.attempts > 1:
                result.retried_runs += 1
        result.reward = grounded_reward(result.trained_accuracy, base_acc)
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

    # -- promotion ---------------------------------------------------------------------------------

    @property
    def can_promote(self) -> bool:
        return self.config.promotion and self.config.reward_mode == "grounded"

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
        self.student.promotions = self.promotions
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
            "baseline_cache": {k: dict(v) for k, v in self._baseline_cache.items()},
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
        student.promotions = self.promotions
        self.state_id = int(state["state_id"])
        self._next_state_id = int(state["next_state_id"])
        self.promoted_questions = [Problem.from_dict(row) for row in state["promoted_questions"]]
        self.tracker.load_state_dict(state["tracker"])
        self.eval_subset = [Problem.from_dict(row) for row in state["eval_subset"]]
        self._baseline_cache = {int(k): {str(i): int(c) for i, c in v.items()}
                                for k, v in state["baseline_cache"].items()}


def _snippet(value: Any, limit: int = 200) -> str:
    try:
        text = repr(value)
    except Exception:  # noqa: BLE001
        return f"<unprintable {type(value).__name__}>"
    return text if len(text) <= limit else text[:limit] + "..."


def atomic_save(payload: Any, path: str | os.PathLike[str]) -> None:
    """``torch.save`` to a temporary file beside ``path``, then rename: a crash leaves the old file."""
    import torch

    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    handle, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".pt", dir=folder)
    try:
        with os.fdopen(handle, "wb") as stream:
            torch.save(payload, stream)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def load_checkpoint(path: str | os.PathLike[str]) -> dict[str, Any]:
    import torch

    # Our own files hold Python containers and numpy RNG state besides tensors.
    payload = torch.load(os.fspath(path), map_location="cpu", weights_only=False)
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path} is not a soar-gym environment checkpoint ({CHECKPOINT_FORMAT})")
    return payload


def rng_from_state(state: Mapping[str, Any]) -> np.random.Generator:
    """A numpy Generator whose bit generator resumes exactly at ``state``."""
    bit_generator = getattr(np.random, state["bit_generator"])()
    bit_generator.state = dict(state)
    return np.random.Generator(bit_generator)


def observation_space(config: EnvConfig) -> spaces.Box:
    """Flat float32 Box: baseline accuracy, promotions, step fraction, reward average, last reward."""
    low = np.array([0.0, 0.0, 0.0, -1.0, -1.0], dtype=np.float32)
    high = np.array([1.0, float(config.episode_length), 1.0, 1.0, 1.0], dtype=np.float32)
    return spaces.Box(low, high, dtype=np.float32)


def make_observation(space: spaces.Box, baseline_accuracy: float, promotions: int, step_fraction: float,
                     reward_average: float, last_reward: float) -> np.ndarray:
    values = np.array([baseline_accuracy, promotions, step_fraction, reward_average, last_reward], dtype=np.float32)
    # A penalty below -1 or a count past the horizon must not leave the space.
    return np.clip(values, space.low, space.high).astype(np.float32)


def _resolve_config(preset: str | EnvConfig | None, config: EnvConfig | None, overrides: dict[str, Any]) -> EnvConfig:
    if config is not None:
        return make_config(config, **overrides)
    return make_config(preset, **overrides)


# ---------------------------------------------------------------------------------------------
# The environment
# ---------------------------------------------------------------------------------------------


class CoreStateMixin:
    """The read-only SOAR state that the single and the vector env both expose from ``self.core``."""

    core: SOARCore
    _steps: int

    @property
    def student(self) -> StudentLike:
        return self.core.student

    @property
    def promoted_questions(self) -> list[Problem]:
        """PQ: every batch that led to a promotion this episode, in order."""
        return list(self.core.promoted_questions)

    @property
    def promotions(self) -> int:
        return self.core.promotions

    @property
    def eval_subset(self) -> list[Problem]:
        """Q_R: the hard problems the next step is measured on."""
        return list(self.core.eval_subset)

    @property
    def step_count(self) -> int:
        return self._steps


class SOARMathEnv(CoreStateMixin, gym.Env[np.ndarray, tuple[Problem, ...]]):
    """
    ## Description

    The teacher-side environment of SOAR (Sundaram et al., "Teaching Models to Teach
    Themselves", arXiv 2601.18778). The agent is a teacher that writes a batch of practice
    math problems, each a question with its final answer. The environment holds a student
    language model and a set of hard problems the student cannot solve. Each step trains r
    independent copies of the current *baseline* student on the batch with RLOO (the inner
    loop), measures their greedy accuracy on Q_R (M problems drawn from the hard train
    split) and rewards the teacher by the mean gain over the baseline. When the moving
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
    | 0 | baseline greedy accuracy on the current Q_R | 0 | 1 |
    | 1 | promotions so far this episode | 0 | episode_length |
    | 2 | fraction of the episode elapsed | 0 | 1 |
    | 3 | moving average of step rewards (the promotion window) | -1 | 1 |
    | 4 | last step reward | -1 | 1 |

    Entries 3 and 4 are clipped to [-1, 1]. The text itself (Q_R, PQ, rejections) is in ``info``.

    ## Rewards

    ``reward_mode="grounded"`` (SOAR): mean over the r runs of Acc(trained, Q_R) -
    Acc(baseline, Q_R), in [-1, 1]; the paper saw -0.04 to +0.02. ``"learnability"``: from
    ``intrinsic_samples`` sampled answers of the baseline per question, success rate s,
    reward mean of (0 if s = 0 else 1 - s). ``"variance"``: mean of s(1 - s). An action with no
    valid problem gets ``invalid_penalty`` (default -1) and trains nothing. The intrinsic modes
    and invalid actions do not move the promotion window.

    ## Starting State

    ``reset`` puts back the episode-start student (the configured model, or the weights in
    ``student_checkpoint``), empties
    PQ and the promotion window, draws Q_R with ``np_random`` and measures the baseline on it
    (cached per student state and problem, so later resets cost nothing).

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
      vector form with a shared baseline; checkpoints.
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
        self.config = _resolve_config(preset, config, overrides)
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
        promoted = False
        if not problems:
            reward = float(self.config.invalid_penalty)
            info.update(invalid_action=True, reason=_invalid_reason(rejected), tokens=0,
                        **DatasetResult(reward=reward).info())
            train_s = eval_s = 0.0
        else:
            result = self.core.run_dataset(problems, self.np_random)
            reward = float(result.reward)
            if self.core.can_promote and self.core.tracker.update(reward):
                promoted = self.core.promote(result.median_state, problems)
            info.update(invalid_action=False, reason=None, tokens=result.tokens, **result.info())
            train_s, eval_s = result.train_seconds, result.eval_seconds
        self._last_reward = reward
        info.update(reward=reward, promoted=promoted, promotions=self.core.promotions,
                    reward_average=self.core.tracker.moving_average, promoted_count=len(self.core.promoted_questions),
                    backend_events=self.core.backend_events())
        # Q_R of the next step, and the baseline accuracy the next observation reports.
        if self.config.resample_eval_subset:
            self.core.draw_eval_subset(self.np_random)
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
        self.core.close()
        self.core._student = None
        self.core._initial_state = None
        self.core._baseline_tensors = None
        self.core._baseline_cache = {}

    def _observation(self) -> np.ndarray:
        return make_observation(self.observation_space, self._baseline_accuracy, self.core.promotions,
                                self._steps / self.config.episode_length, self.core.tracker.moving_average,
                                self._last_reward)

    # -- checkpoints -------------------------------------------------------------------------------

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write everything needed to resume: baseline, PQ, window, step, RNG (atomic)."""
        if self._np_random is None:
            raise RuntimeError("save() needs a reset() first: there is no episode to save")
        payload = {
            "format": CHECKPOINT_FORMAT,
            "kind": "single",
            "config": self.config.to_dict(),
            "core": self.core.state_dict(),
            "steps": self._steps,
            "last_reward": self._last_reward,
            "baseline_accuracy": self._baseline_accuracy,
            "np_random": self.np_random.bit_generator.state,
            "np_random_seed": self._np_random_seed,
            "action_space_rng": self.action_space.np_random.bit_generator.state,
        }
        atomic_save(payload, path)

    def load(self, path: str | os.PathLike[str]) -> tuple[np.ndarray, dict[str, Any]]:
        """Resume from ``save``: returns the observation and info the env had then.

        Through ``gym.make`` call ``env.reset()`` once first (wrappers insist on it), then
        ``env.unwrapped.load(path)``; the TimeLimit wrapper then counts from the resume point,
        but the env's own ``episode_length`` truncation counts from the saved step.
        """
        payload = load_checkpoint(path)
        if payload.get("kind") != "single":
            raise ValueError(f"{path} holds a {payload.get('kind')!r} env checkpoint, not a single env's")
        if payload["config"] != self.config.to_dict():
            diff = {k: (v, getattr(self.config, k)) for k, v in payload["config"].items()
                    if getattr(self.config, k, None) != v}
            warnings.warn(f"loading a checkpoint written with other settings (saved, current): {diff}", stacklevel=2)
        self.core.load_state_dict(payload["core"])
        self._steps = int(payload["steps"])
        self._last_reward = float(payload["last_reward"])
        self._baseline_accuracy = float(payload["baseline_accuracy"])
        self._np_random = rng_from_state(payload["np_random"])
        self._np_random_seed = payload["np_random_seed"]
        self.action_space._np_random = rng_from_state(payload["action_space_rng"])
        info = {"baseline_accuracy": self._baseline_accuracy, "eval_problems": tuple(self.core.eval_subset),
                "promotions": self.core.promotions, "resumed_from": os.fspath(path), "step": self._steps}
        return self._observation(), info

    @classmethod
    def restore(cls, path: str | os.PathLike[str], *, student: StudentLike | None = None,
                hard_pool: Sequence[Problem] | None = None, **overrides: Any) -> "SOARMathEnv":
        """A new env built from a checkpoint's own settings (plus overrides), resumed."""
        payload = load_checkpoint(path)
        config = make_config(EnvConfig(**payload["config"]), **overrides)
        env = cls(config=config, student=student, hard_pool=hard_pool)
        env.load(path)
        return env


def _invalid_reason(rejected: list[dict[str, Any]]) -> str:
    """One sentence for an action with no usable problem: how many, and the commonest reasons."""
    counts: dict[str, int] = {}
    for record in rejected:
        counts[record["reason"]] = counts.get(record["reason"], 0) + 1
    reasons = ", ".join(f"{reason} x{count}" for reason, count in sorted(counts.items(), key=lambda kv: -kv[1]))
    return f"no valid problem in the action ({reasons}); nothing was trained"
