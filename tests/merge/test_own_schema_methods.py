"""mergekit's methods in vlmerge's own schema (``vlmerge merge --method NAME [--base W0] IN OUT``, ``--inputs``):
each new registered method merges a micro MSA checkpoint's v / l / vl copies through the real CLI, checked on a
2-copy slot (layer 0) and a 3-copy slot (layer 1, with W_vl) against the method's formula written here in numpy
(float64) from the copies and the base, never by calling the code under test. The random methods are checked by
their statistics (kept fraction within a binomial tolerance, DELLA's rank-dependent keep rates) and by the exact
value of every entry given the realised masks. Then a loop over the whole registry: every method runs on the micro
checkpoint (modality merge and soup) and gives a finite, loadable model.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file
from test_mergekit_methods import karcher_np, model_stock_np, multislerp_np, sce_np, slerp_np

from vlmerge.cli import main
from vlmerge.merge import METHODS, save_grams
from vlmerge.models import VLMo, load_model, preset_config, save_model

S2 = "blocks.0.attn.shared.qkv.weight"  # a slot with v / l copies
S3 = "blocks.1.mlp.shared.fc1.weight"  # a slot with v / l / vl copies (the top layer)
NEW = ("task_arithmetic", "dare_linear", "dare_ties", "breadcrumbs", "breadcrumbs_ties", "della", "della_linear",
       "model_stock", "slerp", "nuslerp", "multislerp", "karcher", "sce")


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``base``: a micro MSA checkpoint with equal modality copies (W0); ``msa``, ``msa2``: W0 + small noise on
    every parameter (each copy its own)."""
    root = tmp_path_factory.mktemp("own-schema")
    torch.manual_seed(0)
    cfg = preset_config("micro", "msa", vocab_size=40)
    base = VLMo(cfg)  # tied_init: the modality copies start equal
    save_model(base, root / "base")
    for name in ("msa", "msa2"):
        model = copy.deepcopy(base)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.01 * torch.randn_like(p))
        save_model(model, root / name)
    g = torch.Generator().manual_seed(1)  # RegMean: a Gram XᵀX of random activations per block linear weight
    grams = {}
    for k, v in sd(root / "msa").items():
        if k.startswith("blocks.") and (".attn." in k or ".mlp." in k) and k.endswith(".weight") and v.dim() == 2:
            x = torch.randn(64, v.shape[1], generator=g, dtype=torch.float64)
            grams[k] = x.T @ x
    save_grams(grams, root / "grams.safetensors")
    return root


def sd(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path / "model.safetensors"))


def copies(ckpts: Path, slot: str) -> tuple[np.ndarray, list[np.ndarray]]:
    """(W0, [W_v, W_l(, W_vl)]) of ``slot`` as float64."""
    msa, base = sd(ckpts / "msa"), sd(ckpts / "base")
    mods = [m for m in ("v", "l", "vl") if slot.replace(".shared.", f".{m}.") in msa]
    b = base[slot.replace(".shared.", ".v.")].double().numpy()
    return b, [msa[slot.replace(".shared.", f".{m}.")].double().numpy() for m in mods]


def run(ckpts: Path, tmp_path: Path, method: str, *args: str, base: bool = True, out: str = "out"
        ) -> dict[str, torch.Tensor]:
    argv = ["merge", "--method", method, *(["--base", str(ckpts / "base")] if base else []), *args,
            str(ckpts / "msa"), str(tmp_path / out)]
    assert main(argv) == 0
    return sd(tmp_path / out)


def close(got: torch.Tensor, want: np.ndarray, atol: float = 1e-7) -> None:
    np.testing.assert_allclose(got.double().numpy(), want, rtol=0, atol=atol)


def both(ckpts: Path, got: dict[str, torch.Tensor], formula: Callable[..., np.ndarray], atol: float = 1e-7) -> None:
    """Check the 2-copy and the 3-copy slot: ``formula(b, xs)``."""
    for slot in (S2, S3):
        b, xs = copies(ckpts, slot)
        close(got[slot], formula(b, xs), atol)


def slerp_flat(t: float, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """mergekit's slerp on the flattened tensors: lerp when |cos| > 0.9995."""
    fa, fb = a.ravel(), b.ravel()
    dot = fa @ fb / (np.linalg.norm(fa) * np.linalg.norm(fb))
    if abs(dot) > 0.9995:
        return (1 - t) * a + t * b
    om = np.arccos(np.clip(dot, -1, 1))
    return ((np.sin((1 - t) * om) * fa + np.sin(t * om) * fb) / np.sin(om)).reshape(a.shape)


def consensus(ds: list[np.ndarray], ws: list[float], normalize: bool) -> np.ndarray:
    """mergekit's TIES election on the weighted task vectors ``ds``: + where Σ d ≥ 0; the agreeing sum, divided
    by the agreeing weights (1 where none agree) with ``normalize``."""
    s = np.where(sum(ds) >= 0, 1.0, -1.0)
    agree = [np.sign(d) == s for d in ds]
    num = sum(np.where(a, d, 0.0) for a, d in zip(agree, ds, strict=True))
    if not normalize:
        return num
    den = sum(a * w for a, w in zip(agree, ws, strict=True))
    return num / np.where(den == 0, 1.0, den)


def breadcrumbs_np(tau: np.ndarray, density: float, gamma: float) -> np.ndarray:
    """Sort |τ| ascending; keep sorted positions [β, β + t): t = ⌊ρ n⌋, β = max(0, n − t − ⌊γ n⌋)."""
    n = tau.size
    t, g = int(density * n), int(gamma * n)
    beta = max(0, n - t - g)
    keep = np.zeros(n, bool)
    keep[np.argsort(np.abs(tau).ravel(), kind="stable")[beta:beta + t]] = True
    return tau * keep.reshape(tau.shape)


# ------------------------------------------------------------------------------------- deterministic methods
def test_task_arithmetic(ckpts: Path, tmp_path: Path) -> None:
    w = {"v": 1.0, "l": 0.5, "vl": 2.0}
    ws = "v=1,l=0.5,vl=2"
    got = run(ckpts, tmp_path, "task_arithmetic", "--lam", "0.7", "--weights", ws)
    both(ckpts, got, lambda b, xs: b + 0.7 * sum(wi * (x - b) for wi, x in zip(w.values(), xs, strict=False)))
    # normalize: / Σ w over the slot's copies; mergekit's name `lambda` works too
    got = run(ckpts, tmp_path, "task_arithmetic", "--param", "lambda=0.7", "--normalize", "--weights", ws, out="o2")
    both(ckpts, got, lambda b, xs: b + 0.7 * sum(wi * (x - b) for wi, x in zip(w.values(), xs, strict=False))
         / sum(list(w.values())[: len(xs)]))
    # unit weights, no normalize: modality_arithmetic with the same λ
    ma = run(ckpts, tmp_path, "modality_arithmetic", "--lam", "0.3", out="o3")
    ta = run(ckpts, tmp_path, "task_arithmetic", "--lam", "0.3", out="o4")
    for k in (S2, S3):
        torch.testing.assert_close(ta[k], ma[k], rtol=0, atol=1e-7)


def test_breadcrumbs(ckpts: Path, tmp_path: Path) -> None:
    got = run(ckpts, tmp_path, "breadcrumbs", "--density", "0.8", "--gamma", "0.05", "--weights", "v=1,l=2,vl=0.5")
    w = [1.0, 2.0, 0.5]
    both(ckpts, got, lambda b, xs: b + sum(wi * breadcrumbs_np(x - b, 0.8, 0.05)
                                          for wi, x in zip(w, xs, strict=False)))
    # the result really is sparser than task arithmetic: every copy drops 20 % of its entries
    b, xs = copies(ckpts, S3)
    assert np.mean(np.abs(np_(got[S3]) - b) < 1e-12) < 0.2
    # density ≥ 1 (mergekit: no sparsification, gamma unused): task arithmetic
    got = run(ckpts, tmp_path, "breadcrumbs", "--density", "1.5", "--gamma", "0.3", out="o2")
    both(ckpts, got, lambda b, xs: b + sum(x - b for x in xs))


def np_(t: torch.Tensor) -> np.ndarray:
    return t.double().numpy()


def test_breadcrumbs_ties(ckpts: Path, tmp_path: Path) -> None:
    w = [1.0, 0.5, 2.0]
    got = run(ckpts, tmp_path, "breadcrumbs_ties", "--density", "0.7", "--gamma", "0.1", "--weights",
              "v=1,l=0.5,vl=2", "--param", "normalize=true", "--lam", "0.9")

    def want(b: np.ndarray, xs: list[np.ndarray]) -> np.ndarray:
        ds = [wi * breadcrumbs_np(x - b, 0.7, 0.1) for wi, x in zip(w, xs, strict=False)]
        return b + 0.9 * consensus(ds, w[: len(xs)], normalize=True)

    both(ckpts, got, want)


def test_model_stock(ckpts: Path, tmp_path: Path) -> None:
    got = run(ckpts, tmp_path, "model_stock")
    both(ckpts, got, lambda b, xs: model_stock_np(b, xs, False))
    got = run(ckpts, tmp_path, "model_stock", "--param", "filter_wise=true", out="o2")
    both(ckpts, got, lambda b, xs: model_stock_np(b, xs, True))


def test_slerp(ckpts: Path, tmp_path: Path) -> None:
    """t = 0.3 from W_v to W_l; the top layer: a second slerp to W_vl by vl_ratio (1/3 by default)."""
    got = run(ckpts, tmp_path, "slerp", "--param", "t=0.3", base=False)
    both(ckpts, got, lambda b, xs: slerp_flat(0.3, xs[0], xs[1]) if len(xs) == 2 else
         slerp_flat(1 / 3, slerp_flat(0.3, xs[0], xs[1]), xs[2]))
    b, xs = copies(ckpts, S2)
    assert not np.allclose(slerp_flat(0.3, xs[0], xs[1]), 0.7 * xs[0] + 0.3 * xs[1], atol=1e-6)  # not a lerp
    got = run(ckpts, tmp_path, "slerp", "--param", "t=1", "--param", "vl_ratio=0", base=False, out="o2")
    both(ckpts, got, lambda b, xs: xs[1])  # t = 1: W_l; vl_ratio 0: no W_vl


def test_nuslerp(ckpts: Path, tmp_path: Path) -> None:
    """t = w_l / (w_v + w_l) on the task vectors; the third copy in a second step with t = w_vl / Σ w."""
    got = run(ckpts, tmp_path, "nuslerp", "--weights", "v=1,l=3,vl=2")

    def want(b: np.ndarray, xs: list[np.ndarray]) -> np.ndarray:
        first = slerp_np(0.75, (xs[0] - b).ravel(), (xs[1] - b).ravel())
        if len(xs) == 3:
            first = slerp_np(2 / 6, first, (xs[2] - b).ravel())
        return b + first.reshape(b.shape)

    both(ckpts, got, want)
    # no base, rows (flatten false): each row of the copies themselves, equal weights (t = 1/2)
    got = run(ckpts, tmp_path, "nuslerp", "--param", "nuslerp_flatten=false", base=False, out="o2")
    b, xs = copies(ckpts, S2)
    close(got[S2], slerp_np(0.5, xs[0], xs[1]))


def test_multislerp(ckpts: Path, tmp_path: Path) -> None:
    w = [1.0, 2.0, 0.5]
    got = run(ckpts, tmp_path, "multislerp", "--weights", "v=1,l=2,vl=0.5")
    both(ckpts, got, lambda b, xs: multislerp_np(b, xs, w[: len(xs)]))
    got = run(ckpts, tmp_path, "multislerp", base=False, out="o2")
    both(ckpts, got, lambda b, xs: multislerp_np(None, xs, [1.0] * len(xs)))


def test_karcher(ckpts: Path, tmp_path: Path) -> None:
    got = run(ckpts, tmp_path, "karcher", "--param", "max_iter=50", "--param", "tol=1e-7", base=False)
    both(ckpts, got, lambda b, xs: karcher_np(xs, 50, 1e-7))


def test_sce(ckpts: Path, tmp_path: Path) -> None:
    got = run(ckpts, tmp_path, "sce", "--param", "select_topk=0.5")
    both(ckpts, got, lambda b, xs: b + sce_np([x - b for x in xs], 0.5))
    b, xs = copies(ckpts, S3)
    assert abs(np.mean(np.abs(np_(got[S3]) - b) > 0) - 0.5) < 0.01  # half the entries selected
    got = run(ckpts, tmp_path, "sce", out="o2")
    both(ckpts, got, lambda b, xs: b + sce_np([x - b for x in xs], 1.0))


# ------------------------------------------------------------------------------------------ random methods
RANDOM = {  # method -> (flags, rescale and normalize defaults, consensus)
    "dare_linear": (["--density", "0.3"], False, False),
    "dare_ties": (["--density", "0.3"], False, True),
    "della": (["--density", "0.5", "--param", "epsilon=0.3"], True, True),
    "della_linear": (["--density", "0.5", "--param", "epsilon=0.3"], False, False),
}


@pytest.mark.parametrize("method", sorted(RANDOM))
def test_random_methods_statistics_and_realised_masks(ckpts: Path, tmp_path: Path, method: str) -> None:
    """One-hot weights isolate each copy's realised mask (the masks depend on the seed, the tensor's name and
    the input's index, not on the weights): kept fractions match the keep probabilities, kept entries are
    exactly τ·‖τ‖₁/‖τ ⊙ M‖₁ (mergekit's L1 rescale), the copies' masks are independent, and the full merge is
    the method's formula given those masks."""
    flags, normalize, ties = RANDOM[method]
    b, xs = copies(ckpts, S3)
    taus = [x - b for x in xs]
    masks = []
    for i, onehot in enumerate(("v=1,l=0,vl=0", "v=0,l=1,vl=0", "v=0,l=0,vl=1")):
        delta = np_(run(ckpts, tmp_path, method, *flags, "--weights", onehot, out=f"m{i}")[S3]) - b
        mask = delta != 0
        t = taus[i]
        # delta = (b + kept) − b in float32: off by up to an ulp of b
        np.testing.assert_allclose(delta[mask], (t * np.abs(t).sum() / np.abs(t * mask).sum())[mask],
                                   rtol=1e-5, atol=2 * float(np.spacing(np.float32(np.abs(b).max()))))
        masks.append(mask)
    n = masks[0].size
    if method.startswith("dare"):
        for m in masks:
            assert abs(m.sum() - 0.3 * n) <= 5 * math.sqrt(n * 0.3 * 0.7)
        both_kept = (masks[0] & masks[1]).sum()  # independent: P = 0.09
        assert abs(both_kept - 0.09 * n) <= 5 * math.sqrt(n * 0.09 * 0.91)
    else:  # keep probability 0.5 − 0.3 + 0.6 · rank / (C − 1), ranks of |τ| within each row (dim 1)
        for t, m in zip(taus, masks, strict=True):
            rank = np.argsort(np.argsort(np.abs(t), axis=1, kind="stable"), axis=1) / (t.shape[1] - 1)
            p = 0.2 + 0.6 * rank
            for lo, hi in ((0.0, 0.25), (0.25, 0.5), (0.5, 0.75), (0.75, 1.01)):
                sel = (rank >= lo) & (rank < hi)
                assert abs(m[sel].sum() - p[sel].sum()) <= 5 * math.sqrt((p[sel] * (1 - p[sel])).sum()), lo
    # the full merge, weights 1, 0.5, 2, given the realised masks
    w = [1.0, 0.5, 2.0]
    got = np_(run(ckpts, tmp_path, method, *flags, "--weights", "v=1,l=0.5,vl=2")[S3])
    ds = [wi * t * m * np.abs(t).sum() / np.abs(t * m).sum() for wi, t, m in zip(w, taus, masks, strict=True)]
    merged = consensus(ds, w, normalize) if ties else sum(ds)
    np.testing.assert_allclose(got, b + merged, rtol=0, atol=1e-7)
    # another seed: other masks
    other = np_(run(ckpts, tmp_path, method, *flags, "--weights", "v=1,l=0,vl=0", "--seed", "5", out="s5")[S3])
    assert not np.array_equal(other - b != 0, masks[0])


def test_random_methods_draw_the_bits_of_a_mergekit_config(ckpts: Path, tmp_path: Path) -> None:
    """A soup of whole models (--inputs) and the mergekit config of the same merge (random_seed = --seed) draw
    the same masks for tensors of the same names: identical outputs. (DELLA at density < 1 refuses this model in
    both schemas: ``cls_token`` [1, 1, 32] and ``logit_scale`` have rows of one entry.)"""
    for method, extra in (("dare_ties", {"density": 0.5}), ("dare_linear", {"density": 0.3, "rescale": False})):
        own = tmp_path / f"own-{method}"
        flags = [f"--param={k}={v}" for k, v in extra.items()]
        assert main(["merge", "--method", method, "--inputs", str(ckpts / "msa"), str(ckpts / "msa2"),
                     "--base", str(ckpts / "base"), "--seed", "3", *flags, "-o", str(own)]) == 0
        cfg = tmp_path / f"{method}.yaml"
        cfg.write_text(yaml.safe_dump({
            "merge_method": method, "base_model": str(ckpts / "base"),
            "parameters": {"weight": 1.0, "random_seed": 3, **extra},
            "models": [{"model": str(ckpts / "msa")}, {"model": str(ckpts / "msa2")}]}))
        assert main(["merge", str(cfg), str(tmp_path / f"mk-{method}")]) == 0
        a, b = sd(own), sd(tmp_path / f"mk-{method}")
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), (method, k)
        assert not torch.equal(a[S3.replace(".shared.", ".v.")], sd(ckpts / "msa")[S3.replace(".shared.", ".v.")])


# -------------------------------------------------------------------------------------------- the registry
REQUIRED_PARAMS = {"slerp": ["--param", "t=0.5"]}  # mergekit requires t


def test_the_new_methods_are_registered() -> None:
    assert set(NEW) <= set(METHODS)
    assert {"average", "dare", "ties", "interpolation", "modality_arithmetic", "regmean"} <= set(METHODS)
    assert "linear" not in METHODS  # it would be `average`


@pytest.mark.parametrize("name", sorted(METHODS))
def test_every_method_merges_a_micro_checkpoint(ckpts: Path, tmp_path: Path, name: str) -> None:
    """Modality merge (a base where the method takes one) and, but for RegMean (one Gram source per model), a
    soup of two whole models: finite, loadable models; the modality merge is modality-agnostic."""
    args = [*(["--base", str(ckpts / "base")] if METHODS[name].base != "unused" else []),
            *REQUIRED_PARAMS.get(name, [])]
    grams = ["--grams", str(ckpts / "grams.safetensors")] if name == "regmean" else []
    out = tmp_path / "out"
    assert main(["merge", "--method", name, *args, *grams, str(ckpts / "msa"), str(out)]) == 0
    model = load_model(out)  # checks keys, shapes, dtypes and finiteness
    assert model.config.arch == "maa"
    assert all(torch.isfinite(p).all() for p in model.state_dict().values() if p.is_floating_point())
    if name == "regmean":
        return
    soup = tmp_path / "soup"
    assert main(["merge", "--method", name, *args, "--inputs", str(ckpts / "msa"), str(ckpts / "msa2"),
                 "-o", str(soup)]) == 0
    model = load_model(soup)
    assert model.config.arch == "msa"
    assert all(torch.isfinite(p).all() for p in model.state_dict().values() if p.is_floating_point())


# ---------------------------------------------------------------------------------------------- refusals
def test_refusals_name_the_problem(ckpts: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = str(tmp_path / "bad")

    def refused(*argv: str) -> str:
        capsys.readouterr()
        assert main(["merge", *argv]) == 2
        lines = [x for x in capsys.readouterr().err.splitlines() if x.strip()]
        assert len(lines) == 1, lines
        return lines[0]

    msa, base, msa2 = str(ckpts / "msa"), str(ckpts / "base"), str(ckpts / "msa2")
    assert "t: required" in refused("--method", "slerp", msa, out)
    line = refused("--method", "della", "--density", "0.9", "--base", base, msa, out)
    assert "density ± epsilon" in line and "0.9" in line
    assert "does not use a base" in refused("--method", "karcher", "--base", base, msa, out)
    assert "needs a base" in refused("--method", "sce", msa, out)
    assert "does not take weights" in refused("--method", "model_stock", "--base", base, "--weights", "v=1,l=1",
                                              msa, out)
    assert "lamda: unknown key" in refused("--method", "dare_ties", "--param", "lamda=1", "--base", base, msa, out)
    assert "at most 2 models" in refused("--method", "slerp", "--param", "t=0.5", "--inputs", msa, msa2, base,
                                         "-o", out)
    assert "density" in refused("--method", "dare_linear", "--density", "-0.1", "--base", base, msa, out)
    assert not (tmp_path / "bad").exists()


def test_multislerp_of_inputs_that_all_equal_the_base_is_the_base() -> None:
    """Three copies equal to W0 (an imported layer scale that never trained): every direction is zero, and the
    barycentre is W0 itself, not an 'antipodal inputs' error."""
    from vlmerge.merge import merge_tensors

    w0 = torch.full((8,), 0.1)
    out = merge_tensors("multislerp", [w0.clone(), w0.clone(), w0.clone()], base=w0)
    assert torch.equal(out, w0)
    with pytest.raises(ValueError, match="antipodal"):  # genuinely opposed directions stay an error
        merge_tensors("multislerp", [w0 + 1, w0 - 1, w0], base=w0, weights=[1.0, 1.0, 1.0])
