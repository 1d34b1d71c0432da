"""Karcher mean (mergekit's ``karcher``): the Riemannian mean of the N inputs' directions on the unit sphere,
scaled by their mean norm, equal weights (:func:`~vlmerge.merge.mergekit.merge_karcher` has the equations,
shared with mergekit configs); ``max_iter`` (10) and ``tol`` (1e-5) as in mergekit. No base: mergekit's planner
would add a base model as one more input; here the inputs are the slot's copies (or the soup's models) only.
"""

from __future__ import annotations

import torch
from pydantic import Field

from ..base import MergeContext, MergeMethod, MergeParams, register_method
from ..mergekit import merge_karcher


class KarcherParams(MergeParams):
    max_iter: int = Field(10, ge=0, description="most gradient steps")
    tol: float = Field(1e-5, ge=0.0, description="stop when the tangent's norm is below this")


@register_method
class Karcher(MergeMethod):
    name = "karcher"
    Params = KarcherParams
    min_inputs = 1
    summary = "Karcher (Riemannian) mean of the directions times the mean norm (mergekit's karcher)"

    def merge(self, tensors: list[torch.Tensor], params: MergeParams, ctx: MergeContext) -> torch.Tensor:
        p: KarcherParams = params  # type: ignore[assignment]
        return merge_karcher(tensors, p.max_iter, p.tol)
