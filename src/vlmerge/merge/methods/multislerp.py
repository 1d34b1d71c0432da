"""Multi-SLERP (mergekit's ``multislerp``): the weighted barycentre of N ≥ 1 inputs on the hypersphere, of the
task vectors ``W_i − W0`` when a base is given (:func:`~vlmerge.merge.mergekit.merge_multislerp` has the
equations, shared with mergekit configs). Weights: ``--weights`` (default 1 each, where mergekit requires one per
model); ``normalize_weights`` (true), ``eps`` (1e-8) as in mergekit.
"""

from __future__ import annotations

import torch
from pydantic import Field

from ..base import MergeContext, MergeMethod, MergeParams, register_method
from ..mergekit import merge_multislerp


class MultislerpParams(MergeParams):
    normalize_weights: bool = Field(True, description="divide the weights by their sum")
    eps: float = Field(1e-8, ge=0.0, description="added to norms before dividing")


@register_method
class Multislerp(MergeMethod):
    name = "multislerp"
    Params = MultislerpParams
    base = "optional"
    uses_weights = True
    min_inputs = 1
    summary = "weighted barycentric slerp of N inputs (task vectors with a base) (mergekit's multislerp)"

    def merge(self, tensors: list[torch.Tensor], params: MergeParams, ctx: MergeContext) -> torch.Tensor:
        p: MultislerpParams = params  # type: ignore[assignment]
        w = ctx.weights or (1.0,) * len(tensors)
        try:
            return merge_multislerp(ctx.base, tensors, w, p.normalize_weights, p.eps)
        except ValueError as e:
            raise ValueError(f"{ctx.name}: {e}") from None
