"""The fixed prompts of SOAR: one for the student, one for the teacher.

The paper uses a single student prompt everywhere (building the hard set, the inner loop,
evaluation), so that "the student cannot solve it" means the same thing in every place. The
teacher prompt names the target benchmark's topics, asks for one original problem, and shows
no seed problems (seeding made the teacher copy and lose diversity).
"""

from __future__ import annotations

STUDENT_PROMPT = (
    "Solve the following math problem step by step. "
    "Put your final answer in \\boxed{{}}.\n\n{question}"
)

MATH_TOPICS = (
    "algebra, counting and probability, geometry, intermediate algebra, "
    "number theory, prealgebra and precalculus"
)

TEACHER_PROMPT = (
    "You are writing practice problems for a student who is learning {topics}. "
    "Write one new, original math problem that needs a few steps of reasoning, and give its "
    "final answer. Use exactly this format:\n"
    "<question>the problem</question>\n"
    "<answer>\\boxed{{final answer}}</answer>"
)

TEACHER_REPLY_PREFIX = "<question>"
"""Forced start of the teacher's reply, for small models that rarely follow the format."""

_WHOLE = r"(?:0|[1-9][0-9]{0,3})"
QUESTION_FORMS: dict[str, tuple[str, str, str]] = {
    "arithmetic": (rf"What is {_WHOLE} (?:\+|-|×) {_WHOLE}\?", "What is0123456789+-×?", r"-?(?:0|[1-9][0-9]{0,7})"),
}
"""Named question forms for constrained decoding of the teacher's reply (a deviation, off in the
paper): name -> (regular expression the question must match, the characters it uses, the form of
its answer). "arithmetic" is the form of the cpu preset's hard set ("What is 519 + 974?", an
integer answer): the teacher then chooses the operands, the operation and the answer, and never
sees a problem."""


def student_prompt(question: str, template: str = STUDENT_PROMPT) -> str:
    """The user message the student sees for ``question``."""
    return template.format(question=question)


def teacher_prompt(topics: str = MATH_TOPICS, template: str = TEACHER_PROMPT) -> str:
    """The user message the teacher sees: fixed, with no seed problems."""
    return template.format(topics=topics)
