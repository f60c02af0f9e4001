"""Where a panel student's right answers come from: replies that finished, or replies cut off.

    python -m benchmarks.cut_off_hits --out cpu-s8-lr1e-3 --set hardset=bundled --set eval_subset_size=32 \\
        --set inner_steps=8 --set learning_rate=1e-3 --set inner_steps_after_promotion=6 \\
        --set grade_unfinished=true stones-mixed-d1:1 shuffled:1

Each DATASET:RUN is trained as `benchmarks.reward_signal`'s scores job of that study folder trains
it (the folder's recorded settings must match, so the students are the panel's), then answers its
Q_R greedily. Every right answer, in training and on Q_R, is counted by whether its reply ended by
itself or was cut off by the token limit; for Q_R the reply's last 80 characters are printed too.
Without a box requirement the "answer" of a cut-off reply is the last number it had reached, so
right answers there are chance, not skill (the reason for `grade_unfinished`).
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

from benchmarks.reward_signal import EVAL_SEED, SignalConfig, Study
from benchmarks.timing import machine_line, parse_override
from soar_env.verify import extract_answer


Graded = tuple[list[str], list[bool], list[Any]]
"""One grading call: the replies, whether each ended by itself, their grades."""


def split_hits(graded: list[Graded]) -> dict[str, int]:
    """Rows, finished rows, right answers and right answers in cut-off replies over grading calls."""
    counts = {"rows": 0, "finished": 0, "correct": 0, "correct_cut_off": 0}
    for _, finished, grades in graded:
        for stopped, grade in zip(finished, grades):
            counts["rows"] += 1
            counts["finished"] += int(stopped)
            counts["correct"] += int(grade.correct)
            counts["correct_cut_off"] += int(grade.correct and not stopped)
    return counts


def probe(study: Study, dataset: str, run: int) -> dict[str, Any]:
    """Train ``dataset`` as the panel's run ``run`` does, answer Q_R greedily, and split the hits."""
    student, config = study.student, study.config
    graded: list[Graded] = []  # every grading call of the student, in order
    grade = student.grade_replies

    def recording(texts: Any, stopped: Any, golds: Any) -> list[Any]:
        grades = grade(texts, stopped, golds)
        graded.append((list(texts), list(stopped), grades))
        return grades

    student.grade_replies = recording
    try:
        started = time.perf_counter()
        trained = student.train(study.dataset(dataset, run), steps=config.inner_steps, batch_size=config.batch_size,
                                group_size=config.group_size, seed=run)
        training = split_hits(graded)
        graded.clear()
        student.evaluate(study.q_r(run), samples=1, greedy=True, state=trained.state,
                         max_new_tokens=config.eval_tokens, seed=EVAL_SEED + run)
        (texts, finished, grades), = graded
    finally:
        del student.grade_replies  # back to the class's method
    hits = [{"finished": finished[i], "found_by": extract_answer(texts[i], require_box=False)[1],
             "tail": texts[i][-80:]} for i, g in enumerate(grades) if g.correct]
    return {"job": f"{dataset}-run{run}", "train": training, "q_r": split_hits(graded), "q_r_hits": hits,
            "seconds": time.perf_counter() - started}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("jobs", nargs="+", help="DATASET:RUN, e.g. shuffled:1")
    parser.add_argument("--out", required=True, help="the reward_signal study whose settings to use")
    parser.add_argument("--preset", default="cpu")
    parser.add_argument("--root", default=SignalConfig.root, help="folder the study's folder is in")
    parser.add_argument("--set", action="append", default=[], metavar="SETTING=VALUE", help="as in reward_signal")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    overrides = {k: v for text in args.set for k, v in parse_override(text).items()}
    study = Study(SignalConfig(preset=args.preset, out=args.out, root=args.root, threads=args.threads,
                                overrides=overrides))
    print(f"# machine: {machine_line()}; study {study.folder} (settings digest {study.digest})", flush=True)
    print("| job | train: right / rows | of them cut off | Q_R: right / M | of them cut off | Q_R replies finished |")
    print("|---|---:|---:|---:|---:|---:|")
    for job in args.jobs:
        dataset, _, run = job.rpartition(":")
        result = probe(study, dataset, int(run))
        train, q_r = result["train"], result["q_r"]
        print(f"| {result['job']} | {train['correct']} / {train['rows']} | {train['correct_cut_off']} | "
              f"{q_r['correct']} / {q_r['rows']} | {q_r['correct_cut_off']} | {q_r['finished']} |", flush=True)
        print("  " + json.dumps(result["q_r_hits"]), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
