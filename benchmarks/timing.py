"""Timed runs of two implementations side by side, and their paired comparison (benchmark scripts).

The scripts interleave the two sides (run i of one, then run i of the other, the order flipping
every pair) on shared, busy cores; the paired ratio of run i against run i is then the number
to read, since load drift between pairs hits both sides alike. Every run also records the load
average, which says how far the absolute seconds can be trusted.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from collections import defaultdict
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator


@dataclass
class Side:
    """Timed runs of one implementation: seconds, kept tokens and a per-phase breakdown per run."""

    name: str
    seconds: list[float] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)
    phases: list[dict[str, float]] = field(default_factory=list)
    loads: list[float] = field(default_factory=list)

    def add(self, seconds: float, tokens: int, phases: dict[str, float] | None = None) -> None:
        self.seconds.append(seconds)
        self.tokens.append(tokens)
        self.phases.append(dict(phases or {}))
        self.loads.append(os.getloadavg()[0])

    def drop_warmup(self, n: int) -> None:
        for values in (self.seconds, self.tokens, self.phases, self.loads):
            del values[:n]

    @property
    def rates(self) -> list[float]:
        return [t / s for t, s in zip(self.tokens, self.seconds)]

    def summary(self) -> dict[str, Any]:
        phases: dict[str, list[float]] = defaultdict(list)
        for run in self.phases:
            for key, value in run.items():
                phases[key].append(value)
        return {
            "runs": len(self.seconds),
            "seconds": mean_std(self.seconds),
            "tokens": mean_std([float(t) for t in self.tokens]),
            "tokens_per_s": mean_std(self.rates),
            "phases_s": {key: statistics.fmean(values) for key, values in phases.items()},
            "load1": mean_std(self.loads),
            "raw_seconds": self.seconds,
            "raw_tokens": self.tokens,
        }


def machine_info() -> dict[str, Any]:
    """What a timing was made on: CPU model and its bf16 flags, cores, torch threads, GPU, versions
    and the 1-minute load (the figure that says how far absolute seconds can be trusted)."""
    import torch  # lazy: the reports that print this line need no torch otherwise
    import transformers

    cpu, flags = platform.processor() or platform.machine(), ""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                elif line.startswith("flags"):
                    flags = line
                    break
    except OSError:
        pass
    return {
        "cpu": cpu, "cores": os.cpu_count(), "avx512_bf16": "avx512_bf16" in flags.split(),
        "amx_bf16": "amx_bf16" in flags.split(), "torch_threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none",
        "python": platform.python_version(), "torch": torch.__version__,
        "transformers": transformers.__version__,
        "load1": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
    }


def machine_line() -> str:
    """:func:`machine_info` as the one line a benchmark prints before its figures."""
    info = machine_info()
    return (f"{info['cpu']}, {info['cores']} CPU cores, torch threads {info['torch_threads']}, "
            f"GPU {info['gpu']}, Python {info['python']}, torch {info['torch']}, load average {info['load1']}")


def mean_std(values: list[float]) -> tuple[float, float]:
    """(mean, sample std); NaNs for no values, std 0 for one."""
    if not values:
        return (float("nan"), float("nan"))
    return (statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0)


class PhaseTimer:
    """Accumulates wall time per named phase; ``wrap`` times every call of a function."""

    def __init__(self) -> None:
        self.totals: dict[str, float] = defaultdict(float)

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.totals[name] += time.perf_counter() - start

    def wrap(self, function: Callable[..., Any], name: Callable[..., str] | str) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            with self(name(*args, **kwargs) if callable(name) else name):
                return function(*args, **kwargs)

        return timed

    def take(self) -> dict[str, float]:
        totals, self.totals = dict(self.totals), defaultdict(float)
        return totals


def fmt(pair: tuple[float, float], digits: int = 2) -> str:
    """"mean ± std" of a (mean, std) pair."""
    return f"{pair[0]:.{digits}f} ± {pair[1]:.{digits}f}"


def report_pair(title: str, ours: Side, other: Side) -> dict[str, Any]:
    """Print the two sides' table, the ratio of means and the paired ratios; return them."""
    a, b = ours.summary(), other.summary()
    ratio = a["tokens_per_s"][0] / b["tokens_per_s"][0]
    speedup = b["seconds"][0] / a["seconds"][0]
    print(f"\n{title}  ({a['runs']} runs each after warm-up)")
    print(f"| {'side':34} | {'s / run':>14} | {'tokens / run':>14} | {'tokens/s':>14} | {'load1':>11} |")
    print(f"|{'-' * 36}|{'-' * 16}:|{'-' * 16}:|{'-' * 16}:|{'-' * 13}:|")
    for side, s in ((ours, a), (other, b)):
        print(f"| {side.name:34} | {fmt(s['seconds']):>14} | {fmt(s['tokens'], 0):>14} | {fmt(s['tokens_per_s'], 1):>14} "
              f"| {fmt(s['load1'], 1):>11} |")
    # Paired ratios: run i of both sides ran back to back, so the load drift between pairs cancels.
    paired_rate = [x / y for x, y in zip(ours.rates, other.rates)]
    paired_time = [y / x for x, y in zip(ours.seconds, other.seconds)]
    print(f"ratio ours/{other.name}: tokens/s x{ratio:.2f}, time per run x{speedup:.2f} faster (ratio of means); "
          f"paired per run: tokens/s x{fmt(mean_std(paired_rate))}, time x{fmt(mean_std(paired_time))}")
    for side, s in ((ours, a), (other, b)):
        if s["phases_s"]:
            parts = ", ".join(f"{k} {v:.2f}" for k, v in s["phases_s"].items())
            print(f"  {side.name} mean per run: {parts}")
    return {"ours": a, "other": b, "tokens_per_s_ratio": ratio, "time_speedup": speedup,
            "paired_tokens_per_s_ratio": mean_std(paired_rate), "paired_time_speedup": mean_std(paired_time)}


def finish_run(results: dict[str, Any], json_path: str | None) -> dict[str, Any]:
    """Record the closing load average (it says how trustworthy the timings are) and save."""
    results["load_end"] = os.getloadavg()
    print("\nload average at end " + " ".join(f"{x:.2f}" for x in results["load_end"]))
    if json_path:
        with open(json_path, "w", encoding="utf-8") as handle:
            json.dump(results, handle, indent=2, default=str)
    return results


def parse_override(text: str) -> dict[str, Any]:
    """``"base"`` -> {}; ``"a=1,b=x"`` -> {a: 1, b: "x"}, each value as int, float, bool or str: the
    settings of a benchmark row. Here, with the harness, so that it works against any older soar_env."""
    if text.strip() == "base":
        return {}
    pairs: list[list[str]] = []
    for part in text.split(","):
        if "=" not in part and pairs:  # a comma inside a value: "hardset_families=addition,fraction@2"
            pairs[-1][1] += "," + part
        else:
            key, _, value = part.partition("=")
            pairs.append([key, value])
    return {key.strip(): _setting_value(value.strip()) for key, value in pairs}


def _setting_value(text: str) -> Any:
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return {"true": True, "false": False}.get(text.lower(), text)
