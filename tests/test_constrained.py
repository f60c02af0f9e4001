"""Constrained decoding: the grammars, the token filter, both samplers, on-policy scoring, the teacher.

    python -m pytest tests/test_constrained.py -q
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from agents import RLOOTeacher, make_teacher_config
from agents.rloo_teacher import build_rollout
from agents.teacher_sampling import TeacherSampler
from soar_env.config import make_config
from soar_env.data.hardset import hard_splits
from soar_env.models import LMPolicy
from soar_env.models.constrained import (AnswerGrammar, Grammar, QuestionGrammar, TokenFilter, Vocabulary,
                                         question_form_grammar)
from soar_env.models.decoding import SampleOptions
from soar_env.models.fast_decode import _inverse_cdf, decode_rows
from soar_env.prompts import QUESTION_FORMS
from soar_env.verify import answer_parses

pytestmark = pytest.mark.usefixtures("one_thread")

ANSWER_PROMPT = "<question>What is 2 + 3?</question>\n<answer>\\boxed{"


@pytest.fixture(scope="module")
def policy(lora_policy) -> LMPolicy:
    """The conftest's LoRA policy with adapters far from zero: the adapters matter in sampling and scoring."""
    return lora_policy


@pytest.fixture(scope="module")
def vocabulary(policy) -> Vocabulary:
    return Vocabulary.from_tokenizer(policy.tokenizer)


@pytest.fixture(scope="module")
def answer(policy, vocabulary) -> TokenFilter:
    return TokenFilter(vocabulary, AnswerGrammar(), eos_token_ids=policy.eos_token_ids)


def state_of(grammar: Grammar, text: str):
    return grammar.advance(grammar.start, text)


# ----------------------------------------------------------------------------------------------
# grammars


@pytest.mark.parametrize("text", ["12}", "0}", "-7}", "0.25}", "27/140}", "-1/8}", "\\frac{3}{4}}",
                                  "-\\frac{\\sqrt{3}}{2}}", "3\\pi}", "2\\sqrt{5}}", "2^{10}}", "10^{-3}}",
                                  "5}</answer>"])
def test_answer_grammar_completes_the_benchmark_forms(text):
    grammar = AnswerGrammar()
    state = state_of(grammar, text)
    assert state is not None and grammar.can_end(state)
    assert answer_parses(text.split("}</answer>")[0].removesuffix("}"))


@pytest.mark.parametrize("text", ["result", "final answer", "01", "1/0", "1}}", "12} ", "\\boxed{", "x", "1 2"])
def test_answer_grammar_refuses_words_and_malformed_numbers(text):
    assert state_of(AnswerGrammar(), text) is None


@pytest.mark.parametrize("text", ["", "-", "12", "\\fr", "\\frac{3}{", "2\\sqrt{", "7}</ans"])
def test_answer_prefixes_are_alive_but_not_finished(text):
    grammar = AnswerGrammar()
    state = state_of(grammar, text)
    assert state is not None and not grammar.can_end(state)


def test_every_answer_of_the_cpu_hard_set_is_in_the_grammar():
    """The grammar is built for the target benchmark: none of its answers is out of reach."""
    train, test = hard_splits(make_config("cpu"))
    grammar = AnswerGrammar()
    assert all(grammar.can_end(state_of(grammar, p.answer + "}") or "") for p in train + test)


@pytest.mark.parametrize("text, alive, can_end", [
    ("What is 2 < 3?", True, True),
    ("x<5 and y > 2", True, True),
    ("What is 2?</question>", True, True),
    ("What is 2?</que", True, False),
    ("   ", True, False),
    ("</question>", False, False),
    ("What?<answer>", False, False),
    ("What?</answer>", False, False),
    ("<question>What?", False, False),
    ("What\x01is", False, False),
])
def test_question_grammar_opens_no_tag_and_is_never_empty(text, alive, can_end):
    grammar = QuestionGrammar()
    state = state_of(grammar, text)
    assert (state is not None) == alive
    if alive:
        assert grammar.can_end(state) == can_end


def test_question_ending_at_a_line_break_needs_content():
    grammar = QuestionGrammar(newline_ends=True)
    assert state_of(grammar, "\n") is None and state_of(grammar, "  \nWhat") is None
    assert state_of(grammar, "What is 3?\nAnd") is not None
    assert state_of(QuestionGrammar(), "\nWhat is 3?") is not None  # without newline_ends a line break is text


# ----------------------------------------------------------------------------------------------
# the token filter


def test_filter_allows_what_keeps_the_text_in_the_grammar(policy, answer, vocabulary):
    tokenizer = policy.tokenizer
    start = answer.allowed([]).tolist()
    texts = [vocabulary.texts[i] for i in start]
    assert "1" in texts and "-" in texts and "\\" in texts and "}" not in texts
    assert not set(start) & set(policy.eos_token_ids)  # an empty answer cannot end
    closed = answer.allowed(tokenizer("12}", add_special_tokens=False)["input_ids"]).tolist()
    assert set(policy.eos_token_ids) <= set(closed)
    eos = policy.eos_token_ids
    assert all(AnswerGrammar().advance("12}", vocabulary.texts[i]) is not None for i in closed if i not in eos)
    # Deterministic: the set depends on the text only, however it was tokenised.
    one_by_one = [tokenizer(c, add_special_tokens=False)["input_ids"][0] for c in "42"]
    merged = tokenizer("42", add_special_tokens=False)["input_ids"]
    assert torch.equal(answer.allowed(one_by_one), answer.allowed(merged))


def test_a_question_cannot_end_before_it_says_something(policy, vocabulary):
    question = TokenFilter(vocabulary, QuestionGrammar(newline_ends=True), eos_token_ids=policy.eos_token_ids)
    newline = policy.tokenizer("\n", add_special_tokens=False)["input_ids"]
    for generated in ([], policy.tokenizer("  ", add_special_tokens=False)["input_ids"]):
        allowed = set(question.allowed(generated).tolist())
        assert not allowed & set(policy.eos_token_ids) and not allowed & set(newline)
    said = set(question.allowed(policy.tokenizer("What is 2?", add_special_tokens=False)["input_ids"]).tolist())
    assert set(policy.eos_token_ids) <= said and set(newline) <= said


def test_a_dead_text_may_only_end(policy, answer):
    dead = policy.tokenizer("the answer", add_special_tokens=False)["input_ids"]
    assert answer.allowed(dead).tolist() == sorted(policy.eos_token_ids)


def test_tokenizer_without_vocabulary_fails_clearly():
    with pytest.raises(ValueError, match="tokenizer with a vocabulary"):
        Vocabulary.from_tokenizer(object())


def test_mask_pads_a_wider_output_head(answer, vocabulary):
    mask = answer.mask([[]], len(vocabulary) + 7)
    assert mask.shape == (1, len(vocabulary) + 7) and not mask[0, len(vocabulary):].any()


# ----------------------------------------------------------------------------------------------
# sampling


def test_masked_inverse_cdf_draws_the_renormalised_softmax():
    logits = torch.tensor([[2.0, 0.5, -1.0, 1.0, 3.0, 0.0]])
    allowed = torch.tensor([[True, False, True, True, False, False]])
    draws = 20_000
    uniforms = (torch.arange(draws, dtype=torch.float64) + 0.5) / draws  # a perfect quantile grid
    tokens = _inverse_cdf(logits.expand(draws, -1), uniforms, 0.7, block=4, allowed=allowed.expand(draws, -1))
    counts = torch.bincount(tokens, minlength=6).double() / draws
    expected = torch.softmax((logits / 0.7).masked_fill(~allowed, float("-inf")), -1)[0].double()
    assert torch.allclose(counts, expected, atol=2 / draws)


class AllowAll:
    """A filter whose mask allows every token of the output head (special tokens included)."""

    def mask(self, rows, width, device="cpu"):
        return torch.ones(len(rows), width, dtype=torch.bool, device=device)


def test_an_all_allowing_mask_changes_no_token(policy):
    """Masking itself leaves the distribution alone: rows decode as without a filter, bit for bit."""
    everything = AllowAll()
    prompt = policy.encode(policy.chat_prompt("Write a problem."))
    free = decode_rows(policy.model, [prompt], samples=[6], max_new_tokens=10, seed=3, tokenizer=policy.tokenizer)
    masked = decode_rows(policy.model, [prompt], samples=[6], max_new_tokens=10, seed=3, tokenizer=policy.tokenizer,
                         token_filter=everything)
    assert free == masked


@pytest.mark.parametrize("engine", ["fast_decode", "generate"])
def test_constrained_rows_stay_in_the_grammar(policy, answer, engine):
    saved = policy.fast_decode
    policy.fast_decode = None if engine == "generate" else saved
    try:
        rollout = policy.sample([policy.chat_prompt("Write a problem.") + ANSWER_PROMPT], num_samples=12,
                                max_new_tokens=10, stop=["</answer>"], seed=0, token_filter=answer)
    finally:
        policy.fast_decode = saved
    grammar = AnswerGrammar()
    assert all(state_of(grammar, text) is not None for text in rollout.texts)
    assert any(grammar.can_end(state_of(grammar, text)) for text in rollout.texts)


def test_greedy_constrained_rows_agree_between_the_two_samplers(policy, answer):
    prompt = policy.chat_prompt("Write a problem.") + ANSWER_PROMPT
    saved = policy.fast_decode
    fast = policy.sample([prompt], greedy=True, max_new_tokens=8, token_filter=answer)
    policy.fast_decode = None
    try:
        reference = policy.sample([prompt], greedy=True, max_new_tokens=8, token_filter=answer)
    finally:
        policy.fast_decode = saved
    assert fast.completion_ids == reference.completion_ids


def test_samplers_that_cannot_filter_refuse_a_filter(policy, answer):
    class Other:
        def sample(self, prompts, **kwargs):
            raise AssertionError("a filter must not reach a sampler that ignores it")

    policy.sampler = Other()
    try:
        with pytest.raises(ValueError, match="token_filter"):
            policy.sample(["x"], token_filter=answer)
    finally:
        policy.sampler = None
    assert "token_filter" not in SampleOptions(1, 1.0, 4, None, False, 0, 8).as_kwargs()


# ----------------------------------------------------------------------------------------------
# scoring: on-policy under the same masks


def masked_logprobs(policy: LMPolicy, prompt: list[int], completion: list[int], token_filter: TokenFilter | None,
                    temperature: float) -> torch.Tensor:
    """Log-probs of ``completion`` from one plain forward pass over prompt + completion, masked by hand."""
    with torch.no_grad():
        logits = policy.model(input_ids=torch.tensor([prompt + completion])).logits[0].float()  # (P+T, V)
    logits = logits[len(prompt) - 1 : len(prompt) - 1 + len(completion)] / temperature  # (T, V): predictors
    if token_filter is not None:
        allowed = token_filter.prefix_mask(completion, logits.shape[-1])
        logits = logits.masked_fill(~allowed, float("-inf"))
    return torch.log_softmax(logits, -1).gather(1, torch.tensor(completion)[:, None])[:, 0]


def test_scoring_under_the_filter_is_the_sampling_distribution(policy, answer):
    temperature = 0.8
    rollout = policy.sample([policy.chat_prompt("Write a problem.") + ANSWER_PROMPT], num_samples=6,
                            max_new_tokens=8, stop=["</answer>"], seed=1, temperature=temperature, token_filter=answer)
    rows = len(rollout.completion_ids)
    filters = [answer if i % 2 == 0 else None for i in range(rows)]  # mixed: constrained and free rows
    with torch.no_grad():
        scored, mask = policy.token_logprobs(rollout.prompt_ids, rollout.completion_ids, temperature=temperature,
                                             token_filters=filters)
        free, _ = policy.token_logprobs(rollout.prompt_ids, rollout.completion_ids, temperature=temperature)
        unfiltered, _ = policy.token_logprobs(rollout.prompt_ids, rollout.completion_ids, temperature=temperature,
                                              token_filters=[None] * rows)
    assert torch.equal(free, unfiltered)  # without a filter nothing changes
    for i, (prompt, completion) in enumerate(zip(rollout.prompt_ids, rollout.completion_ids)):
        expected = masked_logprobs(policy, prompt, completion, filters[i], temperature)
        assert torch.allclose(scored[i, : len(completion)], expected, atol=1e-4)
        if filters[i] is not None and completion:
            assert (scored[i, : len(completion)] > free[i, : len(completion)]).all()  # renormalised: higher


# ----------------------------------------------------------------------------------------------
# the teacher


def tiny_teacher_config(**overrides):
    return make_teacher_config("tiny", seed=0, lora=True, lora_rank=4, lora_alpha=8, constrain_answer=True, **overrides)


def test_setting_is_off_in_the_paper_and_needs_the_answer_prefill():
    from agents.teacher_config import TeacherConfig

    assert TeacherConfig().constrain_answer is False and make_teacher_config("paper").constrain_answer is False
    with pytest.raises(ValueError, match="prefill 'answer'"):
        make_teacher_config("paper", constrain_answer=True)


def test_teacher_without_a_usable_tokenizer_fails_at_setup():
    class NoVocabulary:
        tokenizer = object()
        eos_token_ids = [2]

        def chat_prompt(self, user, reply_prefix=""):
            return user + reply_prefix

    with pytest.raises(ValueError, match="tokenizer with a vocabulary"):
        TeacherSampler(NoVocabulary(), tiny_teacher_config())


def test_constrained_teacher_drafts_and_a_too_short_answer_is_a_rejection():
    teacher = RLOOTeacher(tiny_teacher_config(answer_max_new_tokens=1))
    drafts = teacher.sampler.sample(16, seed=0)
    answered = [d for d in drafts if len(d.rows) == 2]
    assert answered and all(d.filters == [teacher.sampler.question_filter, teacher.sampler.answer_filter]
                            for d in answered)
    assert {getattr(d.result, "reason", "ok") for d in answered} <= {"ok", "unfinished_answer"}
    assert any(getattr(d.result, "reason", "") == "unfinished_answer" for d in answered)


def test_teacher_update_scores_each_stage_under_its_sampling_mask():
    config = tiny_teacher_config(max_attempts=3.0, kl_coef=0.0)
    teacher = RLOOTeacher(config)
    teacher.propose(2, 2)
    datasets = teacher.last_drafts()
    policy = teacher.policy
    calls = []
    original = policy.token_logprobs

    def spy(prompt_ids, completion_ids, **kwargs):
        result = original(prompt_ids, completion_ids, **kwargs)
        calls.append((prompt_ids, completion_ids, kwargs, result[0].detach().clone()))
        return result

    policy.token_logprobs = spy
    try:
        before = {k: v.clone() for k, v in policy.state_dict_trainable().items()}
        stats = teacher.update(np.array([0.05, -0.05]), [])
    finally:
        del policy.token_logprobs
    assert stats["update_skipped"] == 0.0 and calls
    row_filters: list = []
    rollout, _, _ = build_rollout(datasets, np.zeros(2), row_filters=row_filters)
    assert any(f is teacher.sampler.question_filter for f in row_filters)
    assert any(f is teacher.sampler.answer_filter for f in row_filters)
    checked = 0
    with torch.no_grad():
        policy.load_state_dict_trainable(before)  # the weights the update scored with
        for prompt_ids, completion_ids, kwargs, scored in calls:
            assert len(kwargs["token_filters"]) == len(completion_ids)
            for i, (prompt, completion, token_filter) in enumerate(zip(prompt_ids, completion_ids,
                                                                        kwargs["token_filters"])):
                if completion:
                    expected = masked_logprobs(policy, list(prompt), list(completion), token_filter, config.temperature)
                    assert torch.allclose(scored[i, : len(completion)], expected, atol=1e-4)
                    checked += 1
    assert checked >= 4


def test_the_updater_refuses_filters_that_do_not_match_its_rows(policy, answer):
    from soar_env.rl import RLOOConfig, RLOOUpdater

    rollout = policy.sample([policy.chat_prompt("Write a problem.") + ANSWER_PROMPT], num_samples=2,
                            max_new_tokens=4, seed=0, token_filter=answer)
    updater = RLOOUpdater(policy.trainable_parameters(), RLOOConfig(), total_steps=1)
    with pytest.raises(ValueError, match="1 token filters for 2 completions"):
        updater.update(policy, rollout, [1.0, 0.0], group_size=2, token_filters=[answer])

def test_row_states_advance_incrementally_as_the_whole_text_would(policy, vocabulary):
    """The filter extends a row's text token by token; it must equal decoding the whole row at every
    prefix, multi-byte characters (pieces decoded as U+FFFD) and tags included."""
    tokenizer = policy.tokenizer
    ids = tokenizer.encode("Compute 3 ? x , y . été 中文 \\frac{1}{2} <b> done ! </question>", add_special_tokens=False)
    grammar = QuestionGrammar()
    token_filter = TokenFilter(vocabulary, grammar, eos_token_ids=policy.eos_token_ids)
    for t in range(len(ids) + 1):
        assert token_filter.state(ids[:t]) == grammar.advance(grammar.start, vocabulary.decode(ids[:t])), t


# ----------------------------------------------------------------------------------------------
# the question form


def arithmetic_form(newline_ends: bool = True):
    form, alphabet, _ = QUESTION_FORMS["arithmetic"]
    return question_form_grammar(form, alphabet, newline_ends=newline_ends)


def test_every_question_of_the_cpu_hard_set_has_the_arithmetic_form():
    train, test = hard_splits(make_config("cpu"))
    grammar = arithmetic_form()
    assert all(grammar.can_end(state_of(grammar, p.question) or "") for p in train + test)


@pytest.mark.parametrize("text, alive, can_end", [
    ("What is 12 + 7?", True, True), ("What is 12 + 7?\n", True, True), ("What is 3 × 40?</question>", True, True),
    ("What is 12", True, False), ("What", True, False), ("What is x", False, False), ("The multiverse", False, False),
    ("What is 012 + 7?", False, False), ("What is 12 + 7? And", False, False), ("What is 12345 + 1?", False, False),
])
def test_the_arithmetic_form_keeps_the_question_to_what_is_a_op_b(text, alive, can_end):
    grammar = arithmetic_form()
    state = state_of(grammar, text)
    assert (state is not None) == alive and (alive and grammar.can_end(state)) == can_end


def test_question_form_needs_constrained_decoding_and_a_known_name():
    assert make_teacher_config("paper").question_form is None and make_teacher_config("cpu").question_form is None
    with pytest.raises(ValueError, match="constrain_answer"):
        make_teacher_config("cpu", question_form="arithmetic", constrain_answer=False)
    with pytest.raises(ValueError, match="question_form must be one of"):
        make_teacher_config("cpu", question_form="geometry")


def test_a_teacher_with_the_question_form_writes_only_that_form():
    teacher = RLOOTeacher(tiny_teacher_config(question_form="arithmetic"))
    drafts = teacher.sampler.sample(32, seed=0)
    grammar = arithmetic_form()
    accepted = [d.result for d in drafts if d.ok]
    assert accepted and all(grammar.can_end(state_of(grammar, p.question) or "") for p in accepted)
    assert all(p.answer.lstrip("-").isdigit() for p in accepted)  # the form's answers are integers
    assert all(d.filters[0] is teacher.sampler.question_filter for d in drafts)


def test_the_hard_sets_answers_fit_the_arithmetic_forms_answers():
    train, test = hard_splits(make_config("cpu"))
    grammar = AnswerGrammar(QUESTION_FORMS["arithmetic"][2])
    assert all(grammar.can_end(state_of(grammar, p.answer + "}") or "") for p in train + test)


@pytest.mark.embedded
def test_the_embedded_tokenizer_can_write_every_operator_of_the_arithmetic_form(embedded):
    _, tokenizer = embedded
    vocabulary = Vocabulary.from_tokenizer(tokenizer)
    question = TokenFilter(vocabulary, arithmetic_form(), eos_token_ids=[tokenizer.eos_token_id])
    prefix = tokenizer("What is 12", add_special_tokens=False)["input_ids"]
    texts = {vocabulary.texts[int(i)] for i in question.allowed(prefix)}
    assert {" +", " -", " ×"} <= {t[:2] for t in texts}, sorted(texts)[:20]
