"""TIES merging (Yadav et al. 2023): trim, elect sign, disjoint merge of task vectors.

For inputs W_m and base W0, with τ_m = W_m − W0 and weights w_m (default 1):

1. **trim**:  τ̂_m keeps the ``density`` fraction of τ_m's entries with the largest |τ_m| (the rest -> 0);
   k = ⌊density · numel⌋ (at least 1), entries tied with the k-th largest magnitude are all kept.
2. **elect**: γ = sign(Σ_m w_m τ̂_m)  (the sign carrying the larger total mass).
3. **disjoint merge**: τ = Σ_m w_m τ̂_m [sign τ̂_m = γ] / Σ_m w_m [sign τ̂_m = γ]  (0 where none agree).

    W = W0 + λ τ

In a modality merge the "tasks" are the modality copies of one slot, W0 the VL-stage start weights.

Computed by :func:`~vlmerge.merge.taskvector.merge_task_vectors` (``sparsify="magnitude"``, ``keep_ties``,
``consensus="sign_raw"``, ``normalize``). mergekit's ``ties`` (a mergekit config's ``merge_method: ties``)
differs on purpose: exactly k entries are kept, a zero sum elects +, each model votes with ``sign(w_m τ̂_m)``,
and an entry whose agreeing weights sum to 0 keeps the agreeing sum.
"""

from __future__ import annotations

import torch
from pydantic import Field

from ..base import MergeContext, MergeMethod, MergeParams, register_method
from ..taskvector import TaskVectorSettings, kth_largest, merge_task_vectors, sparsify

__all__ = ["Ties", "TiesParams", "kth_largest", "trim_to_density"]


class TiesParams(MergeParams):
    density: float = Field(0.5, gt=0.0, le=1.0, description="fraction of each task vector kept")
    lam: float = Field(1.0, ge=0.0, description="scaling λ of the merged task vector")


def trim_to_density(tau: torch.Tensor, density: float) -> torch.Tensor:
    """Zero all but the ``density`` fraction of largest-magnitude entries of ``tau`` (any shape), entries tied
    with the ``k``-th largest magnitude kept (:func:`~vlmerge.merge.taskvector.sparsify`, ``keep_ties``)."""
    return sparsify(tau, "magnitude", density, keep_ties=True)


@register_method
class Ties(MergeMethod):
    name = "ties"
    Params = TiesParams
    base = "required"
    uses_weights = True
    min_inputs = 2
    summary = "trim to density, elect sign by summed mass, disjoint mean of task vectors (Yadav et al.)"

    def merge(self, tensors: list[torch.Tensor], params: MergeParams, ctx: MergeContext) -> torch.Tensor:
        p: TiesParams = params  # type: ignore[assignment]
        assert ctx.base is not None
        w = ctx.weights or (1.0,) * len(tensors)
        settings = TaskVectorSettings(sparsify="magnitude", keep_ties=True, consensus="sign_raw", normalize=True,
                                      lam=p.lam)
        return merge_task_vectors(ctx.base, tensors, w, settings, density=[p.density] * len(tensors))
