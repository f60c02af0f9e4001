"""The report of a reward-signal study: estimates per dataset, detection power, cost, downstream ranks.

    results = summarize(collect(cfg, folder, digest))     # plain dicts, also written to results.json
    print(markdown(cfg, results))                          # the tables of results.md

Statistics (plain functions of numbers, tested on hand-made ones):

- an estimator's value for a dataset is its mean over runs, with the sample sd and the runs;
- detection power of a pair (A, B): P(estimate of A > estimate of B) over the runs both have,
  ties counting half: 1.0 means A always scored higher than B in the same run, 0.5 means the
  estimator cannot tell them apart (every run tied, or a coin flip);
- an estimator's rank agreement with downstream value: Spearman's rho between its mean per
  dataset and the dataset's downstream pass@k, across the datasets that have both.
"""

from __future__ import annotations

import json
import os
import statistics
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from benchmarks.reward_panel import NULL_CONTROLS, POWER_CONTROLS, is_stone, panel_names
from benchmarks.timing import machine_line, mean_std
from soar_env.atomic import atomic_write_text
from soar_env.estimators import REWARD_ESTIMATORS, QRScores, estimate, qr_level


# ---------------------------------------------------------------------------------------------
# Statistics
# ---------------------------------------------------------------------------------------------


def detection_power(a: Mapping[int, float], b: Mapping[int, float]) -> tuple[float | None, int]:
    """(P(a > b) over the runs both have, ties counting half; how many runs); (None, 0) without common runs."""
    runs = sorted(set(a) & set(b))
    if not runs:
        return None, 0
    wins = sum(1.0 if a[r] > b[r] else 0.5 if a[r] == b[r] else 0.0 for r in runs)
    return wins / len(runs), len(runs)


def pooled_power(pairs: Sequence[tuple[Mapping[int, float], Mapping[int, float]]]) -> tuple[float | None, int]:
    """`detection_power` over every paired run of several (a, b) pairs together."""
    total, count = 0.0, 0
    for a, b in pairs:
        power, n = detection_power(a, b)
        if power is not None:
            total += power * n
            count += n
    return (total / count if count else None), count


def noise_level(null_rewards: Sequence[float]) -> float | None:
    """Mean + 2 sd of the rewards of datasets with nothing right to learn (`NULL_CONTROLS`, every
    run pooled): a reward above it is "above the noise". None without at least two such runs."""
    if len(null_rewards) < 2:
        return None
    return float(np.mean(null_rewards) + 2 * np.std(null_rewards, ddof=1))


def average_ranks(values: Sequence[float]) -> np.ndarray:
    """Ranks 1..n of ``values``, tied values sharing the mean of their ranks."""
    data = np.asarray(values, dtype=float)
    order = np.argsort(data, kind="stable")
    ranks = np.empty(len(data))
    position = 0
    while position < len(data):
        end = position
        while end + 1 < len(data) and data[order[end + 1]] == data[order[position]]:
            end += 1
        ranks[order[position:end + 1]] = (position + end) / 2 + 1
        position = end + 1
    return ranks


def spearman(x: Sequence[float], y: Sequence[float]) -> float | None:
    """Spearman's rho (Pearson on average ranks); None for fewer than 3 points or a constant side."""
    if len(x) != len(y):
        raise ValueError(f"spearman needs equal lengths, got {len(x)} and {len(y)}")
    if len(x) < 3:
        return None
    rx, ry = average_ranks(x), average_ranks(y)
    rx, ry = rx - rx.mean(), ry - ry.mean()
    norm = float(np.sqrt((rx ** 2).sum() * (ry ** 2).sum()))
    return None if norm == 0 else float((rx * ry).sum() / norm)


# ---------------------------------------------------------------------------------------------
# Jobs -> results
# ---------------------------------------------------------------------------------------------


class SettingsMismatch(ValueError):
    """A results folder (or a job file in it) was measured with other settings than this study's."""


def load_job(path: Path, digest: str) -> dict[str, Any] | None:
    """A finished job, or None; a job file of other settings is refused, never mixed in."""
    if not path.is_file():
        return None
    job = json.loads(path.read_text())
    if job.get("digest") != digest:
        raise SettingsMismatch(f"{path} was measured with other settings than {path.parent.parent / 'settings.json'}; "
                         f"delete it or use another --out")
    return job


def collect(cfg: Any, folder: Path, digest: str) -> dict[str, Any]:
    """Every finished job of the folder (all measured with ``digest``), by kind, dataset and run."""
    jobs: dict[str, Any] = {"baseline": {}, "scores": {}, "downstream": {}}
    for path in sorted((folder / "jobs").glob("*.json")):
        job = load_job(path, digest)
        if job["kind"] == "baseline":
            jobs["baseline"][job["run"]] = job
        else:
            jobs[job["kind"]].setdefault(job["dataset"], {})[job["run"]] = job
    return jobs


def _order(names: Sequence[str]) -> list[str]:
    panel = panel_names()
    return sorted(names, key=lambda n: (panel.index(n) if n in panel else len(panel), n))


def summarize(jobs: Mapping[str, Any]) -> dict[str, Any]:
    """The report's numbers from `collect`'s jobs (plain dicts and lists, JSON-ready)."""
    baselines = {run: {k: QRScores.from_dict(v) for k, v in job["scores"].items()}
                 for run, job in jobs["baseline"].items()}
    estimates: dict[str, dict[str, dict[int, float]]] = {}
    datasets: dict[str, Any] = {}
    seconds: dict[str, list[float]] = {e: [s[e].seconds for s in baselines.values()] for e in REWARD_ESTIMATORS}
    for name in _order(list(jobs["scores"])):
        runs = {r: j for r, j in jobs["scores"][name].items() if r in baselines}
        per = estimates[name] = {e: {} for e in REWARD_ESTIMATORS}
        for run, job in runs.items():
            for e in REWARD_ESTIMATORS:
                per[e][run] = estimate(e, baselines[run][e], QRScores.from_dict(job["scores"][e]))
                if not job["unchanged"]:
                    seconds[e].append(float(job["scores"][e]["seconds"]))
        train_s = [float(j["train"]["seconds"]) for j in runs.values()]
        datasets[name] = {
            "runs": sorted(runs), "size": sorted({int(j["size"]) for j in runs.values()}),
            "train_seconds": mean_std(train_s), "unchanged_runs": sum(bool(j["unchanged"]) for j in runs.values()),
            "errors": sorted({str(j["train"]["error"]) for j in runs.values() if j["train"]["error"]}),
            "estimators": {e: {"mean_sd": mean_std(list(per[e].values())), "n": len(per[e]),
                               "per_run": {str(r): v for r, v in sorted(per[e].items())}} for e in REWARD_ESTIMATORS},
        }
    noise = {e: noise_level([v for c in NULL_CONTROLS if c in estimates for v in estimates[c][e].values()])
             for e in REWARD_ESTIMATORS}
    for name, row in datasets.items():
        for e in REWARD_ESTIMATORS:
            values = list(estimates[name][e].values())
            row["estimators"][e]["above_noise"] = (None if noise[e] is None or not values
                                                   else sum(v > noise[e] for v in values) / len(values))
    stones = [n for n in estimates if is_stone(n)]
    controls = [c for c in POWER_CONTROLS if c in estimates]
    power: dict[str, Any] = {}
    for stone in stones + (["all stepping stones"] if len(stones) > 1 else []):
        row = power[stone] = {}
        for control in controls:
            row[control] = {}
            for e in REWARD_ESTIMATORS:
                if stone in estimates:
                    p, n = detection_power(estimates[stone][e], estimates[control][e])
                else:
                    p, n = pooled_power([(estimates[s][e], estimates[control][e]) for s in stones])
                row[control][e] = {"p": p, "n": n}
    downstream: dict[str, Any] = {}
    for name in _order(list(jobs["downstream"])):
        runs = list(jobs["downstream"][name].values())
        ks = sorted({int(k) for j in runs for k in j["pass_at_k"]})
        kmax = max(ks)
        downstream[name] = {"runs": len(runs), "k": kmax,
                            "pass_at_1": statistics.fmean(j["pass_at_k"].get("1", 0.0) for j in runs),
                            "value": statistics.fmean(j["pass_at_k"][str(kmax)] for j in runs),
                            "train_seconds": statistics.fmean(j["train_seconds"] for j in runs)}
    rank: dict[str, Any] = {}
    common = [n for n in downstream if n in datasets]
    for e in REWARD_ESTIMATORS:
        x = [datasets[n]["estimators"][e]["mean_sd"][0] for n in common]
        rank[e] = {"rho": spearman(x, [downstream[n]["value"] for n in common]), "datasets": len(common)}
    return {"datasets": datasets, "noise": noise, "power": power, "controls": controls, "downstream": downstream,
            "spearman": rank,
            "seconds_per_estimate": {e: {"mean_sd": mean_std(v), "n": len(v)} for e, v in seconds.items()},
            "baseline_runs": sorted(baselines),
            "baseline": {e: {"mean_sd": mean_std([qr_level(s[e]) for s in baselines.values()])}
                         for e in REWARD_ESTIMATORS}}


# ---------------------------------------------------------------------------------------------
# Markdown
# ---------------------------------------------------------------------------------------------


def _num(value: float | None, digits: int = 4) -> str:
    return "—" if value is None or value != value else f"{value:+.{digits}f}"


def header(cfg: Any, command: str | None) -> list[str]:
    """The lines that say how the numbers were made: command, machine, settings, runs."""
    env = cfg.env_config()
    return [
        f"# Reward signal: {cfg.out}", "",
        f"- command: `{command or 'python -m benchmarks.reward_signal'}`",
        f"- machine: {machine_line()} (5- and 15-minute load {' '.join(f'{x:.1f}' for x in os.getloadavg()[1:])})",
        f"- preset {cfg.preset}" + (f" with {cfg.overrides}" if cfg.overrides else "")
        + f": student {env.student_model}, Q_R of M={env.eval_subset_size} hard-train problems, "
          f"n={env.problems_per_dataset} problems per dataset, {env.inner_steps} inner RLOO steps, "
          f"batch {env.batch_size}, group {env.group_size}, lr {env.learning_rate:g}, "
          + (f"LoRA r={env.lora_rank}, " if env.lora else "full fine-tune, ")
          + f"{env.max_new_tokens} tokens ({env.eval_tokens} when scoring)",
        f"- estimators: {', '.join(REWARD_ESTIMATORS)} (sampled: {env.estimator_samples} answers per problem, "
        f"same seeds for every state of a run); runs asked: {cfg.runs} (run i: Q_R seed i, training seed i)",
        f"- written {time.strftime('%Y-%m-%d %H:%M:%S')}", ""]


def markdown(cfg: Any, results: Mapping[str, Any], command: str | None = None) -> str:
    lines = header(cfg, command)
    est = REWARD_ESTIMATORS
    base = results["baseline"]
    lines += [f"Baseline on Q_R over {len(results['baseline_runs'])} run(s): "
              + ", ".join(f"{e} {base[e]['mean_sd'][0]:.4f}" for e in est)
              + " (greedy accuracy, sampled success rate, mean per-token probability of the reference answers).", "",
              "## Estimates per dataset (mean ± sd over runs; n runs)", "",
              "| dataset | size | " + " | ".join(est) + " | n | unchanged | train s |",
              "|---|---:|" + "---:|" * len(est) + "---:|---:|---:|"]
    for name, row in results["datasets"].items():
        cells = [f"{_num(row['estimators'][e]['mean_sd'][0])} ± {row['estimators'][e]['mean_sd'][1]:.4f}"
                 for e in est]
        size = "/".join(str(s) for s in row["size"])
        lines.append(f"| {name} | {size} | " + " | ".join(cells)
                     + f" | {len(row['runs'])} | {row['unchanged_runs']} | {row['train_seconds'][0]:.0f} |")
    if any(v is not None for v in results["noise"].values()):
        lines += ["", "## Runs above the noise (reward > mean + 2 sd of every " + " and ".join(NULL_CONTROLS)
                  + " run: " + ", ".join(f"{e} {_num(results['noise'][e])}" for e in est) + ")", "",
                  "| dataset | " + " | ".join(est) + " |", "|---|" + "---:|" * len(est)]
        for name, row in results["datasets"].items():
            shares = [row["estimators"][e]["above_noise"] for e in est]
            lines.append(f"| {name} | " + " | ".join("—" if v is None else f"{v:.0%}" for v in shares) + " |")
    if results["power"] and results["controls"]:
        lines += ["", "## Detection power: P(stepping-stone set scores above the control), paired by run, "
                      "ties half (" + " / ".join(est) + ")", "",
                  "| stepping stones | " + " | ".join(f"vs {c}" for c in results["controls"]) + " |",
                  "|---|" + "---:|" * len(results["controls"])]
        for stone, row in results["power"].items():
            cells = [" / ".join("—" if row[c][e]["p"] is None else f"{row[c][e]['p']:.2f}" for e in est)
                     + f" (n={max(row[c][e]['n'] for e in est)})" for c in results["controls"]]
            lines.append(f"| {stone} | " + " | ".join(cells) + " |")
    lines += ["", "## Seconds per estimate (scoring one student state on Q_R)", "",
              "| estimator | seconds (mean ± sd) | states scored |", "|---|---:|---:|"]
    for e in est:
        mean, sd = results["seconds_per_estimate"][e]["mean_sd"]
        lines.append(f"| {e} | {mean:.1f} ± {sd:.1f} | {results['seconds_per_estimate'][e]['n']} |")
    if results["downstream"]:
        lines += ["", "## Downstream value: a fresh student trained longer on the dataset, pass@k on hard test", "",
                  "| dataset | pass@1 | pass@k | k | runs | train s |", "|---|---:|---:|---:|---:|---:|"]
        for name, row in results["downstream"].items():
            lines.append(f"| {name} | {row['pass_at_1']:.4f} | {row['value']:.4f} | {row['k']} | {row['runs']} | "
                         f"{row['train_seconds']:.0f} |")
        lines += ["", "Spearman rank correlation of each estimator's mean with the downstream pass@k: "
                  + ", ".join(f"{e} {_num(results['spearman'][e]['rho'], 2)}" for e in est)
                  + f" (over {results['spearman'][est[0]]['datasets']} datasets; — : too few or constant)."]
    if results.get("skipped"):
        lines += ["", "Skipped (budget): " + ", ".join(results["skipped"])]
    if results.get("failed"):
        lines += ["", "Failed: " + "; ".join(f"{job} ({error})" for job, error in results["failed"].items())]
    return "\n".join(lines) + "\n"


def write_report(cfg: Any, jobs: Mapping[str, Any], skipped: Sequence[str], failed: Mapping[str, str],
                 command: str | None = None) -> dict[str, Any]:
    """results.json and results.md in the study's folder; returns the results with their markdown."""
    results = summarize(jobs)
    results.update(skipped=list(skipped), failed=dict(failed), command=command)
    text = markdown(cfg, results, command)
    folder = cfg.folder
    atomic_write_text(folder / "results.json", json.dumps(results, indent=1, default=str) + "\n")
    atomic_write_text(folder / "results.md", text)
    return {**results, "markdown": text}


__all__ = ["SettingsMismatch", "average_ranks", "collect", "detection_power", "load_job", "markdown", "noise_level",
           "pooled_power", "spearman", "summarize", "write_report"]
