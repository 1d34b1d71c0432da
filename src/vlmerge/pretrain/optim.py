"""AdamW with BEiT/VLMo weight-decay groups and the warm-up + decay learning-rate schedule (VLMo §4.1, B.1).

VLMo: AdamW, β = (0.9, 0.98), weight decay 0.01, linear warm-up over 2.5k steps then linear decay, peak
2e-4 (base). Weight decay applies to matrices only; biases, LayerNorms, embeddings, [CLS], position
embeddings and the ITC temperature are not decayed (BEiT's ``no_weight_decay`` list).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..models.roles import parse_param_name


def decays(name: str, param: torch.Tensor) -> bool:
    """Whether ``name`` gets weight decay: ≥ 2-D weights that are not embedding tables, positions or [CLS]
    (the role map's ``part``); never ``logit_scale``."""
    role = parse_param_name(name)
    table = role.kind == "embed" and role.part in ("table", "position", "cls")
    return param.ndim >= 2 and not table and not name.endswith("logit_scale")


def build_optimizer(
    model: nn.Module, lr: float, weight_decay: float, betas: tuple[float, float], eps: float
) -> torch.optim.AdamW:
    """AdamW over the trainable parameters (``requires_grad``) in two groups: decayed and not decayed.

    Groups keep their parameter names (``group["param_names"]``) so the training state can be saved by name.
    Fused kernels on CUDA; the default (foreach) implementation on CPU, which is bitwise reproducible.
    """
    groups: dict[bool, dict[str, list]] = {d: {"params": [], "param_names": []} for d in (True, False)}
    for name, p in model.named_parameters():
        if p.requires_grad:
            groups[decays(name, p)]["params"].append(p)
            groups[decays(name, p)]["param_names"].append(name)
    param_groups = [
        {**groups[True], "weight_decay": weight_decay},
        {**groups[False], "weight_decay": 0.0},
    ]
    param_groups = [g for g in param_groups if g["params"]]
    if not param_groups:
        raise ValueError("no trainable parameters: every parameter is frozen in this stage")
    fused = next(model.parameters()).is_cuda
    return torch.optim.AdamW(param_groups, lr=lr, betas=betas, eps=eps, fused=fused or None)


def wsd_decay_steps(total: int, decay_frac: float) -> int:
    """Steps at the end of a ``total``-step stage over which ``wsd`` decays."""
    return max(1, round(decay_frac * total))


def lr_at(step: int, total: int, peak: float, warmup: int, schedule: str, min_ratio: float = 0.0, *,
          decay_frac: float = 0.2) -> float:
    """Learning rate for optimizer step ``step`` (0-based) of a stage of ``total`` steps.

    Linear warm-up from peak/warmup to peak over ``warmup`` steps, then

    * ``linear`` / ``cosine``: decay over the rest of the stage to ``min_ratio·peak`` at its last step;
    * ``wsd`` (warm-up, stable, decay): the peak until the stage's last ``decay_frac``
      (:func:`wsd_decay_steps`), then linear decay to ``min_ratio·peak`` at its last step. Every stage still
      ends annealed, and a shorter stage with the same warm-up is a longer one's prefix up to its decay: a
      K_seed-step seed stage is the MAA's own K-step run up to step K_seed − decay, then its own decay.
    """
    warm = (step + 1) / warmup if step < warmup else 1.0
    if schedule == "wsd":
        decay = wsd_decay_steps(total, decay_frac)
        t = min(1.0, max(0.0, (step - (total - decay) + 1) / decay))
        return peak * warm * (1.0 - (1.0 - min_ratio) * t)
    if step < warmup:
        return peak * warm
    span = max(1, total - warmup - 1)
    t = min(1.0, (step - warmup) / span)
    if schedule == "linear":
        frac = 1.0 - t
    elif schedule == "cosine":
        frac = 0.5 * (1.0 + math.cos(math.pi * t))
    else:
        raise ValueError(f"optim.schedule must be 'linear', 'cosine' or 'wsd', got {schedule!r}")
    return peak * (min_ratio + (1.0 - min_ratio) * frac)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for g in optimizer.param_groups:
        g["lr"] = lr
