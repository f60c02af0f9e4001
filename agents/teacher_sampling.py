"""Sampling the LLM teacher's outputs: prefill modes, parsing, and rejection sampling.

No learning here: `TeacherSampler` turns a policy and a `TeacherConfig` into parsed `Draft`s,
`rejection_sample` draws until enough are valid or the budget is spent, and `split_datasets`
makes the g datasets of (up to) n valid drafts that `RLOOTeacher` proposes.

Small models rarely follow the format, so ``prefill`` can force parts of the reply:
``"question"`` starts the reply with ``<question>``; ``"answer"`` adds a second stage that
closes the question and forces ``</question>\\n<answer>\\boxed{`` before sampling the answer
(with ``question_ends_at_newline`` the question also ends at its first line break).
Forced tokens are prompt, not sample: only sampled tokens get gradients, so the update stays an
on-policy policy gradient for the distribution the teacher actually samples from.

With ``constrain_answer`` both stages sample through token filters
(`soar_env.models.constrained`): the question may open no other tag (with ``question_form``, it
must have that form), the answer must be one of the benchmark's answer forms. Each draft keeps
the filter of each stage, so the update scores its tokens under the masks they were drawn with.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from agents.teacher_config import TeacherConfig
from soar_env.problems import Problem, Rejection, parse_teacher_output
from soar_env.prompts import QUESTION_FORMS, TEACHER_REPLY_PREFIX, teacher_prompt
from soar_env.verify.extract import text_before_closing_brace

ANSWER_PREFIX = "</question>\n<answer>\\boxed{"
"""What the second stage of ``prefill="answer"`` forces after the question."""

_DIGIT = re.compile(r"\d")


@dataclass
class Draft:
    """One sampled teacher output: the problem (or why not) and the sampled token rows."""

    text: str
    """The full reply as parsed, forced parts included."""
    result: Problem | Rejection
    rows: list[tuple[list[int], list[int]]] = field(default_factory=list)
    """(prompt ids, sampled completion ids) per stage: one row, two with prefill "answer"."""
    filters: list[Any] = field(default_factory=list)
    """The token filter each stage was sampled under (`soar_env.models.constrained.TokenFilter`),
    parallel to ``rows``; empty or None: sampled from the whole vocabulary."""

    def stage_filter(self, stage: int) -> Any:
        """The filter stage ``stage`` was sampled under, or None."""
        return self.filters[stage] if stage < len(self.filters) else None

    @property
    def ok(self) -> bool:
        return isinstance(self.result, Problem)

    @property
    def tokens(self) -> int:
        return sum(len(c) for _, c in self.rows)


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
    inner = text_before_closing_brace(answer_text)
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
        self.question_filter: Any = None
        self.answer_filter: Any = None
        if config.constrain_answer:
            # Built now: a tokenizer without a vocabulary fails at setup, not at the first step.
            from soar_env.models.constrained import (AnswerGrammar, QuestionGrammar, TokenFilter, Vocabulary,
                                                     question_form_grammar)

            vocabulary = Vocabulary.from_tokenizer(policy.tokenizer)
            eos = policy.eos_token_ids
            if config.question_form is not None:
                form, alphabet, answer_form = QUESTION_FORMS[config.question_form]
                question = question_form_grammar(form, alphabet, newline_ends=config.question_ends_at_newline)
                answer = AnswerGrammar(answer_form)
            else:
                question = QuestionGrammar(newline_ends=config.question_ends_at_newline)
                answer = AnswerGrammar()
            self.question_filter = TokenFilter(vocabulary, question, eos_token_ids=eos)
            self.answer_filter = TokenFilter(vocabulary, answer, eos_token_ids=eos)

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
        # Passed only when set, so samplers and test doubles without the argument still work unconstrained.
        question_filter = {} if self.question_filter is None else {"token_filter": self.question_filter}
        answer_filter = {} if self.answer_filter is None else {"token_filter": self.answer_filter}
        first = self.policy.sample([self.prompt], num_samples=count, temperature=config.temperature,
                                   max_new_tokens=config.max_new_tokens, stop=stops, seed=seed,
                                   batch_size=config.sample_batch_size, **question_filter)
        drafts: list[Draft] = []
        second_prompts: list[str] = []
        waiting: list[int] = []
        for prompt_ids, ids, text, stopped in zip(first.prompt_ids, first.completion_ids, first.texts, first.stopped):
            draft = Draft(self.prefix + text, Rejection("pending"), [(prompt_ids, list(ids))],
                          [self.question_filter])
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
                                        seed=seed + 1, batch_size=config.sample_batch_size, **answer_filter)
            for index, prompt_ids, ids, text in zip(waiting, second.prompt_ids, second.completion_ids, second.texts):
                draft = drafts[index]
                draft.rows.append((prompt_ids, list(ids)))
                draft.filters.append(self.answer_filter)
                question = question_part(draft.text[len(self.prefix):], newline=config.question_ends_at_newline)
                assembled = assemble_two_stage(question, text)
                if isinstance(assembled, Rejection):
                    draft.text = self.prefix + question + ANSWER_PREFIX + text
                    draft.result = assembled
                else:
                    draft.text = assembled
                    draft.result = self.parse(assembled)
        return drafts


@dataclass
class SampledDrafts:
    """What one round of rejection sampling drew."""

    valid: list[Draft]
    rejected: list[Draft]
    drawn: int
    """Raw outputs sampled, valid or not."""
    reasons: dict[str, int]
    """Rejected outputs per rejection reason."""
    acceptance_estimate: float
    """The running acceptance rate after this round (sizes the next round's first request)."""

    @property
    def tokens(self) -> int:
        return sum(d.tokens for d in self.valid) + sum(d.tokens for d in self.rejected)


def rejection_sample(sampler: TeacherSampler, need: int, budget: int, rng: np.random.Generator,
                     acceptance_estimate: float) -> SampledDrafts:
    """Sample until ``need`` drafts are valid or ``budget`` raw outputs are drawn.

    Each request asks for what the acceptance seen so far says is needed (never past the
    budget), so a teacher that writes the format half the time does not sample one at a time.
    """
    valid: list[Draft] = []
    rejected: list[Draft] = []
    drawn = 0
    reasons: dict[str, int] = {}
    while len(valid) < need and drawn < budget:
        missing = need - len(valid)
        count = min(budget - drawn, max(missing, math.ceil(missing / max(acceptance_estimate, 0.05))))
        drafts = sampler.sample(count, seed=int(rng.integers(2**31 - 1)))
        drawn += len(drafts)
        for draft in drafts:
            if draft.ok:
                valid.append(draft)
            else:
                rejected.append(draft)
                reason = getattr(draft.result, "reason", "rejected")
                reasons[reason] = reasons.get(reason, 0) + 1
        accepted_now = sum(d.ok for d in drafts) / max(len(drafts), 1)
        acceptance_estimate = 0.5 * acceptance_estimate + 0.5 * accepted_now
    return SampledDrafts(valid, rejected, drawn, reasons, acceptance_estimate)


def split_datasets(sampled: SampledDrafts, num_datasets: int, problems_per_dataset: int,
                   rng: np.random.Generator) -> list[list[Draft]]:
    """g datasets of valid drafts: n each, or as even as the valid drafts allow when too few.

    Rejected drafts never enter a dataset: they are not problems of the teacher's (rejection-
    sampled) policy, so they get no gradient (`agents.rloo_teacher.build_rollout` weighs the
    datasets instead). A short proposal is shuffled and dealt in sizes that differ by at most one,
    the larger sizes going to random datasets, so no dataset is empty unless fewer than g are valid.
    """
    need = num_datasets * problems_per_dataset
    chosen = sampled.valid[:need]
    if len(chosen) == need:
        return [chosen[k * problems_per_dataset:(k + 1) * problems_per_dataset] for k in range(num_datasets)]
    chosen = [chosen[int(i)] for i in rng.permutation(len(chosen))]
    base, extra = divmod(len(chosen), num_datasets)
    sizes = [base + int(k < extra) for k in range(num_datasets)]
    sizes = [sizes[int(i)] for i in rng.permutation(num_datasets)]
    bounds = np.cumsum([0, *sizes])
    return [chosen[bounds[k]:bounds[k + 1]] for k in range(num_datasets)]
