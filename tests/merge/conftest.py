"""Fixtures for the merge tests: synthetic MSA checkpoints (see merge_synthetic)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from merge_synthetic import msa_state_dict, write


@pytest.fixture()
def msa_pair(tmp_path: Path) -> tuple[Path, Path, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(input dir, base dir, input state dict, base state dict): a base with equal modality copies."""
    seedsd = msa_state_dict(seed=1)
    base = dict(seedsd)
    for k in list(base):  # every modality copy starts from the v copy (the seed recipe)
        if ".l." in k or ".vl." in k:
            base[k] = seedsd[k.replace(".l.", ".v.").replace(".vl.", ".v.")].clone()
    sd = msa_state_dict(seed=2, base=base)
    for k in ("word_embed.weight", "norm.weight", "heads.itc.image_proj.weight"):
        sd[k] = seedsd[k].clone()
    return write(tmp_path, "msa", sd), write(tmp_path, "base", base), sd, base
