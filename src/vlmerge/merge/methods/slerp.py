"""Slerp (mergekit's ``slerp``): spherical linear interpolation between two inputs.

    W = slerp(W_v, W_l; t)                                   (t = 0: W_v, t = 1: W_l)
    W = slerp(slerp(W_v, W_l; t), W_vl; vl_ratio)            top M layers (a ``vl`` copy exists)

on the flattened tensors, falling back to the linear interpolation when they are nearly colinear
(:func:`~vlmerge.merge.mergekit.merge_slerp` has the equations, shared with mergekit configs). mergekit's ``t =
0`` end is its base model; here it is the first input: ``W_v`` in a modality merge, the first of ``--inputs`` in
a soup of two models. The ``vl`` rule is this schema's extension, the spherical form of ``interpolation``'s
``⅔(…) + ⅓ W_vl`` (equal to it where the copies are colinear); ``t`` is required, as in mergekit.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from pydantic import Field

from ..base import MergeContext, MergeMethod, MergeParams, register_method
from ..mergekit import merge_slerp

ORDER = ("v", "l", "vl")


def in_modality_order(tensors: Sequence[torch.Tensor], modalities: Sequence[str] | None,
                      weights: Sequence[float] | None = None) -> tuple[list[torch.Tensor], list[float] | None]:
    """``tensors`` (and their ``weights``) reordered v, l, vl when ``modalities`` names them; else as given."""
    idx = list(range(len(tensors)))
    if modalities is not None and set(modalities) <= set(ORDER):
        idx.sort(key=lambda i: ORDER.index(modalities[i]))
    return [tensors[i] for i in idx], ([weights[i] for i in idx] if weights is not None else None)


def check_two_or_three(name: str, n: int, where: str) -> None:
    if n not in (2, 3):
        raise ValueError(f"{name}: merges two inputs (W_v, W_l), or three in the top layers (W_v, W_l, W_vl); got "
                         f"{n} for {where!r} (use multislerp or karcher for N)")


class SlerpParams(MergeParams):
    t: float = Field(description="interpolation factor: 0 gives the first input (W_v), 1 the second (W_l)")
    vl_ratio: float = Field(1 / 3, ge=0.0, le=1.0, description="share of the third input (W_vl): a second slerp")


@register_method
class Slerp(MergeMethod):
    name = "slerp"
    Params = SlerpParams
    min_inputs = 2
    max_models = 2
    summary = "spherical interpolation W_v (t=0) -> W_l (t=1); then -> W_vl by vl_ratio in the top M layers " \
              "(mergekit's slerp)"

    def merge(self, tensors: list[torch.Tensor], params: MergeParams, ctx: MergeContext) -> torch.Tensor:
        p: SlerpParams = params  # type: ignore[assignment]
        check_two_or_three(self.name, len(tensors), ctx.name)
        ts, _ = in_modality_order(tensors, ctx.modalities)
        out = merge_slerp(ts[0], ts[1], p.t)
        return merge_slerp(out, ts[2], p.vl_ratio) if len(ts) == 3 else out
