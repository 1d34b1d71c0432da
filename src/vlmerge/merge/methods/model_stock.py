"""Model Stock (Jang et al. 2024; mergekit's ``model_stock``): the average of k ≥ 2 inputs pulled toward the
base W0 by a ratio from the angle between their offsets, ``W = t·mean(W_i) + (1 − t)·W0`` with ``t = k·cos /
(1 + (k − 1)·cos)`` (:func:`~vlmerge.merge.mergekit.merge_model_stock` has the equations, shared with mergekit
configs); ``filter_wise`` (false: one ratio per tensor; true: per row) as in mergekit.
"""

from __future__ import annotations

import torch
from pydantic import Field

from ..base import MergeContext, MergeMethod, MergeParams, register_method
from ..mergekit import merge_model_stock


class ModelStockParams(MergeParams):
    filter_wise: bool = Field(False, description="one interpolation ratio per row instead of per tensor")


@register_method
class ModelStock(MergeMethod):
    name = "model_stock"
    Params = ModelStockParams
    base = "required"
    min_inputs = 2
    summary = "t·mean(W_i) + (1 − t)·W0, t from the mean cosine of the offsets (Jang et al.; mergekit's " \
              "model_stock)"

    def merge(self, tensors: list[torch.Tensor], params: MergeParams, ctx: MergeContext) -> torch.Tensor:
        assert ctx.base is not None
        return merge_model_stock(ctx.base, tensors, params.filter_wise)  # type: ignore[attr-defined]
