r"""Answer extraction and grading with a hard time limit.

    >>> from soar_env.verify import grade
    >>> grade(r"... so the answer is $\boxed{\frac{1}{2}}$.", "0.5").correct
    True

The student's reward, the hard-set filter and every evaluation go through :func:`grade`, so it
must (a) agree with Math-Verify, which the paper uses, and (b) never hang a training run.
Answers are found in the caller (:mod:`~soar_env.verify.extract`, pure string work); the
symbolic comparison runs in worker processes (:mod:`~soar_env.verify.worker`) that
:mod:`~soar_env.verify.pool` kills and replaces when a grade runs out of time. A grade that
ran out of time has status ``"timeout"``, is never correct, and is counted in
:func:`grading_stats` (:mod:`~soar_env.verify.stats`).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from soar_env.verify.extract import (
    FOUND_BY,
    clean_gold,
    drop_dollars,
    extract_answer,
    extract_boxed,
    is_unevaluated,
    normalize_answer,
    unbox,
)
from soar_env.verify.pool import run_requests, shutdown_grading_pool, warm_up
from soar_env.verify.stats import count, grading_stats, reset_grading_stats

__all__ = [
    "FOUND_BY", "GRADE_STATUSES", "Grade", "answer_parses", "extract_answer", "extract_boxed", "grade",
    "grade_many", "grading_stats", "normalize_answer", "reset_grading_stats", "shutdown_grading_pool", "warm_up",
]

GRADE_STATUSES = ("correct", "wrong", "no_answer", "unparsable", "timeout", "unfinished", "unevaluated")
"""Every value :attr:`Grade.status` can take. ``unfinished``: the reply was cut off by the token
limit and the caller asked for such replies not to be read (``grade_many(finished=...)``).
``unevaluated``: the answer is still an operation where the gold one is a value, and the caller
asked for such answers to be wrong (``grade_many(accept_unevaluated=False)``)."""

MAX_ANSWER_CHARS = 10_000
"""Longer extracted answers are ``"unparsable"`` at once: sympy would only burn the time limit."""

DEFAULT_PROCESSES = 8
"""Upper bound on :func:`grade_many`'s default pool size; each worker holds ~100 MB of sympy."""


@dataclass(frozen=True)
class Grade:
    """The verdict on one response."""

    status: str
    """One of :data:`GRADE_STATUSES`."""
    extracted: str | None = None
    """The answer string taken from the response (``None`` when nothing was found)."""
    found_by: str = "none"
    """One of :data:`FOUND_BY`."""

    @property
    def correct(self) -> bool:
        return self.status == "correct"


def _check_timeout(timeout: float) -> float:
    if not isinstance(timeout, (int, float)) or not timeout > 0:
        raise ValueError(f"timeout must be a positive number of seconds, got {timeout!r}")
    return float(timeout)


def grade_many(
    responses: Sequence[str | None],
    golds: Sequence[str],
    *,
    require_box: bool = True,
    timeout: float = 5.0,
    processes: int | None = None,
    fast_path: bool = True,
    finished: Sequence[bool] | None = None,
    accept_unevaluated: bool = True,
) -> list[Grade]:
    """Grade ``responses[i]`` against ``golds[i]`` in parallel worker processes, order kept.

    ``processes`` defaults to ``min(cpu count, DEFAULT_PROCESSES)``. Workers are shared by all
    threads and kept between calls (the pool grows to the most used at once; see
    :func:`shutdown_grading_pool`). ``fast_path=False`` sends even string-identical answers to
    Math-Verify (for benchmarks and tests of the symbolic path). Each grade's symbolic work is
    limited to ``timeout`` seconds; a call can take longer only while a replacement worker
    starts (~0.5 s) after a time-out.

    ``finished`` (per response: did it end by itself, with eos or a stop string?) grades every
    response marked False ``"unfinished"``, unread. Without a box requirement, the answer of a
    reply cut off mid-sentence is whatever number it had reached, which a weak model hits by
    chance; None reads every response, as the paper's grader does.

    ``accept_unevaluated=False`` grades an answer that is still a sum, difference or product where
    the gold answer is one value ("9/14 - 9/20" for 27/140) ``"unevaluated"``: it equals the gold
    in value, but a weak model gets there by writing the question's expression back.
    """
    if len(responses) != len(golds):
        raise ValueError(f"{len(responses)} responses but {len(golds)} gold answers")
    if finished is not None and len(finished) != len(responses):
        raise ValueError(f"{len(responses)} responses but {len(finished)} finished flags")
    timeout = _check_timeout(timeout)
    if processes is None:
        processes = min(os.cpu_count() or 1, DEFAULT_PROCESSES)
    grades: list[Grade | None] = [None] * len(responses)
    pending: list[tuple[int, str, str]] = []  # (response index, extracted answer, found_by) sent to sympy
    requests: list[dict[str, Any]] = []
    for i, (response, gold) in enumerate(zip(responses, golds)):
        if isinstance(gold, (int, float)) and not isinstance(gold, bool):
            gold = str(gold)  # loaders often keep GSM8K-style answers as numbers
        if not isinstance(gold, str):
            raise TypeError(f"gold answer {i} is {type(gold).__name__}, not str")
        if finished is not None and not finished[i]:
            grades[i] = Grade("unfinished")
            continue
        # A failed generation may arrive as None: it answered nothing.
        extracted, found_by = (None, "none")
        if isinstance(response, str):
            extracted, found_by = extract_answer(response, require_box=require_box)
        if extracted is None or not extracted.strip():
            grades[i] = Grade("no_answer", extracted, found_by)
            continue
        gold = clean_gold(gold)
        if not accept_unevaluated and is_unevaluated(extracted, gold):
            grades[i] = Grade("unevaluated", extracted, found_by)
            continue
        gold_key = normalize_answer(gold)
        if fast_path and gold_key and normalize_answer(extracted) == gold_key:
            count("fast_path")
            grades[i] = Grade("correct", extracted, found_by)
            continue
        if len(extracted) > MAX_ANSWER_CHARS:
            grades[i] = Grade("unparsable", extracted, found_by)
            continue
        pending.append((i, extracted, found_by))
        pred = drop_dollars(extracted)  # "\\boxed{$5$}" means 5
        requests.append({"op": "grade", "gold": gold, "pred": pred})
    replies = run_requests(requests, timeout, processes)
    for (i, extracted, found_by), reply in zip(pending, replies):
        status = reply["status"] if reply and reply.get("status") in GRADE_STATUSES else "unparsable"
        grades[i] = Grade(status, extracted, found_by)
    count("graded", len(grades))
    return [g for g in grades if g is not None]


def grade(response: str, gold: str, *, require_box: bool = True, timeout: float = 5.0, fast_path: bool = True) -> Grade:
    """Grade one response against one gold answer (no ``\\boxed{}`` needed around ``gold``).

    The answer is the last ``\\boxed{}`` of ``response``; with ``require_box=False`` a reply
    without one falls back to its plain-text final answer (see :func:`extract_answer`).
    Equivalence is Math-Verify's, within ``timeout`` seconds of wall-clock time, hard.
    """
    return grade_many([response], [gold], require_box=require_box, timeout=timeout, processes=1, fast_path=fast_path)[0]


def answer_parses(answer: str, timeout: float = 5.0) -> bool:
    """Whether Math-Verify reads ``answer`` (a box's content, or text with a box) as maths.

    Used to reject teacher problems whose answer no student could ever be graded against.
    A time-out counts as "does not parse".
    """
    timeout = _check_timeout(timeout)
    answer = unbox(answer).strip()
    if not answer or len(answer) > MAX_ANSWER_CHARS:
        return False
    reply = run_requests([{"op": "parses", "answer": answer}], timeout, 1)[0]
    return bool(reply and reply.get("parses"))
