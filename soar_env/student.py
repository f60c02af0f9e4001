"""The SOAR inner loop: train a copy of the baseline student on a problem set, then evaluate it.

    student = build_student(make_config("tiny"))      # or Student(policy, StudentConfig(...))
    result = student.train(problems)                  # RLOO from the baseline; baseline untouched
    gain = student.evaluate(hard, state=result.state).accuracy - student.evaluate(hard).accuracy
    if promote_it: student.promote(result.state)      # the trained copy becomes the new baseline

Between calls the policy always holds the *baseline* weights; a trained copy lives only in a
`TrainResult.state` (the trainable tensors: LoRA adapters, or all weights without LoRA), so
the g x r student runs of one teacher step never see each other and reset is a cheap copy.

`StudentLike` is the part of `Student` the environments use (tests inject a scripted one);
`build_student` makes the student an `EnvConfig` names.
"""

from __future__ import annotations

import os
import random
import time
from collections import Counter
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Iterator, Protocol, Sequence

import torch

from soar_env.config import KL_REFERENCES, EnvConfig
from soar_env.problems import Problem, Rejection, to_problem
from soar_env.prompts import student_prompt
from soar_env.rl.rloo import NonFiniteLossError, RLOOConfig, RLOOUpdater
from soar_env.student_results import AnswerLogprobs, EvalResult, TrainResult
from soar_env.verify import grade_many

if TYPE_CHECKING:
    from soar_env.models.policy import LMPolicy
    from soar_env.models.rollout import Rollout

State = dict[str, torch.Tensor]
"""Trainable tensors of a policy, as returned by ``LMPolicy.state_dict_trainable``."""


@dataclass
class StudentConfig:
    """Inner-loop settings (paper values as defaults; presets shrink them for CPU)."""

    steps: int = 10
    """RLOO steps of one inner run before any promotion."""
    steps_after_promotion: int = 15
    """RLOO steps of one inner run once the baseline has been promoted at least once."""
    batch_size: int = 8
    """Problems per RLOO step."""
    group_size: int = 32
    """Sampled solutions per problem (the RLOO group)."""
    max_new_tokens: int = 1024
    """Generation limit for training samples."""
    temperature: float = 1.0
    """Sampling temperature for training samples (and for non-greedy evaluation); the RLOO update
    scores the samples at the same temperature, so it stays on-policy."""
    eval_max_new_tokens: int = 1024
    """Generation limit for evaluation."""
    require_box: bool = True
    """Grade only an answer inside ``\\boxed{}``; False also accepts the last number of the reply."""
    grade_unfinished: bool = True
    """Read replies that the token limit cut off (the paper's grader reads any reply). False grades
    them wrong (status ``unfinished``), in training rewards and evaluations alike: with
    ``require_box=False`` the "answer" of a cut-off reply is the last number it reached, which a
    weak student hits by chance (benchmarks/README.md section 8)."""
    accept_unevaluated: bool = True
    """Accept an answer equal to the gold in value though still an operation ("9/14 - 9/20" for
    27/140), as the paper's symbolic grader does. False grades it wrong (status ``unevaluated``): a
    weak student that writes a question's expression back gets it "right" without computing it."""
    grade_timeout: float = 5.0
    """Seconds allowed to grade one response before it counts as wrong."""
    grade_processes: int | None = None
    """Worker processes for grading; None lets the grader choose."""
    lr: float = 1e-5
    """{doc:soar_env.rl.rloo.RLOOConfig.lr}"""
    kl_coef: float = 0.001
    """{doc:soar_env.rl.rloo.RLOOConfig.kl_coef}"""
    kl_reference: str = "baseline"
    """What the inner loop's KL pulls towards: "baseline", the baseline each run starts from (after
    a promotion, the promoted student), or "initial", the episode-start student. The paper gives
    only the coefficient (0.001) for RLOO on a copy of the baseline; RLOO and GRPO take the policy a
    run starts from as its reference, hence "baseline". With LoRA either is one copy of the
    adapters, not a second model."""
    warmup_steps: int = 0
    """{doc:soar_env.rl.rloo.RLOOConfig.warmup_steps}"""
    weight_decay: float = 0.0
    """{doc:soar_env.rl.rloo.RLOOConfig.weight_decay}"""
    max_grad_norm: float | None = 1.0
    """{doc:soar_env.rl.rloo.RLOOConfig.max_grad_norm}"""
    min_lr_ratio: float = 0.0
    """{doc:soar_env.rl.rloo.RLOOConfig.min_lr_ratio}"""
    skip_zero_advantage: bool = True
    """{doc:soar_env.rl.rloo.RLOOConfig.skip_zero_advantage}"""
    loss_normalization: str = "tokens"
    """{doc:soar_env.rl.rloo.RLOOConfig.loss_normalization}"""
    micro_batch_size: int | None = None
    """{doc:soar_env.rl.rloo.RLOOConfig.micro_batch_size}"""
    sample_batch_size: int = 64
    """Sequences generated together; lower it to bound memory."""
    seed: int = 0
    """Default seed of problem order, sampling and dropout in ``train`` and sampled ``evaluate``."""

    def __post_init__(self) -> None:
        if self.kl_reference not in KL_REFERENCES:
            raise ValueError(f"kl_reference must be one of {KL_REFERENCES}, got {self.kl_reference!r}")

    def rloo_config(self) -> RLOOConfig:
        """The optimiser/loss part of these settings."""
        return RLOOConfig(
            lr=self.lr,
            kl_coef=self.kl_coef,
            warmup_steps=self.warmup_steps,
            weight_decay=self.weight_decay,
            max_grad_norm=self.max_grad_norm,
            min_lr_ratio=self.min_lr_ratio,
            skip_zero_advantage=self.skip_zero_advantage,
            loss_normalization=self.loss_normalization,
            micro_batch_size=self.micro_batch_size,
        )


def inner_steps_for(promotions: int, steps: int, steps_after_promotion: int) -> int:
    """RLOO steps of an inner run: ``steps`` until the first promotion, then ``steps_after_promotion``.

    The paper's 10 and 15: a promoted student has already learned from easy data and needs
    longer runs to move. The env applies it to its episode's promotions (`SOARCore.inner_steps`),
    a bare `Student` to its own (`Student.default_steps`).
    """
    return steps_after_promotion if promotions > 0 else steps


def _clone_state(state: State) -> State:
    return {name: tensor.detach().clone() for name, tensor in state.items()}


def checked_problems(entries: Sequence[Any]) -> tuple[list[Problem], list[tuple[int, Rejection]]]:
    """(the trainable problems, (index, reason) of every entry that is not one), never raising."""
    valid: list[Problem] = []
    skipped: list[tuple[int, Rejection]] = []
    for index, entry in enumerate(entries):
        checked = to_problem(entry)
        if isinstance(checked, Rejection):
            skipped.append((index, checked))
        else:
            valid.append(checked)
    return valid, skipped


def shuffled_cycle(n: int, rng: random.Random) -> Iterator[int]:
    """Indices 0..n-1 in a fresh shuffled order on every pass (how inner runs draw their batches)."""
    while True:
        order = list(range(n))
        rng.shuffle(order)
        yield from order


class Student:
    """A baseline student plus the inner loop that trains and evaluates copies of it."""

    def __init__(self, policy: "LMPolicy", config: StudentConfig | None = None) -> None:
        self.policy = policy
        self.config = config if config is not None else StudentConfig()
        self._baseline: State = _clone_state(policy.state_dict_trainable())
        self._initial: State = self._baseline
        """The trainable tensors the student was built with: the "initial" KL reference."""
        self._reference: State | None = None
        """The state last given to the policy as KL reference (set lazily, before training)."""
        self.promotions = 0
        """How many trained states have become the baseline."""

    # -- baseline ------------------------------------------------------------------------------

    @property
    def default_steps(self) -> int:
        """Steps of an inner run: ``steps``, or ``steps_after_promotion`` once promoted."""
        return inner_steps_for(self.promotions, self.config.steps, self.config.steps_after_promotion)

    def baseline_state(self) -> State:
        """A copy of the baseline's trainable tensors."""
        return _clone_state(self._baseline)

    def reset(self) -> None:
        """Put the baseline weights back into the policy (a copy of the trainable tensors)."""
        self.policy.load_state_dict_trainable(self._baseline)

    def promote(self, state: State) -> None:
        """Make a trained state the new baseline; later inner runs use ``steps_after_promotion``.

        With ``kl_reference="baseline"`` the KL reference follows: the next run pulls towards it.
        """
        self._baseline = _clone_state(state)
        self.reset()
        self.promotions += 1

    def reference_state(self) -> State:
        """The trainable tensors the inner loop's KL pulls towards (``kl_reference``)."""
        return self._baseline if self.config.kl_reference == "baseline" else self._initial

    def sync_reference(self) -> None:
        """Give the policy the KL reference of ``kl_reference`` if it changed since the last run."""
        target = self.reference_state()
        if self.config.kl_coef > 0 and target is not self._reference:
            self.policy.set_reference(target)
            self._reference = target

    # -- inner loop ----------------------------------------------------------------------------

    def _prompts(self, problems: Sequence[Problem]) -> list[str]:
        return [self.policy.chat_prompt(student_prompt(p.question)) for p in problems]

    def sample_group(self, batch: Sequence[Problem], group_size: int, rng: random.Random) -> "Rollout":
        """``group_size`` solutions per problem of ``batch`` at the training temperature (one RLOO step's
        rollout, prompt-major: batch x group rows), seeded from ``rng``."""
        config = self.config
        return self.policy.sample(self._prompts(batch), num_samples=group_size, temperature=config.temperature,
                                  max_new_tokens=config.max_new_tokens, seed=rng.randrange(2**31),
                                  batch_size=config.sample_batch_size)

    def rewards(self, rollout: "Rollout", batch: Sequence[Problem]) -> list[float]:
        """1.0 for each rollout row whose answer is correct, else 0.0 (the inner loop's reward)."""
        return [1.0 if g.correct else 0.0 for g in self._grade(rollout, batch)]

    def _grade(self, rollout: "Rollout", problems: Sequence[Problem]) -> list[Any]:
        return self.grade_replies(rollout.texts, rollout.stopped, [problems[i].answer for i in rollout.prompt_index])

    def grade_replies(self, texts: Sequence[str], stopped: Sequence[bool], golds: Sequence[str]) -> list[Any]:
        """Grades of replies (and whether each ended by itself) under this student's grading settings:
        the one place training rewards, evaluations and batched runs are graded."""
        config = self.config
        return grade_many(texts, golds, require_box=config.require_box, timeout=config.grade_timeout,
                          processes=config.grade_processes, finished=None if config.grade_unfinished else stopped,
                          accept_unevaluated=config.accept_unevaluated)

    def train(
        self,
        problems: Sequence[Any],
        steps: int | None = None,
        batch_size: int | None = None,
        group_size: int | None = None,
        *,
        seed: int | None = None,
        on_step: Callable[[int, int], None] | None = None,
    ) -> TrainResult:
        """RLOO on ``problems`` starting from the baseline; returns the trained state.

        Each step takes the next ``batch_size`` problems of a seeded shuffle (reshuffled on
        every pass), samples ``group_size`` solutions per problem, grades them (reward 1 if
        correct, else 0) and makes one RLOO update with a fresh optimizer whose cosine spans
        this run. The policy holds the baseline again when this returns, whatever happens.
        ``on_step(done, steps)`` is called after each finished RLOO step (progress display).
        """
        config = self.config
        steps = self.default_steps if steps is None else steps
        batch_size = config.batch_size if batch_size is None else batch_size
        group_size = config.group_size if group_size is None else group_size
        seed = config.seed if seed is None else seed
        start = time.perf_counter()

        # Checked here because `train` is public: run_pq and users pass loader rows, mappings or
        # hand-made Problems (whose constructor checks nothing). Problems the env already
        # validated pass through `to_problem` unchanged (the same objects come back).
        valid, skipped = checked_problems(problems)
        result = TrainResult(steps_done=0, num_problems=len(valid), skipped=skipped)
        if not valid:
            result.error = f"no_valid_problems: all {len(skipped)} entries were skipped"
            result.seconds = time.perf_counter() - start
            return result

        # Seeding: problem order and per-step sampling seeds come from one stream; the torch RNG
        # (adapter dropout, if any) is seeded inside a fork so the caller's RNG is left alone.
        rng = random.Random(seed)
        device = getattr(self.policy, "device", torch.device("cpu"))
        self.reset()
        self.sync_reference()
        try:
            with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                torch.manual_seed(seed)
                order = shuffled_cycle(len(valid), rng)
                # A fresh optimizer per run: the paper restarts AdamW and the cosine for every inner run.
                updater = RLOOUpdater(self.policy.trainable_parameters(), config.rloo_config(),
                                      total_steps=max(steps, 1))
                self.rloo_steps(updater, valid, order, steps, batch_size, group_size, rng, result, on_step)
            if result.error is None:
                result.state = _clone_state(self.policy.state_dict_trainable())
        finally:
            self.reset()  # the trained copy lives on only in result.state
        result.seconds = time.perf_counter() - start
        return result

    def rloo_steps(
        self,
        updater: RLOOUpdater,
        problems: Sequence[Problem],
        order: Iterator[int],
        steps: int,
        batch_size: int,
        group_size: int,
        rng: random.Random,
        result: TrainResult,
        on_step: Callable[[int, int], None] | None = None,
    ) -> None:
        """``steps`` RLOO steps of ``updater`` on the policy as it is, recorded into ``result``.

        Each step's batch is the next ``batch_size`` indices of ``order``; a non-finite loss stops
        the steps with ``result.error`` set. `train` calls it once with a fresh updater per inner
        run; a fresh PQ student (`benchmarks.fresh_student`) calls it chunk after chunk with one.
        """
        config = self.config
        for _ in range(steps):
            step = updater.steps_done
            batch = [problems[next(order)] for _ in range(batch_size)]
            t0 = time.perf_counter()
            rollout = self.sample_group(batch, group_size, rng)  # prompt-major: batch_size x group_size rows
            t1 = time.perf_counter()
            rewards = self.rewards(rollout, batch)
            t2 = time.perf_counter()
            tokens = sum(len(c) for c in rollout.completion_ids)
            result.tokens += tokens
            try:
                stats = updater.update(self.policy, rollout, rewards, group_size, temperature=config.temperature)
            except NonFiniteLossError as exc:
                result.error = f"non_finite_loss at step {step}: {exc}"
                result.stats.append({"step": float(step), **exc.stats})
                return
            stats.update(
                step=float(step),
                sampled_tokens=float(tokens),
                sample_seconds=t1 - t0,
                grade_seconds=t2 - t1,
                update_seconds=time.perf_counter() - t2,
            )
            result.stats.append(stats)
            result.rewards.append(sum(rewards) / len(rewards))
            result.steps_done += 1
            if on_step is not None:
                on_step(result.steps_done, steps)

    def evaluate(
        self,
        problems: Sequence[Problem],
        *,
        samples: int = 1,
        greedy: bool = True,
        state: State | None = None,
        max_new_tokens: int | None = None,
        seed: int | None = None,
    ) -> EvalResult:
        """Correct samples per problem for the baseline, or for ``state`` (loaded, then undone)."""
        config = self.config
        start = time.perf_counter()
        if not problems:
            return EvalResult(correct=[], samples=samples)
        if state is not None:
            self.policy.load_state_dict_trainable(state)
        try:
            rollout = self.policy.sample(
                self._prompts(problems),
                num_samples=samples,
                temperature=config.temperature,
                max_new_tokens=config.eval_max_new_tokens if max_new_tokens is None else max_new_tokens,
                greedy=greedy,
                seed=config.seed if seed is None else seed,
                batch_size=config.sample_batch_size,
            )
        finally:
            if state is not None:
                self.reset()
        grades = self._grade(rollout, problems)
        correct = [0] * len(problems)
        statuses: Counter[str] = Counter()
        for i, g in zip(rollout.prompt_index, grades):
            correct[i] += int(bool(g.correct))
            statuses[str(getattr(g.status, "value", g.status))] += 1
        return EvalResult(
            correct=correct,
            samples=samples,
            statuses=dict(statuses),
            tokens=sum(len(c) for c in rollout.completion_ids),
            seconds=time.perf_counter() - start,
        )

    def answer_logprobs(self, problems: Sequence[Problem], answers: Sequence[str], *,
                        state: State | None = None) -> AnswerLogprobs:
        """Mean log-prob per token of each ``answers[i]`` as the reply to ``problems[i]``'s student
        prompt, for the baseline or ``state`` (loaded, then undone): teacher-forced, no generation.

        One batched ``policy.token_logprobs`` call without gradients, at temperature 1 (the model's
        own distribution); each distinct prompt is run once, however many answers it is paired with.
        """
        if len(problems) != len(answers):
            raise ValueError(f"{len(problems)} problems for {len(answers)} answers")
        start = time.perf_counter()
        if not problems:
            return AnswerLogprobs([])
        prompt_ids = [self.policy.encode(prompt) for prompt in self._prompts(problems)]
        answer_ids = [self.policy.encode(answer) for answer in answers]
        if any(not ids for ids in answer_ids):
            raise ValueError("an answer with no tokens has no log-probability")
        if state is not None:
            self.policy.load_state_dict_trainable(state)
        try:
            with torch.no_grad():
                logprobs, mask = self.policy.token_logprobs(prompt_ids, answer_ids,
                                                            micro_batch_size=self.config.sample_batch_size)
        finally:
            if state is not None:
                self.reset()
        counts = mask.sum(dim=1)  # (B,) answer tokens per row
        means = (logprobs.double() * mask).sum(dim=1) / counts
        return AnswerLogprobs([float(x) for x in means.tolist()], tokens=int(counts.sum()),
                              seconds=time.perf_counter() - start)


# ---------------------------------------------------------------------------------------------
# What the environments need from a student, and the student a config names
# ---------------------------------------------------------------------------------------------


class StudentLike(Protocol):
    """The part of `Student` the environments use; `soar_env.envs.testing.ScriptedStudent` is another.

    The env passes every run's step count explicitly, so a student needs no promotion
    counter of its own to serve an env. Only ``reward_estimator="likelihood"`` calls
    ``answer_logprobs`` (an `AnswerLogprobs`, or a plain list of mean log-probs per answer).
    """

    def train(self, problems: Sequence[Problem], steps: int | None = None, batch_size: int | None = None,
              group_size: int | None = None, *, seed: int | None = None) -> Any: ...

    def evaluate(self, problems: Sequence[Problem], *, samples: int = 1, greedy: bool = True,
                 state: Any = None, max_new_tokens: int | None = None, seed: int | None = None) -> Any: ...

    def answer_logprobs(self, problems: Sequence[Problem], answers: Sequence[str], *, state: Any = None) -> Any: ...

    def promote(self, state: Any) -> None: ...

    def baseline_state(self) -> Any: ...


def build_student(config: EnvConfig) -> Student:
    """The student a config names: model, LoRA, device, sampler and inner-loop settings."""
    # transformers and peft take seconds to import; only a real student needs them.
    from soar_env.models.policy import LMPolicy, LoraSettings
    from soar_env.models.resolve import resolve_device

    lora = LoraSettings(r=config.lora_rank, alpha=config.lora_alpha) if config.lora else None
    policy = LMPolicy.from_name(config.student_model, lora=lora, device=resolve_device(config.device),
                                dtype=getattr(torch, config.dtype), compute_dtype=config.compute_dtype)
    if config.student_checkpoint:
        # Episode-start weights other than the pretrained ones, e.g. a promoted student of a past run.
        policy.load(os.path.expanduser(config.student_checkpoint))
    if config.sampler == "vllm":
        from soar_env.models.vllm_sampler import VLLMSampler, VLLMSettings  # optional extra, CUDA only

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
        grade_unfinished=config.grade_unfinished,
        accept_unevaluated=config.accept_unevaluated,
        grade_timeout=config.grade_timeout,
        lr=config.learning_rate,
        kl_coef=config.kl_coef,
        kl_reference=config.kl_reference,
        weight_decay=config.weight_decay,
        max_grad_norm=config.max_grad_norm,
        skip_zero_advantage=config.skip_zero_advantage,
        loss_normalization=config.loss_normalization,
        seed=config.seed if config.seed is not None else 0,
    )
    return Student(policy, student_config)


__all__ = [
    "AnswerLogprobs",
    "EvalResult",
    "State",
    "Student",
    "StudentConfig",
    "StudentLike",
    "TrainResult",
    "build_student",
    "checked_problems",
    "inner_steps_for",
    "shuffled_cycle",
]
