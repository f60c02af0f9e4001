"""SOAR's teacher: an LLM that writes problems and learns with RLOO from the student's progress.

    envs = gym.make_vec("SOAR-MATH-v0", num_envs=4, preset="paper")
    RLOOTeacher(make_teacher_config("paper")).learn(envs, total_steps=200, run_dir="runs/soar")

One teacher step (SOAR_SPEC.md, "The bi-level loop"):

1. Sample g·n outputs of the fixed teacher prompt (no seed problems) and keep those that
   `parse_teacher_output` accepts; resample until g·n are valid (rejection sampling) or the
   attempt budget is spent. The acceptance rate is logged.
2. Split them into g datasets X_1..X_g of n problems: the g actions of the vector env.
3. The env trains r students per dataset and returns R_k. Every output of X_k gets the
   advantage A_k = R_k - mean(R_j, j != k), and one RLOO step (`RLOOUpdater`: AdamW, warm-up,
   cosine, KL to the initial teacher) follows. The rollout is laid out as n groups of g rows,
   row k of group i being problem i of X_k, so the updater's leave-one-out over each group of g
   is exactly A_k.

Small models rarely follow the format, so ``prefill`` can force parts of the reply:
``"question"`` starts the reply with ``<question>``; ``"answer"`` adds a second stage that
closes the question and forces ``</question>\\n<answer>\\boxed{`` before sampling the answer
(with ``question_ends_at_newline`` the question also ends at its first line break).
Forced tokens are prompt, not sample: only sampled tokens get gradients, so the update stays an
on-policy policy gradient for the distribution the teacher actually samples from.

When the budget runs out with fewer than g·n valid outputs, the datasets are filled with the
rejected outputs (sent nowhere: the env sees only valid problems, a dataset with none gets the
env's invalid-action penalty) and those outputs share their dataset's advantage, so a teacher
that cannot yet write the format is pushed towards the datasets that trained the student.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import math
import os
import re
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from agents.base import Teacher, env_config
from soar_env.problems import Problem, Rejection, parse_teacher_output
from soar_env.prompts import MATH_TOPICS, TEACHER_REPLY_PREFIX, teacher_prompt

PREFILL_MODES = ("none", "question", "answer")
"""How much of the teacher's reply is forced (see the module docstring)."""

ANSWER_PREFIX = "</question>\n<answer>\\boxed{"
"""What the second stage of ``prefill="answer"`` forces after the question."""

TINY_FORMAT_MODEL = "tiny-format"
"""The tiny random model after a few seconds of supervised training on well-formatted problems,
so tests and the tiny preset see valid teacher outputs (a random model writes none)."""

ARITHMETIC_TOPICS = ("arithmetic with whole numbers and fractions, order of operations, remainders, greatest "
                     "common divisors and least common multiples, roots of polynomials, linear equations and "
                     "short word problems")
"""Topics of the procedural families behind the small presets' hard sets (the bundled set spans
all ten); the teacher never sees the problems themselves."""

STATE_FORMAT = "soar-gym-teacher/1"

_DIGIT = re.compile(r"\d")


@dataclass
class TeacherConfig:
    """Settings of the LLM teacher; defaults are the paper's (Llama-3.2-3B-Instruct, full fine-tune)."""

    model: str | None = None
    """Teacher model: None uses the env's student model (the paper's teacher and student are one
    model); else "tiny", "tiny-format", "smollm2-135m-instruct", an HF id or a folder."""
    lora: bool | None = None
    """Train LoRA adapters instead of all weights; None: as the env's student."""
    lora_rank: int | None = None
    """LoRA rank; None: the env's lora_rank."""
    lora_alpha: int | None = None
    """LoRA scaling numerator; None: the env's lora_alpha."""
    lr: float = 1e-5
    """Peak AdamW learning rate of the teacher (paper: 1e-5)."""
    kl_coef: float = 0.001
    """KL penalty towards the initial teacher (paper: 0.001)."""
    warmup_steps: int = 20
    """Teacher steps of linear lr warm-up before the cosine decay (paper: 20)."""
    schedule_steps: int | None = None
    """Length of the cosine schedule in teacher steps; None: the run's total steps (a run resumed
    with more --steps stretches the cosine from there on)."""
    min_lr_ratio: float = 0.0
    """Fraction of the peak lr the cosine ends at."""
    weight_decay: float = 0.0
    """AdamW decoupled weight decay."""
    max_grad_norm: float = 1.0
    """Clip the gradient norm of a teacher update to this value."""
    skip_zero_advantage: bool = True
    """Skip the update when all g rewards are equal (no signal); off, the optimizer still steps
    (weight decay acts, Adam's step count moves)."""
    micro_batch_size: int | None = 8
    """Teacher rows (outputs, or stages of outputs) per forward/backward pass of an update; the
    gradient is the same, only peak memory changes. None: all at once, which on SmolLM2-135M at the
    cpu preset (64 rows of a 123-token prompt and up to 76 sampled tokens, no activation
    checkpointing) took 17.5 GB and was killed."""
    temperature: float = 1.0
    """Sampling temperature of the teacher (paper: 1.0)."""
    max_new_tokens: int = 512
    """Longest teacher output; with prefill "answer", the longest question (paper: 512)."""
    answer_max_new_tokens: int = 32
    """prefill "answer" only: longest answer sampled after the forced \\boxed{."""
    prefill: str = "none"
    """Forced start of the reply: none (paper), question (<question>) or answer (also
    </question><answer>\\boxed{ in a second stage), for small models that miss the format."""
    question_ends_at_newline: bool = False
    """prefill "answer" only: a line break also ends the question (small models ramble on
    instead of closing the tag; their first line is usually the question)."""
    require_numeric_answer: bool = False
    """Also reject answers without a digit: small models copy the prompt's "\\boxed{final answer}",
    which Math-Verify reads as a product of symbols that no student can match."""
    topics: str = MATH_TOPICS
    """Topics the fixed teacher prompt names (those of the target benchmark; no seed problems)."""
    max_attempts: float = 4.0
    """Rejection-sampling budget: raw outputs per needed problem (at most ceil(max_attempts·g·n)
    samples per step); when it runs out the datasets are filled with rejected outputs."""
    sample_batch_size: int = 64
    """Sequences generated together; lower it to bound memory."""
    device: str | None = None
    """Torch device of the teacher; None: the env's device setting."""
    dtype: str | None = None
    """Teacher weights' dtype (float32, bfloat16, float16); None: the env's dtype."""
    seed: int | None = None
    """Seed of the teacher's sampling and dataset split; None: the env's seed (or 0)."""

    def __post_init__(self) -> None:
        for name in ("warmup_steps",):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"teacher {name} must be an integer >= 0, got {value!r}")
        for name in ("max_new_tokens", "answer_max_new_tokens", "sample_batch_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"teacher {name} must be an integer >= 1, got {value!r}")
        for name in ("schedule_steps", "micro_batch_size", "lora_rank", "lora_alpha"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise ValueError(f"teacher {name} must be None or an integer >= 1, got {value!r}")
        if self.prefill not in PREFILL_MODES:
            raise ValueError(f"teacher prefill must be one of {PREFILL_MODES}, got {self.prefill!r}")
        if not float(self.lr) > 0:
            raise ValueError(f"teacher lr must be > 0, got {self.lr!r}")
        if not float(self.temperature) > 0:
            raise ValueError(f"teacher temperature must be > 0, got {self.temperature!r}")
        for name in ("kl_coef", "weight_decay", "min_lr_ratio"):
            if float(getattr(self, name)) < 0:
                raise ValueError(f"teacher {name} must be >= 0, got {getattr(self, name)!r}")
        if not float(self.max_grad_norm) > 0:
            raise ValueError(f"teacher max_grad_norm must be > 0, got {self.max_grad_norm!r}")
        if not float(self.max_attempts) >= 1:
            raise ValueError(f"teacher max_attempts must be >= 1 (one raw sample per problem at least), "
                             f"got {self.max_attempts!r}")
        if self.dtype is not None and self.dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"teacher dtype must be float32, bfloat16 or float16, got {self.dtype!r}")
        if not isinstance(self.topics, str) or not self.topics.strip():
            raise ValueError("teacher topics must be a non-empty string")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


TEACHER_PRESETS: dict[str, TeacherConfig] = {
    # Tests: the tiny model taught the output format in-process; short outputs, a large lr.
    "tiny": TeacherConfig(model=TINY_FORMAT_MODEL, lr=1e-3, warmup_steps=0, max_new_tokens=24,
                          answer_max_new_tokens=8, prefill="answer", question_ends_at_newline=True,
                          topics=ARITHMETIC_TOPICS, max_attempts=2.0),
    # This machine: the embedded SmolLM2-135M with LoRA (the env's setting). It writes the tags
    # 0-3 times in 32 free-form and, after a forced <question>, closes the tag rarely but ends
    # its first line with the question, so the question ends at a line break and the answer
    # prefix is forced (then ~75% of outputs pass). Most of its boxed answers copy the prompt's
    # "final answer"; require_numeric_answer would reject those, but measured here it rejected
    # every output of 3 steps, so it stays off. The LoRA lr is the one that moved the student
    # here (DESIGN.md), halved.
    "cpu": TeacherConfig(lr=1e-4, warmup_steps=2, max_new_tokens=64, answer_max_new_tokens=12, prefill="answer",
                         question_ends_at_newline=True, topics=ARITHMETIC_TOPICS, max_attempts=4.0),
    # The paper: lr 1e-5, KL 0.001, warm-up 20, temperature 1.0, 512 new tokens, free-form reply.
    "paper": TeacherConfig(),
}
"""Named teacher settings, matching the env presets of `soar_env.config.PRESETS`."""


def make_teacher_config(preset: str | TeacherConfig = "cpu", **overrides: Any) -> TeacherConfig:
    """A copy of a teacher preset with ``overrides``; unknown names fail with a close match."""
    if isinstance(preset, TeacherConfig):
        base = preset
    elif preset in TEACHER_PRESETS:
        base = TEACHER_PRESETS[preset]
    else:
        raise ValueError(f"unknown teacher preset {preset!r}; valid: {', '.join(TEACHER_PRESETS)}")
    valid = [f.name for f in dataclasses.fields(TeacherConfig)]
    unknown = [k for k in overrides if k not in valid]
    if unknown:
        hints = [f"{k!r}" + (f" (did you mean {m[0]!r}?)" if (m := difflib.get_close_matches(k, valid, n=1)) else "")
                 for k in unknown]
        raise ValueError(f"unknown TeacherConfig setting(s): {', '.join(hints)}; valid: {', '.join(valid)}")
    return dataclasses.replace(base, **overrides)


# ---------------------------------------------------------------------------------------------
# Sampling teacher outputs
# ---------------------------------------------------------------------------------------------


@dataclass
class Draft:
    """One sampled teacher output: the problem (or why not) and the sampled token rows."""

    text: str
    """The full reply as parsed, forced parts included."""
    result: Problem | Rejection
    rows: list[tuple[list[int], list[int]]] = field(default_factory=list)
    """(prompt ids, sampled completion ids) per stage: one row, two with prefill "answer"."""

    @property
    def ok(self) -> bool:
        return isinstance(self.result, Problem)

    @property
    def tokens(self) -> int:
        return sum(len(c) for _, c in self.rows)


def close_box(text: str) -> str | None:
    """What comes before the ``}`` that closes an already open ``\\boxed{`` (None if it never closes)."""
    depth, i = 1, 0
    while i < len(text):
        c = text[i]
        if c == "\\":
            i += 2
            continue
        if c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
            if depth == 0:
                return text[:i]
        i += 1
    return None


def question_part(text: str, *, newline: bool = False) -> str:
    """Stage 1's question: its text up to ``</question>`` (or the first line break with ``newline``)."""
    question = text.split("</question>", 1)[0]
    return question.split("\n", 1)[0] if newline else question


def assemble_two_stage(question_text: str, answer_text: str) -> str | Rejection:
    """The canonical reply of prefill "answer" from the two sampled parts (no model involved).

    ``question_text`` is stage 1 after the forced ``<question>`` (ending with ``</question>`` or
    not); ``answer_text`` is stage 2 after the forced ``\\boxed{``: its content runs to the brace
    that closes the box, anything after it is ignored.
    """
    question = question_text.split("</question>", 1)[0]
    inner = close_box(answer_text)
    if inner is None:
        return Rejection("unfinished_answer", "the forced \\boxed{ is never closed", answer_text[:300])
    return f"{TEACHER_REPLY_PREFIX}{question}</question>\n<answer>\\boxed{{{inner}}}</answer>"


class TeacherSampler:
    """Samples teacher outputs in one of the prefill modes and parses them; no learning here."""

    def __init__(self, policy: Any, config: TeacherConfig) -> None:
        self.policy = policy
        self.config = config
        user = teacher_prompt(config.topics)
        forced = "" if config.prefill == "none" else TEACHER_REPLY_PREFIX
        self.prefix = forced
        self.prompt = policy.chat_prompt(user, reply_prefix=forced)

    def parse(self, text: str) -> Problem | Rejection:
        """The paper's checks (`parse_teacher_output`), plus a digit in the answer when configured."""
        result = parse_teacher_output(text)
        if isinstance(result, Problem) and self.config.require_numeric_answer and not _DIGIT.search(result.answer):
            return Rejection("non_numeric_answer", "the answer has no digit", result.answer[:300])
        return result

    def sample(self, count: int, seed: int) -> list[Draft]:
        """``count`` drafts of the fixed prompt, each parsed (valid or with a rejection)."""
        config = self.config
        if config.prefill != "answer":
            rollout = self.policy.sample([self.prompt], num_samples=count, temperature=config.temperature,
                                         max_new_tokens=config.max_new_tokens, stop=["</answer>"], seed=seed,
                                         batch_size=config.sample_batch_size)
            drafts = []
            for prompt_ids, ids, text in zip(rollout.prompt_ids, rollout.completion_ids, rollout.texts):
                full = self.prefix + text
                drafts.append(Draft(full, self.parse(full), [(prompt_ids, list(ids))]))
            return drafts
        return self._two_stage(count, seed)

    def _two_stage(self, count: int, seed: int) -> list[Draft]:
        config = self.config
        stops = ["</question>", "\n"] if config.question_ends_at_newline else ["</question>"]
        first = self.policy.sample([self.prompt], num_samples=count, temperature=config.temperature,
                                   max_new_tokens=config.max_new_tokens, stop=stops, seed=seed,
                                   batch_size=config.sample_batch_size)
        drafts: list[Draft] = []
        second_prompts: list[str] = []
        waiting: list[int] = []
        for prompt_ids, ids, text, stopped in zip(first.prompt_ids, first.completion_ids, first.texts, first.stopped):
            draft = Draft(self.prefix + text, Rejection("pending"), [(prompt_ids, list(ids))])
            question = question_part(text, newline=config.question_ends_at_newline)
            if not stopped:
                # Cut by the token limit: the question never ended.
                draft.result = Rejection("unfinished_question", "the question hit max_new_tokens", text[:300])
            elif not question.strip():
                draft.result = Rejection("empty_question", "nothing between the question tags", text[:300])
            else:
                # The question ended (tag, line break or end of reply): force the answer prefix.
                second_prompts.append(self.prompt + question + ANSWER_PREFIX)
                waiting.append(len(drafts))
            drafts.append(draft)
        if second_prompts:
            second = self.policy.sample(second_prompts, num_samples=1, temperature=config.temperature,
                                        max_new_tokens=config.answer_max_new_tokens, stop=["</answer>"],
                                        seed=seed + 1, batch_size=config.sample_batch_size)
            for index, prompt_ids, ids, text in zip(waiting, second.prompt_ids, second.completion_ids, second.texts):
                draft = drafts[index]
                draft.rows.append((prompt_ids, list(ids)))
                question = question_part(draft.text[len(self.prefix):], newline=config.question_ends_at_newline)
                assembled = assemble_two_stage(question, text)
                if isinstance(assembled, Rejection):
                    draft.text = self.prefix + question + ANSWER_PREFIX + text
                    draft.result = assembled
                else:
                    draft.text = assembled
                    draft.result = self.parse(assembled)
        return drafts


# ---------------------------------------------------------------------------------------------
# The teacher
# ---------------------------------------------------------------------------------------------


class RLOOTeacher(Teacher):
    """SOAR's Grounded-T: an LLM teacher trained with RLOO on the env's rewards (see module doc).

    ``RLOOTeacher(config, policy=None)``: without a policy, the model named by ``config.model``
    (default: the env's student model) is loaded when ``learn`` starts (``setup``), so
    constructing a teacher is cheap. Use the vector env: with one dataset per step every RLOO
    advantage is 0 and the teacher cannot learn.
    """

    learns = True
    """Whether ``update`` changes the weights (False for the untrained Base-T)."""

    def __init__(self, config: TeacherConfig | None = None, *, policy: Any = None, **overrides: Any) -> None:
        super().__init__()
        self.config = make_teacher_config(config if config is not None else TeacherConfig(), **overrides)
        self.policy = policy
        self.updater: Any = None
        self.model_name: str | None = getattr(policy, "name_or_path", None)
        self._env_config: Any = None
        self._total_steps: int | None = None
        self._rng = np.random.default_rng(self.config.seed if self.config.seed is not None else 0)
        self._seeded = self.config.seed is not None
        self._sampler: TeacherSampler | None = None
        self._pending: list[list[Draft]] | None = None
        self._acceptance_estimate = 1.0
        self.totals = {"drawn": 0, "accepted": 0, "bound_hits": 0, "updates": 0, "tokens": 0}
        """Counts over the whole run: raw outputs drawn, valid ones, budget exhaustions, updates, tokens."""

    # -- model -----------------------------------------------------------------------------------

    def setup(self, env: Any, total_steps: int) -> None:
        self._env_config = env_config(env)
        self._total_steps = total_steps
        if not self._seeded and self._env_config is not None and self._env_config.seed is not None:
            self._rng = np.random.default_rng(self._env_config.seed)
            self._seeded = True
        self._ensure_policy()
        if self.learns:
            self._ensure_updater()

    def check_env(self, config: Any) -> None:
        if config is not None and config.num_datasets < 2 and self.learns:
            warnings.warn(f"{type(self).__name__} on a single dataset per step: every RLOO advantage is 0, so it "
                          "will not learn; use gym.make_vec('SOAR-MATH-v0', num_envs=g)", stacklevel=3)

    def _resolve(self, name: str, default: Any) -> Any:
        value = getattr(self.config, name)
        return default if value is None else value

    def _ensure_policy(self) -> Any:
        if self.policy is not None:
            return self.policy
        import torch

        from soar_env.models import LMPolicy, LoraSettings

        env = self._env_config
        model = self._resolve("model", env.student_model if env is not None else "tiny")
        use_lora = self._resolve("lora", env.lora if env is not None else True)
        rank = self._resolve("lora_rank", env.lora_rank if env is not None else 16)
        alpha = self._resolve("lora_alpha", env.lora_alpha if env is not None else 32)
        device = self._resolve("device", env.device if env is not None else "auto")
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        dtype = getattr(torch, self._resolve("dtype", env.dtype if env is not None else "float32"))
        lora = LoraSettings(r=rank, alpha=alpha) if use_lora else None
        if model == TINY_FORMAT_MODEL:
            base, tokenizer = tiny_format_model(self.config.topics)
            self.policy = LMPolicy(base, tokenizer, lora=lora, device=device)
        else:
            self.policy = LMPolicy.from_name(model, lora=lora, device=device, dtype=dtype)
        self.model_name = model
        return self.policy

    def _ensure_updater(self, total_steps: int | None = None) -> Any:
        if self.updater is not None:
            return self.updater
        from soar_env.rl import RLOOConfig, RLOOUpdater

        policy = self._ensure_policy()
        config = self.config
        steps = config.schedule_steps or total_steps or self._total_steps or 1
        rloo = RLOOConfig(lr=config.lr, kl_coef=config.kl_coef, warmup_steps=config.warmup_steps,
                          weight_decay=config.weight_decay, max_grad_norm=config.max_grad_norm,
                          min_lr_ratio=config.min_lr_ratio, skip_zero_advantage=config.skip_zero_advantage,
                          micro_batch_size=config.micro_batch_size)
        if policy.lora is None and config.kl_coef > 0:
            # Full fine-tuning: the KL reference is a frozen copy taken at the first reference
            # pass; take it now, while the weights are still the initial teacher's (a resumed
            # run loads trained weights right after this).
            ids = policy.tokenizer("0", add_special_tokens=False)["input_ids"][:1] or [0]
            policy.token_logprobs([ids], [ids], reference=True)
        self.updater = RLOOUpdater(policy.trainable_parameters(), rloo, total_steps=max(1, steps))
        return self.updater

    @property
    def sampler(self) -> TeacherSampler:
        if self._sampler is None:
            self._sampler = TeacherSampler(self._ensure_policy(), self.config)
        return self._sampler

    # -- acting ----------------------------------------------------------------------------------

    def propose(self, num_datasets: int, problems_per_dataset: int) -> list[list[Problem]]:
        """g datasets of up to n valid problems, by rejection sampling within the attempt budget."""
        need = num_datasets * problems_per_dataset
        budget = math.ceil(self.config.max_attempts * need)
        valid: list[Draft] = []
        rejected: list[Draft] = []
        drawn = 0
        reasons: dict[str, int] = {}
        while len(valid) < need and drawn < budget:
            missing = need - len(valid)
            # Ask for what the acceptance seen so far says is needed, never past the budget.
            count = min(budget - drawn, max(missing, math.ceil(missing / max(self._acceptance_estimate, 0.05))))
            drafts = self.sampler.sample(count, seed=int(self._rng.integers(2**31 - 1)))
            drawn += len(drafts)
            for draft in drafts:
                if draft.ok:
                    valid.append(draft)
                else:
                    rejected.append(draft)
                    reason = getattr(draft.result, "reason", "rejected")
                    reasons[reason] = reasons.get(reason, 0) + 1
            accepted_now = sum(d.ok for d in drafts) / max(len(drafts), 1)
            self._acceptance_estimate = 0.5 * self._acceptance_estimate + 0.5 * accepted_now
        bound_hit = len(valid) < need
        chosen = valid[:need]
        if bound_hit:
            # Fill with the latest rejected outputs, then mix, so every dataset is n random draws.
            chosen = chosen + rejected[len(rejected) - (need - len(chosen)):]
            order = self._rng.permutation(len(chosen))
            chosen = [chosen[int(i)] for i in order]
        datasets = [chosen[k * problems_per_dataset:(k + 1) * problems_per_dataset] for k in range(num_datasets)]
        self._pending = datasets
        tokens = sum(d.tokens for d in valid) + sum(d.tokens for d in rejected)
        self.totals["drawn"] += drawn
        self.totals["accepted"] += len(valid)
        self.totals["bound_hits"] += int(bound_hit)
        self.totals["tokens"] += tokens
        self.record("teacher/acceptance_rate", len(valid) / max(drawn, 1))
        self.record("teacher/acceptance_rate_run", self.totals["accepted"] / max(self.totals["drawn"], 1))
        self.record("teacher/samples_drawn", drawn)
        self.record("teacher/bound_hit", float(bound_hit))
        self.record("teacher/filled_with_rejected", float(sum(not d.ok for d in chosen)))
        self.record("teacher/tokens", tokens)
        for reason, count in reasons.items():
            self.record(f"teacher/rejected/{reason}", count)
        step = self.num_steps
        return [[_tag(d.result, step, k) for d in dataset if d.ok] for k, dataset in enumerate(datasets)]

    def last_drafts(self) -> list[list[Draft]] | None:
        """The drafts behind the last proposal (valid and filled-in), per dataset."""
        return self._pending

    # -- learning --------------------------------------------------------------------------------

    def update(self, rewards: np.ndarray, infos: Sequence[Mapping[str, Any]] = ()) -> dict[str, float]:
        """One RLOO step: every sampled token of X_k gets A_k = R_k - mean of the other rewards."""
        datasets, self._pending = self._pending, None
        if not self.learns:
            return {}
        if datasets is None:
            raise RuntimeError("update() needs a propose() first: there is nothing to credit the rewards to")
        rewards = np.asarray(rewards, dtype=np.float64).reshape(-1)
        g = len(datasets)
        if len(rewards) != g:
            raise ValueError(f"{len(rewards)} rewards for {g} datasets")
        from soar_env.rl import NonFiniteLossError

        updater = self._ensure_updater()
        rollout, row_rewards = build_rollout(datasets, rewards)
        if len(rollout) == 0:
            return {"update_skipped": 1.0}
        try:
            stats = updater.update(self.policy, rollout, row_rewards, group_size=g)
        except NonFiniteLossError:
            # The updater left weights and optimizer untouched; the run goes on.
            return {"update_skipped": 1.0, "nonfinite": 1.0}
        self.totals["updates"] += int(not stats.get("skipped", 0.0))
        return {"loss": stats.get("loss", 0.0), "pg_loss": stats.get("pg_loss", 0.0), "kl": stats.get("kl", 0.0),
                "lr": stats.get("lr", 0.0), "grad_norm": stats.get("grad_norm", 0.0),
                "advantage_abs_mean": stats.get("advantage_abs_mean", 0.0),
                "update_skipped": stats.get("skipped", 0.0), "update_tokens": stats.get("tokens", 0.0)}

    # -- state -----------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {
            "format": STATE_FORMAT,
            "class": type(self).__name__,
            "config": self.config.to_dict(),
            "model": self.model_name,
            "rng": copy.deepcopy(self._rng.bit_generator.state),
            "acceptance_estimate": self._acceptance_estimate,
            "totals": dict(self.totals),
            "num_steps": self.num_steps,
        }
        if self.learns:
            state["policy"] = self._ensure_policy().state_dict_trainable()
            state["updater"] = self._ensure_updater().state_dict()
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if state.get("format") != STATE_FORMAT:
            raise ValueError(f"not a {STATE_FORMAT} teacher state")
        if state.get("class") != type(self).__name__:
            warnings.warn(f"loading a {state.get('class')} state into a {type(self).__name__}", stacklevel=2)
        if self.learns and "policy" in state:
            updater = self._ensure_updater(state["updater"].get("total_steps"))
            self.policy.load_state_dict_trainable(state["policy"])
            updater.load_state_dict(state["updater"])
        bit_generator = getattr(np.random, state["rng"]["bit_generator"])()
        bit_generator.state = copy.deepcopy(state["rng"])
        self._rng = np.random.Generator(bit_generator)
        self._seeded = True
        self._acceptance_estimate = float(state.get("acceptance_estimate", 1.0))
        self.totals.update({k: int(v) for k, v in state.get("totals", {}).items()})
        self.num_steps = int(state.get("num_steps", self.num_steps))
        self._pending = None


class IntrinsicTeacher(RLOOTeacher):
    """Intrinsic-T: the same teacher trained on the env's learnability reward instead of grounded gains.

    The paper's baseline: 32 student samples per question give a success rate s, the question
    scores 0 if s = 0 else 1 - s, the dataset scores the mean. The env computes it
    (``reward_mode="learnability"``), so the comparison with Grounded-T changes nothing else.
    """

    env_overrides = {"reward_mode": "learnability"}

    def check_env(self, config: Any) -> None:
        super().check_env(config)
        if config is not None and config.reward_mode == "grounded":
            raise ValueError("IntrinsicTeacher needs an intrinsic reward: make the env with "
                             "reward_mode='learnability' (or 'variance')")


def build_rollout(datasets: Sequence[Sequence[Draft]], rewards: np.ndarray) -> tuple[Any, list[float]]:
    """The teacher's RLOO batch: groups of g rows, row k from dataset k, reward R_k.

    Group (i, s) holds stage s of problem i of each dataset, so the leave-one-out mean inside a
    group is the mean of the other datasets' rewards: A_k for every row of X_k. A draft with
    fewer stages than the mode (a question cut before stage 2) gets an empty row there, which
    scores no token. ``prompt_index`` is the group id: groups are what the updater checks.
    """
    from soar_env.models import Rollout

    g = len(datasets)
    slots = min(len(d) for d in datasets) if datasets else 0
    stages = max((len(d.rows) for dataset in datasets for d in dataset), default=1)
    rollout = Rollout(prompt_index=[], prompt_ids=[], completion_ids=[], texts=[], stopped=[])
    row_rewards: list[float] = []
    group = 0
    for i in range(slots):
        for s in range(stages):
            for k in range(g):
                draft = datasets[k][i]
                prompt_ids, completion = draft.rows[s] if s < len(draft.rows) else (draft.rows[0][0], [])
                rollout.prompt_index.append(group)
                rollout.prompt_ids.append(prompt_ids)
                rollout.completion_ids.append(list(completion))
                rollout.texts.append(draft.text)
                rollout.stopped.append(True)
                row_rewards.append(float(rewards[k]))
            group += 1
    return rollout, row_rewards


def _tag(problem: Problem | Rejection, step: int, dataset: int) -> Problem:
    assert isinstance(problem, Problem)
    return dataclasses.replace(problem, meta={**problem.meta, "teacher_step": step, "dataset": dataset})


# ---------------------------------------------------------------------------------------------
# The tiny teacher that knows the format
# ---------------------------------------------------------------------------------------------

_TINY_FORMAT_CACHE: dict[tuple[str, int, int], tuple[Any, Any]] = {}


def _cache_dir() -> Path:
    root = os.environ.get("SOAR_GYM_CACHE") or os.path.join(os.environ.get("XDG_CACHE_HOME") or "~/.cache", "soar-gym")
    return Path(root).expanduser()


def tiny_format_model(topics: str = ARITHMETIC_TOPICS, *, seed: int = 0, steps: int = 40) -> tuple[Any, Any]:
    """The tiny random Llama after ``steps`` supervised steps on well-formatted generated problems.

    Trained on the exact teacher prompt (without reply prefix) followed by
    ``<question>Q</question>\\n<answer>\\boxed{A}</answer>``, so every prefill mode continues it.
    It learns the tags in a few dozen steps, the arithmetic never: answers are mostly wrong,
    which a teacher's answers may be. Deterministic for a seed. The weights are kept per
    process and in ``$SOAR_GYM_CACHE`` (default ``~/.cache/soar-gym``), so a new process
    (a resumed run, a test's subprocess) does not train them again; callers get copies.
    """
    import hashlib

    import torch
    import transformers

    from soar_env.models import build_tiny_model

    key = (topics, seed, steps)
    if key not in _TINY_FORMAT_CACHE:
        model, tokenizer = build_tiny_model(seed=seed)
        digest = hashlib.sha1(repr((key, transformers.__version__, torch.__version__)).encode()).hexdigest()[:16]
        path = _cache_dir() / f"tiny-format-{digest}.pt"
        state = None
        if path.is_file():
            try:
                state = torch.load(path, map_location="cpu", weights_only=True)
                model.load_state_dict(state)
            except Exception:  # noqa: BLE001 - a damaged cache file is rebuilt, never fatal
                state = None
        if state is None:
            _train_format(model, tokenizer, topics, seed, steps)
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
                torch.save(model.state_dict(), tmp)
                os.replace(tmp, path)
            except OSError:
                pass  # a read-only home only costs the retraining
        model.eval()
        for parameter in model.parameters():
            parameter.requires_grad_(False)
            parameter.grad = None
        _TINY_FORMAT_CACHE[key] = (model, tokenizer)
    model, tokenizer = _TINY_FORMAT_CACHE[key]
    return copy.deepcopy(model), copy.deepcopy(tokenizer)


def _train_format(model: Any, tokenizer: Any, topics: str, seed: int, steps: int) -> None:
    import torch

    from soar_env.data.generators import sample_problems

    prompt = tokenizer.apply_chat_template([{"role": "user", "content": teacher_prompt(topics)}], tokenize=False,
                                           add_generation_prompt=True)
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    rng = np.random.default_rng(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
        model.train()
        for _ in range(steps):
            batch = sample_problems(8, rng, families=("addition", "subtraction", "multiplication"), difficulty=(1, 2))
            rows = [prompt_ids + tokenizer(f"<question>{p.question}</question>\n<answer>\\boxed{{{p.answer}}}"
                                           "</answer>", add_special_tokens=False)["input_ids"]
                    + [tokenizer.eos_token_id] for p in batch]
            width = max(len(r) for r in rows)
            ids = torch.full((len(rows), width), tokenizer.pad_token_id)  # (B, L), right-padded
            labels = torch.full((len(rows), width), -100)  # loss on the reply only
            mask = torch.zeros((len(rows), width), dtype=torch.long)
            for i, row in enumerate(rows):
                ids[i, :len(row)] = torch.tensor(row)
                labels[i, len(prompt_ids):len(row)] = torch.tensor(row[len(prompt_ids):])
                mask[i, :len(row)] = 1
            loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    model.eval()
