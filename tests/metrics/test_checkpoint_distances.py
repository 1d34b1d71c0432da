"""checkpoint_distances on synthetic MSA checkpoints, and the ``vlmerge distance`` command."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from vlmerge.metrics import checkpoint_distances, cosine, l2, ssd, tssd
from vlmerge.metrics.commands import register
from vlmerge.models.checkpoint import save_checkpoint
from vlmerge.models.roles import merge_groups

SHAPES = {("norm1", "weight"): (4,), ("attn", "qkv.weight"): (12, 4), ("mlp", "fc1.weight"): (8, 4)}


def make(tmp: Path, depth: int = 3, noise: float = 0.3) -> tuple[Path, dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    sd = {"word_embed.weight": torch.randn(10, 4, generator=g)}
    for i in range(depth):
        for (mod, suf), shape in SHAPES.items():
            base = torch.randn(shape, generator=g)
            sd[f"blocks.{i}.{mod}.v.{suf}"] = base
            sd[f"blocks.{i}.{mod}.l.{suf}"] = base + noise * (i + 1) * torch.randn(shape, generator=g)
            if i == depth - 1:
                sd[f"blocks.{i}.{mod}.vl.{suf}"] = torch.randn(shape, generator=g)
    return save_checkpoint(tmp / "ck", sd, {"model": {"arch": "msa"}}), sd


def concat(sd: dict, layer: int | None = None,
           module: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    xs, ys = [], []
    for g in merge_groups(sd):
        if (layer is None or g.layer == layer) and (module is None or g.module == module):
            xs.append(sd[g.sources["v"]].reshape(-1))
            ys.append(sd[g.sources["l"]].reshape(-1))
    return torch.cat(xs), torch.cat(ys)


def test_global_and_per_layer_match_concatenation(tmp_path: Path) -> None:
    ck, sd = make(tmp_path)
    d = checkpoint_distances(ck, per_layer=True, per_module=True)
    x, y = concat(sd)
    g = d["global"]
    assert g["numel"] == x.numel() == 3 * (4 + 48 + 32)  # embeddings and vl copies excluded
    assert g["l2"] == pytest.approx(l2(x, y)) and g["cosine"] == pytest.approx(cosine(x, y))
    assert g["ssd"] == pytest.approx(ssd(x, y)) and g["tssd"] == pytest.approx(tssd(x, y))
    assert [r["layer"] for r in d["per_layer"]] == [0, 1, 2]
    for r in d["per_layer"]:
        xi, yi = concat(sd, layer=r["layer"])
        assert r["tssd"] == pytest.approx(tssd(xi, yi)) and r["l2"] == pytest.approx(l2(xi, yi))
    # the later layers drift further (noise grows with depth)
    assert d["per_layer"][0]["l2"] < d["per_layer"][2]["l2"]
    row = next(r for r in d["per_module"] if r["layer"] == 1 and r["module"] == "attn")
    xa, ya = concat(sd, layer=1, module="attn")
    assert row["ssd"] == pytest.approx(ssd(xa, ya))
    mods = checkpoint_distances(ck, per_module=True)["per_module"]
    xm, ym = concat(sd, module="mlp")
    assert next(r for r in mods if r["module"] == "mlp")["tssd"] == pytest.approx(tssd(xm, ym))
    assert checkpoint_distances(ck, matrices_only=True)["global"]["numel"] == 3 * (48 + 32)


def test_identical_copies_are_distance_zero(tmp_path: Path) -> None:
    ck, _ = make(tmp_path, noise=0.0)
    g = checkpoint_distances(ck)["global"]
    assert g["l2"] == 0 and g["ssd"] == 0 and g["tssd"] == 0 and g["cosine"] == pytest.approx(0, abs=1e-12)


def test_errors(tmp_path: Path) -> None:
    save_checkpoint(tmp_path / "maa", {"blocks.0.attn.shared.qkv.weight": torch.zeros(3, 3)}, {})
    with pytest.raises(ValueError, match="no vision/language weight pairs"):
        checkpoint_distances(tmp_path / "maa")
    ck, sd = make(tmp_path)
    sd["blocks.0.mlp.l.fc1.weight"][0, 0] = float("inf")
    (tmp_path / "inf").mkdir()
    save_file(sd, str(tmp_path / "inf" / "model.safetensors"))
    with pytest.raises(ValueError, match="'blocks.0.mlp.l.fc1.weight' contains NaN or Inf"):
        checkpoint_distances(tmp_path / "inf")
    with pytest.raises(ValueError, match="k must be"):
        checkpoint_distances(ck, k=1.5)


def run_cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="vlmerge")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError) as e:
        print(f"vlmerge {args.command}: error: {e}", file=sys.stderr)
        return 2


def test_distance_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ck, _ = make(tmp_path)
    assert run_cli(["distance", str(ck), "--per-layer"]) == 0
    out = capsys.readouterr().out
    assert "tssd" in out and "layer 2" in out and "Table 5" in out
    assert run_cli(["distance", str(ck), "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert set(d["global"]) == {"l2", "cosine", "ssd", "tssd", "sign_flips", "numel"}
    assert 0 <= d["global"]["sign_flips"] <= d["global"]["numel"]
    assert run_cli(["distance", str(tmp_path / "missing")]) == 2
    assert capsys.readouterr().err.startswith("vlmerge distance: error:")
    with pytest.raises(SystemExit) as e:
        run_cli(["distance", "--help"])
    assert e.value.code == 0
