"""Building a task model from a pre-trained (or merged, or fine-tuned) checkpoint, and choosing which of its
weights a fine-tune may change.

* :func:`build_task_model` adds the task's head to the checkpoint's config, loads the backbone with a
  strict-except-new-heads rule (any other missing, unexpected or mis-shaped key is an error), and resizes
  the image position table when fine-tuning at another resolution (VQA at 480², NLVR2 / retrieval at
  384² from a 224² pre-training; VLMo supp. B.2-B.3).
* :func:`trainable_names` implements the scopes: ``vision`` trains only the vision encoder (merging paper
  §6.5: "for modality-specific architectures, we only fine-tune the vision encoder to the vision tasks").
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ..models import CheckpointError, CheckpointReader, ModelConfig, VLMo, load_model_config, parse_param_name
from ..models.checkpoint import check_finite, read_json


def resize_image_pos_embed(pos: torch.Tensor, num_patches: int) -> torch.Tensor:
    """[1, 1 + P, D] -> [1, 1 + P', D]: the [I_CLS] row kept, the √P × √P grid resized bicubically (ViT/BEiT
    fine-tuning at a higher resolution)."""
    old = pos.shape[1] - 1
    g_old, g_new = math.isqrt(old), math.isqrt(num_patches)
    if g_old**2 != old or g_new**2 != num_patches:
        raise ValueError(f"position tables must be square grids, got {old} -> {num_patches} patches")
    if old == num_patches:
        return pos
    cls, grid = pos[:, :1], pos[:, 1:]
    d = pos.shape[-1]
    grid = grid.reshape(1, g_old, g_old, d).permute(0, 3, 1, 2).float()
    grid = F.interpolate(grid, size=(g_new, g_new), mode="bicubic", align_corners=False)
    grid = grid.permute(0, 2, 3, 1).reshape(1, g_new * g_new, d).to(pos.dtype)
    return torch.cat([cls, grid], dim=1)


def checkpoint_extras(ckpt_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """Everything in ``config.json`` besides the model config (``preset``, ``tokenizer``, ``finetune`` ...)."""
    cfg = read_json(Path(ckpt_dir) / "config.json")
    return {k: v for k, v in cfg.items() if k not in ("model", "format")}


def _source(init: str | os.PathLike[str] | VLMo) -> tuple[ModelConfig, Mapping[str, torch.Tensor], str]:
    if isinstance(init, VLMo):
        return init.config, {k: v.detach().cpu() for k, v in init.state_dict().items()}, "given model"
    config = load_model_config(init)
    with CheckpointReader(init) as reader:
        state = reader.state_dict()
    check_finite(state, str(init))
    return config, state, str(init)


def build_task_model(
    init: str | os.PathLike[str] | VLMo,
    heads: Iterable[str],
    image_size: int | None = None,
    **head_sizes: int,
) -> VLMo:
    """The checkpoint's model with ``heads`` added (sizes from ``head_sizes``: ``num_answers``,
    ``num_classes``, ``num_seg_classes``) and, if ``image_size`` differs, its position table resized.

    Only keys under ``heads.{new head}.`` may be missing from the checkpoint; an unexpected key, any other
    missing key, or a shape mismatch raises :class:`CheckpointError` naming it. Heads the checkpoint already
    has keep their weights and must have the requested size.
    """
    base, state, source = _source(init)
    heads = tuple(heads)
    new_heads = tuple(h for h in heads if h not in base.heads)
    for k, v in head_sizes.items():
        old = getattr(base, k)
        kept = {"num_answers": "vqa", "num_classes": "cls", "num_seg_classes": "seg"}[k]
        if kept in base.heads and old != v:
            raise CheckpointError(
                f"{source}: its {kept!r} head has {k}={old}, the task data needs {v}; fine-tune from a checkpoint "
                f"without that head, or evaluate on data with the same label set"
            )
    config = base.replace(heads=base.heads + new_heads, image_size=image_size or base.image_size, **head_sizes)
    model = VLMo(config)
    expected = model.state_dict()
    state = dict(state)
    if "image_pos_embed" in state and config.image_size != base.image_size:
        state["image_pos_embed"] = resize_image_pos_embed(state["image_pos_embed"], config.num_patches)
    missing = sorted(set(expected) - set(state))
    bad_missing = [k for k in missing if parse_param_name(k).head not in new_heads]
    unexpected = sorted(set(state) - set(expected))
    wrong = [f"{k}: checkpoint {list(state[k].shape)}, model {list(expected[k].shape)}"
             for k in sorted(set(state) & set(expected)) if state[k].shape != expected[k].shape]
    problems = []
    if bad_missing:
        problems.append(f"missing non-head keys ({len(bad_missing)}): {', '.join(bad_missing[:8])}")
    if unexpected:
        problems.append(f"unexpected keys ({len(unexpected)}): {', '.join(unexpected[:8])}")
    if wrong:
        problems.append(f"shape mismatches ({len(wrong)}): {'; '.join(wrong[:8])}")
    if problems:
        raise CheckpointError(f"{source}: " + " | ".join(problems))
    model.load_state_dict(state, strict=False)  # only the new heads' keys are missing: they keep their init
    return model


# ------------------------------------------------------------------------------------------------- scopes
def has_modality_experts(model: VLMo) -> bool:
    """True when some block weight is modality-specific (every arch but ``maa`` / a merged model)."""
    return any(parse_param_name(n).mergeable for n, _ in model.named_parameters())


def is_vision_encoder(name: str) -> bool:
    """A weight of the vision encoder: vision embeddings or a block weight of the ``v`` / ``shared`` expert.

    The final LayerNorm and the type embedding are shared with the text route and stay frozen under the
    vision scope, so a modality-specific model's language route is unchanged bit for bit (its task heads
    carry their own LayerNorm).
    """
    role = parse_param_name(name)
    if role.kind == "embed":
        return role.expert == "v"
    return role.kind == "block" and role.expert in ("v", "shared")


def resolve_scope(scope: str, vision_task: bool, model: VLMo) -> str:
    """``auto`` -> ``vision`` for a vision task on a model with modality experts, else ``all``."""
    if scope == "auto":
        return "vision" if vision_task and has_modality_experts(model) else "all"
    return scope


def trainable_names(model: VLMo, scope: str, task_heads: Iterable[str]) -> set[str]:
    """Parameters a fine-tune may update under ``scope`` (``all`` | ``vision``).

    ``all``: the backbone and the task heads; ``vision``: the vision encoder (:func:`is_vision_encoder`) and
    the task heads. Heads other than ``task_heads`` are never trained (a VQA fine-tune leaves the ITC / ITM
    heads as pre-trained). The training loop further freezes any of these the task's loss does not reach,
    so weight decay cannot drift unused weights.
    """
    if scope not in ("all", "vision"):
        raise ValueError(f"scope={scope!r} is invalid; allowed values: ['all', 'vision'] (or 'auto')")
    out = set()
    for name, _ in model.named_parameters():
        role = parse_param_name(name)
        if role.kind == "head":
            if role.head in task_heads:
                out.add(name)
        elif scope == "all" or is_vision_encoder(name):
            out.add(name)
    return out
