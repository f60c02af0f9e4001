"""Loaders: every row of the shared benchmark files, field normalisation, specs, errors."""

from __future__ import annotations

import json
import os
import re
import sys
import types
import warnings
from pathlib import Path

import pytest

from soar_env.data.loaders import (
    SkippedRowsWarning,
    detect_format,
    load_hf_dataset,
    load_jsonl,
    load_problems,
    parse_generator_spec,
    read_jsonl,
    save_jsonl,
)
from soar_env.data.generators import FAMILIES, sample_problems
from soar_env.problems import Problem

# The benchmark files are development data outside the package (see shared/data/README.md).
SHARED_DATA = Path(os.environ.get("SOAR_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
EXPECTED_ROWS = {"math500": 500, "olympiadbench": 675, "gsm8k": 1319}


def _shared_file(name: str) -> Path:
    path = SHARED_DATA / f"{name}.test.jsonl"
    if not path.is_file():
        pytest.skip(f"benchmark file {path} not found; set SOAR_SHARED_DATA to the folder holding it")
    return path


def _load_all(name: str) -> list[Problem]:
    with warnings.catch_warnings():
        warnings.simplefilter("error", SkippedRowsWarning)  # no row of these files may be skipped
        return load_jsonl(_shared_file(name))


@pytest.fixture(scope="module")
def loaded() -> dict[str, list[Problem]]:
    return {name: _load_all(name) for name in EXPECTED_ROWS}


def _raw_rows(name: str) -> list[dict]:
    return [json.loads(line) for line in _shared_file(name).read_text(encoding="utf-8").splitlines() if line.strip()]


@pytest.mark.parametrize("name", sorted(EXPECTED_ROWS))
def test_every_row_loads(name: str, loaded):
    problems = loaded[name]
    assert len(_raw_rows(name)) == EXPECTED_ROWS[name]
    assert len(problems) == EXPECTED_ROWS[name]
    for index, problem in enumerate(problems):
        assert problem.question.strip() and problem.answer.strip()
        assert problem.source == name
        assert problem.id == f"{name}-{index}"
        assert "\\boxed" not in problem.answer and "####" not in problem.answer


def test_math500_fields(loaded):
    problems, rows = loaded["math500"], _raw_rows("math500")
    assert problems[0].answer == "\\left( 3, \\frac{\\pi}{2} \\right)"
    assert problems[1].answer == "p - q"
    assert problems[2].answer == "\\frac{14}{3}"
    assert problems[4].answer == "\\text{Evelyn}"
    assert problems[0].question.startswith("Convert the point $(0,3)$")
    for problem, row in zip(problems, rows):
        assert problem.meta["solution"] == row["answer"]
        # The files also end with "The answer is: X"; it must agree with the last \boxed{}.
        assert row["answer"].rsplit("The answer is:", 1)[1].strip() == problem.answer


def test_olympiadbench_fields(loaded):
    problems = loaded["olympiadbench"]
    first = problems[0]
    assert first.answer == "2"
    assert first.meta["original_id"] == 1606
    assert first.meta["subfield"] == "Combinatorics" and first.meta["answer_type"] == "Numerical"
    assert first.meta["unit"] is None and first.meta["is_multiple_answer"] is False
    assert isinstance(first.meta["solution"], list)
    assert problems[1].answer == "\\frac{1}{2 n+2}"  # "$...$" stripped
    assert problems[13].answer == "69, 84"  # "$69$,$84$": several answers joined
    assert problems[13].meta["is_multiple_answer"] is True
    assert problems[137].answer == "45" and problems[137].meta["unit"] == "minute"
    assert problems[316].meta["error"] == "1e-1"
    assert all("$" not in p.answer.replace("\\$", "") for p in problems)


def test_gsm8k_fields(loaded):
    problems = loaded["gsm8k"]
    assert problems[0].answer == "18"
    assert problems[0].meta["solution"].endswith("#### 18")
    assert problems[0].meta["idx"] == 0
    assert problems[146].answer == "2125"  # "#### 2,125"
    assert problems[611].answer == "1450000"  # "#### 1,450,000"
    assert all(re.fullmatch(r"-?\d+(\.\d+)?", p.answer) for p in problems)


def test_format_detection():
    assert detect_format({"question": "q", "answer": "... \\boxed{3}"}) == "math"
    assert detect_format({"problem": "q", "solution": "\\boxed{3}", "answer": "3"}) == "math"
    assert detect_format({"question": "q", "answer": "so 3.\n#### 3"}) == "gsm8k"
    assert detect_format({"question": "q", "final_answer": ["$3$"]}) == "olympiadbench"
    assert detect_format({"question": "q", "answer": "3"}) == "soar"
    assert detect_format({"question": "q", "answer": "#### 3", "source": "x"}) == "soar"


def test_round_trip(tmp_path: Path, loaded):
    problems = sample_problems(40, 0, difficulty=[1, 5]) + loaded["olympiadbench"][:5] + [
        Problem("What is 1 + 1?", "2"), Problem("Ünïcode √ question?", "\\frac{1}{2}", "teacher", "t-1", {"k": [1]})]
    path = save_jsonl(problems, tmp_path / "sub" / "out.jsonl")
    loaded = load_jsonl(path)
    assert [p.to_dict() for p in loaded] == [p.to_dict() for p in problems]
    assert load_problems(str(path))[3].to_dict() == problems[3].to_dict()


def test_bad_rows_are_skipped_and_counted(tmp_path: Path):
    path = tmp_path / "mixed.jsonl"
    lines = [
        json.dumps({"question": "What is 2 + 2?", "answer": "4"}),
        "{not json",
        "",
        json.dumps({"question": "No answer here"}),
        json.dumps({"question": "  ", "answer": "1"}),
        json.dumps(["a", "list"]),
        json.dumps({"question": "What is 3 + 3?", "answer": 6}),
        json.dumps({"question": "What is 1 + 3?", "answer": "4", "meta": ["not", "a", "dict"]}),
    ]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    with pytest.warns(SkippedRowsWarning, match="5 of 7 rows skipped"):
        problems = load_jsonl(path)
    assert [(p.id, p.answer) for p in problems] == [("mixed-0", "4"), ("mixed-5", "6")]
    result = read_jsonl(path)
    assert sorted(r.reason for r in result.skipped) == [
        "bad_meta", "invalid_json", "no_answer", "no_question", "not_an_object"]
    assert result.rows_read == 7


def test_first_row_broken_does_not_mislabel_the_file(tmp_path: Path):
    rows = [{"question": "broken"}, {"question": "q1", "answer": "a\n#### 1,000"}, {"question": "q2", "answer": "#### 7"}]
    path = tmp_path / "g.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    with pytest.warns(SkippedRowsWarning):
        problems = load_jsonl(path)
    assert [p.answer for p in problems] == ["1000", "7"]


def test_explicit_format_limit_and_fields(tmp_path: Path):
    math_file = _shared_file("math500")
    assert len(load_jsonl(math_file, limit=7)) == 7
    with pytest.warns(SkippedRowsWarning, match="500 of 500"):
        assert load_jsonl(math_file, format="gsm8k") == []
    with pytest.raises(ValueError, match="unknown format"):
        load_jsonl(math_file, format="csv")
    path = tmp_path / "custom.jsonl"
    path.write_text(json.dumps({"prompt": "What is 5 - 2?", "target": "3"}) + "\n", encoding="utf-8")
    (problem,) = load_jsonl(path, question_field="prompt", answer_field="target", source="mine")
    assert (problem.question, problem.answer, problem.id) == ("What is 5 - 2?", "3", "mine-0")


def test_generator_specs():
    spec = parse_generator_spec("addition,fraction@2-4#30%9")
    assert spec.families == ("addition", "fraction") and spec.difficulty == (2, 3, 4)
    assert (spec.n, spec.seed) == (30, 9)
    assert parse_generator_spec("all").families == FAMILIES
    assert parse_generator_spec("modular%3@5").difficulty == (5,)
    problems = load_problems("generator:addition@4#200")
    assert len(problems) == 200 and len({p.id for p in problems}) == 200
    assert {p.meta["difficulty"] for p in problems} == {4}
    again = load_problems("generator:addition@4#200")
    assert [p.to_dict() for p in again] == [p.to_dict() for p in problems]
    assert load_problems("generator:addition@4#200%1") != problems
    assert len(load_problems("generator:all")) == 100
    for bad in ("generator:calculus", "generator:addition@9", "generator:addition#0", "generator:addition@1@2",
                "generator:addition!"):
        with pytest.raises(ValueError):
            load_problems(bad)
    with pytest.raises(FileNotFoundError, match="generator:FAMILIES"):
        load_problems("/no/such/file.jsonl")


def _fake_datasets(load_dataset) -> types.ModuleType:
    module = types.ModuleType("datasets")
    module.load_dataset = load_dataset
    return module


def test_hf_missing_package(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` fail
    with pytest.raises(ImportError, match=re.escape("pip install 'soar-gym[bench]'")):
        load_hf_dataset("HuggingFaceH4/MATH-500", "test")


def test_hf_offline_not_cached(monkeypatch):
    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach the Hub")

    monkeypatch.setitem(sys.modules, "datasets", _fake_datasets(offline))
    with pytest.raises(RuntimeError, match="not cached") as error:
        load_problems("hf:openai/gsm8k:main:test")
    assert "jsonl" in str(error.value) and "openai/gsm8k" in str(error.value)
    assert isinstance(error.value.__cause__, ConnectionError)


def test_hf_rows_are_normalised(monkeypatch):
    calls = []

    def fake(name, config=None, split=None):
        calls.append((name, config, split))
        return [{"problem": "What is 1/2 + 1/2?", "solution": "It is $\\boxed{1}$.", "answer": "1",
                 "subject": "Prealgebra", "level": 1}, {"problem": "Q2", "solution": "\\boxed{\\frac{1}{3}}"}]

    monkeypatch.setitem(sys.modules, "datasets", _fake_datasets(fake))
    problems = load_problems("hf:HuggingFaceH4/MATH-500")
    assert calls == [("HuggingFaceH4/MATH-500", None, "test")]
    assert [(p.id, p.answer) for p in problems] == [("math-500-0", "1"), ("math-500-1", "\\frac{1}{3}")]
    assert problems[0].meta["subject"] == "Prealgebra" and problems[0].meta["level"] == 1
    assert problems[0].meta["solution"] == "It is $\\boxed{1}$."
    load_problems("hf:openai/gsm8k:train")
    assert calls[-1] == ("openai/gsm8k", None, "train")
    assert len(load_hf_dataset("x/y", "test", limit=1)) == 1


# Rows as the full 5,000-problem MATH test split has them on the Hub
# (hf:DigitalLearningGmbH/MATH-lighteval:default:test): problem, level, type, worked solution.
FULL_MATH_ROWS = [
    {"problem": "What is $\\dfrac{1}{2}+\\dfrac{1}{3}$?", "level": "Level 1", "type": "Prealgebra",
     "solution": "The sum is $\\boxed{\\dfrac{5}{6}}$."},
    {"problem": "Find $x$ if $2x = 10$.", "level": "Level 2", "type": "Algebra",
     "solution": "Dividing, $x = \\boxed{5}$. Check: $2 \\cdot \\boxed{5} = 10$."},  # the last box is the answer
    {"problem": "Compute $\\binom{5}{2}$.", "level": "Level 3", "type": "Counting & Probability",
     "solution": "$\\binom{5}{2} = \\fbox{10}$"},  # a few MATH solutions box with \fbox
    {"problem": "Find the vertex of $y=(x-1)^2+2$.", "level": "Level 4", "type": "Algebra",
     "solution": "It is $\\boxed{(1, 2)}$ by inspection{\\it !}"},
    {"problem": "A row whose solution has no box.", "level": "Level 5", "type": "Geometry",
     "solution": "The answer is 7."},
]


def test_the_full_math_test_split_reads_as_math(tmp_path: Path, monkeypatch):
    path = tmp_path / "math_test.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in FULL_MATH_ROWS))
    with pytest.warns(SkippedRowsWarning, match="1 of 5 rows skipped"):
        problems = load_problems(str(path))
    assert [p.answer for p in problems] == ["\\dfrac{5}{6}", "5", "10", "(1, 2)"]
    assert problems[0].question == FULL_MATH_ROWS[0]["problem"]
    assert problems[2].meta["type"] == "Counting & Probability" and problems[2].meta["level"] == "Level 3"

    calls = []

    def fake(name, config=None, split=None):
        calls.append((name, config, split))
        return FULL_MATH_ROWS

    monkeypatch.setitem(sys.modules, "datasets", _fake_datasets(fake))
    with pytest.warns(SkippedRowsWarning):
        from_hub = load_problems("hf:DigitalLearningGmbH/MATH-lighteval:default:test")
    assert calls == [("DigitalLearningGmbH/MATH-lighteval", "default", "test")]
    assert [p.answer for p in from_hub] == [p.answer for p in problems]
    assert from_hub[0].id == "math-lighteval-0"
