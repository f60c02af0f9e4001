"""Problems: the unit every part of soar-gym passes around.

A teacher writes a `Problem`, a dataset row becomes a `Problem`, the student trains on
`Problem`s and is graded against `Problem.answer`. Anything that could not become a problem
is a `Rejection` with a machine-readable reason, so a run can count and report what it
dropped instead of crashing on it.
"""

from __future__ import annotations

import hashlib
import re
import reprlib
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from soar_env.verify import answer_parses, extract_boxed


@dataclass(frozen=True)
class Problem:
    """A math question with its final answer (no ``\\boxed{}`` around it)."""

    question: str
    answer: str
    source: str = "unknown"
    """Where it came from: ``"math500"``, ``"generator:addition"``, ``"teacher"``, ..."""
    id: str = ""
    """Stable identifier; derived from the text when not given."""
    meta: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)
    """Free-form details (difficulty, subject, original row fields, ...)."""

    def __post_init__(self) -> None:
        if not self.id:
            digest = hashlib.sha1(f"{self.question}\x00{self.answer}".encode("utf-8", "replace"))
            object.__setattr__(self, "id", f"{self.source}-{digest.hexdigest()[:12]}")

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "question": self.question, "answer": self.answer,
                "source": self.source, "meta": dict(self.meta)}

    @classmethod
    def from_dict(cls, row: dict[str, Any]) -> "Problem":
        return cls(question=row["question"], answer=row["answer"], source=row.get("source", "unknown"),
                   id=row.get("id", ""), meta=dict(row.get("meta") or {}))


@dataclass(frozen=True)
class Rejection:
    """Why a piece of text or an action entry is not a usable problem."""

    reason: str
    """Short machine-readable code, e.g. ``"missing_question_tag"``, ``"unparsable_answer"``."""
    detail: str = ""
    """One human-readable sentence."""
    text: str = ""
    """The offending input, truncated to a few hundred characters for logs."""

    def to_dict(self) -> dict[str, str]:
        return {"reason": self.reason, "detail": self.detail, "text": self.text}


# --------------------------------------------------------------------------------------------
# Validation: teacher text and environment actions -> Problem | Rejection
# --------------------------------------------------------------------------------------------

REJECTION_REASONS: dict[str, str] = {
    "empty": "the teacher output is empty or only whitespace",
    "missing_question_tag": "no complete <question>...</question> pair",
    "multiple_questions": "more than one <question> block; one output must be one problem",
    "missing_answer_tag": "no complete <answer>...</answer> pair after the question",
    "multiple_answers": "more than one <answer> block after the question",
    "empty_question": "the question is empty",
    "too_long": "the question is longer than max_question_chars",
    "missing_box": "the answer block has no \\boxed{...}",
    "empty_answer": "the answer is empty",
    "nested_box": "the answer still contains \\boxed after the one box around it was removed",
    "answer_too_long": "the answer is longer than max_answer_chars",
    "unparsable_answer": "Math-Verify cannot read the answer, so no student could be graded on it",
    "control_characters": "a field contains control characters other than newline and tab",
    "invalid_unicode": "a field contains lone surrogates (undecodable bytes)",
    "wrong_type": "the input's type is not accepted (teacher output must be str; an entry must be"
                  " a Problem, a mapping or a (question, answer) pair)",
    "wrong_length": "a sequence entry does not have exactly two items",
    "missing_field": "a mapping entry lacks 'question' or 'answer'",
    "not_string": "question or answer is not a string",
    "placeholder": "the question or answer is the prompt's own placeholder text (a copied template)",
    "internal_error": "validation itself failed; a bug, reported instead of raised",
}
"""Every :attr:`Rejection.reason` that :func:`parse_teacher_output` and :func:`to_problem` use."""

PLACEHOLDER_TEXTS = frozenset({"the problem", "problem", "final answer", "the final answer", "answer",
                               "the answer", "your answer", "...", "\\ldots", "\\dots"})
"""Template words a small teacher copies from the prompt; Math-Verify reads them as symbols,
but no student can ever match them, so such an output would only add zero rewards."""


def _is_placeholder(text: str) -> bool:
    plain = re.sub(r"\\(?:text|mathrm|textbf)\{([^{}]*)\}", r"\1", text)
    return " ".join(plain.lower().split()).strip(" .") in PLACEHOLDER_TEXTS or plain.strip() in PLACEHOLDER_TEXTS


MAX_QUESTION_CHARS = 4000
"""Default question limit: the teacher writes at most 512 tokens (paper), about 2000 characters."""
MAX_ANSWER_CHARS = 500
"""Answers are final values: MATH's longest is ~50 characters, OlympiadBench lists stay well
under this."""

_TAG_RES = {tag: (re.compile(f"<{tag}>", re.IGNORECASE), re.compile(f"</{tag}>", re.IGNORECASE))
            for tag in ("question", "answer")}
_CONTROL_RE = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")
_SURROGATE_RE = re.compile(r"[\ud800-\udfff]")
_SNIPPET_CHARS = 300


def _snippet(value: Any) -> str:
    """A short printable form of any input for ``Rejection.text``; never raises."""
    try:
        if isinstance(value, str):
            text = value[: _SNIPPET_CHARS + 1]
        else:
            limits = reprlib.Repr()
            limits.maxstring = limits.maxother = _SNIPPET_CHARS
            text = limits.repr(value)
        # Lone surrogates would break JSON logs later; show them escaped.
        text = text.encode("utf-8", "backslashreplace").decode("utf-8")
        return text if len(text) <= _SNIPPET_CHARS else text[:_SNIPPET_CHARS] + "..."
    except Exception:  # noqa: BLE001 - a hostile __repr__ must not break validation
        return f"<unprintable {type(value).__name__}>"


def _reject(reason: str, detail: str, value: Any) -> Rejection:
    return Rejection(reason=reason, detail=detail, text=_snippet(value))


def _check_field(name: str, value: str, limit: int, too_long: str) -> Rejection | None:
    """Problems every text field must avoid, whatever the source."""
    if not value.strip():
        return _reject(f"empty_{name}", f"the {name} is empty", value)
    if _SURROGATE_RE.search(value):
        return _reject("invalid_unicode", f"the {name} contains lone surrogates", value)
    if _CONTROL_RE.search(value):
        return _reject("control_characters", f"the {name} contains control characters", value)
    if len(value) > limit:
        return _reject(too_long, f"the {name} has {len(value)} characters, more than {limit}", value)
    return None


def _unbox_answer(answer: str) -> str | Rejection:
    """Strip one ``\\boxed{}`` wrapping the whole answer; any box left over is an error."""
    stripped = answer.strip()
    if "\\boxed" not in stripped and "\\fbox" not in stripped:
        return stripped
    inner = extract_boxed(stripped)
    if inner is not None and stripped.rstrip(".") in (f"\\boxed{{{inner}}}", f"\\fbox{{{inner}}}"):
        stripped = inner.strip()
    if "\\boxed" in stripped or "\\fbox" in stripped:
        return _reject("nested_box", "the answer must be a bare value, optionally inside one box", answer)
    return stripped


def _tag_block(text: str, tag: str, start: int = 0, *, after: str = "") -> tuple[str, int] | Rejection:
    """The content of the one ``<tag>...</tag>`` block at or after ``start``, and where the block ends.

    ``after`` completes the "no tag" detail (e.g. " after the question").
    """
    open_re, close_re = _TAG_RES[tag]
    opens = list(open_re.finditer(text, start))
    if not opens:
        return _reject(f"missing_{tag}_tag", f"no <{tag}> tag{after}", text)
    if len(opens) > 1:
        return _reject(f"multiple_{tag}s", f"{len(opens)} <{tag}> tags", text)
    close = close_re.search(text, opens[0].end())
    if close is None:
        return _reject(f"missing_{tag}_tag", f"<{tag}> is never closed", text)
    return text[opens[0].end() : close.start()], close.end()


def _validated(
    question: str, answer: str, *, source: str, max_question_chars: int, max_answer_chars: int,
    require_parsable: bool, timeout: float,
) -> Problem | Rejection:
    # Surrounding whitespace (a trailing "\r\n" included) is formatting, not content.
    question = question.strip()
    problem = _check_field("question", question, max_question_chars, "too_long")
    if problem is not None:
        return problem
    unboxed = _unbox_answer(answer)
    if isinstance(unboxed, Rejection):
        return unboxed
    problem = _check_field("answer", unboxed, max_answer_chars, "answer_too_long")
    if problem is not None:
        return problem
    if require_parsable:
        if not answer_parses(unboxed, timeout=timeout):
            return _reject("unparsable_answer", "Math-Verify could not read the answer in time", unboxed)
    return Problem(question=question, answer=unboxed, source=source)


def parse_teacher_output(
    text: str, *, max_question_chars: int = MAX_QUESTION_CHARS, source: str = "teacher", timeout: float = 5.0,
) -> Problem | Rejection:
    """Read ``<question>...</question>`` then ``<answer>\\boxed{...}</answer>``; never raises.

    Rejections follow the paper: a missing tag pair, a missing box, or a boxed answer that
    Math-Verify cannot parse (checked in a worker process within ``timeout`` seconds). Tags are
    case-insensitive; text outside them is ignored. A reply generated after a forced
    ``<question>`` prefix must be passed with that prefix prepended.
    """
    try:
        if not isinstance(text, str):
            return _reject("wrong_type", f"teacher output must be str, got {type(text).__name__}", text)
        if not text.strip():
            return _reject("empty", "the teacher output is empty", text)
        found = _tag_block(text, "question")
        if isinstance(found, Rejection):
            return found
        question, question_end = found
        found = _tag_block(text, "answer", question_end, after=" after the question")
        if isinstance(found, Rejection):
            return found
        answer_block, _ = found
        if not question.strip():
            return _reject("empty_question", "nothing between the question tags", text)
        if len(question.strip()) > max_question_chars:
            return _reject("too_long", f"question longer than {max_question_chars} characters", question)
        boxed = extract_boxed(answer_block)
        if boxed is None:
            return _reject("missing_box", "the answer is not inside \\boxed{...}", answer_block)
        if not boxed.strip():
            return _reject("empty_answer", "the box is empty", answer_block)
        if _is_placeholder(question) or _is_placeholder(boxed):
            return _reject("placeholder", "the prompt's template text was copied, not filled in", text)
        return _validated(
            question, boxed, source=source, max_question_chars=max_question_chars,
            max_answer_chars=MAX_ANSWER_CHARS, require_parsable=True, timeout=timeout,
        )
    except Exception as error:  # noqa: BLE001 - a rejection is more useful to a run than a crash
        return _reject("internal_error", f"{type(error).__name__}: {error}", text)


def to_problem(
    entry: Any, *, source: str = "action", max_question_chars: int = MAX_QUESTION_CHARS,
    max_answer_chars: int = MAX_ANSWER_CHARS, require_parsable: bool = False, timeout: float = 5.0,
) -> Problem | Rejection:
    """Validate an environment action entry into a :class:`Problem`; never raises.

    Accepts a ``Problem``, a mapping with ``"question"`` and ``"answer"``, or a
    ``(question, answer)`` pair. One ``\\boxed{}`` around the answer is removed. A ``Problem``
    keeps its own source, id and meta. ``require_parsable`` also asks Math-Verify (as teacher
    output parsing does); it is off by default because it costs a worker round trip.
    """
    try:
        if isinstance(entry, Problem):
            question, answer = entry.question, entry.answer
        elif isinstance(entry, Mapping):
            if "question" not in entry or "answer" not in entry:
                return _reject("missing_field", "a mapping entry needs 'question' and 'answer'", entry)
            question, answer = entry["question"], entry["answer"]
        elif isinstance(entry, (tuple, list)):
            if len(entry) != 2:
                return _reject("wrong_length", f"expected (question, answer), got {len(entry)} items", entry)
            question, answer = entry
        else:
            hint = "; use parse_teacher_output for raw teacher text" if isinstance(entry, (str, bytes)) else ""
            return _reject("wrong_type", f"cannot make a problem from {type(entry).__name__}{hint}", entry)
        if not isinstance(question, str) or not isinstance(answer, str):
            kinds = f"question: {type(question).__name__}, answer: {type(answer).__name__}"
            return _reject("not_string", f"question and answer must be str ({kinds})", entry)
        result = _validated(
            str(question), str(answer), source=source, max_question_chars=max_question_chars,
            max_answer_chars=max_answer_chars, require_parsable=require_parsable, timeout=timeout,
        )
        if isinstance(entry, Problem) and isinstance(result, Problem):
            if result.question == entry.question and result.answer == entry.answer:
                return entry
            return replace(entry, question=result.question, answer=result.answer)
        return result
    except Exception as error:  # noqa: BLE001 - actions come from user code; report, never crash
        return _reject("internal_error", f"{type(error).__name__}: {error}", entry)
