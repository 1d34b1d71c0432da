"""``render_preview`` and the ``vlmerge data`` subcommands."""

from __future__ import annotations

import argparse

import matplotlib.image
import numpy as np
import pytest

from vlmerge.data import CachedWorld, World, WorldConfig
from vlmerge.data.commands import register
from vlmerge.data.preview import render_preview


def run(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="vlmerge")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


def test_preview_writes_a_png_atomically(tmp_path) -> None:
    out = render_preview(tmp_path / "p.png", n=3, image_size=32, split="ood")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    pixels = matplotlib.image.imread(out)
    assert pixels.ndim == 3 and pixels.shape[0] > 100 and pixels.shape[1] > 200
    assert [p.name for p in tmp_path.iterdir()] == ["p.png"]  # no temporary file left behind
    with pytest.raises(ValueError, match="n=0 is invalid"):
        render_preview(tmp_path / "q.png", n=0)


def test_cli_preview_and_cache(tmp_path, capsys) -> None:
    assert run(["data", "preview", "--out", str(tmp_path / "grid.png"), "--n", "2"]) == 0
    assert (tmp_path / "grid.png").read_bytes()[:4] == b"\x89PNG"
    assert "grid.png" in capsys.readouterr().out
    argv = ["data", "cache", "--split", "val", "--n", "12", "--out", str(tmp_path / "c"),
            "--image-size", "16", "--shard-size", "5", "--kind", "nlvr2"]
    assert run(argv) == 0
    cached, world = CachedWorld(tmp_path / "c"), World(WorldConfig(image_size=16), "val")
    assert (len(cached), cached.kind) == (12, "nlvr2")
    assert np.array_equal(cached.nlvr2(11).right.image, world.nlvr2(11).right.image)


@pytest.mark.parametrize("argv", [["data", "--help"], ["data", "preview", "--help"],
                                  ["data", "cache", "--help"]])
def test_cli_help(argv: list[str], capsys) -> None:
    with pytest.raises(SystemExit) as exit_:
        run(argv)
    assert exit_.value.code == 0
    assert "usage: vlmerge data" in capsys.readouterr().out
