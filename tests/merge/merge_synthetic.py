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
from vlmerge.models.vlmo import ARCHS, ModelConfig, param_shapes

D, H, DEPTH, M = 8, 16, 3, 1

SLOT_SHAPES: dict[tuple[str, str], tuple[int, ...]] = {
    ("norm1", "weight"): (D,), ("norm1", "bias"): (D,),
    ("attn", "qkv.weight"): (3 * D, D), ("attn", "qkv.bias"): (3 * D,),
    ("attn", "proj.weight"): (D, D), ("attn", "proj.bias"): (D,),
    ("norm2", "weight"): (D,), ("norm2", "bias"): (D,),
    ("mlp", "fc1.weight"): (H, D), ("mlp", "fc1.bias"): (H,),
    ("mlp", "fc2.weight"): (D, H), ("mlp", "fc2.bias"): (D,),
}


def model_config(arch: str = "msa", depth: int = DEPTH, m: int = M) -> ModelConfig:
    """The real architecture whose state dict :func:`msa_state_dict` fills (width D, hidden H)."""
    return ModelConfig(arch=arch, embed_dim=D, mlp_ratio=H / D, num_heads=2, depth=depth, num_vl_layers=m,
                       vocab_size=20, image_size=8, patch_size=4, max_text_len=8)


def msa_state_dict(seed: int = 0, depth: int = DEPTH, m: int = M, shared_modules: tuple[str, ...] = (),
                   spread: float = 0.1,
                   base: dict[str, torch.Tensor] | None = None,
                   int_buffer: bool = False) -> dict[str, torch.Tensor]:
    """Block weights for v/l (+ vl in the top ``m`` layers) experts, ``shared`` for ``shared_modules``,
    plus non-mergeable embeddings / final norm / heads: every key of the real architecture
    (:func:`model_config`). With ``base``, experts are base + noise·spread. ``int_buffer`` adds an integer
    ``step`` tensor, which no VLMo has: such a state dict is a plain (non-vlmerge) checkpoint."""
    g = torch.Generator().manual_seed(seed)
    sd: dict[str, torch.Tensor] = {
        "word_embed.weight": torch.randn(20, D, generator=g),
        "norm.weight": torch.ones(D),
        "heads.itc.image_proj.weight": torch.randn(D, D, generator=g),
    }
    if int_buffer:
        sd["step"] = torch.tensor([7], dtype=torch.int64)
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
    arch = next((a for a, mods in ARCHS.items() if set(mods) == {"norm1", "attn", "norm2", "mlp"} - set(
        shared_modules)), "msa")
    for k, shape in param_shapes(model_config(arch, depth, m)).items():
        if k not in sd and not k.startswith("blocks."):  # drawn after the blocks: their values are unchanged
            sd[k] = torch.randn(shape, generator=g)
    return sd


def write(tmp: Path, name: str, sd: dict[str, torch.Tensor], arch: str = "msa", plain: bool = False) -> Path:
    """A checkpoint folder, written with safetensors' own ``save_file``: unlike ``save_checkpoint`` it
    accepts NaN / Inf, so tests can check that merges catch them. Its config.json holds the real model
    config of ``arch`` (:func:`model_config`), or with ``plain`` no model at all (like a Hugging Face
    folder: checked by keys, shapes and dtypes only)."""
    (tmp / name).mkdir()
    save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp / name / WEIGHTS_NAME), {"format": "pt"})
    config = {"format": FORMAT} if plain else {"format": FORMAT, "model": model_config(arch).to_dict()}
    atomic_write_json(tmp / name / CONFIG_NAME, config)
    return tmp / name
