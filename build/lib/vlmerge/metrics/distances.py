"""Distances between two weight vectors (merging paper §7). Inputs: tensors of any shape, flattened.

* ``l2(x, y)      = sqrt(Σ_i (x_i − y_i)²)``
* ``cosine(x, y)  = 1 − x·y / (‖x‖ ‖y‖)``            (dissimilarity; 0 if both are zero, 1 if one is)
* ``ssd(x, y)     = 1 − (1/L) Σ_i |x_i + y_i| / (|x_i| + |y_i|)``      (eq. 1, soft sign dissimilarity)
* ``tssd(x, y, k) = ssd`` after zeroing the ``k`` fraction of smallest-magnitude entries of x and of y

**Zero–zero positions.** Eq. 1's term is 0/0 where x_i = y_i = 0. Following the paper's TSSD rule ("we
do not include the similarity of two zero values": merging two zeros changes nothing), such positions are
left out of the sum *and* of L, for SSD and TSSD alike; with no position left the dissimilarity is 0.
A position where exactly one value is 0 has similarity 1. Pass ``ignore_zeros=False`` to count zero–zero
positions as similarity 1 with L = the full size instead.

Sums accumulate in float64; :class:`DistanceAccumulator` streams the first three over tensor pairs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch


def _pair(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if x.numel() != y.numel():
        raise ValueError(f"x has {x.numel()} entries and y has {y.numel()}; distances need equal sizes")
    if x.numel() == 0:
        raise ValueError("distances need non-empty tensors")
    return x.detach().reshape(-1).to(torch.float32), y.detach().reshape(-1).to(torch.float32)


def l2(x: torch.Tensor, y: torch.Tensor) -> float:
    """Euclidean distance ‖x − y‖₂ (float64 accumulation)."""
    a, b = _pair(x, y)
    return math.sqrt(float(((a - b).to(torch.float64) ** 2).sum()))


def cosine(x: torch.Tensor, y: torch.Tensor) -> float:
    """Cosine dissimilarity 1 − x·y / (‖x‖‖y‖); 0 when both are zero vectors, 1 when exactly one is."""
    a, b = _pair(x, y)
    a64, b64 = a.to(torch.float64), b.to(torch.float64)
    return _cosine_from(float(a64 @ b64), float(a64 @ a64), float(b64 @ b64))


def _cosine_from(dot: float, xx: float, yy: float) -> float:
    if xx == 0 and yy == 0:
        return 0.0
    if xx == 0 or yy == 0:
        return 1.0
    return 1.0 - dot / math.sqrt(xx * yy)


def soft_sign_terms(a: torch.Tensor, b: torch.Tensor) -> tuple[float, int, int]:
    """(Σ |a+b|/(|a|+|b|) over positions not both zero, count of those positions, count of zero–zero)."""
    den = a.abs() + b.abs()
    nz = den != 0
    sim = (a + b).abs() / torch.where(nz, den, 1.0)
    n = int(nz.sum())
    return float(sim[nz].sum(dtype=torch.float64)) if n else 0.0, n, a.numel() - n


def _ssd_from(sim_sum: float, n: int, zz: int, ignore_zeros: bool) -> float:
    if not ignore_zeros:
        return 1.0 - (sim_sum + zz) / (n + zz)
    return 0.0 if n == 0 else 1.0 - sim_sum / n


def ssd(x: torch.Tensor, y: torch.Tensor, *, ignore_zeros: bool = True) -> float:
    """Soft sign dissimilarity, paper eq. 1 (zero–zero positions: see the module docstring)."""
    a, b = _pair(x, y)
    return _ssd_from(*soft_sign_terms(a, b), ignore_zeros)


def truncate_smallest(x: torch.Tensor, k: float) -> torch.Tensor:
    """Zero the ``k`` fraction (⌊k·L⌋ entries) of smallest-magnitude entries of flat ``x``.

    The threshold is the ⌊k·L⌋-th smallest |x_i| (``numpy.partition``); entries tied with it are zeroed too.
    """
    if not 0.0 <= k < 1.0:
        raise ValueError(f"tssd: k must be in [0, 1), got {k}")
    n = int(k * x.numel())
    if n == 0:
        return x
    mag = x.abs()
    thr = float(np.partition(mag.numpy(), n - 1)[n - 1])  # numpy introselect: ~15x torch.kthvalue on CPU
    return torch.where(mag > thr, x, 0.0)


def tssd(x: torch.Tensor, y: torch.Tensor, k: float = 0.5, *, ignore_zeros: bool = True) -> float:
    """Truncated soft sign dissimilarity (paper §7): zero the k = 50% smallest-magnitude entries of x and of
    y separately, then SSD over the positions that are not zero in both."""
    a, b = _pair(x, y)
    return ssd(truncate_smallest(a, k), truncate_smallest(b, k), ignore_zeros=ignore_zeros)


@dataclass
class DistanceAccumulator:
    """Streams L2, cosine and SSD over pairs of tensors (the concatenation, one pair at a time)."""

    sq: float = 0.0
    dot: float = 0.0
    xx: float = 0.0
    yy: float = 0.0
    sim: float = 0.0
    n: int = 0
    zz: int = 0
    numel: int = 0

    def add(self, x: torch.Tensor, y: torch.Tensor) -> None:
        a, b = _pair(x, y)
        a64, b64 = a.to(torch.float64), b.to(torch.float64)
        self.sq += float(((a64 - b64) ** 2).sum())
        self.dot += float(a64 @ b64)
        self.xx += float(a64 @ a64)
        self.yy += float(b64 @ b64)
        s, n, zz = soft_sign_terms(a, b)
        self.sim += s
        self.n += n
        self.zz += zz
        self.numel += a.numel()

    def merge(self, other: DistanceAccumulator) -> None:
        for f in ("sq", "dot", "xx", "yy", "sim", "n", "zz", "numel"):
            setattr(self, f, getattr(self, f) + getattr(other, f))

    def result(self, ignore_zeros: bool = True) -> dict[str, float]:
        return {
            "l2": math.sqrt(self.sq),
            "cosine": _cosine_from(self.dot, self.xx, self.yy),
            "ssd": _ssd_from(self.sim, self.n, self.zz, ignore_zeros),
        }
