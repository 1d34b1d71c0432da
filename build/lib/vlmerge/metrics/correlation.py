"""Correlation of distance metrics with merge performance drops (merging paper §7, Table 5).

``pearson`` is the sample Pearson r; ``spearman`` is Pearson r of the ranks, tied values sharing their
average rank. Pure torch (float64): scipy is only a test-time reference.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch


def _vectors(xs: Sequence[float], ys: Sequence[float]) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.as_tensor(list(xs), dtype=torch.float64).reshape(-1)
    y = torch.as_tensor(list(ys), dtype=torch.float64).reshape(-1)
    if x.numel() != y.numel():
        raise ValueError(f"correlation needs paired values; got {x.numel()} and {y.numel()}")
    if x.numel() < 2:
        raise ValueError("correlation needs at least 2 pairs")
    if not (torch.isfinite(x).all() and torch.isfinite(y).all()):
        raise ValueError("correlation values must be finite")
    return x, y


def pearson(xs: Sequence[float], ys: Sequence[float]) -> float:
    """Pearson correlation r = cov(x, y) / (σ_x σ_y); NaN when either side is constant."""
    x, y = _vectors(xs, ys)
    dx, dy = x - x.mean(), y - y.mean()
    den = math.sqrt(float(dx @ dx) * float(dy @ dy))
    return float("nan") if den == 0 else float(dx @ dy) / den


def rankdata(x: torch.Tensor) -> torch.Tensor:
    """1-based ranks; tied values get the mean of the ranks they span."""
    order = torch.argsort(x, stable=True)
    sx = x[order]
    ranks = torch.empty_like(x)
    i, n = 0, x.numel()
    while i < n:
        j = i
        while j + 1 < n and sx[j + 1] == sx[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def spearman(xs: Sequence[float], ys: Sequence[float]) -> float:
    """Spearman ρ: Pearson r of the (tie-averaged) ranks."""
    x, y = _vectors(xs, ys)
    return pearson(rankdata(x).tolist(), rankdata(y).tolist())


def correlate(
    metric_values: Mapping[str, Sequence[float]], drops: Sequence[float]
) -> dict[str, dict[str, float]]:
    """``{metric: {"pearson": r, "spearman": ρ}}`` of each metric's values against the performance drops.

    >>> r = correlate({"tssd": [0.066, 0.037, 0.015, 0.006]}, [9.16, 4.50, 2.80, 2.60])
    >>> r["tssd"]["pearson"]  # 0.971 in Table 5
    """
    return {
        name: {"pearson": pearson(v, drops), "spearman": spearman(v, drops)}
        for name, v in metric_values.items()
    }
