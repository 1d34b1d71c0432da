"""Shared fixtures: one short VL pre-training of a micro MSA (32-px images) for every fine-tuning test."""

from __future__ import annotations

from pathlib import Path

import pytest

from vlmerge.pretrain import load_config, pretrain

# The micro preset (2 layers, width 32) at 32 px with 8-px patches (16 patches), the top layer a VL layer.
PRETRAIN = ["model.preset=micro", "model.arch=msa", "model.overrides={image_size: 32, num_vl_layers: 1}",
            "recipe.name=scratch", "train.steps=150", "train.batch_size=32", "optim.lr=1e-3",
            "optim.warmup_steps=10", "augment.num_ops=0", "data.train_images=400", "data.eval_images=50",
            "train.log_every=50", "train.ckpt_every=1000", "train.device=cpu"]


@pytest.fixture(scope="session")
def pretrained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A pre-trained micro MSA checkpoint (ITC + ITM + MLM heads, the world tokenizer)."""
    out = tmp_path_factory.mktemp("pretrain") / "run"
    return pretrain(load_config(None, PRETRAIN), out, progress=False)
