"""pass@k (`soar_env.metrics`): hand-computed values and the mean over problems."""

from __future__ import annotations

import math

import pytest

from soar_env.metrics import mean_pass_at_k, pass_at_k


def test_pass_at_k_hand_computed() -> None:
    assert pass_at_k(4, 1, 2) == pytest.approx(0.5)  # 1 - C(3,2)/C(4,2) = 1 - 3/6
    assert pass_at_k(4, 0, 2) == 0.0
    assert pass_at_k(4, 4, 2) == 1.0
    assert pass_at_k(5, 3, 3) == 1.0  # fewer than k wrong samples
    for c in range(9):
        assert pass_at_k(8, c, 1) == pytest.approx(c / 8)
    assert pass_at_k(32, 2, 16) == pytest.approx(1 - math.comb(30, 16) / math.comb(32, 16))
    assert pass_at_k(1000, 1, 500) == pytest.approx(0.5)  # no overflow for large n
    with pytest.raises(ValueError):
        pass_at_k(4, 1, 5)
    with pytest.raises(ValueError):
        pass_at_k(4, 5, 1)


def test_mean_pass_at_k() -> None:
    result = mean_pass_at_k([0, 1, 4], 4, ks=(1, 2, 4))
    assert result[1] == pytest.approx((0 + 0.25 + 1) / 3)
    assert result[2] == pytest.approx((0 + 0.5 + 1) / 3)
    assert result[4] == pytest.approx((0 + 1 + 1) / 3)
    assert set(mean_pass_at_k([3] * 5, 32)) == {1, 4, 8, 16, 32}
    with pytest.raises(ValueError):
        mean_pass_at_k([1, 2], 4, ks=(8,))
