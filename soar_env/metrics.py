"""pass@k, the paper's evaluation metric, as plain functions of correct counts.

Used by the student's evaluation results and by the benchmarks' PQ/PS protocols; kept
apart so that it is testable without a model.
"""

from __future__ import annotations

from typing import Sequence


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples with c correct: ``1 - C(n-c, k) / C(n, k)``.

    Computed as ``1 - prod_{i=n-c+1}^{n} (1 - k/i)`` (Chen et al., 2021, arXiv 2107.03374), which
    never forms the huge binomials.
    """
    if not 0 <= c <= n:
        raise ValueError(f"need 0 <= c <= n, got n={n}, c={c}")
    if not 1 <= k <= n:
        raise ValueError(f"need 1 <= k <= n, got n={n}, k={k}")
    if n - c < k:  # every k-subset contains a correct sample
        return 1.0
    prob_all_wrong = 1.0
    for i in range(n - c + 1, n + 1):
        prob_all_wrong *= 1.0 - k / i
    return 1.0 - prob_all_wrong


def mean_pass_at_k(
    correct_counts: Sequence[int], n: int, ks: Sequence[int] = (1, 4, 8, 16, 32)
) -> dict[int, float]:
    """Mean of ``pass_at_k(n, c, k)`` over problems, for each k (k > n raises ValueError)."""
    if not correct_counts:
        raise ValueError("mean_pass_at_k needs at least one problem")
    for k in ks:
        if k > n:
            raise ValueError(f"pass@{k} needs at least {k} samples per problem, got {n}")
    return {k: sum(pass_at_k(n, c, k) for c in correct_counts) / len(correct_counts) for k in ks}
