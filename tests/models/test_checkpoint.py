"""Checkpoints: round trip, sharded reading, streaming writer, atomic writes, and every bad-input error."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from vlmerge.models import (
    CheckpointError,
    CheckpointReader,
    SafetensorsStreamWriter,
    VLMo,
    load_model,
    maa_to_msa,
    merged_to_maa,
    preset_config,
    save_model,
)
from vlmerge.models.checkpoint import INDEX_NAME, WEIGHTS_NAME


@pytest.fixture()
def model() -> VLMo:
    torch.manual_seed(0)
    return VLMo(preset_config("micro", "msa", vocab_size=40, heads=("itc", "itm"))).eval()


def test_round_trip_same_outputs(model: VLMo, tmp_path: Path) -> None:
    save_model(model, tmp_path / "ck", preset="micro", tokenizer={"kind": "test"})
    assert sorted(os.listdir(tmp_path / "ck")) == ["config.json", WEIGHTS_NAME]  # no temp files left
    cfg = json.loads((tmp_path / "ck" / "config.json").read_text())
    assert cfg["preset"] == "micro" and cfg["model"]["arch"] == "msa" and cfg["format"] == "vlmerge/1"
    loaded = load_model(tmp_path / "ck").eval()
    image, ids = torch.randn(2, 3, 16, 16), torch.randint(0, 40, (2, 6))
    with torch.no_grad():
        torch.testing.assert_close(loaded(image, ids), model(image, ids), atol=0, rtol=0)
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k


def test_stream_writer_matches_safetensors_and_reads_back(tmp_path: Path) -> None:
    tensors = {"a": torch.randn(3, 5), "b": torch.arange(7), "c": torch.randn(4).bfloat16(), "z": torch.zeros(0, 2)}
    with SafetensorsStreamWriter(tmp_path / "x.safetensors", {k: (v.dtype, tuple(v.shape)) for k, v in
                                                                tensors.items()}) as w:
        for k in ["c", "a", "z", "b"]:  # any order
            w.write(k, tensors[k])
    loaded = load_file(tmp_path / "x.safetensors")  # the reference reader accepts our file
    assert all(torch.equal(loaded[k], v) for k, v in tensors.items())
    with CheckpointReader(tmp_path / "x.safetensors") as r:
        assert r.keys() == sorted(tensors) and r.shape("a") == (3, 5) and r.dtype("c") == torch.bfloat16


def test_stream_writer_errors_leave_no_file(tmp_path: Path) -> None:
    path = tmp_path / "x.safetensors"
    w = SafetensorsStreamWriter(path, {"a": (torch.float32, (2,)), "b": (torch.float32, (3,))})
    with pytest.raises(CheckpointError, match="'zz' was not declared"):
        w.write("zz", torch.zeros(2))
    with pytest.raises(CheckpointError, match=r"'a' declared torch.float32 \[2\], got torch.float32 \[3\]"):
        w.write("a", torch.zeros(3))
    w.write("a", torch.zeros(2))
    with pytest.raises(CheckpointError, match="never written: b"):
        w.close()
    assert os.listdir(tmp_path) == []
    with pytest.raises(RuntimeError), SafetensorsStreamWriter(path, {"a": (torch.float32, (2,))}) as w2:
        w2.write("a", torch.ones(2))
        raise RuntimeError("killed")
    assert os.listdir(tmp_path) == []


def test_sharded_checkpoint_is_read_lazily(model: VLMo, tmp_path: Path) -> None:
    sd = model.state_dict()
    keys = sorted(sd)
    half = len(keys) // 2
    shards = {"model-00001-of-00002.safetensors": keys[:half], "model-00002-of-00002.safetensors": keys[half:]}
    (tmp_path / "ck").mkdir()
    for fname, ks in shards.items():
        save_file({k: sd[k].contiguous() for k in ks}, tmp_path / "ck" / fname)
    weight_map = {k: f for f, ks in shards.items() for k in ks}
    (tmp_path / "ck" / INDEX_NAME).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (tmp_path / "ck" / "config.json").write_text(json.dumps({"model": model.config.to_dict()}))
    loaded = load_model(tmp_path / "ck")
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in sd.items())
    weight_map[keys[0]] = "model-00002-of-00002.safetensors"
    (tmp_path / "ck" / INDEX_NAME).write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(CheckpointError, match="mapped to model-00002-of-00002.safetensors but not found there"):
        CheckpointReader(tmp_path / "ck")


def _resave(tmp_path: Path, sd: dict, config: dict) -> Path:
    d = tmp_path / "bad"
    d.mkdir(exist_ok=True)
    save_file(sd, d / WEIGHTS_NAME)
    (d / "config.json").write_text(json.dumps(config))
    return d


def test_bad_checkpoints_name_what_is_wrong(model: VLMo, tmp_path: Path) -> None:
    sd = {k: v.clone().contiguous() for k, v in model.state_dict().items()}
    cfg = {"model": model.config.to_dict()}
    key = "blocks.0.attn.v.qkv.weight"

    missing = {k: v for k, v in sd.items() if k != key}
    with pytest.raises(CheckpointError, match=rf"missing keys \(1\): {key}"):
        load_model(_resave(tmp_path, missing, cfg))
    with pytest.raises(CheckpointError, match=r"unexpected keys \(1\): extra.weight"):
        load_model(_resave(tmp_path, {**sd, "extra.weight": torch.zeros(1)}, cfg))
    wrong = {**sd, key: torch.zeros(5, 5)}
    with pytest.raises(CheckpointError, match=rf"shape mismatches \(1\): {key}: checkpoint \[5, 5\], model \[96, 32\]"):
        load_model(_resave(tmp_path, wrong, cfg))
    nan = {**sd, key: torch.full_like(sd[key], float("nan"))}
    with pytest.raises(CheckpointError, match=rf"'{key}' contains NaN or Inf"):
        load_model(_resave(tmp_path, nan, cfg))
    with pytest.raises(CheckpointError, match="arch='vit'.*one of"):
        load_model(_resave(tmp_path, sd, {"model": {**cfg["model"], "arch": "vit"}}))
    with pytest.raises(CheckpointError, match=r"unknown keys \['width'\]"):
        load_model(_resave(tmp_path, sd, {"model": {**cfg["model"], "width": 3}}))
    with pytest.raises(CheckpointError, match="expected an object with a 'model' entry"):
        load_model(_resave(tmp_path, sd, {"arch": "msa"}))
    d = _resave(tmp_path, sd, cfg)
    (d / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="config.json: not valid JSON"):
        load_model(d)
    (d / "config.json").write_text(json.dumps(cfg))
    (d / WEIGHTS_NAME).write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00garbage-garbage!")
    with pytest.raises(CheckpointError, match="model.safetensors: not a readable safetensors file"):
        load_model(d)
    with pytest.raises(FileNotFoundError, match="no model.safetensors or model.safetensors.index.json"):
        os.remove(d / WEIGHTS_NAME)
        load_model(d)
    with pytest.raises(FileNotFoundError, match="nowhere: no such"):
        CheckpointReader(tmp_path / "nowhere")


def test_maa_to_msa_and_merged_to_maa(tmp_path: Path) -> None:
    torch.manual_seed(0)
    maa = VLMo(preset_config("micro", "maa", vocab_size=40))
    msa_cfg = maa.config.replace(arch="msa")
    msa_sd = maa_to_msa(maa.state_dict(), msa_cfg)
    msa = VLMo(msa_cfg)
    msa.load_state_dict(msa_sd)  # strict: exactly the MSA's keys
    with pytest.raises(ValueError, match="modality-specific weights remain"):
        merged_to_maa(msa_sd)
    assert merged_to_maa(maa.state_dict()).keys() == maa.state_dict().keys()
    with pytest.raises(KeyError, match="cannot build 'blocks.0.attn.v.qkv.weight'"):
        maa_to_msa({k: v for k, v in maa.state_dict().items() if "blocks.0.attn" not in k}, msa_cfg)


def test_a_config_json_with_a_utf8_bom_loads(model: VLMo, tmp_path: Path) -> None:
    save_model(model, tmp_path / "ckpt")
    cfg = tmp_path / "ckpt" / "config.json"
    cfg.write_bytes(b"\xef\xbb\xbf" + cfg.read_bytes())  # as a Windows editor saves it
    assert load_model(tmp_path / "ckpt").config == model.config
    cfg.write_bytes(b"\xef\xbb\xbf" + cfg.read_bytes())  # a second mark is not a byte-order mark: refused
    with pytest.raises(ValueError, match="config.json: not valid JSON"):
        load_model(tmp_path / "ckpt")
