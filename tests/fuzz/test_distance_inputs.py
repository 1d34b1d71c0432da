"""``vlmerge distance`` validates what it is given: a checkpoint directory whose weights match its config."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from fuzz_helpers import snapshot
from safetensors.torch import load_file, save_file

from vlmerge.cli import main
from vlmerge.merge import Grams, save_grams
from vlmerge.metrics import checkpoint_distances
from vlmerge.models import CheckpointError, VLMo, preset_config, save_model
from vlmerge.models.checkpoint import save_checkpoint

KEY = "blocks.0.attn.v.qkv.weight"


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    return save_model(VLMo(preset_config("micro", "msa", vocab_size=40)), tmp_path_factory.mktemp("d") / "ck")


def variant(ckpt: Path, tmp: Path, tensors: dict[str, torch.Tensor], config: bool = True) -> Path:
    d = tmp / "bad"
    d.mkdir()
    save_file(tensors, str(d / "model.safetensors"), metadata={"format": "pt"})
    if config:
        shutil.copy(ckpt / "config.json", d / "config.json")
    return d


def grams_of(ckpt: Path) -> dict[str, torch.Tensor]:
    sd = load_file(ckpt / "model.safetensors")
    return {k: torch.eye(v.shape[1], dtype=torch.float64) for k, v in sd.items()
            if k.startswith("blocks.") and v.dim() == 2}


def bad_input(kind: str, ckpt: Path, tmp: Path) -> tuple[Path, str]:
    """(the bad input, what its error must say)."""
    sd = load_file(ckpt / "model.safetensors")
    if kind == "int64":
        return variant(ckpt, tmp, {**sd, KEY: sd[KEY].to(torch.int64)}), "not floating point"
    if kind == "int64-no-config":
        return variant(ckpt, tmp, {**sd, KEY: sd[KEY].to(torch.int64)}, config=False), "not floating point"
    if kind == "float8":
        return variant(ckpt, tmp, {**sd, KEY: sd[KEY].to(torch.float8_e4m3fn)}), "unsupported dtype F8_E4M3"
    if kind == "missing-key":
        return variant(ckpt, tmp, {k: v for k, v in sd.items() if k != KEY}), f"missing keys (1): {KEY}"
    if kind == "extra-key":
        return variant(ckpt, tmp, {**sd, "extra.weight": torch.zeros(2)}), "unexpected keys (1): extra.weight"
    if kind == "wrong-shape":
        return variant(ckpt, tmp, {**sd, KEY: torch.zeros(5, 5)}), "shape mismatches (1)"
    if kind == "bare-weights":
        return ckpt / "model.safetensors", "expected a checkpoint directory"
    if kind == "gram-file":
        save_grams(Grams(grams_of(ckpt), {}), tmp / "g.safetensors")
        return tmp / "g.safetensors", "is a Gram file"
    if kind == "gram-in-checkpoint":
        d = tmp / "bad"
        d.mkdir()
        save_grams(Grams(grams_of(ckpt), {}), d / "model.safetensors")
        shutil.copy(ckpt / "config.json", d / "config.json")
        return d, "is a Gram file"
    if kind == "untagged-gram-in-checkpoint":  # no format tag: the architecture check sees [in, in] shapes
        return variant(ckpt, tmp, grams_of(ckpt)), "shape mismatches"
    if kind == "bad-config-type":
        d = variant(ckpt, tmp, sd)
        cfg = json.loads((d / "config.json").read_text())
        cfg["model"]["embed_dim"] = "32"
        (d / "config.json").write_text(json.dumps(cfg))
        return d, "'model': embed_dim='32' is invalid; expected an integer"
    if kind == "config-not-object":
        d = variant(ckpt, tmp, sd)
        (d / "config.json").write_text("[1, 2]")
        return d, "expected an object with a 'model' entry"
    if kind == "arch-only-bad-type":
        d = variant(ckpt, tmp, sd)
        (d / "config.json").write_text(json.dumps({"model": {"arch": 5}}))
        return d, "arch=5 is invalid; expected a string"
    raise AssertionError(kind)


KINDS = ["int64", "int64-no-config", "float8", "missing-key", "extra-key", "wrong-shape", "bare-weights",
         "gram-file", "gram-in-checkpoint", "untagged-gram-in-checkpoint", "bad-config-type", "config-not-object",
         "arch-only-bad-type"]


@pytest.mark.parametrize("kind", KINDS)
def test_checkpoint_distances_refuses(kind: str, ckpt: Path, tmp_path: Path) -> None:
    path, expected = bad_input(kind, ckpt, tmp_path)
    with pytest.raises(CheckpointError) as e:
        checkpoint_distances(path)
    assert str(path) in str(e.value) and expected in str(e.value), str(e.value)


@pytest.mark.parametrize("kind", KINDS)
def test_distance_cli_refuses_in_one_line(kind: str, ckpt: Path, tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    path, expected = bad_input(kind, ckpt, tmp_path)
    before, ck_before = snapshot(tmp_path), snapshot(ckpt)
    assert main(["distance", str(path)]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    err = captured.err
    assert err.count("\n") == 1 and err.startswith("vlmerge distance: error: ") and "Traceback" not in err, err
    assert str(path) in err and expected in err, err
    assert snapshot(tmp_path) == before and snapshot(ckpt) == ck_before


def test_valid_checkpoints_still_measure(ckpt: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert checkpoint_distances(ckpt)["global"]["l2"] == 0  # tied initialisation: equal copies
    assert main(["distance", str(ckpt), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["tensors"] > 0
    # a folder without a vlmerge model config, or whose "model" entry only names the architecture, is measured
    # on its v / l pairs (dtypes still checked)
    sd = {"blocks.0.mlp.v.fc1.weight": torch.ones(3, 2), "blocks.0.mlp.l.fc1.weight": torch.zeros(3, 2)}
    for name, config in (("none", {}), ("arch-only", {"model": {"arch": "msa"}})):
        d = save_checkpoint(tmp_path / name, sd, config)
        assert checkpoint_distances(d)["global"]["numel"] == 6


@pytest.mark.parametrize("k", ["1", "1.5", "-0.1"])
def test_distance_k_out_of_range_names_the_flag(k: str, ckpt: Path, tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    before, ck_before = snapshot(tmp_path), snapshot(ckpt)
    assert main(["distance", str(ckpt), "--k", k]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    err = captured.err
    assert err.count("\n") == 1 and err.startswith("vlmerge distance: error: --k ") and "[0, 1)" in err, err
    assert snapshot(tmp_path) == before and snapshot(ckpt) == ck_before
