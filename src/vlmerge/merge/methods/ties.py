"""TIES merging (Yadav et al. 2023): trim, elect sign, disjoint merge of task vectors.

For inputs W_m and base W0, with τ_m = W_m − W0 and weights w_m (default 1):

1. **trim**:  τ̂_m keeps the ``density`` fraction of τ_m's entries with the largest |τ_m| (the rest -> 0);
   k = ⌊density · numel⌋ (at least 1), entries tied with the k-th largest magnitude are all kept.
2. **elect**: γ = sign(Σ_m w_m τ̂_m)  (the sign carrying the larger total mass).
3. **disjoint merge**: τ = Σ_m w_m τ̂_m [sign τ̂_m = γ] / Σ_m w_m [sign τ̂_m = γ]  (0 where none agree).

    W = W0 + λ τ

In a modality merge the "tasks" are the modality copies of one slot, W0 the VL-stage start weights.
"""

from __future__ import annotations

import numpy as np
import torch
from pydantic import Field

from ..base import MergeContext, MergeMethod, MergeParams, register_method


class TiesParams(MergeParams):
    density: float = Field(0.5, gt=0.0, le=1.0, description="fraction of each task vector kept")
    lam: float = Field(1.0, ge=0.0, description="scaling λ of the merged task vector")


def trim_to_density(tau: torch.Tensor, density: float) -> torch.Tensor:
    """Zero all but the ``density`` fraction of largest-magnitude entries of ``tau`` (any shape)."""
    if density >= 1.0:
        return tau
    n = tau.numel()
    k = max(1, int(density * n))
    mag = tau.abs().reshape(-1)
    thr = kth_largest(mag, k)
    return tau * (mag >= thr).reshape(tau.shape)


def kth_largest(values: torch.Tensor, k: int, use_numpy: bool | None = None) -> float:
    """The ``k``-th largest entry of 1-D ``values`` (1-based), on any device. On CPU numpy's introselect
    (faster than ``torch.kthvalue`` there; benchmarks/results/merge_throughput.md); elsewhere ``kthvalue``
    on the device, which gives the same value (the same order statistic). ``use_numpy`` forces a path."""
    n = values.numel()
    if values.device.type == "cpu" if use_numpy is None else use_numpy:
        return float(np.partition(values.numpy(), n - k)[n - k])
    return float(values.kthvalue(n - k + 1).values)


@register_method
class Ties(MergeMethod):
    name = "ties"
    Params = TiesParams
    base = "required"
    uses_weights = True
    min_inputs = 2
    summary = "trim to density, elect sign by summed mass, disjoint mean of task vectors (Yadav et al.)"

    def merge(self, tensors: list[torch.Tensor], params: MergeParams, ctx: MergeContext) -> torch.Tensor:
        p: TiesParams = params  # type: ignore[assignment]
        assert ctx.base is not None
        w = ctx.weights or (1.0,) * len(tensors)
        trimmed = [trim_to_density(t - ctx.base, p.density) for t in tensors]
        total = torch.zeros_like(ctx.base)
        for tau, wi in zip(trimmed, w, strict=True):
            total.add_(tau, alpha=wi)
        sign = torch.sign(total)
        num = torch.zeros_like(ctx.base)
        den = torch.zeros_like(ctx.base)
        for tau, wi in zip(trimmed, w, strict=True):
            agree = (torch.sign(tau) == sign) & (tau != 0)
            num.add_(torch.where(agree, tau, 0.0), alpha=wi)
            den.add_(agree.to(den.dtype), alpha=wi)
        merged = torch.where(den != 0, num / torch.where(den != 0, den, 1.0), 0.0)
        return ctx.base + p.lam * merged
