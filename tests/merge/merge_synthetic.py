"""Synthetic MSA-style checkpoints built from the param-role names (no model needed). A plain module (not
conftest) so test files can import it under a name no other test folder uses."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

from vlmerge.models.checkpoint import (
    CONFIG_NAME,
    FORMAT,
    WEIGHTS_NAME,
    atomic_write_json,
)
from vlmerge.models.roles import block_param_name

D, H, DEPTH, M = 8, 16, 3, 1

SLOT_SHAPES: dict[tuple[str, str], tuple[int, ...]] = {
    ("norm1", "weight"): (D,), ("norm1", "bias"): (D,),
    ("attn", "qkv.weight"): (3 * D, D), ("attn", "qkv.bias"): (3 * D,),
    ("attn", "proj.weight"): (D, D), ("attn", "proj.bias"): (D,),
    ("norm2", "weight"): (D,), ("norm2", "bias"): (D,),
    ("mlp", "fc1.weight"): (H, D), ("mlp", "fc1.bias"): (H,),
    ("mlp", "fc2.weight"): (D, H), ("mlp", "fc2.bias"): (D,),
}


def msa_state_dict(seed: int = 0, depth: int = DEPTH, m: int = M, shared_modules: tuple[str, ...] = (),
                   spread: float = 0.1,
                   base: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """Block weights for v/l (+ vl in the top ``m`` layers) experts, ``shared`` for ``shared_modules``,
    plus non-mergeable embeddings / final norm / head. With ``base``, experts are base + noise·spread."""
    g = torch.Generator().manual_seed(seed)
    sd: dict[str, torch.Tensor] = {
        "word_embed.weight": torch.randn(20, D, generator=g),
        "norm.weight": torch.ones(D),
        "heads.itc.image_proj.weight": torch.randn(D, D, generator=g),
        "step": torch.tensor([7], dtype=torch.int64),
    }
    for layer in range(depth):
        mods = ("v", "l", "vl") if layer >= depth - m else ("v", "l")
        for (module, suffix), shape in SLOT_SHAPES.items():
            experts = ("shared",) if module in shared_modules else mods
            for e in experts:
                name = block_param_name(layer, module, e, suffix)
                if base is not None:
                    src = name if name in base else block_param_name(layer, module, "v", suffix)
                    sd[name] = base[src] + spread * torch.randn(shape, generator=g)
                else:
                    sd[name] = torch.randn(shape, generator=g)
    return sd


def write(tmp: Path, name: str, sd: dict[str, torch.Tensor], arch: str = "msa") -> Path:
    """A checkpoint folder, written with safetensors' own ``save_file``: unlike ``save_checkpoint`` it
    accepts NaN / Inf, so tests can check that merges catch them."""
    (tmp / name).mkdir()
    save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp / name / WEIGHTS_NAME), {"format": "pt"})
    atomic_write_json(tmp / name / CONFIG_NAME, {"format": FORMAT, "model": {"arch": arch, "depth": DEPTH,
                                                                             "num_vl_layers": M}})
    return tmp / name
