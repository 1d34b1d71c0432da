"""Interpolation (merging paper §4.1): a fixed-ratio weighted average of the modality copies.

    W_i = α W_i^v + (1 − α) W_i^l                                  first N − M layers
    W_i = ⅔ (α W_i^v + (1 − α) W_i^l) + ⅓ W_i^vl                   top M layers (a ``vl`` copy exists)

``α`` may be one number or a per-layer schedule (a list of N values, or ``{layer: α}``); the ``vl`` share
(⅓ in the paper) is ``vl_ratio``. On two whole models (a UnIVAL-style pair) it is ``α W_1 + (1 − α) W_2``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from pydantic import Field, field_validator

from ..base import MergeContext, MergeMethod, MergeParams, register_method

Alpha = float | list[float] | dict[int, float]


class InterpolationParams(MergeParams):
    alpha: Alpha = Field(0.5, description="vision share α in [0, 1]; a list (one per layer) or {layer: α}")
    vl_ratio: float = Field(1 / 3, ge=0.0, le=1.0, description="share of the W^vl copy in the top M layers")

    @field_validator("alpha")
    @classmethod
    def _alpha_range(cls, v: Alpha) -> Alpha:
        values = v.values() if isinstance(v, dict) else v if isinstance(v, list) else [v]
        if isinstance(v, (list, dict)) and not v:
            raise ValueError("an alpha schedule needs at least one value")
        if isinstance(v, dict) and any(k < 0 for k in v):
            raise ValueError("alpha schedule layers must be ≥ 0")
        for a in values:
            if not 0.0 <= a <= 1.0:
                raise ValueError("each alpha must be in [0, 1]")
        return v


def alpha_at(alpha: Alpha, layer: int | None, name: str = "tensor") -> float:
    """The α of ``layer`` under a scalar or per-layer schedule."""
    if isinstance(alpha, float | int):
        return float(alpha)
    if layer is None:
        raise ValueError(
            f"interpolation: an alpha schedule needs a layer, and {name!r} has none (pass layer=)"
        )
    if isinstance(alpha, list):
        if layer >= len(alpha):
            raise ValueError(f"interpolation: alpha schedule has {len(alpha)} values; layer {layer} has none")
        return float(alpha[layer])
    if layer not in alpha:
        raise ValueError(
            f"interpolation: alpha schedule has no entry for layer {layer} (has {sorted(alpha)})"
        )
    return float(alpha[layer])


@register_method
class Interpolation(MergeMethod):
    name = "interpolation"
    Params = InterpolationParams
    min_inputs = 1
    max_models = 2
    propagates_nonfinite = True
    summary = "α·W_v + (1−α)·W_l; ⅔(α·W_v + (1−α)·W_l) + ⅓·W_vl in the top M layers (paper §4.1)"

    def check_layers(self, params: MergeParams, layers: Sequence[int | None]) -> None:
        alpha = params.alpha  # type: ignore[attr-defined]
        if isinstance(alpha, float | int):
            return
        if None in layers:
            raise ValueError(
                "interpolation: an alpha schedule applies to transformer-block layers; a tensor "
                "outside the blocks has no layer (use one alpha)"
            )
        known = sorted({x for x in layers if x is not None})
        if isinstance(alpha, list) and known and len(alpha) != known[-1] + 1:
            raise ValueError(
                f"interpolation: alpha schedule has {len(alpha)} values; the model has "
                f"{known[-1] + 1} layers (give one per layer)"
            )
        for layer in known:
            alpha_at(alpha, layer)

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
        a = alpha_at(p.alpha, ctx.layer, ctx.name)
        out = torch.lerp(by["l"], by["v"], a, out=ctx.output(by["l"]))  # l + α (v − l) = α v + (1 − α) l
        if "vl" in by:
            out.mul_(1.0 - p.vl_ratio).add_(by["vl"], alpha=p.vl_ratio)
        return out
