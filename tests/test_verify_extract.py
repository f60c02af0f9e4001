"""Answer extraction: the last box, the plain-text fallback and brace matching, all pure string
work that runs in the caller (no grading worker needed)."""

from __future__ import annotations

import time

import pytest

from soar_env.verify import extract_answer, extract_boxed
from soar_env.verify.extract import text_before_closing_brace


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (r"\boxed{5}", "5"),
        (r"a \boxed{1} b \boxed{2}", "2"),
        (r"\boxed{\frac{1}{2}}", r"\frac{1}{2}"),
        (r"\boxed{\{1, 2\}}", r"\{1, 2\}"),
        (r"\boxed{\left\{ x \right.}", r"\left\{ x \right."),
        (r"\fbox{3}", "3"),
        (r"\boxed 5.", "5"),
        (r"\boxed {7}", "7"),
        (r"\boxed{}", ""),
        (r"\boxed{1} then \boxed{2", "1"),
        (r"\boxedx{1}", None),
        ("no box", None),
        ("\\boxed{" * 1000, None),
    ],
)
def test_extract_boxed(text: str, expected: str | None) -> None:
    assert extract_boxed(text) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [("42}</answer>", "42"), (r"\frac{1}{2}} junk", r"\frac{1}{2}"), (r"\{x\}}", r"\{x\}"), ("7 + ", None)],
)
def test_text_before_closing_brace(text: str, expected: str | None) -> None:
    assert text_before_closing_brace(text) == expected


def test_extract_boxed_is_linear_on_huge_input() -> None:
    start = time.perf_counter()
    assert extract_boxed("\\boxed{" * 200_000) is None
    assert extract_boxed("x" * 2_000_000 + r"\boxed{1}") == "1"
    assert time.perf_counter() - start < 2.0


def test_extract_answer_reports_how() -> None:
    assert extract_answer(r"\boxed{1}") == ("1", "boxed")
    assert extract_answer("1") == (None, "none")
    assert extract_answer("x is 1", require_box=False) == ("1", "fallback")
