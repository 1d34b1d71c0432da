"""Weighted averaging of N ≥ 2 inputs: model soups and UnIVAL's multi-task merges (UnIVAL §5).

    W = Σ_m w_m W_m / Σ_m w_m                     (``normalize=True``; uniform w_m = 1/N by default)
    W = Σ_m w_m W_m                                 (``normalize=False``)

With a base W0 the weights act on task vectors: ``W = W0 + Σ_m ŵ_m (W_m − W0)`` (ŵ normalised or not);
when normalised this equals the plain average.
"""

from __future__ import annotations

import torch

from ..base import MergeContext, MergeMethod, MergeParams, register_method


class AverageParams(MergeParams):
    normalize: bool = True


@register_method
class Average(MergeMethod):
    name = "average"
    Params = AverageParams
    base = "optional"
    uses_weights = True
    min_inputs = 2
    propagates_nonfinite = True
    summary = "Σ w_m·W_m / Σ w_m, uniform 1/N by default (UnIVAL §5 soups)"

    def merge(self, tensors: list[torch.Tensor], params: MergeParams, ctx: MergeContext) -> torch.Tensor:
        n = len(tensors)
        w = list(ctx.weights) if ctx.weights is not None else [1.0 / n] * n
        if params.normalize:  # type: ignore[attr-defined]
            total = sum(w)
            if total == 0:
                raise ValueError(f"average: weights sum to 0 for {ctx.name!r}; cannot normalize")
            w = [x / total for x in w]
        if ctx.base is not None:
            out = torch.mul(ctx.base, 1.0 - sum(w), out=ctx.output(ctx.base))
            for t, wi in zip(tensors, w, strict=True):
                out.add_(t, alpha=wi)
            return out
        out = torch.mul(tensors[0], w[0], out=ctx.output(tensors[0]))
        for t, wi in zip(tensors[1:], w[1:], strict=True):
            out.add_(t, alpha=wi)
        return out
