"""Each merge method on small hand-checked tensors, and the tensor-level validation errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vlmerge.merge import METHODS, dare_keep_masks, get_method, merge_tensors
from vlmerge.merge.base import MergeContext


def rnd(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def test_registry_lists_all_methods() -> None:
    assert set(METHODS) == {"interpolation", "modality_arithmetic", "regmean", "ties", "dare", "average",
                            # mergekit's methods (tests/merge/test_own_schema_methods.py)
                            "task_arithmetic", "dare_linear", "dare_ties", "breadcrumbs", "breadcrumbs_ties", "della",
                            "della_linear", "model_stock", "slerp", "nuslerp", "multislerp", "karcher", "sce"}
    with pytest.raises(ValueError, match="allowed methods: average, breadcrumbs, breadcrumbs_ties, dare"):
        get_method("soup")


def test_interpolation_hand_checked() -> None:
    v, l, vl = torch.tensor([1.0, 2.0]), torch.tensor([3.0, -2.0]), torch.tensor([0.0, 6.0])
    assert torch.allclose(merge_tensors("interpolation", [v, l], alpha=0.75), torch.tensor([1.5, 1.0]))
    # ⅔(αv + (1−α)l) + ⅓vl with α = 0.5: ⅔·[2, 0] + ⅓·[0, 6]
    assert torch.allclose(merge_tensors("interpolation", [v, l, vl], alpha=0.5), torch.tensor([4 / 3, 2.0]))
    assert torch.equal(merge_tensors("interpolation", [v, l], alpha=1.0), v)
    assert torch.equal(merge_tensors("interpolation", [v, l], alpha=0.0), l)


def test_interpolation_schedule_and_dtype() -> None:
    v, l = rnd(4, 4, seed=1).to(torch.bfloat16), rnd(4, 4, seed=2).to(torch.bfloat16)
    out = merge_tensors("interpolation", [v, l], alpha=[0.0, 1.0], layer=1)
    assert out.dtype == torch.bfloat16 and torch.equal(out, v)
    assert torch.equal(merge_tensors("interpolation", [v, l], alpha={0: 0.0}, layer=0), l)
    with pytest.raises(ValueError, match="needs a layer|outside"):
        merge_tensors("interpolation", [v, l], alpha=[0.2, 0.3])
    with pytest.raises(ValueError, match="no entry for layer 3"):
        merge_tensors("interpolation", [v, l], alpha={0: 0.2}, layer=3)


def test_modality_arithmetic_equals_interpolation_at_half() -> None:
    """Paper Table 2 note: λ = 0.5 on two modalities is interpolation with α = 0.5."""
    v, l, w0 = rnd(5, 3, seed=1), rnd(5, 3, seed=2), rnd(5, 3, seed=3)
    a = merge_tensors("modality_arithmetic", [v, l], base=w0, lam=0.5)
    b = merge_tensors("interpolation", [v, l], alpha=0.5)
    assert torch.allclose(a, b, atol=1e-6)
    vl = rnd(5, 3, seed=4)
    got = merge_tensors("modality_arithmetic", [v, l, vl], base=w0, lam=0.3)
    assert torch.allclose(got, w0 + 0.3 * ((v - w0) + (l - w0) + (vl - w0)), atol=1e-6)
    assert torch.allclose(merge_tensors("modality_arithmetic", [v, l], base=w0, lam=0.0), w0)


def test_average_uniform_weighted_and_base() -> None:
    a, b, c = rnd(3, seed=1), rnd(3, seed=2), rnd(3, seed=3)
    assert torch.allclose(merge_tensors("average", [a, b, c]), (a + b + c) / 3, atol=1e-6)
    assert torch.allclose(merge_tensors("average", [a, b], weights=[3, 1]), 0.75 * a + 0.25 * b, atol=1e-6)
    got = merge_tensors("average", [a, b], weights=[2, 1], normalize=False)
    assert torch.allclose(got, 2 * a + b, atol=1e-6)
    w0 = rnd(3, seed=4)
    got = merge_tensors("average", [a, b], base=w0, weights=[0.5, 0.25], normalize=False)
    assert torch.allclose(got, w0 + 0.5 * (a - w0) + 0.25 * (b - w0), atol=1e-6)
    with pytest.raises(ValueError, match="weights has 3 values but there are 2 inputs"):
        merge_tensors("average", [a, b], weights=[1, 1, 1])
    with pytest.raises(ValueError, match="at least 2"):
        merge_tensors("average", [a])


def ties_numpy(ws: list[np.ndarray], w0: np.ndarray, density: float, lam: float = 1.0) -> np.ndarray:
    taus = [w - w0 for w in ws]
    trimmed = []
    for t in taus:
        k = max(1, int(density * t.size))
        thr = np.sort(np.abs(t).ravel())[::-1][k - 1]
        trimmed.append(np.where(np.abs(t) >= thr, t, 0.0))
    sign = np.sign(np.sum(trimmed, axis=0))
    num = np.zeros_like(w0)
    cnt = np.zeros_like(w0)
    for t in trimmed:
        agree = (np.sign(t) == sign) & (t != 0)
        num += np.where(agree, t, 0.0)
        cnt += agree
    merged = np.divide(num, cnt, out=np.zeros_like(num), where=cnt > 0)
    return w0 + lam * merged


def test_ties_hand_checked() -> None:
    w0 = torch.zeros(4)
    a = torch.tensor([3.0, -1.0, 0.5, 2.0])
    b = torch.tensor([-1.0, -2.0, 1.0, 4.0])
    # density 0.5: a keeps {3, 2}, b keeps {-2, 4}; signs: [+, -, 0, +]; disjoint mean: [3, -2, 0, 3]
    got = merge_tensors("ties", [a, b], base=w0, density=0.5)
    assert torch.allclose(got, torch.tensor([3.0, -2.0, 0.0, 3.0]))


@pytest.mark.parametrize("density", [0.2, 0.5, 1.0])
def test_ties_matches_numpy(density: float) -> None:
    ws = [rnd(6, 7, seed=s) for s in (1, 2, 3)]
    w0 = rnd(6, 7, seed=9) * 0.5
    got = merge_tensors("ties", ws, base=w0, density=density, lam=0.8)
    want = ties_numpy([w.numpy().astype(np.float64) for w in ws], w0.numpy().astype(np.float64), density, 0.8)
    np.testing.assert_allclose(got.numpy(), want, atol=1e-5)


@pytest.mark.parametrize("normalize", [True, False])
def test_dare_matches_numpy(normalize: bool) -> None:
    ws = [rnd(50, 40, seed=s) for s in (1, 2)]
    w0 = rnd(50, 40, seed=5)
    p, seed = 0.3, 11
    got = merge_tensors("dare", ws, base=w0, drop=p, seed=seed, weights=[0.7, 0.6], normalize=normalize)
    masks = [m.numpy() for m in dare_keep_masks(w0.shape, 2, p, seed)]
    assert not np.array_equal(masks[0], masks[1])  # one independent mask per input
    # the drop rate is quantized to 2^-16 (uint16 draws) and the rescale uses that exact keep probability
    keep_prob = 1 - round(p * 2**16) / 2**16
    assert keep_prob != 1 - p and abs(keep_prob - (1 - p)) <= 2**-17
    taus = [(w - w0).numpy() for w in ws]
    combo = 0.7 * masks[0] * taus[0] / keep_prob + 0.6 * masks[1] * taus[1] / keep_prob
    want = w0.numpy() + (combo / 1.3 if normalize else combo)
    np.testing.assert_allclose(got.numpy(), want, atol=1e-5)
    kept = masks[0].mean()
    assert abs(kept - (1 - p)) < 0.05  # Bernoulli(1 − p)
    # p = 0 and normalize: the plain average of the models
    avg = merge_tensors("dare", ws, base=w0, drop=0.0)
    assert torch.allclose(avg, (ws[0] + ws[1]) / 2, atol=1e-5)
    # seeded: same seed, same result; another seed, another mask
    again = merge_tensors("dare", ws, base=w0, drop=p, seed=seed, weights=[0.7, 0.6], normalize=normalize)
    assert torch.equal(got, again)
    assert not torch.equal(got, merge_tensors("dare", ws, base=w0, drop=p, seed=seed + 1, weights=[0.7, 0.6],
                                              normalize=normalize))


def test_dare_chunks_and_layouts(monkeypatch: pytest.MonkeyPatch) -> None:
    """The merge runs in chunks (7 here, the last partial) over strided inputs: still the masks'
    formula entry by entry, with one independent stream per input."""
    import vlmerge.merge.methods.dare as dare_module

    monkeypatch.setattr(dare_module, "_CHUNK", 300)
    ws = [rnd(40, 50, seed=s).t() for s in (1, 2, 3)]  # [50, 40] non-contiguous views
    w0 = rnd(50, 40, seed=5)
    p, seed = 0.6, 2
    got = merge_tensors("dare", ws, base=w0, drop=p, seed=seed, normalize=False, lam=0.9)
    masks = [m.numpy() for m in dare_keep_masks(w0.shape, 3, p, seed)]
    keep_prob = 1 - round(p * 2**16) / 2**16
    want = w0.numpy() + 0.9 * sum(m * (w - w0).numpy() for m, w in zip(masks, ws, strict=True)) / keep_prob
    np.testing.assert_allclose(got.numpy(), want, atol=1e-5)
    assert got.is_contiguous() and got.shape == (50, 40)
    # the first two inputs' masks do not depend on how many inputs follow
    two = dare_keep_masks(w0.shape, 2, p, seed)
    assert all(np.array_equal(a.numpy(), b) for a, b in zip(two, masks, strict=False))


@pytest.mark.parametrize("p", [0.01, 0.5, 0.9])
def test_dare_masks_are_independent_bernoulli(p: float) -> None:
    """Four uint16 draws share each 64-bit word: kept fractions, neighbours within a word and the two inputs'
    masks must still look like independent Bernoulli(1 − p) draws (each within 5 standard errors)."""
    n = 400_000
    a, b = (m.numpy().astype(np.float64) for m in dare_keep_masks((n,), 2, p, seed=3))
    q = 1 - p
    se = (q * (1 - q) / n) ** 0.5
    assert abs(a.mean() - q) < 5 * se and abs(b.mean() - q) < 5 * se
    for x, y in ((a[0::4], a[1::4]), (a[2::4], a[3::4]), (a, b)):  # same word; other input
        both = (x * y).mean()
        assert abs(both - q * q) < 5 * (q * q * (1 - q * q) / len(x)) ** 0.5, both


# Methods whose result keeps any NaN / Inf of an input or the base (streaming merges then check only the
# result): params that multiply some input by 0 (0·NaN must still be NaN), (n inputs, base?, weights).
PROPAGATING = {
    "interpolation": [({"alpha": 0.0}, 2, False, None), ({"alpha": 1.0}, 2, False, None),
                      ({"alpha": 1.0, "vl_ratio": 0.0}, 3, False, None), ({"vl_ratio": 1.0}, 3, False, None)],
    "modality_arithmetic": [({"lam": 0.0}, 2, True, None), ({"lam": 1.0}, 3, True, None)],
    "average": [({}, 2, False, (0.0, 1.0)), ({"normalize": False}, 3, True, (1.0, 0.0, 1.0))],
    "dare": [({"drop": 0.99}, 2, True, None), ({"lam": 0.0}, 2, True, None), ({}, 3, True, (0.0, 1.0, 2.0))],
    "task_arithmetic": [({"lam": 0.0}, 2, True, None), ({"normalize": True}, 3, True, (0.0, 1.0, -1.0)),
                        ({}, 1, True, (0.0,))],
}


def test_propagating_methods_are_the_tested_ones() -> None:
    assert {n for n, m in METHODS.items() if m.propagates_nonfinite} == set(PROPAGATING)


@pytest.mark.parametrize("name", sorted(PROPAGATING))
def test_nonfinite_inputs_reach_the_result(name: str) -> None:
    """A NaN / ±Inf in any one input or the base leaves a non-finite entry in the result, whatever the
    coefficients (0 included) and, for DARE, also where every mask drops the entry."""
    method = get_method(name)
    for kwargs, n, with_base, weights in PROPAGATING[name]:
        params = method.parse_params(kwargs)
        for where in range(n + with_base):
            pos = (5, 7)
            if name == "dare":  # an entry no mask keeps (where ≥ n: the base) or input `where`'s mask drops
                masks = torch.stack(dare_keep_masks((16, 16), n, params.drop, params.seed))
                dropped = ~masks[where] if where < n else ~masks.any(0)
                pos = tuple(int(i) for i in dropped.nonzero()[0])
            for bad in (float("nan"), float("inf"), float("-inf")):
                ts = [rnd(16, 16, seed=i) for i in range(n + 1)]
                ts[where][pos] = bad
                ctx = MergeContext(name="w", base=ts[n] if with_base else None, weights=weights)
                out = method.merge(ts[:n], params, ctx)
                assert not torch.isfinite(out[pos]), (kwargs, where, bad)


@pytest.mark.parametrize(("method", "kwargs", "match"), [
    ("interpolation", {"alpha": 1.5}, "params: alpha.*\\[0, 1\\]"),
    ("interpolation", {"lam": 0.5}, "params: lam: unknown key; allowed keys: alpha, vl_ratio"),
    ("ties", {"density": 0.0}, "params: density.*greater than 0"),
    ("dare", {"drop": 1.0}, "params: drop.*less than 1"),
    ("regmean", {"gamma": -0.1}, "params: gamma"),
    ("modality_arithmetic", {"lam": -1}, "params: lam"),
])
def test_bad_params(method: str, kwargs: dict, match: str) -> None:
    a, b = rnd(3, 3, seed=1), rnd(3, 3, seed=2)
    base = rnd(3, 3) if get_method(method).base == "required" else None
    grams = {"grams": [torch.eye(3), torch.eye(3)]} if method == "regmean" else {}
    with pytest.raises(ValueError, match=match):
        merge_tensors(method, [a, b], base=base, **grams, **kwargs)


def test_bad_tensors() -> None:
    a, b = rnd(3, 3, seed=1), rnd(3, 3, seed=2)
    with pytest.raises(ValueError, match=r"tensors\[1\] torch.float32 \[3, 4\]: all inputs need one shape"):
        merge_tensors("interpolation", [a, rnd(3, 4)])
    with pytest.raises(ValueError, match=r"tensors\[1\] torch.float64 \[3, 3\]: all inputs need one shape"):
        merge_tensors("interpolation", [a, b.double()])
    with pytest.raises(ValueError, match=r"dtype torch.int64 is not floating point"):
        merge_tensors("average", [a.long(), b.long()])
    bad = b.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"tensors\[1\] \(tensor\) contains NaN or Inf"):
        merge_tensors("average", [a, bad])
    with pytest.raises(ValueError, match="needs a base"):
        merge_tensors("ties", [a, b])
    with pytest.raises(ValueError, match="does not use a base"):
        merge_tensors("interpolation", [a, b], base=a)
    with pytest.raises(ValueError, match="base is torch.float32 \\[2\\]"):
        merge_tensors("dare", [a, b], base=torch.zeros(2))
    with pytest.raises(ValueError, match="does not take weights"):
        merge_tensors("interpolation", [a, b], weights=[1, 1])
    with pytest.raises(ValueError, match="use 'average' for N"):
        merge_tensors("interpolation", [a, b, a, b])


def test_dare_seeds_every_tensor_by_its_name(tmp_path) -> None:
    """One seeding rule: same-shaped tensors of different names get different masks, and merging a state dict
    tensor by tensor (the UnIVAL soups' ``merge_states``) writes what the streaming ``merge_models`` writes."""
    from safetensors.torch import load_file, save_file

    from vlmerge.finetune.soups import merge_states
    from vlmerge.merge import merge_models, tensor_seed

    keys = ["layer.0.q.weight", "layer.0.k.weight", "layer.0.v.weight"]
    states = [{k: rnd(8, 8, seed=10 * m + j) for j, k in enumerate(keys)} for m in range(3)]
    base = {k: rnd(8, 8, seed=100 + j) for j, k in enumerate(keys)}
    soup = merge_states("dare", states[:2], base=base, drop=0.5, seed=7)
    kept = [(soup[k] - base[k]) != 0 for k in keys]
    assert not torch.equal(kept[0], kept[1]) and not torch.equal(kept[1], kept[2])
    masks = dare_keep_masks((8, 8), 2, 0.5, 7, name=keys[0])
    assert tensor_seed(7, keys[0]) != tensor_seed(7, keys[1])
    keep_prob = 1 - round(0.5 * 2**16) / 2**16
    kept_sum = sum((s[keys[0]] - base[keys[0]]) * mk for s, mk in zip(states, masks, strict=False))
    expected = base[keys[0]] + kept_sum / keep_prob / 2
    assert torch.allclose(soup[keys[0]], expected, atol=1e-6)
    dirs = []
    for i, sd in enumerate([*states[:2], base]):
        d = tmp_path / f"m{i}"
        d.mkdir()
        save_file(sd, str(d / "model.safetensors"))
        (d / "config.json").write_text("{}")
        dirs.append(d)
    out = merge_models("dare", dirs[:2], tmp_path / "out", base_dir=dirs[2], drop=0.5, seed=7)
    streamed = load_file(str(out / "model.safetensors"))
    for k in keys:
        assert torch.equal(streamed[k], soup[k]), k


def test_ties_threshold_is_device_independent() -> None:
    """The k-th largest magnitude (TIES's trim threshold) by numpy on CPU and by torch.kthvalue (the path any
    other device takes, where ``.numpy()`` would fail) agree, ties included."""
    from vlmerge.merge.methods.ties import kth_largest

    g = torch.Generator().manual_seed(0)
    for values in (torch.rand(1000, generator=g), torch.randint(0, 5, (777,), generator=g).float()):
        for k in (1, 7, 500, values.numel()):
            assert kth_largest(values, k, use_numpy=True) == kth_largest(values, k, use_numpy=False)
            assert kth_largest(values, k) == float(values.sort(descending=True).values[k - 1])
