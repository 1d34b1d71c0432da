"""Merge coefficients learned on data, per layer or per module (``vlmerge merge --alpha-schedule learned``,
``--lam-schedule learned``).

Interpolation (merging paper §4.1) merges layer i as ``W_i(α_i) = α_i W_i^v + (1 − α_i) W_i^l`` (and
``(1 − r)·W_i(α_i) + r·W_i^vl`` in the top layers, r = ``vl_ratio``); modality arithmetic as
``W_i = W_i^0 + λ_i Σ_m (W_i^m − W_i^0)``. Instead of one global coefficient, this module learns one per layer (or
per layer and module: norm1 / attn / norm2 / mlp) by gradient descent *through the merge*: the merged model's
forward is a differentiable function of the coefficients (``torch.func.functional_call`` on the merged
architecture with the combined weights), each sigmoid(z) in (0, 1). Objectives, each over batches of
image-caption pairs (the paired captions are used only by ``supervised``):

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

from ..models.roles import MODULES, MergeGroup, merge_groups

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
    """Symmetric InfoNCE of paired (image i, caption i): the ``supervised`` objective. Where the batch holds
    ``not_negative`` [B, B] (caption j known to be true of image i: :func:`world_split_batches`), those pairs
    are left out of both softmaxes, as pre-training's ``loss.false_negatives: exclude`` does: a caption true of
    two images is no error to rank high for either."""
    img, txt, scale = out
    logits = scale.exp() * img @ txt.t()
    target = torch.arange(len(img), device=img.device)
    mask = batch.get("not_negative") if isinstance(batch, dict) else None
    if mask is not None:
        off_diagonal = ~torch.eye(len(img), dtype=torch.bool, device=img.device)
        logits = logits.masked_fill(mask.to(img.device) & off_diagonal, float("-inf"))
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target)) / 2


def entropy_loss(out: tuple[torch.Tensor, ...], batch: Any) -> torch.Tensor:
    """Mean entropy of the image→caption and caption→image softmaxes: the ``entropy`` objective (no labels)."""
    img, txt, scale = out
    logits = scale.exp() * img @ txt.t()
    ent = [-(F.softmax(x, dim=-1) * F.log_softmax(x, dim=-1)).sum(-1).mean() for x in (logits, logits.t())]
    return (ent[0] + ent[1]) / 2


LOSSES: dict[str, Callable[[tuple[torch.Tensor, ...], Any], torch.Tensor]] = {
    "supervised": contrastive_loss, "entropy": entropy_loss}


LEARNABLE: dict[str, str] = {"interpolation": "alpha", "modality_arithmetic": "lam"}
"""The methods whose coefficient can be learned, and the name of that coefficient."""
GRANULARITIES = ("layer", "module")


def _base_weight(base: Mapping[str, torch.Tensor], g: MergeGroup) -> torch.Tensor:
    """W0 of a group's slot: the base's merged (``shared``) name, or one of its modality copies."""
    for k in (g.target, *g.sources.values()):
        if k in base:
            return base[k]
    raise ValueError(f"learned lam: the base has no weight for {g.target} (nor its copies)")


def _merged_params(sd: Mapping[str, torch.Tensor], coef: torch.Tensor, method: str, vl_ratio: float,
                   base: Mapping[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """The merged state dict as a differentiable function of the coefficients ``coef``: [N] (one per layer) or
    [N, len(MODULES)] (one per layer and module). Interpolation: ``W = α W^v + (1 − α) W^l`` (then
    ``(1 − r) W + r W^vl`` where a vl copy exists); modality arithmetic: ``W = W0 + λ Σ_m (W^m − W0)``."""
    out: dict[str, torch.Tensor] = {}
    grouped: set[str] = set()
    for g in merge_groups(sd):
        by = {m: sd[k] for m, k in g.sources.items()}
        grouped |= set(g.sources.values())
        c = coef[g.layer] if coef.dim() == 1 else coef[g.layer, MODULES.index(g.module)]
        if method == "interpolation":
            w = by["l"] + c * (by["v"] - by["l"])
            if "vl" in by:
                w = (1.0 - vl_ratio) * w + vl_ratio * by["vl"]
        else:
            assert base is not None
            w0 = _base_weight(base, g)
            w = w0 + c * sum(x - w0 for x in by.values())
        out[g.target] = w
    out |= {k: v for k, v in sd.items() if k not in grouped}
    return out


def learn_schedule(
    model: nn.Module,
    batches: Sequence[Any],
    objective: str | Callable[[tuple[torch.Tensor, ...], Any], torch.Tensor] = "supervised",
    *,
    method: str = "interpolation",
    granularity: str = "layer",
    base: Mapping[str, torch.Tensor] | None = None,
    steps: int = 30,
    lr: float = 0.1,
    init: float = 0.5,
    vl_ratio: float = 1 / 3,
    forward: Callable[[nn.Module, Any], tuple[torch.Tensor, ...]] | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Learn the coefficient schedule of a modality merge of ``model`` (a modality-specific VLMo) on ``batches``.

    ``method``: ``interpolation`` (its α) or ``modality_arithmetic`` (its λ; ``base`` is W0's state dict, merged
    or modality-specific names). ``granularity``: one coefficient per ``layer``, or per layer and ``module``
    (``norm1`` / ``attn`` / ``norm2`` / ``mlp``: those with modality copies). Both coefficients are sigmoid(z) in
    (0, 1) (λ = 1 adds every modality vector in full); full-batch Adam on z, z₀ = logit(``init``), for ``steps``
    steps over all ``batches`` each step. ``forward(merged_model, batch)`` gives the objective's inputs (default:
    ITC embeddings and the logit scale).

    Returns ``{"method", "param" (alpha / lam), "granularity", "schedule" (the
    :mod:`~vlmerge.merge.schedule` form: N values, or N ``{module: value}`` dicts), "objective", "loss_at_init",
    "loss_after", "steps", "lr", "init", "history": [loss per step]}``; ``schedule`` is the method's parameter.
    """
    from tqdm.auto import tqdm

    from ..models.vlmo import meta_model

    what = f"learned {LEARNABLE.get(method, 'schedule')}"
    if method not in LEARNABLE:
        raise ValueError(f"learned schedule: method {method!r} has no learnable coefficient; expected one of "
                         f"{', '.join(LEARNABLE)}")
    if granularity not in GRANULARITIES:
        raise ValueError(f"{what}: granularity {granularity!r}; expected one of {', '.join(GRANULARITIES)}")
    if (base is None) != (method == "interpolation"):
        raise ValueError(f"{what}: modality_arithmetic needs the base W0 and interpolation takes none")
    if not 0.0 < init < 1.0:
        raise ValueError(f"{what}: init {init} must be in (0, 1) (sigmoid(z) never reaches 0 or 1)")
    if steps < 1 or not (math.isfinite(lr) and lr > 0):
        raise ValueError(f"{what}: steps ≥ 1 and lr > 0 expected, got steps={steps}, lr={lr}")
    if not batches:
        raise ValueError(f"{what}: no batches")
    loss_fn = LOSSES[objective] if isinstance(objective, str) and objective in LOSSES else objective
    if isinstance(loss_fn, str):
        raise ValueError(f"unknown objective {objective!r}; expected one of {OBJECTIVES}")
    cfg = model.config  # type: ignore[attr-defined]
    groups = merge_groups(dict(model.named_parameters()))
    if not groups:
        raise ValueError(f"{what}: the model has no modality copies to merge")
    if forward is None and "itc" not in cfg.heads:
        raise ValueError(f"{what}: the objectives need the model's 'itc' head (contrastive projections)")
    sd = {k: v.detach() for k, v in model.state_dict().items()}
    if base is not None:
        base = {k: v.detach().to(torch.float32) for k, v in base.items()}
        for g in groups:
            _base_weight(base, g)  # every slot has its W0, before any step
    merged = meta_model(cfg.replace(arch="maa", merged_layers=()))  # its weights come from the combination
    net = _Objective(merged.eval(), forward or itc_outputs)

    def total(z: torch.Tensor) -> torch.Tensor:
        params = {f"model.{k}": v for k, v in _merged_params(sd, torch.sigmoid(z), method, vl_ratio, base).items()}
        losses = [loss_fn(torch.func.functional_call(net, params, (b,)), b) for b in batches]
        return torch.stack(losses).mean()

    shape = (cfg.depth,) if granularity == "layer" else (cfg.depth, len(MODULES))
    z = torch.full(shape, math.log(init / (1 - init)), dtype=torch.float32, requires_grad=True)
    opt = torch.optim.Adam([z], lr=lr)
    history = []
    with torch.no_grad():
        before = float(total(z))
    for _ in tqdm(range(steps), disable=not progress, desc=what, unit="step"):
        opt.zero_grad()
        loss = total(z)
        loss.backward()
        opt.step()
        history.append(float(loss.detach()))
    with torch.no_grad():
        after = float(total(z))
    coef = torch.sigmoid(z.detach())
    schedule: list[Any]
    if granularity == "layer":
        schedule = [round(float(c), 6) for c in coef]
    else:  # only the modules that have copies: the schedule then names exactly the merged slots
        merged_modules = {(g.layer, g.module) for g in groups}
        schedule = [{m: round(float(coef[i, j]), 6) for j, m in enumerate(MODULES) if (i, m) in merged_modules}
                    or 0.5 for i in range(cfg.depth)]
    return {"method": method, "param": LEARNABLE[method], "granularity": granularity, "schedule": schedule,
            "objective": objective if isinstance(objective, str) else "custom", "loss_at_init": before,
            "loss_after": after, "steps": steps, "lr": lr, "init": init, "history": history}


def world_split_batches(model: nn.Module, batches: int, seed: int = 0, split: str = "val",
                        batch_size: int = 32, world: Mapping[str, Any] | None = None) -> list[dict[str, Any]]:
    """``batches`` image-caption batches of the embedded world's ``split`` (default: its validation split);
    ``world``: WorldConfig fields (the world the model was trained on; default the full world). Each batch
    holds ``not_negative`` [B, B], which captions are true of which images (the supervised objective's mask)."""
    from .gram_data import world_batches

    return list(world_batches(model, batches, seed, batch_size=batch_size, split=split,
                              world=dict(world) if world else None, truth=True))


def check_objective(name: str) -> str:
    if name not in OBJECTIVES:
        raise ValueError(f"--learn-objective {name!r}: expected one of {', '.join(OBJECTIVES)}")
    return name


__all__ = ["GRANULARITIES", "LEARNABLE", "LOSSES", "OBJECTIVES", "check_objective", "contrastive_loss",
           "entropy_loss", "itc_outputs", "learn_schedule", "world_split_batches"]
