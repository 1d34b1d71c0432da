"""Small reusable layers of the VLMo family: patch embedding, attention, MLP and the expert-routed block.

Shapes: ``B`` batch, ``L`` tokens, ``D`` width, ``H`` heads.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .roles import MODULES, SHARED


class PatchEmbed(nn.Module):
    """Image [B, C, S, S] -> patch tokens [B, (S/p)^2, D] with one strided convolution (ViT)."""

    def __init__(self, image_size: int, patch_size: int, in_chans: int, dim: int) -> None:
        super().__init__()
        if image_size % patch_size:
            raise ValueError(f"image_size ({image_size}) must be a multiple of patch_size ({patch_size})")
        self.image_size = image_size
        self.num_patches = (image_size // patch_size) ** 2
        self.proj = nn.Conv2d(in_chans, dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-2:] != (self.image_size, self.image_size):
            raise ValueError(
                f"image must be {self.image_size}x{self.image_size} px (model config image_size), "
                f"got {tuple(x.shape[-2:])}"
            )
        return self.proj(x).flatten(2).transpose(1, 2)


class Attention(nn.Module):
    """Multi-head self-attention with a fused ``qkv`` projection and ``scaled_dot_product_attention``.

    ``qkv.weight`` is [3D, D]: rows are (q, k, v), each head-major, as BERT's and ViT's separate q/k/v
    matrices concatenated.
    """

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"embed_dim ({dim}) must be divisible by num_heads ({num_heads})")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """x [B, L, D]; mask [B, 1, 1, L] bool (True = attend) or None -> [B, L, D]."""
        b, n, d = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.num_heads, d // self.num_heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class Mlp(nn.Module):
    """fc1 -> exact GELU -> fc2: [B, L, D] -> [B, L, D]."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """A transformer block whose four modules each hold one or more experts.

    ``experts[module]`` lists the experts of that module: ``("shared",)`` for a modality-agnostic module,
    or modality names (``v``, ``l``, and ``vl`` in the top layers) for a modality-specific one. A forward
    for modality ``m`` uses expert ``m`` of each module that has it and the ``shared`` one otherwise.

    Pre-LN (``prenorm=True``, ViT / VLMo):   x = x + attn(norm1(x)); x = x + mlp(norm2(x))
    Post-LN (``prenorm=False``, BERT):      x = norm1(x + attn(x));  x = norm2(x + mlp(x))
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_hidden: int,
        experts: dict[str, tuple[str, ...]],
        qkv_bias: bool = True,
        prenorm: bool = True,
        ln_eps: float = 1e-6,
    ) -> None:
        super().__init__()
        self.prenorm = prenorm
        make = {
            "norm1": lambda: nn.LayerNorm(dim, eps=ln_eps),
            "attn": lambda: Attention(dim, num_heads, qkv_bias),
            "norm2": lambda: nn.LayerNorm(dim, eps=ln_eps),
            "mlp": lambda: Mlp(dim, mlp_hidden),
        }
        for module in MODULES:
            setattr(self, module, nn.ModuleDict({e: make[module]() for e in experts[module]}))

    def _pick(self, module: str, modality: str) -> nn.Module:
        experts: nn.ModuleDict = getattr(self, module)
        if modality in experts:
            return experts[modality]
        if SHARED in experts:
            return experts[SHARED]
        raise KeyError(f"block has no {module} expert for modality {modality!r} (has {list(experts)})")

    def forward(self, x: torch.Tensor, modality: str, mask: torch.Tensor | None = None) -> torch.Tensor:
        """x [B, L, D] of one modality (``v``, ``l`` or ``vl``); mask [B, 1, 1, L] bool or None."""
        norm1, attn = self._pick("norm1", modality), self._pick("attn", modality)
        norm2, mlp = self._pick("norm2", modality), self._pick("mlp", modality)
        if self.prenorm:
            x = x + attn(norm1(x), mask)
            return x + mlp(norm2(x))
        x = norm1(x + attn(x, mask))
        return norm2(x + mlp(x))
