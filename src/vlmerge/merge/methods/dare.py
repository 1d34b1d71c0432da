"""DARE (Yu et al. 2023, "Language Models are Super Mario"): drop-and-rescale task vectors, then combine
linearly (mergekit's ``dare_linear``).

For inputs W_m, base W0, τ_m = W_m − W0 and weights w_m (default 1):

    τ̃_m = (M_m ⊙ τ_m) / (1 − p),    M_m ~ Bernoulli(1 − p) entrywise (seeded)
    W   = W0 + λ Σ_m w_m τ̃_m / Σ_m w_m      (``normalize=True``, the default: an average of task vectors)
    W   = W0 + λ Σ_m w_m τ̃_m                 (``normalize=False``: a sum, task arithmetic)

Masks come from numpy's PCG64 generator seeded with ``s``, drawn in input order as uint32 integers ``u``
with ``M = u ≥ round(p · 2³²)`` (keep probability 1 − p to within 2⁻³²; the rescale uses that exact
probability). ``s = seed`` for :func:`~vlmerge.merge.merge_tensors` and ``tensor_seed(seed, name)`` per
tensor in a checkpoint merge (so the result does not depend on the order tensors are visited). uint32 draws
cost ~5 ns an entry against ~16 ns for ``torch.rand`` with a seeded CPU generator: the draw, not the
arithmetic, bounds DARE's speed.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
from pydantic import Field

from ..base import MergeContext, MergeMethod, MergeParams, register_method, tensor_seed


class DareParams(MergeParams):
    drop: float = Field(0.5, ge=0.0, lt=1.0, description="drop rate p of each task vector's entries")
    seed: int = Field(0, ge=0, description="seed of the drop masks")
    lam: float = Field(1.0, ge=0.0, description="scaling λ of the combined task vectors")
    normalize: bool = Field(True, description="divide by Σ w_m (average) instead of summing")


def _threshold(drop: float) -> tuple[int, float]:
    """(uint32 threshold, exact keep probability) for drop rate ``drop``."""
    t = min(round(drop * 2**32), 2**32 - 1)
    return t, (2**32 - t) / 2**32


def _masks(shape: torch.Size | tuple[int, ...], drop: float, seed: int) -> Iterator[torch.Tensor]:
    rng = np.random.Generator(np.random.PCG64(seed))
    t, _ = _threshold(drop)
    n = int(np.prod(shape, dtype=np.int64))
    while True:
        yield torch.from_numpy(rng.integers(0, 2**32, size=n, dtype=np.uint32) >= t).view(tuple(shape))


def dare_keep_masks(
    shape: torch.Size | tuple[int, ...], n: int, drop: float, seed: int
) -> list[torch.Tensor]:
    """The ``n`` boolean keep-masks DARE draws for one slot (True = kept), reproducible from ``seed``."""
    masks = _masks(shape, drop, seed)
    return [next(masks) for _ in range(n)]


@register_method
class Dare(MergeMethod):
    name = "dare"
    Params = DareParams
    base = "required"
    uses_weights = True
    min_inputs = 2
    summary = "drop task-vector entries with rate p, rescale by 1/(1−p), then combine linearly (Yu et al.)"

    def merge(self, tensors: list[torch.Tensor], params: MergeParams, ctx: MergeContext) -> torch.Tensor:
        p: DareParams = params  # type: ignore[assignment]
        assert ctx.base is not None
        w = ctx.weights or (1.0,) * len(tensors)
        scale = 1.0 / sum(w) if p.normalize else 1.0
        if p.normalize and sum(w) == 0:
            raise ValueError(f"dare: weights sum to 0 for {ctx.name!r}; cannot normalize")
        seed = tensor_seed(p.seed, ctx.name) if ctx.per_tensor_seed else p.seed
        out = ctx.base.clone()
        coef = p.lam * scale / _threshold(p.drop)[1]
        for t, wi, keep in zip(tensors, w, _masks(ctx.base.shape, p.drop, seed), strict=False):
            out.add_((t - ctx.base).mul_(keep.to(t.device)), alpha=coef * wi)
        return out
