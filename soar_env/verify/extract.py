"""Finding the final answer in a response: pure string work, linear time, safe in the caller.

    >>> from soar_env.verify.extract import extract_answer
    >>> extract_answer(r"so $\\boxed{\\frac{1}{2}}$.")
    ('\\\\frac{1}{2}', 'boxed')

Nothing here imports Math-Verify or sympy; every function runs in linear time so that a
megabyte of adversarial text cannot stall a training run before grading even starts.
"""

from __future__ import annotations

import re

__all__ = [
    "FOUND_BY", "brace_matches", "clean_gold", "drop_dollars", "extract_answer", "extract_boxed",
    "normalize_answer", "text_before_closing_brace", "unbox",
]

FOUND_BY = ("boxed", "fallback", "none")
"""How the answer was found: in a ``\\boxed{}``, by the plain-text fallback, or not at all."""

_BOX_RE = re.compile(r"\\(?:boxed|fbox)(?![A-Za-z])")
_BARE_TOKEN_RE = re.compile(r"[^\s${}]+")


def brace_matches(text: str) -> dict[int, int]:
    """Map each ``{`` position to its matching ``}``; escaped ``\\{``/``\\}`` are literal."""
    matches: dict[int, int] = {}
    stack: list[int] = []
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if c == "\\":
            i += 2  # skip the escaped character, whatever it is
            continue
        if c == "{":
            stack.append(i)
        elif c == "}" and stack:
            matches[stack.pop()] = i
        i += 1
    return matches


def text_before_closing_brace(text: str) -> str | None:
    """What comes before the ``}`` that closes a ``{`` opened just before ``text`` (None if none does).

    For a reply sampled after a forced ``\\boxed{``: its content runs to the brace that closes
    the box.
    """
    close = brace_matches("{" + text).get(0)
    return None if close is None else text[: close - 1]


def extract_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` in ``text`` (nested braces allowed), else None.

    Also reads ``\\fbox{...}`` and the brace-less ``\\boxed 5``. A box whose braces never close
    is skipped in favour of the previous one. Runs in linear time, so a megabyte of
    ``\\boxed{`` cannot stall the caller.
    """
    starts = [m.end() for m in _BOX_RE.finditer(text)]
    if not starts:
        return None
    matches: dict[int, int] | None = None
    for i in reversed(starts):
        while i < len(text) and text[i].isspace():
            i += 1
        if i >= len(text):
            continue
        if text[i] == "{":
            if matches is None:
                matches = brace_matches(text)
            close = matches.get(i)
            if close is not None:
                return text[i + 1 : close]
        else:
            token = _BARE_TOKEN_RE.match(text, i)
            if token:
                return token.group(0).rstrip(".,;")
    return None


def unbox(text: str) -> str:
    """The last box's content when ``text`` has a closed box, else ``text`` itself."""
    if "\\boxed" in text or "\\fbox" in text:
        boxed = extract_boxed(text)
        return boxed if boxed is not None else text
    return text


_ANSWER_IS_RE = re.compile(r"(?:answer\s+is|answer\s*:|####)", re.IGNORECASE)
# Bounded spans keep the scan linear on adversarial input; real inline answers are short.
_MATH_SPAN_RE = re.compile(r"\$\$(.{1,500}?)\$\$|\$([^$]{1,500}?)\$|\\\((.{1,500}?)\\\)|\\\[(.{1,500}?)\\\]", re.DOTALL)
_NUMBER_RE = re.compile(r"-?\d+(?:,\d{3})*(?:\.\d+)?(?:/\d+)?")
_FALLBACK_TAIL = 5_000
"""The ``= X`` and last-number fallbacks only look this far from the end: answers come last."""


_CURRENCY = "$€£¥"


def _cut_trailing_words(candidate: str) -> str:
    """Drop prose after the value: "26 total glasses" -> "26", but keep ``\\text{ cm}`` whole.

    Cuts at the first space, outside braces, that is followed by a plain word of two or more
    letters or by the article "a"/"an" (a LaTeX command starts with a backslash, so it is not a
    word; a lone letter may be a variable).
    """
    depth = 0
    for i, c in enumerate(candidate):
        if c == "{":
            depth += 1
        elif c == "}":
            depth = max(0, depth - 1)
        elif c.isspace() and depth == 0 and i > 0:
            rest = candidate[i:].lstrip()
            if re.match(r"[A-Za-z]{2}|an?\s+[A-Za-z]", rest):
                return candidate[:i]
    return candidate


def _clean_fallback(candidate: str) -> str:
    """Trim a plain-text answer to its value: one line, one sentence, no prose or delimiters."""
    candidate = candidate.strip().split("\n", 1)[0]
    sentence_end = re.search(r"\.(?:\s|$)", candidate)
    if sentence_end:
        candidate = candidate[: sentence_end.start()]
    candidate = candidate.strip().strip("*").strip()
    for left, right in (("$$", "$$"), ("$", "$"), ("\\(", "\\)"), ("\\[", "\\]")):
        if candidate.startswith(left) and candidate.endswith(right) and len(candidate) > len(left) + len(right):
            candidate = candidate[len(left) : -len(right)]
            break
    # A lone "$" is either currency ("$10") or half of a delimiter cut by the sentence split.
    candidate = candidate.strip().strip("$").strip()
    value = _cut_trailing_words(candidate)
    if value != candidate and value.isalpha():
        return ""  # "the answer is we need to ..." is prose, not a one-word answer
    candidate = value
    if len(candidate) > 1 and candidate[0] in _CURRENCY and (candidate[1].isdigit() or candidate[1] == "-"):
        candidate = candidate[1:]
    return candidate.strip().rstrip(".,;:").strip()


def extract_answer(response: str, *, require_box: bool = True) -> tuple[str | None, str]:
    """The final answer in ``response`` and how it was found (one of :data:`FOUND_BY`).

    Without ``require_box`` a reply with no box falls back, in order, to "the answer is X" /
    "Answer: X" / "#### X", then "= X" on the last line, then the last maths span or number,
    whichever comes later; small models rarely box.
    """
    boxed = extract_boxed(response)
    if boxed is not None:
        return boxed, "boxed"
    if require_box:
        return None, "none"
    anchors = list(_ANSWER_IS_RE.finditer(response))
    if anchors:
        candidate = _clean_fallback(response[anchors[-1].end() :].lstrip(" :"))
        if candidate:
            return candidate, "fallback"
    tail = response[-_FALLBACK_TAIL:].rstrip()
    last_line = tail.rsplit("\n", 1)[-1]
    if "=" in last_line:
        candidate = _clean_fallback(last_line.rsplit("=", 1)[1])
        if candidate:
            return candidate, "fallback"
    # Whichever ends last: a maths span ("... is $\\frac{1}{9}$") or a bare number ("... 42").
    numbers = list(_NUMBER_RE.finditer(tail))
    spans = list(_MATH_SPAN_RE.finditer(tail))
    if spans and (not numbers or spans[-1].end() >= numbers[-1].end()):
        content = next(group for group in spans[-1].groups() if group is not None).strip()
        if content:
            return content, "fallback"
    if numbers:
        return numbers[-1].group(0), "fallback"
    return None, "none"


# Cosmetic LaTeX that never changes a value; removing it lets identical answers skip sympy.
_COSMETIC_RE = re.compile(r"\\left(?![A-Za-z])|\\right(?![A-Za-z])|\\[!,;: ]|~|\$|\s+")
_TEXT_WRAPPER_RE = re.compile(r"\\(?:text|textbf|textrm|mathrm|mbox)\{([^{}]*)\}")


def normalize_answer(answer: str) -> str:
    """A canonical spelling of ``answer`` for exact comparison (no maths, linear time)."""
    s = _TEXT_WRAPPER_RE.sub(r"\1", answer)
    s = _COSMETIC_RE.sub("", s)
    s = s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    return s.rstrip(".")


_UNESCAPED_DOLLAR_RE = re.compile(r"(?<!\\)\$")


def drop_dollars(text: str) -> str:
    """``text`` without its unescaped ``$`` delimiters, stripped; ``\\$`` (a literal dollar) stays."""
    return _UNESCAPED_DOLLAR_RE.sub("", text).strip()


def clean_gold(gold: str) -> str:
    """Gold answers are stored without a box, but tolerate one, and ``$...$`` delimiters.

    Unescaped dollars are dropped so that a list such as ``$(-6,6)$, $(2,6)$`` (OlympiadBench)
    reads as one answer.
    """
    return drop_dollars(unbox(gold))


# An arithmetic operation between two operands: "9 + 1", "3723 - 3823", "2\\times 3", "\\frac{9}{14}-\\frac{9}{20}".
# A leading or bracketed sign ("-5", "10^{-3}", "(-1, 2)") has no left operand and is not one; "27/140"
# is how plain text writes a fraction, so "/" is not one either; "1e-5" and "1.5\\times 10^{3}" are one number.
_OPERATION_RE = re.compile(r"[\w)}\]]\s*(?:[+\-*×·÷]|\\(?:times|cdot|div)(?![A-Za-z]))\s*[\w\\({\[]")
_SCIENTIFIC_RE = re.compile(r"\d(?:\.\d+)?(?:[eE][+-]?\d+|\\times10\^)")


def has_operation(answer: str) -> bool:
    """True when ``answer`` still holds an arithmetic operation between two operands."""
    return _OPERATION_RE.search(_SCIENTIFIC_RE.sub("0", normalize_answer(answer))) is not None


def is_unevaluated(pred: str, gold: str) -> bool:
    """An answer that is still a sum, difference, product or quotient where the gold one is a single
    value: "9/14 - 9/20" for 27/140. It equals the gold in value, so a symbolic grader accepts it,
    though it is often the question's own expression written back."""
    return has_operation(pred) and not has_operation(gold)
