"""RandAugment (Cubuk et al. 2020) on image tensors, batched and seeded; used by VLMo §4.1 and the merging paper §5.

Each image gets ``num_ops`` operations drawn uniformly from :data:`OPS`, each at magnitude ``M`` ∈ [0, 10]
with a random sign (timm's convention: level = M / 10). Images are float [B, 3, S, S] in [0, 1]. All
randomness comes from the caller's generator, and the batch is processed one operation at a time over
the images that drew it, so a 1024-image batch costs a few dozen kernels on a GPU. No torchvision.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

_GRAY = (0.299, 0.587, 0.114)  # ITU-R 601 luma, as PIL's convert("L")


def _gray(x: torch.Tensor) -> torch.Tensor:
    """[n, 3, S, S] -> luma [n, 1, S, S]."""
    return (x * x.new_tensor(_GRAY).view(1, 3, 1, 1)).sum(dim=1, keepdim=True)


def _blend(x: torch.Tensor, degenerate: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """PIL ImageEnhance: degenerate + factor·(x − degenerate), factor [n]."""
    return degenerate + factor.view(-1, 1, 1, 1) * (x - degenerate)


def _affine(x: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """Warp [n, 3, S, S] by [n, 2, 3] matrices in normalised coordinates; outside pixels become black."""
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def _eye(level: torch.Tensor) -> torch.Tensor:
    theta = torch.zeros(len(level), 2, 3, dtype=level.dtype, device=level.device)
    theta[:, 0, 0] = theta[:, 1, 1] = 1.0
    return theta


def _rotate(x: torch.Tensor, level: torch.Tensor) -> torch.Tensor:
    angle = level * (30.0 * math.pi / 180.0)
    theta = _eye(level)
    theta[:, 0, 0], theta[:, 0, 1] = angle.cos(), -angle.sin()
    theta[:, 1, 0], theta[:, 1, 1] = angle.sin(), angle.cos()
    return _affine(x, theta)


def _shear(axis: int) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    def op(x: torch.Tensor, level: torch.Tensor) -> torch.Tensor:
        theta = _eye(level)
        theta[:, axis, 1 - axis] = 0.3 * level
        return _affine(x, theta)

    return op


def _translate(axis: int) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    def op(x: torch.Tensor, level: torch.Tensor) -> torch.Tensor:
        theta = _eye(level)
        theta[:, axis, 2] = 2 * 0.45 * level  # up to 45 % of the side; normalised coordinates span 2
        return _affine(x, theta)

    return op


def _autocontrast(x: torch.Tensor, level: torch.Tensor) -> torch.Tensor:
    lo = x.amin(dim=(2, 3), keepdim=True)
    hi = x.amax(dim=(2, 3), keepdim=True)
    return torch.where(hi > lo, (x - lo) / (hi - lo).clamp(min=1e-6), x)


def _solarize(x: torch.Tensor, level: torch.Tensor) -> torch.Tensor:
    threshold = (1.0 - level.abs()).view(-1, 1, 1, 1)
    return torch.where(x > threshold, 1.0 - x, x)


def _posterize(x: torch.Tensor, level: torch.Tensor) -> torch.Tensor:
    levels = (2.0 ** (8 - (4 * level.abs()).round())).view(-1, 1, 1, 1)  # keep 8 .. 4 bits
    return torch.floor(x * (levels - 1) + 0.5) / (levels - 1)


def _sharpness(x: torch.Tensor, level: torch.Tensor) -> torch.Tensor:
    kernel = x.new_tensor([[1.0, 1.0, 1.0], [1.0, 5.0, 1.0], [1.0, 1.0, 1.0]]) / 13.0  # PIL's SMOOTH filter
    blurred = F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), kernel.expand(3, 1, 3, 3), groups=3)
    return _blend(x, blurred, 1.0 + 0.9 * level)


OPS: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "identity": lambda x, level: x,
    "autocontrast": _autocontrast,
    "rotate": _rotate,
    "solarize": _solarize,
    "color": lambda x, level: _blend(x, _gray(x), 1.0 + 0.9 * level),
    "posterize": _posterize,
    "contrast": lambda x, level: _blend(x, _gray(x).mean(dim=(1, 2, 3), keepdim=True), 1.0 + 0.9 * level),
    "brightness": lambda x, level: _blend(x, torch.zeros_like(x), 1.0 + 0.9 * level),
    "sharpness": _sharpness,
    "shear_x": _shear(0),
    "shear_y": _shear(1),
    "translate_x": _translate(0),
    "translate_y": _translate(1),
}
"""Operation name -> fn(images [n, 3, S, S], signed level [n] in [−1, 1]) -> images. RandAugment's list
without equalize (histogram equalisation has no cheap batched form); no flips, which would break
captions that say "left" or "right"."""


def rand_augment(
    images: torch.Tensor, num_ops: int, magnitude: float, generator: torch.Generator, ops: Sequence[str] = tuple(OPS)
) -> torch.Tensor:
    """RandAugment: ``num_ops`` operations per image drawn from ``ops`` at ``magnitude`` (0-10), random sign each.

    images [B, 3, S, S] in [0, 1] -> new tensor, same shape, clamped to [0, 1].
    """
    if not 0 <= magnitude <= 10:
        raise ValueError(f"augment magnitude must be in [0, 10], got {magnitude}")
    out = images.float().clone()
    b, dev = len(out), out.device
    fns = [OPS[name] for name in ops]
    for _ in range(num_ops):
        choice = torch.randint(len(fns), (b,), generator=generator, device=dev)
        sign = torch.randint(2, (b,), generator=generator, device=dev).float() * 2 - 1
        level = sign * (magnitude / 10.0)
        for k, fn in enumerate(fns):
            idx = (choice == k).nonzero().squeeze(1)
            if len(idx):
                out[idx] = fn(out[idx], level[idx]).clamp(0.0, 1.0)
    return out.to(images.dtype)
