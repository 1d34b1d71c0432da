"""The task-vector core (:mod:`vlmerge.merge.taskvector`) against a reference written here from its module
docstring: numpy, whole tensors, stable sorts, float64 consensus; never calling the code under test.

The code computes thresholds by sampled selection and everything else one chunk at a time; the tests shrink
the chunk (7 entries) and the sampling limits so that every chunk boundary, tie cut and bracket case (hit,
miss, constant runs) is crossed on small tensors, and check that chunking never changes a bit.
"""

from __future__ import annotations

import itertools
import math
from typing import Any

import numpy as np
import pytest
import torch

import vlmerge.merge.taskvector as tv
from vlmerge.merge.base import tensor_seed

KINDS = ("none", "magnitude", "random", "magnitude_outliers", "della")
CONSENSUS = ("none", "sign", "sign_raw")


def keep_decisions(g: np.random.Generator, p: np.ndarray) -> np.ndarray:
    """The documented Bernoulli stream of ``KeepDraws`` for per-decision probabilities ``p`` (in decision order),
    whole and with plain integers: K = ceil(float32(p) · 2^24), V = 2^16 c + t with c the bytes of g's outputs
    after its first and t the top 16 bits of the tie generator's outputs, drawn for c = K >> 16 only; kept iff
    V < K."""
    p32 = np.asarray(p, dtype=np.float32).ravel()
    n = p32.size
    first = g.integers(0, 2**64, dtype=np.uint64)
    ties = np.random.Generator(np.random.SFC64(int(first)))
    c = np.frombuffer(g.integers(0, 2**64, size=-(-n // 8), dtype=np.uint64).astype("<u8").tobytes(),
                      dtype=np.uint8)[:n].astype(np.int64)
    level = np.array([0 if not q > 0 else min(math.ceil(float(q) * 2**24), 2**24) for q in p32], dtype=np.int64)
    tied = c == level >> 16
    t = np.zeros(n, dtype=np.int64)
    t[tied] = (ties.integers(0, 2**64, size=int(tied.sum()), dtype=np.uint64) >> np.uint64(48)).astype(np.int64)
    return (c << 16) + t < level


def keeps(seed: int, name: str, i: int, p: np.ndarray) -> np.ndarray:
    """``keep_decisions`` of input i's documented generator: numpy's SFC64 seeded by tensor_seed."""
    return keep_decisions(np.random.Generator(np.random.SFC64(tensor_seed(seed, f"{name}#{i}"))), p)


def reference(base: torch.Tensor, xs: list[torch.Tensor], w: list[float], kind: str, consensus: str,
              normalize: bool, rescale: bool, lam: float, dens: list[float], gam: list[float], eps: list[float],
              keep_ties: bool, seed: int, name: str) -> np.ndarray:
    b32 = base.numpy().ravel()
    n = b32.size
    taus = []
    for i, x in enumerate(xs):
        t32 = x.numpy().ravel() - b32  # float32, as the code subtracts
        mag = np.abs(t32)
        rho = dens[i]
        keep = np.ones(n, bool)
        if kind != "none" and rho < 1:
            keep = np.zeros(n, bool)
            if kind == "magnitude" and rho > 0:
                k = max(1, int(rho * n))
                if keep_ties:
                    keep = mag >= np.sort(mag)[::-1][k - 1]
                else:
                    keep[np.argsort(-mag, kind="stable")[:k]] = True
            elif kind == "magnitude_outliers":
                target, top = int(rho * n), int(gam[i] * n)
                bottom = max(0, n - target - top)
                keep[np.argsort(mag, kind="stable")[bottom:bottom + target]] = True
            elif kind == "random" or (kind == "della" and rho > 0 and eps[i] == 0):  # DELLA at ε = 0: DARE's drop
                keep = keeps(seed, name, i, np.full(n, rho))
            elif kind == "della" and rho > 0:
                rows = mag.reshape(base.shape if base.dim() >= 2 else (1, -1))  # ranked along dim 1
                c = rows.shape[1]
                ranks = np.argsort(np.argsort(rows, axis=1, kind="stable"), axis=1, kind="stable")
                p_rank = (np.float32(rho - eps[i])
                          + np.clip(np.arange(c, dtype=np.float32) / np.float32(c - 1), 0, 1) * np.float32(2 * eps[i]))
                # the documented draw order: in row i of τ with dim 1 moved last, rank r takes decision i·C + r
                rank_rows = np.moveaxis(ranks, 1, -1).reshape(-1, c)
                by_rank = keeps(seed, name, i, np.tile(p_rank, n // c)).reshape(-1, c)
                kept_rows = np.take_along_axis(by_rank, rank_rows, axis=1)
                keep = np.moveaxis(kept_rows.reshape(np.moveaxis(ranks, 1, -1).shape), -1, 1).ravel()
        tau = t32.astype(np.float64) * keep
        if rescale and kind != "none" and rho < 1:
            before, after = np.abs(t32.astype(np.float64)).sum(), np.abs(tau).sum()
            if before >= tv.RESCALE_EPS and after >= tv.RESCALE_EPS:
                tau = tau * (before / after)
        taus.append(tau)
    T, W = np.stack(taus), np.array(w)[:, None]
    if consensus == "sign":
        d = W * T
        s = np.where(d.sum(0) >= 0, 1.0, -1.0)
        agree = np.sign(d) == s
        num, den = (d * agree).sum(0), (W * agree).sum(0)
        merged = num / np.where(den == 0, 1.0, den) if normalize else num
    elif consensus == "sign_raw":
        s = np.sign((W * T).sum(0))
        agree = (np.sign(T) == s) & (T != 0)
        num, den = (W * T * agree).sum(0), (W * agree).sum(0)
        merged = np.where(den != 0, num / np.where(den != 0, den, 1.0), 0.0) if normalize else num
    else:
        merged = (W * T).sum(0)
        if normalize:
            merged = merged / (sum(w) if abs(sum(w)) >= tv.NORMALIZE_EPS else 1.0)
    return b32.astype(np.float64) + lam * merged


def run(base: torch.Tensor, xs: list[torch.Tensor], w: list[float], kind: str, consensus: str, normalize: bool,
        rescale: bool, lam: float, dens: list[float], gam: list[float], eps: list[float], keep_ties: bool,
        seed: int, name: str) -> torch.Tensor:
    settings = tv.TaskVectorSettings(sparsify=kind, consensus=consensus, normalize=normalize,  # type: ignore[arg-type]
                                     rescale=rescale, lam=lam, keep_ties=keep_ties)
    gens = [tv.input_generator(seed, name, i) for i in range(len(xs))]
    return tv.merge_task_vectors(base, xs, w, settings, density=dens, gamma=gam, epsilon=eps, generators=gens)


def data(kind: str, shape: tuple[int, ...], m: int, seed: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """continuous values, or small integers (many exact ties, zero task-vector entries and zero sums)."""
    g = torch.Generator().manual_seed(seed)
    if kind == "ties":
        base = torch.randint(-2, 3, shape, generator=g).float()
        return base, [base + torch.randint(-3, 4, shape, generator=g).float() for _ in range(m)]
    base = torch.randn(shape, generator=g)
    return base, [base + 0.1 * torch.randn(shape, generator=g) for _ in range(m)]


@pytest.fixture(params=["default", "tiny chunks"])
def chunking(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """The default constants, or 7-entry chunks with sampled selection from 50 entries on (16-entry samples)."""
    if request.param == "tiny chunks":
        monkeypatch.setattr(tv, "CHUNK", 7)
        monkeypatch.setattr(tv, "SAMPLED_SELECTION_MIN", 50)
        monkeypatch.setattr(tv, "_SAMPLE", 16)
    return str(request.param)


@pytest.mark.parametrize("values", ["continuous", "ties"])
@pytest.mark.parametrize("kind", KINDS)
def test_merge_task_vectors_matches_the_reference(kind: str, values: str, chunking: str) -> None:
    shape = (23, 17)
    for m, consensus, normalize, rescale, keep_ties in itertools.product(
            (1, 3), CONSENSUS, (False, True), (False, True), (False, True)):
        if keep_ties and kind != "magnitude":
            continue
        base, xs = data(values, shape, m, seed=m + 7)
        w = [1.0, -0.5, 2.0][:m]
        dens = [0.5, 0.3, 0.9][:m] if kind != "magnitude_outliers" else [0.8, 0.6, 0.9][:m]
        gam, eps = [0.1, 0.05, 0.2][:m], [0.2, 0.1, 0.05][:m]
        args = (base, xs, w, kind, consensus, normalize, rescale, 0.7, dens, gam, eps, keep_ties, 3, "t.w")
        got = run(*args)
        assert got.shape == base.shape and got.dtype == base.dtype
        np.testing.assert_allclose(got.double().numpy().ravel(), reference(*args), rtol=1e-5, atol=1e-5,
                                   err_msg=f"{kind} {values} m={m} {consensus} n={normalize} r={rescale} "
                                           f"t={keep_ties} {chunking}")


@pytest.mark.parametrize("kind", KINDS)
def test_chunking_and_sampling_change_no_bit(kind: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Chunks of 7 and a sampled selection from 50 entries give the whole-tensor result bit for bit (without
    rescale, whose L1 sums are taken per chunk), on tied and continuous values."""
    for values in ("continuous", "ties"):
        base, xs = data(values, (31, 13), 3, seed=11)
        args = (base, xs, [1.0, 0.5, -1.0], kind, "sign", True, False, 1.0, [0.4, 0.6, 0.5], [0.1] * 3,
                [0.2] * 3, False, 0, "k")
        whole = run(*args)
        with monkeypatch.context() as mp:
            mp.setattr(tv, "CHUNK", 7)
            mp.setattr(tv, "SAMPLED_SELECTION_MIN", 50)
            mp.setattr(tv, "_SAMPLE", 16)
            chunked = run(*args)
        assert torch.equal(whole, chunked), (kind, values)


def test_draws_are_one_stream_whatever_the_chunk(monkeypatch: pytest.MonkeyPatch) -> None:
    """The random kinds' documented draws, however the stream is cut into chunks (so the result does not
    depend on :data:`CHUNK`), and however the decisions are asked for (lengths that cut an output's bytes)."""
    n = 1000
    want = keeps(5, "x", 1, np.full(n, 0.3))
    for chunk in (7, 64, 1 << 17):
        monkeypatch.setattr(tv, "CHUNK", chunk)
        assert np.array_equal(tv._draws_below(tv.input_generator(5, "x", 1), 0.3, n).numpy(), want), chunk
    hi, lo = tv.keep_levels(0.3)
    draws, got = tv.KeepDraws(tv.input_generator(5, "x", 1)), np.empty(n, dtype=np.float32)
    for s, e in itertools.pairwise([0, 1, 4, 11, 12, 500, 503, n]):
        draws.decide(hi, lo, got[s:e])
    assert np.array_equal(got, want)


P_EDGES = [0.3, 0.0, 1.0, 1.5, -0.1, float("nan"), 2.0 ** -24, 3 * 2.0 ** -24, 1 - 2.0 ** -24, 1 - 2.0 ** -26,
           0.1234567, float(np.nextafter(np.float32(0.7), np.float32(0))), 100 * 2.0 ** -8 + 2.0 ** -9]


def test_keep_levels_count_the_grid_points_numpy_calls_below_p() -> None:
    """K(p) against brute force over every float32 uniform numpy can draw (``k · 2^-24``, k < 2^24), compared
    with ``p`` as numpy compares a float32 array with a Python float (so K / 2^24 is the probability of
    numpy's ``u < p``); including p a hair above or below a grid point, where rounding p to float32 decides; a
    numpy float64 p is rounded the same way; arrays elementwise; the split is K = 2^16 hi + lo."""
    grid = np.arange(1 << 24, dtype=np.float32) * np.float32(2.0 ** -24)
    near = [(5033165 + d) * 2.0 ** -24 for d in (0.0, 1e-3, -1e-3, 0.49, 0.51)]
    ps = P_EDGES + near
    his, los = tv.keep_levels(np.array(ps))
    for j, p in enumerate(ps):
        below = int(np.count_nonzero(grid < p))
        for hi, lo in (tv.keep_levels(p), tv.keep_levels(np.float64(p)), (his[j], los[j])):
            assert hi.dtype == np.uint8 and 0 <= int(lo) <= 1 << 16
            assert (int(hi) << 16) + int(lo) == below, p


@pytest.mark.parametrize("bit_generator", ["SFC64", "PCG64", "MT19937"])
def test_draws_below_match_the_documented_stream_and_leave_the_generator(bit_generator: str) -> None:
    """``_draws_below`` against the reference stream at probabilities on and beside the 2^-24 grid, 0, 1, NaN
    and out of range, one whose level ties bytes (K = 2^16 · 100 + 2^15), for lengths that cut outputs and
    chunks, with and without a 32-bit half buffered in the generator; the generator is then where the
    reference leaves it (1 + ⌈n / 8⌉ outputs on, the buffered half untouched)."""
    for p, n, primed in itertools.product(P_EDGES, (1, 2, 7, 1000, tv.CHUNK + 3), (False, True)):
        ours, theirs = (np.random.Generator(getattr(np.random, bit_generator)(11)) for _ in range(2))
        if primed:
            ours.random(3, dtype=np.float32), theirs.random(3, dtype=np.float32)
        want = keep_decisions(theirs, np.full(n, p))
        got = tv._draws_below(ours, p, n).numpy()
        assert got.dtype == np.uint8 and np.array_equal(got, want.astype(np.uint8)), (p, n, primed)
        assert np.array_equal(ours.random(9, dtype=np.float32), theirs.random(9, dtype=np.float32)), (p, n)


def test_decide_takes_one_level_per_column() -> None:
    """Per-column levels (DELLA's ranks) against the reference stream, a column at K = 2^24 among them (kept
    whatever its byte, with no tie drawn: the next ties of other columns keep their draws), in blocks of rows
    that cut outputs."""
    p = np.array([1.0, 100 * 2.0 ** -8 + 2.0 ** -9, 0.0, 0.3, 1 - 2.0 ** -26, 2.0 ** -24], dtype=np.float32)
    rows = 3001
    want = keep_decisions(np.random.Generator(np.random.SFC64(9)), np.tile(p, rows)).reshape(rows, p.size)
    hi, lo = tv.keep_levels(p)
    draws, got = tv.KeepDraws(np.random.Generator(np.random.SFC64(9))), np.empty((rows, p.size), np.float32)
    for r0 in range(0, rows, 7):
        draws.decide(hi, lo, got[r0:r0 + 7])
    assert np.array_equal(got, want.astype(np.float32))
    assert want[:, 0].all() and want[:, 4].all() and not want[:, 2].any()
    with pytest.raises(ValueError, match="C-contiguous"):  # ties are written through a flat view
        draws.decide(hi[:3], lo[:3], got[:, :3])


@pytest.mark.parametrize("p", [0.3, 100 * 2.0 ** -8 + 2.0 ** -9, 3 * 2.0 ** -24, 1 - 2.0 ** -20])
def test_keep_decisions_have_the_float32_uniforms_law(p: float) -> None:
    """The kept fraction of 2^22 decisions is P(u < float32(p)) for numpy's float32 uniform u, within 5
    binomial standard deviations; the second p puts half of its level in the tie bits (the kept fraction
    would be 2^-9 lower, 8 deviations, if ties were all dropped), the third is carried by ties alone."""
    n = 1 << 22
    kept = float(tv._draws_below(np.random.Generator(np.random.SFC64(3)), p, n).sum())
    prob = math.ceil(float(np.float32(p)) * 2**24) / 2**24
    assert abs(kept / n - prob) <= 5 * math.sqrt(prob * (1 - prob) / n) + 1 / n, (kept / n, prob)


def _sorted_reference(v: np.ndarray, q: int) -> tuple[float, int, int]:
    thr = np.sort(v)[q]
    return float(thr), int((v < thr).sum()), int((v == thr).sum())


@pytest.mark.parametrize("case", ["continuous", "small integers", "constant", "defeats the stride"])
def test_order_statistic_is_exact_at_full_size(case: str) -> None:
    """At the default sampling sizes (n above SAMPLED_SELECTION_MIN): the bracket's hits, its misses (a stride-
    aligned pattern the sample cannot see) and constant runs all give the sorted array's entry and counts."""
    n = tv.SAMPLED_SELECTION_MIN + 12345
    rng = np.random.default_rng(0)
    v = {"continuous": rng.standard_normal(n), "small integers": rng.integers(0, 5, n),
         "constant": np.zeros(n), "defeats the stride": rng.standard_normal(n)}[case].astype(np.float32)
    if case == "defeats the stride":
        v[:: n // tv._SAMPLE] = 100.0  # every sampled entry is the maximum
    t = torch.from_numpy(v)
    for q in (0, 1, n // 3, n // 2, n - 2, n - 1):
        assert tv._order_statistic(t, q) == _sorted_reference(v, q), (case, q)
    b = torch.from_numpy(rng.standard_normal(n).astype(np.float32))
    x = b + t  # (x, b) reads |x − b| in chunks; the reference materialises it
    mag = np.abs(x.numpy() - b.numpy())
    for q in (0, n // 2, n - 1):
        assert tv._order_statistic((x, b), q) == _sorted_reference(mag, q), (case, q)


def test_rank_bound_is_the_stable_sort_prefix_at_full_size() -> None:
    """top-k / bottom-k at the default sizes, with ties at the cut spread over many chunks."""
    n = tv.SAMPLED_SELECTION_MIN + 999
    rng = np.random.default_rng(1)
    v = rng.integers(0, 4, n).astype(np.float32)
    t = torch.from_numpy(v)
    for k in (0, 1, n // 5, n // 2, n - 1, n):
        for largest in (True, False):
            order = np.argsort(-v if largest else v, kind="stable")
            want = np.zeros(n, bool)
            want[order[:k]] = True
            got = tv.rank_bound(t, k, largest)
            assert np.array_equal(got.mask(t).numpy(), want), (k, largest)
            chunked = torch.cat([got.mask(t[s:s + 1000], s) for s in range(0, n, 1000)])
            assert np.array_equal(chunked.numpy(), want), (k, largest)


@pytest.mark.parametrize("values", ["continuous", "ties"])
@pytest.mark.parametrize("topk", [0.0, 0.3, 0.7, 1.0])
def test_sce_matches_the_reference_across_chunks(values: str, topk: float, chunking: str) -> None:
    """mergekit's sce (selection by variance over chunks, mean squares summed per chunk, sign erase) against
    the whole-array numpy reference of test_mergekit_methods, chunked as the fixture says."""
    from test_mergekit_methods import sce_np

    from vlmerge.merge.mergekit import merge_sce

    base, xs = data(values, (29, 11), 3, seed=5)
    got = merge_sce(base, xs, topk)
    if topk == 0:  # nothing selected: every task vector is zero, the base comes back
        assert torch.equal(got, base)
        return
    want = base.double().numpy() + sce_np([(x - base).numpy() for x in xs], topk)
    np.testing.assert_allclose(got.double().numpy(), want, rtol=1e-5, atol=1e-5, err_msg=f"{values} {chunking}")


@pytest.mark.parametrize("shape", [(40,), (6, 5, 4), (3, 7, 2, 2)])
@pytest.mark.parametrize("values", ["continuous", "ties"])
def test_della_ranks_along_dim_1_of_any_shape(shape: tuple[int, ...], values: str) -> None:
    """DELLA ranks magnitudes along dim 1 (a 1-D tensor: one row), whatever the tensor's rank."""
    base, xs = data(values, shape, 2, seed=3)
    for rescale in (False, True):
        args = (base, xs, [1.0, 0.7], "della", "sign", True, rescale, 1.0, [0.5, 0.4], [0.0] * 2, [0.3, 0.2],
                False, 1, "d")
        np.testing.assert_allclose(run(*args).double().numpy().ravel(), reference(*args), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method", ["multislerp", "nuslerp", "slerp", "karcher", "model_stock", "linear"])
def test_gram_merges_do_not_depend_on_the_chunking(method: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The merges computed from a Gram matrix and one combination pass (multislerp, nuslerp with flatten,
    slerp, karcher, model_stock) and linear give the same tensor in 7-entry chunks as in one chunk, with and without a
    base (their formulas are checked against references in test_mergekit_methods)."""
    import vlmerge.merge.mergekit as mk

    base, xs = data("continuous", (13, 9), 3, seed=2)

    def merged() -> torch.Tensor:
        if method == "multislerp":
            return mk.merge_multislerp(base, xs, [0.5, 0.3, 0.2], True, 1e-8)
        if method == "nuslerp":
            return mk.merge_nuslerp(base, xs[:2], [0.4, 0.6], False, True)
        if method == "slerp":
            return mk.merge_slerp(xs[0], xs[1], 0.3)
        if method == "karcher":
            return mk.merge_karcher(xs, 20, 1e-9)
        if method == "model_stock":
            return mk.merge_model_stock(base, xs, False)
        return mk.merge_linear(xs, [0.2, 0.3, 0.5], True)

    whole = merged()
    monkeypatch.setattr(tv, "CHUNK", 7)
    monkeypatch.setattr(mk, "_DOT_CHUNK", 7)
    np.testing.assert_allclose(merged().numpy(), whole.numpy(), rtol=1e-6, atol=1e-6)
    assert not torch.equal(whole, base)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kind", ["random", "della"])
def test_random_kinds_take_any_float_dtype_and_a_numpy_density(dtype: torch.dtype, kind: str,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """Float64 / float16 / bfloat16 tensors give the float32 merge's masks (the result to the dtype's rounding),
    rescaled or not (DELLA's ranks of half-precision magnitudes differ: there only the dtype and finiteness);
    a numpy float64 density is the Python float (the uniforms compare in float32 either way); a NaN density
    keeps nothing, as ``u < NaN``."""
    base, xs = data("continuous", (9, 16), 2, seed=12)
    tol = 1e-6 if dtype == torch.float64 else 0.05

    def merged(b: torch.Tensor, x: list[torch.Tensor], dens: Any, settings: tv.TaskVectorSettings,
               eps: float) -> torch.Tensor:
        gens = [tv.input_generator(2, "d", i) for i in range(len(x))]
        return tv.merge_task_vectors(b, x, [1.0, 0.5][:len(x)], settings, density=dens, epsilon=[eps] * len(x),
                                     generators=gens)

    for rescale, eps in itertools.product((False, True), (0.0, 0.2)):
        if kind == "random" and eps:
            continue
        settings = tv.TaskVectorSettings(sparsify=kind, consensus="none", rescale=rescale)  # type: ignore[arg-type]
        want = merged(base, xs, [0.6, 0.7], settings, eps)
        got = merged(base.to(dtype), [x.to(dtype) for x in xs], [0.6, 0.7], settings, eps)
        assert got.dtype == dtype and bool(torch.isfinite(got).all())
        if kind == "random" or eps == 0 or dtype == torch.float64:
            np.testing.assert_allclose(got.double().numpy(), want.double().numpy(), rtol=tol, atol=tol)
        assert torch.equal(merged(base, xs, np.array([0.6, 0.7]), settings, eps), want)
    # a density a hair above the level K* = V_0 of entry 0's draw when it ties (byte c_0, the first tie
    # output's top 16 bits t_0): float32(ρ) = K* / 2^24, so entry 0 is dropped whatever ρ's type (K = K* + 1,
    # a float64 comparison, would keep it)
    g = tv.input_generator(2, "d", 0)
    ties = np.random.Generator(np.random.SFC64(int(g.integers(0, 2**64, dtype=np.uint64))))
    c0 = int(g.integers(0, 2**64, dtype=np.uint64)) & 0xFF
    t0 = int(ties.integers(0, 2**64, dtype=np.uint64)) >> 48
    rho = ((c0 << 16) + t0) * 2.0 ** -24 + 2.0 ** -32
    plain = tv.TaskVectorSettings(sparsify="random")
    for dens in ([rho], np.array([rho]), [np.float64(rho)]):
        got = merged(base, xs[:1], dens, plain, 0.0)
        assert got.flatten()[0] == base.flatten()[0], type(dens)
    assert merged(base, xs[:1], [rho + 2.0 ** -24], plain, 0.0).flatten()[0] != base.flatten()[0]
    nothing = tv.merge_task_vectors(base, xs, [1.0, 1.0], tv.TaskVectorSettings(sparsify="random", rescale=True),
                                    density=[float("nan")] * 2, generators=[tv.input_generator(0, "n", i)
                                                                            for i in range(2)])
    assert torch.equal(nothing, base)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("consensus", CONSENSUS)
def test_out_may_be_the_base_or_an_input(kind: str, consensus: str) -> None:
    """Writing the result into the base's or an input's memory gives the result of a fresh output."""
    base, xs = data("continuous", (37, 11), 2, seed=5)
    settings = tv.TaskVectorSettings(sparsify=kind, consensus=consensus, rescale=True)  # type: ignore[arg-type]

    def merged(out: torch.Tensor | None, b: torch.Tensor, x: list[torch.Tensor]) -> torch.Tensor:
        gens = [tv.input_generator(1, "o", i) for i in range(2)]
        return tv.merge_task_vectors(b, x, [1.0, 0.6], settings, density=[0.5, 0.7], gamma=[0.1] * 2,
                                     epsilon=[0.2] * 2, generators=gens, out=out)

    want = merged(None, base, xs)
    for target in range(3):  # the base, the first input, the second input
        b, x = base.clone(), [t.clone() for t in xs]
        out = b if target == 0 else x[target - 1]
        got = merged(out, b, x)
        assert got.data_ptr() == out.data_ptr() and torch.equal(got, want), (kind, consensus, target)


@pytest.mark.parametrize("shape", [(7, 5), (9, 3, 2), (33,)])
def test_della_mask_and_generator_state(shape: tuple[int, ...]) -> None:
    """DELLA's mask against the reference for odd entry counts, and with ρ + ε so close to 1 that the top
    rank's probability rounds to 1.0 in float32 (K = 2^24: kept whatever the draw); the generator is left
    ``1 + ⌈n / 8⌉`` outputs on, as the stream documents."""
    base, xs = data("ties", shape, 2, seed=8)
    for dens, eps in ((0.5, 0.3), (0.5, 0.5 - 1e-9)):
        args = (base, xs, [1.0, -0.5], "della", "none", False, True, 1.0, [dens] * 2, [0.0] * 2, [eps] * 2, False,
                4, "w")
        np.testing.assert_allclose(run(*args).double().numpy().ravel(), reference(*args), rtol=1e-5, atol=1e-5)
        g, want = tv.input_generator(4, "w", 0), tv.input_generator(4, "w", 0)
        tv._kept(xs[0].reshape(-1), base.reshape(-1), base.shape, "della", dens, 0.0, eps, True, False, g)
        want.integers(0, 2**64, size=1 + -(-base.numel() // 8), dtype=np.uint64)
        assert np.array_equal(g.random(5, dtype=np.float32), want.random(5, dtype=np.float32)), (shape, eps)


@pytest.mark.parametrize("epsilon", [0.0, 1e-40, 1e-12, 0.3999])
def test_della_with_extreme_epsilon(epsilon: float) -> None:
    """ε = 0 (allowed: density ± 0 lies in (0, 1)) gives every rank the probability ρ, DARE's draw; ε so small
    that the rank estimate's scale overflows float32 takes the exact search; ε next to ρ the widest spread."""
    base, xs = data("ties", (20, 30), 1, seed=4)
    args = (base, xs, [1.0], "della", "none", False, False, 1.0, [0.4], [0.0], [epsilon], False, 2, "z")
    np.testing.assert_allclose(run(*args).double().numpy().ravel(), reference(*args), rtol=1e-6, atol=1e-6)
