"""Small reusable layers of the VLMo family: patch embedding, attention, MLP and the expert-routed block.

Shapes: ``B`` batch, ``L`` tokens, ``D`` width, ``H`` heads.
"""

from __future__ import annotations

from collections.abc import Callable

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
    matrices concatenated. Optional parts, off by default: ``inner_norm`` (Sub-LN, BEiT-3 / Magneto: a
    LayerNorm on the attended values before ``proj``) and ``gamma`` (LayerScale, CaiT / VLMo: the output
    multiplied by a learned per-channel vector).

    The forward is three steps so that a sequence whose tokens use different experts (VLMo / BEiT-3's
    fusion route) can project each segment with its own expert, attend over all tokens at once, and
    project back per segment: :meth:`project` -> :meth:`attend` -> :meth:`output`.
    """

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, subln: bool = False,
                 layer_scale: float | None = None, ln_eps: float = 1e-6) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"embed_dim ({dim}) must be divisible by num_heads ({num_heads})")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.inner_norm = nn.LayerNorm(dim, eps=ln_eps) if subln else None
        self.proj = nn.Linear(dim, dim)
        self.gamma = nn.Parameter(torch.full((dim,), layer_scale)) if layer_scale is not None else None

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, L, D] -> qkv [B, L, 3D]."""
        return self.qkv(x)

    def attend(self, qkv: torch.Tensor, mask: torch.Tensor | None = None, bias: torch.Tensor | None = None
               ) -> torch.Tensor:
        """qkv [B, L, 3D] -> softmax(q k^T / sqrt(d) + bias) v [B, L, D] (heads concatenated, before ``proj``).

        mask [B, 1, 1, L] bool (True = attend) or None; bias [H, L, L] or [B, H, L, L] added to the logits
        (a relative position bias) or None.
        """
        b, n, three_d = qkv.shape
        d = three_d // 3
        q, k, v = qkv.view(b, n, 3, self.num_heads, d // self.num_heads).permute(2, 0, 3, 1, 4)
        if bias is not None:
            bias = bias.to(q.dtype)
            attn_mask = bias if mask is None else bias.masked_fill(~mask, float("-inf"))
        else:
            attn_mask = mask
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        return out.transpose(1, 2).reshape(b, n, d)

    def output(self, h: torch.Tensor) -> torch.Tensor:
        """Attended values [B, L, D] -> (Sub-LN) -> ``proj`` -> (LayerScale) [B, L, D]."""
        if self.inner_norm is not None:
            h = self.inner_norm(h)
        h = self.proj(h)
        return h if self.gamma is None else h * self.gamma

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None, bias: torch.Tensor | None = None
                ) -> torch.Tensor:
        """x [B, L, D]; mask [B, 1, 1, L] bool (True = attend) or None; bias [H, L, L] or None -> [B, L, D]."""
        return self.output(self.attend(self.project(x), mask, bias))


class Mlp(nn.Module):
    """fc1 -> exact GELU -> (Sub-LN ``ffn_norm``) -> fc2 -> (LayerScale ``gamma``): [B, L, D] -> [B, L, D]."""

    def __init__(self, dim: int, hidden: int, subln: bool = False, layer_scale: float | None = None,
                 ln_eps: float = 1e-6) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.ffn_norm = nn.LayerNorm(hidden, eps=ln_eps) if subln else None
        self.fc2 = nn.Linear(hidden, dim)
        self.gamma = nn.Parameter(torch.full((dim,), layer_scale)) if layer_scale is not None else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act(self.fc1(x))
        if self.ffn_norm is not None:
            h = self.ffn_norm(h)
        h = self.fc2(h)
        return h if self.gamma is None else h * self.gamma


class Block(nn.Module):
    """A transformer block whose four modules each hold one or more experts.

    ``experts[module]`` lists the experts of that module: ``("shared",)`` for a modality-agnostic module,
    or modality names (``v``, ``l``, and ``vl`` in the top layers) for a modality-specific one. A forward
    for modality ``m`` uses expert ``m`` of each module that has it and the ``shared`` one otherwise.

    A ``vl`` forward with ``split=L`` (early fusion, VLMo / BEiT-3: text tokens ``x[:, :L]`` then image
    tokens) routes each token through its own modality's expert in every module that has no ``vl`` or
    ``shared`` expert; attention then projects q/k/v per segment and attends over all tokens at once.

    Pre-LN (``prenorm=True``, ViT / VLMo):   x = x + attn(norm1(x)); x = x + mlp(norm2(x))
    Post-LN (``prenorm=False``, BERT):      x = norm1(x + attn(x));  x = norm2(x + mlp(x))
    (LayerScale and Sub-LN live inside ``attn`` / ``mlp``; see :class:`Attention`.)
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
        subln: bool = False,
        layer_scale: float | None = None,
    ) -> None:
        super().__init__()
        self.prenorm = prenorm
        make = {
            "norm1": lambda: nn.LayerNorm(dim, eps=ln_eps),
            "attn": lambda: Attention(dim, num_heads, qkv_bias, subln, layer_scale, ln_eps),
            "norm2": lambda: nn.LayerNorm(dim, eps=ln_eps),
            "mlp": lambda: Mlp(dim, mlp_hidden, subln, layer_scale, ln_eps),
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

    def _by_segment(self, module: str, modality: str, split: int | None) -> tuple[nn.Module, ...]:
        """The expert(s) of ``module``: one for the whole sequence, or (text expert, image expert) when an
        early-fusion ``vl`` sequence has no ``vl`` / ``shared`` expert here."""
        experts: nn.ModuleDict = getattr(self, module)
        if split is None or modality != "vl" or "vl" in experts or SHARED in experts:
            return (self._pick(module, modality),)
        return (self._pick(module, "l"), self._pick(module, "v"))

    @staticmethod
    def _segments(parts: tuple[nn.Module, ...], x: torch.Tensor, split: int | None,
                  fn: Callable[[nn.Module, torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
        """``fn(expert, x)`` (default: the expert's forward) on the whole sequence, or on the text tokens
        ``x[:, :split]`` with the first expert and the image tokens with the second, concatenated."""
        call = fn or (lambda m, t: m(t))
        if len(parts) == 1:
            return call(parts[0], x)
        return torch.cat([call(parts[0], x[:, :split]), call(parts[1], x[:, split:])], dim=1)

    def _attention(self, x: torch.Tensor, modality: str, mask: torch.Tensor | None, bias: torch.Tensor | None,
                   split: int | None) -> torch.Tensor:
        parts = self._by_segment("attn", modality, split)
        if len(parts) == 1:
            return parts[0](x, mask, bias)
        qkv = self._segments(parts, x, split, lambda m, t: m.project(t))
        h = parts[0].attend(qkv, mask, bias)
        return self._segments(parts, h, split, lambda m, t: m.output(t))

    def forward(self, x: torch.Tensor, modality: str, mask: torch.Tensor | None = None,
                bias: torch.Tensor | None = None, split: int | None = None) -> torch.Tensor:
        """x [B, L, D] of one modality (``v``, ``l`` or ``vl``); mask [B, 1, 1, L] bool or None; bias
        [H, L, L] relative position bias or None; split: text length of an early-fusion ``vl`` sequence."""
        norm1, norm2 = self._by_segment("norm1", modality, split), self._by_segment("norm2", modality, split)
        mlp = self._by_segment("mlp", modality, split)
        if self.prenorm:
            x = x + self._attention(self._segments(norm1, x, split), modality, mask, bias, split)
            return x + self._segments(mlp, self._segments(norm2, x, split), split)
        x = self._segments(norm1, x + self._attention(x, modality, mask, bias, split), split)
        return self._segments(norm2, x + self._segments(mlp, x, split), split)
