"""Layer-wise interpolation coefficients learned on data (``vlmerge merge --alpha-schedule learned``).

Interpolation (merging paper §4.1) merges layer i as ``W_i(α_i) = α_i W_i^v + (1 − α_i) W_i^l`` (and
``(1 − r)·W_i(α_i) + r·W_i^vl`` in the top layers, r = ``vl_ratio``). Instead of one global α, this module learns
one α_i per layer by gradient descent *through the merge*: the merged model's forward is a differentiable function
of α (``torch.func.functional_call`` on the merged architecture with the α-combined weights), and α_i =
sigmoid(z_i) stays in [0, 1]. Objectives, each over batches of image-caption pairs (the paired captions are used
only by ``supervised``):

* ``supervised``: the symmetric image-text contrastive loss (InfoNCE with the model's own temperature) of the
  merged model on a validation split, the differentiable surrogate of its zero-shot retrieval score.
* ``entropy`` (AdaMerging, Yang et al. ICLR 2024, for retrieval): the mean Shannon entropy of each image's
  softmax over the batch's captions and of each caption's over the images, minimised without using which caption
  belongs to which image.

Any other ``loss_fn(model_outputs, batch) -> scalar`` can be given (the tests plant a known optimum this way).
Deterministic: the same checkpoint, batches, seed and settings give the same schedule on the same machine.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..models.roles import merge_groups

OBJECTIVES = ("supervised", "entropy")


class _Objective(nn.Module):
    """``forward(model, batch)`` as a module holding ``model``, so that ``torch.func.functional_call`` can run it
    with the α-merged weights in place of ``model``'s."""

    def __init__(self, model: nn.Module, forward: Callable[[nn.Module, Any], tuple[torch.Tensor, ...]]) -> None:
        super().__init__()
        self.model = model
        self.fn = forward

    def forward(self, batch: Any) -> tuple[torch.Tensor, ...]:
        return self.fn(self.model, batch)


def itc_outputs(model: nn.Module, batch: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(image embeddings [B, P], caption embeddings [B, P], logit scale) of ``model`` on ``batch``."""
    from .grams import unpack_batch

    image, ids, mask = unpack_batch(batch)
    m: Any = model
    return m.encode_image(image), m.encode_text(ids, mask), m.heads["itc"].logit_scale


def contrastive_loss(out: tuple[torch.Tensor, ...], batch: Any) -> torch.Tensor:
    """Symmetric InfoNCE of paired (image i, caption i): the ``supervised`` objective."""
    img, txt, scale = out
    logits = scale.exp() * img @ txt.t()
    target = torch.arange(len(img), device=img.device)
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target)) / 2


def entropy_loss(out: tuple[torch.Tensor, ...], batch: Any) -> torch.Tensor:
    """Mean entropy of the image→caption and caption→image softmaxes: the ``entropy`` objective (no labels)."""
    img, txt, scale = out
    logits = scale.exp() * img @ txt.t()
    ent = [-(F.softmax(x, dim=-1) * F.log_softmax(x, dim=-1)).sum(-1).mean() for x in (logits, logits.t())]
    return (ent[0] + ent[1]) / 2


LOSSES: dict[str, Callable[[tuple[torch.Tensor, ...], Any], torch.Tensor]] = {
    "supervised": contrastive_loss, "entropy": entropy_loss}


def _merged_params(sd: Mapping[str, torch.Tensor], alpha: torch.Tensor, vl_ratio: float
                   ) -> dict[str, torch.Tensor]:
    """The interpolation-merged state dict as a differentiable function of the per-layer ``alpha`` [N]."""
    out: dict[str, torch.Tensor] = {}
    grouped: set[str] = set()
    for g in merge_groups(sd):
        by = {m: sd[k] for m, k in g.sources.items()}
        grouped |= set(g.sources.values())
        a = alpha[g.layer]
        w = by["l"] + a * (by["v"] - by["l"])
        if "vl" in by:
            w = (1.0 - vl_ratio) * w + vl_ratio * by["vl"]
        out[g.target] = w
    out |= {k: v for k, v in sd.items() if k not in grouped}
    return out


def learn_alpha_schedule(
    model: nn.Module,
    batches: Sequence[Any],
    objective: str | Callable[[tuple[torch.Tensor, ...], Any], torch.Tensor] = "supervised",
    *,
    steps: int = 30,
    lr: float = 0.1,
    init: float = 0.5,
    vl_ratio: float = 1 / 3,
    forward: Callable[[nn.Module, Any], tuple[torch.Tensor, ...]] | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Learn one interpolation α per layer of ``model`` (a modality-specific VLMo) on ``batches``.

    Full-batch Adam on z (α = sigmoid(z), z₀ = logit(``init``)) for ``steps`` steps over all ``batches`` each step.
    ``forward(merged_model, batch)`` gives the objective's inputs (default: ITC embeddings and the logit scale).
    Returns ``{"alpha": [α_0, ..., α_{N−1}], "objective", "loss_before", "loss_after", "loss_at_init_alpha",
    "steps", "lr", "init", "history": [loss per step]}``; ``alpha`` feeds ``merge --alpha-schedule``.
    """
    from tqdm.auto import tqdm

    from ..models import VLMo

    if not 0.0 < init < 1.0:
        raise ValueError(f"learned alpha: init {init} must be in (0, 1) (α = sigmoid(z) never reaches 0 or 1)")
    if steps < 1 or not (math.isfinite(lr) and lr > 0):
        raise ValueError(f"learned alpha: steps ≥ 1 and lr > 0 expected, got steps={steps}, lr={lr}")
    if not batches:
        raise ValueError("learned alpha: no batches")
    loss_fn = LOSSES[objective] if isinstance(objective, str) else objective
    if isinstance(objective, str) and objective not in LOSSES:
        raise ValueError(f"unknown objective {objective!r}; expected one of {OBJECTIVES}")
    cfg = model.config  # type: ignore[attr-defined]
    if not merge_groups(dict(model.named_parameters())):
        raise ValueError("learned alpha: the model has no modality copies to merge")
    if forward is None and "itc" not in cfg.heads:
        raise ValueError("learned alpha: the objectives need the model's 'itc' head (contrastive projections)")
    sd = {k: v.detach() for k, v in model.state_dict().items()}
    with torch.device("meta"):  # the merged architecture only: its weights come from the α-combination
        merged = VLMo(cfg.replace(arch="maa", merged_layers=()))
    net = _Objective(merged.eval(), forward or itc_outputs)

    def total(z: torch.Tensor) -> torch.Tensor:
        params = {f"model.{k}": v for k, v in _merged_params(sd, torch.sigmoid(z), vl_ratio).items()}
        losses = [loss_fn(torch.func.functional_call(net, params, (b,)), b) for b in batches]
        return torch.stack(losses).mean()

    z = torch.full((cfg.depth,), math.log(init / (1 - init)), dtype=torch.float32, requires_grad=True)
    opt = torch.optim.Adam([z], lr=lr)
    history = []
    with torch.no_grad():
        before = float(total(z))
    for _ in tqdm(range(steps), disable=not progress, desc="learn α", unit="step"):
        opt.zero_grad()
        loss = total(z)
        loss.backward()
        opt.step()
        history.append(float(loss.detach()))
    with torch.no_grad():
        after = float(total(z))
    alpha = [round(float(a), 6) for a in torch.sigmoid(z.detach())]
    return {"alpha": alpha, "objective": objective if isinstance(objective, str) else "custom",
            "loss_at_init_alpha": before, "loss_after": after, "steps": steps, "lr": lr, "init": init,
            "history": history}


def world_split_batches(model: nn.Module, batches: int, seed: int = 0, split: str = "val",
                        batch_size: int = 32) -> list[dict[str, Any]]:
    """``batches`` image-caption batches of the embedded world's ``split`` (default: its validation split)."""
    from .gram_data import world_batches

    return list(world_batches(model, batches, seed, batch_size=batch_size, split=split))


def check_objective(name: str) -> str:
    if name not in OBJECTIVES:
        raise ValueError(f"--learn-objective {name!r}: expected one of {', '.join(OBJECTIVES)}")
    return name


__all__ = ["LOSSES", "OBJECTIVES", "check_objective", "contrastive_loss", "entropy_loss", "itc_outputs",
           "learn_alpha_schedule", "world_split_batches"]
