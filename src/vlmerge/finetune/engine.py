"""The one fine-tuning loop every task shares: optimizer groups, schedule, steps, freezing of unreached weights.

A task supplies ``loss(model, batch) -> {"loss": tensor, ...scalars}``; this module does the rest
(VLMo supp. B.2-B.3 and its released configs): AdamW β = (0.9, 0.98), weight decay 0.01 on matrices only
(the pre-training rule, :func:`vlmerge.pretrain.optim.decays`), linear warm-up over the first 10 % of the
steps then linear decay to 0, task heads at ``head_lr_mult`` × the peak (VLMo's ``lr_mult``: 20 for VQA),
optional BEiT layer-wise decay.

Freezing: the scope (:func:`~vlmerge.finetune.model.trainable_names`) picks what *may* train; the first
step's backward then shows what the task's loss actually reaches, and everything it does not reach is
frozen too, so AdamW's decoupled weight decay cannot drift weights the task never uses (e.g. the VL experts
during ITC-only retrieval fine-tuning).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..models import VLMo, parse_param_name
from ..pretrain.optim import decays, lr_at

log = logging.getLogger("vlmerge.finetune")

LossFn = Callable[[VLMo, Mapping[str, torch.Tensor]], Mapping[str, torch.Tensor]]


@dataclass
class TrainResult:
    """What a training loop did: steps, wall time, the trained parameter names, and the loss history."""

    steps: int
    seconds: float
    trained: list[str]
    frozen_unreached: list[str]
    history: list[dict[str, float]] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        last = self.history[-1] if self.history else {}
        return {"steps": self.steps, "seconds": round(self.seconds, 2), "trained_params": len(self.trained),
                "frozen_unreached": len(self.frozen_unreached), "final": last}


def layer_id(name: str, depth: int) -> int:
    """BEiT's layer index for layer-wise lr decay: embeddings 0, block i -> i + 1, the rest depth + 1."""
    role = parse_param_name(name)
    if role.kind == "block":
        return int(role.layer) + 1  # type: ignore[arg-type]
    if role.kind == "embed":
        return 0
    return depth + 1


def param_groups(
    model: VLMo, names: Iterable[str], weight_decay: float, head_lr_mult: float, layer_decay: float
) -> list[dict[str, Any]]:
    """AdamW groups over ``names``, keyed by (decayed?, lr scale); each group carries ``lr_scale``.

    lr scale = ``layer_decay ** (depth + 1 - layer_id)`` × (``head_lr_mult`` for ``heads.*``).
    """
    depth = model.config.num_blocks  # FLAVA's multimodal-encoder layers sit above the N unimodal ones
    named = dict(model.named_parameters())
    groups: dict[tuple[bool, float], dict[str, Any]] = {}
    for name in sorted(names):
        p = named[name]
        scale = layer_decay ** (depth + 1 - layer_id(name, depth))
        if parse_param_name(name).kind == "head":
            scale *= head_lr_mult
        key = (decays(name, p), scale)
        g = groups.setdefault(key, {"params": [], "param_names": [], "lr_scale": scale,
                                    "weight_decay": weight_decay if key[0] else 0.0})
        g["params"].append(p)
        g["param_names"].append(name)
    return list(groups.values())


def loop_batches(loader: Iterable[Any]) -> Iterator[Any]:
    """Cycle through ``loader`` forever (a fresh shuffle each pass when the loader shuffles)."""
    while True:
        empty = True
        for batch in loader:
            empty = False
            yield batch
        if empty:
            raise ValueError("the training loader yields no batches (is the training split empty?)")


def move(batch: Mapping[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def train(
    model: VLMo,
    loss_fn: LossFn,
    loader: Iterable[Mapping[str, torch.Tensor]],
    trainable: Iterable[str],
    *,
    steps: int,
    lr: float,
    warmup: float = 0.1,
    weight_decay: float = 0.01,
    betas: tuple[float, float] = (0.9, 0.98),
    head_lr_mult: float = 1.0,
    layer_decay: float = 1.0,
    grad_clip: float | None = None,
    log_every: int = 50,
    device: torch.device | str = "cpu",
) -> TrainResult:
    """Run ``steps`` optimizer steps of ``loss_fn`` on batches from ``loader`` (cycled), in place.

    ``trainable``: names allowed to change (every other parameter gets ``requires_grad=False``); those the
    first backward does not reach are frozen as well. ``warmup`` < 1 is a fraction of ``steps``, otherwise
    a step count.
    """
    device = torch.device(device)
    model.to(device).train()
    allowed = set(trainable)
    for name, p in model.named_parameters():
        p.requires_grad_(name in allowed)
        p.grad = None
    warm = int(round(warmup * steps)) if warmup < 1 else int(warmup)
    warm = min(warm, max(steps - 1, 0))
    batches = loop_batches(loader)
    history: list[dict[str, float]] = []
    optimizer: torch.optim.Optimizer | None = None
    trained: list[str] = []
    unreached: list[str] = []
    t0 = time.time()
    for step in range(steps):
        out = loss_fn(model, move(next(batches), device))
        loss = out["loss"]
        if not torch.isfinite(loss):
            raise FloatingPointError(f"fine-tuning loss is {float(loss.detach())} at step {step}: training "
                                         "diverged (lower lr or check the inputs)")
        loss.backward()
        if optimizer is None:  # the first backward tells which allowed weights the loss reaches
            named = dict(model.named_parameters())
            unreached = sorted(n for n in allowed if named[n].grad is None)
            for n in unreached:
                named[n].requires_grad_(False)
            trained = sorted(allowed - set(unreached))
            if not trained:
                raise ValueError("nothing to fine-tune: the task's loss reaches no trainable parameter")
            groups = param_groups(model, trained, weight_decay, head_lr_mult, layer_decay)
            optimizer = torch.optim.AdamW(groups, lr=lr, betas=betas, eps=1e-8)
        peak = lr_at(step, steps, lr, warm, "linear")
        for g in optimizer.param_groups:
            g["lr"] = peak * g["lr_scale"]
        if grad_clip:
            nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]], grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step % log_every == 0 or step == steps - 1:
            row = {"step": step + 1, "lr": peak, **{k: float(v.detach()) for k, v in out.items()}}
            history.append(row)
            log.info("step %d/%d  %s", step + 1, steps,
                     "  ".join(f"{k} {v:.4g}" for k, v in row.items() if k not in ("step",)))
    model.eval()
    for p in model.parameters():
        p.requires_grad_(True)
    return TrainResult(steps=steps, seconds=time.time() - t0, trained=trained, frozen_unreached=unreached,
                       history=history)


def steps_for(epochs: float, batches_per_epoch: int, max_steps: int | None) -> int:
    """Optimizer steps of a run: ``max_steps`` when set, else ceil(epochs × batches per epoch)."""
    if max_steps is not None:
        return max_steps
    return max(1, math.ceil(epochs * batches_per_epoch))
