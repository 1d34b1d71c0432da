"""Bad ``config.json`` "model" entries: one-line errors naming the file, the key and what was expected."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from fuzz_helpers import snapshot

from vlmerge.cli import main
from vlmerge.models import PRESETS, CheckpointError, ModelConfig, VLMo, load_model_config, preset_config, save_model
from vlmerge.models.checkpoint import read_json


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    return save_model(VLMo(preset_config("micro", "msa", vocab_size=40)), tmp_path_factory.mktemp("cfg") / "ck")


def with_model_entry(ckpt: Path, tmp: Path, **changes: Any) -> Path:
    """A copy of ``ckpt`` whose config.json "model" entry has ``changes``."""
    out = tmp / "bad"
    out.mkdir()
    (out / "model.safetensors").write_bytes((ckpt / "model.safetensors").read_bytes())
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["model"].update(changes)
    (out / "config.json").write_text(json.dumps(cfg))
    return out


# (key, bad value, what the message says is expected)
BAD_VALUES: list[tuple[str, Any, str]] = [
    ("init_std", "0.02", "a finite number"),
    ("proj_dim", "64", "an integer or null"),
    ("ln_eps", "x", "a finite number"),
    ("num_vl_layers", "2", "an integer"),
    ("depth", True, "an integer"),  # a bool is not a number
    ("mlp_ratio", True, "a finite number"),
    ("qkv_bias", 1, "true or false"),
    ("tied_init", "yes", "true or false"),
    ("embed_dim", 32.0, "an integer"),  # a float where an int is expected
    ("num_answers", 3.5, "an integer"),
    ("mlp_ratio", math.nan, "a finite number"),
    ("init_std", math.inf, "a finite number"),
    ("ln_eps", -math.inf, "a finite number"),
    ("heads", "itc", "a list of strings"),
    ("heads", ["itc", 3], "a list of strings"),
    ("heads", {"itc": 1}, "a list of strings"),
    ("heads", ["itc", "itc"], "each head name once"),
    ("arch", ["msa"], "a string"),
    ("proj_dim", 0, "a positive integer"),
    ("proj_dim", -4, "a positive integer"),
    ("mlp_ratio", 0, "a positive number"),
    ("mlp_ratio", -1.5, "a positive number"),
    ("mlp_ratio", 1e-9, "a positive number"),  # rounds to an FFN of width 0
    ("mlp_ratio", 1e308, "a positive number"),  # embed_dim * mlp_ratio overflows
    ("ln_eps", 0.0, "a positive finite number"),
    ("init_std", -0.02, "a positive finite number"),
    ("embed_dim", 2**40, "a positive integer ≤"),  # would overflow torch's size arithmetic
    ("vocab_size", 10**30, "a positive integer ≤"),
    ("num_classes", -1, "a non-negative integer"),
    ("image_size", None, "an integer"),
    ("mm_depth", 2, "0 otherwise"),  # a multimodal encoder needs fusion "encoder"
    ("mm_depth", -1, "an integer in [0,"),
    ("fusion", "flava", "one of ['early', 'encoder', 'late']"),
    ("merged_layers", [5], "distinct layer indices in [0, depth=2)"),
    ("merged_layers", [1, 0], "ascending"),
    ("merged_layers", [0, 0], "distinct layer indices"),
    ("merged_layers", "0", "a list of integers"),
    ("merged_layers", [True], "a list of integers"),
]


@pytest.mark.parametrize(("key", "value", "expected"), BAD_VALUES, ids=[f"{k}={v!r}" for k, v, _ in BAD_VALUES])
def test_from_dict_names_source_key_and_expected(key: str, value: Any, expected: str) -> None:
    d = {**preset_config("micro").to_dict(), key: value}
    with pytest.raises(ValueError) as e:
        ModelConfig.from_dict(d, source="ck/config.json 'model'")
    msg = str(e.value)
    assert msg.startswith(f"ck/config.json 'model': {key}=") and "is invalid; expected" in msg, msg
    assert expected in msg and "\n" not in msg


@pytest.mark.parametrize("d", [[1, 2], "msa", 3, None, ("arch", "msa")])
def test_from_dict_refuses_what_is_not_an_object(d: Any) -> None:
    with pytest.raises(ValueError, match=r"^src: expected an object of model config keys, got "):
        ModelConfig.from_dict(d, source="src")


def test_from_dict_unknown_keys_of_any_type() -> None:
    with pytest.raises(ValueError, match=r"src: unknown keys \['1', 'width'\]"):
        ModelConfig.from_dict({"width": 3, 1: 2}, source="src")


def test_encoder_fusion_needs_its_encoder_and_nothing_it_cannot_use() -> None:
    flava_like = dict(fusion="encoder", mm_depth=2, num_vl_layers=0)
    assert preset_config("micro", **flava_like).num_blocks == 4
    for changes, key, expected in (({"mm_depth": 0}, "mm_depth", "≥ 1 with fusion='encoder'"),
                                   ({"num_vl_layers": 1}, "num_vl_layers", "0 with fusion='encoder'"),
                                   ({"rel_pos_text_len": 30}, "rel_pos_text_len", "0 with fusion='encoder'"),
                                   ({"prenorm": False}, "prenorm", "true with fusion='encoder'")):
        with pytest.raises(ValueError, match=rf"^src: {key}=.* is invalid; expected {expected}"):
            ModelConfig.from_dict({**preset_config("micro").to_dict(), **flava_like, **changes}, source="src")


def test_direct_construction_is_checked_too() -> None:
    with pytest.raises(ValueError, match=r"^model config: depth=True is invalid; expected an integer$"):
        ModelConfig(depth=True)
    with pytest.raises(ValueError, match="model config: init_std='0.02'"):
        preset_config("micro", init_std="0.02")


@pytest.mark.parametrize("preset", sorted(PRESETS))
@pytest.mark.parametrize("arch", ["msa", "custom-ffn", "maa"])
def test_valid_configs_round_trip_unchanged(preset: str, arch: str) -> None:
    cfg = preset_config(preset, arch, heads=("itc", "itm", "vqa"))
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg
    assert ModelConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


def test_ints_for_floats_lists_for_heads_and_defaults_are_accepted() -> None:
    cfg = ModelConfig.from_dict({"mlp_ratio": 4, "ln_eps": 1, "init_std": 1, "heads": ["itc", "itm"],
                                 "proj_dim": None})
    assert cfg.mlp_ratio == 4 and cfg.heads == ("itc", "itm") and cfg.proj_dim is None
    assert cfg == ModelConfig(mlp_ratio=4.0, ln_eps=1.0, init_std=1.0, heads=("itc", "itm"))
    assert ModelConfig.from_dict({}) == ModelConfig()
    assert ModelConfig(heads=["itc"]).heads == ("itc",)  # a list from Python code is stored as a tuple
    hash(ModelConfig(heads=["itc"]))


@pytest.mark.parametrize(("key", "value", "expected"), [
    ("init_std", "0.02", "expected a finite number"),
    ("proj_dim", "64", "expected an integer or null"),
    ("ln_eps", "x", "expected a finite number"),
    ("num_vl_layers", "2", "expected an integer"),
    ("prenorm", 0, "expected true or false"),
    ("heads", "itc", "expected a list of strings"),
    ("proj_dim", 0, "expected a positive integer"),
    ("mlp_ratio", -1, "expected a positive number"),
    ("embed_dim", 2**40, "expected a positive integer ≤"),
])
def test_cli_refuses_bad_model_entry_in_one_line(ckpt: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                  key: str, value: Any, expected: str) -> None:
    bad = with_model_entry(ckpt, tmp_path, **{key: value})
    before = snapshot(tmp_path)
    assert main(["distance", str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert f"{bad / 'config.json'} 'model': {key}=" in err and expected in err, err
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("entry", [[1, 2], "msa", 3, None])
def test_cli_refuses_a_model_entry_that_is_not_an_object(ckpt: Path, tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str], entry: Any) -> None:
    bad = with_model_entry(ckpt, tmp_path)
    cfg = json.loads((bad / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps({**cfg, "model": entry}))
    assert main(["distance", str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{bad / 'config.json'}: expected an object with a 'model' entry" in err


# ---------------------------------------------------------------------------------------- unreadable JSON
@pytest.mark.parametrize(("content", "expected"), [
    (b'{"model": {"arch": "\xff\xfe"}}', "not UTF-8 text"),
    (b"\x80\x81\x82", "not UTF-8 text"),
    (b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
    (b'{"model": ' * 50_000 + b"1" + b"}" * 50_000, "nested too deeply"),
    (b"{", "not valid JSON"),
])
def test_unreadable_config_json_names_the_file(ckpt: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                               content: bytes, expected: str) -> None:
    bad = with_model_entry(ckpt, tmp_path)
    (bad / "config.json").write_bytes(content)
    with pytest.raises(CheckpointError, match=expected) as e:
        read_json(bad / "config.json")
    assert str(bad / "config.json") in str(e.value)
    with pytest.raises(CheckpointError, match=expected):
        load_model_config(bad)
    before = snapshot(tmp_path)
    assert main(["distance", str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{bad / 'config.json'}: " in err and expected in err, err
    assert snapshot(tmp_path) == before
