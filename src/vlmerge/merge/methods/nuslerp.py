"""NuSLERP (mergekit's ``nuslerp``): slerp of two inputs with the factor ``t = w_2 / (w_1 + w_2)`` from their
weights, of the task vectors ``W_i − W0`` when a base is given (then ``W0 +`` the result), flattened or per row /
column (:func:`~vlmerge.merge.mergekit.merge_nuslerp` has the equations, shared with mergekit configs).

A slot with a third copy (``W_vl``, the top M layers) is merged in two steps, ``nuslerp(nuslerp(W_v, W_l; w_v,
w_l), W_vl; w_v + w_l, w_vl)``: this schema's extension (with linear interpolation it is the weighted mean).
Weights: ``--weights`` (default 1 each, where mergekit requires one per model); ``nuslerp_flatten`` (true),
``nuslerp_row_wise`` (false) as in mergekit.
"""

from __future__ import annotations

import torch
from pydantic import Field

from ..base import MergeContext, MergeMethod, MergeParams, register_method
from ..mergekit import merge_nuslerp
from .slerp import check_two_or_three, in_modality_order


class NuslerpParams(MergeParams):
    nuslerp_flatten: bool = Field(True, description="slerp the whole flattened tensor")
    nuslerp_row_wise: bool = Field(False, description="without flatten: slerp columns x[:, j] instead of rows")


@register_method
class Nuslerp(MergeMethod):
    name = "nuslerp"
    Params = NuslerpParams
    base = "optional"
    uses_weights = True
    min_inputs = 2
    max_models = 2
    summary = "slerp with t = w_2 / (w_1 + w_2), of task vectors with a base; W_vl in a second step " \
              "(mergekit's nuslerp)"

    def merge(self, tensors: list[torch.Tensor], params: MergeParams, ctx: MergeContext) -> torch.Tensor:
        p: NuslerpParams = params  # type: ignore[assignment]
        check_two_or_three(self.name, len(tensors), ctx.name)
        ts, w = in_modality_order(tensors, ctx.modalities, ctx.weights or (1.0,) * len(tensors))
        assert w is not None
        out = merge_nuslerp(ctx.base, ts[:2], w[:2], p.nuslerp_row_wise, p.nuslerp_flatten)
        if len(ts) == 3:
            out = merge_nuslerp(ctx.base, [out, ts[2]], [w[0] + w[1], w[2]], p.nuslerp_row_wise, p.nuslerp_flatten)
        return out
