"""RegMean (Jin et al. 2023; merging paper §4.1): the closed-form merge of linear layers.

For a linear layer seen by modality m with inputs X_m [tokens, in] and Gram G_m = X_mᵀ X_m [in, in],
the merged weight minimises Σ_m ‖X_m W − X_m W_m‖² (W in the paper's [in, out] layout):

    G̃_m = γ G_m + (1 − γ) diag(G_m)
    W   = (Σ_m G̃_m)⁻¹ Σ_m G̃_m W_m

A torch ``nn.Linear`` stores Wᵀ ([out, in]), so here ``merged.T = (Σ G̃_m)⁻¹ Σ G̃_m W_mᵀ``. The solve runs in
float64 through a Cholesky factorisation; when Σ G̃_m is singular (a feature never seen, fewer tokens
than inputs at γ = 1) a small ridge ε·mean(diag)·I is added (ε = 1e-8, growing ×100 up to 1e-2), then a
least-squares solve, with a warning. Every other parameter (LayerNorm, biases) is averaged evenly.
"""

from __future__ import annotations

import warnings

import torch
from pydantic import Field

from ..base import MergeContext, MergeMethod, MergeParams, register_method


class RegMeanParams(MergeParams):
    gamma: float = Field(1.0, ge=0.0, le=1.0, description="scale γ of the Grams' off-diagonal entries")


def reduce_off_diagonal(gram: torch.Tensor, gamma: float) -> torch.Tensor:
    """G̃ = γ G + (1 − γ) diag(G), float64 [in, in]."""
    g = gram.to(torch.float64)
    if gamma == 1.0:
        return g
    out = g * gamma
    out.diagonal().add_(g.diagonal(), alpha=1.0 - gamma)
    return out


def solve_spd(a: torch.Tensor, b: torch.Tensor, name: str = "tensor") -> torch.Tensor:
    """Solve ``a x = b`` for a symmetric PSD ``a`` [n, n] (float64), with a ridge / lstsq fallback."""
    chol, info = torch.linalg.cholesky_ex(a)
    if int(info) == 0:
        return torch.cholesky_solve(b, chol)
    scale = float(a.diagonal().abs().mean()) or 1.0
    eps = 1e-8
    while eps <= 1e-2:
        ridge = a.clone()
        ridge.diagonal().add_(eps * scale)
        chol, info = torch.linalg.cholesky_ex(ridge)
        if int(info) == 0:
            warnings.warn(
                f"regmean: Σ G̃ of {name!r} is singular; solved with ridge {eps:g}·mean(diag)",
                RuntimeWarning,
                stacklevel=3,
            )
            return torch.cholesky_solve(b, chol)
        eps *= 100
    warnings.warn(
        f"regmean: Σ G̃ of {name!r} is singular; used a least-squares solve", RuntimeWarning, stacklevel=3
    )
    return torch.linalg.lstsq(a, b).solution


def regmean_linear(
    weights: list[torch.Tensor], grams: tuple[torch.Tensor, ...], gamma: float, name: str = "tensor"
) -> torch.Tensor:
    """RegMean of linear weights ``weights[m]`` [out, in] with Grams ``grams[m]`` [in, in] -> [out, in]."""
    a = torch.zeros_like(grams[0], dtype=torch.float64)
    b = torch.zeros(weights[0].shape[1], weights[0].shape[0], dtype=torch.float64)
    for w, g in zip(weights, grams, strict=True):
        gt = reduce_off_diagonal(g, gamma)
        a.add_(gt)
        b.add_(gt @ w.to(torch.float64).T)
    return solve_spd(a, b, name).T.to(torch.float32).contiguous()


@register_method
class RegMean(MergeMethod):
    name = "regmean"
    Params = RegMeanParams
    uses_grams = True
    min_inputs = 1
    summary = "W = (Σ G̃_m)⁻¹ Σ G̃_m W_m for linear weights, evenly averaged otherwise (Jin et al.)"

    def merge(self, tensors: list[torch.Tensor], params: MergeParams, ctx: MergeContext) -> torch.Tensor:
        if len(tensors) == 1:
            return tensors[0]
        if ctx.linear:
            if ctx.grams is None:
                raise ValueError(f"regmean: linear weight {ctx.name!r} needs one Gram matrix per input")
            return regmean_linear(tensors, ctx.grams, params.gamma, ctx.name)  # type: ignore[attr-defined]
        out = tensors[0].clone()
        for t in tensors[1:]:
            out.add_(t)
        return out.div_(len(tensors))
