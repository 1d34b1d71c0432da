"""``vlmerge study`` refuses bad flags with one line before its ``--out`` exists, and one study at a time
writes a study folder."""

from __future__ import annotations

from pathlib import Path

import pytest

from vlmerge.cli import main
from vlmerge.files import RunLock
from vlmerge.study.runner import PARTS, run_study


def one_line_error(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("vlmerge study: error: "), err
    return lines[0]


@pytest.mark.parametrize("only", [",", "", " , ", "table9", "table1,tabel2"])
def test_only_without_a_known_part_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str], only: str) -> None:
    out = tmp_path / "study"
    assert main(["study", "--preset", "micro", "--out", str(out), "--only", only]) == 2
    line = one_line_error(capsys)
    assert "--only" in line and ", ".join(PARTS) in line
    assert not out.exists()


def test_run_study_refuses_an_empty_part_list(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="--only: no parts given; expected some of table1"):
        run_study("micro", tmp_path / "study", only=[])
    assert not (tmp_path / "study").exists()


@pytest.mark.parametrize("argv", [
    ["study", "unival", "--preset", "micro", "--only", ""],  # --only is the merging study's
    ["study", "unival", "--preset", "micro", "--set", "nosuchkey=1"],
    ["study", "unival", "--preset", "micro", "--seeds", "-1"],
    ["study", "--preset", "micro", "--set", "steps=0"],
    ["study", "--preset", "nosuch"],
    ["study", "--preset", "micro", "--seeds", "0,0"],
    ["study", "--preset", "micro", "--seeds", str(2**70)],  # once overflowed inside torch.manual_seed
    ["study", "--preset", "micro", "--seeds", "-1"],
    # once refused only after every pre-training cell had run, or left an empty --out behind
    ["study", "--preset", "micro", "--set", "finetune_set={vqa: [lr=abc]}"],
    ["study", "--preset", "micro", "--set", "finetune_set={nosuchtask: [lr=0.1]}"],
    ["study", "--preset", "micro", "--set", "pretrain_set=[optim.lr=abc]"],
    ["study", "--preset", "micro", "--set", "pretrain=nosuch.yaml"],
])
def test_bad_flags_are_refused_before_out_exists(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str]
) -> None:
    out = tmp_path / "study"
    assert main([*argv, "--out", str(out)]) == 2
    one_line_error(capsys)
    assert not out.exists()


@pytest.mark.parametrize("experiment", [[], ["unival"]])
def test_a_second_study_on_a_locked_folder_fails_at_once(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], experiment: list[str]
) -> None:
    out = tmp_path / "study"
    (out / "cells").mkdir(parents=True)  # a study folder another process is running in
    (out / "notes.txt").write_bytes(b"mine\n")
    with RunLock(out):
        assert main(["study", *experiment, "--preset", "micro", "--out", str(out), "--no-progress"]) == 1
    assert "another vlmerge process is writing this study folder" in one_line_error(capsys)
    assert sorted(p.name for p in out.iterdir()) == ["cells", "notes.txt"]
    assert (out / "notes.txt").read_bytes() == b"mine\n"
