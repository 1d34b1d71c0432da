"""A checkpoint's extras (``image_mean`` / ``image_std`` / ``finetune``) are checked before any work."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from fuzz_helpers import snapshot

from vlmerge.cli import main
from vlmerge.finetune.api import checked_extras, evaluate, pixel_stats
from vlmerge.models import VLMo, preset_config, save_model

BAD: list[tuple[str, Any, str]] = [
    ("image_mean", "grey", "3 finite numbers"),
    ("image_mean", [0.5, 0.5], "3 finite numbers"),
    ("image_mean", [0.5, 0.5, 0.5, 0.5], "3 finite numbers"),
    ("image_mean", [0.5, "0.5", 0.5], "3 finite numbers"),
    ("image_mean", [0.5, None, 0.5], "3 finite numbers"),
    ("image_mean", [True, 0.5, 0.5], "3 finite numbers"),
    ("image_mean", {"r": 0.5}, "3 finite numbers"),
    ("image_mean", 0.5, "3 finite numbers"),
    ("image_std", [0.5, 0.0, 0.5], "3 positive numbers"),
    ("image_std", [0.5, -1, 0.5], "3 positive numbers"),
    ("image_std", "0.5", "3 positive numbers"),
    ("image_std", [[0.5], [0.5], [0.5]], "3 positive numbers"),
]


@pytest.mark.parametrize(("key", "value", "expected"), BAD, ids=[f"{k}={v!r}" for k, v, _ in BAD])
def test_pixel_stats_names_where_and_key(key: str, value: Any, expected: str) -> None:
    with pytest.raises(ValueError, match=rf"^ck/config.json: {key}=.* is invalid; expected {expected}") as e:
        checked_extras({key: value}, "ck/config.json")
    assert "\n" not in str(e.value)


def test_pixel_stats_accepts_numbers() -> None:
    assert pixel_stats([0, 1, 0.5], "image_mean", "x") == (0.0, 1.0, 0.5)
    assert pixel_stats((np.float32(0.25), 1, 2), "image_std", "x") == (0.25, 1.0, 2.0)
    assert pixel_stats([float("-0.5"), 0, 0], "image_mean", "x") == (-0.5, 0.0, 0.0)
    extras = {"image_mean": [0, 0, 0], "other": 1}
    assert checked_extras(extras, "x") == extras  # values unchanged
    with pytest.raises(ValueError, match="image_mean=\\[nan, 0, 0\\]"):
        pixel_stats([float("nan"), 0, 0], "image_mean", "x")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    model = VLMo(preset_config("micro", "msa", vocab_size=40))
    return save_model(model, tmp_path_factory.mktemp("extras") / "ck", image_mean=[0.5, 0.5, 0.5],
                      image_std=[0.5, 0.5, 0.5])


def bad_copy(ckpt: Path, tmp: Path, **extras: Any) -> Path:
    out = tmp / "bad"
    out.mkdir()
    (out / "model.safetensors").write_bytes((ckpt / "model.safetensors").read_bytes())
    cfg = json.loads((ckpt / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**cfg, **extras}))
    return out


@pytest.mark.parametrize(("key", "value", "expected"), [
    ("image_mean", "grey", "expected 3 finite numbers"),
    ("image_mean", [0.5, 0.5], "expected 3 finite numbers"),
    ("image_std", [0.5, 0, 0.5], "expected 3 positive numbers"),
    ("image_std", ["a", "b", "c"], "expected 3 positive numbers"),
])
@pytest.mark.parametrize("command", ["eval", "finetune"])
def test_cli_refuses_bad_pixel_stats_in_one_line(ckpt: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                 command: str, key: str, value: Any, expected: str) -> None:
    bad = bad_copy(ckpt, tmp_path, **{key: value})
    before = snapshot(tmp_path)
    argv = (["eval", "retrieval", str(bad)] if command == "eval"
            else ["finetune", "retrieval", "--init", str(bad), "--out", str(tmp_path / "out")])
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert f"{bad / 'config.json'}: {key}=" in err and expected in err, err
    assert snapshot(tmp_path) == before
    assert not (tmp_path / "out").exists()


def test_evaluate_checks_given_pixel_stats_and_finetune_record(ckpt: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"evaluate\(image_std=...\): image_std=\(1, 0, 1\) is invalid"):
        evaluate("retrieval", ckpt, image_std=(1, 0, 1))
    bad = bad_copy(ckpt, tmp_path, finetune={"task": "retrieval", "config": "lr=1"})
    with pytest.raises(ValueError, match=rf"{bad / 'config.json'}: finetune.config is invalid"):
        evaluate("retrieval", bad)
