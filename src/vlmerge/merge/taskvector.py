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
* ``random`` (DARE's drop): keep entry ``j`` with probability ``ρ`` (to 2^-24: ``K(ρ) / 2^24``), independently:
  iff ``V_j < K(ρ)`` for the ``j``-th 24-bit uniform ``V`` (flat, row-major order) of the input's generator
  (:class:`KeepDraws`; ``K(ρ) = ⌈float32(ρ) 2^24⌉``, so this is the law of numpy's float32 ``u_j < ρ``).
* ``magnitude_outliers`` (Model Breadcrumbs): sort ``|τ|`` ascending (stable); with ``t = ⌊ρ n⌋`` and
  ``g = ⌊γ n⌋``, ``β = max(0, n − t − g)``; keep the sorted positions ``[β, β + t)``: the ``β`` smallest
  and the ``n − β − t`` largest (the outliers; fewer than ``g`` when ``t + g > n``) are dropped.
* ``della`` (DELLA's MagPrune): ``ρ ≤ 0`` gives 0; else ``0 < ρ − ε`` and ``ρ + ε < 1`` are required.
  ``τ`` is viewed as rows along dim 1 (a 1-D ``τ`` is one row ``[1, n]``; a ``[R, C]`` matrix has ``R`` rows
  of ``C`` entries); ``r_j`` is the rank of ``|τ_j|`` in its row (``1`` = smallest, equal magnitudes in
  index order), ``p_j = ρ − ε + 2ε (r_j − 1) / (C − 1)``, and entry ``j`` is kept with probability ``p_j``:
  the entry of rank ``r`` in row ``i`` (rows in the order of ``τ`` with dim 1 moved last) iff
  ``V_{iC + r − 1} < K(p(r))``, the draws handed out in rank order (the same law as ``V_j < K(p_j)``, see
  :func:`_della_mask`); ``ε = 0`` is DARE's drop at ``ρ`` (``V_j < K(ρ)``, no ranks). Rows of one entry
  (``C = 1``) leave the rank normalisation undefined: refused (mergekit fails there too).

Rescale (``rescale``, after the mask): ``τ̂ ← τ̂ · ‖τ‖₁ / ‖τ̂‖₁``, skipped when either L1 norm is below
``1e-7``. This is mergekit's rule for every kind: each sparsified task vector keeps the L1 norm of the
unsparsified one (not the DARE paper's ``1 / ρ``, nor DELLA's per-entry ``1 / p_j``).

Random kinds draw from one numpy generator per input (:func:`input_generator`); the others are
deterministic.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

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


def input_generator(seed: int, name: str, index: int) -> np.random.Generator:
    """The generator of input ``index`` (0-based, among the merged inputs) for tensor ``name``:
    ``numpy.random.Generator(SFC64(tensor_seed(seed, f"{name}#{index}")))``; its keep decisions are
    :class:`KeepDraws`'."""
    return np.random.Generator(np.random.SFC64(tensor_seed(seed, f"{name}#{index}")))


#: A keep probability's resolution: ``p`` is kept with probability ``K / 2^24``, ``K`` = :func:`keep_levels`.
LEVEL_BITS = 24
_TIE_BITS = 16  # the bits of a 24-bit draw below its top byte


def keep_levels(p: float | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``K = ⌈float32(p) · 2^24⌉`` clamped to ``[0, 2^24]`` (0 for NaN), split as :meth:`KeepDraws.decide`
    compares it: ``(hi, lo)`` with ``hi = min(K >> 16, 255)`` (uint8) and ``lo = K − 2^16 hi`` (int64, up to
    ``2^16`` when ``K = 2^24``); elementwise over an array ``p``. ``K / 2^24`` is numpy's ``P(u < float32(p))``
    for its float32 uniform ``u`` (a multiple of ``2^-24``): the same probability of keeping."""
    p32 = np.nan_to_num(np.asarray(p, dtype=np.float32), nan=0.0).astype(np.float64)
    level = np.ceil(np.clip(p32, 0.0, 1.0) * (1 << LEVEL_BITS)).astype(np.int64)  # exact: p32 has 24 bits
    hi = np.minimum(level >> _TIE_BITS, 255)
    return hi.astype(np.uint8), level - (hi << _TIE_BITS)


def _outputs(generator: np.random.Generator, k: int) -> np.ndarray:
    """The next ``k`` 64-bit outputs of ``generator`` (uint64 ``[k]``; a buffered 32-bit half is neither used nor
    disturbed): 1.9 ns each, within 10 % of reading the bit generator raw (AMD EPYC, one core)."""
    return generator.integers(0, 1 << 64, size=k, dtype=np.uint64)


class KeepDraws:
    """The keep decisions of one input's generator ``g``, a Bernoulli stream that :meth:`decide` hands out in
    order, each kept with probability ``K / 2^24`` (:func:`keep_levels`) and independent of the others.

    Decision ``j`` compares the 24-bit uniform ``V_j = 2^16 c_j + t_j`` with ``K``: kept iff ``V_j < K``.
    ``c_j`` is byte ``j`` of the outputs of ``g`` after its first (``integers(0, 2^64, uint64)``, each output's 8
    bytes little-endian first); ``t_j`` matters only when ``c_j = K >> 16`` (1 decision in 256), and is then the
    top 16 bits of the next output of the tie generator ``SFC64(first output of g)`` (ties in order). A
    decision takes one byte of ``g`` where a float32 uniform takes four: 0.55 ns an entry into a uint8 mask
    against 1.0–1.1 for float32 uniforms compared with ``p`` (AMD EPYC, one core), the cost that bounds DARE.
    ``n`` decisions leave ``g`` ``1 + ⌈n / 8⌉`` outputs on, whatever the lengths they are taken in."""

    def __init__(self, generator: np.random.Generator) -> None:
        self._generator = generator
        self._ties = np.random.Generator(np.random.SFC64(int(_outputs(generator, 1)[0])))
        self._left = np.empty(0, dtype=np.uint8)  # the unused bytes of the last output drawn

    def _bytes(self, m: int) -> np.ndarray:
        need = m - self._left.size
        if need <= 0:
            out, self._left = self._left[:m], self._left[m:]
            return out
        fresh = _outputs(self._generator, -(-need // 8)).astype("<u8", copy=False).view(np.uint8)
        out = np.concatenate([self._left, fresh[:need]]) if self._left.size else fresh[:need]
        self._left = fresh[need:]
        return out

    def decide(self, hi: np.ndarray, lo: np.ndarray, out: np.ndarray) -> None:
        """Fill contiguous ``out`` (uint8 or float, any shape, its flat order is the decisions' order) with the
        next ``out.size`` decisions, 1 kept and 0 dropped, against the levels ``(hi, lo)`` of :func:`keep_levels`
        (0-d, or one per entry of ``out``'s last dim)."""
        if not out.flags.c_contiguous:  # the ties are written through a flat view
            raise ValueError("KeepDraws.decide: out must be C-contiguous")
        c = self._bytes(out.size).reshape(out.shape)
        np.less(c, hi, out=out, casting="unsafe")  # c < hi: V < K whatever t
        tied = np.flatnonzero(c == hi)
        if not tied.size:
            return
        flat = out.reshape(-1)
        bound = lo if lo.ndim == 0 else lo[tied % out.shape[-1]]
        whole = bound >= 1 << _TIE_BITS  # K = 2^24 (hi = 255 stands for 256): kept, and no tie drawn
        if np.any(whole):
            whole = np.broadcast_to(whole, tied.shape)
            flat[tied[whole]] = 1
            tied, bound = tied[~whole], bound if lo.ndim == 0 else bound[~whole]
        t = _outputs(self._ties, tied.size) >> np.uint64(64 - _TIE_BITS)
        flat[tied] = t.astype(np.int64) < bound


def _draws_below(generator: np.random.Generator, p: float, n: int,
                 visit: Callable[[int, torch.Tensor], None] | None = None) -> torch.Tensor:
    """uint8 ``[n]``: the next ``n`` :class:`KeepDraws` decisions of ``generator`` at probability ``p``, 1 kept
    and 0 dropped (a byte an entry: the mask lives until the merge's last pass, and :func:`_float_part` turns a
    chunk of it into the float mask that torch multiplies fast), taken about one :data:`CHUNK` at a time;
    ``visit(start, part)``, if given, sees each finished part of the mask as float32 while it is in cache."""
    hi, lo = keep_levels(float(p))
    draws = KeepDraws(generator)
    keep = np.empty(n, dtype=np.uint8)
    buf = torch.empty(min(CHUNK, n), dtype=torch.float32) if visit is not None else None
    for s in range(0, n, CHUNK):
        part = keep[s:s + CHUNK]
        draws.decide(hi, lo, part)
        if buf is not None and visit is not None:
            visit(s, buf[:part.size].copy_(torch.from_numpy(part)))
    return torch.from_numpy(keep)


def _float_part(mask: torch.Tensor, start: int, n: int, dtype: torch.dtype,
                out: torch.Tensor | None = None) -> torch.Tensor:
    """``mask[start:start + n]`` (uint8 0 / 1) as ``dtype`` 0 / 1, into ``out`` if given: torch multiplies by a
    float mask ~7× faster than by a bool one on the CPU (13 against 94 µs for 2^17 entries, one core), and
    converts uint8 to float32 at 0.04 ns an entry (bool: 0.33)."""
    part = mask[start:start + n]
    return part.to(dtype) if out is None else out[:part.numel()].copy_(part)


#: Entries per chunk of the elementwise passes on the CPU: a chunk's intermediates (512 KB each in float32) stay
#: in cache, so the dozen passes of a sign consensus cost about one pass over memory, while torch's ~10 µs a call
#: stays small beside the work: a two-input sign consensus of 4 M entries took 21 ms in 2^17-entry chunks against
#: 59 ms whole-tensor and 44 ms in 2^14-entry chunks (AMD EPYC, 2 cores).
CHUNK = 1 << 17
#: From this many entries on, an order statistic is found from a strided sample's bracket (one chunked pass that
#: counts and keeps the bracket's entries) instead of numpy's introselect over every entry (33 ms for 4 M float32
#: entries, same VM).
SAMPLED_SELECTION_MIN = 1 << 17
_SAMPLE = 1 << 15

#: What an order statistic is taken of: a 1-D tensor, or ``(x, b)`` meaning ``|x − b|`` (1-D, one length),
#: which is then never materialised whole unless the sample's bracket misses.
Values = torch.Tensor | tuple[torch.Tensor, torch.Tensor]


def chunk_size(t: torch.Tensor) -> int:
    """Chunk length for tensor ``t``'s elementwise passes: :data:`CHUNK` on the CPU, the whole tensor elsewhere
    (a GPU launches one kernel per op; chunks would only add launches)."""
    return CHUNK if t.device.type == "cpu" else max(1, t.numel())


def _values_part(values: Values, part: slice) -> torch.Tensor:
    """``values[part]`` (a fresh tensor for ``(x, b)``: ``|x[part] − b[part]|``)."""
    if isinstance(values, torch.Tensor):
        return values[part]
    x, b = values
    return (x[part] - b[part]).abs_()


def _values_chunks(values: Values) -> Iterator[tuple[int, torch.Tensor]]:
    """``(start, chunk)`` over ``values`` in :func:`chunk_size` pieces. For ``(x, b)`` every chunk is the same
    reused buffer (no fresh memory to fault in per chunk), overwritten by the next: read it, never keep it."""
    if isinstance(values, torch.Tensor):
        step = chunk_size(values)
        for s in range(0, values.numel(), step):
            yield s, values[s:s + step]
        return
    x, b = values
    n, step = b.numel(), chunk_size(b)
    buf = torch.empty(min(step, n), dtype=b.dtype, device=b.device)
    for s in range(0, n, step):
        part = buf[:min(step, n - s)]
        yield s, torch.sub(x[s:s + step], b[s:s + step], out=part).abs_()


def _order_statistic(values: Values, q: int) -> tuple[float, int, int]:
    """The entry at 0-based position ``q`` of 1-D ``values`` sorted ascending, and how many entries are smaller
    and how many equal to it. Exact whatever the data (ties, constant runs): a strided sample only brackets the
    answer, one chunked pass counts the entries below the bracket and keeps those inside it, and the answer is
    selected among those; when the bracket misses (or ``values`` is small, or on a GPU) the full selection runs."""
    ref = values if isinstance(values, torch.Tensor) else values[1]
    n = ref.numel()
    if ref.device.type == "cpu" and n >= SAMPLED_SELECTION_MIN:
        sample = np.sort(_values_part(values, slice(None, None, n // _SAMPLE)).numpy())
        m = sample.size
        pos = (q + 0.5) * m / n  # where the answer falls in the sample, ± a few binomial standard deviations
        spread = 4.0 * (m * (q / n) * (1 - q / n)) ** 0.5 + 8.0
        lo_i, hi_i = int(pos - spread), int(pos + spread) + 1
        lo = float(sample[lo_i]) if lo_i > 0 else -np.inf
        hi = float(sample[hi_i]) if hi_i < m else np.inf
        below, inside = 0, []
        for _, v in _values_chunks(values):  # numpy: its comparisons and boolean indexing run ~6× torch's here
            a = v.numpy()
            below += int(np.count_nonzero(a < lo))
            inside.append(a[(a >= lo) & (a <= hi)])
        mid = np.concatenate(inside)
        j = q - below
        if 0 <= j < mid.size:
            thr = np.partition(mid, j)[j]
            return float(thr), below + int(np.count_nonzero(mid < thr)), int(np.count_nonzero(mid == thr))
    full = _values_part(values, slice(None))
    if ref.device.type != "cpu":
        t = full.kthvalue(q + 1).values
        return float(t), int(torch.count_nonzero(full < t)), int(torch.count_nonzero(full == t))
    thr = float(np.partition(full.numpy(), q)[q])
    return thr, int(torch.count_nonzero(full < thr)), int(torch.count_nonzero(full == thr))


def kth_largest(values: Values, k: int, use_numpy: bool | None = None) -> float:
    """The ``k``-th largest entry of 1-D ``values`` (1-based; ``(x, b)``: of ``|x − b|``), on any device: on the
    CPU by selection (:func:`_order_statistic`), elsewhere ``kthvalue`` on the device, which gives the same order
    statistic. ``use_numpy`` forces a path (``False``: ``kthvalue`` on the tensor's device)."""
    full = values if isinstance(values, torch.Tensor) else None
    n = (full if full is not None else values[1]).numel()
    if use_numpy is False:
        v = full if full is not None else _values_part(values, slice(None))
        return float(v.kthvalue(n - k + 1).values)
    if use_numpy and full is not None:
        values = full.cpu()
    return _order_statistic(values, n - k)[0]


@dataclass(frozen=True)
class RankBound:
    """The first ``k`` entries of a stable sort, without sorting: an entry is inside when it lies strictly beyond
    ``thr`` (greater for ``largest``, else smaller), or equals ``thr`` and has a flat index below ``cut`` (a
    stable sort puts equal values in index order). :meth:`mask` reads one chunk at a time."""

    thr: float
    cut: int
    largest: bool

    def mask(self, v: torch.Tensor, start: int = 0) -> torch.Tensor:
        """Bool mask of the entries of chunk ``v`` (1-D, flat indices ``start ..``) inside the bound."""
        a = v.numpy() if v.device.type == "cpu" else v  # numpy's comparisons run ~6× torch's on the CPU here
        inside = a > self.thr if self.largest else a < self.thr
        tied = min(max(self.cut - start, 0), v.numel())  # entries of this chunk before the cut
        if tied:
            inside[:tied] |= a[:tied] == self.thr
        return torch.from_numpy(inside) if isinstance(inside, np.ndarray) else inside

    def kept(self, t: torch.Tensor, start: int = 0) -> torch.Tensor:
        """``t`` where ``|t|`` is inside the bound, else 0 (chunk ``t``, flat indices ``start ..``; a new
        tensor), by ``hardshrink`` (``t`` where ``|t| > λ``): float operations only, where a bool mask and a
        multiply take ~10× as long on the CPU."""
        below = float(torch.nextafter(torch.tensor(self.thr, dtype=t.dtype), torch.tensor(-math.inf, dtype=t.dtype)))
        # largest: inside is |t| ≥ thr before the cut, > thr after; smallest: outside is > thr before, ≥ after
        lam_tied, lam_rest = (below, self.thr) if self.largest else (self.thr, below)
        tied = min(max(self.cut - start, 0), t.numel())
        if tied in (0, t.numel()):
            shrunk = F.hardshrink(t, lam_tied if tied else lam_rest)
        else:
            shrunk = torch.cat([F.hardshrink(t[:tied], lam_tied), F.hardshrink(t[tied:], lam_rest)])
        return shrunk if self.largest else torch.sub(t, shrunk)


def rank_bound(values: Values, k: int, largest: bool) -> RankBound:
    """The bound of the ``k`` largest (or smallest) entries of 1-D ``values`` (``(x, b)``: of ``|x − b|``), equal
    values in index order: ``sort(values, descending=largest, stable=True).indices[:k]``. One selection (O(n))
    plus, only when the ``k``-th value is tied beyond the ``k``-th position, a pass to the last one kept."""
    n = (values if isinstance(values, torch.Tensor) else values[1]).numel()
    edge = float("inf") if largest else float("-inf")
    if k <= 0:
        return RankBound(edge, 0, largest)
    if k >= n:
        return RankBound(-edge, n, largest)
    thr, n_less, n_equal = _order_statistic(values, n - k if largest else k - 1)
    need = k - ((n - n_less - n_equal) if largest else n_less)  # equal entries taken, 1 ≤ need ≤ n_equal
    if need == n_equal:
        return RankBound(thr, n, largest)
    for s, v in _values_chunks(values):
        equal = np.flatnonzero(v.numpy() == thr) if v.device.type == "cpu" else torch.nonzero(v == thr).reshape(-1)
        if need <= len(equal):
            return RankBound(thr, s + int(equal[need - 1]) + 1, largest)
        need -= len(equal)
    raise AssertionError("the k-th value's ties were counted but not found")


def float_mask(mask: torch.Tensor) -> torch.Tensor:
    """Bool ``mask`` as float32 0 / 1 (cast by numpy on the CPU): torch multiplies by a bool tensor ~7× slower
    than by a float one there (94 against 13 µs for 2^17 entries, one core, AMD EPYC)."""
    if mask.device.type == "cpu":
        return torch.from_numpy(mask.numpy().astype(np.float32))
    return mask.to(torch.float32)


def top_k_mask(values: torch.Tensor, k: int) -> torch.Tensor:
    """The ``k`` largest entries of 1-D ``values`` (ties in index order): ``sort(descending, stable)[:k]``."""
    return rank_bound(values, k, largest=True).mask(values)


def bottom_k_mask(values: torch.Tensor, k: int) -> torch.Tensor:
    """The ``k`` smallest entries of 1-D ``values`` (ties in index order): ``sort(stable)[:k]``."""
    return rank_bound(values, k, largest=False).mask(values)


def _rank_probabilities(ranks: torch.Tensor, c: int, density: float, epsilon: float) -> torch.Tensor:
    """``p = ρ − ε + 2ε (r − 1) / (C − 1)`` of 0-based float32 ``ranks`` (``r − 1``) in rows of ``c`` entries."""
    return (density - epsilon) + (ranks / (c - 1)).clamp(0, 1) * (2 * epsilon)


def _della_probabilities(mag: torch.Tensor, density: float, epsilon: float) -> torch.Tensor:
    """``p = ρ − ε + 2ε (r − 1) / (C − 1)`` with ``r`` the rank (1 = smallest) of each magnitude along dim 1."""
    order = torch.argsort(mag, dim=1, stable=True)
    ranks = torch.empty_like(order)  # the inverse permutation of each row's order, 0-based: r − 1
    ranks.scatter_(1, order, torch.arange(mag.shape[1], device=mag.device).expand_as(order))
    return _rank_probabilities(ranks.to(mag.dtype), mag.shape[1], density, epsilon)


def _della_mask(rows_of: Callable[[int, int], np.ndarray], n_rows: int, c: int, generator: np.random.Generator,
                density: float, epsilon: float) -> tuple[np.ndarray, float, float]:
    """DELLA's uint8 0/1 mask (flat ``[R·C]``, row-major) of the magnitudes ``rows_of(r0, r1)`` (float32
    ``[r1 − r0, C]``, ``≥ 0``, ``C ≥ 2``; read before the next call) and its L1 norms ``(‖|τ|‖₁, ‖mask ⊙
    |τ|‖₁)``: the entry of 0-based rank ``r`` in row ``i`` takes decision ``iC + r`` of the generator's
    :class:`KeepDraws`, at probability ``p(r)``.

    Handing the decisions out in rank order rather than by position keeps the mask's law (they are i.i.d. and
    independent of ``τ``: entry ``j`` is still kept with probability ``p(r_j)``, independently) and needs no
    inverse permutation: each row's keys ``(|τ_j| bits, column)``, one int64 each (a non-negative float's bits
    order as its value; the column breaks ties as a stable sort does), sorted, are its order, and the decisions
    made in sorted order are scattered back by it. A 4096 × 1024 task vector: ~22 against 65 ms for ranking by
    position (AMD EPYC, one core)."""
    p = _rank_probabilities(torch.arange(c, dtype=torch.float32), c, density, epsilon).numpy()  # [C], by rank
    hi, lo = keep_levels(p)
    draws = KeepDraws(generator)
    mask = np.empty(n_rows * c, dtype=np.uint8)
    block = max(1, CHUNK // c)  # rows per pass: the temporaries stay in cache and their memory is reused
    cols = np.arange(c, dtype=np.int64)
    kept_sorted = np.empty((min(block, n_rows), c), dtype=np.uint8)
    kept_float = torch.empty(min(block, n_rows) * c, dtype=torch.float32)
    before = after = 0.0
    for r0 in range(0, n_rows, block):
        part = rows_of(r0, min(r0 + block, n_rows))
        nr = part.shape[0]
        keys = part.view(np.int32).astype(np.int64)
        keys <<= 32
        keys |= cols
        keys.sort(axis=1)
        keys &= 0xFFFFFFFF  # the column of each rank: the row's order
        draws.decide(hi, lo, kept_sorted[:nr])
        out = torch.from_numpy(mask[r0 * c:(r0 + nr) * c]).view(nr, c)
        out.scatter_(1, torch.from_numpy(keys), torch.from_numpy(kept_sorted[:nr]))
        mag = torch.from_numpy(part).reshape(-1)
        before += float(mag.sum())
        after += float(torch.dot(mag, kept_float[:mag.numel()].copy_(out.reshape(-1))))
    return mask, before, after


#: ``τ̂`` of a chunk of ``τ`` (which it may overwrite) and the chunk's flat start index, before any rescale.
KeptOf = Callable[[torch.Tensor, int], torch.Tensor]


class _Kept:
    """One sparsified task vector, read back a chunk at a time: ``τ̂[s:e] = kept_of(τ[s:e], s) · scale``
    (``kept_of`` None: every entry kept; ``scale`` the L1 rescale factor, None: 1; ``zero``: nothing kept).
    ``mask``: the uint8 0/1 mask (flat, the tensor's length) when ``kept_of`` only multiplies by it, so the
    plain sum of :func:`_masked_sum` can fuse mask, rescale and weight into one ``addcmul``."""

    def __init__(self, kept_of: KeptOf | None = None, scale: float | None = None, zero: bool = False,
                 mask: torch.Tensor | None = None) -> None:
        self.kept_of = kept_of
        self.scale = scale
        self.zero = zero
        self.mask = mask

    def apply(self, tau: torch.Tensor, start: int, factor: float = 1.0) -> torch.Tensor:
        """``factor · τ̂`` of chunk ``tau`` (which it may overwrite)."""
        if self.zero:
            return tau.zero_()
        if self.kept_of is not None:
            tau = self.kept_of(tau, start)
        c = factor * (1.0 if self.scale is None else self.scale)
        return tau if c == 1 else tau.mul_(c)

    def add_to(self, acc: torch.Tensor, tau: torch.Tensor, start: int, alpha: float) -> None:
        """``acc += alpha · τ̂`` of chunk ``tau`` (which it may overwrite)."""
        if self.zero:
            return
        c = alpha * (1.0 if self.scale is None else self.scale)
        acc.add_(tau if self.kept_of is None else self.kept_of(tau, start), alpha=c)


def _kept(
    x: torch.Tensor, b: torch.Tensor, shape: torch.Size, kind: Sparsification, density: float, gamma: float,
    epsilon: float, rescale: bool, keep_ties: bool, generator: np.random.Generator | None,
) -> _Kept:
    """How ``S(τ; ρ)`` of the module docstring keeps the entries of ``τ = x − b`` (flat ``x``, ``b``; ``shape``
    the tensor's): the thresholds, draws or mask, and the rescale factor, from full-tensor passes."""
    n = b.numel()
    if kind == "none" or density >= 1 or n == 0:
        return _Kept()
    kept_of: KeptOf
    if kind in ("magnitude", "magnitude_outliers"):
        if kind == "magnitude" and density <= 0:
            return _Kept(zero=True)
        mag = (x, b)  # |τ|, read in chunks
        if kind == "magnitude":
            k = max(1, int(density * n))
            top = RankBound(kth_largest(mag, k), n, True) if keep_ties else rank_bound(mag, k, largest=True)

            def kept_of(t: torch.Tensor, s: int) -> torch.Tensor:
                return top.kept(t, s)
        else:  # sorted ascending (stable), positions [bottom, bottom + target) are kept
            target, outliers = int(density * n), int(gamma * n)
            bottom = max(0, n - target - outliers)
            upper, lower = rank_bound(mag, bottom + target, largest=False), rank_bound(mag, bottom, largest=False)

            def kept_of(t: torch.Tensor, s: int) -> torch.Tensor:  # lower's entries lie inside upper's
                return upper.kept(t, s).sub_(lower.kept(t, s))
    elif kind == "random":
        assert generator is not None, "random sparsification needs a generator"
        if rescale and b.device.type == "cpu" and b.dtype == torch.float32:  # L1 sums while a part is in cache
            buf = torch.empty(min(CHUNK, n), dtype=b.dtype)
            sums = [0.0, 0.0]

            def visit(s: int, part: torch.Tensor) -> None:
                a = torch.sub(x[s:s + part.numel()], b[s:s + part.numel()], out=buf[:part.numel()]).abs_()
                sums[0] += float(a.sum())
                sums[1] += float(torch.dot(a, part))

            return _masked(_draws_below(generator, density, n, visit), _rescale_factor(*sums))
        mask = _draws_below(generator, density, n).to(b.device)
        if not rescale:
            return _masked(mask, None)
        return _masked(mask, _rescale_factor(*_l1_norms(
            x, b, lambda a, s: float(torch.dot(a, _float_part(mask, s, a.numel(), a.dtype))))))
    elif kind == "della":
        if density <= 0:
            return _Kept(zero=True)
        if not (density - epsilon > 0 and density + epsilon < 1):
            raise ValueError(f"della: density ± epsilon must lie in (0, 1), got density={density}, "
                             f"epsilon={epsilon}")
        shaped = x.reshape(shape)
        shaped = shaped.reshape(1, -1) if shaped.dim() < 2 else shaped  # a 0-d tensor: one row of one entry
        c = shaped.shape[1]
        if c < 2:
            raise ValueError(f"della: a tensor of shape {list(shape)} has rows of {c} entry along "
                             "dim 1; the rank normalisation (r − 1) / (C − 1) needs C ≥ 2 (mergekit fails too)")
        assert generator is not None, "della needs a generator"
        if epsilon == 0:  # one probability for every rank: no rank is needed, DARE's drop at ρ
            return _kept(x, b, shape, "random", density, gamma, 0.0, rescale, keep_ties, generator)
        moved_shape = shaped.movedim(1, -1).shape
        on_cpu32 = x.device.type == b.device.type == "cpu" and x.dtype == b.dtype == torch.float32
        if shaped.dim() == 2 and on_cpu32:  # rows are dim 1 already: |τ| a block of rows at a time
            xr, br = x.reshape(-1, c), b.reshape(-1, c)
            buf = torch.empty(min(max(1, CHUNK // c), xr.shape[0]), c, dtype=torch.float32)

            def mags(r0: int, r1: int) -> np.ndarray:
                return torch.sub(xr[r0:r1], br[r0:r1], out=buf[:r1 - r0]).abs_().numpy()
        else:  # rows along dim 1: moved last (one copy), ranked there, the mask moved back
            moved = (x - b).abs_().reshape(shaped.shape).movedim(1, -1).float().cpu().contiguous().reshape(-1, c)

            def mags(r0: int, r1: int) -> np.ndarray:
                return moved[r0:r1].numpy()
        kept_moved, before, after = _della_mask(mags, n // c, c, generator, density, epsilon)
        mask = torch.from_numpy(kept_moved).reshape(moved_shape).movedim(-1, 1).contiguous().reshape(-1)
        return _masked(mask.to(b.device), _rescale_factor(before, after) if rescale else None)
    else:
        raise ValueError(f"unknown sparsification {kind!r}")
    if not rescale:
        return _Kept(kept_of)
    return _Kept(kept_of, _rescale_factor(*_l1_norms(x, b, lambda a, s: float(kept_of(a, s).sum()))))


def _l1_norms(x: torch.Tensor, b: torch.Tensor, masked_l1: Callable[[torch.Tensor, int], float]) -> tuple[float, float]:
    """``(‖τ‖₁, ‖τ̂‖₁)`` of flat ``τ = x − b``, ``masked_l1(|τ| chunk, start)`` giving the chunk's ``‖τ̂‖₁`` (it may
    overwrite the chunk): float32 chunk sums (torch's cascade sum: ~1e-7 relative) added in float64; a float64
    chunk sum costs 5× as much."""
    before = after = 0.0
    for s, a in _values_chunks((x, b)):
        before += float(a.sum())
        after += masked_l1(a, s)
    return before, after


def _rescale_factor(before: float, after: float) -> float | None:
    """DARE's L1 rescale ``‖τ‖₁ / ‖τ̂‖₁`` (None, no rescale, when either norm is below :data:`RESCALE_EPS`)."""
    return None if before < RESCALE_EPS or after < RESCALE_EPS else before / after


def _masked(mask: torch.Tensor, scale: float | None) -> _Kept:
    """The ``_Kept`` of a flat uint8 0/1 ``mask`` and rescale factor ``scale``."""

    def kept_of(t: torch.Tensor, s: int) -> torch.Tensor:
        return t.mul_(_float_part(mask, s, t.numel(), t.dtype))

    return _Kept(kept_of, scale, mask=mask)


def sparsify(
    tau: torch.Tensor, kind: Sparsification, density: float, *, gamma: float = 0.0, epsilon: float = 0.0,
    rescale: bool = False, keep_ties: bool = False, generator: np.random.Generator | None = None,
) -> torch.Tensor:
    """``S(τ; ρ)`` of the module docstring (``τ`` any shape, float; the result has ``τ``'s shape)."""
    flat = tau.reshape(-1)
    kept = _kept(flat, torch.zeros_like(flat), tau.shape, kind, density, gamma, epsilon, rescale, keep_ties,
                 generator)
    if kept.kept_of is None and not kept.zero:
        return tau
    out = torch.empty_like(flat)
    step = chunk_size(flat)
    for s in range(0, flat.numel(), step):
        out[s:s + step] = kept.apply(flat[s:s + step].clone(), s)
    return out.reshape(tau.shape)


def elected_sign(total: torch.Tensor) -> torch.Tensor:
    """TIES's election, overwriting ``total``: ``+1`` where ``total ≥ 0`` (an exactly zero sum elects ``+``),
    else ``−1``, by float ops only (``sign``, ``+ 0.5``, ``sign``): the bool test ``total < 0`` and its cast cost
    ~10× as much on the CPU."""
    return total.sign_().add_(0.5).sign_()


def _nonzero_divisor(den: torch.Tensor, w: Sequence[float]) -> torch.Tensor:
    """``den`` (sums of the agreeing weights ``w``) with its zeros set to 1, overwritten. With positive weights a
    sum is 0 or at least ``min(w)``, and its numerator is 0 where it is 0, so clamping to ``min(w)`` divides the
    same way with one float op (the bool test and fill take ~10× as long on the CPU)."""
    if min(w) > 0:
        return den.clamp_min_(min(w))
    return den.masked_fill_(den == 0, 1.0)


def _consensus(taus: list[torch.Tensor], w: Sequence[float], s: TaskVectorSettings) -> torch.Tensor:
    """``merged`` of the module docstring for one chunk of the sign consensus kinds, from ``taus`` (which it
    overwrites): the weighted ``d_i = w_i τ̂_i`` for ``sign``, the sparsified ``τ̂_i`` for ``sign_raw``."""
    if s.consensus == "sign":
        deltas = taus
        total = deltas[0].clone()
        for d in deltas[1:]:
            total.add_(d)
        elected = elected_sign(total)  # +1 where Σ d_i ≥ 0, else −1
        # sign(d_i) = s exactly where s·d_i > 0; then d_i [agree] = s · relu(s·d_i), exact (s = ±1)
        num = torch.zeros_like(total)
        den = torch.zeros_like(total) if s.normalize else None  # the agreeing weights: only to normalize
        for d, wi in zip(deltas, w, strict=True):
            agreeing = d.mul_(elected).clamp_min_(0.0)
            num.add_(agreeing)
            if den is not None:
                den.add_(agreeing.sign_(), alpha=wi)
        num.mul_(elected)
        if den is not None:
            num.div_(_nonzero_divisor(den, w))
        return num
    if s.consensus == "sign_raw":
        total = torch.zeros_like(taus[0])
        for t, wi in zip(taus, w, strict=True):
            total.add_(t, alpha=wi)
        elected = total.sign_()  # 0 on a zero sum: no input agrees there
        num = torch.zeros_like(total)
        den = torch.zeros_like(total) if s.normalize else None
        for t, wi in zip(taus, w, strict=True):
            agreeing = t.mul_(elected).clamp_min_(0.0)  # |τ̂_i| where sign(τ̂_i) = s ≠ 0, else 0
            if den is not None:
                den.add_(torch.sign(agreeing), alpha=wi)
            num.add_(agreeing.mul_(elected), alpha=wi)
        if den is not None:
            if min(w) > 0:  # num is 0 wherever den is
                num.div_(_nonzero_divisor(den, w))
            else:
                none = den == 0
                num.div_(den.masked_fill_(none, 1.0)).masked_fill_(none, 0.0)
        return num
    raise ValueError(f"unknown consensus {s.consensus!r}")


def merge_task_vectors(
    base: torch.Tensor, xs: Sequence[torch.Tensor], weights: Sequence[float], settings: TaskVectorSettings, *,
    density: Sequence[float] | None = None, gamma: Sequence[float] | None = None,
    epsilon: Sequence[float] | None = None, generators: Sequence[np.random.Generator | None] | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """``b + λ · merged`` of the module docstring: ``base`` and every ``xs[i]`` of one shape ``[...]`` (float);
    per-input ``weights`` / ``density`` / ``gamma`` / ``epsilon`` (default 1.0 / 1.0 / 0.0 / 0.0) and
    ``generators`` (needed by the random kinds). No inputs: the base. ``out``: a contiguous tensor of ``base``'s
    shape and dtype to write the result into (none: a new one); it may be ``base`` or one of ``xs``.

    Thresholds, draws and rescale factors come from full-tensor passes per input; the task vectors, masks and
    the consensus are then computed one :data:`CHUNK` at a time into the output, so no full-size temporary
    beyond one per input (the random kinds' draws) outlives its input's first pass."""
    s = settings
    m = len(xs)
    w = [float(x) for x in weights]
    dens = [float(d) for d in density] if density is not None else [1.0] * m
    gam = [float(g) for g in gamma] if gamma is not None else [0.0] * m
    eps = [float(e) for e in epsilon] if epsilon is not None else [0.0] * m
    gens = list(generators) if generators is not None else [None] * m
    if not m:
        return base
    if s.consensus not in ("none", "sign", "sign_raw"):
        raise ValueError(f"unknown consensus {s.consensus!r}")
    b = base.reshape(-1)
    flat = [x.reshape(-1) for x in xs]
    kept = [_kept(x, b, base.shape, s.sparsify, di, gi, ei, s.rescale, s.keep_ties, g)
            for x, di, gi, ei, g in zip(flat, dens, gam, eps, gens, strict=True)]
    out = torch.empty_like(b) if out is None else out.reshape(-1)
    step = chunk_size(b)
    divisor = _normalizer(w, s.normalize)
    if s.consensus == "none" and all(k.mask is not None or k.zero for k in kept):
        return _masked_sum(b, flat, kept, [s.lam * wi / divisor for wi in w], out, step).reshape(base.shape)
    for start in range(0, b.numel(), step):
        bc = b[start:start + step]
        if s.consensus == "none":  # Σ w_i τ̂_i, mask, rescale and weight in one op per input where they can
            merged = torch.zeros_like(bc)
            for k, x, wi in zip(kept, flat, w, strict=True):
                k.add_to(merged, x[start:start + step] - bc, start, wi)
            if s.normalize:
                merged.div_(divisor)
        else:  # "sign" consensus takes d_i = w_i τ̂_i, "sign_raw" τ̂_i
            taus = [k.apply(x[start:start + step] - bc, start, wi if s.consensus == "sign" else 1.0)
                    for k, x, wi in zip(kept, flat, w, strict=True)]
            merged = _consensus(taus, w, s)
        torch.add(bc, merged if s.lam == 1 else merged.mul_(s.lam), out=out[start:start + step])
    return out.reshape(base.shape)


def _normalizer(w: Sequence[float], normalize: bool) -> float:
    """What the plain sum is divided by: ``Σ w_i`` when normalizing (1 when that is ~0), else 1."""
    total_w = sum(w)
    return total_w if normalize and abs(total_w) >= NORMALIZE_EPS else 1.0


def _masked_sum(b: torch.Tensor, flat: Sequence[torch.Tensor], kept: Sequence[_Kept], coef: Sequence[float],
                out: torch.Tensor, step: int) -> torch.Tensor:
    """``out = b + Σ_i coef_i · scale_i · (m_i ⊙ (x_i − b))`` for flat ``[n]`` tensors whose every ``_Kept`` is
    a 0/1 mask ``m_i`` (or keeps nothing): the plain-sum consensus of the random kinds, accumulated into the
    output chunk by one ``addcmul`` per input (``coef_i`` = ``λ w_i / Σw`` or ``λ w_i``), with no zeroed
    accumulator, no division and no final add; the sum's rounding order differs from the general loop's. Every
    chunk's task vectors are taken before its output is written, so ``out`` may be ``b`` or an input."""
    live = [(x, k, c * (1.0 if k.scale is None else k.scale)) for x, k, c in zip(flat, kept, coef, strict=True)
            if not k.zero]
    tmp = [torch.empty(min(step, b.numel()), dtype=b.dtype, device=b.device) for _ in live]
    float_mask_part = torch.empty(min(step, b.numel()), dtype=b.dtype, device=b.device)
    for start in range(0, b.numel(), step):
        bc, o = b[start:start + step], out[start:start + step]
        taus = [torch.sub(x[start:start + step], bc, out=t[:bc.numel()])
                for (x, _, _), t in zip(live, tmp, strict=True)]
        if not live:
            o.copy_(bc)
        for i, ((_, k, c), t) in enumerate(zip(live, taus, strict=True)):
            assert k.mask is not None
            m = _float_part(k.mask, start, bc.numel(), b.dtype, float_mask_part)
            if i == 0:
                torch.addcmul(bc, t, m, value=c, out=o)
            else:
                o.addcmul_(t, m, value=c)
    return out
