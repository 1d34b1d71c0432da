"""Shared fixtures of the fuzz suite: micro checkpoints built once per session, copied per test, and the
assertions every bad-input case makes (exit code, one line naming the culprit, inputs byte-identical,
nothing left behind)."""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from vlmerge.cli import main
from vlmerge.models import VLMo, preset_config, save_model


@dataclass
class Result:
    rc: int
    err: str  # stderr

    @property
    def lines(self) -> list[str]:
        return [line for line in self.err.splitlines() if line.strip()]


def snapshot(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` (relative name -> bytes), hidden ones included."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="session")
def micro_ckpts(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``msa``: a micro MSA checkpoint; ``base``: its seed weights (every expert copy equal: W0)."""
    root = tmp_path_factory.mktemp("fuzz-ckpts")
    torch.manual_seed(0)
    cfg = preset_config("micro", "msa", vocab_size=40)
    base = VLMo(cfg)  # tied_init: the modality copies start equal
    save_model(base, root / "base")
    model = VLMo(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    save_model(model, root / "msa")
    return root


@pytest.fixture()
def work(micro_ckpts: Path, tmp_path: Path) -> Path:
    """A private copy of the micro checkpoints in ``tmp_path`` (tests may corrupt them)."""
    for name in ("msa", "base"):
        shutil.copytree(micro_ckpts / name, tmp_path / name)
    return tmp_path


@pytest.fixture()
def cli(capsys: pytest.CaptureFixture[str]) -> Callable[..., Result]:
    def run(*argv: str | Path) -> Result:
        capsys.readouterr()
        rc = main([str(a) for a in argv])
        return Result(rc, capsys.readouterr().err)

    return run


def refused(res: Result, code: int, *names: str) -> None:
    """The command failed with ``code`` and one stderr line naming every one of ``names``; no traceback."""
    assert res.rc == code, res.err
    assert len(res.lines) == 1, res.err
    assert "Traceback" not in res.err
    for n in names:
        assert n in res.lines[0], (n, res.lines[0])


def leftovers(root: Path, allowed: Iterable[str]) -> list[str]:
    """Entries of ``root`` (recursively, names relative) that are not under one of ``allowed``."""
    keep = tuple(allowed)
    return sorted(str(p.relative_to(root)) for p in root.rglob("*")
                  if not str(p.relative_to(root)).split("/")[0] in keep)
