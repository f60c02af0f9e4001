"""Teacher output parsing and action validation: every rejection reason, valid outputs, and
malformed entries that must be rejected without raising."""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from typing import Any

import pytest

from soar_env.problems import (
    REJECTION_REASONS,
    Problem,
    Rejection,
    parse_teacher_output,
    to_problem,
)

LONG_QUESTION = "How many " + "very " * 1000 + "large numbers?"


def teacher(question: str = "What is $1+1$?", answer: str = r"\boxed{2}") -> str:
    return f"<question>{question}</question>\n<answer>{answer}</answer>"


# --------------------------------------------------------------------------------------------
# Valid teacher outputs
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "question", "answer"),
    [
        (teacher(), "What is $1+1$?", "2"),
        (teacher(answer=r"\boxed{\frac{1}{2}}"), "What is $1+1$?", r"\frac{1}{2}"),
        (teacher(answer=r"The answer is $\boxed{ 7 }$."), "What is $1+1$?", "7"),
        (teacher(answer=r"\boxed{\text{Monday}}"), "What is $1+1$?", r"\text{Monday}"),
        (teacher(answer=r"\boxed{(0, 1]}"), "What is $1+1$?", "(0, 1]"),
        (teacher(answer=r"\boxed{\{1, 2\}}"), "What is $1+1$?", r"\{1, 2\}"),
        (teacher(answer=r"\fbox{12}"), "What is $1+1$?", "12"),
        (teacher(answer=r"\boxed{\boxed{2}}"), "What is $1+1$?", "2"),  # the last box is the answer
        (teacher("\n  Line one.\n\tLine two?\n"), "Line one.\n\tLine two?", "2"),
        ("Sure! Here is a problem.\n" + teacher() + "\nHope it helps.", "What is $1+1$?", "2"),
        ("<QUESTION>Find x if 2x = 6.</Question><Answer>\\boxed{3}</ANSWER>", "Find x if 2x = 6.", "3"),
    ],
)
def test_valid_teacher_output(text: str, question: str, answer: str) -> None:
    problem = parse_teacher_output(text)
    assert isinstance(problem, Problem), problem
    assert (problem.question, problem.answer, problem.source) == (question, answer, "teacher")
    assert problem.id.startswith("teacher-")


def test_source_and_limit_are_settings() -> None:
    problem = parse_teacher_output(teacher(), source="teacher:step3")
    assert isinstance(problem, Problem) and problem.source == "teacher:step3"
    assert parse_teacher_output(teacher(LONG_QUESTION), max_question_chars=10_000).__class__ is Problem


def test_same_text_same_id() -> None:
    first, second = parse_teacher_output(teacher()), parse_teacher_output(teacher())
    assert isinstance(first, Problem) and first == second and first.id == second.id


# --------------------------------------------------------------------------------------------
# Every rejection reason
# --------------------------------------------------------------------------------------------


class _HostileMapping(Mapping):
    """A mapping whose lookups blow up, as user code sometimes does."""

    def __getitem__(self, key: str) -> Any:
        raise RuntimeError("boom")

    def __contains__(self, key: object) -> bool:
        raise RuntimeError("boom")

    def __iter__(self) -> Iterator[str]:
        return iter(())

    def __len__(self) -> int:
        return 0


TEACHER_REJECTIONS = [  # (text, reason)
    ("", "empty"),
    ("   \n\t ", "empty"),
    ("What is 1+1? \\boxed{2}", "missing_question_tag"),
    ("<question>What is 1+1? <answer>\\boxed{2}</answer>", "missing_question_tag"),
    ("</question><answer>\\boxed{2}</answer>", "missing_question_tag"),
    (teacher() + "\n" + teacher("What is 2+2?", r"\boxed{4}"), "multiple_questions"),
    ("<question>What is 1+1?</question>", "missing_answer_tag"),
    ("<answer>\\boxed{2}</answer><question>What is 1+1?</question>", "missing_answer_tag"),
    ("<question>What is 1+1?</question><answer>\\boxed{2}", "missing_answer_tag"),
    ("<question>What is 1+1?</question><answer>\\boxed{2}</answer><answer>\\boxed{3}</answer>", "multiple_answers"),
    (teacher("   "), "empty_question"),
    (teacher(LONG_QUESTION), "too_long"),
    (teacher(answer="2"), "missing_box"),
    (teacher(answer=r"\boxed{final answer}"), "placeholder"),
    (teacher(answer=r"\boxed{\text{Final Answer}}"), "placeholder"),
    (teacher(question="the problem"), "placeholder"),
    (teacher(answer=r"\boxed{2"), "missing_box"),
    (teacher(answer=r"\boxed{}"), "empty_answer"),
    (teacher(answer=r"\boxed{  }"), "empty_answer"),
    (teacher(answer=r"\boxed{" + "1" * 600 + "}"), "answer_too_long"),
    (teacher(answer=r"\boxed{x+}"), "unparsable_answer"),
    (teacher(answer=r"\boxed{???}"), "unparsable_answer"),
    (teacher("What is 1+1?\x07"), "control_characters"),
    (teacher(answer="\\boxed{2\x00}"), "control_characters"),
    (teacher("What is 1+1?\ud800"), "invalid_unicode"),
    (None, "wrong_type"),
    (b"<question>q</question>", "wrong_type"),
]

ENTRY_REJECTIONS = [  # (entry, reason)
    (None, "wrong_type"),
    (42, "wrong_type"),
    ("What is 1+1?", "wrong_type"),
    (("What is 1+1?",), "wrong_length"),
    (("What is 1+1?", "2", "extra"), "wrong_length"),
    ({"question": "What is 1+1?"}, "missing_field"),
    ({"question": 1, "answer": "2"}, "not_string"),
    (("", "2"), "empty_question"),
    (("What is 1+1?", " "), "empty_answer"),
    (("q" * 5000, "2"), "too_long"),
    (("What is 1+1?", "2" * 600), "answer_too_long"),
    (("What is 1+1?", r"\boxed{2} or \boxed{3}"), "nested_box"),
    (("What\x1b is 1+1?", "2"), "control_characters"),
    (("What is 1+1?", "2\udcff"), "invalid_unicode"),
    (_HostileMapping(), "internal_error"),
]


@pytest.mark.parametrize(("text", "reason"), TEACHER_REJECTIONS)
def test_teacher_rejections(text: Any, reason: str) -> None:
    result = parse_teacher_output(text)
    assert isinstance(result, Rejection), result
    assert result.reason == reason, result
    assert result.detail
    json.dumps(result.to_dict())  # loggable: no lone surrogates, bounded size
    assert len(result.text) <= 310


@pytest.mark.parametrize(("entry", "reason"), ENTRY_REJECTIONS)
def test_entry_rejections(entry: Any, reason: str) -> None:
    result = to_problem(entry)
    assert isinstance(result, Rejection) and result.reason == reason, result


def test_every_reason_is_documented_and_exercised() -> None:
    exercised = {reason for _, reason in TEACHER_REJECTIONS + ENTRY_REJECTIONS}
    assert exercised == set(REJECTION_REASONS)


def test_require_parsable_entries() -> None:
    rejected = to_problem(("What is 1+1?", "x+"), require_parsable=True)
    assert isinstance(rejected, Rejection) and rejected.reason == "unparsable_answer"
    assert isinstance(to_problem(("What is 1+1?", "2"), require_parsable=True), Problem)


# --------------------------------------------------------------------------------------------
# to_problem: accepted forms and a flood of malformed ones
# --------------------------------------------------------------------------------------------


def test_to_problem_accepts_the_three_forms() -> None:
    expected = ("What is 1+1?", "2", "action")
    for entry in [("What is 1+1?", "2"), ["What is 1+1?", "2"], {"question": "What is 1+1?", "answer": "2"}]:
        problem = to_problem(entry)
        assert isinstance(problem, Problem)
        assert (problem.question, problem.answer, problem.source) == expected
    assert to_problem(("What is 1+1?", "2"), source="env").source == "env"  # type: ignore[union-attr]


def test_to_problem_keeps_a_valid_problem_and_unboxes_answers() -> None:
    original = Problem("What is 1+1?", "2", source="math500", id="m-1", meta={"level": 1})
    assert to_problem(original) is original
    boxed = to_problem(Problem("What is 1+1?", r"\boxed{2}", source="math500", id="m-2"))
    assert isinstance(boxed, Problem)
    assert (boxed.answer, boxed.source, boxed.id) == ("2", "math500", "m-2")
    assert to_problem(("What is 1+1?", r"\boxed{\frac{1}{2}}")).answer == r"\frac{1}{2}"  # type: ignore[union-attr]


class _BadRepr:
    def __repr__(self) -> str:
        raise RuntimeError("no repr for you")


class _StrSubclass(str):
    pass


_recursive: list[Any] = []
_recursive.append(_recursive)

MALFORMED = [
    None, 0, -1, 3.5, float("nan"), True, b"What is 1+1?", bytearray(b"xy"), "What is 1+1?", "",
    object(), _BadRepr(), (), [], [None], ("q",), ("q", "a", "b"), {"q", "a"}, frozenset(),
    {}, {"question": "What is 1+1?"}, {"answer": "2"}, {"question": None, "answer": "2"},
    {"question": "What is 1+1?", "answer": 2}, {"question": ["q"], "answer": "2"}, (b"q", b"2"),
    (1, 2), (None, None), ("", ""), ("   ", "2"), ("What is 1+1?", ""), ("\x00", "2"),
    ("What is 1+1?", "2\r3"), ("What is 1+1?", "\x85"), ("q\ud83d", "2"), ("x" * 1_000_000, "2"),
    ("What is 1+1?", "9" * 10_000), ("What is 1+1?", r"\boxed{\boxed{2}}"), _recursive,
    list(range(10_000)), (x for x in ("q", "2")), _HostileMapping(), {"question": _BadRepr(), "answer": "2"},
    (_StrSubclass("What is 1+1?"), 2), Problem("", "2"), Problem("What is 1+1?", "\x00"),
]


@pytest.mark.parametrize("entry", MALFORMED, ids=[f"entry{i}" for i in range(len(MALFORMED))])
def test_to_problem_never_raises(entry: Any) -> None:
    result = to_problem(entry)
    assert isinstance(result, Rejection), result
    assert result.reason in REJECTION_REASONS
    json.dumps(result.to_dict())
    assert len(result.text) <= 310


def test_enough_malformed_entries() -> None:
    assert len(MALFORMED) >= 30


def test_a_str_subclass_is_still_text() -> None:
    problem = to_problem((_StrSubclass("What is 1+1?"), _StrSubclass("2")))
    assert isinstance(problem, Problem) and type(problem.question) is str
