"""Distances (paper §7, eq. 1) on plain tensors, correlations vs scipy, and Table 5's Pearson column."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import stats

from vlmerge.metrics import (
    DistanceAccumulator,
    correlate,
    cosine,
    l2,
    pearson,
    spearman,
    ssd,
    truncate_smallest,
    tssd,
)


def rnd(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def test_basic_identities() -> None:
    x = rnd(10, 7)
    assert ssd(x, x) == pytest.approx(0.0) and ssd(x, -x) == pytest.approx(1.0)
    assert tssd(x, x) == pytest.approx(0.0) and tssd(x, -x) == pytest.approx(1.0)
    assert l2(x, x) == 0.0 and cosine(x, x) == pytest.approx(0.0, abs=1e-12)
    assert cosine(x, -x) == pytest.approx(2.0)
    assert cosine(x, 3 * x) == pytest.approx(0.0, abs=1e-12)
    assert l2(torch.tensor([0.0, 0.0]), torch.tensor([3.0, 4.0])) == pytest.approx(5.0)
    assert cosine(torch.zeros(3), torch.zeros(3)) == 0.0 and cosine(torch.zeros(3), torch.ones(3)) == 1.0


def test_ssd_hand_checked_and_shapes_flattened() -> None:
    x = torch.tensor([1.0, 2.0, -1.0, 0.0])
    y = torch.tensor([1.0, -1.0, 3.0, 0.5])
    # terms: 1, 1/3, 2/4, 1 (one zero: similarity 1) -> mean 17/24 -> SSD 7/24
    assert ssd(x, y) == pytest.approx(7 / 24)
    assert ssd(x.reshape(2, 2), y.reshape(4, 1)) == pytest.approx(7 / 24)
    assert ssd(x.double(), y.half()) == pytest.approx(7 / 24)


def test_zero_zero_positions() -> None:
    x = torch.tensor([1.0, 0.0, 0.0, -2.0])
    y = torch.tensor([-1.0, 0.0, 0.0, -2.0])
    assert ssd(x, y) == pytest.approx(0.5)  # zero-zero pairs left out: terms 0, 1
    assert ssd(x, y, ignore_zeros=False) == pytest.approx(0.25)  # counted as similar, L = 4
    assert ssd(torch.zeros(3), torch.zeros(3)) == 0.0


def test_tssd_ignores_zero_zero_pairs_after_truncation() -> None:
    x = torch.tensor([10.0, 0.1, -0.2, 5.0])
    y = torch.tensor([-8.0, 0.3, 0.1, 4.0])
    # k = 0.5 zeroes the 2 smallest of each: x' = [10, 0, 0, 5], y' = [-8, 0, 0, 4]
    # positions 1, 2 are zero in both -> left out; terms 2/18, 1 -> TSSD = 1 - (1/9 + 1)/2
    assert tssd(x, y) == pytest.approx(1 - (2 / 18 + 1) / 2)
    assert torch.equal(truncate_smallest(x, 0.5), torch.tensor([10.0, 0.0, 0.0, 5.0]))
    # one side truncated, the other not: similarity 1 (a redundant value removed)
    # x' = [5, 0, 0, 2], y' = [5, -3, 0, 0]: the small opposite-sign values are gone, TSSD = 0 < SSD
    a, b = torch.tensor([5.0, 0.1, 1.0, 2.0]), torch.tensor([5.0, -3.0, 0.2, -1.0])
    assert tssd(a, b) == 0.0 and ssd(a, b) > 0.15
    with pytest.raises(ValueError, match="k must be in"):
        tssd(x, y, k=1.0)


def test_ssd_numpy_formula() -> None:
    x, y = rnd(1000, seed=1), rnd(1000, seed=2)
    a, b = x.numpy().astype(np.float64), y.numpy().astype(np.float64)
    want = 1 - np.mean(np.abs(a + b) / (np.abs(a) + np.abs(b)))
    assert ssd(x, y) == pytest.approx(want, rel=1e-5)
    ta = np.where(np.abs(a) > np.sort(np.abs(a))[499], a, 0)
    tb = np.where(np.abs(b) > np.sort(np.abs(b))[499], b, 0)
    keep = (ta != 0) | (tb != 0)
    want_t = 1 - np.mean(np.abs(ta + tb)[keep] / (np.abs(ta) + np.abs(tb))[keep])
    assert tssd(x, y) == pytest.approx(want_t, rel=1e-5)


def test_accumulator_equals_concatenation() -> None:
    xs = [rnd(5, 4, seed=i) for i in range(3)]
    ys = [rnd(20, seed=10 + i) for i in range(3)]
    acc = DistanceAccumulator()
    for x, y in zip(xs, ys, strict=True):
        acc.add(x, y)
    cx, cy = torch.cat([x.reshape(-1) for x in xs]), torch.cat(ys)
    r = acc.result()
    assert r["l2"] == pytest.approx(l2(cx, cy)) and r["cosine"] == pytest.approx(cosine(cx, cy))
    assert r["ssd"] == pytest.approx(ssd(cx, cy))


def test_size_mismatch() -> None:
    with pytest.raises(ValueError, match="equal sizes"):
        l2(torch.zeros(3), torch.zeros(4))


def test_pearson_spearman_vs_scipy() -> None:
    gen = np.random.default_rng(0)
    for _ in range(5):
        x, y = gen.normal(size=12), gen.normal(size=12)
        assert pearson(x, y) == pytest.approx(stats.pearsonr(x, y)[0], abs=1e-12)
        assert spearman(x, y) == pytest.approx(stats.spearmanr(x, y)[0], abs=1e-12)
    ties_x = [1, 2, 2, 3, 3, 3, 7]
    ties_y = [4, 1, 1, 5, 2, 9, 9]
    assert spearman(ties_x, ties_y) == pytest.approx(stats.spearmanr(ties_x, ties_y)[0], abs=1e-12)
    assert math.isnan(pearson([1, 1, 1], [1, 2, 3]))
    with pytest.raises(ValueError, match="paired"):
        pearson([1, 2], [1, 2, 3])


def test_table5_pearson_column() -> None:
    """Table 5's metric values vs COCO drops: the paper's Pearson r, to the rounding of the printed table."""
    drops = [9.16, 4.50, 2.80, 2.60]
    values = {"l2": [580.6, 496.8, 388.5, 284.6], "cosine": [0.371, 0.264, 0.163, 0.098],
              "ssd": [0.198, 0.161, 0.125, 0.104], "tssd": [0.066, 0.037, 0.015, 0.006]}
    paper = {"l2": 0.881, "cosine": 0.938, "ssd": 0.939, "tssd": 0.971}
    got = correlate(values, drops)
    for k, r in paper.items():
        assert got[k]["pearson"] == pytest.approx(r, abs=0.004)
        assert got[k]["spearman"] == pytest.approx(1.0)
    assert max(got, key=lambda k: got[k]["pearson"]) == "tssd"
