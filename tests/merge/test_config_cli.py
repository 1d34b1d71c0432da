"""YAML merge configs and the ``vlmerge merge`` command, end to end on synthetic checkpoints."""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import pytest
import torch
import yaml
from merge_synthetic import msa_state_dict, write

from vlmerge.merge import Grams, load_merge_config, merge_tensors, save_grams
from vlmerge.merge.commands import register
from vlmerge.models import CheckpointReader


def run_cli(argv: list[str]) -> int:
    """``vlmerge merge ...`` as vlmerge.cli.main runs it: errors -> one line on stderr, exit code 2."""
    parser = argparse.ArgumentParser(prog="vlmerge")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError, KeyError) as e:
        print(f"vlmerge {args.command}: error: {e}", file=sys.stderr)
        return 2


def test_help(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        run_cli(["merge", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "--alpha-schedule" in out and "ties: trim" in out and "vlmerge merge merge.yaml" in out


def test_cli_interpolation_end_to_end(msa_pair, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    in_dir, _, sd, _ = msa_pair
    argv = ["merge", "--method", "interpolation", "--alpha", "0.75", str(in_dir), str(tmp_path / "o")]
    assert run_cli(argv) == 0
    assert "merged (interpolation)" in capsys.readouterr().out
    with CheckpointReader(tmp_path / "o") as r:
        k = "blocks.0.attn.shared.qkv.weight"
        want = 0.75 * sd["blocks.0.attn.v.qkv.weight"] + 0.25 * sd["blocks.0.attn.l.qkv.weight"]
        assert torch.allclose(r.get(k), want, atol=1e-6)
    cfg = json.loads((tmp_path / "o" / "config.json").read_text())
    assert cfg["merge"]["params"] == {"alpha": 0.75, "vl_ratio": pytest.approx(1 / 3)}


def test_cli_schedule_ties_dare_weights(msa_pair, tmp_path: Path) -> None:
    in_dir, base_dir, *_ = msa_pair
    assert run_cli(["merge", "--method", "interpolation", "--alpha-schedule", "0.2,0.5,0.8", str(in_dir),
                    str(tmp_path / "s")]) == 0
    assert run_cli(["merge", "--method", "ties", "--density", "0.3", "--base", str(base_dir), "--weights",
                    "v=2,l=1,vl=1", str(in_dir), str(tmp_path / "t")]) == 0
    assert run_cli(["merge", "--method", "dare", "--drop", "0.2", "--seed", "3", "--no-normalize", "--base",
                    str(base_dir), str(in_dir), "-o", str(tmp_path / "d")]) == 0
    cfg = json.loads((tmp_path / "d" / "config.json").read_text())
    assert cfg["merge"]["params"] == {"drop": 0.2, "seed": 3, "lam": 1.0, "normalize": False}


def test_cli_regmean_with_gram_file(msa_pair, tmp_path: Path) -> None:
    in_dir, _, sd, _ = msa_pair
    grams = {k: torch.eye(v.shape[1], dtype=torch.float64) * (2.0 if ".v." in k else 1.0)
             for k, v in sd.items() if v.dim() == 2 and (".attn." in k or ".mlp." in k)}
    save_grams(Grams(grams, {k: 1 for k in grams}), tmp_path / "g.safetensors")
    assert run_cli(["merge", "--method", "regmean", "--grams", str(tmp_path / "g.safetensors"), str(in_dir),
                    str(tmp_path / "r")]) == 0
    with CheckpointReader(tmp_path / "r") as r:
        k = "blocks.0.mlp.shared.fc1.weight"
        want = (2 * sd["blocks.0.mlp.v.fc1.weight"] + sd["blocks.0.mlp.l.fc1.weight"]) / 3
        assert torch.allclose(r.get(k), want, atol=1e-5)
        assert torch.allclose(r.get("blocks.0.norm1.shared.bias"),
                              (sd["blocks.0.norm1.v.bias"] + sd["blocks.0.norm1.l.bias"]) / 2, atol=1e-6)


def test_cli_inputs_soup(tmp_path: Path) -> None:
    dirs = [write(tmp_path, f"m{i}", msa_state_dict(seed=i)) for i in range(3)]
    argv = ["merge", "--method", "average", "--inputs", *map(str, dirs), "-o", str(tmp_path / "soup")]
    assert run_cli(argv) == 0
    with CheckpointReader(tmp_path / "soup") as r, CheckpointReader(dirs[1]) as r1:
        assert r.keys() == r1.keys()


@pytest.mark.parametrize(("argv", "match"), [
    (["--method", "ties", "IN", "OUT"], "needs a base checkpoint"),
    (["--method", "ties", "--alpha", "0.5", "--base", "B", "IN", "OUT"],
     "params: alpha: unknown key; allowed keys: density"),
    (["--method", "interpolation", "--alpha", "1.5", "IN", "OUT"], "params: alpha"),
    (["--method", "interpolation", "IN"], "give IN_DIR OUT_DIR"),
    (["IN", "OUT"], "--method is required"),
    (["--method", "interpolation", "--grams", "g", "IN", "OUT"], "does not use Gram matrices"),
    (["--method", "regmean", "IN", "OUT"], "exactly one of 'grams'"),
    (["--method", "regmean", "--data", "nowhere", "--batches", "2", "IN", "OUT"], "unknown Gram data source"),
])
def test_cli_errors_one_line(msa_pair, argv: list[str], match: str,
                             capsys: pytest.CaptureFixture[str]) -> None:
    in_dir, base_dir, *_ = msa_pair
    subst = {"IN": str(in_dir), "OUT": str(in_dir.parent / "out"), "B": str(base_dir)}
    assert run_cli(["merge", *[subst.get(a, a) for a in argv]]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("vlmerge merge: error:")
    assert re.search(match, err), err
    assert not (in_dir.parent / "out").exists()


def test_yaml_config(msa_pair, tmp_path: Path) -> None:
    in_dir, base_dir, sd, base = msa_pair
    cfg = {"method": "modality_arithmetic", "params": {"lam": 0.25}, "input": str(in_dir),
           "base": str(base_dir),
           "output": str(tmp_path / "y")}
    (tmp_path / "m.yaml").write_text(yaml.safe_dump(cfg))
    assert run_cli(["merge", str(tmp_path / "m.yaml")]) == 0
    with CheckpointReader(tmp_path / "y") as r:
        k = "blocks.2.mlp.shared.fc2.weight"
        srcs = [sd[f"blocks.2.mlp.{m}.fc2.weight"] for m in ("v", "l", "vl")]
        want = merge_tensors("modality_arithmetic", srcs, base=base["blocks.2.mlp.v.fc2.weight"], lam=0.25)
        assert torch.allclose(r.get(k), want, atol=1e-6)


@pytest.mark.parametrize(("cfg", "match"), [
    ({"method": "soup"}, "method: unknown merge method 'soup'; allowed: average, breadcrumbs"),
    ({"methd": "ties"}, "methd: unknown key; allowed keys: method, params"),
    ({"params": {"alpha": 3}}, "interpolation params: alpha"),
    ({"params": {"density": 0.5}}, "params: density: unknown key; allowed keys: alpha, vl_ratio"),
    ({"inputs": ["a", "b"]}, "exactly one of 'input'"),
    ({"batches": 0}, "batches:"),
    ({"weights": [0.5, 0.5]}, "maps modality to weight"),
])
def test_yaml_config_errors(tmp_path: Path, cfg: dict, match: str) -> None:
    full = {"method": "interpolation", "input": "in", "output": "out", **cfg}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(full))
    with pytest.raises(ValueError, match=match):
        load_merge_config(tmp_path / "c.yaml")


def test_yaml_not_a_mapping(tmp_path: Path) -> None:
    (tmp_path / "c.yaml").write_text("- a\n- b\n")
    with pytest.raises(ValueError, match="expected a mapping of config keys"):
        load_merge_config(tmp_path / "c.yaml")
    with pytest.raises(FileNotFoundError):
        load_merge_config(tmp_path / "missing.yaml")
