"""Procedural generators: reproducible, difficulty-ordered, and every answer right.

Answers are re-derived here from the question text (or meta) with plain Python ints and
`fractions.Fraction`, never through the generators' own sympy code path.
"""

from __future__ import annotations

import json
import math
import re
from fractions import Fraction

import numpy as np
import pytest
import sympy
from math_verify import parse, verify

from soar_env.data.generators import (
    FAMILIES,
    MAX_DIFFICULTY,
    MIN_DIFFICULTY,
    WORD_TEMPLATES,
    generate,
    render,
    sample_problems,
)
from soar_env.problems import Problem

LEVELS = range(MIN_DIFFICULTY, MAX_DIFFICULTY + 1)
SAMPLES = 50
ANSWER_FORM = re.compile(r"-?\d+(/\d+)?")


def _samples(family: str, difficulty: int, seed: int = 0) -> list[Problem]:
    rng = np.random.default_rng(seed)
    return [generate(family, rng, difficulty) for _ in range(SAMPLES)]


# --- independent recomputation, one function per family ---------------------------------

def _eval_arithmetic(expression: str) -> Fraction:
    """Evaluate ``3 + 4 × (2 - 1)`` or ``1/2 - 3/4 × 2/5`` exactly with Python's parser."""
    assert re.fullmatch(r"[\d\s+\-×/()]+", expression), expression
    python = re.sub(r"(\d+)/(\d+)", r"Fraction(\1, \2)", expression.replace("×", "*"))
    return Fraction(eval(python, {"Fraction": Fraction, "__builtins__": {}}))


def _parse_linear(side: str) -> tuple[int, int]:
    """``"-3x + 7"`` -> (-3, 7)."""
    coefficient, constant = 0, 0
    for sign, number, has_x in re.findall(r"([+-]?)\s*(\d*)(x?)", side.replace(" ", "")):
        if not number and not has_x:
            continue
        value = int(number) if number else 1
        value = -value if sign == "-" else value
        if has_x:
            coefficient += value
        else:
            constant += value
    return coefficient, constant


def _parse_polynomial(text: str) -> dict[int, int]:
    """``"2x^3 - x + 4"`` -> {3: 2, 1: -1, 0: 4}."""
    terms: dict[int, int] = {}
    for sign, number, x, power in re.findall(r"([+-]?)(\d*)(x?)(?:\^(\d+))?", text.replace(" ", "")):
        if not number and not x:
            continue
        value = int(number) if number else 1
        degree = (int(power) if power else 1) if x else 0
        terms[degree] = terms.get(degree, 0) + (-value if sign == "-" else value)
    return terms


def _word_answer(problem: Problem) -> Fraction:
    q = problem.meta["quantities"]
    for value in q.values():  # every quantity used is one the reader is told (or 0 = unused)
        assert value == 0 or re.search(rf"(?<!\d){value}(?!\d)", problem.question), (value, problem.question)
    template = problem.meta["template"]
    if template == "shopping":
        return Fraction(q["n1"] * q["p1"] + q.get("n2", 0) * q.get("p2", 0))
    if template == "change":
        return Fraction(q["paid"] - q["n"] * q["p"])
    if template == "distance":
        return Fraction(q["v1"] * q["t1"] + q.get("v2", 0) * q.get("t2", 0))
    if template == "travel_time":
        return Fraction(q["distance"], q["speed"])
    if template == "ages":
        return Fraction(q["younger"] + q["gap"] + q.get("years", 0))
    if template == "sharing":
        return Fraction(q["total"] - q["kept"], q["friends"])
    assert template == "stock"
    return Fraction(q["start"] - q["given"] + q["bought"])


def independent_answer(problem: Problem) -> Fraction:
    family, question = problem.meta["family"], problem.question
    if family in ("addition", "subtraction", "multiplication", "order_of_operations"):
        (expression,) = re.fullmatch(r"What is (.+)\?", question).groups()
        return _eval_arithmetic(expression)
    if family == "fraction":
        (expression,) = re.fullmatch(r"What is (.+)\? Give the answer as a reduced fraction\.", question).groups()
        return _eval_arithmetic(expression)
    if family == "linear_equation":
        left, right = re.fullmatch(r"Solve for x: (.+) = (.+)\.", question).groups()
        (a, b), (c, e) = _parse_linear(left), _parse_linear(right)
        assert a != c
        return Fraction(e - b, a - c)
    if family == "gcd_lcm":
        kind, listed = re.fullmatch(r"What is the (greatest common divisor|least common multiple) of (.+)\?",
                                    question).groups()
        numbers = [int(n) for n in re.findall(r"\d+", listed)]
        return Fraction(math.gcd(*numbers) if kind.startswith("greatest") else math.lcm(*numbers))
    if family == "modular":
        shown, m = re.fullmatch(r"What is the remainder when (.+) is divided by (\d+)\?", question).groups()
        m = int(m)
        if "^" in shown:
            a, b = (int(v) for v in shown.split("^"))
            return Fraction(pow(a, b, m))
        factors = [int(v) for v in shown.split("×")]
        return Fraction(math.prod(factors) % m)
    if family == "polynomial_roots":
        ask, polynomial = re.fullmatch(r"What is the (larger|smaller|largest|smallest) root of (.+) = 0\?",
                                       question).groups()
        terms = _parse_polynomial(polynomial)
        # Roots were built as small distinct integers, so a search finds all of them.
        roots = [r for r in range(-60, 61) if sum(c * r**k for k, c in terms.items()) == 0]
        assert len(roots) == max(terms), (question, roots)
        return Fraction(max(roots) if ask in ("larger", "largest") else min(roots))
    if family == "word_problem":
        return _word_answer(problem)
    raise AssertionError(f"no independent check for family {family!r}")


# --- tests ---------------------------------------------------------------------------------

def test_every_family_has_an_independent_check():
    assert len(FAMILIES) >= 10
    assert set(FAMILIES) >= {"addition", "subtraction", "multiplication", "order_of_operations",
                             "linear_equation", "fraction", "gcd_lcm", "modular", "polynomial_roots",
                             "word_problem"}


@pytest.mark.parametrize("family", FAMILIES)
def test_answers_match_an_independent_computation(family: str):
    for difficulty in LEVELS:
        for problem in _samples(family, difficulty):
            assert ANSWER_FORM.fullmatch(problem.answer), problem.answer
            assert Fraction(problem.answer) == independent_answer(problem), problem.question
            assert problem.source == f"generator:{family}"
            assert problem.meta["family"] == family and problem.meta["difficulty"] == difficulty
            json.dumps(problem.to_dict())  # meta must survive save_jsonl


@pytest.mark.parametrize("family", FAMILIES)
def test_answers_follow_the_convention_and_math_verify_reads_them(family: str):
    for difficulty in LEVELS:
        for problem in _samples(family, difficulty, seed=1)[:10]:
            value = Fraction(problem.answer)
            assert problem.answer == (str(value.numerator) if value.denominator == 1
                                      else f"{value.numerator}/{value.denominator}")
            gold = parse(f"${problem.answer}$")
            assert gold, problem.answer
            assert parse(problem.answer)
            latex = (str(value.numerator) if value.denominator == 1
                     else f"\\frac{{{value.numerator}}}{{{value.denominator}}}")
            assert verify(gold, parse(f"The answer is \\boxed{{{latex}}}")), problem.answer


@pytest.mark.parametrize("family", FAMILIES)
def test_difficulty_grows_operands_or_steps(family: str):
    # Size = steps + total digits (log10) of the integers the question shows.
    def size(problem: Problem) -> float:
        return problem.meta["steps"] + sum(math.log10(1 + abs(v)) for v in problem.meta["operands"])

    means = [np.mean([size(p) for p in _samples(family, d, seed=2)]) for d in LEVELS]
    assert all(later > earlier for earlier, later in zip(means, means[1:])), means


def test_specific_difficulty_knobs():
    assert {len(str(p.meta["operands"][0])) for p in _samples("addition", 4)} == {4}
    assert {p.meta["steps"] for p in _samples("order_of_operations", 5)} == {5}
    assert {p.meta["degree"] for p in _samples("polynomial_roots", 2)} == {2}
    assert {p.meta["degree"] for p in _samples("polynomial_roots", 5)} == {3}
    assert all(p.meta["c"] == 0 for p in _samples("linear_equation", 2))
    assert all(p.meta["c"] != 0 for p in _samples("linear_equation", 3))
    assert {len(p.meta["fractions"]) for p in _samples("fraction", 5)} == {3}


def test_word_problems_use_every_template():
    seen = {p.meta["template"] for d in LEVELS for p in _samples("word_problem", d)}
    assert seen == set(WORD_TEMPLATES) and len(WORD_TEMPLATES) >= 5


def test_same_seed_same_problems_different_seed_different():
    first = [p.to_dict() for p in sample_problems(60, 123, difficulty=(1, 3, 5))]
    again = [p.to_dict() for p in sample_problems(60, np.random.default_rng(123), difficulty=(1, 3, 5))]
    other = [p.to_dict() for p in sample_problems(60, 124, difficulty=(1, 3, 5))]
    assert first == again
    assert first != other
    assert generate("fraction", 5, 3) == generate("fraction", 5, 3)
    rng = np.random.default_rng(0)
    assert generate("multiplication", rng, 5) != generate("multiplication", rng, 5)


def test_sample_problems_families_weights_and_difficulty():
    problems = sample_problems(200, 0, families=("modular", "fraction"), weights=(3, 1), difficulty=[2, 4])
    families = [p.meta["family"] for p in problems]
    assert set(families) == {"modular", "fraction"}
    assert families.count("modular") > families.count("fraction")
    assert {p.meta["difficulty"] for p in problems} == {2, 4}
    only = sample_problems(30, 0, families=("gcd_lcm", "addition"), weights=(0, 1))
    assert {p.meta["family"] for p in only} == {"addition"}
    assert {p.meta["family"] for p in sample_problems(300, 0)} == set(FAMILIES)


def test_unique_sampling():
    problems = sample_problems(150, 0, families=("addition",), difficulty=2, unique=True)
    assert len({p.id for p in problems}) == 150
    with pytest.raises(ValueError, match="distinct"):
        sample_problems(100, 0, families=("addition",), difficulty=1, unique=True)  # only 81 exist


def test_bad_arguments_raise_clear_errors():
    with pytest.raises(ValueError, match="valid families: addition, subtraction"):
        generate("calculus", 0)
    with pytest.raises(ValueError, match="valid families"):
        sample_problems(3, 0, families=("addition", "topology"))
    for bad in (0, 6, 2.5, True):
        with pytest.raises(ValueError, match="difficulty"):
            generate("addition", 0, bad)
    with pytest.raises(ValueError, match="weights"):
        sample_problems(3, 0, families=("addition",), weights=(1, 2))


def test_render():
    assert render(sympy.Rational(6, 8)) == "3/4"
    assert render(sympy.Rational(-6, 8)) == "-3/4"
    assert render(sympy.Integer(12)) == "12"
    assert render(-7) == "-7"


def test_questions_are_short():
    for problem in sample_problems(500, 0, difficulty=list(LEVELS)):
        assert len(problem.question) < 220, problem.question
