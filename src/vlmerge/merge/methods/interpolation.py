"""Interpolation (merging paper §4.1): a fixed-ratio weighted average of the modality copies.

    W_i = α W_i^v + (1 − α) W_i^l                                  first N − M layers
    W_i = ⅔ (α W_i^v + (1 − α) W_i^l) + ⅓ W_i^vl                   top M layers (a ``vl`` copy exists)

``α`` may be one number or a schedule per layer and module (:mod:`vlmerge.merge.schedule`); the ``vl`` share
(⅓ in the paper) is ``vl_ratio``. On two whole models (a UnIVAL-style pair) it is ``α W_1 + (1 − α) W_2``.
"""

from __future__ import annotations

import torch
from pydantic import Field, field_validator

from ..base import MergeContext, MergeMethod, MergeParams, register_method
from ..schedule import Schedule, validate_schedule, value_at


class InterpolationParams(MergeParams):
    alpha: Schedule = Field(0.5, description="vision share α in [0, 1]; a schedule: one per layer, {layer: α}, or "
                            "per module ({attn: α, mlp: α, ...} for a layer)")
    vl_ratio: float = Field(1 / 3, ge=0.0, le=1.0, description="share of the W^vl copy in the top M layers")

    @field_validator("alpha")
    @classmethod
    def _alpha_range(cls, v: Schedule) -> Schedule:
        return validate_schedule(v, 0.0, 1.0)


@register_method
class Interpolation(MergeMethod):
    name = "interpolation"
    Params = InterpolationParams
    min_inputs = 1
    max_models = 2
    propagates_nonfinite = True
    schedules = ("alpha",)
    summary = "α·W_v + (1−α)·W_l; ⅔(α·W_v + (1−α)·W_l) + ⅓·W_vl in the top M layers (paper §4.1)"

    def merge(self, tensors: list[torch.Tensor], params: MergeParams, ctx: MergeContext) -> torch.Tensor:
        p: InterpolationParams = params  # type: ignore[assignment]
        if len(tensors) == 1:
            return tensors[0]
        mods = ctx.modalities
        if mods is None and len(tensors) in (2, 3):
            mods = ("v", "l", "vl")[: len(tensors)]
        if mods is None or set(mods) not in ({"v", "l"}, {"v", "l", "vl"}):
            raise ValueError(
                f"interpolation: merges (W_v, W_l) or (W_v, W_l, W_vl), got {len(tensors)} tensors "
                f"{'with modalities ' + str(mods) if mods else ''} for {ctx.name!r}; "
                "use 'average' for N models"
            )
        by = dict(zip(mods, tensors, strict=True))
        a = value_at(p.alpha, ctx.layer, ctx.module, name=ctx.name, param="interpolation: alpha")
        out = torch.lerp(by["l"], by["v"], a, out=ctx.output(by["l"]))  # l + α (v − l) = α v + (1 − α) l
        if "vl" in by:
            out.mul_(1.0 - p.vl_ratio).add_(by["vl"], alpha=p.vl_ratio)
        return out
