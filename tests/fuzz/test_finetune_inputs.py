"""``vlmerge finetune`` / ``vlmerge eval`` never write over what they read, replace an existing output only
with ``--overwrite``, write their output whole or not at all, and lock a fine-tuning output while running."""

from __future__ import annotations

import errno
import json
from pathlib import Path
from typing import Any

import pytest
import torch

from vlmerge.cli import main
from vlmerge.data import default_tokenizer
from vlmerge.files import RunLock
from vlmerge.finetune import api
from vlmerge.models import VLMo, preset_config, save_model

FT = ["--set", "max_steps=1", "--set", "data.train_size=4", "--set", "data.eval_size=4", "--set", "batch_size=4",
      "--set", "device=cpu"]
EV = ["--set", "data.eval_size=4", "--set", "device=cpu"]


@pytest.fixture(scope="module")
def pico(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A randomly initialised micro VLMo (16 px) with ITC / ITM / MLM heads and the world tokenizer."""
    tok = default_tokenizer()
    torch.manual_seed(0)
    m = VLMo(preset_config("micro", image_size=16, heads=("itc", "itm", "mlm"), vocab_size=tok.vocab_size,
                           num_vl_layers=2))
    return save_model(m, tmp_path_factory.mktemp("pico") / "init", tokenizer=tok.to_config())


@pytest.fixture
def init(pico: Path, tmp_path: Path) -> Path:
    """A copy of the checkpoint under ``tmp_path`` (so that ``tmp_path`` holds everything a test touches)."""
    out = tmp_path / "init"
    out.mkdir()
    for f in pico.iterdir():
        (out / f.name).write_bytes(f.read_bytes())
    return out


def snapshot(root: Path) -> dict[str, bytes | None]:
    """Every path under ``root`` (hidden ones too) with its bytes (None for a folder)."""
    return {p.relative_to(root).as_posix(): (None if p.is_dir() else p.read_bytes()) for p in sorted(root.rglob("*"))}


def one_line_error(capsys: pytest.CaptureFixture[str], command: str) -> str:
    err = capsys.readouterr().err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"vlmerge {command}: error: "), err
    return lines[0]


def _no_space(*_: Any, **__: Any) -> None:
    raise OSError(errno.ENOSPC, "No space left on device")


# ----------------------------------------------------------------------------------------------------- eval
@pytest.mark.parametrize("target", ["model.safetensors", "config.json", ".", "new.json", "config"])
def test_eval_never_writes_over_its_inputs(
    init: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], target: str
) -> None:
    config = tmp_path / "eval.yaml"
    config.write_text("data: {eval_size: 4}\n")
    out = config if target == "config" else init / target
    before = snapshot(tmp_path)
    assert main(["eval", "retrieval", str(init), "--out", str(out), "--config", str(config), "--overwrite",
                 *EV]) == 2
    assert "--out" in one_line_error(capsys, "eval")
    assert snapshot(tmp_path) == before  # no eval/ either


def test_eval_replaces_an_existing_out_only_with_overwrite(
    init: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "result.json"
    out.write_bytes(b"my notes\n")
    before = snapshot(tmp_path)
    assert main(["eval", "retrieval", str(init), "--out", str(out), *EV]) == 2
    assert "--overwrite" in one_line_error(capsys, "eval")
    assert snapshot(tmp_path) == before
    assert main(["eval", "retrieval", str(init), "--out", str(out), "--overwrite", *EV]) == 0
    assert json.loads(out.read_text())["task"] == "retrieval"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["init", "result.json"]  # no temp left
    assert snapshot(init) == {k[len("init/"):]: v for k, v in before.items() if k.startswith("init/")}


@pytest.mark.parametrize("kind", ["fifo", "symlink loop", "empty", "name too long"])
def test_eval_out_that_is_no_file_path_is_refused_even_with_overwrite(
    init: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, kind: str
) -> None:
    import os

    monkeypatch.chdir(tmp_path)
    if kind == "fifo":  # --overwrite once replaced a FIFO (or a device) with a regular file
        out, want = tmp_path / "pipe", ["pipe", "not a regular file"]
        os.mkfifo(out)
    elif kind == "symlink loop":
        out, want = tmp_path / "a", ["a", "loop of symbolic links"]
        (tmp_path / "b").symlink_to(tmp_path / "a")
        (tmp_path / "a").symlink_to(tmp_path / "b")
    elif kind == "empty":  # "" once fell back to the default output inside the checkpoint
        out, want = "", ["--out", "empty path"]
    else:
        out, want = tmp_path / ("x" * 300), ["File name too long"]
    listing, before = sorted(p.name for p in tmp_path.iterdir()), snapshot(init)  # (reading a FIFO would block)
    assert main(["eval", "retrieval", str(init), "--out", str(out), "--overwrite", *EV]) == 2
    line = one_line_error(capsys, "eval")
    assert all(w in line for w in want), line
    assert snapshot(init) == before and sorted(p.name for p in tmp_path.iterdir()) == listing
    if kind == "fifo":
        import stat

        assert stat.S_ISFIFO(os.lstat(tmp_path / "pipe").st_mode)


def test_eval_default_output_appears_only_with_the_result(
    init: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    before = snapshot(init)
    assert main(["eval", "retrieval", str(init), "--set", "data.eval_size=0"]) == 2  # refused by the config
    one_line_error(capsys, "eval")
    assert snapshot(init) == before and not (init / "eval").exists()
    assert main(["eval", "retrieval", str(init), "--json", *EV]) == 0  # the command's own result: replaced
    first = (init / "eval" / "retrieval-test.json").read_bytes()
    assert main(["eval", "retrieval", str(init), "--json", *EV]) == 0
    assert (init / "eval" / "retrieval-test.json").read_bytes() == first
    assert sorted(p.name for p in (init / "eval").iterdir()) == ["retrieval-test.json"]


# ------------------------------------------------------------------------------------------------- finetune
@pytest.mark.parametrize("where", ["init", "inside", "parent"])
def test_finetune_out_may_not_overlap_the_initial_checkpoint(
    init: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], where: str
) -> None:
    out = {"init": init, "inside": init / "ft", "parent": tmp_path}[where]
    before = snapshot(tmp_path)
    assert main(["finetune", "nlvr2", "--init", str(init), "--out", str(out), "--overwrite", *FT]) == 2
    line = one_line_error(capsys, "finetune")
    assert "--out" in line and str(init) in line
    assert snapshot(tmp_path) == before


def test_finetune_replaces_an_existing_out_only_with_overwrite(
    init: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "ft"
    out.mkdir()
    (out / "notes.txt").write_bytes(b"mine\n")
    before = snapshot(tmp_path)
    assert main(["finetune", "nlvr2", "--init", str(init), "--out", str(out), *FT]) == 2
    assert "--overwrite" in one_line_error(capsys, "finetune")
    assert snapshot(tmp_path) == before
    # a folder that holds no model is someone else's: not replaced even with --overwrite
    assert main(["finetune", "nlvr2", "--init", str(init), "--out", str(out), "--overwrite", *FT]) == 2
    assert "holds no model" in one_line_error(capsys, "finetune")
    assert snapshot(tmp_path) == before
    (out / "config.json").write_bytes(b"{}\n")  # an earlier output: replaced with --overwrite
    assert main(["finetune", "nlvr2", "--init", str(init), "--out", str(out), "--overwrite", *FT]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "metrics.json", "model.safetensors",
                                                     "train_log.json"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ft", "init"]  # no temp or .old folder left


def test_a_locked_finetune_out_fails_at_once(init: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "ft"
    out.mkdir()
    with RunLock(out):
        assert main(["finetune", "nlvr2", "--init", str(init), "--out", str(out), *FT]) == 1
    assert "another vlmerge process is writing this fine-tuning output folder" in one_line_error(capsys, "finetune")
    assert list(out.iterdir()) == []


@pytest.mark.parametrize("existing", [False, True])
def test_a_finetune_that_runs_out_of_disk_leaves_out_as_it_was(
    init: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, existing: bool
) -> None:
    out = tmp_path / "ft"
    if existing:  # a previous output, to be replaced: kept whole when the new one cannot be written
        out.mkdir()
        (out / "metrics.json").write_bytes(b"{}\n")
        (out / "config.json").write_bytes(b"{}\n")
    before = snapshot(tmp_path)
    monkeypatch.setattr(api, "atomic_write_json", _no_space)  # the model is written, metrics.json is not
    assert main(["finetune", "nlvr2", "--init", str(init), "--out", str(out), "--overwrite", *FT]) == 1
    assert "no space left on device" in one_line_error(capsys, "finetune")
    assert snapshot(tmp_path) == before  # nothing half-made, no temp folder, no empty ft/
