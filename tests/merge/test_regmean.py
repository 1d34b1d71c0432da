"""RegMean: closed form, optimality, the γ reduction, singular fallbacks, and Gram collection by hooks."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from vlmerge.merge import GramCollector, Grams, collect_grams, load_grams, merge_tensors, save_grams


def rnd(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def test_one_modality_returns_its_weights() -> None:
    w = rnd(5, 4)
    x = rnd(3, 4, seed=1)  # fewer tokens than inputs: a singular Gram, still exact
    assert torch.equal(merge_tensors("regmean", [w], grams=[x.T @ x]), w)


def test_merged_linear_zeroes_the_gradient() -> None:
    """W* minimises Σ_m ‖X_m W − X_m W_m‖² (γ = 1): the gradient Σ_m X_mᵀ X_m (W − W_m) vanishes at W*."""
    xs = [rnd(30, 6, seed=s).double() for s in (1, 2, 3)]
    ws = [rnd(4, 6, seed=s + 10) for s in (1, 2, 3)]  # torch layout [out, in]
    grams = [x.T @ x for x in xs]
    merged = merge_tensors("regmean", ws, grams=grams, gamma=1.0).double()
    w = merged.T.clone().requires_grad_(True)  # paper layout [in, out]
    loss = sum(((x @ w - x @ wm.double().T) ** 2).sum() for x, wm in zip(xs, ws, strict=True))
    loss.backward()
    assert w.grad is not None and w.grad.abs().max() < 1e-3
    # the closed form written out
    a = sum(grams)
    b = sum(g @ wm.double().T for g, wm in zip(grams, ws, strict=True))
    assert torch.allclose(merged.T, torch.linalg.solve(a, b), atol=1e-5)


def test_gamma_zero_is_diagonal_weighting() -> None:
    """γ = 0 keeps only diag(G): each input feature averages the weights by that feature's energy."""
    ws = [rnd(3, 4, seed=1), rnd(3, 4, seed=2)]
    d1, d2 = torch.tensor([1.0, 2.0, 3.0, 4.0]), torch.tensor([4.0, 2.0, 1.0, 0.5])
    g1 = torch.diag(d1).double() + 0.5
    g2 = torch.diag(d2).double() + 0.5
    got = merge_tensors("regmean", ws, grams=[g1, g2], gamma=0.0)
    d1, d2 = d1 + 0.5, d2 + 0.5
    want = (ws[0] * d1 + ws[1] * d2) / (d1 + d2)
    assert torch.allclose(got, want, atol=1e-6)


def test_equal_grams_give_the_average_and_1d_is_averaged() -> None:
    ws = [rnd(3, 4, seed=1), rnd(3, 4, seed=2)]
    g = rnd(10, 4, seed=3)
    got = merge_tensors("regmean", ws, grams=[g.T @ g, g.T @ g])
    assert torch.allclose(got, (ws[0] + ws[1]) / 2, atol=1e-5)
    b1, b2 = rnd(4, seed=4), rnd(4, seed=5)
    assert torch.allclose(merge_tensors("regmean", [b1, b2]), (b1 + b2) / 2)


def test_singular_gram_falls_back_with_warning() -> None:
    ws = [rnd(3, 4, seed=1), rnd(3, 4, seed=2)]
    g = torch.zeros(4, 4, dtype=torch.float64)
    g[0, 0] = 1.0  # features 1..3 never seen
    with pytest.warns(RuntimeWarning, match="singular"):
        got = merge_tensors("regmean", ws, grams=[g, g])
    assert torch.isfinite(got).all()
    assert torch.allclose(got[:, 0], (ws[0][:, 0] + ws[1][:, 0]) / 2, atol=1e-4)


def test_regmean_input_errors() -> None:
    ws = [rnd(3, 4, seed=1), rnd(3, 4, seed=2)]
    with pytest.raises(ValueError, match="needs grams"):
        merge_tensors("regmean", ws)
    with pytest.raises(ValueError, match=r"grams\[1\] is \[3, 3\]; expected \[4, 4\]"):
        merge_tensors("regmean", ws, grams=[torch.eye(4), torch.eye(3)])
    with pytest.raises(ValueError, match="one per tensor"):
        merge_tensors("regmean", ws, grams=[torch.eye(4)])


class Experts(nn.Module):
    """blocks.0.attn.{v,l}.proj and blocks.0.mlp.{v,l}.fc1 linears, routed by modality."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([nn.Module()])
        blk = self.blocks[0]
        blk.attn = nn.ModuleDict({m: nn.Module() for m in ("v", "l")})
        blk.mlp = nn.ModuleDict({m: nn.Module() for m in ("v", "l")})
        for m in ("v", "l"):
            blk.attn[m].proj = nn.Linear(4, 4)
            blk.mlp[m].fc1 = nn.Linear(4, 6)
        self.head = nn.Linear(6, 2)  # not a block linear: no Gram

    def forward(self, x: torch.Tensor, modality: str) -> torch.Tensor:
        blk = self.blocks[0]
        return self.head(blk.mlp[modality].fc1(blk.attn[modality].proj(x)))


def test_hooks_collect_xtx_per_modality(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = Experts()
    batches = [(rnd(2, 5, 4, seed=s), rnd(3, 4, seed=s + 50)) for s in range(3)]

    def run(m: nn.Module, batch: tuple, col: GramCollector) -> None:
        m(batch[0], "v")
        mask = torch.tensor([True, True, False, False])  # last 2 text tokens are padding
        with col.route(mask=mask):
            m(torch.cat([batch[1], torch.zeros(1, 4)]), "l")

    grams = collect_grams(model, batches, run=run)
    assert sorted(grams.keys()) == ["blocks.0.attn.l.proj.weight", "blocks.0.attn.v.proj.weight",
                                    "blocks.0.mlp.l.fc1.weight", "blocks.0.mlp.v.fc1.weight"]
    xv = torch.cat([b[0].reshape(-1, 4) for b in batches]).double()
    xl = torch.cat([b[1][:2] for b in batches]).double()
    assert torch.allclose(grams.get("blocks.0.attn.v.proj.weight"), xv.T @ xv)
    assert torch.allclose(grams.get("blocks.0.attn.l.proj.weight"), xl.T @ xl)
    assert grams.counts["blocks.0.attn.v.proj.weight"] == 30
    assert grams.counts["blocks.0.attn.l.proj.weight"] == 6
    with torch.no_grad():
        hv = model.blocks[0].attn["v"].proj(xv.float()).double()
    assert torch.allclose(grams.get("blocks.0.mlp.v.fc1.weight"), hv.T @ hv, atol=1e-4)
    # round trip through safetensors keeps values and counts
    save_grams(grams, tmp_path / "g.safetensors")
    back = load_grams(tmp_path / "g.safetensors")
    assert isinstance(back, Grams) and back.counts == grams.counts
    assert all(torch.equal(back.get(k), grams.get(k)) for k in grams.grams)
    # hooks are gone afterwards
    assert not any(m._forward_hooks for m in model.modules())
    with pytest.raises(ValueError, match="max_batches"):
        collect_grams(model, batches, run=run, max_batches=0)


def test_collect_grams_on_vlmo_routes() -> None:
    """On the real model: every expert linear gets a Gram; text padding is excluded."""
    from vlmerge.models import VLMo, preset_config

    torch.manual_seed(0)
    model = VLMo(preset_config("micro", "msa", vocab_size=30))
    image = torch.randn(2, 3, 16, 16)
    ids = torch.randint(0, 30, (2, 5))
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    grams = collect_grams(model, [{"image": image, "input_ids": ids, "attention_mask": mask}])
    linears = [n for n, p in model.named_parameters() if n.endswith("weight") and p.dim() == 2
               and (".attn." in n or ".mlp." in n)]
    assert sorted(grams.keys()) == sorted(linears)
    p = model.config.num_patches + 1
    assert grams.counts["blocks.0.attn.v.qkv.weight"] == 2 * p
    assert grams.counts["blocks.0.attn.l.qkv.weight"] == 8  # 5 + 3 real tokens
    assert grams.counts["blocks.1.attn.vl.qkv.weight"] == 8 + 2 * p
