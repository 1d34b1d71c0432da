"""mergekit's other merge methods through the real CLI (``vlmerge merge CONFIG.yaml OUT_DIR``) on pico
Hugging-Face-style checkpoints: dare_linear, dare_ties, breadcrumbs, breadcrumbs_ties, della, della_linear,
model_stock, nuslerp, multislerp, karcher, sce, passthrough (and the task-vector semantics they share with
task_arithmetic / ties).

Every expected value is written here from the method's formula (numpy, float64) or by hand, never by calling
the code under test. The random methods (DARE, DELLA) are checked by their statistics (kept fraction within a
binomial tolerance) and by the exact value of every kept entry given the realised mask.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from test_mergekit_config import EMB, LN, POOL, POS, Q, bert_sd, floats, hf, merge, refused, write_cfg

KEY = "encoder.layer.0.attention.self.query.weight"  # the one key of the hand-made models
POS_T = torch.arange(4, dtype=torch.int64)


def one_key(root: Path, name: str, t: torch.Tensor) -> Path:
    return hf(root, name, {KEY: t.float(), POS: POS_T})


def models(*specs: tuple[Path, dict[str, Any]]) -> list[dict[str, Any]]:
    return [{"model": str(p), **({"parameters": q} if q else {})} for p, q in specs]


def np_(t: torch.Tensor) -> np.ndarray:
    return t.double().numpy()


def close(got: torch.Tensor, want: np.ndarray, atol: float = 2e-6) -> None:
    np.testing.assert_allclose(got.double().numpy(), want, rtol=0, atol=atol)


@pytest.fixture()
def four(tmp_path: Path) -> tuple[list[Path], list[dict[str, torch.Tensor]]]:
    """A base (seed 0) and three fine-tunes: base + small offsets (seeds 1-3), BERT-shaped."""
    b = bert_sd(0)
    sds = [b]
    for s in (1, 2, 3):
        o = bert_sd(s)
        sds.append({k: (b[k] + 0.3 * o[k] if v.is_floating_point() else v) for k, v in b.items()})
    return [hf(tmp_path, n, sd) for n, sd in zip(("base", "m1", "m2", "m3"), sds, strict=True)], sds


# ------------------------------------------------------------------------------------- task-vector family
def test_ties_exact_k_takes_magnitude_ties_in_index_order(tmp_path: Path) -> None:
    """mergekit's ties keeps exactly k = int(density · n) entries; equal magnitudes at the cut are taken in
    flat-index order (vlmerge's own ties would keep every tied entry)."""
    base = one_key(tmp_path, "base", torch.zeros(6))
    a = one_key(tmp_path, "a", torch.tensor([2.0, -1.0, 2.0, 2.0, 0.5, -3.0]))
    # k = 3: |τ| sorted: 3 (idx 5), then the tied 2s at idx 0, 2, 3 -> idx 0, 2 kept, idx 3 dropped
    got = merge(tmp_path, {"merge_method": "ties", "base_model": str(base),
                           "models": models((a, {"weight": 1.0, "density": 0.5}))})[KEY]
    assert torch.equal(got, torch.tensor([2.0, 0.0, 2.0, 0.0, 0.0, -3.0]))
    # density 0.01: k = max(1, int(0.06)) = 1; density 0: nothing kept (the base)
    got = merge(tmp_path, {"merge_method": "ties", "base_model": str(base),
                           "models": models((a, {"weight": 1.0, "density": 0.01}))}, "o2")[KEY]
    assert torch.equal(got, torch.tensor([0.0, 0.0, 0.0, 0.0, 0.0, -3.0]))
    got = merge(tmp_path, {"merge_method": "ties", "base_model": str(base),
                           "models": models((a, {"weight": 1.0, "density": 0.0}))}, "o3")[KEY]
    assert torch.equal(got, torch.zeros(6))


def test_ties_zero_sum_elects_plus_and_rescale(tmp_path: Path) -> None:
    base = one_key(tmp_path, "base", torch.ones(4))
    a = one_key(tmp_path, "a", 1 + torch.tensor([2.0, -1.0, 4.0, 0.0]))
    b = one_key(tmp_path, "b", 1 + torch.tensor([-2.0, 3.0, -1.0, 0.0]))
    cfg: dict[str, Any] = {"merge_method": "ties", "base_model": str(base), "parameters": {"weight": 1.0},
                           "models": models((a, {}), (b, {}))}
    # Σ d = [0, 2, 3, 0]: idx 0 sums to zero -> + elected, only a's +2 agrees: 2 / 1; idx 3: nobody -> 0
    assert torch.equal(merge(tmp_path, cfg)[KEY], 1 + torch.tensor([2.0, 3.0, 4.0, 0.0]))
    # weights 1 and 2: d = [2, -1, 4, 0] and [-4, 6, -2, 0]; Σ = [-2, 5, 2, 0] -> [-, +, +, +]
    # idx 0: b agrees: -4 / 2; idx 1: 6 / 2; idx 2: 4 / 1
    cfg["models"][1]["parameters"] = {"weight": 2.0}
    assert torch.equal(merge(tmp_path, cfg, "o2")[KEY], 1 + torch.tensor([-2.0, 3.0, 4.0, 0.0]))
    # rescale with density 0.5 (k = 2): τ̂_a = [2, 0, 4, 0] · (7 / 6), τ̂_b = [-2, 3, 0, 0] · (6 / 5)
    cfg["models"] = models((a, {"weight": 1.0, "density": 0.5}), (b, {"weight": 1.0, "density": 0.5}))
    cfg["parameters"] = {"rescale": True, "normalize": False}
    ta, tb = np.array([2, 0, 4, 0]) * 7 / 6, np.array([-2, 3, 0, 0]) * 6 / 5
    # Σ = [7/3 − 12/5 < 0, 3.6, 14/3, 0] -> [−, +, +, +]; normalize false: the agreeing sum
    close(merge(tmp_path, cfg, "o3")[KEY], 1 + np.array([tb[0], tb[1], ta[2], 0.0]))


def test_vlmerge_own_ties_differs_where_documented() -> None:
    """vlmerge's own ``ties`` (``--method ties``), on the cases above: every entry tied with the k-th
    magnitude is kept, and an exactly zero sum elects no sign (the entry stays at the base)."""
    from vlmerge.merge import merge_tensors

    tau = torch.tensor([2.0, -1.0, 2.0, 2.0, 0.5, -3.0])
    got = merge_tensors("ties", [tau, torch.zeros(6)], base=torch.zeros(6), density=0.5)
    # k = 3, all three 2s tied at the cut are kept; the second input is all zero (agrees nowhere)
    assert torch.equal(got, torch.tensor([2.0, 0.0, 2.0, 2.0, 0.0, -3.0]))
    a, b = torch.tensor([2.0, -1.0, 4.0, 0.0]), torch.tensor([-2.0, 3.0, -1.0, 0.0])
    got = merge_tensors("ties", [1 + a, 1 + b], base=torch.ones(4), density=1.0)
    assert torch.equal(got, 1 + torch.tensor([0.0, 3.0, 4.0, 0.0]))  # mergekit's ties: [2, 3, 4, 0]


def test_task_arithmetic_normalize_zero_weight_sum_divides_by_one(tmp_path: Path, four) -> None:
    (b, m1, m2, _), (B, X1, X2, _) = four
    got = merge(tmp_path, {"merge_method": "task_arithmetic", "base_model": str(b),
                           "parameters": {"normalize": True, "lambda": 0.5},
                           "models": models((m1, {"weight": 1.0}), (m2, {"weight": -1.0}))})
    for k in floats(B):  # Σ w = 0: mergekit divides by 1
        close(got[k], np_(B[k]) + 0.5 * (np_(X1[k]) - np_(X2[k])))


def test_breadcrumbs_drops_smallest_and_outliers(tmp_path: Path) -> None:
    base = one_key(tmp_path, "base", torch.zeros(10))
    tau = torch.tensor([0.1, -5.0, 0.3, 2.0, -0.4, 9.0, 0.6, -0.7, 1.5, 0.2])
    a = one_key(tmp_path, "a", tau)
    # ascending |τ| order: idx 0 (0.1), 9, 2, 4, 6, 7, 8, 3, 1, 5 (9.0)
    # density 0.5, gamma 0.2: t = 5, g = 2, β = 3 -> sorted positions 3..7: idx 4, 6, 7, 8, 3
    cfg: dict[str, Any] = {"merge_method": "breadcrumbs", "base_model": str(base),
                           "models": models((a, {"weight": 2.0, "density": 0.5, "gamma": 0.2}))}
    want = torch.zeros(10)
    want[[4, 6, 7, 8, 3]] = 2 * tau[[4, 6, 7, 8, 3]]
    assert torch.equal(merge(tmp_path, cfg)[KEY], want)
    # density 0.9, gamma 0.2: t + g > n -> β = 0: the 9 smallest kept, only the largest dropped
    cfg["models"][0]["parameters"] = {"weight": 1.0, "density": 0.9, "gamma": 0.2}
    want = tau.clone()
    want[5] = 0
    assert torch.equal(merge(tmp_path, cfg, "o2")[KEY], want)
    # the defaults: density 1 -> no sparsification at all (gamma unused): task arithmetic
    cfg["models"][0]["parameters"] = {"weight": 1.0, "gamma": 0.3}
    assert torch.equal(merge(tmp_path, cfg, "o3")[KEY], tau)
    # default gamma 0.01 -> g = int(0.1) = 0: density 0.5 keeps the 5 largest
    cfg["models"][0]["parameters"] = {"weight": 1.0, "density": 0.5}
    want = torch.zeros(10)
    want[[8, 3, 1, 5, 7]] = tau[[8, 3, 1, 5, 7]]
    assert torch.equal(merge(tmp_path, cfg, "o4")[KEY], want)


def test_breadcrumbs_ties_sign_election(tmp_path: Path) -> None:
    base = one_key(tmp_path, "base", torch.zeros(5))
    a = one_key(tmp_path, "a", torch.tensor([1.0, -2.0, 3.0, -9.0, 0.5]))
    b = one_key(tmp_path, "b", torch.tensor([-1.0, 2.5, -4.0, 8.0, 0.25]))
    # each: density 0.6, gamma 0.2 -> t = 3, g = 1, β = 1: drop the smallest and the largest
    # a keeps idx 0, 1, 2 -> [1, -2, 3, 0, 0]; b keeps idx 0, 1, 2 -> [-1, 2.5, -4, 0, 0]
    # Σ = [0, 0.5, -1, 0, 0] -> [+, +, -, +, +]; normalize false (the default): agreeing sum
    got = merge(tmp_path, {"merge_method": "breadcrumbs_ties", "base_model": str(base),
                           "parameters": {"weight": 1.0, "density": 0.6, "gamma": 0.2},
                           "models": models((a, {}), (b, {}))})[KEY]
    assert torch.equal(got, torch.tensor([1.0, 2.5, -4.0, 0.0, 0.0]))


def test_dare_ties_gradients_filters_and_realised_masks(tmp_path: Path, four) -> None:
    """attention tensors: density 1 for both (deterministic TIES with the gradient weights, no trimming);
    elsewhere model a keeps a random half (rescaled to its L1 norm) and b nothing (density 0)."""
    (b, m1, m2, _), (B, X1, X2, _) = four
    dens_a = [{"filter": "attention", "value": 1.0}, {"value": 0.5}]
    dens_b = [{"filter": "attention", "value": 1.0}, {"value": 0.0}]
    cfg: dict[str, Any] = {"merge_method": "dare_ties", "base_model": str(b),
                           "models": models((m1, {"weight": [1.0, 0.5], "density": dens_a}),
                                            (m2, {"weight": 0.5, "density": dens_b}))}
    got = merge(tmp_path, cfg)
    kept = total = 0
    for k in floats(B):
        m = None if "layer." not in k else int(k.split("layer.")[1].split(".")[0])
        wa = 1.0 if m is None else 1.0 - 0.5 * m / 2  # gradient over 3 layers; no layer index: the first value
        ta, tb = np_(X1[k]) - np_(B[k]), np_(X2[k]) - np_(B[k])
        if "attention" in k:
            da, db = wa * ta, 0.5 * tb
            s = np.where(da + db >= 0, 1.0, -1.0)
            merged = np.where(np.sign(da) == s, da, 0) + np.where(np.sign(db) == s, db, 0)  # normalize: false
            close(got[k], np_(B[k]) + merged, atol=1e-5)
            continue
        delta = np_(got[k]) - np_(B[k])
        mask = delta != 0
        kept += int(mask.sum())
        total += mask.size
        if mask.any():  # kept entries: exactly w_a · τ_a · ‖τ_a‖₁ / ‖τ_a ⊙ M‖₁
            scale = np.abs(ta).sum() / np.abs(ta * mask).sum()
            np.testing.assert_allclose(delta[mask], (wa * ta * scale)[mask], rtol=1e-5, atol=2e-6)
    assert 0 < kept < total
    assert abs(kept - 0.5 * total) <= 5 * math.sqrt(total * 0.25)
    # deterministic: the same run gives the same bits; another random_seed other masks
    again = merge(tmp_path, cfg, "o2")
    assert all(torch.equal(got[k], again[k]) for k in got)
    cfg["parameters"] = {"random_seed": 7}
    other = merge(tmp_path, cfg, "o3")
    assert any(not torch.equal(got[k], other[k]) for k in floats(B) if "attention" not in k)


def test_dare_linear_statistics_and_l1_rescale(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(3)
    b0, tau = torch.randn(100, 100, generator=g), torch.randn(100, 100, generator=g)
    base, a = one_key(tmp_path, "base", b0), one_key(tmp_path, "a", b0 + tau)
    c = one_key(tmp_path, "c", b0 - 0.5 * tau)
    got = merge(tmp_path, {"merge_method": "dare_linear", "base_model": str(base),
                           "models": models((a, {"weight": 0.8, "density": 0.3}))})[KEY]
    delta, t = np_(got) - np_(b0), np_(tau)
    mask = np.abs(delta) > 1e-6
    n = mask.size
    assert abs(mask.sum() - 0.3 * n) <= 5 * math.sqrt(n * 0.3 * 0.7)
    scale = np.abs(t).sum() / np.abs(t * mask).sum()  # mergekit's rescale keeps the L1 norm (≈ 1/0.3 here)
    np.testing.assert_allclose(delta[mask], 0.8 * t[mask] * scale, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.abs(delta).sum(), 0.8 * np.abs(t).sum(), rtol=1e-5)
    # rescale: false keeps the kept entries as they are; two models: independent masks per model
    got = merge(tmp_path, {"merge_method": "dare_linear", "base_model": str(base),
                           "parameters": {"rescale": False, "density": 0.5, "weight": 1.0},
                           "models": models((a, {}), (c, {}))}, "o2")[KEY]
    delta = np_(got) - np_(b0)
    values = {"both": 0.5 * t, "a": t, "c": -0.5 * t}
    which = np.full(delta.shape, "", dtype=object)
    for name, v in values.items():
        which[np.isclose(delta, v, rtol=0, atol=1e-5) & (np.abs(t) > 1e-3)] = name
    which[np.abs(delta) < 1e-6] = "none"
    assert (which != "").mean() > 0.99  # every entry is one of the four cases
    for name in values:  # each case has probability 1/4
        assert abs((which == name).sum() - n / 4) <= 5 * math.sqrt(n * 3 / 16), name


def test_della_rank_probabilities(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(5)
    b0, tau = torch.randn(50, 200, generator=g), torch.randn(50, 200, generator=g)
    base, a = one_key(tmp_path, "base", b0), one_key(tmp_path, "a", b0 + tau)
    got = merge(tmp_path, {"merge_method": "della_linear", "base_model": str(base),
                           "models": models((a, {"weight": 1.0, "density": 0.5, "epsilon": 0.3}))})[KEY]
    t = np_(tau)
    delta = np_(got) - np_(b0)
    mask = delta != 0
    ranks = np.argsort(np.argsort(np.abs(t), axis=1), axis=1)  # per row (dim 1), 0 = smallest
    p = 0.2 + 0.6 * ranks / (t.shape[1] - 1)
    for lo, hi in ((0.0, 0.25), (0.25, 0.5), (0.5, 0.75), (0.75, 1.01)):
        sel = (ranks / (t.shape[1] - 1) >= lo) & (ranks / (t.shape[1] - 1) < hi)
        want, sd = p[sel].sum(), math.sqrt((p[sel] * (1 - p[sel])).sum())
        assert abs(mask[sel].sum() - want) <= 5 * sd, (lo, mask[sel].mean(), p[sel].mean())
    scale = np.abs(t).sum() / np.abs(t * mask).sum()  # rescale (default true): the L1 norm of the whole tensor
    np.testing.assert_allclose(delta[mask], t[mask] * scale, rtol=1e-5, atol=1e-5)


def test_della_sign_consensus_and_epsilon_range(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    base = one_key(tmp_path, "base", torch.zeros(2, 3))
    a = one_key(tmp_path, "a", torch.tensor([[1.0, -2.0, 3.0], [4.0, 0.5, -1.0]]))
    b = one_key(tmp_path, "b", torch.tensor([[-3.0, -2.0, 1.0], [-1.0, 0.5, 2.0]]))
    # density 1: no sparsification; della's defaults: normalize true -> the TIES disjoint mean
    got = merge(tmp_path, {"merge_method": "della", "base_model": str(base), "parameters": {"weight": 1.0},
                           "models": models((a, {}), (b, {}))})[KEY]
    assert torch.equal(got, torch.tensor([[-3.0, -2.0, 2.0], [4.0, 0.5, 2.0]]))
    # density ± epsilon must lie in (0, 1): density 0.9 with the default epsilon 0.15 is refused
    cfg = write_cfg(tmp_path / "bad.yaml", {"merge_method": "della", "base_model": str(base),
                                            "models": models((a, {"weight": 1.0, "density": 0.9}))})
    refused(capsys, ["merge", str(cfg), str(tmp_path / "bad")], "models[0].parameters", "epsilon", "0.15", KEY)
    # rows of one entry along dim 1 leave the rank normalisation undefined
    base1, a1 = one_key(tmp_path, "base1", torch.zeros(4, 1)), one_key(tmp_path, "a1", torch.ones(4, 1))
    cfg = write_cfg(tmp_path / "bad.yaml", {"merge_method": "della_linear", "base_model": str(base1),
                                            "models": models((a1, {"weight": 1.0, "density": 0.5}))})
    refused(capsys, ["merge", str(cfg), str(tmp_path / "bad")], KEY, "rows of 1")
    assert not (tmp_path / "bad").exists()


# ------------------------------------------------------------------------------------------------ others
def model_stock_np(b: np.ndarray, xs: list[np.ndarray], filter_wise: bool) -> np.ndarray:
    """Model Stock: t = k·cos / (1 + (k − 1)·cos) (cos: the mean pairwise cosine of the offsets x_i − b, per
    row with filter_wise), out = t·mean(x) + (1 − t)·b."""
    shape = b.shape
    if not filter_wise or b.ndim == 1:
        b, xs = b.reshape(1, -1), [x.reshape(1, -1) for x in xs]
    offs = [x - b for x in xs]
    k = len(xs)
    cos = np.mean([np.clip((offs[i] * offs[j]).sum(-1) / np.maximum(
        np.linalg.norm(offs[i], axis=-1) * np.linalg.norm(offs[j], axis=-1), 1e-6), -1, 1)
        for i in range(k) for j in range(i + 1, k)], axis=0)[..., None]
    t = k * cos / (1 + (k - 1) * cos)
    return (t * sum(xs) / k + (1 - t) * b).reshape(shape)


def test_model_stock(tmp_path: Path, four) -> None:
    (b, m1, m2, m3), sds = four
    B, xs = sds[0], sds[1:]
    cfg: dict[str, Any] = {"merge_method": "model_stock", "base_model": str(b),
                           "models": models((b, {}), (m1, {}), (m2, {}), (m3, {}))}
    got = merge(tmp_path, cfg)
    for k in floats(B):
        close(got[k], model_stock_np(np_(B[k]), [np_(x[k]) for x in xs], False), atol=1e-5)
    assert torch.equal(got[POS], B[POS])
    cfg["parameters"] = {"filter_wise": True}
    cfg["models"] = models((m1, {}), (m2, {}))
    got = merge(tmp_path, cfg, "o2")
    for k in floats(B):
        close(got[k], model_stock_np(np_(B[k]), [np_(x[k]) for x in xs[:2]], True), atol=1e-5)
    # the LayerNorm weights' offsets are colinear: cos = 1 -> t = 1, the average
    close(got[LN.format(0)], (np_(xs[0][LN.format(0)]) + np_(xs[1][LN.format(0)])) / 2)


def slerp_np(t: float, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Slerp of each vector along the last axis; lerp where the directions are (numerically) colinear."""
    ua = a / np.maximum(np.linalg.norm(a, axis=-1, keepdims=True), 1e-7)
    ub = b / np.maximum(np.linalg.norm(b, axis=-1, keepdims=True), 1e-7)
    cos = np.clip((ua * ub).sum(-1, keepdims=True), -1, 1)
    th = np.arccos(cos)
    with np.errstate(invalid="ignore", divide="ignore"):
        sph = (np.sin((1 - t) * th) * a + np.sin(t * th) * b) / np.sin(th)
    return np.where(1 - cos**2 <= 1e-12, (1 - t) * a + t * b, sph)


def test_nuslerp_flatten_rows_and_columns(tmp_path: Path, four) -> None:
    (b, m1, m2, _), (B, X1, X2, _) = four
    cfg: dict[str, Any] = {"merge_method": "nuslerp", "base_model": str(b),
                           "models": models((m1, {"weight": 0.25}), (m2, {"weight": 0.75}))}
    got = merge(tmp_path, cfg)  # defaults: nuslerp_flatten true; t = 0.75 / (0.25 + 0.75)
    for k in floats(B):
        v0, v1 = (np_(X1[k]) - np_(B[k])).ravel(), (np_(X2[k]) - np_(B[k])).ravel()
        close(got[k], np_(B[k]) + slerp_np(0.75, v0, v1).reshape(B[k].shape), atol=1e-5)
    # flatten false: vectors along the last axis (rows x[i, :]); row_wise: along the first (columns x[:, j])
    for i, row_wise in enumerate((False, True)):
        cfg["parameters"] = {"nuslerp_flatten": False, "nuslerp_row_wise": row_wise}
        got = merge(tmp_path, cfg, f"r{i}")
        for k in (EMB, POOL, Q.format(1)):
            v0, v1 = np_(X1[k]) - np_(B[k]), np_(X2[k]) - np_(B[k])
            want = slerp_np(0.75, v0.T, v1.T).T if row_wise else slerp_np(0.75, v0, v1)
            close(got[k], np_(B[k]) + want, atol=1e-5)
    # no base: the models themselves; weights summing to 0: t = 0.5
    got = merge(tmp_path, {"merge_method": "nuslerp", "models": models((m1, {"weight": 1.0}), (m2, {"weight": -1.0}))},
                "nb")
    close(got[EMB], slerp_np(0.5, np_(X1[EMB]).ravel(), np_(X2[EMB]).ravel()).reshape(5, 3), atol=1e-5)


def multislerp_np(b: np.ndarray | None, xs: list[np.ndarray], w: list[float], eps: float = 1e-8) -> np.ndarray:
    """Barycentric slerp: unit directions u_i, weighted mean μ (normalised), tangents u_i − (u_i·μ)μ averaged,
    the exponential map back, scaled by the weighted mean norm."""
    ww = np.array(w) / sum(w)
    v = np.stack([(x - b if b is not None else x).ravel() for x in xs])
    nrm = np.linalg.norm(v, axis=1)
    u = v / (nrm[:, None] + eps)
    mu = (ww[:, None] * u).sum(0)
    mu = mu / np.linalg.norm(mu)
    g = (ww[:, None] * (u - (u @ mu)[:, None] * mu)).sum(0)
    th = np.linalg.norm(g) + eps
    out = ((np.cos(th) * mu + np.sin(th) / th * g) * (ww * nrm).sum()).reshape(xs[0].shape)
    return out + (b if b is not None else 0)


def test_multislerp(tmp_path: Path, four, capsys: pytest.CaptureFixture[str]) -> None:
    (b, m1, m2, m3), (B, X1, X2, X3) = four
    w = [1.0, 2.0, 0.5]
    got = merge(tmp_path, {"merge_method": "multislerp", "base_model": str(b),
                           "models": models((m1, {"weight": w[0]}), (m2, {"weight": w[1]}), (m3, {"weight": w[2]}))})
    for k in floats(B):
        close(got[k], multislerp_np(np_(B[k]), [np_(X[k]) for X in (X1, X2, X3)], w), atol=1e-5)
    got = merge(tmp_path, {"merge_method": "multislerp",
                           "models": models((m1, {"weight": 1.0}), (m2, {"weight": 3.0}))}, "nb")
    for k in floats(B):
        close(got[k], multislerp_np(None, [np_(X1[k]), np_(X2[k])], [1.0, 3.0]), atol=1e-5)
    # one model besides the base: that model
    got = merge(tmp_path, {"merge_method": "multislerp", "base_model": str(b), "models": models((m1, {"weight": 2.0}))},
                "one")
    assert all(torch.equal(got[k], X1[k]) for k in floats(B))
    cfg = write_cfg(tmp_path / "bad.yaml", {"merge_method": "multislerp", "models": models(
        (m1, {"weight": 1.0}), (m2, {"weight": -1.0}))})
    refused(capsys, ["merge", str(cfg), str(tmp_path / "bad")], "multislerp", "sum to 0", "normalize_weights")


def karcher_np(xs: list[np.ndarray], max_iter: int = 10, tol: float = 1e-5) -> np.ndarray:
    """The Karcher mean on the unit sphere (equal weights), Riemannian gradient steps, scaled by the mean
    norm of the inputs."""
    flat = [x.ravel() for x in xs]
    norms = [np.linalg.norm(f) for f in flat]
    units = [f / n for f, n in zip(flat, norms, strict=True) if n > tol]
    a = 1.0 / len(units)
    mu = sum(a * u for u in units)
    mu = mu / np.linalg.norm(mu)
    for _ in range(max_iter):
        g = np.zeros_like(mu)
        for u in units:
            d = np.clip(mu @ u, -1, 1)
            th = np.arccos(d)
            if th >= tol:
                g += a * th / np.sin(th) * (u - d * mu)
        gn = np.linalg.norm(g)
        if gn < tol:
            break
        mu = np.cos(gn) * mu + np.sin(gn) * g / gn
        mu = mu / np.linalg.norm(mu)
    return (np.mean(norms) * mu).reshape(xs[0].shape)


def test_karcher_counts_the_base_as_an_input(tmp_path: Path, four) -> None:
    (b, m1, m2, m3), sds = four
    got = merge(tmp_path, {"merge_method": "karcher", "base_model": str(b), "parameters": {"max_iter": 50, "tol": 1e-7},
                           "models": models((m1, {}), (m2, {}), (m3, {}))})
    B = sds[0]
    for k in floats(B):
        close(got[k], karcher_np([np_(s[k]) for s in sds], 50, 1e-7), atol=1e-5)
    # max_iter 0: the normalised mean direction times the mean norm; no base: only the listed models
    got = merge(tmp_path, {"merge_method": "karcher", "parameters": {"max_iter": 0},
                           "models": models((m1, {}), (m2, {}))}, "o2")
    for k in floats(B):
        close(got[k], karcher_np([np_(s[k]) for s in sds[1:3]], 0), atol=1e-5)
    # the colinear LayerNorm weights: their Karcher mean is their direction, times the mean norm
    close(got[LN.format(0)], (np_(sds[1][LN.format(0)]) + np_(sds[2][LN.format(0)])) / 2, atol=1e-5)


def sce_np(ts: list[np.ndarray], topk: float) -> np.ndarray:
    """SCE's merged task vector of the task vectors ``ts`` (any one shape): the ``topk`` fraction of entries of
    largest variance over the inputs kept, mean-square weights, sign erase."""
    shape = ts[0].shape
    t = np.stack([x.ravel() for x in ts])
    if topk < 1:
        var = t.var(axis=0)
        k = int(np.count_nonzero(var) * topk)
        keep = np.zeros(var.size, bool)
        keep[np.argsort(-var, kind="stable")[:k]] = True
        t = t * keep
    ms = (t**2).mean(axis=1)
    om = ms / ms.sum()
    s = np.where(t.sum(0) >= 0, 1.0, -1.0)
    wm = om[:, None] * (np.sign(t) == s)
    return ((t * wm).sum(0) / np.maximum(wm.sum(0), 1e-6)).reshape(shape)


def test_sce_select_calculate_erase(tmp_path: Path) -> None:
    base = one_key(tmp_path, "base", torch.zeros(6))
    taus = [np.array([1.0, 2.0, -1.0, 0.5, 3.0, -2.0]),
            np.array([1.0, -2.0, 1.0, 0.25, 2.0, -1.0]),
            np.array([1.0, 1.0, -3.0, 0.0, -2.0, 4.0])]
    dirs = [one_key(tmp_path, f"m{i}", torch.tensor(t)) for i, t in enumerate(taus)]
    cfg: dict[str, Any] = {"merge_method": "sce", "base_model": str(base),
                           "parameters": {"select_topk": 0.5}, "models": models(*[(d, {}) for d in dirs])}
    # idx 0 has zero variance (all 1): 5 entries vary, k = int(5 · 0.5) = 2 (idx 5 and 4 vary most)
    close(merge(tmp_path, cfg)[KEY], sce_np(taus, 0.5))
    want = sce_np(taus, 0.5)
    assert np.count_nonzero(want) == 2 and want[4] != 0 and want[5] != 0
    cfg["parameters"] = {}
    close(merge(tmp_path, cfg, "o2")[KEY], sce_np(taus, 1.0))


def test_linear_counts_an_unlisted_base_model(tmp_path: Path, four) -> None:
    (b, m1, m2, _), (B, X1, X2, _) = four
    got = merge(tmp_path, {"merge_method": "linear", "base_model": str(b), "parameters": {"weight": 1.0},
                           "models": models((m1, {"weight": 2.0}), (m2, {}))})
    for k in floats(B):  # mergekit adds the base model as one more input, with the global weight
        close(got[k], (np_(B[k]) + 2 * np_(X1[k]) + np_(X2[k])) / 4)


def test_passthrough(tmp_path: Path, four, capsys: pytest.CaptureFixture[str]) -> None:
    (b, m1, m2, _), (B, X1, _, _) = four
    scale = [{"filter": "query", "value": 0.5}, {"value": 2.0}]
    got = merge(tmp_path, {"merge_method": "passthrough", "models": models((m1, {"scale": scale}))})
    for k in floats(B):
        assert torch.equal(got[k], X1[k] * (0.5 if "query" in k else 2.0)), k
    assert torch.equal(got[POS], X1[POS])
    # the base model, when it is the one model; no scale: a copy
    got = merge(tmp_path, {"merge_method": "passthrough", "base_model": str(m1), "models": models((m1, {}))}, "o2")
    assert all(torch.equal(got[k], X1[k]) for k in X1)
    for cfg in ({"merge_method": "passthrough", "models": models((m1, {}), (m2, {}))},
                {"merge_method": "passthrough", "base_model": str(b), "models": models((m1, {}))}):
        refused(capsys, ["merge", str(write_cfg(tmp_path / "bad.yaml", cfg)), str(tmp_path / "bad")],
                "passthrough", "exactly 1", "got 2")


# ------------------------------------------------------------------------------------------------ errors
def test_bad_parameters_name_the_key(tmp_path: Path, four, capsys: pytest.CaptureFixture[str]) -> None:
    (b, m1, m2, m3), _ = four
    out = str(tmp_path / "out")

    def run(cfg: dict[str, Any], *names: str) -> str:
        return refused(capsys, ["merge", str(write_cfg(tmp_path / "bad.yaml", cfg)), out], *names)

    tv = {"merge_method": "dare_ties", "base_model": str(b), "models": models((m1, {"weight": 1.0}))}
    run({**tv, "parameters": {"density": -1.5}}, "parameters.density", "density=-1.5", "≥ 0")
    run({**tv, "models": models((m1, {"weight": 1.0, "density": -0.1}))}, "models[0].parameters.density", "-0.1")
    run({**tv, "models": models((m1, {"weight": 1.0, "density": [0.5, -1.2]}))}, "models[0].parameters.density[1]",
        "-1.2")
    run({**tv, "models": models((m1, {"weight": 1.0, "density": [{"filter": "q", "value": -2}]}))},
        "models[0].parameters.density[0].value", "≥ 0")
    run({**tv, "models": models((m1, {"weight": True}))}, "models[0].parameters.weight", "True")
    run({**tv, "parameters": {"lambda": True}}, "parameters.lambda", "True")
    run({**tv, "parameters": {"density": float("nan")}}, "parameters.density", "finite")
    run({**tv, "parameters": {"gamma": 0.1}}, "parameters.gamma", "unknown parameter", "dare_ties")
    run({**tv, "parameters": {"rescale": 1}}, "parameters.rescale", "true or false")
    run({**tv, "parameters": {"random_seed": -1}}, "parameters.random_seed", "-1")
    run({**tv, "parameters": {"random_seed": [1, 2]}}, "parameters.random_seed", "not a gradient")
    run({**tv, "parameters": {"random_seed": 1.5}}, "parameters.random_seed", "whole number")
    run({**tv, "merge_method": "ties", "parameters": {"random_seed": 1}}, "parameters.random_seed", "ties")
    run({**tv, "merge_method": "breadcrumbs", "parameters": {"gamma": -0.5}}, "parameters.gamma", "[0, 1]")
    run({**tv, "merge_method": "della", "parameters": {"epsilon": -0.1}}, "parameters.epsilon", "≥ 0")
    run({**tv, "merge_method": "sce", "models": models((m1, {}))} | {"parameters": {"select_topk": -2}},
        "parameters.select_topk", "≥ 0")
    run({"merge_method": "karcher", "parameters": {"max_iter": 2.5}, "models": models((m1, {}))},
        "parameters.max_iter", "whole number")
    run({"merge_method": "karcher", "parameters": {"tol": -1}, "models": models((m1, {}))}, "parameters.tol")
    run({"merge_method": "nuslerp", "parameters": {"nuslerp_weight": 0.5},
         "models": models((m1, {"weight": 1}), (m2, {"weight": 1}))}, "parameters.nuslerp_weight",
        "unknown parameter", "nuslerp_row_wise")
    run({"merge_method": "nuslerp", "parameters": {"nuslerp_flatten": "no"},
         "models": models((m1, {"weight": 1}), (m2, {"weight": 1}))}, "parameters.nuslerp_flatten", "true or false")
    run({"merge_method": "nuslerp", "models": models((m1, {"weight": 1}), (m2, {}))}, "models[1].parameters",
        "weight")
    run({"merge_method": "multislerp", "parameters": {"eps": -1e-3}, "models": models((m1, {"weight": 1}))},
        "parameters.eps")
    run({"merge_method": "model_stock", "parameters": {"filter_wise": True, "weight": 1},
         "base_model": str(b), "models": models((m1, {}), (m2, {}))}, "parameters.weight", "unknown parameter")
    # structure: base models and counts
    run({"merge_method": "dare_linear", "models": models((m1, {"weight": 1}))}, "base_model", "required")
    run({"merge_method": "sce", "models": models((m1, {}), (m2, {}))}, "base_model", "required")
    run({"merge_method": "model_stock", "base_model": str(b), "models": models((m1, {}))}, "model_stock",
        "at least 2", "got 1")
    run({"merge_method": "nuslerp", "parameters": {"weight": 1}, "models": models((m1, {}), (m2, {}), (m3, {}))},
        "nuslerp", "exactly 2", "got 3")
    # a gradient that interpolates to a non-integer max_iter is refused naming the tensor
    run({"merge_method": "karcher", "parameters": {"max_iter": [1, 2]}, "models": models((m1, {}), (m2, {}))},
        "parameters.max_iter", "whole number", "encoder.layer.1.")
    assert not (tmp_path / "out").exists()


def test_selection_masks_equal_the_stable_sort_they_replace() -> None:
    """top-k / bottom-k by selection (O(n)) pick exactly the first k of a stable sort, ties in index order, and
    DELLA's ranks are the inverse permutation of a stable argsort: checked against the sorts themselves on
    values with many ties (small integers), for every k."""
    from vlmerge.merge.taskvector import _della_probabilities, bottom_k_mask, top_k_mask

    g = torch.Generator().manual_seed(0)
    for n in (1, 2, 7, 64, 301):
        values = torch.randint(0, 5, (n,), generator=g).float()
        for k in range(n + 1):
            want_top = torch.zeros(n, dtype=torch.bool)
            want_top[torch.sort(values, descending=True, stable=True).indices[:k]] = True
            want_bottom = torch.zeros(n, dtype=torch.bool)
            want_bottom[torch.sort(values, stable=True).indices[:k]] = True
            assert torch.equal(top_k_mask(values, k), want_top), (n, k)
            assert torch.equal(bottom_k_mask(values, k), want_bottom), (n, k)
    mag = torch.randint(0, 4, (6, 9), generator=g).float()
    ranks = torch.argsort(torch.argsort(mag, dim=1, stable=True), dim=1).float()  # the two sorts replaced
    assert torch.allclose(_della_probabilities(mag, 0.5, 0.1), 0.4 + ranks / 8 * 0.2)


@pytest.mark.parametrize("max_iter", [1, 2, 3, 50])
@pytest.mark.parametrize("chunk", [1 << 22, 7])
def test_karcher_iterates_as_the_reference_step_by_step(max_iter: int, chunk: int, monkeypatch) -> None:
    """Each iterate, not only the fixed point: after 1-3 steps merge_karcher (run on N coefficients with a
    Gram matrix) equals the tensor-space reference; chunked dot products (``chunk`` 7) give the same Gram;
    an input of norm below ``tol`` is left out of the mean direction but counted in the mean norm."""
    import vlmerge.merge.mergekit as mk

    monkeypatch.setattr(mk, "_DOT_CHUNK", chunk)
    g = np.random.default_rng(max_iter)
    xs = [g.normal(size=(6, 5)) * s + 0.8 for s in (1.0, 2.0, 0.5, 3.0)]
    xs.append(np.full((6, 5), 1e-9))
    got = mk.merge_karcher([torch.tensor(x, dtype=torch.float32) for x in xs], max_iter, 1e-6).numpy()
    np.testing.assert_allclose(got, karcher_np(xs, max_iter, 1e-6), atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize("n", [1, 2, 3, 5])
def test_sce_variance_is_numpys_bit_for_bit(n: int) -> None:
    """SCE selects by the entrywise variance over the inputs: computed one input at a time, it must equal
    ``numpy.var(axis=0)`` exactly (a last-bit difference can move an entry across the top-k cut)."""
    from vlmerge.merge.mergekit import _population_variance

    x = np.random.default_rng(n).normal(size=(n, 37, 11)).astype(np.float32) * 3
    got = _population_variance(torch.from_numpy(x)).numpy()
    assert got.shape == (37, 11) and got.dtype == np.float32
    np.testing.assert_array_equal(got, x.var(axis=0))
