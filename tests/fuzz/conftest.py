"""Fixtures of the fuzz suite: micro checkpoints built once per session and copied per test, and ``cli``,
which runs ``vlmerge.cli.main`` and returns its exit code and stderr."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from fuzz_helpers import Result

from vlmerge.cli import main
from vlmerge.models import VLMo, preset_config, save_model


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
