"""What is not a Gram file is refused in one line naming it; nothing is ever unpickled."""

from __future__ import annotations

import json
import os
import pickle
import struct
from pathlib import Path
from typing import Any

import pytest
import torch
from fuzz_helpers import snapshot
from safetensors.torch import save_file

from vlmerge.cli import main
from vlmerge.merge import Grams, load_grams, save_grams
from vlmerge.merge.grams import GRAMS_FORMAT, check_gram_file, open_grams
from vlmerge.models import CheckpointError, VLMo, preset_config, save_model

HINT = "a Gram file is a safetensors file written by 'vlmerge merge --save-grams' or Grams.save"


class Booby:
    """Unpickling this creates the file ``marker``: proof that something was unpickled."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, tuple[str, str]]:
        return (open, (str(self.marker), "w"))


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    return save_model(VLMo(preset_config("micro", "msa", vocab_size=40)), tmp_path_factory.mktemp("g") / "ck")


def good_grams(ckpt: Path) -> dict[str, torch.Tensor]:
    from vlmerge.models import CheckpointReader

    with CheckpointReader(ckpt) as r:
        return {k: torch.eye(r.shape(k)[1], dtype=torch.float64) for k in r
                if k.startswith("blocks.") and (".attn." in k or ".mlp." in k) and len(r.shape(k)) == 2}


def bad_file(kind: str, tmp: Path, ckpt: Path) -> Path:
    """A file (or folder) that is not a Gram file, of the given kind."""
    p = tmp / f"grams-{kind}"
    if kind == "pickle":
        p.write_bytes(pickle.dumps({"blocks.0.attn.v.qkv.weight": Booby(tmp / "unpickled")}))
    elif kind == "torch-save":
        torch.save({"blocks.0.attn.v.qkv.weight": torch.eye(4), "x": Booby(tmp / "unpickled")}, p)
    elif kind == "random":
        p.write_bytes(os.urandom(4096))
    elif kind == "empty":
        p.write_bytes(b"")
    elif kind == "short":
        p.write_bytes(b"\x01\x02\x03")
    elif kind == "json":
        p.write_text(json.dumps({"blocks.0.attn.v.qkv.weight": [[1.0]]}))
    elif kind == "bad-header":
        raw = b'{"a": {"dtype": "F64", "shape": [2, 2], "data_offsets": [0, 999]}}'
        p.write_bytes(struct.pack("<Q", len(raw)) + raw + b"\x00" * 8)
    elif kind == "checkpoint-dir":
        return ckpt
    elif kind == "weights":
        return ckpt / "model.safetensors"
    elif kind == "untagged":
        save_file(good_grams(ckpt), str(p))
    elif kind == "not-square":
        save_file({"blocks.0.attn.v.qkv.weight": torch.zeros(3, 4, dtype=torch.float64)}, str(p),
                  metadata={"format": GRAMS_FORMAT})
    elif kind == "int":
        save_file({"blocks.0.attn.v.qkv.weight": torch.zeros(4, 4, dtype=torch.int64)}, str(p),
                  metadata={"format": GRAMS_FORMAT})
    elif kind == "bad-counts":
        save_file(good_grams(ckpt), str(p), metadata={"format": GRAMS_FORMAT, "counts": '{"a": "many"}'})
    elif kind == "counts-not-json":
        save_file(good_grams(ckpt), str(p), metadata={"format": GRAMS_FORMAT, "counts": "[[[" * 1000})
    else:
        raise AssertionError(kind)
    return p


KINDS = ["pickle", "torch-save", "random", "empty", "short", "json", "bad-header", "checkpoint-dir", "weights",
         "untagged", "not-square", "int", "bad-counts", "counts-not-json"]


@pytest.mark.parametrize("kind", KINDS)
def test_check_gram_file_refuses_in_one_line(kind: str, ckpt: Path, tmp_path: Path) -> None:
    path = bad_file(kind, tmp_path, ckpt)
    for fn in (check_gram_file, load_grams, open_grams):
        with pytest.raises(CheckpointError) as e:
            fn(path)
        msg = str(e.value)
        assert msg.startswith(f"{path}: ") and "\n" not in msg, msg
        assert "Gram" in msg and ("--save-grams" in msg or "Gram matrix" in msg), msg
    assert not (tmp_path / "unpickled").exists()  # nothing was unpickled


def test_missing_gram_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nothere: no such Gram file"):
        open_grams(tmp_path / "nothere")


def test_a_real_gram_file_still_loads(ckpt: Path, tmp_path: Path) -> None:
    grams = good_grams(ckpt)
    save_grams(Grams(grams, {k: 3 for k in grams}), tmp_path / "g.safetensors")
    assert check_gram_file(tmp_path / "g.safetensors") == {k: 3 for k in grams}
    back = load_grams(tmp_path / "g.safetensors")
    assert back.keys() == sorted(grams) and back.counts == {k: 3 for k in grams}
    save_grams(grams, tmp_path / "nocounts.safetensors")  # a plain mapping: no counts
    assert check_gram_file(tmp_path / "nocounts.safetensors") == {}
    with open_grams(tmp_path / "g.safetensors") as src:
        k = sorted(grams)[0]
        assert torch.equal(src.get(k), grams[k])


@pytest.mark.parametrize("kind", ["pickle", "torch-save", "random", "empty", "json", "checkpoint-dir", "weights",
                                  "untagged", "not-square"])
def test_merge_cli_refuses_a_bad_gram_file(kind: str, ckpt: Path, tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    path = bad_file(kind, tmp_path, ckpt)
    before, ck_before = snapshot(tmp_path), snapshot(ckpt)
    rc = main(["merge", "--method", "regmean", "--grams", str(path), str(ckpt), str(tmp_path / "out")])
    assert rc == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert f"{path}: " in err and "Gram" in err, err
    assert snapshot(tmp_path) == before and snapshot(ckpt) == ck_before
    assert not (tmp_path / "out").exists() and not (tmp_path / "unpickled").exists()


@pytest.mark.parametrize("kind", ["asymmetric", "zero", "negative-diagonal", "extra-key", "nan"])
def test_merge_refuses_a_gram_that_no_activations_could_give(kind: str, ckpt: Path, tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    """A well-formed Gram file whose matrices are no XᵀX (or that holds Grams of weights the checkpoint does
    not have) is refused naming the file and the weight; nothing is written."""
    grams = good_grams(ckpt)
    key = sorted(grams)[0]
    g = grams[key]
    if kind == "asymmetric":
        g[0, 1] = 0.5
    elif kind == "zero":
        g.zero_()
    elif kind == "negative-diagonal":
        g[1, 1] = -1.0
    elif kind == "nan":
        g[0, 0] = float("nan")
    else:
        key = "blocks.9.attn.v.qkv.weight"
        grams[key] = torch.eye(4, dtype=torch.float64)
    path = save_grams(Grams(grams, {k: 10 for k in grams}), tmp_path / "g.safetensors")
    before, ck_before = snapshot(tmp_path), snapshot(ckpt)
    rc = main(["merge", "--method", "regmean", "--grams", str(path), str(ckpt), str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    assert str(path) in err and key in err, err
    want = {"asymmetric": "not symmetric", "zero": "all zero", "negative-diagonal": "negative diagonal",
            "nan": "NaN or Inf", "extra-key": "has no linear weight for"}[kind]
    assert want in err, err
    assert snapshot(tmp_path) == before and snapshot(ckpt) == ck_before and not (tmp_path / "out").exists()


def test_merge_tensors_refuses_a_non_gram() -> None:
    from vlmerge.merge import merge_tensors

    w = [torch.randn(3, 4), torch.randn(3, 4)]
    good = torch.eye(4, dtype=torch.float64)
    bad = good.clone()
    bad[0, 2] = 1.0
    with pytest.raises(ValueError, match=r"grams\[1\] is not symmetric"):
        merge_tensors("regmean", w, grams=[good, bad])


def test_singular_grams_give_one_warning_line_not_one_per_weight(ckpt: Path, tmp_path: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    grams = good_grams(ckpt)
    for g in grams.values():  # rank one: a valid Gram (one token seen), singular for every weight
        g.zero_()
        g[0, 0] = 1.0
    path = save_grams(Grams(grams, {k: 1 for k in grams}), tmp_path / "g.safetensors")
    assert main(["merge", "--method", "regmean", "--param", "gamma=1.0", "--grams", str(path), str(ckpt),
                 str(tmp_path / "out")]) == 0
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and "is singular" in err[0] and "more weights like it" in err[0], err
