"""A benchmark run against another commit of the library, interleaved in one sitting.

    python -m benchmarks.env_step_time --preset cpu --grid "num_datasets=2" --against HEAD~3 --runs 2
    python -m benchmarks.throughput --against 3f9e034 --runs 3 --threads 1

Timings taken on different days, or minutes apart on a shared machine, differ by more than most
changes are worth. So the other commit's packages are exported (``git archive``, into a scratch
folder removed afterwards; the repository is not touched) and both sides run here,
pair by pair: run i of ours and run i of theirs back to back (the order flips every pair), or at
the same time on one core each (``concurrent``), so load drift hits both alike and the paired
ratio of run i to run i is the number to read.

Both sides run *this* benchmark script: each side is a separate process whose ``soar_env`` and
``agents`` packages come from its tree and whose ``benchmarks`` package is ours (a folder of
symbolic links puts them first on ``sys.path``), so the harness, the settings and the timing
points are the same and only the library differs. An old commit whose API the script no longer
matches fails with its own error message, shown here.
"""

from __future__ import annotations

import io
import json
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("soar_env", "agents")
"""What each side takes from its own tree; ``benchmarks`` always comes from ours."""

SCHEDULES = ("alternate", "concurrent")

OLD_SIDE_ENV = "SOAR_AGAINST_OLD_SIDE"
"""Set in the other commit's process: settings its library predates are left out there (see
:func:`settings_for_this_library`)."""

Figure = tuple[str, Callable[[dict[str, Any]], float]]
"""A column of the comparison: its label and how to read it from one run's JSON output."""


def git(*args: str, cwd: Path = REPO) -> str:
    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True, text=True).stdout.strip()


def export(rev: str, folder: Path) -> str:
    """``rev``'s library packages written into ``folder``; returns the commit id."""
    sha = git("rev-parse", "--verify", f"{rev}^{{commit}}")
    archive = subprocess.run(["git", "archive", "--format=tar", sha, *PACKAGES], cwd=REPO, check=True,
                             capture_output=True).stdout
    folder.mkdir(parents=True, exist_ok=True)
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        # The "data" filter (plain files only) exists from Python 3.10.12 / 3.11.4 on.
        tar.extractall(folder, **({"filter": "data"} if hasattr(tarfile, "data_filter") else {}))
    return sha


def side_root(library: Path, scratch: Path, name: str) -> Path:
    """A folder whose ``soar_env``/``agents`` link to ``library`` and ``benchmarks`` to ours."""
    root = scratch / name
    root.mkdir(parents=True, exist_ok=True)
    for package in PACKAGES:
        (root / package).symlink_to(library / package, target_is_directory=True)
    (root / "benchmarks").symlink_to(REPO / "benchmarks", target_is_directory=True)
    return root


def start_side(root: Path, module: str, argv: Sequence[str], out: Path, threads: int | None,
               old: bool = False) -> subprocess.Popen:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(root)  # before site-packages, so before the editable install of our tree
    env.pop(OLD_SIDE_ENV, None)
    if old:
        env[OLD_SIDE_ENV] = "1"
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    command = [sys.executable, "-m", module, *argv, "--json", str(out)]
    return subprocess.Popen(command, cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish_side(process: subprocess.Popen, out: Path, label: str) -> dict[str, Any]:
    output, _ = process.communicate()
    if process.returncode != 0 or not out.exists():
        tail = "\n".join(output.splitlines()[-25:])
        raise RuntimeError(f"the {label} side failed (exit {process.returncode}):\n{tail}")
    result = json.loads(out.read_text(encoding="utf-8"))
    result["library_file"] = next((line.removeprefix("# library: ") for line in output.splitlines()
                                   if line.startswith("# library: ")), None)
    return result


def run_pairs(module: str, argv: Sequence[str], rev: str, runs: int, *, schedule: str = "alternate",
              threads: int | None = None) -> dict[str, Any]:
    """``runs`` pairs of one-process runs of ``module`` on our tree and on ``rev``'s."""
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
    ours_sha = git("rev-parse", "HEAD")
    dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    with tempfile.TemporaryDirectory(prefix="soar-against-") as scratch_name:
        scratch = Path(scratch_name)
        sha = export(rev, scratch / "theirs-library")
        roots = {"ours": side_root(REPO, scratch, "ours"),
                 "theirs": side_root(scratch / "theirs-library", scratch, "theirs")}
        results: dict[str, list[dict[str, Any]]] = {"ours": [], "theirs": []}
        for i in range(runs):
            order = ("ours", "theirs") if i % 2 == 0 else ("theirs", "ours")
            outs = {side: scratch / f"{side}-{i}.json" for side in order}
            load = os.getloadavg()[0]
            if schedule == "concurrent":
                started = {side: start_side(roots[side], module, argv, outs[side], threads, side == "theirs")
                           for side in order}
                for side in order:
                    results[side].append(finish_side(started[side], outs[side], side))
            else:
                for side in order:
                    process = start_side(roots[side], module, argv, outs[side], threads, side == "theirs")
                    results[side].append(finish_side(process, outs[side], side))
            print(f"# pair {i + 1}/{runs} done ({' then '.join(order)}; load before {load:.1f}, "
                  f"after {os.getloadavg()[0]:.1f})", flush=True)
    return {"module": module, "argv": list(argv), "rev": rev, "theirs_sha": sha, "ours_sha": ours_sha,
            "ours_dirty": dirty, "schedule": schedule, "threads": threads, "runs": runs, **results}


def settings_for_this_library(settings: dict[str, Any], known: set[str] | None = None) -> dict[str, Any]:
    """``settings`` without the env settings that this process's library does not have, when it is the
    other commit's side; each left out is printed. A setting added later runs there as that library
    always ran, so a row must ask for the value that reproduces it (e.g. ``grade_unfinished=true``).
    ``known``: the library's setting names (default: its EnvConfig's fields)."""
    if not os.environ.get(OLD_SIDE_ENV):
        return settings
    if known is None:
        import dataclasses

        from soar_env.config import EnvConfig  # this side's library

        known = {f.name for f in dataclasses.fields(EnvConfig)}
    unknown = sorted(set(settings) - known)
    if unknown:
        print(f"# the other commit has no setting {', '.join(unknown)}: left out there", flush=True)
    return {k: v for k, v in settings.items() if k in known}


def paired_table(pairs: dict[str, Any], figures: Sequence[Figure], title: str) -> list[dict[str, Any]]:
    """Print ours against theirs per figure: means, and the paired ratio theirs/ours (> 1: ours is faster)."""
    ours, theirs = pairs["ours"], pairs["theirs"]
    print(f"\n{title}: ours {pairs['ours_sha'][:10]}{' + uncommitted changes' if pairs['ours_dirty'] else ''} "
          f"against {pairs['rev']} ({pairs['theirs_sha'][:10]}), {pairs['runs']} pair(s), {pairs['schedule']}, "
          f"torch threads {pairs['threads'] or 'default'} per side")
    print(f"# libraries: ours {ours[0].get('library_file')}, theirs {theirs[0].get('library_file')}")
    print(f"| {'figure':<28} | {'theirs':>10} | {'ours':>10} | {'paired theirs/ours':>20} |")
    print(f"|{'-' * 30}|{'-' * 11}:|{'-' * 11}:|{'-' * 21}:|")
    rows = []
    for label, read in figures:
        a = [float(read(run)) for run in ours]
        b = [float(read(run)) for run in theirs]
        ratios = [y / x for x, y in zip(a, b) if x]
        spread = f" ± {statistics.stdev(ratios):.2f}" if len(ratios) > 1 else ""
        ratio_text = f"{statistics.fmean(ratios):.2f}{spread}" if ratios else "-"
        print(f"| {label:<28} | {statistics.fmean(b):>10.2f} | {statistics.fmean(a):>10.2f} | {ratio_text:>20} |")
        rows.append({"figure": label, "theirs": b, "ours": a, "paired_ratio": ratios})
    return rows


def add_arguments(parser: Any) -> None:
    """The options every benchmark with an ``--against`` mode takes."""
    parser.add_argument("--against", default=None, metavar="REV",
                        help="also run this benchmark on commit REV (its packages exported with git archive), pair by pair, and compare")
    parser.add_argument("--against-schedule", default="alternate", choices=SCHEDULES,
                        help="alternate: the pair's runs one after the other (order flips each pair); "
                             "concurrent: at the same time, one process per core")


def strip_against(argv: Sequence[str]) -> list[str]:
    """The command line without ``--against``/``--against-schedule``/``--json``/``--runs`` and their values."""
    drop = {"--against", "--against-schedule", "--json", "--runs"}
    kept: list[str] = []
    skip = False
    for item in argv:
        if skip:
            skip = False
            continue
        name = item.split("=", 1)[0]
        if name in drop:
            skip = "=" not in item
            continue
        kept.append(item)
    return kept
