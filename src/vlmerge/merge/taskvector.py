"""Task-vector merges: one implementation with settings for task arithmetic, TIES, DARE, Model Breadcrumbs
and DELLA (mergekit's ``task_arithmetic``, ``ties``, ``dare_linear``, ``dare_ties``, ``breadcrumbs``,
``breadcrumbs_ties``, ``della``, ``della_linear``; vlmerge's own ``ties`` too).

Shapes: the base ``b`` and the inputs ``x_1 .. x_N`` are float tensors of one shape ``[...]`` with ``n``
entries; per input ``i`` there are scalars ``w_i`` (weight), ``ρ_i`` (density), ``γ_i`` (gamma) and ``ε_i``
(epsilon). Every intermediate below has the shape ``[...]``; sums over ``i`` run over the N inputs.

    τ_i = x_i − b                                          task vector
    τ̂_i = S(τ_i; ρ_i, γ_i, ε_i)                            sparsified (:func:`sparsify`; ``sparsify="none"``: τ_i)
    d_i = w_i τ̂_i

Consensus (``consensus``):

* ``none``: ``merged = Σ_i d_i / D`` with ``D = Σ_i w_i`` (``normalize``; ``D := 1`` when ``|D| < 1e-8``),
  else ``merged = Σ_i d_i``.
* ``sign`` (mergekit's TIES election): ``s = +1`` where ``Σ_i d_i ≥ 0``, else ``−1`` (an exactly zero sum
  elects ``+``); ``m_i = [sign(d_i) = s]`` (a dropped entry, ``d_i = 0``, never agrees);
  ``merged = Σ_i m_i d_i / D`` with ``D = Σ_i m_i w_i`` (``normalize``; ``D := 1`` where ``D = 0``), else
  ``Σ_i m_i d_i``.
* ``sign_raw`` (vlmerge's own ``ties``, :mod:`vlmerge.merge.methods.ties`): ``s = sign(Σ_i d_i)`` (``0`` on a
  zero sum: no sign is elected there); ``m_i = [sign(τ̂_i) = s ≠ 0]`` (each input votes with its own task
  vector's sign, whatever the sign of its weight); ``merged = Σ_i m_i d_i / Σ_i m_i w_i`` (``0`` where the
  divisor is 0; ``normalize``), else ``Σ_i m_i d_i``.

``out = b + λ · merged``.

Sparsification ``S(τ; ρ)`` of one task vector (any kind: ``ρ ≥ 1`` returns ``τ`` unchanged, not rescaled):

* ``magnitude`` (TIES' trim): ``ρ ≤ 0`` gives 0; else keep the ``k = max(1, ⌊ρ n⌋)`` entries of largest
  ``|τ|``: exactly ``k`` of them, equal magnitudes taken in flat (row-major) index order (mergekit leaves
  that order to torch's unstable sort); with ``keep_ties`` every entry with ``|τ| ≥`` the ``k``-th largest
  magnitude (vlmerge's ``ties``: entries tied with the ``k``-th are all kept).
* ``random`` (DARE's drop): keep entry ``j`` iff ``u_j < ρ``, ``u ~ U[0, 1)`` (``torch.rand`` of ``τ``'s
  shape from the input's generator).
* ``magnitude_outliers`` (Model Breadcrumbs): sort ``|τ|`` ascending (stable); with ``t = ⌊ρ n⌋`` and
  ``g = ⌊γ n⌋``, ``β = max(0, n − t − g)``; keep the sorted positions ``[β, β + t)``: the ``β`` smallest
  and the ``n − β − t`` largest (the outliers; fewer than ``g`` when ``t + g > n``) are dropped.
* ``della`` (DELLA's MagPrune): ``ρ ≤ 0`` gives 0; else ``0 < ρ − ε`` and ``ρ + ε < 1`` are required.
  ``τ`` is viewed as rows along dim 1 (a 1-D ``τ`` is one row ``[1, n]``; a ``[R, C]`` matrix has ``R`` rows
  of ``C`` entries); ``r_j`` is the rank of ``|τ_j|`` in its row (``1`` = smallest, equal magnitudes in
  index order), ``p_j = ρ − ε + 2ε (r_j − 1) / (C − 1)`` and entry ``j`` is kept iff ``u_j < p_j``. Rows of
  one entry (``C = 1``) leave the rank normalisation undefined: refused (mergekit fails there too).

Rescale (``rescale``, after the mask): ``τ̂ ← τ̂ · ‖τ‖₁ / ‖τ̂‖₁``, skipped when either L1 norm is below
``1e-7``. This is mergekit's rule for every kind: each sparsified task vector keeps the L1 norm of the
unsparsified one (not the DARE paper's ``1 / ρ``, nor DELLA's per-entry ``1 / p_j``).

Random kinds draw from one ``torch.Generator`` per input (:func:`input_generator`); the others are
deterministic.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from .base import tensor_seed

Sparsification = Literal["none", "magnitude", "random", "magnitude_outliers", "della"]
Consensus = Literal["none", "sign", "sign_raw"]
RESCALE_EPS = 1e-7  # below this L1 norm (before or after the mask) a task vector is not rescaled
NORMALIZE_EPS = 1e-8  # consensus none: |Σ w| below this divides by 1


@dataclass(frozen=True)
class TaskVectorSettings:
    """How :func:`merge_task_vectors` combines task vectors (see the module docstring)."""

    sparsify: Sparsification = "none"
    consensus: Consensus = "none"
    normalize: bool = False
    rescale: bool = False
    lam: float = 1.0
    keep_ties: bool = False  # magnitude: keep every entry tied with the k-th largest magnitude


def input_generator(seed: int, name: str, index: int) -> torch.Generator:
    """The generator of input ``index`` (0-based, among the merged inputs) for tensor ``name``:
    ``torch.Generator().manual_seed(tensor_seed(seed, f"{name}#{index}"))``."""
    return torch.Generator().manual_seed(tensor_seed(seed, f"{name}#{index}"))


def kth_largest(values: torch.Tensor, k: int, use_numpy: bool | None = None) -> float:
    """The ``k``-th largest entry of 1-D ``values`` (1-based), on any device. On CPU numpy's introselect
    (faster than ``torch.kthvalue`` there; benchmarks/results/merge_throughput.md); elsewhere ``kthvalue``
    on the device, which gives the same value (the same order statistic). ``use_numpy`` forces a path."""
    n = values.numel()
    if values.device.type == "cpu" if use_numpy is None else use_numpy:
        return float(np.partition(values.numpy(), n - k)[n - k])
    return float(values.kthvalue(n - k + 1).values)


def _first_k_mask(values: torch.Tensor, k: int, largest: bool) -> torch.Tensor:
    """Bool mask of the ``k`` largest (or smallest) entries of 1-D ``values``, equal values taken in index
    order: exactly the first ``k`` of a stable sort (descending, or ascending), without sorting. The ``k``-th
    value comes from a selection (:func:`kth_largest`, O(n)); entries beyond it are all in, and of those equal
    to it the lowest-indexed ``k − count`` are (a stable sort puts them first)."""
    n = values.numel()
    if k <= 0:
        return torch.zeros(n, dtype=torch.bool, device=values.device)
    if k >= n:
        return torch.ones(n, dtype=torch.bool, device=values.device)
    thr = kth_largest(values, k) if largest else kth_largest(values, n - k + 1)
    mask = values > thr if largest else values < thr
    need = k - int(mask.sum())
    if need > 0:
        mask[torch.nonzero(values == thr).reshape(-1)[:need]] = True
    return mask


def top_k_mask(values: torch.Tensor, k: int) -> torch.Tensor:
    """The ``k`` largest entries of 1-D ``values`` (ties in index order): ``sort(descending, stable)[:k]``."""
    return _first_k_mask(values, k, largest=True)


def bottom_k_mask(values: torch.Tensor, k: int) -> torch.Tensor:
    """The ``k`` smallest entries of 1-D ``values`` (ties in index order): ``sort(stable)[:k]``."""
    return _first_k_mask(values, k, largest=False)


def rescale_l1(tau: torch.Tensor, masked: torch.Tensor) -> torch.Tensor:
    """``masked · ‖τ‖₁ / ‖masked‖₁`` (unchanged when either norm is below :data:`RESCALE_EPS`)."""
    before, after = tau.abs().sum(), masked.abs().sum()
    if before < RESCALE_EPS or after < RESCALE_EPS:
        return masked
    return masked * (before / after)


def _della_probabilities(mag: torch.Tensor, density: float, epsilon: float) -> torch.Tensor:
    """``p = ρ − ε + 2ε (r − 1) / (C − 1)`` with ``r`` the rank (1 = smallest) of each magnitude along dim 1."""
    order = torch.argsort(mag, dim=1, stable=True)
    ranks = torch.empty_like(order)  # the inverse permutation of each row's order, 0-based: r − 1
    ranks.scatter_(1, order, torch.arange(mag.shape[1], device=mag.device).expand_as(order))
    ranks = ranks.to(mag.dtype)
    return (density - epsilon) + (ranks / (mag.shape[1] - 1)).clamp(0, 1) * (2 * epsilon)


def sparsify(
    tau: torch.Tensor, kind: Sparsification, density: float, *, gamma: float = 0.0, epsilon: float = 0.0,
    rescale: bool = False, keep_ties: bool = False, generator: torch.Generator | None = None,
) -> torch.Tensor:
    """``S(τ; ρ)`` of the module docstring (``τ`` any shape, float; the result has ``τ``'s shape)."""
    if kind == "none" or density >= 1:
        return tau
    n = tau.numel()
    if n == 0:
        return tau
    if kind == "magnitude":
        if density <= 0:
            return torch.zeros_like(tau)
        k = max(1, int(density * n))
        mag = tau.abs().reshape(-1)
        flat = mag >= kth_largest(mag, k) if keep_ties else top_k_mask(mag, k)
        mask = flat.reshape(tau.shape)
    elif kind == "random":
        assert generator is not None, "random sparsification needs a generator"
        mask = torch.rand(tau.shape, generator=generator, dtype=torch.float32).to(tau.device) < density
    elif kind == "magnitude_outliers":
        target, top = int(density * n), int(gamma * n)
        bottom = max(0, n - target - top)
        mag = tau.abs().reshape(-1)  # sorted ascending (stable), positions [bottom, bottom + target) are kept
        mask = (bottom_k_mask(mag, bottom + target) & ~bottom_k_mask(mag, bottom)).reshape(tau.shape)
    elif kind == "della":
        if density <= 0:
            return torch.zeros_like(tau)
        if not (density - epsilon > 0 and density + epsilon < 1):
            raise ValueError(f"della: density ± epsilon must lie in (0, 1), got density={density}, "
                             f"epsilon={epsilon}")
        rows = tau.reshape(1, -1) if tau.dim() < 2 else tau  # a 0-d tensor: one row of one entry
        if rows.shape[1] < 2:
            raise ValueError(f"della: a tensor of shape {list(tau.shape)} has rows of {rows.shape[1]} entry along "
                             "dim 1; the rank normalisation (r − 1) / (C − 1) needs C ≥ 2 (mergekit fails too)")
        assert generator is not None, "della needs a generator"
        p = _della_probabilities(rows.abs().float(), density, epsilon).reshape(tau.shape)
        mask = torch.rand(tau.shape, generator=generator, dtype=torch.float32).to(tau.device) < p
    else:
        raise ValueError(f"unknown sparsification {kind!r}")
    masked = tau * mask
    return rescale_l1(tau, masked) if rescale else masked


def merge_task_vectors(
    base: torch.Tensor, xs: Sequence[torch.Tensor], weights: Sequence[float], settings: TaskVectorSettings, *,
    density: Sequence[float] | None = None, gamma: Sequence[float] | None = None,
    epsilon: Sequence[float] | None = None, generators: Sequence[torch.Generator | None] | None = None,
) -> torch.Tensor:
    """``b + λ · merged`` of the module docstring: ``base`` and every ``xs[i]`` of one shape ``[...]`` (float);
    per-input ``weights`` / ``density`` / ``gamma`` / ``epsilon`` (default 1.0 / 1.0 / 0.0 / 0.0) and
    ``generators`` (needed by the random kinds). No inputs: the base."""
    s = settings
    m = len(xs)
    w = [float(x) for x in weights]
    dens = list(density) if density is not None else [1.0] * m
    gam = list(gamma) if gamma is not None else [0.0] * m
    eps = list(epsilon) if epsilon is not None else [0.0] * m
    gens = list(generators) if generators is not None else [None] * m
    if not m:
        return base
    taus = [sparsify(x - base, s.sparsify, di, gamma=gi, epsilon=ei, rescale=s.rescale, keep_ties=s.keep_ties,
                     generator=g) for x, di, gi, ei, g in zip(xs, dens, gam, eps, gens, strict=True)]
    if s.consensus == "sign":
        deltas = [tau * wi for tau, wi in zip(taus, w, strict=True)]
        total = torch.zeros_like(base)
        for d in deltas:
            total.add_(d)
        elected = torch.where(total >= 0, 1.0, -1.0)
        num, den = torch.zeros_like(base), torch.zeros_like(base)
        for d, wi in zip(deltas, w, strict=True):
            agree = torch.sign(d) == elected
            num.add_(torch.where(agree, d, 0.0))
            den.add_(agree.to(den.dtype), alpha=wi)
        merged = num / torch.where(den == 0, 1.0, den) if s.normalize else num
    elif s.consensus == "sign_raw":
        total = torch.zeros_like(base)
        for tau, wi in zip(taus, w, strict=True):
            total.add_(tau, alpha=wi)
        sign = torch.sign(total)
        num, den = torch.zeros_like(base), torch.zeros_like(base)
        for tau, wi in zip(taus, w, strict=True):
            agree = (torch.sign(tau) == sign) & (tau != 0)
            num.add_(torch.where(agree, tau, 0.0), alpha=wi)
            den.add_(agree.to(den.dtype), alpha=wi)
        merged = torch.where(den != 0, num / torch.where(den != 0, den, 1.0), 0.0) if s.normalize else num
    elif s.consensus == "none":
        merged = torch.zeros_like(base)
        for tau, wi in zip(taus, w, strict=True):
            merged.add_(tau, alpha=wi)
        if s.normalize:
            total_w = sum(w)
            merged = merged / (total_w if abs(total_w) >= NORMALIZE_EPS else 1.0)
    else:
        raise ValueError(f"unknown consensus {s.consensus!r}")
    return base + s.lam * merged
