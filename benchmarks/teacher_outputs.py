"""How usable the LLM teacher's problems are, sampled freely and with constrained decoding.

    OMP_NUM_THREADS=1 python -m benchmarks.teacher_outputs [--drafts 64 --per-call 16 --json out.json]
    OMP_NUM_THREADS=1 python -m benchmarks.teacher_outputs --question-form arithmetic   # and a third side

The untrained teacher of a preset (default ``cpu``: the embedded SmolLM2-135M, prefill
"answer") samples the same number of drafts twice with the same seeds: once as the preset is
(``constrain_answer`` False unless the preset sets it) and once with it on (and off); with
``--question-form``, a third time with the question constrained to that form too. For each
side: the share of drafts `parse_teacher_output` accepts and why the others were rejected, and
over the accepted problems the measures of `benchmarks.analysis` (well-posedness, Vendi
diversity with the TF-IDF and, when the offline model is there, the embedding kernel,
duplicates, answers correct among the checkable). "usable per draft" is accepted x well-posed:
how many problems a student would practise on, per draft sampled. A Vendi score grows with the
number of items, so it is also given at equal n: over the same number of accepted problems per
side (a seeded subsample of the larger side). Prints the command, the machine, the load, N and
seconds per side, then the table.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import argparse
import random
import sys
import time
from collections import Counter
from types import SimpleNamespace
from typing import Any

from agents import BaseTeacher
from agents.teacher_config import make_teacher_config
from agents.teacher_sampling import Draft, TeacherSampler
from benchmarks.analysis import analyze_questions
from benchmarks.timing import finish_run, machine_line
from soar_env.config import make_config
from soar_env.models import LMPolicy
from soar_env.prompts import QUESTION_FORMS


def sample_side(policy: LMPolicy, preset: str, overrides: dict[str, Any], drafts: int, per_call: int,
                seed: int) -> tuple[list[Draft], float]:
    """``drafts`` teacher outputs of the preset with ``overrides``, in calls of ``per_call``, seeds
    seed, seed+1, ...; and the seconds taken."""
    sampler = TeacherSampler(policy, make_teacher_config(preset, **overrides))
    out: list[Draft] = []
    start = time.perf_counter()
    call = 0
    while len(out) < drafts:
        out.extend(sampler.sample(min(per_call, drafts - len(out)), seed=seed + 2 * call))  # a call uses seed, seed+1
        call += 1
    return out, time.perf_counter() - start


def side_report(drafts: list[Draft], seconds: float, embedding: bool, equal_n: int, seed: int) -> dict[str, Any]:
    accepted = [d.result for d in drafts if d.ok]
    reasons = Counter(getattr(d.result, "reason", "?") for d in drafts if not d.ok)
    analysis = analyze_questions(accepted, embedding=embedding) if accepted else None
    subsample = random.Random(seed).sample(accepted, min(equal_n, len(accepted)))
    equal = analyze_questions(subsample, embedding=embedding) if subsample else None
    well_posed = analysis["well_posed_rate"] if analysis else 0.0
    return {
        "drafts": len(drafts),
        "seconds": seconds,
        "accepted": len(accepted) / max(len(drafts), 1),
        "rejected": dict(reasons.most_common()),
        "well_posed": well_posed,
        "usable_per_draft": well_posed * len(accepted) / max(len(drafts), 1),
        "checks": analysis["checks"] if analysis else {},
        "vendi_tfidf": analysis["vendi_tfidf"] if analysis else 0.0,
        "vendi_embedding": analysis["vendi_embedding"] if analysis else None,
        "equal_n": len(subsample),
        "vendi_tfidf_equal_n": equal["vendi_tfidf"] if equal else 0.0,
        "vendi_embedding_equal_n": equal["vendi_embedding"] if equal else None,
        "duplicate_rate": analysis["duplicate_rate"] if analysis else 0.0,
        "correct_checkable": analysis["correct_rate_checkable"] if analysis else None,
        "checkable": analysis["checkable_rate"] if analysis else 0.0,
        "examples": [{"question": p.question[:160], "answer": p.answer} for p in accepted[:8]],
    }


def table(sides: dict[str, dict[str, Any]]) -> str:
    def pct(value: float | None) -> str:
        return "n/a" if value is None else f"{value:.0%}"

    def num(value: float | None) -> str:
        return "n/a" if value is None else f"{value:.1f}"

    lines = ["| side | N | s | accepted | well-posed (of accepted) | usable per draft | Vendi embedding / TF-IDF "
             "(all accepted) | Vendi embedding / TF-IDF (equal n) | duplicates | correct (checkable) | rejected |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in sides.items():
        rejected = ", ".join(f"{k} {v}" for k, v in r["rejected"].items()) or "-"
        lines.append(f"| {name} | {r['drafts']} | {r['seconds']:.0f} | {pct(r['accepted'])} | {pct(r['well_posed'])} "
                     f"| {r['usable_per_draft']:.2f} | {num(r['vendi_embedding'])} / {num(r['vendi_tfidf'])} "
                     f"| {num(r['vendi_embedding_equal_n'])} / {num(r['vendi_tfidf_equal_n'])} (n={r['equal_n']}) "
                     f"| {pct(r['duplicate_rate'])} | {pct(r['correct_checkable'])} ({pct(r['checkable'])}) "
                     f"| {rejected} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="cpu", help="teacher preset (and env preset for the model and LoRA)")
    parser.add_argument("--model", default=None, help="teacher model; default: the env preset's student model")
    parser.add_argument("--drafts", type=int, default=64, help="drafts per side (N)")
    parser.add_argument("--per-call", type=int, default=16, help="drafts per sampling call (one seed each)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-embedding", action="store_true", help="skip the embedding Vendi score")
    parser.add_argument("--question-form", default=None, choices=sorted(QUESTION_FORMS),
                        help="add a side whose question is constrained to this form too (teacher question_form)")
    parser.add_argument("--json", default=None, help="write the results here")
    args = parser.parse_args(argv)
    print("command: " + " ".join([os.path.basename(sys.executable), *sys.argv]), flush=True)
    print(f"machine: {machine_line()}", flush=True)
    env = make_config(args.preset)
    # The teacher's own model, LoRA, dtype and device, as `soar train` builds it.
    teacher = BaseTeacher(make_teacher_config(args.preset, **({"model": args.model} if args.model else {})))
    teacher.setup(SimpleNamespace(config=env), 1)
    policy, model = teacher.policy, teacher.model_name
    preset_value = make_teacher_config(args.preset).constrain_answer
    sides: dict[str, dict[str, Any]] = {
        f"constrain_answer={c}" + (" (preset)" if c == preset_value else ""): {"constrain_answer": c}
        for c in (False, True)}
    if args.question_form:
        sides[f"question_form={args.question_form}"] = {"constrain_answer": True, "question_form": args.question_form}
    sampled: dict[str, tuple[list[Draft], float]] = {}
    for name, overrides in sides.items():
        sampled[name] = sample_side(policy, args.preset, overrides, args.drafts, args.per_call, args.seed)
        print(f"{name}: N={len(sampled[name][0])} in {sampled[name][1]:.1f} s, load {os.getloadavg()[0]:.2f}",
              flush=True)
    equal_n = min(sum(d.ok for d in drafts) for drafts, _ in sampled.values())
    reports = {name: side_report(drafts, seconds, not args.no_embedding, equal_n, args.seed)
               for name, (drafts, seconds) in sampled.items()}
    print(f"model {model}, preset {args.preset}, seeds {args.seed}.. (same per side), {args.per_call} drafts a call")
    print(table(reports))
    for name, report in reports.items():
        print(f"\n{name}: accepted examples")
        for example in report["examples"]:
            print(f"  {example['question']!r} -> {example['answer']!r}")
    return finish_run({"preset": args.preset, "model": model, "sides": reports}, args.json)


if __name__ == "__main__":
    main()
