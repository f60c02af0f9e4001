"""Bootstrap confidence intervals of pass@k: of one method over seeds and problems, and of the
difference between two methods over their matched (seed, problem) pairs.

Every method's fresh student is trained and tested with the same seeds on the same hard-test
problems (`benchmarks.bench_jobs`), so two methods' rows pair up and each problem's difficulty
cancels inside its pair: the paired interval is what separates methods with few seeds.
"""

from __future__ import annotations

from typing import Any, Mapping, NamedTuple, Sequence

import numpy as np

from soar_env.metrics import pass_at_k




def bootstrap_ci(values: Sequence[float], *, n_resamples: int = 10000, confidence: float = 0.95,
                 seed: int = 0) -> tuple[float, float, float]:
    """(mean, low, high): percentile bootstrap CI of the mean of ``values``.

    One value gives (v, v, v); the interval is degenerate, not "certain".
    """
    data = np.asarray(list(values), dtype=float)
    if data.size == 0:
        raise ValueError("bootstrap_ci needs at least one value")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    mean = float(data.mean())
    if data.size == 1:
        return mean, mean, mean
    rng = np.random.default_rng(seed)
    index = rng.integers(0, data.size, size=(n_resamples, data.size))  # (R, N)
    means = data[index].mean(axis=1)
    alpha = (1 - confidence) / 2
    return mean, float(np.quantile(means, alpha)), float(np.quantile(means, 1 - alpha))


def bootstrap_pass_at_k(correct_by_seed: Sequence[Sequence[int]], samples: int, k: int, *,
                        n_resamples: int = 10000, confidence: float = 0.95,
                        seed: int = 0) -> tuple[float, float, float]:
    """(mean, low, high) of pass@k, resampling seeds and problems together (two-level bootstrap).

    ``correct_by_seed[s][p]``: correct samples of problem p for seed s (same problems each seed).
    """
    table = np.array([[pass_at_k(samples, c, k) for c in row] for row in correct_by_seed], dtype=float)  # (S, P)
    if table.size == 0:
        raise ValueError("bootstrap_pass_at_k needs at least one seed and one problem")
    n_seeds, n_problems = table.shape
    mean = float(table.mean())
    if table.size == 1:
        return mean, mean, mean
    rng = np.random.default_rng(seed)
    seed_index = rng.integers(0, n_seeds, size=(n_resamples, n_seeds))  # (R, S)
    problem_index = rng.integers(0, n_problems, size=(n_resamples, n_problems))  # (R, P)
    means = np.empty(n_resamples)
    for r in range(n_resamples):
        means[r] = table[np.ix_(seed_index[r], problem_index[r])].mean()
    alpha = (1 - confidence) / 2
    return mean, float(np.quantile(means, alpha)), float(np.quantile(means, 1 - alpha))


class Difference(NamedTuple):
    """Method A minus method B in pass@k: mean over the (seed, problem) pairs, bootstrap CI, pairs used."""

    mean: float
    low: float
    high: float
    pairs: int


def _matched(a: Mapping[str, Any], b: Mapping[str, Any]) -> list[tuple[str, int, int]]:
    """(problem key, A's correct, B's correct) of every problem one seed's two rows both tested."""
    def ids(row: Mapping[str, Any]) -> list[str] | None:
        found = list(row.get("problem_ids") or [])
        return found if len(found) == len(row["correct"]) == len(set(found)) else None

    a_ids, b_ids = ids(a), ids(b)
    if a_ids is not None and b_ids is not None:
        b_correct = dict(zip(b_ids, b["correct"]))
        return [(p, c, b_correct[p]) for p, c in zip(a_ids, a["correct"]) if p in b_correct]
    # Rows written before problem ids were kept: one study tests every method on the same list, in order.
    keys = a_ids or b_ids or [f"#{i}" for i in range(len(a["correct"]))]
    return list(zip(keys, a["correct"], b["correct"])) if len(a["correct"]) == len(b["correct"]) else []


def pair_tables(a_rows: Sequence[Mapping[str, Any]], b_rows: Sequence[Mapping[str, Any]],
                k: int) -> tuple[np.ndarray, np.ndarray]:
    """(A, B): unbiased pass@k of each (seed, problem) both methods measured, (S, P) tables, NaN elsewhere.

    Rows are job rows (``seed``, ``correct``, ``samples``, optional ``problem_ids``); problems are matched by
    id, or by position for rows without ids; a row without ``correct`` pairs with nothing.
    """
    a_by_seed = {row["seed"]: row for row in a_rows if row.get("correct")}
    b_by_seed = {row["seed"]: row for row in b_rows if row.get("correct")}
    cells: dict[tuple[int, str], tuple[float, float]] = {}
    for seed in sorted(a_by_seed.keys() & b_by_seed.keys()):
        a, b = a_by_seed[seed], b_by_seed[seed]
        for key, c_a, c_b in _matched(a, b):
            cells[(seed, key)] = (pass_at_k(a["samples"], c_a, k), pass_at_k(b["samples"], c_b, k))
    seeds = {s: i for i, s in enumerate(sorted({s for s, _ in cells}))}
    problems = {p: i for i, p in enumerate(dict.fromkeys(p for _, p in cells))}
    tables = np.full((2, len(seeds), len(problems)), np.nan)  # (A/B, S, P)
    for (seed, problem), values in cells.items():
        tables[:, seeds[seed], problems[problem]] = values
    return tables[0], tables[1]


def bootstrap_pass_at_k_difference(a_rows: Sequence[Mapping[str, Any]], b_rows: Sequence[Mapping[str, Any]],
                                   k: int, *, paired: bool = True, n_resamples: int = 10000,
                                   confidence: float = 0.95, seed: int = 0) -> Difference | None:
    """pass@k of A minus B over the (seed, problem) pairs both measured, with a bootstrap CI; None without pairs.

    Every method's fresh student is tested with the same seeds on the same problems, so one resample
    drawn for both cancels each problem's difficulty (``paired=False``: independent draws, to compare).
    Seeds and problems are resampled crossed, as in `bootstrap_pass_at_k`, not stratified by seed:
    the CI must carry a new training run's luck, not only these runs' problems.
    """
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    a, b = pair_tables(a_rows, b_rows, k)  # (S, P) each
    present = ~np.isnan(a)
    pairs = int(present.sum())
    if pairs == 0:
        return None
    a, b, mask = np.where(present, a, 0.0), np.where(present, b, 0.0), present.astype(float)
    mean = float((a - b).sum() / pairs)
    rng = np.random.default_rng(seed)

    def resampled(table: np.ndarray) -> np.ndarray:  # (R,): the mean over present pairs of each resample
        # A crossed resample's mean is sum_sp n_s m_p table[s, p] / sum_sp n_s m_p mask[s, p], n_s and m_p
        # the times seed s and problem p were drawn: (R, S) @ (S, P), never the (R, S, P) resampled tables.
        n, m = (np.stack([np.bincount(r, minlength=size) for r in rng.integers(0, size, (n_resamples, size))])
                for size in a.shape)
        with np.errstate(invalid="ignore", divide="ignore"):
            return ((n @ table) * m).sum(axis=1) / ((n @ mask) * m).sum(axis=1)

    differences = resampled(a - b) if paired else resampled(a) - resampled(b)
    differences = differences[np.isfinite(differences)]  # a resample that drew no present pair says nothing
    if not differences.size:
        return Difference(mean, mean, mean, pairs)
    alpha = (1 - confidence) / 2
    low, high = np.quantile(differences, [alpha, 1 - alpha])
    return Difference(mean, float(low), float(high), pairs)


__all__ = ["Difference", "bootstrap_ci", "bootstrap_pass_at_k", "bootstrap_pass_at_k_difference", "pair_tables"]
