"""Problems: the unit every part of soar-gym passes around.

A teacher writes a `Problem`, a dataset row becomes a `Problem`, the student trains on
`Problem`s and is graded against `Problem.answer`. Anything that could not become a problem
is a `Rejection` with a machine-readable reason, so a run can count and report what it
dropped instead of crashing on it.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any


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
