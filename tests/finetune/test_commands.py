"""``vlmerge finetune`` / ``vlmerge eval`` end to end through their argparse registration."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from vlmerge.finetune import commands


def run(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="vlmerge")
    commands.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


def test_finetune_then_eval(pretrained: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "nlvr2"
    cfg = tmp_path / "my.yaml"
    cfg.write_text("max_steps: 3\nbatch_size: 8\ndata: {train_size: 16, eval_size: 12}\n")
    assert run(["finetune", "nlvr2", "--init", str(pretrained), "--out", str(out), "--config", str(cfg),
                "--set", "lr=2e-4"]) == 0
    table = capsys.readouterr().out
    assert "nlvr2 on test (baseline: majority label)" in table and "accuracy" in table
    saved = json.loads((out / "config.json").read_text())["finetune"]["config"]
    assert saved["lr"] == 2e-4 and saved["max_steps"] == 3 and saved["preset"] == "micro"

    assert run(["eval", "nlvr2", str(out), "--split", "ood", "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["split"] == "ood" and printed["n"] == 12
    assert json.loads((out / "eval" / "nlvr2-ood.json").read_text()) == printed

    dest = tmp_path / "zs.json"
    assert run(["eval", "retrieval", str(pretrained), "--set", "data.eval_size=10", "--rerank-k", "3",
                "--out", str(dest)]) == 0
    text = capsys.readouterr().out
    assert "avg_tr" in text and "rerank.tr_r1" in text and f"wrote {dest}" in text
    assert json.loads(dest.read_text())["rerank"]["k"] == 3


def test_cli_errors_name_the_key(pretrained: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"epoch: unknown key; allowed keys"):
        run(["finetune", "vqa", "--init", str(pretrained), "--out", str(tmp_path / "o"), "--set", "epoch=3"])
    with pytest.raises(ValueError, match=r"data.root"):
        run(["eval", "cls", str(pretrained), "--data-format", "imagefolder"])
    with pytest.raises(SystemExit):
        run(["finetune", "itm", "--init", str(pretrained), "--out", str(tmp_path / "o")])  # evaluation-only task
