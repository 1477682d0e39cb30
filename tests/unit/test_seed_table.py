"""tools/seed_table.py: Student-t quantiles against the published table, and the interval formula."""
from __future__ import annotations

import math

import pytest

from suite import load_tool

seed_table = load_tool("seed_table")


@pytest.mark.parametrize("df, quantile", [(1, 12.706), (2, 4.303), (3, 3.182), (4, 2.776), (9, 2.262),
                                          (30, 2.042), (100, 1.984)])
def test_t_quantiles_match_the_table(df, quantile):
    assert seed_table.t_quantile_975(df) == pytest.approx(quantile, abs=5e-4)


def test_interval_by_hand():
    # values 0.1, 0.2, 0.6: mean 0.3, sample sd sqrt(((-.2)^2 + (-.1)^2 + .3^2) / 2) = sqrt(0.07)
    mean, low, high = seed_table.t_interval([0.1, 0.2, 0.6])
    half = 4.30265 * math.sqrt(0.07) / math.sqrt(3)
    assert mean == pytest.approx(0.3) and low == pytest.approx(0.3 - half, abs=1e-4)
    assert high == pytest.approx(0.3 + half, abs=1e-4)
    assert math.isnan(seed_table.t_interval([0.5])[1])
