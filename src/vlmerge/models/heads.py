"""Task heads on top of the VLMo backbone (never merged: they stay as they are).

Every head is built from the model config by name (:data:`HEADS`), so a checkpoint's ``config.json`` lists
its heads and loading rebuilds them. Shapes: ``B`` batch, ``D`` width.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

if TYPE_CHECKING:
    from .vlmo import ModelConfig


class Pooler(nn.Module):
    """BERT/VLMo pooler: [B, D] -> tanh(Linear) [B, D]."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dense = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.dense(x))


class ITCHead(nn.Module):
    """Image-text contrastive head: projections of [I_CLS] / [T_CLS] and a learned temperature.

    ``logit_scale`` holds log(1/τ), initialised to log(1/0.07) as in CLIP/VLMo.
    """

    def __init__(self, dim: int, proj_dim: int, bias: bool = False) -> None:
        super().__init__()
        self.image_proj = nn.Linear(dim, proj_dim, bias=bias)
        self.text_proj = nn.Linear(dim, proj_dim, bias=bias)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))


class MLPHead(nn.Module):
    """Optional pooler, then Linear(in, hidden) -> LayerNorm -> GELU -> Linear(hidden, out) (VLMo's VQA /
    NLVR2 heads); [B, in] -> [B, out]."""

    def __init__(self, in_dim: int, hidden: int, out: int, pool_dim: int | None = None) -> None:
        super().__init__()
        self.pooler = Pooler(pool_dim) if pool_dim else nn.Identity()
        self.fc1 = nn.Linear(in_dim, hidden)
        self.norm = nn.LayerNorm(hidden)
        self.fc2 = nn.Linear(hidden, out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.norm(self.fc1(self.pooler(x)))))


class ITMHead(nn.Module):
    """Image-text matching: pooled fusion [T_CLS] [B, D] -> logits [B, 2] (1 = matched)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.pooler = Pooler(dim)
        self.fc = nn.Linear(dim, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pooler(x))


class MLMHead(nn.Module):
    """Masked language modelling: fusion text tokens [B, L, D] -> vocabulary logits [B, L, V]."""

    def __init__(self, dim: int, vocab_size: int) -> None:
        super().__init__()
        self.dense = nn.Linear(dim, dim)
        self.norm = nn.LayerNorm(dim)
        self.decoder = nn.Linear(dim, vocab_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.norm(F.gelu(self.dense(x))))


class PixelHead(nn.Module):
    """Per-patch linear decoder: patch tokens [B, P, D] -> [B, P, out] (pixels for MIM, classes for
    segmentation after a LayerNorm)."""

    def __init__(self, dim: int, out: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fc = nn.Linear(dim, out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.norm(x))


def _classifier(c: ModelConfig) -> nn.Module:
    return nn.Sequential(nn.LayerNorm(c.embed_dim), nn.Linear(c.embed_dim, c.num_classes))


HEADS: dict[str, Callable[[ModelConfig], nn.Module]] = {
    "itc": lambda c: ITCHead(c.embed_dim, c.proj_dim or c.embed_dim, c.itc_bias),
    "itm": lambda c: ITMHead(c.embed_dim),
    "mlm": lambda c: MLMHead(c.embed_dim, c.vocab_size),
    "mim": lambda c: PixelHead(c.embed_dim, c.patch_size**2 * c.in_chans),
    "vqa": lambda c: MLPHead(c.embed_dim, 2 * c.embed_dim, c.num_answers, pool_dim=c.embed_dim),
    "nlvr2": lambda c: MLPHead(2 * c.embed_dim, 2 * c.embed_dim, 2, pool_dim=None),
    "cls": _classifier,
    "seg": lambda c: PixelHead(c.embed_dim, c.num_seg_classes),
}
"""Head name -> builder. ``nlvr2`` takes the two pooled [T_CLS] vectors concatenated ([B, 2D])."""
