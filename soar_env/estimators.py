"""How a student state is scored on Q_R, and how two such scores become a teacher reward.

    base = score_qr(student, q_r, "likelihood", max_new_tokens=256)
    trained = score_qr(student, q_r, "likelihood", max_new_tokens=256, state=result.state)
    reward = estimate("likelihood", base, trained)

SOAR's reward is a difference: what the trained student does on the hard problems Q_R minus
what the baseline does. `score_qr` measures one state (`QRScores`, the raw outputs) and
`estimate` is a plain function of two of them. Three estimators (``reward_estimator``):

- ``greedy`` (the paper): accuracy of one greedy answer per problem. Exact but coarse: with
  M = 64 one solved problem is 0.016, and a small student usually moves no problem at all.
- ``sampled``: success rate over k answers per problem at the sampling temperature. The
  baseline and every trained student draw with the same per-problem seeds (common random
  numbers), so a state that changed nothing scores exactly the baseline and the difference
  carries only the noise of what did change; k answers make the rate finer than 1 / M.
- ``likelihood``: teacher-forced, no generation. The gain in the mean per-token log-prob of
  each problem's reference answer (written as the student prompt asks: ``\\boxed{answer}``)
  minus the same gain on a decoy, the answer with every digit shifted (same tokens, length and
  form, wrong). Training that only makes answer-shaped text likelier moves both by the same
  amount and earns ~0; only a shift towards the right digits scores. Units: nats per token.

The estimators measure different things on different scales, so tau
(``promotion_threshold``) is set with the estimator.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from soar_env.problems import Problem

REWARD_ESTIMATORS = ("greedy", "sampled", "likelihood")
"""How the grounded reward scores a student on Q_R (see the module doc)."""


@dataclass
class QRScores:
    """One student state's outputs on Q_R: what every estimator needs."""

    estimator: str
    correct: list[int] = field(default_factory=list)
    """greedy: 0/1 per problem; sampled: correct answers of ``samples`` per problem; likelihood: []."""
    samples: int = 1
    """Answers per problem behind ``correct`` (1 for greedy, 0 for likelihood)."""
    answer_logprob: list[float] = field(default_factory=list)
    """likelihood: per problem, mean log-prob per token of its reference answer; else []."""
    decoy_logprob: list[float] = field(default_factory=list)
    """likelihood: the same for its decoy; else []."""
    seconds: float = 0.0
    tokens: int = 0
    """Generated (greedy, sampled) or scored (likelihood) tokens."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, row: Mapping[str, Any]) -> QRScores:
        return cls(estimator=str(row["estimator"]), correct=[int(c) for c in row["correct"]],
                   samples=int(row["samples"]), answer_logprob=[float(x) for x in row["answer_logprob"]],
                   decoy_logprob=[float(x) for x in row["decoy_logprob"]], seconds=float(row.get("seconds", 0.0)),
                   tokens=int(row.get("tokens", 0)))


def check_estimator(estimator: str) -> str:
    if estimator not in REWARD_ESTIMATORS:
        raise ValueError(f"unknown reward estimator {estimator!r}; valid: {', '.join(REWARD_ESTIMATORS)}")
    return estimator


def answer_reply(answer: str) -> str:
    """An answer written as the student prompt asks for it (`soar_env.prompts.STUDENT_PROMPT`)."""
    return "\\boxed{" + answer + "}"


def _same_answer(a: str, b: str) -> bool:
    return "".join(a.split()) == "".join(b.split())


def shifted_digits(answer: str) -> str | None:
    """``answer`` with every digit d replaced by d + 1 (9 by 0; a number may not start with 0,
    so a leading 9 of a longer number becomes 1): wrong at every digit, the same length and
    form. None when the answer has no digit."""
    if not any(c.isdigit() for c in answer):
        return None
    out = []
    for i, c in enumerate(answer):
        if not c.isdigit():
            out.append(c)
            continue
        shifted = str((int(c) + 1) % 10)
        leading = not (i > 0 and answer[i - 1].isdigit())
        longer = i + 1 < len(answer) and answer[i + 1].isdigit()
        out.append("1" if shifted == "0" and leading and longer else shifted)
    return "".join(out)


def decoy_answers(problems: Sequence[Problem]) -> list[str]:
    """A wrong answer of the same form and length for each problem, deterministically.

    Every digit is shifted (`shifted_digits`: 1545 -> 2656, 27/140 -> 38/251, \\frac{3}{4} ->
    \\frac{4}{5}), so the decoy has the answer's tokens, length and magnitude and differs only in
    being wrong. (The first panel used another Q_R problem's answer instead: training on a batch
    of tiny answers then raised short right answers over long decoys, and the degenerate batch
    scored highest; benchmarks/README.md, section 8.) An answer without digits takes the next
    answer of ``problems`` (cyclically) that differs from it, else itself with "1" appended.
    """
    answers = [p.answer for p in problems]
    decoys = []
    for i, answer in enumerate(answers):
        decoy = shifted_digits(answer)
        if decoy is None:
            others = (answers[(i + j) % len(answers)] for j in range(1, len(answers)))
            decoy = next((other for other in others if not _same_answer(other, answer)), answer.strip() + "1")
        decoys.append(decoy)
    return decoys


def sampling_for(estimator: str, samples: int) -> tuple[int, bool]:
    """(answers per problem, greedy) that ``estimator`` generates with: greedy one greedy answer,
    sampled ``samples`` sampled ones; likelihood generates nothing, so where an accuracy is still
    wanted (logs) it takes the greedy one."""
    check_estimator(estimator)
    if estimator != "sampled":
        return 1, True
    if samples < 1:
        raise ValueError(f"the sampled estimator needs samples >= 1, got {samples}")
    return samples, False


def score_qr(student: Any, problems: Sequence[Problem], estimator: str, *, samples: int = 1,
             max_new_tokens: int, seed: int | None = None, state: Any = None) -> QRScores:
    """What ``estimator`` needs from one student state on ``problems``.

    ``student`` is a `soar_env.student.StudentLike`; ``state`` the trained weights to score,
    loaded and undone by the student (None: the baseline). greedy and sampled call
    ``student.evaluate`` (sampled with ``samples`` answers per problem, seeded by ``seed``);
    likelihood makes one ``student.answer_logprobs`` call over the reference answers and
    their decoys (`decoy_answers`).
    """
    check_estimator(estimator)
    start = time.perf_counter()
    if estimator == "likelihood":
        # Each problem's answer and decoy side by side: they share the prompt, which the scorer runs
        # once per micro-batch, so they must not fall into different micro-batches.
        replies = [answer_reply(text) for p, decoy in zip(problems, decoy_answers(problems))
                   for text in (p.answer, decoy)]
        scored = student.answer_logprobs([p for p in problems for _ in (0, 1)], replies, state=state)
        # An `AnswerLogprobs` (with the token count), or a bare list of floats from a simpler student.
        logprobs = [float(x) for x in getattr(scored, "logprobs", scored)]
        return QRScores("likelihood", [], 0, logprobs[0::2], logprobs[1::2],
                        seconds=time.perf_counter() - start, tokens=int(getattr(scored, "tokens", 0)))
    samples, greedy = sampling_for(estimator, samples)
    result = student.evaluate(list(problems), samples=samples, greedy=greedy, state=state,
                              max_new_tokens=max_new_tokens, seed=seed)
    return QRScores(estimator, [int(c) for c in result.correct], samples,
                    seconds=time.perf_counter() - start, tokens=int(getattr(result, "tokens", 0) or 0))


def qr_level(scores: QRScores) -> float:
    """Where one state stands on Q_R, in [0, 1] (0 for no problems): greedy accuracy, sampled success
    rate, or for likelihood the mean per-token probability of the reference answers."""
    if scores.estimator == "likelihood":
        return float(np.mean(np.exp(scores.answer_logprob))) if scores.answer_logprob else 0.0
    if not scores.correct:
        return 0.0
    # float(mean) / samples: for one sample exactly the greedy-style accuracy the env always reported.
    return float(np.mean(scores.correct)) / scores.samples


def estimate(estimator: str, baseline: QRScores, trained: QRScores) -> float:
    """The reward of one trained student: how much better than the baseline it scores on Q_R.

    greedy: mean(trained.correct) - mean(baseline.correct), the paper's accuracy gain.
    sampled: mean over problems of (trained.correct - baseline.correct) / samples.
    likelihood: mean over problems of (trained.answer - baseline.answer) - (trained.decoy -
    baseline.decoy), in nats per token.
    """
    check_estimator(estimator)
    for scores in (baseline, trained):
        if scores.estimator != estimator:
            raise ValueError(f"{estimator} estimate of scores made by the {scores.estimator} estimator")
    if estimator == "likelihood":
        n = len(baseline.answer_logprob)
        if not (len(trained.answer_logprob) == n and len(baseline.decoy_logprob) == len(trained.decoy_logprob) == n):
            raise ValueError("likelihood scores of different problem sets")
        if n == 0:
            return 0.0
        gain = np.asarray(trained.answer_logprob) - np.asarray(baseline.answer_logprob)
        decoy_gain = np.asarray(trained.decoy_logprob) - np.asarray(baseline.decoy_logprob)
        return float(np.mean(gain - decoy_gain))
    if len(baseline.correct) != len(trained.correct) or baseline.samples != trained.samples:
        raise ValueError(f"{estimator} scores of different problem sets or sample counts")
    # Level difference: the mean of per-problem differences, computed as the env always did.
    return qr_level(trained) - qr_level(baseline)


__all__ = ["REWARD_ESTIMATORS", "QRScores", "answer_reply", "check_estimator", "decoy_answers", "estimate",
           "qr_level", "sampling_for", "score_qr", "shifted_digits"]
