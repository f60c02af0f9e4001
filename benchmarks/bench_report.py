"""The report of a teacher comparison: pass@k with CIs, paired differences, question analysis, TensorBoard, plots.

Everything here is computed from the job files' rows (`benchmarks.bench_jobs`), so a study's
tables can be regenerated from its ``jobs/`` folder alone.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import shutil
from pathlib import Path
from typing import Any

from agents import TensorBoardWriter
from benchmarks.analysis import analyze_run
from benchmarks.bench_config import (
    KS,
    PAPER_MATH,
    PAPER_SETTINGS,
    ROW_NAMES,
    ROW_ORDER,
    META_TRAINED,
    TEACHER_OF,
    BenchConfig,
    paper_differences,
)
from benchmarks.bootstrap import bootstrap_ci, bootstrap_pass_at_k, bootstrap_pass_at_k_difference

REFERENCES = ("hard-only", "base-student")
"""The rows every method is compared with pair by pair (the paired table): Hard-Only, then Base."""


def analyze_teachers(bench: BenchConfig, out: Path) -> dict[str, Any]:
    """Question analysis of each teacher's first-seed samples (and SOAR's PQ when it has one)."""
    reports: dict[str, Any] = {}
    seed = bench.first_seed
    for method in bench.method_list:
        run_dir = out / f"{method}-seed{seed}"
        if method not in TEACHER_OF or not (run_dir / "questions.jsonl").is_file():
            continue
        name = "grounded" if method == "soar" else method
        try:
            reports[name] = analyze_run(str(run_dir), sample=bench.analysis_questions, seed=seed)
            pq = run_dir / "pq.jsonl"
            if method == "soar" and pq.is_file() and pq.read_text().strip():
                reports["soar-pq"] = analyze_run(str(run_dir), sample=bench.analysis_questions, seed=seed,
                                                 file="pq.jsonl")
        except (OSError, ValueError) as error:
            reports[name] = {"error": str(error)}
    return reports


def analysis_table(analysis: dict[str, Any], bench: BenchConfig | None = None) -> str:
    """Markdown: one row per teacher's sampled questions, and the paper's Vendi scores labelled as such."""
    if not analysis:
        return ""
    lines = ["| questions of | n | Vendi (embedding) | Vendi (TF-IDF) | duplicates | well-posed | correct (checkable) "
             "| contaminated | word / equation |", "|---|---|---|---|---|---|---|---|---|"]
    for row in ROW_ORDER:
        report = analysis.get(row)
        if not report or "error" in report:
            continue
        correct = report["correct_rate_checkable"]
        embedding = report.get("vendi_embedding")
        lines.append(f"| {ROW_NAMES[row]} | {report['questions']} | {'–' if embedding is None else f'{embedding:.1f}'} | "
                     f"{report['vendi_tfidf']:.1f} | "
                     f"{report['duplicate_rate']:.0%} | {report['well_posed_rate']:.0%} | "
                     f"{'–' if correct is None else f'{correct:.0%}'} ({report['checkable_rate']:.0%}) | "
                     f"{report['contamination_rate']:.0%} | {report['style']['word']:.0%} / "
                     f"{report['style']['equation']:.0%} |")
    differences = paper_differences(bench, questions=True) if bench is not None else ["settings unknown"]
    paper = "Base-T ~35, Grounded-T 32-35, Intrinsic-T ~11 of 128"
    reference = (f"paper, same settings, embedding kernel: {paper}" if not differences else
                 f"paper, different settings ({'; '.join(differences)}), embedding kernel, not comparable: {paper}")
    return ("\nQuestion analysis (first seed; Vendi with all-MiniLM-L6-v2 embeddings, – when not installed, and "
            f"with the offline TF-IDF kernel; {reference}):\n\n" + "\n".join(lines) + "\n")


def mean_meta(entries: list[dict[str, Any]]) -> dict[str, float] | None:
    """Meta-training compute averaged over seeds, like the other compute columns (None for untrained rows)."""
    metas = [e["meta"] for e in entries if e.get("meta")]
    if not metas:
        return None
    return {key: round(sum(m.get(key, 0) for m in metas) / len(metas), 1) for key in metas[0]}


def row_pass_at_k(entries: list[dict[str, Any]], k: int) -> list[float]:
    """[mean, low, high] pass@k (%) of one row, bootstrapped over seeds and problems.

    Rows without per-problem counts have only their stored pass@k: the CI is then over seeds alone.
    """
    if all(e.get("correct") for e in entries):
        return [100 * v for v in bootstrap_pass_at_k([e["correct"] for e in entries], entries[0]["samples"], k,
                                                     n_resamples=2000)]
    return [100 * v for v in bootstrap_ci([e["pass_at_k"][str(k)] for e in entries], n_resamples=2000)]


def aggregate(rows: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """Per row and k: mean pass@k with a bootstrap 95% CI over seeds and problems (in %)."""
    table: dict[str, Any] = {}
    for row, entries in rows.items():
        samples = entries[0]["samples"]
        ks = [k for k in KS if k <= samples]
        table[row] = {
            "seeds": len(entries),
            "pass_at_k": {str(k): row_pass_at_k(entries, k) for k in ks},
            "student_steps": sum(e["student_steps"] for e in entries) / len(entries),
            "tokens": sum(e["tokens"] for e in entries) / len(entries),
            "seconds": sum(e["seconds"] for e in entries) / len(entries),
            "meta": mean_meta(entries),
            "notes": sorted({e["note"] for e in entries if e.get("note")}),
        }
        if not all(e.get("correct") for e in entries):
            table[row]["notes"].append("CI over seeds only: rows without per-problem counts")
    return table


def paired_differences(rows: dict[str, list[dict[str, Any]]]) -> dict[str, dict[str, dict[str, Any]]]:
    """Per reference, row and k: row minus reference in pass@k (% points) on their common (seed, problem) pairs.

    Each entry is {"diff", "low", "high", "pairs"} (paired bootstrap 95% CI) or None: the reference
    was not run, or no pair is in both (e.g. rows without per-problem counts).
    """
    paired: dict[str, dict[str, dict[str, Any]]] = {}
    for reference in REFERENCES:
        paired[reference] = {}
        for row, entries in rows.items():
            if row == reference:
                continue
            samples = min(e["samples"] for e in entries + rows.get(reference, []))
            cells: dict[str, Any] = {}
            for k in (k for k in KS if k <= samples):
                found = bootstrap_pass_at_k_difference(entries, rows.get(reference, []), k, n_resamples=2000)
                cells[str(k)] = None if found is None else {
                    "diff": 100 * found.mean, "low": 100 * found.low, "high": 100 * found.high, "pairs": found.pairs}
            paired[reference][row] = cells
    return paired


def difference_cell(entry: dict[str, Any] | None) -> str:
    """"+1.2 [-0.3, +2.8] (117)": a paired difference in % points, its 95% CI and its pairs; "—" without pairs."""
    if entry is None:
        return "—"
    return f"{entry['diff']:+.1f} [{entry['low']:+.1f}, {entry['high']:+.1f}] ({entry['pairs']})"


def paired_markdown(bench: BenchConfig, paired: dict[str, dict[str, dict[str, Any]]]) -> str:
    """Markdown: each method minus Hard-Only and minus Base, pass@k (% points) with paired 95% CIs."""
    ks = [k for k in KS if k <= bench.samples]
    lines = ["| method | minus | " + " | ".join(f"Δ pass@{k}" for k in ks) + " |", "|---|---|" + "---|" * len(ks)]
    for row in ROW_ORDER:
        for reference in REFERENCES:
            if row in paired.get(reference, {}):
                cells = [difference_cell(paired[reference][row].get(str(k))) for k in ks]
                lines.append(f"| {ROW_NAMES[row]} | {ROW_NAMES[reference]} | " + " | ".join(cells) + " |")
    if len(lines) == 2:
        return ""
    text = ("\nPaired differences (% points): method minus reference on the (seed, hard-test problem) pairs both "
            "measured (every method's fresh student is tested with the same seeds on the same problems); "
            "[low, high] = bootstrap 95% CI resampling seeds and problems, one draw for both methods; "
            "(n) = pairs; — = no pairs (reference not run, or rows without per-problem counts).\n\n"
            + "\n".join(lines) + "\n")
    headline = paired.get("hard-only", {}).get("soar-pq")
    if headline is not None:
        text += ("\nSOAR PQ − Hard-Only, paired: "
                 + "; ".join(f"pass@{k} {difference_cell(headline.get(str(k)))}" for k in ks) + ".\n")
    return text


def protocol_line(bench: BenchConfig) -> str:
    """How the fresh students of this study were trained and stopped (the table's protocol label)."""
    evaluation = bench.evaluation()
    schedule = ("one AdamW and one cosine over the run" if evaluation.schedule == "one-run" else
                f"AdamW and cosine restarted every {evaluation.eval_every} steps")
    if not evaluation.early_stop:
        stop = "no early stop"
    elif evaluation.heldout_size:
        stop = f"slope early stop on up to {evaluation.heldout_size} hard-train problems held out of training"
    else:
        stop = f"slope early stop on {evaluation.curve_size} hard-train problems that are also trained on"
    return (f"Fresh students: at most {evaluation.max_steps} RLOO steps ({evaluation.mode}), {schedule}, {stop}, "
            f"measured every {evaluation.eval_every} steps.")


def markdown_table(bench: BenchConfig, table: dict[str, Any], paired: dict[str, Any] | None = None) -> str:
    """The paper's layout: rows = methods, columns = pass@k (%) with 95% CIs; then the paired differences.

    The paper's MATH numbers stand beside ours only when this study's settings are the paper's
    (`paper_differences`); a paper-preset study with other settings lists them under the table,
    labelled with what differs; other presets do not show them.
    """
    differences = paper_differences(bench)
    paper_column = bench.preset == "paper" and not differences
    ks = [k for k in KS if k <= bench.samples]
    header = "| method | seeds | " + " | ".join(f"pass@{k}" for k in ks) + (" | paper (MATH) |" if paper_column else " |")
    header += " student steps | tokens | wall s | meta-training (teacher steps / student tokens / s) |"
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    for row in ROW_ORDER:
        if row not in table:
            continue
        entry = table[row]
        cells = [f"{m:.1f} [{lo:.1f}, {hi:.1f}]" for m, lo, hi in (entry["pass_at_k"][str(k)] for k in ks)]
        line = f"| {ROW_NAMES[row]} | {entry['seeds']} | " + " | ".join(cells) + " |"
        if paper_column:
            line += " " + paper_numbers(row) + " |"
        meta = entry.get("meta") or {}
        meta_text = (f"{meta.get('teacher_steps', 0):.0f} / {meta.get('meta_student_tokens', 0):.0f} / "
                     f"{meta.get('meta_seconds', 0):.0f}") if meta else "–"
        line += f" {entry['student_steps']:.0f} | {entry['tokens']:.0f} | {entry['seconds']:.0f} | {meta_text} |"
        lines.append(line)
    notes = [f"- {ROW_NAMES[r]}: {n}" for r in ROW_ORDER if r in table for n in table[r]["notes"]]
    text = (f"pass@k (%) on the hard test split, preset `{bench.preset}`, {bench.samples} samples per problem; "
            "[low, high] = bootstrap 95% CI over seeds and problems. " + protocol_line(bench) + "\n\n"
            + "\n".join(lines) + "\n")
    if bench.preset == "paper" and differences:
        text += (f"\nPaper, different settings ({'; '.join(differences)}), not comparable with the table: "
                 f"{PAPER_SETTINGS}, pass@1/4/8/16/32: "
                 + "; ".join(f"{ROW_NAMES[row]} {paper_numbers(row)}" for row in ROW_ORDER if row in PAPER_MATH) + ".\n")
    text += paired_markdown(bench, paired) if paired else ""
    return text + ("\nNotes:\n" + "\n".join(notes) + "\n" if notes else "")


def paper_numbers(row: str) -> str:
    """The paper's MATH pass@1/4/8/16/32 of a row, as "0.5/1.7/3.2/5.7/9.6" ("–" where it gives none)."""
    numbers = PAPER_MATH.get(row)
    return "/".join("–" if v is None else f"{v}" for v in numbers) if numbers else "–"


def _skipped_updates(info: dict[str, Any], out: Path) -> list[float] | None:
    """Per teacher step, whether its update was skipped (all rewards equal): from the job file, or
    for jobs written before it recorded them, from the run's progress.csv; None when neither has it."""
    if info.get("updates_skipped") is not None:
        return [float(v or 0.0) for v in info["updates_skipped"]]
    path = out / Path(info.get("run_dir", "")).name / "progress.csv"
    if not info.get("run_dir") or not path.is_file():
        return None
    with path.open() as handle:
        rows = list(csv.DictReader(handle))
    if not rows or "teacher/update_skipped" not in rows[0]:
        return None
    return [float(row["teacher/update_skipped"] or 0.0) for row in rows]


def meta_training_table(teachers: dict[str, list[dict[str, Any]]], out: Path) -> str:
    """Markdown: per learned teacher and seed, how often its reward was non-zero, how many updates it
    took, what it promoted: whether the teacher's loop ran, beside what its students scored."""
    lines = []
    for method in META_TRAINED:
        for info in teachers.get(method, []):
            rewards = [r for r in info.get("rewards") or [] if r is not None]
            if not rewards:
                continue
            skipped = _skipped_updates(info, out)
            taken = "–" if skipped is None else f"{sum(1 for v in skipped if v < 0.5)}/{len(skipped)}"
            nonzero = sum(1 for r in rewards if abs(r) > 1e-12)
            name = "SOAR" if method == "soar" else ROW_NAMES[method]  # its rows are PQ, PS and Grounded-T
            lines.append(f"| {name} | {Path(info.get('run_dir', '?')).name} | {len(rewards)} "
                         f"| {nonzero}/{len(rewards)} | {sum(rewards) / len(rewards):+.4f} | {max(rewards):+.4f} "
                         f"| {taken} | {len(info.get('promotion_steps') or [])} | {info.get('pq_size', 0)} |")
    if not lines:
        return ""
    return ("\nMeta-training: the teacher's own reward per step (the mean over its datasets; grounded for "
            "SOAR, SB3 and ALP-GMM, learnability for Intrinsic-T), the updates it took (an update whose "
            "rewards are all equal is skipped) and its promotions.\n\n"
            "| teacher | run | steps | steps with reward != 0 | mean reward | best step | updates taken "
            "| promotions | PQ problems |\n|---|---|---|---|---|---|---|---|---|\n" + "\n".join(lines) + "\n")


def write_results(bench: BenchConfig, out: Path, rows: dict[str, Any], teachers: dict[str, Any], skipped: list[str],
                  failed: dict[str, str], seconds: float, analysis: dict[str, Any] | None = None) -> dict[str, Any]:
    """``results.json`` and ``results.md`` (and the plots) of the jobs finished so far."""
    table = aggregate(rows) if rows else {}
    paired = paired_differences(rows) if rows else {}
    results = {"config": dataclasses.asdict(bench), "rows": rows, "table": table, "paired": paired,
               "teachers": teachers, "analysis": analysis or {}, "skipped": skipped, "failed": failed,
               "wall_seconds": round(seconds, 1)}
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "results.md").write_text(markdown_table(bench, table, paired) + meta_training_table(teachers, out)
                                    + analysis_table(analysis or {}, bench)
                                    + (f"\nSkipped (budget): {', '.join(skipped)}\n" if skipped else "")
                                    + "".join(f"\nFailed: {job}: {error}\n" for job, error in failed.items()))
    if bench.plots:
        plot(out, table, teachers)
    return results


def write_tensorboard(out: Path, rows: dict[str, list[dict[str, Any]]]) -> Path:
    """``OUT/tensorboard``, one run per (row, seed): the fresh student's held-out curve and its test pass@k.

    Written anew from the job files at the end of a study, so a resumed study never duplicates events.
    ``test/pass_at_k`` is plotted against k (its "step"); meta-training runs have their own folders.
    """
    folder = out / "tensorboard"
    shutil.rmtree(folder, ignore_errors=True)
    for row, entries in rows.items():
        for entry in entries:
            writer = TensorBoardWriter(folder / f"{row}-seed{entry['seed']}")
            for step, accuracy in entry.get("curve") or []:
                writer.write({"pq/heldout_greedy_accuracy": accuracy}, int(step))
            for k, value in entry["pass_at_k"].items():
                writer.write({"test/pass_at_k": 100 * value}, int(k))
            writer.close()
    return folder


def plot(out: Path, table: dict[str, Any], teachers: dict[str, Any]) -> list[Path]:
    """Teacher reward curves (promotions marked), pass@k bars with CIs, baseline accuracy over meta-training."""
    try:  # optional, and slow to import
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    folder = out / "plots"
    folder.mkdir(exist_ok=True)
    written = []
    fig, (ax_reward, ax_acc) = plt.subplots(1, 2, figsize=(11, 4))
    for method, runs in teachers.items():
        for index, info in enumerate(runs):
            rewards = [r for r in info["rewards"] if r is not None]
            if not rewards:
                continue
            steps = range(1, len(rewards) + 1)
            line, = ax_reward.plot(steps, rewards, label=f"{method} s{index}")
            for step in info["promotion_steps"]:
                ax_reward.axvline(step, color=line.get_color(), linestyle=":", alpha=0.7)
            accuracy = [a for a in info["baseline_accuracy"] if a is not None]
            if accuracy:
                ax_acc.plot(range(1, len(accuracy) + 1), accuracy, label=f"{method} s{index}")
    ax_reward.set(xlabel="teacher step", ylabel="mean dataset reward", title="teacher reward (dotted: promotion)")
    ax_acc.set(xlabel="teacher step", ylabel="baseline greedy accuracy on Q_R", title="student over meta-training")
    for axis in (ax_reward, ax_acc):
        if axis.lines:
            axis.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(folder / "meta_training.png", dpi=120)
    written.append(folder / "meta_training.png")
    plt.close(fig)
    if table:
        fig, axis = plt.subplots(figsize=(10, 4))
        names = [r for r in ROW_ORDER if r in table]
        ks = sorted({int(k) for r in names for k in table[r]["pass_at_k"]})
        width = 0.8 / max(len(names), 1)
        for i, row in enumerate(names):
            values = [table[row]["pass_at_k"][str(k)] for k in ks]
            means = [v[0] for v in values]
            errors = [[v[0] - v[1] for v in values], [v[2] - v[0] for v in values]]
            axis.bar([j + i * width for j in range(len(ks))], means, width, yerr=errors, capsize=2,
                     label=ROW_NAMES[row])
        axis.set_xticks([j + 0.4 - width / 2 for j in range(len(ks))], [f"pass@{k}" for k in ks])
        axis.set(ylabel="% of hard-test problems", title="pass@k with bootstrap 95% CIs")
        axis.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(folder / "pass_at_k.png", dpi=120)
        written.append(folder / "pass_at_k.png")
        plt.close(fig)
    return written


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------
