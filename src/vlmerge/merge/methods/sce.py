"""SCE (Select, Calculate, Erase; FuseChat 2; mergekit's ``sce``): task vectors ``W_i − W0`` restricted to the
``select_topk`` fraction of entries that vary most across the inputs, weighted by their mean squares, with TIES's
sign consensus (:func:`~vlmerge.merge.mergekit.merge_sce` has the equations, shared with mergekit configs);
``select_topk`` (1.0, ≥ 0; ``≥ 1`` selects every entry) as in mergekit. No per-input weights (mergekit's sce has
none).
"""

from __future__ import annotations

import torch
from pydantic import Field

from ..base import MergeContext, MergeMethod, MergeParams, register_method
from ..mergekit import merge_sce


class SceParams(MergeParams):
    select_topk: float = Field(1.0, ge=0.0, description="fraction of the most varying entries kept; ≥ 1: all")


@register_method
class Sce(MergeMethod):
    name = "sce"
    Params = SceParams
    base = "required"
    min_inputs = 1
    summary = "select the most varying task-vector entries, weight by mean square, sign consensus (mergekit's sce)"

    def merge(self, tensors: list[torch.Tensor], params: MergeParams, ctx: MergeContext) -> torch.Tensor:
        assert ctx.base is not None
        return merge_sce(ctx.base, tensors, params.select_topk)  # type: ignore[attr-defined]
