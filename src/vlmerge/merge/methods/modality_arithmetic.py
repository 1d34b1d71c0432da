"""Modality arithmetic (merging paper §4.1): task vectors (Ilharco et al.) per modality.

    τ_i^m = W_i^m − W_i^0,   W_i = W_i^0 + λ Σ_m τ_i^m,   m ∈ {v, l} (first N − M layers), {v, l, vl} (top M)

W^0 is the base: the weights the VL stage started from. With two modalities, λ = 0.5 equals interpolation
with α = 0.5 (the paper's Table 2 note). On whole models it is plain task arithmetic. ``λ`` may be one number or a
schedule per layer and module (:mod:`vlmerge.merge.schedule`), e.g. one learned on data.
"""

from __future__ import annotations

import torch
from pydantic import Field, field_validator

from ..base import MergeContext, MergeMethod, MergeParams, register_method
from ..schedule import Schedule, validate_schedule, value_at


class ModalityArithmeticParams(MergeParams):
    lam: Schedule = Field(0.5, description="scaling λ ≥ 0 of the summed modality vectors; a schedule: one per "
                          "layer, {layer: λ}, or per module")

    @field_validator("lam")
    @classmethod
    def _lam_range(cls, v: Schedule) -> Schedule:
        return validate_schedule(v, 0.0, None)


@register_method
class ModalityArithmetic(MergeMethod):
    name = "modality_arithmetic"
    Params = ModalityArithmeticParams
    base = "required"
    min_inputs = 1
    propagates_nonfinite = True
    schedules = ("lam",)
    summary = "W0 + λ·Σ_m (W_m − W0) (paper §4.1; task arithmetic on whole models)"

    def merge(self, tensors: list[torch.Tensor], params: MergeParams, ctx: MergeContext) -> torch.Tensor:
        lam = value_at(params.lam, ctx.layer, ctx.module, name=ctx.name,  # type: ignore[attr-defined]
                       param="modality_arithmetic: lam")
        assert ctx.base is not None
        # W0 + λ Σ (W_m − W0) = (1 − λ n) W0 + λ Σ W_m: one output buffer, n + 1 passes.
        out = torch.mul(ctx.base, 1.0 - lam * len(tensors), out=ctx.output(ctx.base))
        for t in tensors:
            out.add_(t, alpha=lam)
        return out
