"""Partial merges (``vlmerge merge --keep-specific LAYERS`` / ``--budget P``): the kept layers stay exactly as they
were, the others are merged by the method's formula (written here in numpy), the parameter count is exact, and the
result is a loadable model whose kept layers still route per modality."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file

from vlmerge.cli import main
from vlmerge.merge import merge_checkpoint
from vlmerge.models import VLMo, count_params, load_model, preset_config, save_model


def _msa(root: Path, depth: int = 4, noisy: tuple[float, ...] = (0.01, 0.2, 0.02, 0.1)) -> Path:
    """A 4-layer MSA (top layer with W_vl) whose l copies differ from v by ``noisy[i]`` in layer i."""
    torch.manual_seed(0)
    model = VLMo(preset_config("micro", "msa", vocab_size=40, depth=depth, num_vl_layers=1))
    with torch.no_grad():
        for name, p in model.named_parameters():
            for i, s in enumerate(noisy):
                if name.startswith(f"blocks.{i}.") and ".l." in name:
                    p.add_(s * torch.randn_like(p))
    return save_model(model, root / "msa")


def test_keep_specific_keeps_exactly_the_named_layers_and_merges_the_rest(tmp_path, capsys) -> None:
    src = _msa(tmp_path)
    assert main(["merge", "--method", "interpolation", "--alpha", "0.25", "--keep-specific", "1,3", str(src),
                 str(tmp_path / "out")]) == 0
    printed = capsys.readouterr().out
    sd_in, sd_out = load_file(str(src / "model.safetensors")), load_file(str(tmp_path / "out" / "model.safetensors"))
    for k, v in sd_in.items():
        if k.startswith(("blocks.1.", "blocks.3.")) or not k.startswith("blocks."):
            assert torch.equal(sd_out[k], v), k  # kept: bit for bit, under its own name
    for i in (0, 2):
        for k in [k for k in sd_in if k.startswith(f"blocks.{i}.") and ".v." in k]:
            shared = k.replace(".v.", ".shared.")
            want = 0.25 * sd_in[k].double().numpy() + 0.75 * sd_in[k.replace(".v.", ".l.")].double().numpy()
            np.testing.assert_allclose(sd_out[shared].double().numpy(), want, rtol=0, atol=1e-6)
            assert k not in sd_out and k.replace(".v.", ".l.") not in sd_out
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert cfg["model"]["arch"] == "msa" and cfg["model"]["merged_layers"] == [0, 2]
    assert cfg["merge"]["partial"] == {"keep_specific": [1, 3], "chosen_by": "given"}
    # the parameter count: the file's tensors, and the source minus one copy of each merged layer's weights
    n_out = sum(t.numel() for t in sd_out.values())
    per_copy = {i: sum(v.numel() for k, v in sd_in.items() if k.startswith(f"blocks.{i}.") and ".v." in k)
                for i in (0, 2)}
    assert n_out == sum(t.numel() for t in sd_in.values()) - per_copy[0] - per_copy[2]
    model = load_model(tmp_path / "out")
    assert count_params(model.config)["total_params"] == n_out
    assert f"parameters: {sum(t.numel() for t in sd_in.values()):,} -> {n_out:,}" in printed
    assert "kept modality-specific: layers [1, 3]" in printed
    with torch.no_grad():  # the kept layers still route per modality; every route runs
        image, ids = torch.randn(2, 3, 16, 16), torch.randint(0, 40, (2, 6))
        assert model.forward_fusion(image, ids).shape == (2, 6 + 5, 32)
        assert torch.isfinite(model.encode_image(image)).all() and torch.isfinite(model.encode_text(ids)).all()


@pytest.mark.parametrize(("budget", "kept"), [(0.5, [1, 3]), (0.25, [1]), (0.0, [])])
def test_budget_keeps_the_riskiest_layers(tmp_path, budget: float, kept: list[int]) -> None:
    src = _msa(tmp_path)  # layer 1 differs most, then layer 3
    out = merge_checkpoint("interpolation", src, tmp_path / "out", budget=budget)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["merge"]["partial"]["keep_specific"] == kept and cfg["merge"]["partial"]["ranked"][:2] == [1, 3]
    if kept:
        assert cfg["model"]["arch"] == "msa" and cfg["model"]["merged_layers"] == [i for i in range(4) if i not in kept]
    else:  # nothing kept: the full merge, one transformer
        assert cfg["model"]["arch"] == "maa" and "merged_layers" not in cfg["model"]
    load_model(out)


def test_a_partial_merge_merged_again_is_one_transformer(tmp_path) -> None:
    src = _msa(tmp_path)
    part = merge_checkpoint("average", src, tmp_path / "part", keep_layers=[2])
    full = merge_checkpoint("average", part, tmp_path / "full")
    cfg = json.loads((full / "config.json").read_text())["model"]
    assert cfg["arch"] == "maa" and "merged_layers" not in cfg
    assert load_model(full).mergeable_parameters() == []


def test_partial_merge_refusals(tmp_path, capsys) -> None:
    src = _msa(tmp_path)

    def refused(*argv: str) -> str:
        capsys.readouterr()
        try:
            code = main(["merge", "--method", "average", *argv])
        except SystemExit as e:  # argparse's own refusals (a malformed flag value)
            code = e.code
        assert code == 2
        lines = [x for x in capsys.readouterr().err.splitlines() if x.strip()]
        assert len(lines) == 1, lines
        return lines[0]

    out = str(tmp_path / "out")
    assert "not a layer with modality copies" in refused("--keep-specific", "7", str(src), out)
    assert "nothing would be merged" in refused("--keep-specific", "0,1,2,3", str(src), out)
    assert "not both" in refused("--keep-specific", "1", "--budget", "0.5", str(src), out)
    assert "less than or equal to 1" in refused("--budget", "1.5", str(src), out)
    assert "empty item" in refused("--keep-specific", "1,,2", str(src), out)
    assert "not of a soup" in refused("--keep-specific", "1", "--inputs", str(src), str(src), "-o", out)
    assert not Path(out).exists()


def test_partial_merge_from_a_yaml_config(tmp_path) -> None:
    src = _msa(tmp_path)
    cfg = tmp_path / "merge.yaml"
    cfg.write_text(yaml.safe_dump({"method": "interpolation", "params": {"alpha": 0.5}, "input": str(src),
                                   "output": str(tmp_path / "out"), "keep_specific": [0]}))
    assert main(["merge", str(cfg)]) == 0
    assert json.loads((tmp_path / "out" / "config.json").read_text())["model"]["merged_layers"] == [1, 2, 3]


def test_regmean_takes_grams_of_the_layers_a_partial_merge_keeps(tmp_path) -> None:
    """Grams collected on the whole model (as ``vlmerge merge --data`` and the collector write them) include the
    kept layers' weights: a partial RegMean uses the others and leaves the kept layers bit for bit."""
    from vlmerge.merge import collect_grams, save_grams

    src = _msa(tmp_path)
    model = load_model(src).eval()
    g = torch.Generator().manual_seed(3)
    batch = (torch.randn(24, 3, 16, 16, generator=g), torch.randint(0, 40, (24, 6), generator=g),
             torch.ones(24, 6, dtype=torch.long))
    grams = save_grams(collect_grams(model, [batch]), tmp_path / "grams.safetensors")
    out = merge_checkpoint("regmean", src, tmp_path / "out", grams=grams, keep_layers=[1], gamma=0.5)
    sd_in, sd_out = load_file(str(src / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert all(torch.equal(sd_out[k], v) for k, v in sd_in.items() if k.startswith("blocks.1."))
    assert "blocks.0.attn.shared.qkv.weight" in sd_out and "blocks.1.attn.v.qkv.weight" in sd_out
