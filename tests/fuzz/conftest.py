"""The fuzz suite: every command run through the real CLI (``vlmerge.cli.main``) on bad inputs, asserting the
exit code, one stderr line naming the culprit, inputs byte-identical and nothing left behind.

Where each class of bad input is tested:
  data destroyed (output vs inputs, --save-grams, eval --out)  test_merge_inputs, test_finetune_inputs
  broken or wrong models (config, keys, shapes, dtypes, overflow)  test_merge_inputs, test_model_config_inputs,
                                                                   test_distance_inputs
  paths out of the checkpoint (shards, latest.json, tokenizer)     test_merge_inputs, test_pretrain_inputs,
                                                                   test_tokenizer_inputs
  tracebacks and unclear messages (configs, --set, --param, pickles, counts, OSError)
                                                                   test_cli_inputs, test_model_config_inputs,
                                                                   test_checkpoint_extras_inputs, test_grams_inputs,
                                                                   test_pretrain_inputs
  leftovers and races (temps, locks, umask, --only, alpha: true)   test_merge_inputs, test_pretrain_inputs,
                                                                   test_study_inputs, test_finetune_inputs

This conftest builds micro checkpoints once per session (copied per test) and ``cli``, which runs the CLI
and returns its exit code and stderr.
"""

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
